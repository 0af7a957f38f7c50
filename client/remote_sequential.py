"""RemoteSequential: a differentiable torch module standing for a range of the model's blocks, run by peers."""

import math
from collections.abc import Callable, Iterator

import grpc
import torch
from torch import nn

from client.config import ClientConfig
from client.inference_session import InferenceSession, add_lora
from client.swarm_view import RETRYABLE, SwarmView
from client.transport import PeerConnections
from client.verification import Opinion, Referee, VerificationReport, tensors_agree, tolerance
from swarm import tensors
from swarm.chunks import MAX_CHUNKED_MESSAGES, ChunkAssembler, ChunkedMessageError, to_chunks
from swarm.errors import RemoteError, SwarmError
from swarm.net.compression import check_codec
from swarm.routing import Hop
from swarm.tensors import DTYPES
from swarm.wire import swarm_peer_pb2 as pb

LoRAFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "{block}.{module path}" -> (A [r, in], B [out, r])
RESPONSE_TYPES = {"Forward": pb.ForwardResponse, "Backward": pb.BackwardResponse}


class RemoteSequential(nn.Module):
    def __init__(
        self,
        model_prefix: str,
        num_blocks: int,
        config: ClientConfig,
        view: SwarmView | None = None,
        start_block: int = 0,
        end_block: int | None = None,
        exclude: frozenset[str] = frozenset(),
        check_answers: bool | None = None,
        purpose: str = "training",
        quantization: str | None = None,
    ):
        """`exclude`: peers never to use; `check_answers` (default: config.verify): have other peers check what
        each training call's peer answered (client/verification.py); `purpose`: how chains are chosen, and
        `quantization`: whose weights they go through (see SwarmView.chain)."""
        super().__init__()
        self.model_prefix, self.config = model_prefix, config
        self.view = view or SwarmView(model_prefix, num_blocks, config, PeerConnections(config.max_message_bytes))
        self.connections = self.view.connections
        self.start_block = start_block
        self.end_block = num_blocks if end_block is None else end_block
        self.codec = check_codec(config.compression)  # activations on the wire, both ways
        self.exclude, self.purpose, self.quantization = exclude, purpose, quantization
        self.check_answers = config.verify if check_answers is None else check_answers
        self.peers_used: dict[str, torch.dtype] = {}  # every peer that answered a call of this module, and its dtype
        self.report = VerificationReport()  # what the checks of training calls found
        self.checker = Referee(self.view)

    def __len__(self) -> int:
        return self.end_block - self.start_block

    def __getitem__(self, index: int | slice) -> "RemoteSequential":
        """Block `index`, or a contiguous range of blocks, as a RemoteSequential on the same swarm view (as in
        Petals: `model.transformer.h[3:6]`); indices count from this sequence's first block."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1 or start >= stop:
                raise IndexError(f"a RemoteSequential slice must be contiguous and non-empty, got {index}")
        else:
            start = index + len(self) if index < 0 else index
            if not 0 <= start < len(self):
                raise IndexError(f"block index {index} is out of range for {len(self)} blocks")
            stop = start + 1
        return RemoteSequential(
            self.model_prefix, self.view.num_blocks, self.config, self.view,
            self.start_block + start, self.start_block + stop, self.exclude, self.check_answers,
        )

    def referee(self, start: int, end: int, exclude: frozenset[str], quantization: str) -> "RemoteSequential":
        """Blocks [start, end) on peers outside `exclude` (and this module's own exclusions) whose weights are
        stored as `quantization` (that of the peer checked: another would not give the same answer), unchecked:
        what a second opinion is computed with. Its chain is the fastest one that leaves peers over for a third
        opinion (SwarmView.chain's "referee")."""
        return RemoteSequential(
            self.model_prefix, self.view.num_blocks, self.config, self.view, start, end, self.exclude | exclude, False,
            "referee", quantization,
        )

    def opinions(
        self, hop: Hop, compute: Callable[["RemoteSequential"], object], dtypes: set[torch.dtype]
    ) -> Callable[[frozenset[str]], Opinion]:
        """What `Referee.settle` asks for: `compute` run on the hop's blocks, on peers outside a set it is given
        that store their weights as the hop's peer does; the dtypes of the peers that answered are added to
        `dtypes` (they set the tolerance)."""

        def opinion(exclude: frozenset[str]) -> Opinion:
            reference = self.referee(hop.start, hop.end, exclude, hop.peer.record.quantization)
            answer = compute(reference)
            dtypes.update(reference.peers_used.values())
            return Opinion(answer, frozenset(reference.peers_used))

        return opinion

    def __iter__(self) -> Iterator["RemoteSequential"]:
        return (self[index] for index in range(len(self)))

    def extra_repr(self) -> str:
        return f"blocks {self.start_block}:{self.end_block} of {self.model_prefix}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        deep_prompts: torch.Tensor | None = None,
        lora: LoRAFactors | None = None,
        lora_scaling: float = 1.0,
    ) -> torch.Tensor:
        """Stateless pass through every block, differentiable with respect to the hidden states, the deep prompts
        ([num_blocks, batch, prefix, hidden], added to the first positions before each block) and the LoRA factors.

        Batches larger than what fits in one message are split into sub-batches.
        """
        batch, length = hidden_states.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool)
        sub_batch = self._sub_batch_size(hidden_states)
        outputs = []
        for first in range(0, batch, sub_batch):
            rows = slice(first, first + sub_batch)
            hidden = hidden_states[rows]
            chain = self.view.chain(self.start_block, self.end_block, self.purpose, exclude=self.exclude,
                                    quantization=self.quantization)
            for hop in chain:
                prompts = None
                if deep_prompts is not None:
                    prompts = deep_prompts[hop.start - self.start_block : hop.end - self.start_block, rows]
                hop_lora = {name: pair for name, pair in (lora or {}).items() if hop.start <= int(name.split(".")[0]) < hop.end}
                names = list(hop_lora)
                flat_lora = [tensor for name in names for tensor in hop_lora[name]]
                hidden = _RemoteHop.apply(
                    self, hop, hidden, position_ids[rows], attention_mask[rows], prompts, names, lora_scaling, *flat_lora
                )
            outputs.append(hidden)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _sub_batch_size(self, hidden_states: torch.Tensor) -> int:
        """Rows per request so that a request's activations stay within a quarter of the message limit."""
        row_bytes = math.prod(hidden_states.shape[1:]) * max(hidden_states.element_size(), 4)
        return max(1, self.config.max_message_bytes // 4 // max(row_bytes, 1))

    def call(self, hop: Hop, method: str, request) -> tuple:
        """Calls `method` on the hop's peer; if that peer fails, bans it and retries on another peer serving the
        same blocks (requests are stateless, so any replica can answer). Returns (response, hop that answered)."""
        for attempt in range(self.config.max_retries + 1):
            try:
                response = self._send(self.connections.stub(hop.peer), method, request)
                self.peers_used[hop.peer.peer_id] = DTYPES[hop.peer.record.dtype]
                return response, hop
            except grpc.RpcError as error:
                failure = RemoteError(hop.peer.peer_id, error.code().name, error.details() or "")
            except ChunkedMessageError as error:
                failure = RemoteError(hop.peer.peer_id, "PROTOCOL", str(error))
            except RemoteError as error:  # nothing to dial (see PeerConnections.stub)
                failure = error
            if failure.code not in RETRYABLE or attempt == self.config.max_retries:
                raise failure
            self.view.handle_failure(failure, attempt)
            replacement = self.view.replacement_chain(hop, exclude=self.exclude)
            if len(replacement) != 1:
                raise SwarmError(
                    f"peer {hop.peer.peer_id} failed and no single peer serves blocks {hop.start}:{hop.end} in its "
                    f"place (the swarm offers {[(h.start, h.end) for h in replacement]})"
                ) from failure
            hop = replacement[0]
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send(self, stub, method: str, request):
        """One call; a request above half the message limit (a very long sequence) goes as a stream of chunks."""
        half_limit = self.config.max_message_bytes // 2
        if request.ByteSize() <= half_limit:
            return getattr(stub, method)(request, timeout=self.config.request_timeout)
        chunks = getattr(stub, f"{method}Chunked")(to_chunks(request, half_limit), timeout=self.config.request_timeout)
        assembler = ChunkAssembler(MAX_CHUNKED_MESSAGES * self.config.max_message_bytes)
        for chunk in chunks:
            assembler.add(chunk)
        return assembler.message(RESPONSE_TYPES[method])

    def inference_session(
        self, max_length: int, lora: LoRAFactors | None = None, lora_scaling: float = 1.0,
        deep_prompts: torch.Tensor | None = None,
    ) -> InferenceSession:
        return InferenceSession(self, max_length, lora, lora_scaling, deep_prompts)

    def close(self) -> None:
        self.connections.close()
        self.view.shutdown()


class _RemoteHop(torch.autograd.Function):
    """One hop of a chain: Forward on the way in; on the way back, Backward with the same request."""

    @staticmethod
    def forward(ctx, remote, hop, hidden, position_ids, attention_mask, prompts, lora_names, lora_scaling, *lora_tensors):
        dtype = DTYPES[hop.peer.record.dtype]
        request = pb.ForwardRequest(
            start_block=hop.start,
            end_block=hop.end,
            hidden_states=tensors.encode(hidden.to(dtype), remote.codec),
            position_ids=tensors.encode(position_ids.cpu().long()),
            attention_mask=tensors.encode(attention_mask.cpu().bool()),
            compression=remote.codec,
        )
        if prompts is not None:
            request.deep_prompts.CopyFrom(tensors.encode(prompts.to(dtype)))
        request.adapter = remote.config.active_adapter
        lora = {name: tuple(lora_tensors[2 * index : 2 * index + 2]) for index, name in enumerate(lora_names)}
        add_lora(request, hop, lora, lora_scaling, dtype)
        request.keep_activations = any(ctx.needs_input_grad)  # the peer keeps the graph for our Backward
        response, ctx.hop = remote.call(hop, "Forward", request)
        ctx.remote, ctx.request, ctx.activations = remote, request, response.activations
        ctx.dtypes = (hidden.dtype, None if prompts is None else prompts.dtype, [t.dtype for t in lora_tensors])
        ctx.inputs = (hidden.detach(), position_ids, attention_mask, prompts, lora, lora_scaling)
        output = tensors.decode(response.hidden_states)
        if remote.check_answers:
            output = _checked(remote, ctx.hop, output, lambda reference: _reference_forward(reference, ctx.inputs))
        return output.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_dtype, prompts_dtype, lora_dtypes = ctx.dtypes
        remote, hop = ctx.remote, ctx.hop
        peer_dtype = DTYPES[hop.peer.record.dtype]

        def recompute(reference: RemoteSequential) -> tuple:
            return _reference_backward(reference, ctx.inputs, grad_output)

        if remote.view.is_convicted(hop.peer.peer_id):  # caught lying on this very forward: not asked again
            grads = _checked_elsewhere(remote, hop, recompute)
        else:
            request = pb.BackwardRequest(
                inputs=ctx.request, grad_outputs=tensors.encode(grad_output.to(peer_dtype), remote.codec),
                activations=ctx.activations,  # another peer taking over for a failed one recomputes
            )
            response, hop = remote.call(hop, "Backward", request)
            grads = (
                tensors.decode(response.grad_hidden_states),
                tensors.decode(response.grad_deep_prompts) if prompts_dtype is not None else None,
                *(tensors.decode(item.tensor) for item in response.grad_lora),
            )
            if remote.check_answers:
                grads = _checked(remote, hop, grads, recompute)
        grad_hidden, grad_prompts, *grad_lora = grads
        grad_prompts = None if grad_prompts is None else grad_prompts.to(prompts_dtype)
        grad_lora = [grad.to(dtype) for grad, dtype in zip(grad_lora, lora_dtypes)]
        return (None, None, grad_hidden.to(hidden_dtype), None, None, grad_prompts, None, None, *grad_lora)


def _checked(remote: RemoteSequential, hop: Hop, answer, recompute):
    """`answer` of the hop's peer if other peers agree with it, else theirs (client/verification.py)."""
    dtypes = {DTYPES[hop.peer.record.dtype]}
    trusted = remote.checker.settle(
        hop.peer.peer_id, answer, remote.opinions(hop, recompute, dtypes),
        lambda a, b: tensors_agree(a, b, tolerance(dtypes, remote.codec)), (hop.start, hop.end), remote.report,
    )
    return answer if trusted is None else trusted


def _checked_elsewhere(remote: RemoteSequential, hop: Hop, recompute):
    """What peers other than the hop's (convicted) one answer."""
    return recompute(remote.referee(hop.start, hop.end, frozenset({hop.peer.peer_id}), hop.peer.record.quantization))


def _reference_forward(reference: RemoteSequential, inputs: tuple) -> torch.Tensor:
    hidden, position_ids, attention_mask, prompts, lora, scaling = inputs
    with torch.no_grad():
        return reference(hidden, position_ids, attention_mask, prompts, lora, scaling)


def _reference_backward(reference: RemoteSequential, inputs: tuple, grad_output: torch.Tensor) -> tuple:
    """The gradients a Backward answers (hidden states, deep prompts or None, the LoRA factors in order)."""
    hidden, position_ids, attention_mask, prompts, lora, scaling = inputs
    hidden = hidden.detach().requires_grad_(True)
    prompts = None if prompts is None else prompts.detach().requires_grad_(True)
    lora = {name: tuple(t.detach().requires_grad_(True) for t in pair) for name, pair in lora.items()}
    leaves = [hidden] + ([prompts] if prompts is not None else []) + [t for pair in lora.values() for t in pair]
    with torch.enable_grad():
        output = reference(hidden, position_ids, attention_mask, prompts, lora, scaling)
        grads = torch.autograd.grad(output, leaves, grad_output.to(output.dtype), allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    if prompts is None:
        grads.insert(1, None)
    return tuple(grads)
