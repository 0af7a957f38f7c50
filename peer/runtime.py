"""The one thread that owns the device: batches the work the asyncio handlers queue, inference first.

Each round takes every queued inference step, groups the steps that can share a pass (`batching.pass_key`) and
runs each group as one batched forward per block; long prefills advance one chunk per round so that decoding
sessions are not stalled behind them. Forward and backward requests run when no step waits, queued requests of
the same kind and shape merged into one pass.

A step of the only session on the peer, arriving while nothing else is queued or running, is run at once by the
caller (the event loop) instead: there is nothing to batch it with, and handing it to the compute thread and back
costs two thread wake-ups per hop (0.1-0.3 ms each on the benchmark VM, more after the peer idled).
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from peer.batching import pass_key, run_pass
from peer.kv_pages import PagedKV
from peer.linear_layout import layout_switch
from peer.sessions import StepWork
from peer.threads import ThreadPlan, use_threads
from swarm.blocks import BlockSpan

PREFILL_CHUNK = 256  # tokens of one step run per round; decode steps of other sessions go in between
MAX_PASS_ROWS = 256  # rows of one batched pass
MAX_MERGED_JOBS = 64  # forward or backward requests merged into one pass
# Sessions answered in the last round usually send their next step together; a round waits this long at most
# (and never more than half a pass) for those still missing, so that they share a pass instead of alternating.
MAX_BATCH_WAIT = 0.02


class SessionClosedError(Exception):
    """A queued step's session closed before the step ran."""


