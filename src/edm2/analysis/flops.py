"""Parameter and multiply-accumulate counts of a network (paper Tables 1-3).

Counting uses `torch.utils.flop_counter.FlopCounterMode` on the meta device,
so even img512-xxl is counted in seconds without allocating any weights.
Convolutions, matrix products and attention products come from PyTorch's own
formulas (FLOPs / 2 = MACs). Like the authors' counter, the total also adds
element-wise work, with the authors' weights: one operation per output
element (sums, products, quotients, powers, means, ...), two for lerp and
clamp, three for SiLU and softmax, four for group normalisation, one per
input element for vector norms and pooling. Those formulas are handed to the
same FlopCounterMode through `custom_mapping`. On the meta device attention
decomposes into bmm + softmax, so both parts are seen. Weight normalisation
runs in every forward pass and is counted as well.

A third term counts the conversions to 16-bit floats of a mixed-precision
forward pass (one per converted element: every weight used in FP16 and the
few activations cast around the embedding). The paper's Table 2 and 3
numbers are the total without it; its Table 1 (configs A-G) matches the
total with it, to the printed precision (docs/ablation.md, "Counting
parameters and flops").
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import build_network
from ..nn.adm import adm_net_kwargs
from ..presets import get_preset

__all__ = ["FlopReport", "count_module", "count_network", "format_report"]

aten = torch.ops.aten


def _per_output(cost: int):
    def formula(*args, out_shape=None, **kwargs) -> int:
        if out_shape and not isinstance(out_shape[0], int):  # several outputs (group norm): the first is the result
            out_shape = out_shape[0]
        return 2 * cost * math.prod(out_shape)  # x2: FlopCounterMode sums FLOPs; we halve later
    return formula


def _per_input(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape)


def _elementwise_mapping(casts: bool = False) -> dict:
    # FlopCounterMode keys its formulas by operator packet (all overloads of an op).
    one = [aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.cos, aten.sin, aten.sqrt, aten.rsqrt,
           aten.reciprocal, aten.pow, aten.log, aten.exp, aten.neg, aten.mean, aten.sum, aten.addcmul,
           aten.clamp_min]
    two = [aten.lerp, aten.clamp]
    three = [aten.silu, aten.sigmoid, aten._softmax, aten._safe_softmax]
    four = [aten.native_group_norm, aten.native_layer_norm]
    mapping = {op: _per_output(1) for op in one}
    mapping.update({op: _per_output(2) for op in two})
    mapping.update({op: _per_output(3) for op in three})
    mapping.update({op: _per_output(4) for op in four})
    mapping.update({aten.linalg_vector_norm: _per_input, aten.avg_pool2d: _per_input})
    if casts:
        mapping[aten._to_copy] = _per_output(1)
    return mapping


@dataclass
class FlopReport:
    name: str
    params: int
    macs_matmul: int      # convolutions, matrix products, attention products
    ops_elementwise: int  # element-wise operations, the authors' weights
    input_shape: tuple
    config: str = "G"
    ops_casts: int = 0    # conversions to 16-bit of a mixed-precision forward pass
    params_uncertainty: int = 0  # parameters of the u(sigma) MLP (discarded after training; not in `params`)

    @property
    def total(self) -> int:
        """The authors' count (paper Tables 2-3)."""
        return self.macs_matmul + self.ops_elementwise

    @property
    def total_mixed(self) -> int:
        """`total` plus the 16-bit conversions (paper Table 1)."""
        return self.total + self.ops_casts


@contextlib.contextmanager
def _as_on_gpu(net):
    """Let a network run its U-Net in float16, as on a GPU (the counter runs on the meta device)."""
    net.compute_dtype = lambda device, force_fp32=False: torch.float16
    try:
        yield
    finally:
        del net.compute_dtype


def count_module(net: torch.nn.Module, *inputs, reduced: bool = False) -> tuple[int, int, int]:
    """(conv/matmul/attention MACs, element-wise ops, dtype conversions) of one
    forward pass net(*inputs); with `reduced`, the U-Net runs in float16 as on
    a GPU (`net.compute_dtype` is overridden for the pass)."""
    mapping = _elementwise_mapping()
    mapping[aten._to_copy] = _per_output(1)
    with torch.no_grad(), (_as_on_gpu(net) if reduced else contextlib.nullcontext()), \
            FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        net(*inputs)
    counts = counter.get_flop_counts()["Global"]
    casts = counts.get(aten._to_copy, 0) // 2
    macs = sum(v for op, v in counts.items() if op not in mapping) // 2
    return macs, counter.get_total_flops() // 2 - macs - casts, casts


def count_network(preset: str, resolution: int | None = None, channels: int | None = None,
                  label_dim: int = 1000, config: str = "G") -> FlopReport:
    """Parameters and per-image operations of a preset's network (config A-G) at
    batch 1, on the meta device. Like the paper, `params` leaves out u(sigma)."""
    p = get_preset(preset, config)
    kwargs = p.net_kwargs(label_dim)
    if resolution is not None:
        kwargs["img_resolution"] = resolution
    if channels is not None:
        kwargs["img_channels"] = channels
    if config in ("A", "B"):  # as training builds it
        kwargs = adm_net_kwargs(kwargs)
    with torch.device("meta"):
        net = build_network(config, **kwargs).eval()
        shape = (1, kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
        x = torch.zeros(shape)
        sigma = torch.ones(1)
        labels = torch.zeros(1, label_dim) if label_dim else None
    u = sum(t.numel() for name, t in net.named_parameters() if name.startswith("logvar_"))
    params = sum(t.numel() for t in net.parameters()) - u
    macs, elementwise, casts = count_module(net, x, sigma, labels, reduced=True)
    return FlopReport(p.name, params, macs, elementwise, shape, config=config, ops_casts=casts, params_uncertainty=u)


def format_report(r: FlopReport) -> str:
    return "\n".join([
        f"preset          {r.name}   config {r.config}   input {list(r.input_shape)}",
        f"parameters      {r.params:,}  ({r.params / 1e6:.1f} M; plus {r.params_uncertainty:,} of u(sigma))",
        f"conv/matmul     {r.macs_matmul / 1e9:.2f} G multiply-accumulates",
        f"element-wise    {r.ops_elementwise / 1e9:.2f} G operations",
        f"total           {r.total / 1e9:.2f} G  (the authors' count, paper Tables 2-3)",
        f"fp16 casts      {r.ops_casts / 1e9:.2f} G conversions of a mixed-precision pass",
        f"total, mixed    {r.total_mixed / 1e9:.1f} G  (paper Table 1)",
    ])
