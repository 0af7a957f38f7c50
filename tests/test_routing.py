"""Routing with real peers: inference avoids a slow replica; forward/backward spreads over replicas."""

import signal
import time
from collections import Counter

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from swarm.errors import SwarmError


@pytest.fixture(scope="module")
def replicas(tiny_llama, bootstrap):
    (slow,) = start_peers(tiny_llama, bootstrap, ["0:4"], module="tests.slow_peer")
    (fast,) = start_peers(tiny_llama, bootstrap, ["0:4"])
    yield slow, fast
    for peer in (slow, fast):
        peer.process.stop()


@pytest.fixture(scope="module")
def model(tiny_llama, bootstrap, replicas):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=tuple(peer.peer_id for peer in replicas)
    )
    yield model
    model.close()


def test_inference_picks_the_fast_replica(model, replicas):
    slow, fast = replicas
    assert model.remote.view.round_trip(next(s for s in model.remote.view.peer_spans() if s.peer_id == slow.peer_id)) > 0.04
    input_ids = torch.tensor([[1, 72, 105]])
    with model.inference_session(max_length=32) as session:
        started = time.perf_counter()
        model.generate(input_ids, max_new_tokens=16, do_sample=False)
        elapsed = time.perf_counter() - started
        assert [hop.peer.peer_id for hop in session.route] == [fast.peer_id]
    assert elapsed < 16 * 0.05  # had it gone through the slow peer, every token would have cost 50 ms more


def test_forward_backward_spreads_over_replicas(model, replicas):
    used = Counter()
    model.remote.view._rng.seed(0)
    calls = model.remote.call
    model.remote.call = lambda hop, *args: used.update([hop.peer.peer_id]) or calls(hop, *args)
    try:
        for _ in range(30):
            hidden = torch.randn(1, 4, 64, requires_grad=True)
            model.remote(hidden).sum().backward()
    finally:
        del model.remote.call
    assert set(used) == {peer.peer_id for peer in replicas}
    assert min(used.values()) >= 4  # 30 draws weighted by announced throughput (similar for the two)


def test_a_peer_that_boasts_of_its_speed_is_routed_by_what_it_does(tiny_llama, bootstrap, replicas, monkeypatch):
    """It announces a million tokens/s and answers pings at once, so a new client's first session goes to it; its
    steps are slow, which the client measures: its next session goes to the replica that is really faster."""
    monkeypatch.setenv("SWARM_TEST_BOAST", "1e6")
    (boaster,) = start_peers(tiny_llama, bootstrap, ["0:4"], module="tests.slow_peer")
    fast = replicas[1]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(boaster.peer_id, fast.peer_id)
    )
    try:
        view = model.remote.view
        for span in view.peer_spans():  # equal round trips: the announced speed decides the first route
            view._rtts[span.peer_id] = (1e-3, time.monotonic())
        routes = []
        for _ in range(2):
            with model.inference_session(max_length=32) as session:
                model.generate(torch.tensor([[1, 72, 105]]), max_new_tokens=6, do_sample=False)
                routes.append([hop.peer.peer_id for hop in session.route])
        assert routes == [[boaster.peer_id], [fast.peer_id]]
    finally:
        model.close()
        boaster.process.stop()


def test_hung_peer_times_out_and_is_replaced(tiny_llama, bootstrap, replicas, reference, monkeypatch):
    monkeypatch.setenv("SWARM_TEST_PEER_DELAY", "5")
    (hung,) = start_peers(tiny_llama, bootstrap, ["0:4"], module="tests.slow_peer")
    fast = replicas[1]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(hung.peer_id, fast.peer_id), request_timeout=1.0
    )
    try:
        view = model.remote.view
        for span in view.peer_spans():  # pretend the hung peer answered its ping at once, so the router picks it
            view._rtts[span.peer_id] = (0.0 if span.peer_id == hung.peer_id else 0.5, time.monotonic())
        assert [hop.peer.peer_id for hop in view.chain()] == [hung.peer_id]
        input_ids = torch.tensor([[1, 72, 105, 33]])
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
            assert [hop.peer.peer_id for hop in session.route] == [fast.peer_id]
        assert view.is_banned(hung.peer_id)
        assert torch.equal(output, reference.generate(input_ids, max_new_tokens=8, do_sample=False))
    finally:
        model.close()
        hung.process.stop()


def test_a_peer_restarted_with_its_identity_is_not_held_to_its_old_failure(tiny_llama, bootstrap, reference, tmp_path):
    """A peer that died is banned by the client; restarted with the same key file it has the same identity, but
    its new run (later start time in its record) is a new peer: the client uses it again at once."""
    key = str(tmp_path / "peer.key")
    (peer,) = start_peers(tiny_llama, bootstrap, ["0:4"], "--identity-path", key)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(peer.peer_id,), refresh_period=0.5, max_retries=1,
    )
    try:
        input_ids = torch.tensor([[1, 72, 105, 33]])
        expected = reference.generate(input_ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=6, do_sample=False), expected)
        peer.process.stop(signal.SIGKILL)
        with pytest.raises(SwarmError):
            model.generate(input_ids, max_new_tokens=6, do_sample=False)
        assert model.remote.view.is_banned(peer.peer_id)

        (restarted,) = start_peers(tiny_llama, bootstrap, ["0:4"], "--identity-path", key)
        try:
            assert restarted.peer_id == peer.peer_id
            deadline = time.monotonic() + 30
            while model.remote.view.is_banned(peer.peer_id):  # until the view has read the new run's record
                assert time.monotonic() < deadline, "the restarted peer stayed banned"
                time.sleep(0.2)
            assert torch.equal(model.generate(input_ids, max_new_tokens=6, do_sample=False), expected)
        finally:
            restarted.process.stop()
    finally:
        model.close()
