"""The column layout of a linear layer computes what `F.linear` does, for any number of rows, and follows its switch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peer.linear_layout import SwitchableLinear, column_linear, layout_switch
from peer.threads import ThreadPlan


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (2, 5, 48), (1, 1, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_column_layout_is_f_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(*shape, generator=generator)
    weight, bias = torch.randn(80, 48, generator=generator), torch.randn(80, generator=generator) if with_bias else None
    output = column_linear(inputs, weight, bias)
    assert output.shape == (*shape[:-1], 80) and output.is_contiguous()
    torch.testing.assert_close(output, F.linear(inputs, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_span_follows_its_switch_and_keeps_its_quantized_layers():
    class Quantized(nn.Linear):  # stands for bitsandbytes' layers, which subclass nn.Linear
        pass

    class QuantizedTensor(torch.Tensor):  # stands for torchao's weights (an nn.Linear holding Int8Tensor)
        pass

    span = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Quantized(32, 16), nn.Linear(16, 16))
    span[3].weight = nn.Parameter(span[3].weight.detach().as_subclass(QuantizedTensor))
    inputs = torch.randn(1, 3, 16)
    expected = span(inputs)
    switch = layout_switch(span)
    assert layout_switch(span) is switch and switch.linears == 1
    assert type(span[0]) is SwitchableLinear and type(span[2]) is Quantized and type(span[3]) is nn.Linear
    assert list(span.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    switch.columns = True
    torch.testing.assert_close(span(inputs), expected, rtol=1e-5, atol=1e-5)


def test_a_pass_takes_the_layout_of_the_largest_measured_size_not_above_it():
    plan = ThreadPlan(2, 1, column_sizes=frozenset({2, 4}), measured_sizes=(1, 2, 4, 8))
    assert [plan.columns_for(rows) for rows in (1, 2, 3, 4, 7, 8, 9, 300)] == [False, True, True, True, True, False, False, False]
    assert not ThreadPlan(2).columns_for(2)
    assert plan.describe() == "2 threads, W @ x^T at 2/4 rows"
