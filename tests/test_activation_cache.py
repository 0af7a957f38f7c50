"""Activations kept from a training Forward for its Backward: the gradients of recomputation, bounded, expiring, and
of no use to anyone but the client whose request made them."""

import time

import pytest
import torch

from peer.activation_cache import ActivationCache, request_digest
from peer.training import decode_job, run_backward, run_forward_keeping
from swarm import tensors
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.test_training import run_local_blocks

SPANS = {"full": "0:4"}


@pytest.fixture(scope="module")
def span(tiny_llama) -> BlockSpan:
    return BlockSpan.from_checkpoint(Checkpoint(tiny_llama), 0, 4, torch.float32)


def forward_request(seed: int, rows: int = 2, length: int = 6, hidden_size: int = 64, keep: bool = True) -> pb.ForwardRequest:
    hidden = torch.randn(rows, length, hidden_size, generator=torch.Generator().manual_seed(seed))
    return pb.ForwardRequest(start_block=0, end_block=4, hidden_states=tensors.encode(hidden), keep_activations=keep)


def job_of(request: pb.ForwardRequest, span: BlockSpan):
    job = decode_job(request, span, torch.float32, {})
    job.digest = request_digest(request)
    return job


def gradient(response: pb.BackwardResponse) -> torch.Tensor:
    return tensors.decode(response.grad_hidden_states)


def test_kept_activations_give_the_gradients_of_recomputation_once(span):
    cache = ActivationCache()
    request = forward_request(seed=1)
    job = job_of(request, span)
    grad = torch.randn(2, 6, span.config.hidden_size)
    ((output, name),) = run_forward_keeping(cache, span, [job])
    assert name and len(cache) == 1 and cache.bytes_used > output.nbytes
    assert cache.bytes_used < sum(parameter.nbytes for parameter in span.parameters())  # weights are shared, not kept
    kept = cache.take(name, request_digest(request))
    assert kept is not None and cache.take(name, request_digest(request)) is None and cache.bytes_used == 0  # used up
    (from_kept,) = run_backward(span, [(job, grad, kept)])
    (recomputed,) = run_backward(span, [(job, grad, None)])
    assert torch.equal(gradient(from_kept), gradient(recomputed))


def test_a_name_with_other_inputs_finds_nothing_and_leaves_the_entry_to_its_client(span):
    cache = ActivationCache()
    mine, theirs = forward_request(seed=1), forward_request(seed=2)
    ((_, name),) = run_forward_keeping(cache, span, [job_of(mine, span)])
    assert cache.take(name, request_digest(theirs)) is None  # their tensors, my entry's name
    assert cache.take(b"\0" * 16, request_digest(mine)) is None  # a guessed name
    assert cache.take(name, request_digest(mine)) is not None


def test_a_flood_of_forwards_without_backwards_stays_within_the_budget(span):
    probe = ActivationCache()
    run_forward_keeping(probe, span, [job_of(forward_request(seed=0), span)])
    entry_bytes = probe.bytes_used
    cache = ActivationCache(budget_bytes=3 * entry_bytes + entry_bytes // 2)
    names = [run_forward_keeping(cache, span, [job_of(forward_request(seed=seed), span)])[0][1] for seed in range(20)]
    assert len(cache) == 3 and cache.bytes_used <= cache.budget_bytes
    assert cache.take(names[0], request_digest(forward_request(seed=0))) is None  # the oldest went first
    assert cache.take(names[-1], request_digest(forward_request(seed=19))) is not None
    too_small = ActivationCache(budget_bytes=entry_bytes // 2)
    assert run_forward_keeping(too_small, span, [job_of(forward_request(seed=0), span)])[0][1] == b""
    assert len(too_small) == 0


def test_kept_activations_expire(span):
    cache = ActivationCache(ttl=0.05)
    request = forward_request(seed=3)
    ((_, name),) = run_forward_keeping(cache, span, [job_of(request, span)])
    time.sleep(0.1)
    assert cache.take(name, request_digest(request)) is None and cache.bytes_used == 0


def test_a_peer_keeps_a_forward_for_its_backward_and_recomputes_without_it(peers, connect, reference):
    """Over gRPC: the Forward's answer names its activations; the Backward with that name, with a stolen name and
    other inputs, and with the name used up, all give local autograd's gradients of their own inputs."""
    stub = pb_grpc.SwarmPeerStub(connect(peers["full"]))
    hidden_size = reference.config.hidden_size
    mine, theirs = forward_request(seed=5, hidden_size=hidden_size), forward_request(seed=6, hidden_size=hidden_size)
    answer = stub.Forward(mine, timeout=30)
    assert len(answer.activations) == 16
    grad = torch.randn(2, 6, hidden_size, generator=torch.Generator().manual_seed(7))

    def local_gradient(request: pb.ForwardRequest) -> torch.Tensor:
        hidden = tensors.decode(request.hidden_states).requires_grad_(True)
        (run_local_blocks(reference, hidden) * grad).sum().backward()
        return hidden.grad

    backward = lambda inputs: pb.BackwardRequest(  # noqa: E731
        inputs=inputs, grad_outputs=tensors.encode(grad), activations=answer.activations
    )
    stolen = gradient(stub.Backward(backward(theirs), timeout=30))
    torch.testing.assert_close(stolen, local_gradient(theirs), rtol=0, atol=1e-4)
    kept = gradient(stub.Backward(backward(mine), timeout=30))
    again = gradient(stub.Backward(backward(mine), timeout=30))  # used up: recomputed
    torch.testing.assert_close(kept, local_gradient(mine), rtol=0, atol=1e-4)
    assert torch.equal(kept, again)
    assert not stub.Forward(forward_request(seed=5, hidden_size=hidden_size, keep=False), timeout=30).activations
