"""Power-function EMA tracked during training (paper Sec. 3.1 Eq. 2, App. C.4 Eq. 127).

For every relative width sigma_rel the tracker keeps an fp32 copy of the
network. After the optimizer step that brings the image count to t with a
batch of dt images:

    ema <- beta * ema + (1 - beta) * theta,   beta = (1 - dt / t)^(gamma + 1)

with gamma = std_to_exp(sigma_rel). t counts images, not steps, so the first
update (t == dt) has beta = 0 and copies the network. Unrolled, the tracked
average is exactly the power-function average of the piecewise-constant
trajectory theta(tau) = theta_k on (t_{k-1}, t_k]:

    ema(t_K) = sum_k theta_k (t_k^(gamma+1) - t_{k-1}^(gamma+1)) / t_K^(gamma+1).

Buffers (the Fourier features) are copied from the live network, not averaged.
"""
from __future__ import annotations

import copy

import torch

from .phema import power_function_beta, std_to_exp

__all__ = ["PowerFunctionEMA"]


class PowerFunctionEMA:
    """EMA profiles of a network, one per sigma_rel in `stds`.

    `update(net, cur_nimg, batch_size)` after every optimizer step;
    `nets` maps sigma_rel -> the averaged network (eval mode, no gradients);
    `state_dict()` / `load_state_dict()` for checkpoints.
    """

    def __init__(self, net: torch.nn.Module, stds=(0.050, 0.100)):
        self.stds = [float(s) for s in stds]
        if len(set(self.stds)) != len(self.stds):
            raise ValueError(f"--ema-std {self.stds}: every value must be different")
        for s in self.stds:
            std_to_exp(s)  # raises ValueError for a width outside (0, sqrt(1/12))
        self.nets = {}
        for s in self.stds:
            ema = copy.deepcopy(net).float().eval().requires_grad_(False)
            self.nets[s] = ema

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> None:
        """Fold in the parameters of `net` right after the step that brought
        the image count to cur_nimg (the step consumed batch_size images)."""
        src_params = [p.detach() for p in net.parameters()]
        src_buffers = list(net.buffers())
        for s, ema in self.nets.items():
            beta = float(power_function_beta(s, cur_nimg, batch_size))
            for p_ema, p in zip(ema.parameters(), src_params):
                # lerp(end, w) = ema + w (theta - ema) = beta ema + (1 - beta) theta; w = 1 gives theta exactly.
                p_ema.lerp_(p.to(torch.float32), 1 - beta)
            for b_ema, b in zip(ema.buffers(), src_buffers):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        """{f'{sigma_rel:.6f}': state dict} (plain tensors, loadable with weights_only=True)."""
        return {f"{s:.6f}": {k: v.detach().clone() for k, v in ema.state_dict().items()} for s, ema in self.nets.items()}

    def load_state_dict(self, state: dict) -> None:
        want = {f"{s:.6f}" for s in self.stds}
        if set(state) != want:
            raise ValueError(f"checkpoint holds EMA profiles {sorted(state)} but the run tracks {sorted(want)}; "
                             f"resume with the same --ema-std")
        for s, ema in self.nets.items():
            ema.load_state_dict(state[f"{s:.6f}"])


class TraditionalEMA:
    """Traditional exponential moving average with a half-life in images, as
    used by config A of the paper's Table 1 (App. B.1: half-life 50M images)
    with EDM's ramp-up (Karras et al. 2022).

    After the optimizer step that consumed `batch_size` images and brought the
    count to `cur_nimg`:

        h    = min(halflife_nimg, rampup_ratio * (cur_nimg - batch_size))
        beta = 0.5 ** (batch_size / max(h, 1e-8))
        ema <- beta * ema + (1 - beta) * theta

    The ramp uses the count before the step, as EDM does, so the first update
    (cur_nimg == batch_size) has beta = 0 and copies the network; early on the
    half-life is `rampup_ratio` of the training so far. `rampup_ratio=None`
    turns the ramp off.

    Same interface as `PowerFunctionEMA`: `update(net, cur_nimg, batch_size)`,
    `nets` (one entry, keyed by the half-life in images as a float: the
    snapshot of a traditional EMA carries a half-life, not a sigma_rel),
    `state_dict()` / `load_state_dict()`. Buffers are copied from the live
    network, not averaged.
    """

    def __init__(self, net: torch.nn.Module, halflife_nimg: float = 50e6, rampup_ratio: float | None = 0.05):
        if not halflife_nimg >= 1:
            raise ValueError(f"EMA half-life {halflife_nimg!r} images: must be at least 1 (the paper's config A: 50e6)")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"EMA ramp-up ratio {rampup_ratio!r}: must be positive, or None for no ramp-up")
        self.halflife_nimg = float(halflife_nimg)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.nets = {self.halflife_nimg: copy.deepcopy(net).float().eval().requires_grad_(False)}

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """Decay of the update after the step that brought the count to cur_nimg."""
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, self.rampup_ratio * (cur_nimg - batch_size))
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> None:
        """Fold in the parameters of `net` right after the step that brought
        the image count to cur_nimg (the step consumed batch_size images)."""
        beta = self.beta(cur_nimg, batch_size)
        ema = self.nets[self.halflife_nimg]
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(torch.float32), 1 - beta)
        for b_ema, b in zip(ema.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        """{f'halflife_nimg={h:.0f}': state dict} (plain tensors, loadable with weights_only=True)."""
        return {self._key: {k: v.detach().clone() for k, v in self.nets[self.halflife_nimg].state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {self._key}:
            raise ValueError(f"checkpoint holds EMA {sorted(state)} but the run tracks {self._key}; "
                             f"resume with the same EMA half-life")
        self.nets[self.halflife_nimg].load_state_dict(state[self._key])

    @property
    def _key(self) -> str:
        return f"halflife_nimg={self.halflife_nimg:.0f}"


__all__ += ["TraditionalEMA"]
