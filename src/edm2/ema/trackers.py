"""Power-function EMA for any `torch.nn.Module`, with snapshots for post-hoc
EMA (paper Sec. 3.1 Eq. 2, Sec. 3.2, App. C.4 Eq. 127; docs/integrations.md).

For every relative width sigma_rel the tracker keeps a copy of the module. An
update at image count t, whose previous update was at image count t_prev, does

    ema <- beta * ema + (1 - beta) * theta,   beta = (t_prev / t)^(gamma + 1)

with gamma = std_to_exp(sigma_rel) (Eq. 127 with t_delta = t - t_prev). Time is
the true number of training images (or samples, or steps: any count that grows
linearly with training), so the first update (t_prev = 0) copies the module and
an update every k optimizer steps is as exact as one per step: unrolled, the
average is the power-function average of the trajectory sampled at the update
times, held constant between them,

    ema(t_J) = sum_j theta(t_j) (t_j^(gamma+1) - t_{j-1}^(gamma+1)) / t_J^(gamma+1).

Under DDP only rank 0 needs a tracker; pass it the global image count (all
ranks' batches). Parameters and floating-point buffers are averaged (a buffer
that never changes stays bit-identical); other buffers (integer counters) are
copied from the module.

`save_snapshots` writes one edm2 snapshot per profile (safetensors + JSON, see
edm2.io.snapshot); `reconstruct_state_dict` turns a folder of them into the weights of any
other sigma_rel with the streaming code of `edm2 phema` (edm2.ema.posthoc).
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path

import torch

from ..io.snapshot import FORMAT, VERSION, save_state_dict, snapshot_name
from ..utils.errors import EDM2Error
from .posthoc import (
    MAX_PROFILE_ERROR,
    check_profile_error,
    find_phema_inputs,
    plan_posthoc,
    resolve_time,
    stream_state_dicts,
)
from .profiles import check_sigma_rel, std_to_exp


def trackable(net: torch.nn.Module) -> torch.nn.Module:
    """The module behind DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, torch.nn.Module):
            net = net._orig_mod
        else:
            return net


