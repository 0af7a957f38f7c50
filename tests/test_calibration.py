"""Settings measured on the machine: the thread plan and throughput a peer calibrates, caches and announces."""

import json
import re
import threading
import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from peer.calibration import ROW_COUNTS, Calibration, CalibrationCache, _measured_plan, calibrate
from peer.local_swarm import start_peers
from peer.threads import ThreadPlan
from peer.throughput import SERVED_MIN_PASSES, SERVED_WINDOW, ServedSpeed
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import byte_tokenizer


def timings(one: dict[int, float], two: dict[int, float]) -> dict[tuple[int, int], float]:
    return {**{(rows, 1): seconds for rows, seconds in one.items()}, **{(rows, 2): seconds for rows, seconds in two.items()}}


def test_the_budget_is_used_only_from_the_size_where_it_pays_on():
    one = {rows: 1.0 + rows / 8 for rows in ROW_COUNTS}
    assert _measured_plan(2, timings(one, {rows: one[rows] / 1.6 for rows in ROW_COUNTS})) == ThreadPlan(2, 1)
    assert _measured_plan(2, timings(one, dict(one))) == ThreadPlan(1)  # a second thread never gains: one everywhere
    # Faster from 8 rows on, and by noise at 1 row too: the plan starts where every larger size agrees.
    two = {rows: one[rows] / (1.5 if rows >= 8 or rows == 1 else 1.0) for rows in ROW_COUNTS}
    assert _measured_plan(2, timings(one, two)) == ThreadPlan(2, 8)


def test_a_calibration_times_every_size_and_survives_its_file(tiny_llama, tmp_path):
    span = BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 2, torch.float32)
    measured = calibrate(span, torch.float32, budget=2)
    assert measured.plan.budget in (1, 2) and set(measured.pass_seconds) == set(ROW_COUNTS)
    assert min(measured.pass_seconds.values()) > 0 and measured.throughput > 0
    forced = calibrate(span, torch.float32, budget=2, parallel_min_rows=1, linear_layout="columns")
    assert (forced.plan.budget, forced.plan.parallel_min_rows) == (2, 1)
    assert forced.plan.column_sizes == set(ROW_COUNTS) and forced.plan.columns_for(3) and not forced.plan.columns_for(65)
    assert not calibrate(span, torch.float32, budget=1, linear_layout="rows").plan.column_sizes
    cache = CalibrationCache(tmp_path / "calibration.json")
    cache.put("key", measured)
    assert CalibrationCache(tmp_path / "calibration.json").get("key") == measured
    entries = json.loads((tmp_path / "calibration.json").read_text())
    old_record = {name: value for name, value in entries["key"].items() if name != "column_sizes"}  # measured again
    for garbage in ("x", {"budget": 2}, {**entries["key"], "pass_seconds": {"1": -1.0}}, old_record,
                    {**entries["key"], "column_sizes": [3]}):
        (tmp_path / "calibration.json").write_text(json.dumps({"key": garbage}))
        assert cache.get("key") is None


def test_expected_seconds_follow_the_timed_curve():
    calibration = Calibration(ThreadPlan(1), {rows: 0.001 * rows + 0.01 for rows in ROW_COUNTS})
    assert calibration.expected_seconds(1) == pytest.approx(0.011)
    assert calibration.expected_seconds(12) == pytest.approx(0.022)  # between 8 and 16
    assert calibration.expected_seconds(128) == pytest.approx(2 * calibration.pass_seconds[64])
    assert calibration.throughput == pytest.approx(64 / 0.074)


def test_the_served_speed_follows_the_peers_own_passes():
    calibration = Calibration(ThreadPlan(1), {rows: 0.01 * rows for rows in ROW_COUNTS})
    speed = ServedSpeed(calibration)
    for _ in range(SERVED_MIN_PASSES - 1):
        speed.record(4, 0.12)  # three times slower than calibrated
    assert speed.throughput == calibration.throughput  # too few passes to say
    speed.record(16, 0.48)
    assert speed.throughput == pytest.approx(calibration.throughput / 3)
    for _ in range(SERVED_WINDOW):
        speed.record(8, 0.08)  # recovered
    assert speed.throughput == pytest.approx(calibration.throughput)


def test_peers_of_one_machine_measure_one_at_a_time(tmp_path):
    """Two peers starting together: one measures, the other waits and takes its figures (no concurrent timing)."""
    running, overlaps, calls = [], [], []
    calibration = Calibration(ThreadPlan(2, 8, measured_sizes=ROW_COUNTS), {rows: 0.01 for rows in ROW_COUNTS})

    def measure() -> Calibration:
        overlaps.append(bool(running))
        running.append(1)
        calls.append(1)
        time.sleep(0.3)
        running.pop()
        return calibration

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(CalibrationCache(tmp_path / "c.json").get_or_measure("k", measure)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [calibration, calibration] and len(calls) == 1 and not any(overlaps)


def announced_throughput(compute: str) -> float:
    return float(re.search(r"([\d.]+) tokens/s", compute).group(1))


def test_peers_started_together_agree_and_any_plan_gives_the_same_answers(tiny_llama, bootstrap, reference, tmp_path, monkeypatch):
    """Identical peers started together on a fresh machine cache announce one figure; peers computing on a measured
    plan, on every pass with two threads, and with every linear layer as W @ x^T give local transformers' logits
    and tokens."""
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    measured = start_peers(tiny_llama, bootstrap, ["0:2", "2:4"], "--num-threads", "2")
    threaded = start_peers(tiny_llama, bootstrap, ["0:4"], "--num-threads", "2", "--parallel-min-rows", "1")
    columns = start_peers(tiny_llama, bootstrap, ["0:4"], "--linear-layout", "columns")
    try:
        first, second = (announced_throughput(peer.compute) for peer in measured)
        assert abs(first - second) <= 0.2 * max(first, second)
        assert "2 threads" in threaded[0].compute and "W @ x^T at 1/2/4/8/16/32/64 rows" in columns[0].compute
        inputs = byte_tokenizer()(["Threads change nothing", "ok"], return_tensors="pt", padding=True)
        with torch.no_grad():
            expected_logits = reference(**inputs).logits
        expected_tokens = reference.generate(**inputs, max_new_tokens=16, do_sample=False)
        mask = inputs["attention_mask"].bool()
        for peers in (measured, threaded, columns):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tiny_llama, initial_peers=[bootstrap], allowed_peers=tuple(peer.peer_id for peer in peers)
            )
            try:
                torch.testing.assert_close(model(**inputs).logits[mask], expected_logits[mask], rtol=0, atol=1e-4)
                assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), expected_tokens)
            finally:
                model.close()
    finally:
        for peer in measured + threaded + columns:
            peer.process.stop()
