"""How many CPU threads a pass computes on: the peer's budget for passes with enough rows, one for small ones."""

import torch

# Passes with fewer token rows (batch rows x new tokens) than this run on one thread. Their matmuls are bound by
# memory, not arithmetic: a second thread gains nothing (4-block span of the 118M benchmark model: 1 and 4 rows
# 1.0x, 8 rows 1.34x, 16 rows 1.5x with 2 threads), and the OpenMP worker would then spin after every operation on
# a core that co-located peers and clients need.
PARALLEL_MIN_ROWS = 8


def threads_for(rows: int, budget: int) -> int:
    return budget if rows >= PARALLEL_MIN_ROWS else 1


def use_threads(count: int) -> None:
    """Makes torch ops on the calling thread use `count` threads. OpenMP keeps this setting per thread, so it must be
    made on the thread that computes: `torch.set_num_threads` on the main thread does not reach a worker thread."""
    torch.set_num_threads(count)
