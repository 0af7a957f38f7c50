"""How this machine computes a span fastest, measured on it: the thread plan (threads and linear layout of each pass
size), the pass-time curve and the throughput.

Measured once per setting (model, span length, device, dtype, thread budget) and machine (CPU model and the flags
that matter, usable cores, torch version), then cached on disk. Peers on one machine measure one at a time: two
measuring together each see a part of the machine (two identical peers once announced 5,013 and 597 tokens/s), and
the second one then finds the first one's figures.
"""

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.linear_layout import layout_switch
from peer.threads import ThreadPlan, use_threads
from swarm.blocks import BlockSpan

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # pass sizes timed: decode steps of 1..64 sessions, and a prefill chunk
THROUGHPUT_ROWS = 64  # the announced throughput is that of a pass this large
PARALLEL_GAIN = 1.1  # the budget is used for a pass size only where it is at least this much faster than one thread
LAYOUT_GAIN = 1.05  # the column layout is used for a pass size only where it is at least this much faster
# Timed passes per size and setting (after one warm-up), interleaved so that noise hits all alike; the fastest
# counts, since noise on a shared machine (other work, a hypervisor taking the cores) only ever adds time.
REPEATS = 4
LOCK_TIMEOUT = 120.0  # a peer waits this long for another's measurement, then measures beside it
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "sve")


@dataclass(frozen=True)
class Calibration:
    plan: ThreadPlan
    pass_seconds: dict[int, float]  # fastest seconds of a pass of that many rows under the plan, for ROW_COUNTS

    @property
    def throughput(self) -> float:
        """Tokens/s of a THROUGHPUT_ROWS-row pass: what the peer announces before it has served anything."""
        return THROUGHPUT_ROWS / self.pass_seconds[THROUGHPUT_ROWS]

    def expected_seconds(self, rows: int) -> float:
        """A pass of `rows` rows as calibrated: linear between the timed sizes, proportional beyond the largest."""
        sizes = sorted(self.pass_seconds)
        if rows <= sizes[0]:
            return self.pass_seconds[sizes[0]]
        for low, high in zip(sizes, sizes[1:]):
            if rows <= high:
                share = (rows - low) / (high - low)
                return self.pass_seconds[low] + share * (self.pass_seconds[high] - self.pass_seconds[low])
        return self.pass_seconds[sizes[-1]] * rows / sizes[-1]

    def to_json(self) -> dict:
        return {
            "budget": self.plan.budget, "parallel_min_rows": self.plan.parallel_min_rows,
            "column_sizes": sorted(self.plan.column_sizes),
            "pass_seconds": {str(rows): seconds for rows, seconds in self.pass_seconds.items()},
        }

    @classmethod
    def from_json(cls, data: object) -> "Calibration | None":
        """None for anything but a complete, positive record (a file from an older version, or edited by hand)."""
        try:
            column_sizes = frozenset(int(rows) for rows in data["column_sizes"])
            plan = ThreadPlan(int(data["budget"]), int(data["parallel_min_rows"]), column_sizes, ROW_COUNTS)
            seconds = {int(rows): float(value) for rows, value in data["pass_seconds"].items()}
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if set(seconds) != set(ROW_COUNTS) or min(seconds.values()) <= 0 or plan.budget < 1 or column_sizes - set(ROW_COUNTS):
            return None
        return cls(plan, seconds)


