"""The systemd units in examples/systemd start a peer and stop it cleanly: `systemctl stop` sends the unit's
KillSignal to every process of the service at once (KillMode=control-group), and the peer must exit 0, leaving no
process behind, within TimeoutStopSec. The test runs each unit's own ExecStart (systemd's variable expansion done
here) in a process group of its own, and stops the whole group the same way."""

import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest

from peer.local_swarm import PeerHandle, process_group_gone, spawn_cli

UNITS = Path(__file__).resolve().parents[1] / "examples" / "systemd"
PROGRAMS = {"swarm-peer": "peer.cli", "volunteer": "peer.volunteer"}  # installed entry points -> their modules


def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file, every value of each key in order (Environment= repeats)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def expand(service: dict[str, list[str]], overrides: dict[str, str], state_dir: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart's words and the Environment=, as systemd expands them: %S is the state directory, "${VAR}" one
    word, a lone "$VAR" is split on whitespace (so an empty one vanishes)."""
    environment = dict(item.replace("%S", state_dir).partition("=")[::2] for item in service.get("Environment", []))
    environment.update(overrides)
    words: list[str] = []
    for word in shlex.split(service["ExecStart"][0].replace("%S", state_dir)):
        if lone := re.fullmatch(r"\$(\w+)", word):
            words += environment[lone.group(1)].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda match: environment[match.group(1)], word))
    return words, environment


@pytest.mark.parametrize("unit", ["swarm-peer.service", "swarm-volunteer.service"])
def test_systemctl_stop_ends_the_service_cleanly(unit, tiny_llama, bootstrap, tmp_path):
    service = service_section(UNITS / unit)
    words, environment = expand(service, {"MODEL": tiny_llama, "INITIAL_PEERS": bootstrap}, str(tmp_path))
    program, *args = words
    swarm_variables = {name: value for name, value in environment.items() if name.startswith("SWARM_")}
    process = spawn_cli(*args, module=PROGRAMS[Path(program).name], env=swarm_variables)
    try:
        PeerHandle.from_online_line(process)
        assert (tmp_path / "swarm" / "identity.key").is_file()  # the identity is kept in the state directory
        stop_timeout = float(service["TimeoutStopSec"][-1])
        stopped_at = time.monotonic()
        os.killpg(process.process.pid, getattr(signal, service["KillSignal"][-1]))  # what systemctl stop does
        assert process.process.wait(stop_timeout) == 0
        assert time.monotonic() - stopped_at < stop_timeout
        assert "stopped" in "".join(process.output)
        assert process_group_gone(process.process.pid, timeout=5), "a child process outlived the service"
    finally:
        process.stop()
