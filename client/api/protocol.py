"""OpenAI's wire shapes: the requests the server accepts (validated; a field it does not know is an error, not
silently ignored) and the responses and stream chunks it writes."""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from client.api.engine import Delta, GenerationResult, TokenLogprob

MAX_STOPS = 4
MAX_CHOICES = 16


class APIError(Exception):
    """Answered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share; top_k, repetition_penalty and ignore_eos come through `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)  # a string, strings or null in the request
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        if bias and not all(-100 <= value <= 100 for value in bias.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        return bias

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: None = None  # insertion is not served


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def swarm_extras(result: GenerationResult) -> dict:
    """What the swarm adds to a response (clients ignore fields they do not know): route, speed, checks."""
    report = result.verification
    return {
        "route": result.route,
        "seconds": round(result.seconds, 4),
        "tokens_per_second": round(result.completion_tokens / result.seconds, 2) if result.seconds else None,
        "verification": {
            "checked": report.checked, "checks": report.checks,
            "unchecked_blocks": [list(span) for span in report.unchecked_blocks],
            "spot_skipped": [list(span) for span in report.spot_skipped],
            "caught": [{"peer_id": caught.peer, "blocks": [caught.start, caught.end],
                        "steps_got_away": caught.steps_got_away} for caught in report.caught],
        },
    }


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions' logprobs object; `offset`: where the first token's text starts."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*top) for top in t.top]} for t in tokens]}


class Responder:
    """Writes one request's answer in its endpoint's shape: whole, or as stream chunks."""

    def __init__(self, chat: bool, model: str, logprobs: bool, index_offset: int = 0, echo: str = ""):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.index_offset, self.echo = index_offset, echo

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, index: int, text: str, tokens: list[TokenLogprob], finish_reason, delta: bool) -> dict:
        choice = {"index": index + self.index_offset, "finish_reason": finish_reason}
        if self.chat:
            if delta:
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = chat_logprobs(tokens) if self.logprobs else None
        else:
            choice["text"] = text
            choice["logprobs"] = completion_logprobs(tokens, len(self.echo)) if self.logprobs else None
        return choice

    def whole(self, result: GenerationResult) -> tuple[list[dict], dict]:
        return [
            self._choice(index, self.echo + choice.text, choice.logprobs, choice.finish_reason, delta=False)
            for index, choice in enumerate(result.choices)
        ], usage(result.prompt_tokens, result.completion_tokens)

    def response(self, choices: list[dict], usage_fields: dict, extras: dict) -> dict:
        return {**self._envelope(self.object, choices), "usage": usage_fields, "swarm": extras}

    def opening_chunks(self, n: int) -> list[dict]:
        """Chat streams open with the role; completions with echo open with the prompt."""
        if self.chat:
            return [self._envelope(self.chunk_object, [
                {"index": i + self.index_offset, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]) for i in range(n)]
        if self.echo:
            return [self._envelope(self.chunk_object, [self._choice(i, self.echo, [], None, True)]) for i in range(n)]
        return []

    def delta_chunk(self, delta: Delta) -> dict:
        return self._envelope(self.chunk_object, [self._choice(delta.index, delta.text, delta.logprobs, None, True)])

    def finish_chunks(self, result: GenerationResult) -> list[dict]:
        return [self._envelope(self.chunk_object, [self._choice(index, "", [], choice.finish_reason, True)])
                for index, choice in enumerate(result.choices)]

    def usage_chunk(self, usage_fields: dict, extras: dict) -> dict:
        return {**self._envelope(self.chunk_object, []), "usage": usage_fields, "swarm": extras}
