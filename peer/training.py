"""Forward and backward through a span, with the client's trainable tensors (deep prompts, LoRA).

Peers keep their weights frozen. A Backward recomputes the forward pass with gradients enabled for the inputs and
the tensors the client sent, then returns their gradients, unless its Forward asked to keep what autograd needs
(peer/activation_cache.py): then the kept graph is used and the recomputation skipped.
"""

from dataclasses import dataclass, field

import torch

from peer.activation_cache import ActivationCache, KeptActivations, SavedBytes
from peer.adapters import HostedAdapter, adapter_lora
from peer.lora import lora_target, loras_applied
from peer.validation import InvalidRequest, SpanInputs, check_block_range, decode_span_inputs, decode_tensor
from swarm import tensors
from swarm.blocks import BlockSpan
from swarm.net import compression
from swarm.wire import swarm_peer_pb2 as pb

MAX_LORA_RANK = 1024


@dataclass
class SpanJob:
    inputs: SpanInputs
    blocks: slice  # of span.layers
    deep_prompts: torch.Tensor | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_scaling: float = 1.0
    adapter: HostedAdapter | None = None  # hosted by the peer: applied, never differentiated
    codec: str = ""  # wire compression of the answer's activations and input gradients
    keep: bool = False  # a Forward asking to keep its activations for the Backward
    digest: bytes = b""  # of the request, when activations are kept or looked up


def decode_job(
    request: pb.ForwardRequest, span: BlockSpan, dtype: torch.dtype, adapters: dict[str, HostedAdapter]
) -> SpanJob:
    check_block_range(request.start_block, request.end_block, span.start, span.end)
    inputs = decode_span_inputs(
        request.hidden_states, request.position_ids, request.attention_mask,
        span.config.hidden_size, dtype, batch_size=None, first_position=0,
    )
    job = SpanJob(inputs, slice(request.start_block - span.start, request.end_block - span.start))
    batch, length, hidden_size = inputs.hidden_states.shape
    if tensors.is_set(request.deep_prompts):
        prompts = decode_tensor(request.deep_prompts, "deep_prompts")
        blocks = request.end_block - request.start_block
        if prompts.ndim != 4 or list(prompts.shape[:2]) != [blocks, batch] or prompts.shape[3] != hidden_size:
            raise InvalidRequest(f"deep_prompts must be [{blocks}, {batch}, prefix, {hidden_size}], got {list(prompts.shape)}")
        if not 0 < prompts.shape[2] <= length:
            raise InvalidRequest(f"deep_prompts cover {prompts.shape[2]} positions of a {length}-token sequence")
        check_trainable(prompts, dtype, "deep_prompts")
        job.deep_prompts = prompts
    job.adapter = find_adapter(adapters, request.adapter)
    job.lora = decode_lora(request.lora, span, request.start_block, request.end_block, dtype)
    job.lora_scaling = check_lora_scaling(request.lora_scaling) if job.lora else 1.0
    job.codec = check_compression(request.compression)
    job.keep = request.keep_activations
    return job


def check_compression(name: str) -> str:
    try:
        return compression.check_codec(name)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None


def find_adapter(adapters: dict[str, HostedAdapter], name: str) -> HostedAdapter | None:
    if not name:
        return None
    if name not in adapters:
        raise InvalidRequest(f"this peer hosts no adapter {name!r}; it hosts {sorted(adapters) or 'none'}", "NOT_FOUND")
    return adapters[name]


