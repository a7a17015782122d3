"""Time to quality: edm2's demo recipe against the authors' network and loss in a
plain training loop, for the same wall-clock budgets.

Two sides train one after the other on the same data (default: the built-in
Fashion-MNIST, 32x32 grey, 10 classes):

- edm2: `edm2 train --preset demo` through the Python API (`edm2.train.train`),
  stopped by the clock;
- authors: their `Precond` (EDM2 U-Net, paper Sec. 2-3), `EDM2Loss` (Eq. 21,
  learned uncertainty), Adam (betas 0.9, 0.99) with their
  `learning_rate_schedule` (inverse square-root decay, Eq. 67, after a linear
  ramp-up) and their power-function EMA (`PowerFunctionEMA`, Sec. 3.1), in a
  plain loop like their training loop's step. Their code is imported at run
  time from a checkout of github.com/NVlabs/edm2 given by --ref (its root goes
  on sys.path for dnnlib/torch_utils); without --ref this side is skipped.

Both recipes are independent of the run's total length (the learning-rate
schedule and the power-function EMA depend only on the images trained so far),
so each side trains once for the longest budget and keeps its EMA networks at
every budget in --minutes; the clock stops while they are kept. Every kept
network then samples --num images with edm2's sampler (--solver, --steps; by
default make demo's DPM-Solver++(2M) at 16 steps; a random class per seed);
the best of the --ema lengths by FD is reported, and
with --guidance each side is also scored with autoguidance by its own earlier EMA
(sigma_rel 0.05, kept at --guide-at of the budget, default 1/6; make demo's
guide is its snapshot at 4Ki images, 1/8 of its 32Ki-image run).
The score is the project's classifier metric: FD in the classifier's features
to --ref-stats and class consistency (the fraction of samples the classifier
assigns to the class they were drawn for;
`edm2.metrics.classifier.classifier_scores`, benchmarks/sampler_nfe.py).

Prints a table (side, budget, images trained, img/s, FD, consistency) and
writes OUT.csv and OUT.png (quality against minutes, both sides).

    git clone https://github.com/NVlabs/edm2 ../edm2-ref
    python benchmarks/time_to_quality.py --ref ../edm2-ref --ref-stats fmnist-train-clf.npz \\
        --detector-dir detectors --minutes 2.5,5,10 --num 1000 --out ttq
    python benchmarks/time_to_quality.py --ref ../edm2-ref --ref-stats REF.npz --detector-dir DIR \\
        --minutes 0.1 --num 50 --out /tmp/ttq       # end-to-end check, minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

COLUMNS = ["side", "minutes", "nimg", "img_per_s", "ema", "fd_classifier", "consistency"]
EMA_STDS = (0.050, 0.100)   # the EMA lengths both sides track (the demo preset's, the authors' default)


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{name}: expected numbers > 0, got {text!r}")
    return sorted(set(values))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ref", metavar="DIR", help="checkout of github.com/NVlabs/edm2 (the authors' side; "
                   "skipped when not given or not there)")
    p.add_argument("--ref-stats", required=True, metavar="NPZ",
                   help="reference statistics with fd_classifier (`edm2 metrics ref --metrics fd_classifier`)")
    p.add_argument("--detector-dir", help="folder with classifier.safetensors (default: edm2's detector folder)")
    p.add_argument("--minutes", default="2.5,5,10", type=lambda t: parse_floats(t, "--minutes"),
                   help="wall-clock training budgets in minutes (default 2.5,5,10)")
    p.add_argument("--num", type=int, default=1000, help="samples scored per network (default 1000)")
    p.add_argument("--steps", type=int, default=16, help="sampler steps (default 16, as make demo)")
    p.add_argument("--solver", default="dpm++2m", help="the sampler's ODE solver for both sides, of "
                   "heun,euler,dpm++2m (default dpm++2m, as make demo)")
    p.add_argument("--ema", default="0.10", type=lambda t: parse_floats(t, "--ema"),
                   help="EMA lengths sigma_rel to try, of 0.05,0.10 (both sides track both); each row reports "
                   "the one with the lowest FD (default 0.10)")
    p.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="also score each side with autoguidance of weight W by its own earlier EMA (sigma_rel "
                   "0.05, kept at --guide-at of the budget) (default 1: not scored)")
    p.add_argument("--guide-at", type=float, default=1 / 6, metavar="F",
                   help="where the guiding network is kept, as a fraction of each budget (default 1/6; "
                   "make demo guides with its 4Ki-image snapshot)")
    p.add_argument("--data", help="dataset zip or folder (default: the built-in Fashion-MNIST)")
    p.add_argument("--sides", default="edm2,authors", help="which sides to train (default edm2,authors)")
    g = p.add_argument_group("the authors' side (their train_edm2.py's pixel-space img64 recipe, scaled down)")
    g.add_argument("--ref-channels", type=int, default=32, help="model_channels (default 32)")
    g.add_argument("--ref-batch", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--ref-lr", type=float, default=0.0100, help="ref_lr (default 0.0100, their img64-s)")
    g.add_argument("--ref-decay", type=float, default=500, help="ref_batches of the lr decay (default 500)")
    g.add_argument("--ref-rampup-Mimg", type=float, default=0.002,
                   help="lr ramp-up in millions of images (default 0.002, as the demo preset)")
    g.add_argument("--ref-P-mean", type=float, default=-0.8, help="P_mean (default -0.8, their img64)")
    g.add_argument("--ref-P-std", type=float, default=1.6, help="P_std (default 1.6, their img64)")
    p.add_argument("--batch", type=int, default=100, help="images per sampling batch (default 100)")
    p.add_argument("--seed", type=int, default=0, help="training seed of both sides (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, help="CPU threads (default: edm2's choice)")
    p.add_argument("--workdir", default=".", help="folder for the edm2 run (a new edm2-ttq-* folder; default .)")
    p.add_argument("--out", default="time_to_quality", help="output stem: OUT.csv, OUT.png (default time_to_quality)")
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or set(args.sides) - {"edm2", "authors"}:
        p.error(f"--sides: choose from edm2,authors, got {','.join(args.sides)!r}")
    if args.num < 2:
        p.error("--num: need at least 2 samples")
    if args.steps < 1 or args.batch < 1 or args.ref_batch < 1 or args.ref_channels < 1:
        p.error("--steps, --batch, --ref-batch and --ref-channels must be >= 1")
    if args.solver not in ("heun", "euler", "dpm++2m"):
        p.error(f"--solver {args.solver}: choose from heun, euler, dpm++2m")
    if set(args.ema) - set(EMA_STDS):
        p.error(f"--ema: choose from {','.join(map(str, EMA_STDS))}")
    if not 0 < args.guide_at < 1:
        p.error(f"--guide-at {args.guide_at}: must be between 0 and 1")
    return args


def reference_code(ref) -> tuple[dict | None, str]:
    """The authors' modules from a checkout at `ref` -> (modules, "") or (None, why skipped)."""
    if ref is None:
        return None, "no --ref given: the authors' side is skipped (pass a checkout of github.com/NVlabs/edm2)"
    root = Path(ref)
    if not (root / "training" / "networks_edm2.py").is_file():
        return None, f"--ref {root}: no training/networks_edm2.py there, so the authors' side is skipped"
    sys.path.insert(0, str(root.resolve()))  # their modules import dnnlib and torch_utils from the root
    from torch_utils import misc
    from training.networks_edm2 import Precond
    from training.phema import PowerFunctionEMA
    from training.training_loop import EDM2Loss, learning_rate_schedule
    return dict(Precond=Precond, EDM2Loss=EDM2Loss, learning_rate_schedule=learning_rate_schedule,
                PowerFunctionEMA=PowerFunctionEMA, misc=misc), ""


