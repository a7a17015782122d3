"""Config A against EDM's ADM network: parity of edm2.nn.adm.ADMPrecond and
edm2.loss.EDMLoss with the authors' EDM code (NVlabs/edm, training/networks.py
EDMPrecond + DhariwalUNet, training/loss.py EDMLoss).

    python benchmarks/parity_edm.py [--edm-repo /path/to/edm] [--sizes tiny,small,img512-s] [--batch 2]

Needs a local checkout of github.com/NVlabs/edm (--edm-repo, default
$EDM_REPO); nothing of it is copied into this project. For every size it builds
both networks from the same seed and reports:

- the state-dict keys (same names, order and shapes) and the largest
  difference between corresponding tensors (bit-identical expected);
- after giving every parameter (zero-initialised layers included) the same
  random values: the relative difference of the raw network output F and of
  the denoiser D, in eval mode and in training mode with the same dropout
  seed, and of the parameter gradients of a training-mode loss;
- EDM's loss and ours side by side with the same noise.

Relative difference = ||ours - theirs|| / ||theirs|| (Frobenius), and the
largest element-wise |ours - theirs| / max|theirs|.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from edm2.loss import EDMLoss
from edm2.nn.adm import ADMPrecond

SIZES = {
    # name: (img_resolution, img_channels, label_dim, network kwargs)
    "tiny": (16, 3, 10, dict(model_channels=64, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(16, 8))),
    "small-B": (32, 3, 0, dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 8))),
    "img512-xs": (64, 4, 1000, dict(model_channels=128)),
    "img512-s": (64, 4, 1000, dict(model_channels=192)),
}


def rel(a, b) -> tuple[float, float]:
    """(||a - b|| / ||b||, max|a - b| / max|b|) of two tensors or two lists of tensors, in float64
    one tensor at a time (the gradients of img512-s would need 10 GB at once)."""
    a, b = ([a], [b]) if torch.is_tensor(a) else (a, b)
    diff2 = norm2 = diff_max = b_max = 0.0
    for x, y in zip(a, b):
        d = x.double() - y.double()
        diff2 += d.square().sum().item()
        norm2 += y.double().square().sum().item()
        diff_max = max(diff_max, d.abs().max().item())
        b_max = max(b_max, y.abs().max().item())
    return math.sqrt(diff2) / max(math.sqrt(norm2), 1e-300), diff_max / max(b_max, 1e-300)


def fmt(r) -> str:
    return f"{r[0]:.1e} / {r[1]:.1e}"


@torch.no_grad()
def randomize(net: torch.nn.Module, seed: int) -> None:
    """Every parameter to random values of a typical scale (zero-init layers too)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif name.endswith(".weight") and "norm" in name.split(".")[-2]:  # GroupNorm scales near 1
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def compare(size: str, networks, loss_mod, batch: int, seed: int = 0) -> dict:
    res, ch, label_dim, kw = SIZES[size]
    uncertainty = size.endswith("-B")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    theirs = networks.EDMPrecond(res, ch, label_dim, use_fp16=False, model_type="DhariwalUNet",
                                 **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    torch.manual_seed(seed)
    ours = ADMPrecond(res, ch, label_dim, precision="fp32", uncertainty=uncertainty, **kw)
    out = {"size": size, "config": ours.config, "params": sum(p.numel() for p in ours.model.parameters())}

    # 1. Same seed -> same state dict, bit for bit.
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    if uncertainty:  # u(sigma) is ours alone; it is created after the U-Net
        sd_o = {k: v for k, v in sd_o.items() if not k.startswith("logvar_")}
    out["keys_match"] = list(sd_t) == list(sd_o) and all(sd_t[k].shape == sd_o[k].shape for k in sd_t)
    out["tensors"] = len(sd_t)
    out["max_param_diff"] = (max((sd_t[k] - sd_o[k]).abs().max().item() for k in sd_t)
                             if out["keys_match"] else float("nan"))
    out["identical"] = out["keys_match"] and all(torch.equal(sd_t[k], sd_o[k]) for k in sd_t)

    # 2. Same random weights -> same outputs.
    randomize(theirs, seed + 1)
    ours.load_state_dict(theirs.state_dict(), strict=not uncertainty)
    g = torch.Generator().manual_seed(seed + 2)
    y = torch.randn(batch, ch, res, res, generator=g) * 0.5
    sigma = torch.exp(torch.linspace(math.log(0.05), math.log(20), batch))
    x = y + torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.randint(label_dim, [batch], generator=g), label_dim).float()
    c_noise = sigma.log() / 4
    c_in = (1 / (0.25 + sigma ** 2).sqrt()).reshape(-1, 1, 1, 1)
    for mode in ("eval", "train"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(seed + 3)
            f_t = theirs.model(c_in * x, c_noise, labels)
            torch.manual_seed(seed + 3)
            f_o = ours.model(c_in * x, c_noise, labels)
            torch.manual_seed(seed + 4)
            d_t = theirs(x, sigma, labels)
            torch.manual_seed(seed + 4)
            d_o = ours(x, sigma, labels)
        out[f"F_{mode}"] = rel(f_o, f_t)
        out[f"D_{mode}"] = rel(d_o, d_t)

    # 3. The loss with the same noise (training mode: dropout seeded as well), and its gradients.
    # One network at a time, so that only one autograd graph is alive (img512-s needs several GB each).
    losses, grads = [], []
    for net, loss_fn, params in ((theirs, loss_mod.EDMLoss(), theirs.parameters),
                                 (ours, EDMLoss(), ours.model.parameters)):
        net.train()
        torch.manual_seed(seed + 5)
        loss = loss_fn(net, y, labels)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in params()])
        del loss
    out["loss"] = (losses[0].sum().item() / batch, losses[1].sum().item() / batch)
    out["loss_rel"] = rel(losses[1], losses[0])
    out["grad"] = rel(grads[1], grads[0])
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    default_repo = os.environ.get("EDM_REPO") or None
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edm-repo", default=default_repo, help="checkout of github.com/NVlabs/edm (default $EDM_REPO)")
    ap.add_argument("--sizes", default="tiny,small-B,img512-s", help=f"comma-separated, from {','.join(SIZES)}")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    if args.edm_repo is None or not os.path.isfile(os.path.join(args.edm_repo, "training", "networks.py")):
        print(f"parity_edm.py: --edm-repo {args.edm_repo}: not an EDM checkout (needs training/networks.py); "
              f"clone github.com/NVlabs/edm and pass its path", file=sys.stderr)
        return 2
    sizes = args.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            print(f"parity_edm.py: --sizes: unknown size {s!r}; allowed: {', '.join(SIZES)}", file=sys.stderr)
            return 2
    sys.path.insert(0, os.path.abspath(args.edm_repo))  # their code imports torch_utils from the repository root
    from training import loss as loss_mod
    from training import networks

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU, batch {args.batch}")
    print("| size | config | params | state dict (keys, values) | F eval | F train | D eval | D train "
          "| loss (theirs, ours) | loss | gradients | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        r = compare(s, networks, loss_mod, args.batch)
        values = "bit-identical" if r["identical"] else f"max diff {r['max_param_diff']:.1e}"
        sd = f"{r['tensors']} tensors, keys {'match' if r['keys_match'] else 'DIFFER'}, {values}"
        print(f"| {s} | {r['config']} | {r['params']:,} | {sd} | {fmt(r['F_eval'])} | {fmt(r['F_train'])} | "
              f"{fmt(r['D_eval'])} | {fmt(r['D_train'])} | {r['loss'][0]:.6g}, {r['loss'][1]:.6g} | "
              f"{fmt(r['loss_rel'])} | {fmt(r['grad'])} | {r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
