"""Runs API requests on the swarm: each request is its own inference session (the peers batch sessions that step at
the same moment), generated in a worker thread of its own and handed to the event loop as it grows.

The loop here is `generate`'s greedy/sampling loop, kept apart from `model.generate` because that one keeps its
session and report on the model (one generation at a time) and draws from torch's global random state (requests
running together would change each other's samples): here every request has its own session, sampler and report.
"""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from client.api.sampling import Sampler, SamplingParams
from client.api.text import GrowingText
from client.inference_session import InferenceSession
from client.model import MAX_REGENERATIONS, RemotePastKeyValues
from client.verification import VerificationReport, WrongAnswerCaught
from swarm.errors import SwarmError
from swarm.routing import missing_blocks


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    n: int = 1  # choices, generated together as rows of one session
    stops: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Delta:
    """New text (and its tokens' logprobs) of one choice, as soon as it can no longer change."""

    index: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0


@dataclass
class GenerationResult:
    """Every choice once finished and checked: what `verification` says of the peers' answers."""

    choices: list[Choice]
    prompt_tokens: int
    route: list[dict]
    verification: VerificationReport
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


class StreamedWrongText(SwarmError):
    """A peer was caught answering wrong after text built on its answers had already been streamed, and the checked
    generation differs from it: what the client got cannot be taken back, so the stream ends with this error."""


class Generation:
    """One request's decode loop, run in a worker thread; `emit` hands each Delta to the event loop (None: the
    request is not streamed, only its checked result counts)."""

    def __init__(self, model, tokenizer, request: GenerationRequest, cancel: threading.Event, emit: Callable | None):
        self.model, self.tokenizer, self.request = model, tokenizer, request
        self.cancel, self.emit = cancel, emit
        self.sampler = Sampler(request.params, len(request.prompt_ids), model.config.vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos = set() if request.ignore_eos or eos is None else set(eos if isinstance(eos, list) else [eos])
        self.streamed = [("", 0)] * request.n  # per choice: text and tokens handed out, across regenerations

    def run(self) -> GenerationResult:
        started = time.perf_counter()
        max_length = len(self.request.prompt_ids) + self.request.max_tokens
        with torch.inference_mode(), self.model.remote.inference_session(max_length) as session:
            random_state = self.sampler.generator.get_state()
            for attempt in range(MAX_REGENERATIONS + 1):
                try:
                    choices = self._generate(session)
                    if not self.cancel.is_set():
                        session.verify()
                    break
                except WrongAnswerCaught:  # the liar is replaced: the same draws again, from the prompt
                    if attempt == MAX_REGENERATIONS:
                        raise
                    self.sampler.generator.set_state(random_state)
                    session.rewind(0)
            route = [_hop_description(hop) for hop in session.route]
        return GenerationResult(choices, len(self.request.prompt_ids), route, session.report, time.perf_counter() - started)

    def _generate(self, session: InferenceSession) -> list[Choice]:
        request = self.request
        ids = torch.tensor([request.prompt_ids] * request.n, dtype=torch.long)
        texts = [GrowingText(self.tokenizer, request.stops) for _ in range(request.n)]
        choices = [Choice() for _ in range(request.n)]
        logits = self._forward(session, ids, 0)
        for step in range(request.max_tokens):
            tokens = self.sampler.choose(ids, logits)
            logprobs = self._logprobs(logits, tokens)
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            for row, choice in enumerate(choices):
                if choice.finish_reason is not None:
                    continue
                token = int(tokens[row])
                choice.tokens += 1
                if logprobs:
                    choice.logprobs.append(logprobs[row])
                if token in self.eos:
                    choice.finish_reason = "stop"
                else:
                    texts[row].add(token)
                    if texts[row].stopped:
                        choice.finish_reason = "stop"
                    elif step + 1 == request.max_tokens:
                        choice.finish_reason = "length"
                choice.text = texts[row].text
                if self.emit is not None:
                    texts[row].release(final=choice.finish_reason is not None)
                    self._hand_out(row, texts[row].released, choice)
            if self.cancel.is_set() or all(choice.finish_reason for choice in choices):
                break
            logits = self._forward(session, tokens[:, None], ids.shape[1] - 1)
        return choices

    def _forward(self, session: InferenceSession, ids: torch.Tensor, first_position: int) -> torch.Tensor:
        """The next-token logits [rows, vocab] (float32, as `generate` takes them) after feeding `ids`."""
        positions = torch.arange(first_position, first_position + ids.shape[1]).expand(ids.shape[0], -1)
        output = self.model(input_ids=ids, position_ids=positions, past_key_values=RemotePastKeyValues(session),
                            logits_to_keep=1)
        return output.logits[:, -1].float()

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob]:
        """The model's own log-probabilities (before penalties and warpers), as OpenAI reports them."""
        if self.request.top_logprobs is None:
            return []
        logprobs = logits.log_softmax(dim=-1)
        top = logprobs.topk(self.request.top_logprobs, dim=-1) if self.request.top_logprobs else None
        decode = self.tokenizer.decode
        return [
            TokenLogprob(
                decode([int(token)]), float(logprobs[row, token]),
                [] if top is None else [(decode([int(i)]), float(v)) for v, i in zip(top.values[row], top.indices[row])],
            )
            for row, token in enumerate(tokens)
        ]

    def _hand_out(self, row: int, visible: str, choice: Choice) -> None:
        """Emits what a choice's text that can no longer change (`visible`) adds to what was streamed. After a
        regeneration the text comes again from its start: only what goes past the streamed text is new, and text
        that differs from it cannot be taken back."""
        streamed, tokens = self.streamed[row]
        if not (visible.startswith(streamed) or streamed.startswith(visible)):
            raise StreamedWrongText(
                f"a peer was caught answering wrong after {len(streamed)} characters built on its answers had been "
                "streamed, and the checked text differs: the peer is banned; ask again"
            )
        new_text, new_logprobs = visible[len(streamed) :], choice.logprobs[tokens:]
        if new_text or new_logprobs:
            self.streamed[row] = (streamed + new_text, tokens + len(new_logprobs))
            self.emit(Delta(row, new_text, new_logprobs))


def _hop_description(hop) -> dict:
    record = hop.peer.record
    return {"peer": record.public_name or hop.peer.peer_id[:12], "peer_id": hop.peer.peer_id,
            "blocks": [hop.start, hop.end]}


class Engine:
    """The client side of the model for the API: checks coverage, runs requests (at most `max_concurrent` at once,
    the rest wait their turn) and streams their deltas."""

    def __init__(self, model, tokenizer, max_concurrent: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running = self.waiting = 0  # requests generating, and waiting for a slot (reported by /health)

    def missing_blocks(self, refresh: bool = False) -> list[int]:
        view = self.model.remote.view
        return missing_blocks(view.peer_spans(refresh=refresh), 0, self.model.config.num_hidden_layers)

    def online_peers(self) -> int:
        return len(self.model.remote.view.peer_spans())

    async def run(self, request: GenerationRequest, stream: bool) -> AsyncIterator[Delta | GenerationResult]:
        """Deltas as the choices grow (if `stream`), then the checked result. Leaving the iteration early (a client that went
        away) stops the generation at its next token and closes its session, which frees the peers' cache."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                emit(Generation(self.model, self.tokenizer, request, cancel, emit if stream else None).run())
            except BaseException as error:  # handed to the request's handler, which answers with it
                emit(error)

        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        threading.Thread(target=work, name="api-generation", daemon=True).start()
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            cancel.set()
            self.running -= 1
            self._slots.release()
