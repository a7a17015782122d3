"""One training step of edm2 against the authors' network, interleaved in one
process on identical weights, inputs, noise levels and noise.

    python benchmarks/train_step.py --ref PATH [--cases img512-xs:2,cpu-32:32] [--repeats 3]
        [--optimizer] [--channels-last] [--compile] [--profile] [--out FILE.md]

PATH is a checkout of https://github.com/NVlabs/edm2 (its `training/` and
`torch_utils/` are imported from there at run time; nothing of it is part of
this repository). Our step is what `edm2.train.loop.train_step` does: per-image
noise generators seeded from the run's noise stream, `edm2.loss.EDM2Loss`
(paper App. B.2 Eq. 21, the loss with the learned uncertainty u(sigma)),
sum x 1/batch, backward; with --optimizer also the gradients' nan_to_num and
an Adam step. The authors' step runs their `Precond` in the same loss, computed
here as Eq. 21 defines it, on the noise our generators drew (so it does no
random draws of its own). Before timing, both losses are computed on the same
weights and must agree (asserted, rtol 1e-5). Gains (emb_gain, out_gain) are
set to 0.5 so that every layer gets a gradient.

--channels-last and --compile apply to our side only (`edm2.train.speed`); the
authors' network always runs as it is. Each repeat times ours, then theirs;
the table gives the best of --repeats and the ratio theirs / ours (> 1: ours
is faster). --profile adds a torch.profiler breakdown of one step of each, grouped (conv
forward, conv backward, weight norm, element-wise, attention, optimizer,
other); for theirs, the calls of their `normalize` on MPConv weights are
labelled as weight norm (the scale by gain / sqrt(fan_in) after it counts as
element-wise there).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from edm2.loss import EDM2Loss
from edm2.nn import Precond
from edm2.presets import get_preset
from edm2.train.loop import Stream, sample_seed
from edm2.train.speed import compile_loss, to_channels_last


def ref_loss(net, images, labels, sigma, noise, sigma_data):
    """Paper Eq. 21 for the authors' network, on given sigma [N,1,1,1] and unit noise."""
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
    return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


def unit_draws(batch, shape, seed=0):
    """sigma's normal draw [N,1,1,1] and unit noise, as EDM2Loss draws them from per-image generators."""
    rnd, noise = [], []
    for i in range(batch):
        g = torch.Generator().manual_seed(sample_seed(seed, Stream.NOISE, i))
        rnd.append(torch.randn([1, 1, 1], generator=g))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(rnd), torch.stack(noise)


def make_steps(args, preset, batch):
    sys.path.insert(0, str(args.ref))
    import training.networks_edm2 as ref_module
    from training.networks_edm2 import Precond as RefPrecond

    if not getattr(ref_module.normalize, "_labelled", False):  # label their weight norm in profiles
        plain = ref_module.normalize

        def normalize(x, dim=None, eps=1e-4):  # dim=None: MPConv's weights; else the pixel norms
            if dim is not None:
                return plain(x, dim, eps)
            with torch.profiler.record_function("edm2::weight_norm"):
                return plain(x, dim, eps)
        normalize._labelled = True
        ref_module.normalize = normalize

    label_dim = 1000 if preset.latent else 10
    kwargs = preset.net_kwargs(label_dim)
    torch.manual_seed(0)
    ours = Precond(**kwargs).train().requires_grad_(True)
    with torch.no_grad():
        for q in ours.parameters():
            if q.ndim == 0:
                q.fill_(0.5)
    theirs = RefPrecond(**kwargs).train().requires_grad_(True)
    theirs.load_state_dict(ours.state_dict())
    res, ch = kwargs["img_resolution"], kwargs["img_channels"]
    images = torch.randn(batch, ch, res, res, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim]
    loss_fn = EDM2Loss(P_mean=preset.P_mean, P_std=preset.P_std, sigma_data=ours.sigma_data)
    rnd, unit = unit_draws(batch, [ch, res, res])
    sigma = (rnd * preset.P_std + preset.P_mean).exp()

    # Same loss on the same weights (eval-mode-free check: one training-mode forward each).
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(sample_seed(0, Stream.NOISE, i)) for i in range(batch)]
        a = loss_fn(ours, images, labels, generator=gens).sum().item()
        b = ref_loss(theirs, images, labels, sigma, unit, ours.sigma_data).sum().item()
    assert abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-6, f"loss differs: edm2 {a} vs reference {b}"
    theirs.load_state_dict(ours.state_dict())  # the check's forced normalisation ran on both

    model = ours
    if args.channels_last:
        model = to_channels_last(ours)
        images_ours = images.contiguous(memory_format=torch.channels_last)
    else:
        images_ours = images
    loss_call = loss_fn
    if args.compile:
        loss_call = compile_loss(loss_fn)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

    def finish(net, opt, loss):
        loss.sum().mul(1 / batch).backward()
        if args.optimizer:
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
            opt.step()
        net.zero_grad(set_to_none=True)

    def step_ours():
        gens = [torch.Generator().manual_seed(sample_seed(0, Stream.NOISE, i)) for i in range(batch)]
        finish(ours, opt_ours, loss_call(model, images_ours, labels, generator=gens))

    def step_theirs():
        finish(theirs, opt_theirs, ref_loss(theirs, images, labels, sigma, unit, ours.sigma_data))

    return step_ours, step_theirs, (a, b)


