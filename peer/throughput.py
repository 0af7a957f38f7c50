"""The throughputs a peer announces: compute (calibrated, then following its own passes) and network."""

import statistics
from collections import deque

import torch

from peer.calibration import Calibration

SERVED_WINDOW = 64  # the announced compute throughput follows this many of the peer's latest passes
SERVED_MIN_PASSES = 8  # fewer passes than this say too little: the calibrated figure stands


class ServedSpeed:
    """The calibrated throughput, scaled by how fast the peer's own latest passes ran against what calibration
    expects for their size. A peer whose machine got busier (other work, a neighbour, a throttled CPU) announces
    less and stops attracting traffic; when it recovers, it announces more again.

    `record` is called by the compute thread(s), `throughput` read by the announcer: a deque's appends and copies are
    atomic under the GIL."""

    def __init__(self, calibration: Calibration):
        self.calibration = calibration
        self._slowdowns: deque[float] = deque(maxlen=SERVED_WINDOW)

    def record(self, rows: int, seconds: float) -> None:
        self._slowdowns.append(seconds / self.calibration.expected_seconds(rows))

    @property
    def throughput(self) -> float:
        slowdowns = list(self._slowdowns)
        if len(slowdowns) < SERVED_MIN_PASSES:
            return self.calibration.throughput
        return self.calibration.throughput / statistics.median(slowdowns)


def network_throughput(bandwidth_mbps: float, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens/s the link carries: each token's hidden state comes in and goes out once."""
    bytes_per_token = 2 * hidden_size * dtype.itemsize
    return bandwidth_mbps * 1e6 / 8 / bytes_per_token