class PowerFunctionEMA:
    """Power-function EMA profiles of a module, one per sigma_rel in `sigma_rels`.

    net: the module being trained (DDP / torch.compile wrappers are looked through).
    sigma_rels: the EMA lengths sigma_rel to track, each in (0, 0.2887).
    dtype: dtype of the averaged parameters and float buffers (float32; float64 for
        tests of exactness).
    outdir, snapshot_every: with both, `update` writes `save_snapshots(outdir)`
        whenever the image count reaches a multiple of snapshot_every (in images).
    meta: extra snapshot metadata (a dict like edm2.io.snapshot.make_meta returns,
        minus nimg and ema_std), e.g. net_kwargs so that `edm2 generate` can load a
        tracked Precond; by default the snapshots describe a generic module.
    run_id: recorded as `origin.run_id` in every snapshot (unless `meta` has one), so
        that post-hoc EMA refuses a folder holding the snapshots of two runs (a script
        run twice into one outdir). Default: a new random id; `state_dict()` keeps it,
        so a run resumed with `load_state_dict` continues with the same id.

    Parameters and buffers are paired with the module's by name and checked by shape
    at every update: a module whose names or shapes differ from the tracked ones is
    refused (a layer added after the tracker was made would otherwise go untracked).

    `update(net, cur_nimg)` after an optimizer step (every step or every k steps);
    `nets` maps sigma_rel -> averaged module (eval mode, no gradients);
    `state_dict()` / `load_state_dict()` for checkpoints.
    """

    def __init__(self, net: torch.nn.Module, sigma_rels=(0.050, 0.100), dtype: torch.dtype = torch.float32,
                 outdir=None, snapshot_every: int | None = None, meta: dict | None = None,
                 run_id: str | None = None):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels:
            raise EDM2Error("`sigma_rels`: track at least one EMA length sigma_rel")
        check_sigma_rel(self.sigma_rels, "sigma_rels", distinct=True)  # one snapshot file name each
        if (outdir is None) != (snapshot_every is None):
            raise EDM2Error("PowerFunctionEMA: give both `outdir` and `snapshot_every` (images), or neither")
        if snapshot_every is not None and int(snapshot_every) < 1:
            raise EDM2Error(f"snapshot_every={snapshot_every}: must be a positive number of images")
        self.gammas = {s: float(std_to_exp(s)) for s in self.sigma_rels}
        self.dtype = dtype
        self.outdir = None if outdir is None else Path(outdir)
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.meta = meta
        self.run_id = uuid.uuid4().hex[:16] if run_id is None else str(run_id)
        self.nimg = 0  # image count of the last update (None: unknown, after loading an old checkpoint)
        net = trackable(net)
        self.nets = {}
        for s in self.sigma_rels:
            ema = copy.deepcopy(net).eval().requires_grad_(False)
            for t in _averaged(ema):
                t.data = t.data.to(dtype)
            self.nets[s] = ema

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int | None = None) -> list[Path]:
        """Fold in `net` right after the optimizer step that brought the image count
        to cur_nimg. batch_size (optional) is checked against the images since the
        previous update. Returns the snapshot files written (see snapshot_every)."""
        cur_nimg = int(cur_nimg)
        prev = self.nimg
        if prev is None:  # resumed from a checkpoint without the count: trust batch_size
            if batch_size is None:
                raise EDM2Error("PowerFunctionEMA.update: the previous image count is unknown; pass `batch_size`")
            prev = cur_nimg - int(batch_size)
        elif batch_size is not None and cur_nimg - prev != int(batch_size):
            raise EDM2Error(f"PowerFunctionEMA.update: cur_nimg={cur_nimg} is {cur_nimg - prev} images after the "
                             f"previous update (nimg {prev}), not batch_size={batch_size}; when updating every k "
                             f"steps, omit batch_size (the tracker remembers the previous count)")
        if not 0 <= prev < cur_nimg:
            raise EDM2Error(f"PowerFunctionEMA.update: cur_nimg={cur_nimg} must exceed the previous update's {prev}")
        net = trackable(net)
        src = _named_tensors(net)
        for s, ema in self.nets.items():
            pairs = _pair(ema, src, "PowerFunctionEMA.update")
            # Eq. 127 with t_delta = t - t_prev; exact in float64, and 0 (a copy) at the first update.
            beta = (prev / cur_nimg) ** (self.gammas[s] + 1)
            for e, p in pairs:
                if e.is_floating_point():
                    # lerp(end, w) = ema + w (theta - ema) = beta ema + (1 - beta) theta; w = 1 gives theta exactly.
                    e.lerp_(p.detach().to(e.dtype), 1 - beta)
                else:
                    e.copy_(p)
        self.nimg = cur_nimg
        if self.snapshot_every is not None and cur_nimg // self.snapshot_every > prev // self.snapshot_every:
            return self.save_snapshots(self.outdir)
        return []

    def save_snapshots(self, outdir) -> list[Path]:
        """Write every profile as outdir/snapshot-<nimg>-<sigma_rel>.safetensors
        (atomically; an existing file of the same name is replaced). These are
        the inputs of `reconstruct_state_dict` and `edm2 phema`."""
        if self.nimg is None or self.nimg <= 0:
            raise EDM2Error("PowerFunctionEMA.save_snapshots: no update yet (post-hoc EMA needs nimg > 0)")
        outdir = Path(outdir)
        base = self.meta if self.meta is not None else _generic_meta(next(iter(self.nets.values())))
        paths = []
        for s, ema in self.nets.items():
            meta = copy.deepcopy(base)
            meta.update(format=FORMAT, version=VERSION, nimg=self.nimg, ema_std=s)
            meta.setdefault("net_kwargs", None)
            meta.setdefault("origin", {})
            meta["origin"] = dict(meta["origin"] or {})
            meta["origin"].setdefault("run_id", self.run_id)  # post-hoc EMA combines one run's snapshots only
            path = outdir / snapshot_name(self.nimg, s)
            save_state_dict(path, _unshared(ema.state_dict()), meta)
            paths.append(path)
        return paths

    def state_dict(self) -> dict:
        """{f'{sigma_rel:.6f}': module state dict, 'run_id': str} (plain tensors and a
        string, loadable with torch.load(weights_only=True)). The image count of the
        last update is `self.nimg`; give it back to load_state_dict."""
        state = {f"{s:.6f}": {k: v.detach().clone() for k, v in ema.state_dict().items()}
                 for s, ema in self.nets.items()}
        state["run_id"] = self.run_id
        return state

    def load_state_dict(self, state: dict, nimg: int | None = None) -> None:
        """Restore the profiles and the run id (a state without one, from an earlier
        version, keeps this tracker's). nimg: the image count they were saved at (then
        updates every k steps stay exact); without it the next update needs batch_size."""
        state = dict(state)
        run_id = state.pop("run_id", None)
        want = {f"{s:.6f}" for s in self.sigma_rels}
        if set(state) != want:
            raise EDM2Error(f"checkpoint holds EMA profiles {sorted(state)} but the run tracks {sorted(want)}; "
                             f"resume with the same EMA lengths sigma_rel")
        for s, ema in self.nets.items():
            ema.load_state_dict(state[f"{s:.6f}"])
        if run_id is not None:
            self.run_id = str(run_id)
        self.nimg = None if nimg is None else int(nimg)


def _averaged(net: torch.nn.Module):
    """Parameters, then floating-point buffers, in module order."""
    yield from net.parameters()
    for b in net.buffers():
        if b.is_floating_point():
            yield b


def _named_tensors(net: torch.nn.Module) -> dict:
    """{name: tensor} of the parameters and buffers (tied ones once, under their first name)."""
    return {**dict(net.named_parameters()), **dict(net.named_buffers())}


