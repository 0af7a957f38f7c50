"""gRPC handlers of the data plane: decode and check requests, queue the compute, encode the answers."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import torch

from peer.adapters import HostedAdapter
from peer.memory_pool import CacheExhaustedError, CachePool
from peer.runtime import PREFILL_CHUNK, ComputeRuntime
from peer.sessions import InferenceSessionState, StepWork
from peer.training import (
    check_lora_scaling, check_trainable, decode_grad_outputs, decode_job, decode_lora, find_adapter, merge_group,
    run_backward, run_forward,
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
    ):
        self.span, self.dtype, self.model_prefix = span, dtype, model_prefix
        self.adapters = adapters or {}
        self.runtime, self.pool = runtime, pool
        self.max_message_bytes = max_message_bytes
        self.session_idle_timeout = session_idle_timeout
        self.on_cache_change = on_cache_change
        self.hidden_size = span.config.hidden_size
        self.open_sessions: dict[str, InferenceSessionState] = {}

    def switch_span(self, span: BlockSpan, runtime: ComputeRuntime, adapters: dict[str, HostedAdapter]) -> ComputeRuntime:
        """Serve another span of the same length from now on (load balancing); returns the old span's runtime.

        Sessions opened on the old span end at their next step with UNAVAILABLE, and their clients replay them
        elsewhere; the KV pool's pages are handed out as before.
        """
        old_runtime = self.runtime
        self.span, self.runtime, self.adapters = span, runtime, adapters
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
        output = await self.runtime.run(run_forward, job, merge_group(job))
        return pb.ForwardResponse(hidden_states=tensors.encode(output))

    async def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        try:
            job = decode_job(request.inputs, self.span, self.dtype, self.adapters)
            grad_outputs = decode_grad_outputs(request.grad_outputs, job)
        except InvalidRequest as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        return await self.runtime.run(run_backward, (job, grad_outputs), merge_group(job))

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

    async def Inference(self, request_iterator, context) -> AsyncIterator[pb.InferenceResponse]:
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
                self.open_sessions[session.session_id] = session
                self.on_cache_change()
                try:
                    yield pb.InferenceResponse(
                        opened=pb.SessionOpened(session_id=session.session_id, max_length=session.max_length)
                    )
                    async for response in self._serve_steps(session, requests, context):
                        yield response
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

    async def _serve_steps(self, session: InferenceSessionState, requests, context):
        while (request := await self._next_request(requests, context)) is not None:
            step = request.step
            try:
                if request.WhichOneof("kind") != "step":
                    raise InvalidRequest("a session is already open on this stream", "FAILED_PRECONDITION")
                if step.session_id != session.session_id:
                    raise InvalidRequest(f"unknown session {step.session_id!r} on this stream", "NOT_FOUND")
                work = self._decode_step(session, step)
            except InvalidRequest as error:
                yield pb.InferenceResponse(error=pb.StepError(step_id=step.step_id, code=error.code, message=str(error)))
                continue
            if session.span_start != self.span.start:
                await context.abort(
                    getattr(grpc.StatusCode, SPAN_MOVED_STATUS), f"this peer moved to blocks "
                    f"{self.span.start}:{self.span.end}; the session must continue on another peer",
                )
            session.last_step = self.runtime.submit_step(work, only_session=len(self.open_sessions) == 1)
            try:
                output = await asyncio.shield(session.last_step)
            except Exception as error:  # the cache may be half-written: end the session rather than serve wrong tokens
                logger.exception(f"session {session.session_id} failed")
                await context.abort(grpc.StatusCode.INTERNAL, f"step failed on the peer, session closed: {error!r}")
            yield pb.InferenceResponse(
                result=pb.StepResult(step_id=step.step_id, hidden_states=tensors.encode(output), position=session.position)
            )

    def _decode_step(self, session: InferenceSessionState, step: pb.InferenceStep) -> StepWork:
        start_position = step.start_position if step.has_start_position else None
        if start_position is not None and not 0 <= start_position <= session.position:
            raise InvalidRequest(f"start_position {start_position} is outside [0, {session.position}]")
        first_position = session.position if start_position is None else start_position
        inputs = decode_span_inputs(
            step.hidden_states, step.position_ids, step.attention_mask,
            self.hidden_size, self.dtype, session.batch_size, first_position,
        )
        new_tokens = inputs.hidden_states.shape[1]
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

    async def _next_request(self, requests, context) -> pb.InferenceRequest | None:
        """The next message of the stream, None when the client closed it; an idle session times out."""
        try:
            async with asyncio.timeout(self.session_idle_timeout):  # no extra task per message, unlike wait_for
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"session idle for {self.session_idle_timeout:.0f}s; closed"
            )
