"""The FastAPI application: OpenAI's /v1 routes, /health, and the chat page at /."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from client.api.engine import Delta, Engine, GenerationRequest, GenerationResult
from client.api.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Responder,
    SamplingFields,
    swarm_extras,
    usage,
)
from client.api.sampling import SamplingParams
from swarm.errors import MissingBlocksError, SwarmError

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def create_app(engine: Engine, model_name: str, default_chat_tokens: int) -> FastAPI:
    """`default_chat_tokens`: a chat request's max_tokens when it gives none (capped by the context left). Each
    session reserves cache on the peers for its whole length, so "up to the context" would let a few requests
    take a peer's whole pool."""
    app = FastAPI(title="Swarm", summary="OpenAI-compatible API over a swarm of peers", docs_url=None, redoc_url=None)
    chat_page = files("client.api").joinpath("chat.html").read_text()

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, error: RequestValidationError):
        problem = error.errors()[0]
        param = ".".join(str(part) for part in problem.get("loc", ())[1:]) or None
        message = f"{param}: {problem['msg']}" if param else problem["msg"]
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "swarm",
                "max_model_len": engine.context_length}

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> str:
        return chat_page

    @app.get("/health")
    async def health():
        missing = await asyncio.to_thread(engine.missing_blocks, True)
        body = {"status": "ok" if not missing else "missing_blocks", "model": model_name,
                "num_blocks": engine.model.config.num_hidden_layers, "missing_blocks": missing,
                "peers": engine.online_peers(), "requests": {"running": engine.running, "waiting": engine.waiting}}
        return JSONResponse(body, status_code=200 if not missing else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    def check_model(model_id: str) -> None:
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _prompts(engine, body.prompt)
        if body.logprobs is not None and body.echo:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        requests = [generation_request(engine, body, ids, body.max_tokens or DEFAULT_COMPLETION_TOKENS,
                                       body.logprobs) for ids in prompts]
        responders = [
            Responder(False, model_name, body.logprobs is not None, index * body.n,
                      engine.tokenizer.decode(ids) if body.echo else "")
            for index, ids in enumerate(prompts)
        ]
        return await answer(body, requests, responders, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        ids = _chat_prompt(engine.tokenizer, body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        limit = body.max_completion_tokens or body.max_tokens or min(default_chat_tokens, engine.context_length - len(ids))
        generation = generation_request(engine, body, ids, limit, top)
        return await answer(body, [generation], [Responder(True, model_name, body.logprobs)], request)

    async def answer(body: SamplingFields, requests: list[GenerationRequest], responders: list[Responder],
                     request: Request):
        if missing := engine.missing_blocks():
            raise APIError(503, str(MissingBlocksError(model_name, missing)), kind="service_unavailable",
                           code="missing_blocks")
        runs = [engine.run(generation, body.stream) for generation in requests]
        if body.stream:
            return await stream(body, requests, runs, responders, request)
        results = await until_disconnected(request, asyncio.gather(*(last(run) for run in runs)))
        choices, extras = [], []
        prompt_tokens = completion_tokens = 0
        for responder, result in zip(responders, results):
            whole, counts = responder.whole(result)
            choices += whole
            prompt_tokens += counts["prompt_tokens"]
            completion_tokens += counts["completion_tokens"]
            extras.append(swarm_extras(result))
        return responders[0].response(choices, usage(prompt_tokens, completion_tokens),
                                      extras[0] if len(extras) == 1 else {"prompts": extras})

    async def stream(body: SamplingFields, requests: list[GenerationRequest], runs: list[AsyncIterator],
                     responders: list[Responder], request: Request):
        events = merged(runs)
        # The first delta comes after a free slot and the prefill: a swarm that fails before it gets a status code,
        # and a client that leaves meanwhile gives its place up at once.
        try:
            first = await until_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise

        async def chunks() -> AsyncIterator[str]:
            prompt_tokens = completion_tokens = 0
            last_result = None
            try:
                for responder, generation in zip(responders, requests):
                    for chunk in responder.opening_chunks(generation.n):
                        yield sse(chunk)
                event = first
                while True:
                    index, item = event
                    responder = responders[index]
                    if isinstance(item, Delta):
                        yield sse(responder.delta_chunk(item))
                    else:
                        for chunk in responder.finish_chunks(item):
                            yield sse(chunk)
                        prompt_tokens += item.prompt_tokens
                        completion_tokens += item.completion_tokens
                        last_result = item
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        break
                if body.include_usage:
                    yield sse(responders[0].usage_chunk(usage(prompt_tokens, completion_tokens),
                                                        swarm_extras(last_result)))
            except Exception as error:  # after the status line: the error goes in the stream, as OpenAI does
                yield sse(as_api_error(error).body())
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def generation_request(engine: Engine, body: SamplingFields, ids: list[int], max_tokens: int,
                       top_logprobs: int | None) -> GenerationRequest:
    if len(ids) + max_tokens > engine.context_length:
        raise APIError(
            400, f"this model's maximum context length is {engine.context_length} tokens; you requested "
            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)", param="max_tokens",
            code="context_length_exceeded",
        )
    vocab = engine.model.config.vocab_size
    if body.logit_bias and not all(0 <= token < vocab for token in body.logit_bias):
        raise APIError(400, f"logit_bias names a token outside the vocabulary (0..{vocab - 1})", param="logit_bias")
    params = SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias or {}, seed=body.seed,
    )
    return GenerationRequest(ids, max_tokens, params, body.n, tuple(body.stop), top_logprobs, body.ignore_eos)


def _prompts(engine: Engine, prompt) -> list[list[int]]:
    """A completion's prompt(s) as token ids: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    vocab = engine.model.config.vocab_size
    prompts = [engine.tokenizer(text)["input_ids"] if isinstance(text, str) else text for text in prompt]
    for ids in prompts:
        if not ids:
            raise APIError(400, "a prompt has no tokens", param="prompt")
        if not all(0 <= token < vocab for token in ids):
            raise APIError(400, f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
    return prompts


def _chat_prompt(tokenizer, body: ChatRequest) -> list[int]:
    if tokenizer.chat_template is None:
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions, or start the server "
                       "with --chat-template FILE", param="messages")
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, MissingBlocksError):
        return APIError(503, str(error), kind="service_unavailable", code="missing_blocks")
    if isinstance(error, SwarmError):
        return APIError(503, str(error), kind="service_unavailable")
    logger.error("a request failed", exc_info=error)  # our bug, not the caller's: the operator needs the traceback
    return APIError(500, f"internal error: {error!r}", kind="server_error")


async def last(run: AsyncIterator):
    result = None
    async for result in run:
        pass
    return result


async def until_disconnected(request: Request, work):
    """Awaits `work`, cancelled (its sessions closed) if the client goes away first."""
    work = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        raise APIError(499, "the client went away")
    try:
        return work.result()
    except Exception as error:
        raise as_api_error(error) from None


async def merged(runs: list[AsyncIterator]) -> AsyncIterator[tuple[int, Delta | GenerationResult]]:
    """The events of several runs as they come, each tagged with its run's index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, run: AsyncIterator) -> None:
        try:
            async for event in run:
                await queue.put((index, event))
            await queue.put((index, done))
        except Exception as error:  # the consumer raises it
            await queue.put((index, error))

    tasks = [asyncio.ensure_future(pump(index, run)) for index, run in enumerate(runs)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event is done:
                running -= 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
