"""An inference session: one gRPC stream per hop of a chain, each peer keeping the KV cache of its blocks."""

import logging
import queue
import random
import time
import uuid

import grpc
import torch

from client.swarm_view import RETRYABLE
from client.transport import WATCHDOG
from client.verification import (
    Conviction,
    HopTimeline,
    VerificationReport,
    WrongAnswerCaught,
    tensors_agree,
    token_errors,
    tolerance,
)
from swarm import tensors
from swarm.errors import MissingBlocksError, RemoteError, SwarmError
from swarm.routing import Hop
from swarm.tensors import DTYPES
from swarm.wire import swarm_peer_pb2 as pb

logger = logging.getLogger(__name__)

_CLOSE = None  # ends a stream's request iterator



class HopSession:
    """The session on one peer: sends steps on its stream and waits for each answer in turn."""

    def __init__(
        self, stub, hop: Hop, batch_size: int, max_length: int, alloc_timeout: float, step_timeout: float,
        lora=None, lora_scaling=1.0, adapter: str = "", deep_prompts: torch.Tensor | None = None, codec: str = "",
    ):
        self.hop = hop
        self.peer = hop.peer.peer_id
        self.dtype = DTYPES[hop.peer.record.dtype]
        self.session_id = uuid.uuid4().hex
        self.push_refused = False  # the peer said why it would not push on (logged once)
        self.sent_at = 0.0  # when we last sent this hop a step ourselves (perf_counter)
        self._step_timeout = step_timeout
        self._timed_out = False  # the watchdog cancelled this stream
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        opening = pb.OpenSession(
            session_id=self.session_id, start_block=hop.start, end_block=hop.end,
            batch_size=batch_size, max_length=max_length, alloc_timeout=alloc_timeout, adapter=adapter,
            compression=codec,
        )
        self.codec = codec
        add_lora(opening, hop, lora or {}, lora_scaling, self.dtype)
        if deep_prompts is not None:  # [hop blocks, prefix, hidden]
            opening.deep_prompts.CopyFrom(tensors.encode(deep_prompts.detach().to(self.dtype)))
        self._requests.put(pb.InferenceRequest(open=opening))
        self._call = stub.Inference(iter(self._requests.get, _CLOSE))
        response = self._receive(alloc_timeout + step_timeout)
        if response.WhichOneof("kind") != "opened":
            raise RemoteError(self.peer, "PROTOCOL", f"expected the session to open, got {response.WhichOneof('kind')}")

    def _receive(self, timeout: float) -> pb.InferenceResponse:
        WATCHDOG.arm(self._call, timeout)
        try:
            return next(self._call)
        except grpc.RpcError as error:
            self._timed_out |= WATCHDOG.disarm(self._call)
            if self._timed_out:  # we cancelled it: say why, not "Locally cancelled by application"
                raise RemoteError(self.peer, "DEADLINE_EXCEEDED", f"no answer within {timeout:.1f}s") from None
            raise RemoteError(self.peer, error.code().name, error.details() or "") from None
        except StopIteration:
            raise RemoteError(self.peer, "CLOSED", "the peer closed the session") from None
        finally:
            # Also when the answer came just as the deadline passed: the stream is cancelled, and the next step's
            # failure is the deadline's.
            self._timed_out |= WATCHDOG.disarm(self._call)

    @property
    def push_target(self) -> pb.PushTarget:
        """Where the peer before this one in the chain pushes its output."""
        return pb.PushTarget(peer_id=self.peer, session_id=self.session_id)

    def send(self, hidden_states: torch.Tensor, step_fields: pb.InferenceStep, push_to=()) -> None:
        """Sends the hidden states with `step_fields` (step id, positions, mask, reorder: the same for every hop);
        the peer pushes its output on along `push_to`, the sessions of the next hops."""
        step = pb.InferenceStep(
            session_id=self.session_id, hidden_states=tensors.encode(hidden_states.to(self.dtype), self.codec), push_to=push_to
        )
        step.MergeFrom(step_fields)
        self.sent_at = time.perf_counter()
        self._requests.put(pb.InferenceRequest(step=step))

    def receive(self, step_id: int) -> pb.StepResult:
        """The answer to step `step_id`, whether the step came from this client or by push."""
        response = self._receive(self._step_timeout)
        if response.WhichOneof("kind") == "error":
            raise RemoteError(self.peer, response.error.code, response.error.message)
        if response.result.step_id != step_id:
            raise RemoteError(self.peer, "PROTOCOL", f"answered step {response.result.step_id}, expected {step_id}")
        return response.result

    def step(self, hidden_states: torch.Tensor, step_fields: pb.InferenceStep) -> torch.Tensor:
        self.send(hidden_states, step_fields)
        return tensors.decode(self.receive(step_fields.step_id).hidden_states)

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._call.cancel()


