"""Aggregate decode rate of many sessions on one peer that serves every block, against one local batch.

The local counterpart decodes the sequences greedily as one batch with transformers' KV cache. Each swarm session
is a client of its own (a thread here) that feeds the same tokens one at a time through the peer. On a real swarm
every client applies the final norm and the head on its own machine; here all clients share the peer's two cores,
so they feed local's tokens and apply the head after the clock stops, which checks that every session would have
picked exactly local's tokens.
"""

import statistics
import threading
import time

import torch
from transformers import DynamicCache

from bench.results import Result
from client import AutoDistributedModelForCausalLM


def local_batch_decode(local, prompts: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds local transformers takes to decode `new_tokens` greedy tokens for all rows at once, and the tokens."""
    with torch.inference_mode():
        cache = DynamicCache(config=local.config)
        tokens = [local(prompts, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)]
        started = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(local(tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
        return time.perf_counter() - started, torch.cat(tokens, dim=1)


def swarm_concurrent_decode(model, prompts: torch.Tensor, tokens: torch.Tensor) -> tuple[float, bool]:
    """Seconds until every session (one per row of `prompts`, each in its own thread) has fed its row of `tokens`
    but the last, and whether every session's outputs pick exactly those tokens."""
    new_tokens = tokens.shape[1] - 1
    sessions = [model.remote.inference_session(max_length=prompts.shape[1] + new_tokens) for _ in prompts]
    embed, family = model.get_input_embeddings(), model.family
    with torch.inference_mode():
        first = [session.step(embed(prompt[None]))[:, -1:] for session, prompt in zip(sessions, prompts)]
    outputs: list[list[torch.Tensor]] = [[hidden] for hidden in first]
    start = threading.Barrier(len(sessions) + 1)

    def decode(index: int) -> None:
        start.wait(timeout=60)
        with torch.inference_mode():
            for step in range(new_tokens):
                outputs[index].append(sessions[index].step(embed(tokens[index, step : step + 1][None])))

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
    with torch.inference_mode():
        hidden = torch.cat([torch.cat(rows, dim=1) for rows in outputs])
        picked = family.logits(model, family.final_norm(model, hidden)).argmax(-1)
    return elapsed, torch.equal(picked, tokens)


def concurrent_decode(args, folder: str, local, bootstrap: str) -> list[Result]:
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
    results = []
    try:
        for count in args.sessions:
            prompts = torch.randint(3, local.config.vocab_size, (count, 16))
            local_seconds, swarm_seconds, same = [], [], True
            for _ in range(args.repeats):
                seconds, tokens = local_batch_decode(local, prompts, args.concurrent_tokens)
                local_seconds.append(seconds)
                seconds, picked_same = swarm_concurrent_decode(model, prompts, tokens)
                swarm_seconds.append(seconds)
                same &= picked_same
            total = count * args.concurrent_tokens
            results.append(Result(
                f"decode, {count} concurrent sessions", "tokens/s",
                total / statistics.median(swarm_seconds), total / statistics.median(local_seconds),
                detail=f"1 peer x all blocks vs local batch {count}; same tokens: {same}",
            ))
    finally:
        model.close()
    return results
