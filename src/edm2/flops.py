"""Parameter and multiply-accumulate counts of a network (paper Tables 2-3).

Counting uses `torch.utils.flop_counter.FlopCounterMode` on the meta device,
so even img512-xxl is counted in seconds without allocating any weights.
Convolutions, matrix products and attention products come from PyTorch's own
formulas (FLOPs / 2 = MACs). Like the paper's counter, the total also adds
element-wise work (paper App. D.5): one operation per output element, three for
SiLU and softmax, one per input element for norms and pooling. Those
formulas are handed to the same FlopCounterMode through `custom_mapping`.
On the meta device attention decomposes into bmm + softmax, so both parts are
seen. The weight normalisation of MPConv is part of every forward pass and is
counted as well, as the paper's numbers do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .nn import Precond
from .presets import get_preset

__all__ = ["FlopReport", "count_module", "count_network", "format_report"]

aten = torch.ops.aten


def _per_output(cost: int):
    def formula(*args, out_shape=None, **kwargs) -> int:
        return 2 * cost * math.prod(out_shape)  # x2: FlopCounterMode sums FLOPs; we halve later
    return formula


def _per_input(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape)


def _elementwise_mapping() -> dict:
    # FlopCounterMode keys its formulas by operator packet (all overloads of an op).
    one = [aten.add, aten.sub, aten.mul, aten.div, aten.lerp, aten.clamp, aten.cos, aten.sqrt,
           aten.reciprocal, aten.pow, aten.log, aten.exp]
    three = [aten.silu, aten._softmax, aten._safe_softmax]
    mapping = {op: _per_output(1) for op in one}
    mapping.update({op: _per_output(3) for op in three})
    mapping.update({aten.linalg_vector_norm: _per_input, aten.avg_pool2d: _per_input})
    return mapping


@dataclass
class FlopReport:
    name: str
    params: int
    macs_matmul: int      # convolutions, matrix products, attention products
    ops_elementwise: int  # element-wise operations (weights above)
    input_shape: tuple

    @property
    def total(self) -> int:
        return self.macs_matmul + self.ops_elementwise


def count_module(net: torch.nn.Module, *inputs) -> tuple[int, int]:
    """(conv/matmul/attention MACs, element-wise ops) of one forward pass net(*inputs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as matmul:
        net(*inputs)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_elementwise_mapping()) as full:
        net(*inputs)
    macs = matmul.get_total_flops() // 2
    return macs, full.get_total_flops() // 2 - macs


def count_network(preset: str, resolution: int | None = None, channels: int | None = None,
                  label_dim: int = 1000) -> FlopReport:
    """Parameters and per-image MACs of a preset's Precond at batch 1, on the meta device."""
    p = get_preset(preset)
    kwargs = p.net_kwargs(label_dim)
    if resolution is not None:
        kwargs["img_resolution"] = resolution
    if channels is not None:
        kwargs["img_channels"] = channels
    with torch.device("meta"):
        net = Precond(**kwargs).eval()
        shape = (1, kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
        x = torch.zeros(shape)
        sigma = torch.ones(1)
        labels = torch.zeros(1, label_dim) if label_dim else None
    params = sum(t.numel() for t in net.parameters())
    macs, elementwise = count_module(net, x, sigma, labels)
    return FlopReport(p.name, params, macs, elementwise, shape)


def format_report(r: FlopReport) -> str:
    return "\n".join([
        f"preset          {r.name}   input {list(r.input_shape)}",
        f"parameters      {r.params:,}  ({r.params / 1e6:.2f} M)",
        f"conv/matmul     {r.macs_matmul / 1e9:.2f} G multiply-accumulates",
        f"element-wise    {r.ops_elementwise / 1e9:.2f} G operations",
        f"total           {r.total / 1e9:.2f} G  (the paper's 'Gflops' column)",
    ])