def calibrate(
    span: BlockSpan, dtype: torch.dtype, budget: int, parallel_min_rows: int | None = None, linear_layout: str = "measured"
) -> Calibration:
    """Times passes of ROW_COUNTS rows on one thread and on `budget` threads, each in both linear layouts (the
    fastest of REPEATS counts; a layout counts where it is LAYOUT_GAIN faster than the row layout). The plan
    computes on the budget from the smallest size at which the budget is PARALLEL_GAIN faster there and at every
    larger size (on one thread everywhere if it never is), each size in its faster layout on those threads; a given
    `parallel_min_rows` is taken as it is, and only the thread count it gives each size is timed; so is a
    `linear_layout` of "rows" or "columns" (every size). Runs on any thread: it sets its own."""
    forced = None if parallel_min_rows is None else ThreadPlan(budget, parallel_min_rows)
    layouts = {"rows": (False,), "columns": (True,)}.get(linear_layout, (False, True))
    if not layout_switch(span).linears:  # nothing to lay out (quantized layers)
        layouts = (False,)
    settings = [(rows, threads, columns) for rows in ROW_COUNTS for threads in sorted({1, budget}) for columns in layouts
                if forced is None or threads == forced.threads_for(rows)]
    timings: dict[tuple[int, int, bool], list[float]] = {setting: [] for setting in settings}
    time_pass = _pass_timer(span, dtype)
    for repeat in range(REPEATS + 1):
        for setting in settings:
            seconds = time_pass(*setting)
            if repeat:  # the first round warms up caches and OpenMP's pool
                timings[setting].append(seconds)
    fastest = {key: min(values) for key, values in timings.items()}
    columns_win = {(rows, threads): layouts == (True,) or (rows, threads, True) in fastest
                   and fastest[rows, threads, True] * LAYOUT_GAIN < fastest[rows, threads, False]
                   for rows, threads, _ in settings}
    best = {key: fastest[(*key, wins)] for key, wins in columns_win.items()}
    threads = forced or (_measured_plan(budget, best) if budget > 1 else ThreadPlan(1))
    column_sizes = frozenset(rows for rows in ROW_COUNTS if columns_win[rows, threads.threads_for(rows)])
    plan = ThreadPlan(threads.budget, threads.parallel_min_rows, column_sizes, ROW_COUNTS)
    return Calibration(plan, {rows: best[rows, plan.threads_for(rows)] for rows in ROW_COUNTS})


def _measured_plan(budget: int, seconds: dict[tuple[int, int], float]) -> ThreadPlan:
    threshold = None
    for rows in reversed(ROW_COUNTS):
        if seconds[rows, 1] < PARALLEL_GAIN * seconds[rows, budget]:
            break
        threshold = rows
    return ThreadPlan(budget, threshold) if threshold is not None else ThreadPlan(1)


def _pass_timer(span: BlockSpan, dtype: torch.dtype) -> Callable[[int, int], float]:
    device = next(span.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    switch = layout_switch(span)

    def time_pass(rows: int, threads: int, columns: bool) -> float:
        use_threads(threads)
        switch.columns = columns
        hidden = torch.randn(1, rows, span.config.hidden_size, dtype=dtype, device=device)
        position_ids = torch.arange(rows, device=device)[None]
        mask = torch.ones(1, rows, dtype=torch.bool, device=device)
        with torch.inference_mode():
            synchronize()
            started = time.perf_counter()
            span(hidden, position_ids, mask)
            synchronize()
        return time.perf_counter() - started

    return time_pass


def cpu_description() -> str:
    """The CPU model, the flags that decide how fast it computes, and the cores this process may use."""
    model, flags = platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() in ("flags", "Features"):
                flags.update(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {'+'.join(flag for flag in CPU_FLAGS if flag in flags) or 'no vector flags known'}, {cores} cores"


def machine_fingerprint(device: str) -> str:
    """What makes a measurement stale: another CPU (model, flags, cores this process may use) or GPU, or torch."""
    parts = [cpu_description(), f"torch={torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    if os.environ.get("OMP_WAIT_POLICY"):
        parts.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    return " ".join(parts)


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR", "~/.cache/swarm")).expanduser()


class CalibrationCache:
    """Calibrations by setting and machine, in a JSON file."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "calibration.json"

    def get(self, key: str) -> Calibration | None:
        return Calibration.from_json(self._read().get(key))

    def put(self, key: str, calibration: Calibration) -> None:
        entries = self._read()
        entries[key] = calibration.to_json()
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
            temporary.replace(self.path)  # atomic: peers starting together never read half a file
        except OSError as error:  # a read-only home only costs a measurement at the next start
            logger.warning(f"cannot cache the calibration in {self.path}: {error}")

    def get_or_measure(self, key: str, measure: Callable[[], Calibration]) -> Calibration:
        """The cached calibration, or one measured now while no other peer of this machine measures."""
        cached = self.get(key)
        if cached is not None:
            return cached
        with self._machine_lock():
            cached = self.get(key)  # measured by a peer we waited for
            if cached is None:
                cached = measure()
                self.put(key, cached)
        return cached

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    @contextlib.contextmanager
    def _machine_lock(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_suffix(".lock"), "w")
        except OSError:  # nowhere to lock: measure anyway
            yield
            return
        with lock:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        logger.warning("another peer has measured for too long: measuring beside it")
                        break
                    time.sleep(0.05)
            yield  # the lock goes with the file when it closes (or when the process dies)
