"""How many tokens/s this peer pushes through its span: measured once per setting, cached on disk, announced."""

import json
import logging
import os
import time
from pathlib import Path

import torch

from peer.threads import use_threads
from swarm.blocks import BlockSpan

logger = logging.getLogger(__name__)

def measure_throughput(span: BlockSpan, dtype: torch.dtype, threads: int, tokens: int = 64, repeats: int = 3) -> float:
    """Tokens/s of a `tokens`-token pass on `threads` threads (run on any thread: it sets its own)."""
    use_threads(threads)
    device = next(span.parameters()).device
    hidden = torch.randn(1, tokens, span.config.hidden_size, dtype=dtype, device=device)
    position_ids = torch.arange(tokens, device=device)[None]
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    timings = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            span(hidden, position_ids, mask)
            timings.append(time.perf_counter() - started)
    return tokens / sorted(timings)[len(timings) // 2]


def network_throughput(bandwidth_mbps: float, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens/s the link carries: each token's hidden state comes in and goes out once."""
    bytes_per_token = 2 * hidden_size * dtype.itemsize
    return bandwidth_mbps * 1e6 / 8 / bytes_per_token


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR", "~/.cache/swarm")).expanduser()


class ThroughputCache:
    """Measured throughputs by setting (model, blocks, device, dtype, threads, torch version), in a JSON file."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "throughput.json"

    @staticmethod
    def key(model_prefix: str, num_blocks: int, device: str, dtype: torch.dtype, threads: int) -> str:
        return f"{model_prefix} blocks={num_blocks} {device} {dtype} threads={threads} torch={torch.__version__}"

    def get(self, key: str) -> float | None:
        value = self._read().get(key)
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def put(self, key: str, value: float) -> None:
        entries = self._read()
        entries[key] = value
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
            temporary.replace(self.path)  # atomic: peers starting together never read half a file
        except OSError as error:  # a read-only home only costs a measurement at the next start
            logger.warning(f"cannot cache the measured throughput in {self.path}: {error}")

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}
