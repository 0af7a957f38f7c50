"""Aggregate decode rate of many sessions on one peer that serves every block, against one local batch.

Each session is a client of its own (a thread here): it feeds its last token's embedding, gets the hidden state
back, applies the final norm and the head, and picks the next token greedily, as a user's machine would. The
local counterpart decodes the same sequences as one batch with transformers' KV cache.
"""

import statistics
import threading
import time

import torch
from transformers import DynamicCache

from bench.results import Result
from client import AutoDistributedModelForCausalLM


def local_batch_decode(local, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds local transformers takes to decode `new_tokens` tokens for all rows of `prompts` at once."""
    with torch.inference_mode():
        cache = DynamicCache(config=local.config)
        tokens = local(prompts, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(new_tokens):
            tokens = local(tokens, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - started


def swarm_concurrent_decode(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds until every session (one per row of `prompts`, each in its own thread) decoded `new_tokens`."""
    sessions = [model.remote.inference_session(max_length=prompts.shape[1] + new_tokens + 1) for _ in prompts]
    embed, family = model.get_input_embeddings(), model.family

    def next_token(hidden: torch.Tensor) -> torch.Tensor:
        return family.logits(model, family.final_norm(model, hidden[:, -1:])).argmax(-1)

    with torch.inference_mode():
        tokens = [next_token(session.step(embed(prompt[None]))) for session, prompt in zip(sessions, prompts)]
    start = threading.Barrier(len(sessions) + 1)

    def decode(index: int) -> None:
        token = tokens[index]
        start.wait(timeout=60)
        with torch.inference_mode():
            for _ in range(new_tokens):
                token = next_token(sessions[index].step(embed(token)))

    threads = [threading.Thread(target=decode, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    start.wait(timeout=60)
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    return elapsed


def concurrent_decode(args, folder: str, local, bootstrap: str) -> list[Result]:
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
    results = []
    try:
        for count in args.sessions:
            prompts = torch.randint(3, local.config.vocab_size, (count, 16))
            local_seconds, swarm_seconds = [], []
            for _ in range(args.repeats):
                local_seconds.append(local_batch_decode(local, prompts, args.concurrent_tokens))
                swarm_seconds.append(swarm_concurrent_decode(model, prompts, args.concurrent_tokens))
            tokens = count * args.concurrent_tokens
            results.append(Result(
                f"decode, {count} concurrent sessions", "tokens/s",
                tokens / statistics.median(swarm_seconds), tokens / statistics.median(local_seconds),
                detail=f"1 peer x all blocks vs local batch {count}",
            ))
    finally:
        model.close()
    return results
