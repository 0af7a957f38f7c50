"""gRPC handlers of the data plane: decode and check requests, queue the compute, encode the answers."""

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import torch

from peer.activation_cache import ActivationCache, request_digest
from peer.adapters import HostedAdapter
from peer.directory import PeerDirectory, PushRefused
from peer.memory_pool import CacheExhaustedError, CachePool
from peer.push import PushSender
from peer.runtime import PREFILL_CHUNK, ComputeRuntime
from peer.sessions import InferenceSessionState, StepWork
from peer.training import (
    check_compression,
    check_lora_scaling,
    check_trainable,
    decode_grad_outputs,
    decode_job,
    decode_lora,
    find_adapter,
    merge_group,
    run_backward,
    run_forward,
    run_forward_keeping,
)
from peer.validation import InvalidRequest, check_block_range, decode_span_inputs, decode_tensor
from swarm import tensors
from swarm.blocks import BlockSpan
from swarm.chunks import MAX_CHUNKED_MESSAGES, ChunkAssembler, ChunkedMessageError, to_chunks
from swarm.constants import PROTOCOL_VERSION, SPAN_MOVED_STATUS
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MAX_ALLOC_TIMEOUT = 600.0
# Pushed steps waiting to run, over all sessions: a chain pushes at most one per session at a time, so more than
# this is a peer flooding us, and its surplus is dropped rather than queued without bound.
MAX_PENDING_PUSHES = 4096