def _pair(ema: torch.nn.Module, src: dict, who: str) -> list:
    """(average, live tensor) pairs by name, or `EDM2Error` if the live module's
    parameter/buffer names or shapes differ from the tracked copy's."""
    own = _named_tensors(ema)
    if own.keys() != src.keys():
        added, gone = sorted(src.keys() - own.keys()), sorted(own.keys() - src.keys())
        raise EDM2Error(f"{who}: `net` does not have the tracked parameters and buffers (new in `net`: "
                        f"{added[:3] or 'none'}; missing: {gone[:3] or 'none'}); pass the module the tracker was "
                        f"made for, or make a new tracker after changing the model")
    for k, e in own.items():
        if e.shape != src[k].shape:
            raise EDM2Error(f"{who}: `net` has {k} of shape {tuple(src[k].shape)} but the tracked one is "
                            f"{tuple(e.shape)}; pass the module the tracker was made for, or make a new tracker "
                            f"after changing the model")
    return [(e, src[k]) for k, e in own.items()]


def _unshared(state: dict) -> dict:
    """The state dict with tensors that share memory (tied weights) cloned: safetensors
    refuses to write shared tensors, and every name must stay in the file so that a
    strict load_state_dict of the result works."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        out[k] = v.clone() if key in seen else v
        if key is not None:
            seen.add(key)
    return out


def _generic_meta(net: torch.nn.Module) -> dict:
    cls = type(net)
    return {"net_kwargs": None, "encoder": {}, "dataset": {},
            "origin": {"module": f"{cls.__module__}.{cls.__qualname__}", "tool": "edm2.ema.PowerFunctionEMA"}}


def reconstruct_state_dict(folder, sigma_rel, at: int | None = None, model: torch.nn.Module | None = None,
                           progress: bool = False, in_sigma_rels=None, max_profile_error=MAX_PROFILE_ERROR):
    """Post-hoc EMA (Sec. 3.2): the weights of EMA length sigma_rel at image count
    `at` (default: the last snapshot), from the snapshots in `folder` written by
    `PowerFunctionEMA.save_snapshots` (or `edm2 train`).

    Uses the least-squares combination and the streaming reader of `edm2 phema`
    (`edm2.ema.posthoc`; `edm2.ema.posthoc.reconstruct` writes the results as
    files instead). Returns the state dict (float tensors in the snapshots'
    dtype), or, with `model`, loads it into the model (strictly) and returns the
    model. A list of sigma_rel values gives a list of state dicts.
    in_sigma_rels: combine only the stored profiles of these EMA lengths (default: all).
    max_profile_error: refuse (`EDM2Error`) if a wanted profile is realised with a
    larger relative L2 error (default `edm2.ema.posthoc.MAX_PROFILE_ERROR`); None: no check."""
    many = not isinstance(sigma_rel, (int, float))
    sigma_rels = [float(s) for s in (sigma_rel if many else [sigma_rel])]
    check_sigma_rel(sigma_rels, "sigma_rel")
    if many and model is not None:
        raise EDM2Error("reconstruct_state_dict: pass one `sigma_rel` when loading into a `model`")
    inputs = find_phema_inputs(folder)
    if in_sigma_rels is not None:
        keep = [float(s) for s in in_sigma_rels]
        inputs = [r for r in inputs if any(abs(r.sigma_rel - s) < 5e-4 for s in keep)]
        if not inputs:
            raise EDM2Error(f"in_sigma_rels={keep}: {folder} holds no snapshots of these EMA lengths")
    t = resolve_time(inputs, at_nimg=at)
    plan = plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs], sigma_rels, t, inputs)
    check_profile_error(plan, max_profile_error)
    states = stream_state_dicts(plan, progress=progress)
    if model is None:
        return states if many else states[0]
    trackable(model).load_state_dict(states[0], strict=True)
    return model


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
            raise EDM2Error(f"halflife_nimg={halflife_nimg!r}: the EMA half-life must be at least 1 image "
                            f"(the paper's config A: 50e6)")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise EDM2Error(f"rampup_ratio={rampup_ratio!r}: must be positive, or None for no ramp-up")
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
        net = trackable(net)
        params = dict(ema.named_parameters())
        for name, (e, p) in zip(_named_tensors(ema), _pair(ema, _named_tensors(net), "TraditionalEMA.update")):
            if name in params:
                e.lerp_(p.detach().to(e.dtype), 1 - beta)
            else:
                e.copy_(p)

    def state_dict(self) -> dict:
        """{f'halflife_nimg={h:.0f}': state dict} (plain tensors, loadable with weights_only=True)."""
        return {self._key: {k: v.detach().clone() for k, v in self.nets[self.halflife_nimg].state_dict().items()}}

    def load_state_dict(self, state: dict, nimg: int | None = None) -> None:
        """Restore the average (nimg is accepted for the power-function tracker's
        interface; a traditional EMA does not need it)."""
        if set(state) != {self._key}:
            raise EDM2Error(f"checkpoint holds EMA {sorted(state)} but the run tracks {self._key}; "
                             f"resume with the same EMA half-life")
        self.nets[self.halflife_nimg].load_state_dict(state[self._key])

    @property
    def _key(self) -> str:
        return f"halflife_nimg={self.halflife_nimg:.0f}"

