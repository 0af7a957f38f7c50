"""How many CPU threads a pass computes on: the peer's budget for passes with enough rows, one for small ones."""

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

    def threads_for(self, rows: int) -> int:
        return self.budget if rows >= self.parallel_min_rows else 1

    def describe(self) -> str:
        if self.budget == 1:
            return "1 thread"
        if self.parallel_min_rows <= 1:
            return f"{self.budget} threads"
        return f"{self.budget} threads from {self.parallel_min_rows} rows, 1 below"


def use_threads(count: int) -> None:
    """Makes torch ops on the calling thread use `count` threads. OpenMP keeps this setting per thread, so it must be
    made on the thread that computes: `torch.set_num_threads` on the main thread does not reach a worker thread."""
    torch.set_num_threads(count)
