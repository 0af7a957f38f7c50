"""A user's mistake at start-up ends the command quickly with one line that names it: no traceback, no hang."""

import socket
import subprocess
import sys
import time

import pytest

from client import AutoDistributedModelForCausalLM, DistributedBloomForCausalLM, DistributedLlamaForCausalLM
from swarm.dht_node import InitialPeersError
from swarm.errors import UnsupportedModelError

NOWHERE = "/ip4/127.0.0.1/tcp/{port}/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ"  # a valid id, no node
BOUND = 60.0  # seconds: imports take several on a busy 2-core machine; a hang would take forever


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_start_up_mistakes_get_one_line(tiny_llama):
    nowhere = NOWHERE.format(port=closed_port())
    cases = {  # command -> what its one line must say
        ("serve", tiny_llama, "--blocks", "0:2", "--initial-peers", "hello"): "initial peer 'hello' is not a DHT node's multiaddr",
        ("serve", tiny_llama, "--blocks", "0:2", "--initial-peers", nowhere): f"none of the initial peers answered ({nowhere})",
        ("serve", tiny_llama, "--blocks", "0:2"): "give --initial-peers MULTIADDR",
        ("status", "--initial-peers", nowhere): "none of the initial peers answered",
        ("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1"): "is not a DHT node's multiaddr",
        ("api", tiny_llama): "give --initial-peers MULTIADDR",
        ("api", tiny_llama, "--initial-peers", "hello", "--port", "0"): "initial peer 'hello' is not a DHT node's multiaddr",
        ("api", tiny_llama, "--initial-peers", nowhere, "--port", "0"): "none of the initial peers answered",
    }
    started = time.monotonic()
    processes = {
        args: subprocess.Popen([sys.executable, "-m", "peer.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for args in cases
    }
    try:
        for args, expected in cases.items():
            output, _ = processes[args].communicate(timeout=BOUND)
            lines = [line for line in output.splitlines() if line.strip() and "Usage:" not in line and "Try '" not in line]
            assert processes[args].returncode != 0, output
            assert len(lines) == 1 and expected in lines[0] and "Traceback" not in output, output
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    assert time.monotonic() - started < BOUND


@pytest.mark.parametrize("command", [["monitor"], ["api", "MODEL"]])
def test_a_server_on_a_busy_port_says_so(bootstrap, tiny_llama, command):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [tiny_llama if arg == "MODEL" else arg for arg in command]
        result = subprocess.run(
            [sys.executable, "-m", "peer.cli", *args, "--initial-peers", bootstrap, "--port", str(port)],
            capture_output=True, text=True, timeout=BOUND,
        )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"at 127.0.0.1:{port}: Address already in use; choose another --port" in result.stderr, result.stderr


def test_client_initial_peers_mistakes(tiny_llama):
    with pytest.raises(InitialPeersError, match="initial_peers is empty"):
        AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[])
    with pytest.raises(InitialPeersError, match="'hello' is not a DHT node's multiaddr"):
        AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=["hello"])


def test_petals_class_names(tiny_llama, bootstrap):
    model = DistributedLlamaForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], tuning_mode="ptune", pre_seq_len=3)
    try:
        assert model.prompt_tuning.num_prefix_tokens == 3  # Petals' name for num_prefix_tokens
    finally:
        model.close()
    with pytest.raises(UnsupportedModelError, match="holds a 'llama' model, not 'bloom'"):
        DistributedBloomForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap])