def _record(timeline: HopTimeline, inputs: torch.Tensor, outputs: torch.Tensor, step_fields: pb.InferenceStep) -> None:
    timeline.record(
        inputs, outputs, tensors.decode(step_fields.position_ids), tensors.decode(step_fields.attention_mask),
        step_fields.start_position if step_fields.has_start_position else None,
        tensors.decode(step_fields.beam_reorder) if tensors.is_set(step_fields.beam_reorder) else None,
    )


def _cut_history(history: list[tuple[torch.Tensor, pb.InferenceStep]], tokens: int) -> list:
    """A hop's replay history without its tokens from `tokens` on (rolled back: rejected draft tokens), so that a
    replacement peer replays only what the cache holds. Every step in a cut history follows on from the one before
    (its start position, if any, is where that one ended), so tokens simply add up."""
    kept, count = [], 0
    for hidden_states, step_fields in history:
        length = hidden_states.shape[1]
        if count + length <= tokens:
            kept.append((hidden_states, step_fields))
            count += length
            continue
        if tokens > count:  # the step is cut in two: keep its first tokens, with their positions and mask
            part = tokens - count
            fields = pb.InferenceStep()
            fields.CopyFrom(step_fields)
            fields.position_ids.CopyFrom(tensors.encode(tensors.decode(step_fields.position_ids)[:, :part]))
            fields.attention_mask.CopyFrom(tensors.encode(tensors.decode(step_fields.attention_mask)[:, :part]))
            kept.append((hidden_states[:, :part], fields))
        break
    return kept


def add_lora(message, hop: Hop, lora: dict, scaling: float, dtype: torch.dtype) -> None:
    """Puts the LoRA factors of the hop's blocks into a ForwardRequest or OpenSession."""
    for name, (lora_a, lora_b) in lora.items():
        if hop.start <= int(name.split(".")[0]) < hop.end:
            for kind, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
                message.lora.add(name=f"{name}.{kind}", tensor=tensors.encode(tensor.detach().to(dtype)))
    if message.lora:
        message.lora_scaling = scaling


