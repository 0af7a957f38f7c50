"""What a collaborating member refuses from the others (client/collaboration/checks.py), and what it refuses of its
own (NaN gradients, a run that trains other parameters), with real hivemind reducers and a real DHT."""

import asyncio

import pytest
import torch

from client.collaboration import CollaborationError, CollaborativeOptimizer
from client.collaboration.checks import CheckedTensorPartReducer, RefusedContribution, _state_refusal


def reduce_parts(parts: list[tuple[torch.Tensor, float]], shape: torch.Size) -> tuple[torch.Tensor, list[str]]:
    """One part reduced from several senders, as an all-reduce round does; returns the average and the refusals."""

    async def run() -> tuple[torch.Tensor, list[str]]:
        reducer = CheckedTensorPartReducer([shape], num_senders=len(parts))
        refusals: list[str] = []

        async def send(index: int, tensor: torch.Tensor, weight: float):
            try:
                return await reducer.accumulate_part(index, 0, tensor, weight)
            except RefusedContribution as refused:
                refusals.append(str(refused))
                reducer.on_sender_failed(index)  # what AllReduceRunner does with a sender whose part failed

        results = await asyncio.wait_for(asyncio.gather(*(send(i, t, w) for i, (t, w) in enumerate(parts))), 10)
        return next(result for result in results if result is not None), refusals

    return asyncio.run(run())


@pytest.mark.parametrize("bad, why", [
    ((torch.tensor([float("nan"), 0.0, 0.0]), 1.0), "NaN or infinite"),
    ((torch.tensor([float("inf"), 0.0, 0.0]), 1.0), "NaN or infinite"),
    ((torch.tensor([1e9]), 1.0), "shape [1]"),  # would broadcast into every element
    ((torch.ones(4), 1.0), "shape [4]"),
    ((torch.ones(3), float("nan")), "averaging weight nan"),
    ((torch.ones(3), -5.0), "averaging weight -5.0"),
    ((torch.ones(3), float("inf")), "averaging weight inf"),
])
def test_a_bad_part_is_refused_and_the_others_are_averaged_without_it(bad, why):
    honest = [(torch.tensor([1.0, 2.0, 3.0]), 2.0), (torch.tensor([3.0, 2.0, 1.0]), 2.0)]
    average, refusals = reduce_parts([honest[0], bad, honest[1]], torch.Size([3]))
    assert torch.equal(average, torch.tensor([2.0, 2.0, 2.0]))
    assert len(refusals) == 1 and why in refusals[0]


def test_honest_parts_are_averaged_by_their_weights():
    average, refusals = reduce_parts([(torch.ones(2), 1.0), (torch.full((2,), 4.0), 2.0)], torch.Size([2]))
    assert torch.equal(average, torch.full((2,), 3.0)) and refusals == []


def test_a_downloaded_state_must_match_the_local_one_tensor_for_tensor():
    ours = [torch.zeros(2, 3), torch.zeros(4)]
    assert _state_refusal([torch.ones(2, 3), torch.ones(4)], ours) is None
    assert "1 tensors where 2" in _state_refusal([torch.ones(2, 3)], ours)
    assert "tensor #1: shape [5]" in _state_refusal([torch.ones(2, 3), torch.ones(5)], ours)
    assert "tensor #0: dtype torch.float16" in _state_refusal([torch.ones(2, 3, dtype=torch.float16), torch.ones(4)], ours)
    assert "tensor #1: NaN" in _state_refusal([torch.ones(2, 3), torch.tensor([0.0, float("nan"), 0.0, 0.0])], ours)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_own_nan_gradients_are_left_out_and_change_nothing(bootstrap):
    parameter = torch.nn.Parameter(torch.ones(3))
    with CollaborativeOptimizer([parameter], run_id="nan-check", target_batch_size=4, batch_size_per_step=2,
                                optimizer=sgd, initial_peers=[bootstrap]) as optimizer:
        parameter.grad = torch.tensor([1.0, float("nan"), 0.0])
        assert optimizer.step() is False
        assert parameter.grad is None and optimizer._optimizer.grad_averager.local_samples_accumulated == 0
        parameter.grad = torch.ones(3)
        assert optimizer.step() is True
        assert optimizer._optimizer.grad_averager.local_samples_accumulated == 2
        assert torch.equal(parameter.data, torch.ones(3))  # no step before the target batch size


def test_a_member_training_other_parameters_is_told_before_it_joins(bootstrap):
    with CollaborativeOptimizer([torch.nn.Parameter(torch.ones(3))], run_id="schema-check", target_batch_size=4,
                                batch_size_per_step=2, optimizer=sgd, initial_peers=[bootstrap]):
        with pytest.raises(CollaborationError, match="run 'schema-check' trains other parameters"):
            CollaborativeOptimizer([torch.nn.Parameter(torch.ones(5))], run_id="schema-check", target_batch_size=4,
                                   batch_size_per_step=2, optimizer=sgd, initial_peers=[bootstrap])


@pytest.mark.parametrize("options, message", [
    (dict(run_id="has space"), "run_id must be"),
    (dict(batch_size_per_step=0), r"batch_size_per_step must be in 1..target_batch_size \(4\)"),
    (dict(batch_size_per_step=5), r"batch_size_per_step must be in 1..target_batch_size \(4\)"),
])
def test_bad_options_are_clear_errors(bootstrap, options, message):
    settings = dict(run_id="ok", target_batch_size=4, batch_size_per_step=2, optimizer=sgd, initial_peers=[bootstrap])
    with pytest.raises(CollaborationError, match=message):
        CollaborativeOptimizer([torch.nn.Parameter(torch.ones(3))], **{**settings, **options})


def test_nothing_to_train_is_a_clear_error(bootstrap):
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(CollaborationError, match="nothing to train"):
        CollaborativeOptimizer(frozen, run_id="frozen", target_batch_size=4, batch_size_per_step=2, optimizer=sgd,
                               initial_peers=[bootstrap])