class RuntimeStoppedError(Exception):
    """The runtime was shut down (the peer stops, or moved to other blocks) before this work ran."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class _Job:
    function: Callable[[BlockSpan, list], list]  # runs many items at once, one result per item
    item: Any
    group: Hashable | None  # queued jobs with the same function and group may be merged; None: never
    waiter: _Waiter


class ComputeRuntime:
    """`plan`: the CPU threads each pass computes on (default: torch's setting for every pass); `on_pass` hears the
    rows and seconds of every inference pass (the served-speed figure follows them)."""

    def __init__(self, span: BlockSpan, kv: PagedKV, plan: ThreadPlan | None = None,
                 on_pass: Callable[[int, float], None] | None = None, name: str = "swarm-compute"):
        self.span, self.kv = span, kv
        self._layout = layout_switch(span)
        self.plan = plan or ThreadPlan(torch.get_num_threads())
        self._on_pass = on_pass
        self.largest_pass = 0  # most sessions seen in one batched pass, reported by Info
        self._awaited: set = set()  # sessions answered in the last round that have not sent their next step yet
        self._last_pass_seconds = 0.0
        self._steps: deque[tuple[StepWork, _Waiter]] = deque()
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._busy = False  # a pass runs (on the compute thread or inline); guarded by _wake
        self._jobs_turn = False  # the next pass is for jobs, if any wait: one follows every pass of steps
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit_step(self, work: StepWork, only_session: bool = False) -> "asyncio.Future[torch.Tensor]":
        """Queues an inference step (run with whatever other steps are queued); the future gets its output.

        Call from the event loop. The future is resolved even if its awaiter is cancelled, so that a closing
        session can wait for its last step before its pages go back to the pool. With `only_session` (no other
        session is open) and an idle runtime, a step that fits in one pass runs before this returns.
        """
        waiter = _new_waiter()
        with self._wake:
            if self._refused(waiter):
                return waiter.future
            idle = not (self._busy or self._steps or self._jobs)
            inline = only_session and idle and work.remaining_tokens <= PREFILL_CHUNK
            if inline:
                self._busy = True
            else:
                self._steps.append((work, waiter))
                self._awaited.discard(work.session)
                if len(self._steps) == 1 or not self._awaited:  # only then may the compute thread proceed
                    self._wake.notify()
        if inline:
            try:
                self._run_steps([(work, waiter)])
            finally:
                with self._wake:
                    self._busy = False
                    self._awaited.clear()  # nothing to wait for: the session's next step may run inline again
                    self._wake.notify()
        return waiter.future

    async def run(self, function: Callable[[BlockSpan, list], list], item: Any, group: Hashable | None = None) -> Any:
        """Runs `function(span, [item, ...])` for a forward or backward request and returns this item's result."""
        waiter = _new_waiter()
        with self._wake:
            if not self._refused(waiter):
                self._jobs.append(_Job(function, item, group, waiter))
                self._wake.notify()
        return await waiter.future

    def _refused(self, waiter: _Waiter) -> bool:
        """Fails work that arrives after shutdown (nothing would run it); call with the lock held."""
        if self._stopping:
            _resolve(waiter, None, RuntimeStoppedError("this peer's compute runtime has stopped"))
        return self._stopping

    def shutdown(self) -> None:
        """Stops after the pass in progress; work still queued fails with RuntimeStoppedError."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)
        with self._wake:
            waiters = [waiter for _, waiter in self._steps] + [job.waiter for job in self._jobs]
            self._steps.clear()
            self._jobs.clear()
        for waiter in waiters:
            _resolve(waiter, None, RuntimeStoppedError("this peer's compute runtime stopped before the work ran"))

    def _work(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: (self._steps or self._jobs) and not self._busy or self._stopping)
                if self._steps and self._awaited:
                    wait = min(MAX_BATCH_WAIT, self._last_pass_seconds / 2)
                    self._wake.wait_for(lambda: not self._awaited or self._stopping, timeout=wait)
                    self._awaited.clear()
                if self._stopping:
                    return
                # Inference steps go first, but a pass of waiting jobs (Forward/Backward: training, and clients'
                # checks of other peers' answers) follows every pass of steps, so that sessions cannot starve them.
                steps, jobs = [], []
                if self._jobs and (self._jobs_turn or not self._steps):
                    jobs = self._take_mergeable_jobs()
                else:
                    steps = list(self._steps)
                    self._steps.clear()
                self._jobs_turn = bool(steps)
                self._busy = True
            try:
                if steps:
                    self._run_steps(steps)
                else:
                    self._run_jobs(jobs)
            finally:
                with self._wake:
                    self._busy = False

    def _run_steps(self, steps: list[tuple[StepWork, _Waiter]]) -> None:
        groups: dict[tuple, list[tuple[StepWork, _Waiter]]] = {}
        for work, waiter in steps:
            if work.session.closed:
                _resolve(waiter, None, SessionClosedError(f"session {work.session.session_id} was closed"))
                continue
            groups.setdefault(pass_key(work, min(work.remaining_tokens, PREFILL_CHUNK)), []).append((work, waiter))
        unfinished = []
        for key in sorted(groups, key=lambda key: key[-1]):  # decode steps (fewest tokens) first
            for batch in _limit_rows(groups[key]):
                self.largest_pass = max(self.largest_pass, len(batch))
                rows = sum(work.session.batch_size for work, _ in batch) * key[-1]
                use_threads(self.plan.threads_for(rows))
                self._layout.columns = self.plan.columns_for(rows)
                started = time.perf_counter()
                try:
                    run_pass(self.span, self.kv, [work for work, _ in batch], key[-1])
                    self._last_pass_seconds = time.perf_counter() - started
                    if self._on_pass is not None:
                        self._on_pass(rows, self._last_pass_seconds)
                except Exception as error:  # the sessions' caches may be half-written: each handler closes its session
                    _resolve_all([(waiter, None, error) for _, waiter in batch])
                    continue
                finished = [(work, waiter) for work, waiter in batch if not work.remaining_tokens]
                unfinished += [(work, waiter) for work, waiter in batch if work.remaining_tokens]
                with self._wake:
                    self._awaited.update(work.session for work, _ in finished)
                _resolve_all([(waiter, work.output(), None) for work, waiter in finished])
        if unfinished:
            with self._wake:
                self._steps.extendleft(reversed(unfinished))

    def _take_mergeable_jobs(self) -> list[_Job]:
        first = self._jobs.popleft()
        jobs = [first]
        if first.group is not None:
            for job in list(self._jobs):
                if len(jobs) == MAX_MERGED_JOBS:
                    break
                if job.function is first.function and job.group == first.group:
                    jobs.append(job)
                    self._jobs.remove(job)
        return jobs

    def _run_jobs(self, jobs: list[_Job]) -> None:
        use_threads(self.plan.budget)
        self._layout.columns = False  # training and checks: large passes, and autograd's own kernels
        try:
            results, error = jobs[0].function(self.span, [job.item for job in jobs]), None
        except Exception as exception:  # handed to the waiting handlers, which decide what the clients see
            results, error = [None] * len(jobs), exception
        for job, result in zip(jobs, results):
            _resolve(job.waiter, result, error)


def _limit_rows(batch: list[tuple[StepWork, _Waiter]]) -> list[list[tuple[StepWork, _Waiter]]]:
    """Splits a group into passes of at most MAX_PASS_ROWS rows (a session's rows stay together)."""
    passes, rows = [[]], 0
    for entry in batch:
        size = entry[0].session.batch_size
        if passes[-1] and rows + size > MAX_PASS_ROWS:
            passes.append([])
            rows = 0
        passes[-1].append(entry)
        rows += size
    return passes


def _new_waiter() -> _Waiter:
    loop = asyncio.get_running_loop()
    return _Waiter(loop, loop.create_future())


def _resolve(waiter: _Waiter, result: Any, error: BaseException | None) -> None:
    _resolve_all([(waiter, result, error)])


def _resolve_all(outcomes: list[tuple[_Waiter, Any, BaseException | None]]) -> None:
    """Resolves the waiters' futures with one wake-up of each event loop involved (a pass answers many sessions)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for waiter, result, error in outcomes:
        by_loop.setdefault(waiter.loop, []).append((waiter.future, result, error))
    for loop, results in by_loop.items():
        loop.call_soon_threadsafe(_set_results, results)


def _set_results(results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, error in results:
        _set_result(future, result, error)


def _set_result(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