def keep_points(args) -> list[tuple[float, str]]:
    """(minutes, what) at which the EMA networks are kept, in order: every budget, and the
    guiding network's point of each budget with autoguidance."""
    points = {(m, f"budget{m}") for m in args.minutes}
    if args.guidance != 1:
        points |= {(m * args.guide_at, f"guide{m}") for m in args.minutes}
    return sorted(points)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Training seconds with pauses (while networks are kept); `due()` lists the keep
    points reached."""

    def __init__(self, points, device):
        self.points, self.device = list(points), device
        self.start = self.paused = None
        self.kept = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def begin(self):
        _sync(self.device)
        self.start, self.paused = time.perf_counter(), 0.0

    def due(self) -> list:
        if self.points and self.elapsed() >= self.points[0][0] * 60:
            _sync(self.device)
        out = []
        while self.points and self.elapsed() >= self.points[0][0] * 60:
            out.append(self.points.pop(0))
        return out

    def keep(self, what, nimg, nets: dict) -> None:
        t = time.perf_counter()
        seconds = self.elapsed()
        self.kept[what] = dict(nimg=nimg, seconds=seconds, nets={k: _frozen(v) for k, v in nets.items()})
        self.paused += time.perf_counter() - t


def _frozen(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


def train_edm2(args, device, data) -> dict:
    """edm2's demo recipe (`edm2.train`), stopped by the clock; its EMA networks at every keep point."""
    from edm2.presets import get_preset
    from edm2.train import TrainConfig, train

    clock = Clock(keep_points(args), device)
    batch = get_preset("demo").batch
    forever = batch * (1 << 34)   # the clock stops the run; snapshots and checkpoints only at image 0

    def hook(run):
        if clock.start is None:
            clock.begin()
            return
        for _, what in clock.due():
            clock.keep(what, run.nimg, dict(run.ema.nets))
        if not clock.points:
            run.stop_nimg = run.nimg

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    outdir = tempfile.mkdtemp(prefix="edm2-ttq-", dir=args.workdir)
    config = TrainConfig(outdir=outdir, preset="demo", data=data, duration=forever, snapshot=forever,
                         checkpoint=forever, grid=0, seed=args.seed, device=str(device), threads=args.threads,
                         progress=False)
    print(f"edm2: training the demo preset in {outdir} for {max(args.minutes)} min", flush=True)
    train(config, hooks=(hook,))
    return clock.kept