def decode_lora(named_tensors, span: BlockSpan, start: int, end: int, dtype: torch.dtype) -> dict[str, tuple]:
    """LoRA factors sent by a client, checked against the linears of blocks [start, end)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for named in named_tensors:
        target, _, kind = named.name.rpartition(".")
        if kind not in ("lora_A", "lora_B") or kind in factors.setdefault(target, {}):
            raise InvalidRequest(f"LoRA tensor names end in .lora_A or .lora_B, once each; got {named.name!r}")
        factors[target][kind] = decode_tensor(named.tensor, named.name)
    return {target: _checked_lora(span, start, end, target, pair, dtype) for target, pair in factors.items()}


def check_lora_scaling(scaling: float) -> float:
    if not 0 < abs(scaling) < 1e4:
        raise InvalidRequest(f"lora_scaling {scaling} is out of range")
    return scaling


def _checked_lora(span: BlockSpan, start: int, end: int, target: str, pair: dict, dtype) -> tuple:
    if set(pair) != {"lora_A", "lora_B"}:
        raise InvalidRequest(f"LoRA target {target!r} needs both lora_A and lora_B")
    try:
        module = lora_target(span, target)
    except ValueError as error:
        raise InvalidRequest(str(error), "OUT_OF_RANGE") from None
    if not start <= int(target.split(".")[0]) < end:
        raise InvalidRequest(f"LoRA target {target!r} is outside the requested blocks", "OUT_OF_RANGE")
    lora_a, lora_b = pair["lora_A"], pair["lora_B"]
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    if not 0 < rank <= MAX_LORA_RANK or list(lora_a.shape) != [rank, module.in_features] or list(lora_b.shape) != [module.out_features, rank]:
        raise InvalidRequest(
            f"LoRA {target!r}: lora_A must be [rank, {module.in_features}] and lora_B [{module.out_features}, rank], "
            f"got {list(lora_a.shape)} and {list(lora_b.shape)}"
        )
    check_trainable(lora_a, dtype, f"{target}.lora_A")
    check_trainable(lora_b, dtype, f"{target}.lora_B")
    return lora_a, lora_b


def check_trainable(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if tensor.dtype != dtype:
        raise InvalidRequest(f"{what} must be {dtype} (this peer's dtype), got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise InvalidRequest(f"{what} contains NaN or Inf")


def decode_grad_outputs(message: pb.Tensor, job: SpanJob) -> torch.Tensor:
    grad = decode_tensor(message, "grad_outputs")
    expected = job.inputs.hidden_states
    if grad.shape != expected.shape or grad.dtype != expected.dtype:
        raise InvalidRequest(f"grad_outputs must be {expected.dtype} {list(expected.shape)}, got {grad.dtype} {list(grad.shape)}")
    if not torch.isfinite(grad).all():
        raise InvalidRequest("grad_outputs contain NaN or Inf")
    return grad


def merge_group(job: SpanJob) -> tuple | None:
    """Jobs with equal keys can run as one batch; jobs carrying trainable tensors of their own, or keeping their
    activations, always run alone."""
    if job.deep_prompts is not None or job.lora or job.keep:
        return None
    return job.blocks.start, job.blocks.stop, job.adapter.name if job.adapter else "", job.inputs.hidden_states.shape[1]


def run_forward(span: BlockSpan, jobs: list[SpanJob]) -> list[torch.Tensor]:
    job = _merged(jobs)
    with torch.inference_mode(), loras_applied(span, adapter_lora(job.adapter), (job.lora, job.lora_scaling)):
        output = _run(span, job, job.inputs.hidden_states, job.deep_prompts)
    return list(output.split(_batch_sizes(jobs)))


def run_forward_keeping(cache: ActivationCache, span: BlockSpan, jobs: list[SpanJob]) -> list[tuple[torch.Tensor, bytes]]:
    """A lone job's forward pass with gradients on, its graph kept in `cache`: (output, the entry's name or b"")."""
    (job,) = jobs
    with torch.enable_grad(), SavedBytes(span) as saved:
        output, leaves = _graph(span, job)
    nbytes = saved.nbytes + output.nbytes + sum(leaf.nbytes for leaf in leaves)
    return [(output.detach(), cache.put(KeptActivations(job.digest, output, leaves, nbytes)))]


def run_backward(
    span: BlockSpan, items: list[tuple[SpanJob, torch.Tensor, KeptActivations | None]]
) -> list[pb.BackwardResponse]:
    """The gradients of everything each client sent, from its kept graph or from the forward pass recomputed."""
    jobs = [job for job, _, _ in items]
    job, grad_outputs, kept = _merged(jobs), torch.cat([grad for _, grad, _ in items]), items[0][2]
    with torch.enable_grad():
        output, leaves = (kept.output, kept.leaves) if kept is not None else _graph(span, job)
        grads = torch.autograd.grad(output, leaves, grad_outputs)
    if len(items) > 1:  # merged jobs carry nothing but hidden states
        return [
            pb.BackwardResponse(grad_hidden_states=tensors.encode(grad, job.codec))
            for grad, job in zip(grads[0].split(_batch_sizes(jobs)), jobs)
        ]
    grads = iter(grads)
    response = pb.BackwardResponse(grad_hidden_states=tensors.encode(next(grads), jobs[0].codec))
    if job.deep_prompts is not None:
        response.grad_deep_prompts.CopyFrom(tensors.encode(next(grads)))
    for name in job.lora:
        for kind in ("lora_A", "lora_B"):
            response.grad_lora.add(name=f"{name}.{kind}", tensor=tensors.encode(next(grads)))
    return [response]


def _graph(span: BlockSpan, job: SpanJob) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The job's output with gradients on (call with grad mode enabled), and the leaves: the hidden states, then the
    deep prompts (if sent), then the LoRA factors in request order."""
    hidden = job.inputs.hidden_states.clone().requires_grad_(True)
    prompts = None if job.deep_prompts is None else job.deep_prompts.clone().requires_grad_(True)
    lora = {name: tuple(t.clone().requires_grad_(True) for t in pair) for name, pair in job.lora.items()}
    leaves = [hidden] + ([prompts] if prompts is not None else []) + [t for pair in lora.values() for t in pair]
    with loras_applied(span, adapter_lora(job.adapter), (lora, job.lora_scaling)):
        return _run(span, job, hidden, prompts), leaves


def _batch_sizes(jobs: list[SpanJob]) -> list[int]:
    return [job.inputs.hidden_states.shape[0] for job in jobs]


def _merged(jobs: list[SpanJob]) -> SpanJob:
    """One job running the rows of all `jobs` (which share a `merge_group`, or are a single job)."""
    if len(jobs) == 1:
        return jobs[0]
    def rows(name: str) -> torch.Tensor:
        return torch.cat([getattr(job.inputs, name) for job in jobs])

    inputs = SpanInputs(rows("hidden_states"), rows("position_ids"), rows("attention_mask"))
    return SpanJob(inputs, jobs[0].blocks, adapter=jobs[0].adapter)


def _run(span: BlockSpan, job: SpanJob, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    device = next(span.parameters()).device
    to_device = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
    return span(
        hidden.to(device), job.inputs.position_ids.to(device), job.inputs.attention_mask.to(device),
        blocks=job.blocks, deep_prompts=to_device(prompts),
    )

