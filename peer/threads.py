"""How a pass computes: on how many CPU threads (the peer's budget for passes with enough rows, one for small ones),
and in which layout its linear layers multiply (peer/linear_layout.py)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadPlan:
    """`budget` threads for passes of at least `parallel_min_rows` token rows (batch rows x new tokens), one thread
    for smaller ones. Small passes are bound by memory, not arithmetic: on some machines a second thread gains
    nothing there and its OpenMP worker only spins on a core that co-located peers and clients need, on others it
    is 1.6x faster. Which holds is measured on the machine (peer/calibration.py), not assumed."""

    budget: int
    parallel_min_rows: int = 1
    # Of the pass sizes `measured_sizes`, those at which the column layout computed faster. A pass uses the choice
    # of the largest measured size not above its own rows; passes beyond the largest keep the row layout.
    column_sizes: frozenset[int] = frozenset()
    measured_sizes: tuple[int, ...] = ()

    def threads_for(self, rows: int) -> int:
        return self.budget if rows >= self.parallel_min_rows else 1

    def columns_for(self, rows: int) -> bool:
        if not self.column_sizes or rows > max(self.measured_sizes):
            return False
        return max((size for size in self.measured_sizes if size <= rows), default=min(self.measured_sizes)) in self.column_sizes

    def describe(self) -> str:
        if self.budget == 1:
            threads = "1 thread"
        elif self.parallel_min_rows <= 1:
            threads = f"{self.budget} threads"
        else:
            threads = f"{self.budget} threads from {self.parallel_min_rows} rows, 1 below"
        if not self.column_sizes:
            return threads
        return f"{threads}, W @ x^T at {'/'.join(map(str, sorted(self.column_sizes)))} rows"


def use_threads(count: int) -> None:
    """Makes torch ops on the calling thread use `count` threads. OpenMP keeps this setting per thread, so it must be
    made on the thread that computes: `torch.set_num_threads` on the main thread does not reach a worker thread."""
    torch.set_num_threads(count)