class _Shuffled(torch.utils.data.Sampler):
    """Endless shuffled indices, a new permutation per epoch (their `misc.InfiniteSampler`
    does not construct with recent PyTorch, whose Sampler takes no data source)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __iter__(self):
        gen, epoch = torch.Generator(), 0
        while True:
            gen.manual_seed(self.seed + epoch)
            yield from torch.randperm(self.size, generator=gen).tolist()
            epoch += 1


def train_authors(args, device, data, code) -> dict:
    """The authors' Precond + EDM2Loss + Adam in a plain loop (their training loop's step:
    per-step seeding, lr schedule, NaN-free gradients, power-function EMA update)."""
    from edm2.data import ImageDataset
    from edm2.utils.distributed import configure_threads

    configure_threads(args.threads)
    misc = code["misc"]
    ds = ImageDataset(data)
    clock = Clock(keep_points(args), device)
    misc.set_random_seed(args.seed, 0)
    net = code["Precond"](img_resolution=ds.resolution, img_channels=ds.num_channels, label_dim=ds.label_dim,
                          use_fp16=device.type == "cuda", model_channels=args.ref_channels, channel_mult=[1, 2, 2],
                          num_blocks=2, attn_resolutions=[8], dropout=0.0)
    net.train().requires_grad_(True).to(device)
    loss_fn = code["EDM2Loss"](P_mean=args.ref_P_mean, P_std=args.ref_P_std)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    ema = code["PowerFunctionEMA"](net=net, stds=list(EMA_STDS))
    loader = iter(torch.utils.data.DataLoader(ds, sampler=_Shuffled(len(ds), args.seed), batch_size=args.ref_batch,
                                              num_workers=2 if device.type == "cuda" else 0,
                                              pin_memory=device.type == "cuda"))
    print(f"authors: training Precond ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters) "
          f"for {max(args.minutes)} min", flush=True)
    nimg, batch = 0, args.ref_batch
    clock.begin()
    while clock.points:
        for _, what in clock.due():
            clock.keep(what, nimg, {std: e for e, std in zip((e for e, _ in ema.get()), EMA_STDS)})
        if not clock.points:
            break
        misc.set_random_seed(args.seed, 0, nimg)
        opt.zero_grad(set_to_none=True)
        images, labels = next(loader)
        images = images.to(device).to(torch.float32) / 127.5 - 1   # their StandardRGBEncoder.encode_latents
        loss = loss_fn(net=net, images=images, labels=labels.to(device))
        loss.sum().mul(1 / batch).backward()
        lr = code["learning_rate_schedule"](cur_nimg=nimg, batch_size=batch, ref_lr=args.ref_lr,
                                            ref_batches=args.ref_decay, rampup_Mimg=args.ref_rampup_Mimg)
        for group in opt.param_groups:
            group["lr"] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        opt.step()
        nimg += batch
        ema.update(cur_nimg=nimg, batch_size=batch)
    return clock.kept


def score(net, gnet, guidance, encoder, detector, ref, args, device) -> tuple[float, float]:
    """FD in the classifier's features and class consistency of args.num samples
    (seeds of `gen_seeds`, a random class per seed), as `classifier_scores`."""
    from edm2.generate import generate_images
    from edm2.metrics import FeatureStats, distances
    from edm2.metrics.evaluate import gen_seeds

    stats, hits, total = FeatureStats(detector.feature_dim), 0, 0
    for b in generate_images(net, encoder, gen_seeds(args.num, 0), gnet=gnet, guidance=guidance,
                             batch_size=args.batch, device=device, rank=0, world_size=1, num_steps=args.steps,
                             solver=args.solver):
        with torch.no_grad():
            features = detector.classifier.features(detector.classifier.prepare(b.images.to(device)))
            stats.append(features)
            hits += int((detector.classifier.head(features).argmax(dim=1).cpu() == b.classes).sum())
        total += len(b)
    return float(distances({"fd_classifier": stats}, ref)["fd_classifier"]), hits / total


def table(rows: list[dict]) -> str:
    lines = ["| side | minutes | images trained | img/s | EMA | FD (classifier) | consistency |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['side']} | {r['minutes']:g} | {r['nimg']} | {r['img_per_s']:.1f} | {r['ema']:.3f} "
              f"| {r['fd_classifier']:.3f} | {r['consistency']:.3f} |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    from edm2.utils.fileio import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot(path: Path, rows: list[dict]) -> None:
    from edm2.utils.fileio import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax, label in (("fd_classifier", axes[0], "FD in classifier features (log scale)"),
                           ("consistency", axes[1], "class consistency, higher is better")):
        for side in dict.fromkeys(r["side"] for r in rows):
            pts = sorted((r["minutes"], r[key]) for r in rows if r["side"] == side)
            ax.plot(*zip(*pts), "o-", ms=3, label=side)
        ax.set_xlabel("training wall-clock minutes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")     # the sides differ by an order of magnitude at short budgets
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    code, why = reference_code(args.ref) if "authors" in args.sides else (None, "")
    if why:
        print(why, flush=True)
        args.sides = [s for s in args.sides if s != "authors"]
    if not args.sides:
        return 0
    from edm2.data import ImageDataset, builtin_dataset_path
    from edm2.encoders import encoder_from_meta
    from edm2.metrics import detector_dir, load_ref
    from edm2.metrics.detectors import load_classifier
    from edm2.metrics.evaluate import check_ref_detectors

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector = load_classifier(detector_dir(args.detector_dir) / "classifier.safetensors")
    detector.classifier.to(device)
    ref = load_ref(args.ref_stats)
    if "fd_classifier" not in ref:
        raise SystemExit(f"{args.ref_stats}: no fd_classifier statistics (`edm2 metrics ref --metrics fd_classifier`)")
    check_ref_detectors(ref, {"fd_classifier": detector})   # before any training
    data = args.data or str(builtin_dataset_path())
    if not ImageDataset(data).label_dim:
        raise SystemExit(f"--data {data}: has no class labels; class consistency needs a labelled dataset")
    encoder = encoder_from_meta({"type": "rgb"})   # both sides: x / 127.5 - 1 and back
    kept = {}
    if "edm2" in args.sides:
        kept["edm2"] = train_edm2(args, device, data)
    if "authors" in args.sides:
        kept["authors"] = train_authors(args, device, data, code)
    rows = []
    for side, points in kept.items():
        variants = [(side, 1.0)] + ([(f"{side} + autoguidance {args.guidance:g}", args.guidance)]
                                    if args.guidance != 1 else [])
        for m in args.minutes:
            at = points[f"budget{m}"]
            for name, w in variants:
                gnet = points[f"guide{m}"]["nets"][EMA_STDS[0]] if w != 1 else None
                tried = [(*score(at["nets"][std], gnet, w, encoder, detector, ref, args, device), std)
                         for std in args.ema]
                fd, consistency, std = min(tried)
                rows.append(dict(side=name, minutes=m, nimg=at["nimg"], img_per_s=at["nimg"] / at["seconds"],
                                 ema=std, fd_classifier=fd, consistency=consistency))
                r = rows[-1]
                print(f"{name:24s} {m:6g} min  {r['nimg']:8d} img  {r['img_per_s']:8.1f} img/s  EMA {std:.3f}  "
                      f"FD {fd:.3f}  consistency {consistency:.3f}", flush=True)
                write_csv(Path(args.out + ".csv"), rows)
    plot(Path(args.out + ".png"), rows)
    print(table(rows))
    print(f"wrote {args.out}.csv and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