class SwarmPeerServicer(pb_grpc.SwarmPeerServicer):
    def __init__(
        self,
        span: BlockSpan,
        dtype: torch.dtype,
        model_prefix: str,
        runtime: ComputeRuntime,
        pool: CachePool,
        max_message_bytes: int,
        session_idle_timeout: float,
        on_cache_change: Callable[[], None] = lambda: None,
        adapters: dict[str, HostedAdapter] | None = None,
        directory: PeerDirectory | None = None,
        activations: ActivationCache | None = None,
    ):
        self.span, self.dtype, self.model_prefix = span, dtype, model_prefix
        self.directory = directory or PeerDirectory(list)
        self.adapters = adapters or {}
        self.runtime, self.pool = runtime, pool
        self.activations = activations or ActivationCache()
        self._forward_keeping = functools.partial(run_forward_keeping, self.activations)
        self.max_message_bytes = max_message_bytes
        self.session_idle_timeout = session_idle_timeout
        self.on_cache_change = on_cache_change
        self.hidden_size = span.config.hidden_size
        self.open_sessions: dict[str, InferenceSessionState] = {}
        self.pusher = PushSender(max_message_bytes)
        self._pushed_steps: set[asyncio.Task] = set()

    def switch_span(self, span: BlockSpan, runtime: ComputeRuntime, adapters: dict[str, HostedAdapter]) -> ComputeRuntime:
        """Serve another span of the same length from now on (load balancing); returns the old span's runtime.

        Sessions opened on the old span end at their next step with UNAVAILABLE, and their clients replay them
        elsewhere; the KV pool's pages are handed out as before.
        """
        old_runtime = self.runtime
        self.span, self.runtime, self.adapters = span, runtime, adapters
        self.activations.clear()  # graphs of the old span's blocks
        return old_runtime

    @property
    def cache_tokens_left(self) -> int:
        """Free pages of the KV pool, in tokens (what the peer announces)."""
        return self.pool.free_tokens

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            protocol_version=PROTOCOL_VERSION,
            model_prefix=self.model_prefix,
            start_block=self.span.start,
            end_block=self.span.end,
            dtype=tensors.DTYPE_NAMES[self.dtype],
            quantization=self.span.quantization,
            cache_tokens_left=self.cache_tokens_left,
            hidden_size=self.hidden_size,
            max_message_bytes=self.max_message_bytes,
            largest_batch=self.runtime.largest_pass,
            adapters=sorted(self.adapters),
        )

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        try:
            job = decode_job(request, self.span, self.dtype, self.adapters)
        except InvalidRequest as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        if not job.keep:
            output = await self.runtime.run(run_forward, job, merge_group(job))
            return pb.ForwardResponse(hidden_states=tensors.encode(output, job.codec))
        job.digest = request_digest(request)
        output, name = await self.runtime.run(self._forward_keeping, job)
        return pb.ForwardResponse(hidden_states=tensors.encode(output, job.codec), activations=name)

    async def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        try:
            job = decode_job(request.inputs, self.span, self.dtype, self.adapters)
            grad_outputs = decode_grad_outputs(request.grad_outputs, job)
        except InvalidRequest as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        job.keep = False  # the Forward's flag, sent back with its inputs: a Backward keeps nothing
        kept = self.activations.take(request.activations, request_digest(request.inputs)) if request.activations else None
        return await self.runtime.run(run_backward, (job, grad_outputs, kept), merge_group(job) if kept is None else None)

    async def ForwardChunked(self, request_iterator, context) -> AsyncIterator[pb.Chunk]:
        request = await self._assemble(request_iterator, pb.ForwardRequest, context)
        for chunk in to_chunks(await self.Forward(request, context), self.max_message_bytes // 2):
            yield chunk

    async def BackwardChunked(self, request_iterator, context) -> AsyncIterator[pb.Chunk]:
        request = await self._assemble(request_iterator, pb.BackwardRequest, context)
        for chunk in to_chunks(await self.Backward(request, context), self.max_message_bytes // 2):
            yield chunk

    async def _assemble(self, chunks, message_type, context):
        """The request a chunk stream carries, at most MAX_CHUNKED_MESSAGES message limits in all."""
        assembler = ChunkAssembler(MAX_CHUNKED_MESSAGES * self.max_message_bytes)
        try:
            async for chunk in chunks:
                assembler.add(chunk)
            return assembler.message(message_type)
        except ChunkedMessageError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def Inference(self, request_iterator, context) -> None:
        requests = aiter(request_iterator)
        first = await self._next_request(requests, context)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message of a stream must open a session")
        opening = first.open
        try:
            check_block_range(opening.start_block, opening.end_block, self.span.start, self.span.end)
            if not 0 < opening.batch_size <= 4096 or not 0 < opening.max_length <= 2**20:
                raise InvalidRequest(f"batch_size {opening.batch_size} or max_length {opening.max_length} out of range")
            if not opening.session_id or opening.session_id in self.open_sessions:
                raise InvalidRequest(f"session id {opening.session_id!r} is empty or already open", "ALREADY_EXISTS")
            lora = decode_lora(opening.lora, self.span, opening.start_block, opening.end_block, self.dtype)
            lora_scaling = check_lora_scaling(opening.lora_scaling) if lora else 1.0
            adapter = find_adapter(self.adapters, opening.adapter)
            deep_prompts = self._decode_session_prompts(opening)
            codec = check_compression(opening.compression)
        except InvalidRequest as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        num_pages = self.pool.pages_for(opening.max_length) * opening.batch_size
        timeout = min(max(opening.alloc_timeout, 0.0), MAX_ALLOC_TIMEOUT)
        try:
            async with self.pool.reserve(num_pages, timeout) as pages:
                session = InferenceSessionState(
                    opening.session_id, self.span.start, opening.start_block, opening.end_block,
                    opening.batch_size, opening.max_length, pages, lora, lora_scaling, adapter, deep_prompts,
                )
                session.answers = context
                session.codec = codec
                self.open_sessions[session.session_id] = session
                self.on_cache_change()
                try:
                    await context.write(pb.InferenceResponse(
                        opened=pb.SessionOpened(session_id=session.session_id, max_length=session.max_length)
                    ))
                    while (request := await self._next_request(requests, context, session)) is not None:
                        if request.WhichOneof("kind") != "step":
                            await context.write(_step_error(request.step, "a session is already open on this stream"))
                        elif request.step.session_id != session.session_id:
                            await context.write(_step_error(
                                request.step, f"unknown session {request.step.session_id!r} on this stream", "NOT_FOUND"
                            ))
                        else:
                            await self._serve_step(session, request.step)
                finally:
                    del self.open_sessions[session.session_id]
                    session.closed = True
                    if session.last_step is not None:  # its pages must not be reused while a pass may write them
                        await asyncio.wait([session.last_step])
                        if not session.last_step.cancelled():
                            session.last_step.exception()  # a dropped step's error is expected: mark it as seen
            self.on_cache_change()
        except CacheExhaustedError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    def _decode_session_prompts(self, opening: pb.OpenSession) -> torch.Tensor | None:
        if not tensors.is_set(opening.deep_prompts):
            return None
        prompts = decode_tensor(opening.deep_prompts, "deep_prompts")
        blocks, longest = opening.end_block - opening.start_block, min(opening.max_length, PREFILL_CHUNK)
        shape = list(prompts.shape)
        if len(shape) != 3 or shape[0] != blocks or shape[2] != self.hidden_size or not 0 < shape[1] <= longest:
            raise InvalidRequest(f"deep_prompts must be [{blocks}, prefix <= {longest}, {self.hidden_size}], got {shape}")
        check_trainable(prompts, self.dtype, "deep_prompts")
        return prompts

    async def Push(self, request_iterator, context) -> pb.PushSummary:
        """Steps the peer before us in a chain pushes: each runs as its session's next step, concurrently (so that
        pushed steps of many sessions batch), and is answered on that session's own stream."""
        async for step in request_iterator:
            session = self.open_sessions.get(step.session_id)
            if session is None:  # closed meanwhile, or never here: its client hears from its own stream
                logger.debug(f"pushed step for unknown session {step.session_id!r} ignored")
                continue
            if len(self._pushed_steps) >= MAX_PENDING_PUSHES:
                logger.warning(f"{MAX_PENDING_PUSHES} pushed steps already wait; one for {step.session_id!r} dropped")
                continue
            if session.idle_deadline is not None and not session.idle_deadline.expired():
                session.idle_deadline.reschedule(asyncio.get_running_loop().time() + self.session_idle_timeout)
            task = asyncio.create_task(self._serve_pushed_step(session, step))
            self._pushed_steps.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._pushed_steps.discard)
        return pb.PushSummary()

    async def _serve_pushed_step(self, session: InferenceSessionState, step: pb.InferenceStep) -> None:
        try:
            await self._serve_step(session, step, pushed=True)
        except grpc.aio.AbortError:
            pass  # the session's stream ended with the status the abort set
        except Exception as error:  # the session's stream closed under us: its client hears from it
            logger.warning(f"pushed step of session {session.session_id} dropped: {error!r}")

    async def _serve_step(self, session: InferenceSessionState, step: pb.InferenceStep, pushed: bool = False) -> None:
        """Runs one step of the session, passes its output on to the next peer when asked, and answers the client
        on the session's stream (for a step that came by push, with a digest of its input: the client checks it
        against what the peer before us answered). A bad step gets a StepError and changes nothing."""
        context = session.answers
        async with session.turn:
            if session.closed or step.step_id == session.last_step_id > 0:
                return  # a step that came both by push and from the client runs once: its answer is out already
            try:
                if step.step_id <= session.last_step_id:
                    raise InvalidRequest(f"step_id {step.step_id} does not follow step {session.last_step_id}; ids must increase")
                work = self._decode_step(session, step)
            except InvalidRequest as error:
                await context.write(_step_error(step, str(error), error.code))
                return
            if work.hidden_states.shape[1] == 0:  # nothing new (Petals answers the same): nothing to compute
                session.last_step_id = step.step_id
                await context.write(pb.InferenceResponse(result=pb.StepResult(
                    step_id=step.step_id, hidden_states=tensors.encode(work.hidden_states), position=session.position,
                )))
                return
            if session.span_start != self.span.start:
                await context.abort(
                    getattr(grpc.StatusCode, SPAN_MOVED_STATUS), f"this peer moved to blocks "
                    f"{self.span.start}:{self.span.end}; the session must continue on another peer",
                )
            input_digest = tensors.digest(work.hidden_states) if pushed else b""
            session.last_step = self.runtime.submit_step(work, only_session=len(self.open_sessions) == 1)
            try:
                output = await asyncio.shield(session.last_step)
            except Exception as error:  # the cache may be half-written: end the session rather than serve wrong tokens
                logger.exception(f"session {session.session_id} failed")
                await context.abort(grpc.StatusCode.INTERNAL, f"step failed on the peer, session closed: {error!r}")
            session.last_step_id = step.step_id
            encoded = tensors.encode(output, session.codec)
            # The push goes first: the next peer's compute is what the client waits for, not this answer. The next
            # peer takes this peer's dtype (the client pushes no further), which a block may have left.
            passed_on = encoded if output.dtype == self.dtype else tensors.encode(output.to(self.dtype), session.codec)
            pushed_on, push_error = await self._push_on(session, step, passed_on) if step.push_to else (False, "")
            await context.write(pb.InferenceResponse(result=pb.StepResult(
                step_id=step.step_id, hidden_states=encoded, position=session.position, pushed=pushed_on,
                push_error=push_error, input_digest=input_digest,
            )))

    async def _push_on(self, session: InferenceSessionState, step: pb.InferenceStep, output: pb.Tensor) -> tuple[bool, str]:
        """Pushes the step's output to the first of its push targets, if the swarm announces that peer for the
        block after the session's; (pushed, why it was refused)."""
        target = step.push_to[0]
        try:
            next_peer = await self.directory.next_hop(target.peer_id, session.end_block)
        except PushRefused as error:
            logger.warning(f"session {session.session_id}: {error}; nothing dialled")
            return False, str(error)
        return await self.pusher.push(next_peer.endpoint, _next_hop_step(step, output)), ""

    def _decode_step(self, session: InferenceSessionState, step: pb.InferenceStep) -> StepWork:
        start_position = step.start_position if step.has_start_position else None
        if start_position is not None and not 0 <= start_position <= session.position:
            raise InvalidRequest(f"start_position {start_position} is outside [0, {session.position}]")
        first_position = session.position if start_position is None else start_position
        inputs = decode_span_inputs(
            step.hidden_states, step.position_ids, step.attention_mask,
            self.hidden_size, self.dtype, session.batch_size, first_position, allow_no_tokens=True,
        )
        new_tokens = inputs.hidden_states.shape[1]
        if new_tokens == 0 and (start_position is not None or tensors.is_set(step.beam_reorder)):
            raise InvalidRequest("a step with no tokens cannot roll back or reorder the cache; send that with the next tokens")
        if first_position + new_tokens > session.max_length:
            raise InvalidRequest(
                f"this step would take the session to {first_position + new_tokens} tokens, past its max_length "
                f"{session.max_length}", "OUT_OF_RANGE",
            )
        beam_reorder = None
        if tensors.is_set(step.beam_reorder):
            beam_reorder = decode_tensor(step.beam_reorder, "beam_reorder")
            if beam_reorder.dtype != torch.int64 or list(beam_reorder.shape) != [session.batch_size]:
                raise InvalidRequest(f"beam_reorder must be int64 [{session.batch_size}]")
            if beam_reorder.min() < 0 or beam_reorder.max() >= session.batch_size:
                raise InvalidRequest(f"beam_reorder indices must be in [0, {session.batch_size})")
        return StepWork(
            session, inputs.hidden_states, inputs.position_ids, inputs.attention_mask, beam_reorder, start_position
        )

    async def _next_request(
        self, requests, context, session: InferenceSessionState | None = None
    ) -> pb.InferenceRequest | None:
        """The next message of the stream, None when the client closed it; an idle session times out (a pushed
        step pushes the session's deadline back)."""
        try:
            async with asyncio.timeout(self.session_idle_timeout) as deadline:  # no extra task, unlike wait_for
                if session is not None:
                    session.idle_deadline = deadline
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"session idle for {self.session_idle_timeout:.0f}s; closed"
            )
        finally:
            if session is not None:
                session.idle_deadline = None


def _step_error(step: pb.InferenceStep, message: str, code: str = "FAILED_PRECONDITION") -> pb.InferenceResponse:
    return pb.InferenceResponse(error=pb.StepError(step_id=step.step_id, code=code, message=message))


def _next_hop_step(step: pb.InferenceStep, output: pb.Tensor) -> pb.InferenceStep:
    """The step as the next peer of the chain gets it: this peer's output, the same positions, mask, reorder and
    rollback (they are the same for every hop), and the rest of the chain to push to."""
    target = step.push_to[0]
    return pb.InferenceStep(
        session_id=target.session_id, step_id=step.step_id, hidden_states=output, position_ids=step.position_ids,
        attention_mask=step.attention_mask, beam_reorder=step.beam_reorder, start_position=step.start_position,
        has_start_position=step.has_start_position, push_to=step.push_to[1:],
    )
