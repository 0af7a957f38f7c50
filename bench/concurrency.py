"""Aggregate decode rate of many sessions on one peer that serves every block, against one local batch.

The local counterpart decodes the sequences greedily as one batch with transformers' KV cache. Each swarm session
is a client of its own: the sessions are spread over CLIENT_PROCESSES client processes (threads inside each), as
users of a swarm do not share one Python interpreter, and then all run from one process (threads), as an API server
runs its users' sessions; all of them share this machine's cores with the peer. On a
real swarm every client applies the final norm and the head on its own machine; here the clients feed local's tokens
and apply the head after the clock stops, which checks that every session would have picked exactly local's tokens.
"""

import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import Iterator

import torch
from transformers import DynamicCache

from bench.common import rates
from bench.results import Result

CLIENT_PROCESSES = 4
_TIMEOUT = 600.0  # seconds: a worker that takes longer has hung


def local_batch_decode(local, prompts: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds local transformers takes to decode `new_tokens` greedy tokens for all rows at once, and the tokens."""
    with torch.inference_mode():
        cache = DynamicCache(config=local.config)
        tokens = [local(prompts, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)]
        started = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(local(tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
        return time.perf_counter() - started, torch.cat(tokens, dim=1)


def swarm_concurrent_decode(model, prompts: torch.Tensor, tokens: torch.Tensor, start) -> tuple[float, bool]:
    """Opens one session per row of `prompts` and prefills it, waits on `start` (a barrier of every client), then
    feeds each session its row of `tokens` but the last from a thread of its own. Returns when (time.monotonic)
    the last session finished, and whether every session's outputs pick exactly those tokens."""
    new_tokens = tokens.shape[1] - 1
    sessions = [model.remote.inference_session(max_length=prompts.shape[1] + new_tokens) for _ in prompts]
    embed, family = model.get_input_embeddings(), model.family
    with torch.inference_mode():
        first = [session.step(embed(prompt[None]))[:, -1:] for session, prompt in zip(sessions, prompts)]
    outputs: list[list[torch.Tensor]] = [[hidden] for hidden in first]

    def decode(index: int) -> None:
        with torch.inference_mode():
            for step in range(new_tokens):
                outputs[index].append(sessions[index].step(embed(tokens[index, step : step + 1][None])))

    threads = [threading.Thread(target=decode, args=(index,)) for index in range(len(sessions))]
    start.wait(timeout=_TIMEOUT)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=_TIMEOUT)
    finished = time.monotonic()
    for session in sessions:
        session.close()
    if not sessions:
        return finished, True
    with torch.inference_mode():
        hidden = torch.cat([torch.cat(rows, dim=1) for rows in outputs])
        picked = family.logits(model, family.final_norm(model, hidden)).argmax(-1)
    return finished, torch.equal(picked, tokens)


def _client_worker(folder: str, bootstrap: str, start, commands, results) -> None:
    """A client process: decodes the sessions it is sent, until it is sent None."""
    from client import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)  # the clients' work is small; threads of their own would only contend for the cores
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap])
    try:
        results.put("ready")
        while (command := commands.get()) is not None:
            try:
                results.put(swarm_concurrent_decode(model, *command, start))
            except Exception as error:  # reported to the parent; nobody should wait for this client at the barrier
                start.abort()
                results.put(RuntimeError(f"a benchmark client failed: {error!r}"))
    finally:
        model.close()


class ClientPool:
    """`processes` client processes that decode the rows of a batch of sessions together."""

    def __init__(self, folder: str, bootstrap: str, processes: int = CLIENT_PROCESSES):
        context = multiprocessing.get_context("spawn")
        self.start = context.Barrier(processes + 1)
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(processes)]
        self.processes = [
            context.Process(target=_client_worker, args=(folder, bootstrap, self.start, commands, self.results))
            for commands in self.commands
        ]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            if self._result() != "ready":
                raise RuntimeError("a benchmark client process failed to start")

    def decode(self, prompts: torch.Tensor, tokens: torch.Tensor) -> tuple[float, bool]:
        """Seconds until every row's session has fed its tokens (rows dealt round-robin to the processes), and
        whether every session picked exactly `tokens`."""
        for index, commands in enumerate(self.commands):
            commands.put((prompts[index :: len(self.commands)], tokens[index :: len(self.commands)]))
        try:
            self.start.wait(timeout=_TIMEOUT)
        except threading.BrokenBarrierError:
            pass  # a client failed before the start: its answer says why
        started = time.monotonic()
        outcomes = [self._result() for _ in self.processes]
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return max(finished for finished, _ in outcomes) - started, all(same for _, same in outcomes)

    def _result(self):
        try:
            return self.results.get(timeout=_TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"a benchmark client process gave no answer within {_TIMEOUT:.0f}s") from None

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def concurrent_decode(args, folder: str, local, bootstrap: str) -> list[Result]:
    """Each count of sessions from CLIENT_PROCESSES processes, then the largest one from a single process."""
    results = []
    with _pool(folder, bootstrap, CLIENT_PROCESSES) as pool:
        for count in args.sessions:
            results.append(_sessions_decode(
                args, local, pool, count, f"decode, {count} concurrent sessions", f"{CLIENT_PROCESSES} client processes"
            ))
    flag_slower_larger_batches(results)
    with _pool(folder, bootstrap, 1) as pool:
        count = args.one_process_sessions
        one_process = _sessions_decode(
            args, local, pool, count, f"decode, {count} concurrent sessions, one client process",
            "1 client process, a thread per session",
        )
    return results + [one_process]


@contextlib.contextmanager
def _pool(folder: str, bootstrap: str, processes: int) -> Iterator[ClientPool]:
    pool = ClientPool(folder, bootstrap, processes)
    try:
        yield pool
    finally:
        pool.close()


def _sessions_decode(args, local, pool: ClientPool, count: int, metric: str, clients: str) -> Result:
    prompts = torch.randint(3, local.config.vocab_size, (count, 16))
    local_seconds, swarm_seconds, same = [], [], True
    for _ in range(args.repeats):
        seconds, tokens = local_batch_decode(local, prompts, args.concurrent_tokens)
        local_seconds.append(seconds)
        seconds, picked_same = pool.decode(prompts, tokens)
        swarm_seconds.append(seconds)
        same &= picked_same
    total = count * args.concurrent_tokens
    return Result.measured(
        metric, "tokens/s", rates(total, swarm_seconds), rates(total, local_seconds),
        detail=f"1 peer x all blocks vs local batch {count}; {clients}; same tokens: {same}",
    )


def flag_slower_larger_batches(results: list[Result]) -> None:
    """A local batch decodes more tokens/s than any smaller one (it streams the same weights once for more rows):
    one that did not was disturbed, and its ratio would flatter the swarm."""
    for smaller, larger in zip(results, results[1:]):
        if larger.local < smaller.local:
            larger.warning = (f"local batch decoded {larger.local:.4g} tokens/s, slower than the smaller batch's "
                              f"{smaller.local:.4g}")
