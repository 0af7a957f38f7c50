"""`swarm-peer status` and the web dashboard (in a real headless chromium) show the swarm, gaps included."""

import json
import re
import subprocess
import sys
import time

import pytest

from peer.local_swarm import spawn_cli, start_peers
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from tests.browser import rendered_page

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_with_a_gap(tmp_path_factory, bootstrap):
    """A model of its own (no other test's peers) served on blocks 0:1 and 2:4: block 1 has no server."""
    path = str(save_random_checkpoint(tmp_path_factory.mktemp("models") / "gappy", tiny_llama_config(), seed=11))
    peers = start_peers(path, bootstrap, ["0:1", "2:4"], "--public-name", "status-test")
    yield path, Checkpoint(path).model_prefix()
    for peer in peers:
        peer.process.stop()


def status(bootstrap: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "status", "--initial-peers", bootstrap, *args],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_shows_coverage_peers_and_the_gap(model_with_a_gap, bootstrap):
    _, prefix = model_with_a_gap
    snapshot = json.loads(status(bootstrap, "--json"))
    (model,) = [model for model in snapshot["models"] if model["prefix"] == prefix]
    assert (model["name"], model["num_blocks"], model["gaps"], model["health"]) == ("gappy", 4, [1], "gaps")
    assert model["block_servers"] == [1, 0, 1, 1]
    peers = [peer for peer in model["peers"] if peer["state"] == "online"]
    assert sorted((peer["start"], peer["end"]) for peer in peers) == [(0, 1), (2, 4)]
    for peer in peers:
        assert peer["public_name"] == "status-test" and peer["throughput"] > 0 and peer["cache_tokens_left"] > 0

    table = status(bootstrap)
    section = table[table.index(prefix) :]
    assert re.search(r"gappy\s+" + prefix, table)
    assert re.search(r"\n\s+1\s+GAP: no server\s+0", section)
    assert re.search(r"\n\s+2-3\s+1\s+[\d,]+", section)
    assert re.search(r"status-test\s+2:4\s+online", section)


def model_section(page: str, prefix: str) -> str:
    match = re.search(rf'<section class="model" data-prefix="{prefix}".*?</section>', page, re.DOTALL)
    assert match, f"no section for {prefix} in the page:\n{page[:3000]}"
    return match.group(0)


def test_dashboard_shows_the_gap_then_its_repair(model_with_a_gap, bootstrap):
    path, prefix = model_with_a_gap
    monitor = spawn_cli("monitor", "--initial-peers", bootstrap, "--port", "0", "--refresh", "1")
    try:
        url = monitor.wait_for_line(r"dashboard at (\S+)").group(1)
        section = model_section(rendered_page(url), prefix)
        assert 'data-health="gaps"' in section
        assert "Gap: block(s) 1 have no online server" in section
        assert re.findall(r'class="block gap" data-block="(\d+)"', section) == ["1"]
        assert len(re.findall(r'class="peer-bar online"', section)) == 2
        assert "status-test" in section

        (filler,) = start_peers(path, bootstrap, ["1:2"], "--public-name", "filler")
        try:
            deadline = time.monotonic() + 60
            while 'data-health="healthy"' not in (section := model_section(rendered_page(url), prefix)):
                assert time.monotonic() < deadline, f"the dashboard never showed the gap closed:\n{section}"
                time.sleep(1)
            assert "class=\"block gap\"" not in section and "filler" in section
        finally:
            filler.process.stop()
    finally:
        monitor.stop()
