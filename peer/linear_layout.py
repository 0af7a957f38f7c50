"""Two layouts of a linear layer's product, chosen per pass size by measurement (peer/calibration.py).

torch computes `F.linear(x, W)` as x @ W^T. With few rows (decode steps of a few sessions, short drafts) the BLAS
behind it may stay far below the machine's memory bandwidth, and the same product laid out as W @ x^T may not: on
the 2-vCPU AMD EPYC VM of 2026-12-04 (MKL), the benchmark model's 4-block span took 23.0 ms for a pass of 2 rows on
2 threads as x @ W^T and 10.8 ms as W @ x^T (16 rows: 35.0 vs 22.7 ms; 128 rows and more: the same). Which layout
is faster depends on the BLAS, the CPU, the shapes and the threads, so a peer times both and keeps the faster.
The two differ only in the order of the additions (like a different batch size).
"""

import torch
import torch.nn.functional as F
from torch import nn


class LayoutSwitch:
    """The layout every switchable linear of one span computes in; the compute thread sets it before each pass."""

    def __init__(self) -> None:
        self.columns = False  # W @ x^T instead of x @ W^T
        self.linears = 0  # how many linears follow it (none: a quantized span, nothing to choose)


class SwitchableLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) that computes as its span's switch says."""

    layout: LayoutSwitch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.layout.columns:
            return column_linear(inputs, self.weight, self.bias)
        return F.linear(inputs, self.weight, self.bias)


def column_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(inputs, weight, bias)` computed as weight @ inputs^T."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    count = rows.shape[0]
    if count == 1:  # one column would take the BLAS's matrix-vector path, the slow one being avoided: pad to two
        rows = rows.expand(2, -1).contiguous()  # (a stride-0 operand is slower still)
    output = (weight @ rows.t())[:, :count].t().contiguous()
    if bias is not None:
        output = output + bias
    return output.view(*inputs.shape[:-1], weight.shape[0])


def layout_switch(span: nn.Module) -> LayoutSwitch:
    """The span's switch; the first call makes every plain `nn.Linear` of the span follow it (quantized layers, whether
    their own class or an `nn.Linear` holding a quantized tensor subclass, are left as they are). Call after the span
    is loaded and quantized."""
    switch = getattr(span, "linear_layout", None)
    if switch is None:
        switch = LayoutSwitch()
        for module in span.modules():
            if type(module) is nn.Linear and type(module.weight) is nn.Parameter:
                module.__class__ = SwitchableLinear
                module.layout = switch
                switch.linears += 1
        span.linear_layout = switch
    return switch