GROUPS = ("conv forward", "conv backward", "weight norm", "element-wise", "attention", "optimizer", "other")


def op_group(event) -> str:
    """The group of a profiler event, from its name and those of its parents."""
    names = []
    e = event
    while e is not None:
        names.append(e.name.lower())
        e = e.cpu_parent
    chain = " ".join(names)
    n = names[0]
    if "edm2::weight_norm" in chain:
        return "weight norm"
    if "optimizer" in chain or "adam" in chain or "nan_to_num" in n:
        return "optimizer"
    if any(k in chain for k in ("attention", "bmm", "softmax")):
        return "attention"
    backward = "backward" in chain
    if "conv" in chain or n in ("aten::mm", "aten::addmm"):
        return "conv backward" if backward else "conv forward"
    if n.startswith("aten::") or backward:
        return "element-wise"
    return "other"


def profile(step) -> dict:
    """Self CPU time of one step by group."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    step()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        total = time.perf_counter() - t
    out = dict.fromkeys(GROUPS, 0.0)
    for e in prof.events():
        out[op_group(e)] += e.self_cpu_time_total / 1e6
    return {"total": total, **out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, type=Path, help="checkout of NVlabs/edm2 (the authors' code)")
    ap.add_argument("--cases", default="img512-xs:2,cpu-32:32", help="PRESET:BATCH,... (default img512-xs:2,cpu-32:32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--optimizer", action="store_true", help="include nan_to_num of the gradients and an Adam step")
    ap.add_argument("--channels-last", action="store_true", help="our network and inputs in channels_last")
    ap.add_argument("--compile", action="store_true", help="torch.compile our loss (network, loss, its backward)")
    ap.add_argument("--profile", action="store_true", help="also a grouped torch.profiler breakdown of our step")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()
    if not (args.ref / "training" / "networks_edm2.py").is_file():
        sys.exit(f"--ref {args.ref}: no training/networks_edm2.py there; pass a checkout of NVlabs/edm2")

    load = os.getloadavg()[0]
    mode = "+".join([m for m, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on]) \
        or "eager"
    rows, profiles = [], []
    for case in args.cases.split(","):
        name, batch = case.split(":")
        preset, batch = get_preset(name), int(batch)
        step_ours, step_theirs, losses = make_steps(args, preset, batch)
        t0 = time.perf_counter()
        step_ours()  # warm-up (and compilation)
        first = time.perf_counter() - t0
        step_theirs()
        best = {"ours": float("inf"), "theirs": float("inf")}
        for _ in range(args.repeats):
            for key, fn in (("ours", step_ours), ("theirs", step_theirs)):
                t = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t)
        rows.append((name, batch, mode, best["ours"], best["theirs"], best["theirs"] / best["ours"], losses, first))
        print(rows[-1], flush=True)
        if args.profile:
            profiles.append((name, batch, "edm2 " + mode, profile(step_ours)))
            profiles.append((name, batch, "authors'", profile(step_theirs)))

    lines = [f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), fp32, best of {args.repeats}, "
             f"{'with' if args.optimizer else 'without'} Adam step, load {load:.1f} at start "
             f"/ {os.getloadavg()[0]:.1f} at end", "",
             "| preset | batch | edm2 mode | edm2 s/step | authors' s/step | ratio (authors' / edm2) "
             "| loss edm2 / authors' | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6][0]:.6g} / {r[6][1]:.6g} "
              f"| {r[7]:.1f} |" for r in rows]
    for name, batch, who, p in profiles:
        lines += ["", f"Profile of one {who} step, {name} batch {batch}, self CPU time by group "
                  f"(step {p['total']:.3f} s wall):", "", "| group | s | % |", "|---|---|---|"]
        accounted = sum(p[g] for g in GROUPS)
        lines += [f"| {g} | {p[g]:.3f} | {100 * p[g] / accounted:.1f} |" for g in GROUPS]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