class InferenceSession:
    """Opened lazily on the first step (when the batch size is known); `position` counts tokens on the peers.

    `lora` (client-owned factors, "{block}.{module}" -> (A, B)) is sent once, when the session opens.
    """

    def __init__(
        self, remote, max_length: int, lora: dict | None = None, lora_scaling: float = 1.0,
        deep_prompts: torch.Tensor | None = None,
    ):
        self.remote, self.max_length = remote, max_length
        self.lora, self.lora_scaling = lora, lora_scaling
        self.deep_prompts = deep_prompts  # [remote blocks, prefix, hidden]: each hop gets its blocks' prompts
        self.position = 0
        self.pending_reorder: torch.Tensor | None = None
        self._hops: list[HopSession] | None = None
        # What each hop was sent, step by step: replayed to a replacement peer so it rebuilds the same KV cache.
        self._history: list[list[tuple[torch.Tensor, pb.InferenceStep]]] = []
        self._batch_size = 0
        self._steps = 0  # step ids: the same on every hop, so that a step that came by push and from us runs once
        self.closed = False
        self.pushed_steps = 0  # hop steps that reached their peer by push from the previous one (not from us)
        self.output_ids: torch.Tensor | None = None  # what `generate` made in this session so far (Petals' name)
        self.output_mask: torch.Tensor | None = None  # and its attention mask
        self._rollback_to: int | None = None  # a rollback asked for by an empty step, sent with the next tokens
        # For checking answers (client/verification.py): what each hop's cache holds and what its peer answered.
        self._timelines: list[HopTimeline] = []
        self.report = VerificationReport()  # what the checks found; `generate` gives each call its own
        # Replacements whose peers store their weights otherwise than the peers they replaced (none was left):
        # "blocks 0:4: nf4 -> none" each; the session's outputs changed there.
        self.quantization_changes: list[str] = []
        self._check_rng = random.Random()  # not torch's: checks must not change seeded sampling
        self._steps_until_check = self._check_interval()

    @property
    def route(self) -> list[Hop]:
        return [hop_session.hop for hop_session in self._hops or []]

    def _open_chain(self, start: int, end: int, quantization: str | None = None) -> list[HopSession]:
        """Opens sessions on a chain over [start, end) (through peers storing their weights as `quantization` says,
        default the config's), hop by hop: a peer that fails to open one is banned and the rest of the chain is
        routed again from there (up to max_retries times)."""
        config = self.remote.config
        opened: list[HopSession] = []
        failures, position = 0, start
        try:
            while position < end:
                hop = self.remote.view.chain(
                    position, end, cache_tokens=self._batch_size * self.max_length, quantization=quantization
                )[0]
                try:
                    opened.append(HopSession(
                        self.remote.connections.stub(hop.peer), hop, self._batch_size,
                        self.max_length, config.alloc_timeout, config.request_timeout, self.lora, self.lora_scaling,
                        config.active_adapter, self._hop_deep_prompts(hop), self.remote.codec,
                    ))
                except RemoteError as error:
                    if error.code not in RETRYABLE or failures == config.max_retries:
                        raise
                    self.remote.view.handle_failure(error, failures)
                    failures += 1
                    continue
                position = hop.end
        except BaseException:
            for hop_session in opened:
                hop_session.close()
            raise
        return opened

    def _hop_deep_prompts(self, hop: Hop) -> torch.Tensor | None:
        if self.deep_prompts is None:
            return None
        return self.deep_prompts[hop.start - self.remote.start_block : hop.end - self.remote.start_block]

    def _run_chain(self, hidden_states: torch.Tensor, step_fields: pb.InferenceStep) -> torch.Tensor:
        """Runs the step through every hop. Every hop answers the client, which keeps the outputs to replay on a
        replacement peer; a hop that was sent the step by the peer before it is only waited for."""
        index, sent = 0, False
        while index < len(self._hops):  # a replaced hop may become several: the list can grow while we walk it
            hidden_states, sent = self._run_hop(index, hidden_states, step_fields, sent)
            index += 1
            self.pushed_steps += sent and index < len(self._hops)
        return hidden_states

    def _send(self, index: int, hidden_states: torch.Tensor, step_fields: pb.InferenceStep) -> None:
        """Sends the step to hop `index`, with peer_to_peer the sessions of the following hops that its peer and
        theirs push the output on to (as far as they take the same dtype, which the pushed activations keep)."""
        hop_session = self._hops[index]
        push_to = []
        if self.remote.config.peer_to_peer and not hop_session.push_refused:
            for following in self._hops[index + 1 :]:
                if following.dtype != hop_session.dtype:
                    break
                push_to.append(following.push_target)
        hop_session.send(hidden_states, step_fields, push_to)

    def _run_hop(
        self, index: int, hidden_states: torch.Tensor, step_fields: pb.InferenceStep, sent: bool
    ) -> tuple[torch.Tensor, bool]:
        """Runs hop `index` (`sent`: the step is on its way to its peer already); if its peer fails, replaces it
        (replaying its history) and sends the step again. Returns the output and whether the hop pushed it on."""
        needs_replacement = False
        for attempt in range(self.remote.config.max_retries + 1):
            try:
                if needs_replacement:
                    self._replace(index)
                    needs_replacement = False
                if not sent:
                    self._send(index, hidden_states, step_fields)
                result = self._hops[index].receive(step_fields.step_id)
                if not sent and hidden_states.shape[1] == 1:  # a decode step of ours: how fast the peer really is
                    hop = self._hops[index].hop
                    self.remote.view.observe_step(hop.peer, hop.end - hop.start, time.perf_counter() - self._hops[index].sent_at)
                if sent and index > 0:
                    self._check_pushed_input(index, hidden_states, result)
                if result.push_error and not self._hops[index].push_refused:  # relayed by us from now on
                    logger.warning(f"peer {self._hops[index].peer} refused to push: {result.push_error}")
                    self._hops[index].push_refused = True
                self._history[index].append((hidden_states, step_fields))
                output = tensors.decode(result.hidden_states)
                _record(self._timelines[index], hidden_states, output, step_fields)
                return output, result.pushed
            except RemoteError as error:
                if error.code not in RETRYABLE or attempt == self.remote.config.max_retries:
                    raise
                self.remote.view.handle_failure(error, attempt)
                sent = False
                if not needs_replacement:
                    self._hops[index].close()
                    needs_replacement = True
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _check_pushed_input(self, index: int, expected: torch.Tensor, result: pb.StepResult) -> None:
        """A step that hop `index` got by push must have come with what the hop before it answered us: else one
        of the two lies (which, we cannot tell). The step is then sent again by us to a replacement of the hop
        (RETRYABLE), and the hop before it no longer pushes in this session."""
        hop_session = self._hops[index]
        if not self.remote.config.verify or expected.dtype != hop_session.dtype:  # a cast on the way: not comparable
            return
        if result.input_digest != tensors.digest(expected):
            self._hops[index - 1].push_refused = True
            raise RemoteError(
                hop_session.peer, "PROTOCOL", f"the input it says it was pushed differs from what peer "
                f"{self._hops[index - 1].peer} answered us",
            )

    def _replace(self, index: int) -> None:
        """Opens a new chain for hop `index`'s blocks and replays everything that hop was sent, step by step."""
        old = self._hops[index].hop
        history = self._history[index]
        try:  # the replayed cache must hold what the old peer's did: the same weights
            replacement = self._open_chain(old.start, old.end, old.peer.record.quantization)
        except MissingBlocksError:
            replacement = self._open_chain(old.start, old.end)
            change = f"blocks {old.start}:{old.end}: {old.peer.record.quantization} -> " + ", ".join(
                hop_session.hop.peer.record.quantization for hop_session in replacement
            )
            self.quantization_changes.append(change)
            logger.warning(f"no other peer stores these weights as the one that failed did; the session goes on with "
                           f"other weights ({change})")
        new_history: list[list] = [[] for _ in replacement]
        new_timelines = [HopTimeline() for _ in replacement]
        try:
            for hidden_states, step_fields in history:
                for position, hop_session in enumerate(replacement):
                    new_history[position].append((hidden_states, step_fields))
                    output = hop_session.step(hidden_states, step_fields)
                    _record(new_timelines[position], hidden_states, output, step_fields)
                    hidden_states = output
        except BaseException:
            for hop_session in replacement:
                hop_session.close()
            raise
        self._hops[index : index + 1] = replacement
        self._history[index : index + 1] = new_history
        self._timelines[index : index + 1] = new_timelines
        logger.info(f"blocks {old.start}:{old.end} moved to {[h.peer for h in replacement]}, {len(history)} steps replayed")

    def step(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start_position: int | None = None,
    ) -> torch.Tensor:
        """Runs new tokens' hidden states [batch, new, hidden] through every hop; returns the last hop's output.

        `attention_mask` covers only the new tokens (the peers keep the rest); `start_position` rolls the session
        back to that many tokens first.
        """
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, new_tokens = hidden_states.shape[:2]
        if start_position is not None and not 0 <= start_position <= self.position:
            raise SwarmError(f"start_position {start_position} is outside the session's 0..{self.position} tokens")
        if new_tokens == 0:  # nothing to compute (generate continuing with nothing new): no round trip, as in Petals
            if start_position is not None and start_position != self.position:
                self.rewind(start_position)
            return hidden_states
        if start_position is None:
            start_position = self._rollback_to
        self._rollback_to = None
        first = self.position if start_position is None else start_position
        if first + new_tokens > self.max_length:
            raise SwarmError(
                f"the session holds at most {self.max_length} tokens (max_length); this step would reach "
                f"{first + new_tokens}. Open a session with a larger max_length."
            )
        if self._hops is None:
            self._batch_size = batch
            self._hops = self._open_chain(self.remote.start_block, self.remote.end_block)
            self._history = [[] for _ in self._hops]
            self._timelines = [HopTimeline() for _ in self._hops]
        if position_ids is None:
            position_ids = torch.arange(first, first + new_tokens).expand(batch, new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones(batch, new_tokens, dtype=torch.bool)
        self._steps += 1
        step_fields = pb.InferenceStep(
            step_id=self._steps,
            position_ids=tensors.encode(position_ids.cpu().long()),
            attention_mask=tensors.encode(attention_mask.cpu().bool()),
        )
        reorder, self.pending_reorder = self.pending_reorder, None
        if reorder is not None:
            step_fields.beam_reorder.CopyFrom(tensors.encode(reorder))
        if start_position is not None:
            step_fields.start_position, step_fields.has_start_position = start_position, True
            self._history = [_cut_history(history, start_position) for history in self._history]
        output = self._run_chain(hidden_states, step_fields)
        self.position = first + new_tokens
        self._steps_until_check -= 1
        if self._steps_until_check <= 0 and self.remote.config.verify_every > 0:
            self.verify()
        return output.to(hidden_states.dtype)

    def rewind(self, position: int) -> None:
        """Roll the session back to its first `position` tokens (sent to the peers with the next step)."""
        if not 0 <= position <= self.position:
            raise SwarmError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        self._rollback_to, self.position = position, position

    def verify(self) -> VerificationReport:
        """Has other peers recompute every hop's answers that were not checked yet (one forward pass over the
        hop's whole cache each). Raises WrongAnswerCaught if a hop's peer is outvoted: it is then convicted and
        replaced, and the caller must compute again from `error.position` (`generate` does this by itself)."""
        self._steps_until_check = self._check_interval()
        if self.remote.config.verify:
            for index in range(len(self._hops or [])):
                self._check_hop(index)
        return self.report

    def _spared(self, peer_id: str) -> bool:
        """Whether this check of a peer's answers is skipped: a peer through its probation is spot-checked only."""
        config = self.remote.config
        return self.remote.view.is_trusted(peer_id) and self._check_rng.random() >= config.spot_check_rate

    def _check_interval(self) -> int:
        every = self.remote.config.verify_every
        return self._check_rng.randint(max(every // 2, 1), max(every * 3 // 2, 1)) if every > 0 else 1 << 62

    def _check_hop(self, index: int) -> None:
        timeline, hop = self._timelines[index], self._hops[index].hop
        if timeline.tokens == timeline.verified_tokens:
            return
        blocks = (hop.start, hop.end)
        if self._spared(hop.peer.peer_id):  # its tokens stay unverified: a later check of the session covers them
            if blocks not in self.report.spot_skipped:
                self.report.spot_skipped.append(blocks)
            return
        recorded = timeline.tensors()
        dtypes = {self._hops[index].dtype}
        prompts = self._hop_deep_prompts(hop)
        if prompts is not None:  # the session's prompts are the same for every row
            prompts = prompts.unsqueeze(1).expand(-1, recorded["inputs"].shape[0], -1, -1)

        def forward(reference) -> torch.Tensor:
            with torch.no_grad():
                return reference(recorded["inputs"], recorded["position_ids"], recorded["mask"], prompts, self.lora,
                                 self.lora_scaling)

        def agree(answer: torch.Tensor, reference: torch.Tensor) -> bool:
            return tensors_agree(answer, reference, tolerance(dtypes, self.remote.codec), recorded["mask"])

        trusted = self.remote.checker.settle(
            hop.peer.peer_id, recorded["outputs"], self.remote.opinions(hop, forward, dtypes), agree,
            (hop.start, hop.end), self.report,
        )
        if trusted is None:
            return
        if blocks in self.report.spot_skipped:  # skipped earlier in the call, covered now
            self.report.spot_skipped.remove(blocks)
        if trusted is recorded["outputs"]:
            timeline.verified_tokens = timeline.tokens
            return
        errors = token_errors(recorded["outputs"], trusted, recorded["mask"]).amax(dim=0)
        first_wrong = int((errors > tolerance(dtypes, self.remote.codec)).nonzero()[0])
        steps_got_away = len(timeline.steps) - timeline.step_of(first_wrong)
        self.report.caught.append(Conviction(hop.peer.peer_id, hop.start, hop.end, steps_got_away))
        self._hops[index].close()
        self._replace(index)
        raise WrongAnswerCaught(hop.peer.peer_id, hop.start, hop.end, first_wrong, steps_got_away)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Keep cache rows `beam_idx` (beam search); applied by the peers before the next step."""
        beam_idx = beam_idx.cpu().long()
        self.pending_reorder = beam_idx if self.pending_reorder is None else self.pending_reorder[beam_idx]

    def close(self) -> None:
        self.closed = True
        for hop_session in self._hops or []:
            hop_session.close()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
