"""Swarm across machines: hosts are network namespaces on one bridge, a home network sits behind a NAT router, and
every process runs with default options (no --host). Each result is checked against local transformers."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.local_swarm import PeerHandle, SwarmProcess, spawn_cli, start_bootstrap
from swarm import tensors
from tests.netbed import NetBed, available, read_line, start_forwarder, stop_forwarder
from tests.test_training import run_local_blocks

REASON = available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"no network test bed here: {REASON}")]
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = 120
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def bed():
    with NetBed(public=["boot", "a", "b", "c", "client"], home=["nat_peer", "nat_client", "nat_volunteer"]) as bed:
        yield bed


class Swarm:
    """The processes of one bed; every one is stopped by `stop`."""

    def __init__(self, bed: NetBed, model: str):
        self.bed, self.model = bed, model
        self.processes: list[SwarmProcess] = []
        self.forwarders: list[subprocess.Popen] = []
        node, self.initial_peer = start_bootstrap(launcher=bed["boot"].command)
        self.processes.append(node)

    def serve(self, host: str, blocks: str, *extra: str) -> PeerHandle:
        process = spawn_cli(
            "serve", self.model, "--initial-peers", self.initial_peer, "--blocks", blocks,
            "--announce-period", "5", "--num-threads", "1", *extra, launcher=self.bed[host].command,
        )
        self.processes.append(process)
        return PeerHandle.from_online_line(process)

    def client(self, host: str, *args: str, stdin=None) -> subprocess.Popen:
        return self.bed[host].popen(
            [sys.executable, "-m", "tests.netbed.swarm_client", self.model, "--initial-peers", self.initial_peer, *args],
            cwd=REPO_ROOT, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def run_client(self, host: str, *args: str) -> dict:
        process = self.client(host, *args)
        try:
            out, err = process.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        assert process.returncode == 0, err.decode()[-3000:]
        return json.loads(out.decode().strip().splitlines()[-1])

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        for forwarder in self.forwarders:
            stop_forwarder(forwarder)


@pytest.fixture(scope="module")
def swarm(bed, tiny_llama):
    swarm = Swarm(bed, tiny_llama)
    try:
        swarm.a = swarm.serve("a", "0:2")
        swarm.b = swarm.serve("b", "2:4")
        yield swarm
    finally:
        swarm.stop()


def local_tokens(reference, new_tokens: int = 8, seed: int | None = None) -> list[int]:
    options = dict(max_new_tokens=new_tokens, do_sample=seed is not None)
    if seed is not None:
        torch.manual_seed(seed)
        options.update(top_k=20, temperature=0.9)
    return reference.generate(torch.tensor([PROMPT]), **options)[0].tolist()


def test_peers_with_default_options_announce_addresses_others_can_dial(swarm, bed):
    for handle, host in ((swarm.a, "a"), (swarm.b, "b")):
        assert handle.reachability == "direct"
        assert handle.address.split(":")[0] == bed[host].ip
    assert swarm.initial_peer.startswith(f"/ip4/{bed['boot'].ip}/")
    for process in swarm.processes:
        assert "were not stored" not in "".join(process.output)


def test_a_client_on_another_host_generates_locals_tokens(swarm, reference):
    allowed = ["--allowed", swarm.a.peer_id, "--allowed", swarm.b.peer_id]
    assert swarm.run_client("client", *allowed)["tokens"] == local_tokens(reference)
    assert swarm.run_client("client", *allowed, "--seed", "3")["tokens"] == local_tokens(reference, seed=3)


def test_a_client_behind_nat_generates(swarm, reference):
    allowed = ["--allowed", swarm.a.peer_id, "--allowed", swarm.b.peer_id]
    assert swarm.run_client("nat_client", *allowed)["tokens"] == local_tokens(reference)


@pytest.fixture(scope="module")
def nat_peer(swarm):
    return swarm.serve("nat_peer", "0:4")


def test_a_peer_behind_nat_serves_through_a_relay(swarm, nat_peer, reference, tmp_path):
    assert nat_peer.reachability == "relayed"
    only_it = ["--allowed", nat_peer.peer_id]
    assert swarm.run_client("client", *only_it)["tokens"] == local_tokens(reference)
    assert swarm.run_client("nat_client", *only_it, "--seed", "5")["tokens"] == local_tokens(reference, seed=5)

    out = tmp_path / "train.pt"
    swarm.run_client("client", *only_it, "--train", str(out))
    got = torch.load(out)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, reference.config.hidden_size, generator=generator).requires_grad_()
    local = run_local_blocks(reference, hidden)
    (local * torch.randn(local.shape, generator=generator)).sum().backward()
    assert torch.allclose(got["output"], local, atol=1e-4, rtol=0)
    assert torch.allclose(got["grad"], hidden.grad, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def replica(swarm):
    return swarm.serve("c", "0:4")


def test_steps_are_pushed_to_a_peer_behind_nat_through_its_relay(swarm, reference):
    second_half = swarm.serve("nat_client", "2:4")  # a second home machine, serving the chain's end
    assert second_half.reachability == "relayed"
    result = swarm.run_client("client", "--allowed", swarm.a.peer_id, "--allowed", second_half.peer_id)
    assert result["tokens"] == local_tokens(reference)
    assert result["route"] == [swarm.a.peer_id, second_half.peer_id]
    assert result["pushed_steps"] == 8  # every step went from peer a to the relayed peer directly (prefill + 7)
    second_half.process.stop()


def test_status_shows_which_peers_are_direct_and_which_relayed(swarm, nat_peer):
    status = swarm.bed["client"].run(
        [sys.executable, "-m", "peer.cli", "status", "--initial-peers", swarm.initial_peer, "--json"], timeout=60,
    )
    (model,) = json.loads(status.stdout)["models"]
    reached = {peer["peer_id"]: (peer["reachability"], peer["relay"]) for peer in model["peers"]}
    assert reached[swarm.a.peer_id] == ("direct", "")
    assert reached[nat_peer.peer_id][0] == "relayed" and reached[nat_peer.peer_id][1] == nat_peer.address


def test_a_relayed_peer_killed_mid_generation_is_replaced_with_locals_tokens(swarm, nat_peer, replica, reference):
    allowed = ["--allowed", nat_peer.peer_id, "--allowed", replica.peer_id]
    client = swarm.client("client", *allowed, "--prefer", nat_peer.peer_id, "--pause-after", "3", "--new-tokens", "10",
                          stdin=subprocess.PIPE)
    try:
        assert read_line(client, CLIENT_TIMEOUT).strip() == "paused"
        nat_peer.process.stop(signal.SIGKILL)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=CLIENT_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err.decode()[-3000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["tokens"] == local_tokens(reference, new_tokens=10)


def test_a_volunteer_behind_nat_joins_and_is_used(swarm, reference, tiny_llama):
    process = spawn_cli(
        "join", tiny_llama, "--initial-peers", swarm.initial_peer,
        "--announce-period", "5", "--num-threads", "1", module="peer.volunteer", launcher=swarm.bed["nat_volunteer"].command,
    )
    swarm.processes.append(process)
    volunteer = PeerHandle.from_online_line(process)
    assert volunteer.reachability == "relayed"
    assert swarm.run_client("client", "--allowed", volunteer.peer_id)["tokens"] == local_tokens(reference)


def serve_behind_forwarder(swarm, host: str, port: int, **forwarder) -> tuple[PeerHandle, subprocess.Popen]:
    """A peer on `host` whose data plane everyone reaches through a forwarder on the same host (port + 1)."""
    process, address = start_forwarder(swarm.bed[host], f"127.0.0.1:{port}", listen_port=port + 1, **forwarder)
    swarm.forwarders.append(process)
    handle = swarm.serve(host, "0:4", "--port", str(port), "--announce-host", swarm.bed[host].ip,
                         "--announce-port", str(port + 1))
    assert handle.address == address
    return handle, process


def test_bytes_flipped_on_the_path_fail_the_hop_and_it_is_replaced(swarm, replica, reference):
    tampered, _ = serve_behind_forwarder(swarm, "a", 41000, flip_after=2500)
    client = swarm.client("client", "--allowed", tampered.peer_id, "--allowed", replica.peer_id, "--prefer", tampered.peer_id)
    out, err = client.communicate(timeout=CLIENT_TIMEOUT)
    assert client.returncode == 0, err.decode()[-3000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["tokens"] == local_tokens(reference)
    assert f"peer {tampered.peer_id} failed" in err.decode()  # it was tried, failed, and the replica took over


def test_nothing_of_the_hidden_states_is_readable_on_the_wire(swarm, reference, tmp_path):
    capture = tmp_path / "wire.bin"
    watched, _ = serve_behind_forwarder(swarm, "b", 42000, capture=str(capture))
    assert swarm.run_client("client", "--allowed", watched.peer_id)["tokens"] == local_tokens(reference)
    embeddings = reference.model.embed_tokens(torch.tensor([PROMPT])).detach()
    first_output = run_local_blocks(reference, embeddings).detach()
    wire = capture.read_bytes()
    raws = [tensors.encode(known).data for known in (embeddings, first_output)]
    assert len(wire) > sum(map(len, raws))  # the session's traffic (at least these tensors) went through the forwarder
    for raw in raws:
        needles = [raw[offset : offset + 16] for offset in range(0, len(raw) - 16, 64)]
        assert all(needle in raw for needle in needles)  # what a plaintext wire would show
        assert not any(needle in wire for needle in needles)
