"""`python -m tests.liar_peer serve ...`: the real peer CLI answering wrong (a test fixture for verification).

$SWARM_TEST_LIE says how: "noise:SCALE" (every answer, each token off by SCALE of its size: 0.01 is "wrong by a
little"), "sometimes:N" (each answer wrong by a lot with probability 1/N), "after:N" (honest for its first N
inference steps, then wrong by a lot): inference steps, Forward and Backward answers alike; or "push" (answers
the client right, but pushes the next peer of a chain wrong values, by a lot). A peer serving other
weights under the real model prefix needs no wrapper: see tests/test_verification.py. The lies are told here,
around the real code, so that production code carries no test hooks.
"""

import os
import random

import torch

from peer import handler, sessions
from peer.cli import main
from swarm import tensors

KIND, _, AMOUNT = os.environ.get("SWARM_TEST_LIE", "noise:0.01").partition(":")
_coin = random.Random(int(os.environ.get("SWARM_TEST_LIE_SEED", "0")))
_steps = 0  # inference steps answered so far


def _lie(tensor: torch.Tensor, counts_as_step: bool = False) -> torch.Tensor:
    global _steps
    _steps += counts_as_step
    if KIND == "noise":
        scale = float(AMOUNT)
    elif KIND == "sometimes":
        scale = 1.0 if _coin.random() < 1 / float(AMOUNT) else 0.0
    elif KIND == "push":
        scale = 1.0
    elif KIND == "after":
        scale = 1.0 if _steps > int(AMOUNT) else 0.0
    else:
        raise SystemExit(f"unknown SWARM_TEST_LIE kind {KIND!r}")
    if scale == 0.0:
        return tensor
    size = tensor.float().norm(dim=-1, keepdim=True) / tensor.shape[-1] ** 0.5
    return (tensor.float() + scale * size * torch.randn(tensor.shape)).to(tensor.dtype)


def _lying_backward(span, items, _honest=handler.run_backward):
    responses = _honest(span, items)
    for response in responses:
        grad = tensors.decode(response.grad_hidden_states)
        response.grad_hidden_states.CopyFrom(tensors.encode(_lie(grad)))
    return responses


if KIND == "push":
    _honest_next_hop_step = handler._next_hop_step
    handler._next_hop_step = lambda step, output: _honest_next_hop_step(step, tensors.encode(_lie(tensors.decode(output))))
else:
    _honest_output = sessions.StepWork.output
    sessions.StepWork.output = lambda self: _lie(_honest_output(self), counts_as_step=True)
    _honest_forward = handler.run_forward
    handler.run_forward = lambda span, jobs: [_lie(output) for output in _honest_forward(span, jobs)]
    handler.run_backward = _lying_backward

if __name__ == "__main__":
    main()
