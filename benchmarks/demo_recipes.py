"""Demo recipes: how recognisable are a run's class-conditional samples?

For one training run (a folder of `edm2 train`), every EMA length in --std
(tracked ones are used as stored, the others are reconstructed with post-hoc
EMA, paper Sec. 3.2) and every training time in --at-nimg, this generates
--per-class samples of each of the 10 Fashion-MNIST classes (seeds 0 ...
per_class-1 in every class; --solver with --steps, unguided or, with --gnet,
autoguided at every weight of --guidance) and scores them
with the Fashion-MNIST classifier (`fd_classifier`, trained on the
Fashion-MNIST training split):

- consistency: % of samples the classifier assigns to the class they were
  generated for;
- FD: Frechet distance of the classifier's features of the samples to those
  of the Fashion-MNIST training split (reference statistics are computed once
  and cached under --workdir).

It also reads the run's training speed (img/s of its status lines). With
--train, it first trains the run (`edm2 train --outdir RUNDIR` followed by
the options given after `--`). The reference statistics come from
`edm2 metrics ref` over the Fashion-MNIST training split (converted with
`edm2 dataset convert`), e.g. from the repo root:

    edm2 metrics ref --data fmnist-train-32.zip --dest fmnist-train-clf.npz --metrics fd_classifier
    edm2 train --outdir runs/demo --preset demo --threads 1 --grid 0
    python benchmarks/demo_recipes.py --rundir runs/demo --ref fmnist-train-clf.npz --std 0.10 --steps 16

Prints a markdown table (and appends it to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def train(rundir: Path, train_args: list[str]) -> None:
    cmd = [sys.executable, "-m", "edm2", "train", "--outdir", str(rundir), *train_args]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_speed(rundir: Path) -> tuple[float, float]:
    """(images/s over the run's status lines, seconds of training) from stats.jsonl."""
    rows = [json.loads(line) for line in (rundir / "stats.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("sec_per_kimg")]
    if not rows:
        return float("nan"), float("nan")
    steps = np.diff([0] + [r["nimg"] for r in rows])
    seconds = float(sum(s * r["sec_per_kimg"] / 1000 for s, r in zip(steps, rows)))
    images = int(sum(steps))
    return images / seconds, seconds


def snapshots_for(rundir: Path, workdir: Path, sigma_rels: list[float], at_nimg: int | None) -> dict:
    """{sigma_rel: snapshot path} at training time at_nimg (default: last snapshot)."""
    from edm2.ema.posthoc import find_phema_inputs, reconstruct, resolve_time
    from edm2.io.snapshot import snapshot_name

    inputs = find_phema_inputs(rundir)
    t = resolve_time(inputs, at_nimg)
    tracked = {round(r.sigma_rel, 6): r.path for r in inputs if r.nimg == t}
    out, wanted = {}, []
    for s in sigma_rels:
        if round(s, 6) in tracked:
            out[s] = Path(tracked[round(s, 6)])
        else:
            wanted.append(s)
    if wanted:
        dest = workdir / "phema" / rundir.name
        have = [s for s in wanted if (dest / snapshot_name(t, s)).is_file()]
        todo = [s for s in wanted if s not in have]
        if todo:
            # Short demo runs have few snapshots: long EMA lengths are reconstructed only roughly.
            reconstruct(rundir, dest, todo, at_nimg=t, progress=False, max_profile_error=0.25)
        out.update({s: dest / snapshot_name(t, s) for s in wanted})
    return t, out


def generate_per_class(snapshot: Path, per_class: int, steps: int, batch: int, solver: str = "heun",
                       gnet: Path | None = None, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [10*per_class, C, H, W] and their requested classes."""
    from edm2.generate import generate_images, load_nets

    net, gnet, encoder, _ = load_nets(str(snapshot), None if guidance == 1 else str(gnet), device="cpu")
    images, labels = [], []
    for c in tqdm(range(10), desc=f"{snapshot.name} classes", leave=False):
        for b in generate_images(net, encoder, range(per_class), class_idx=c, batch_size=batch, device="cpu",
                                 rank=0, world_size=1, num_steps=steps, solver=solver, gnet=gnet,
                                 guidance=guidance):
            images.append(b.images)
            labels.append(torch.full([len(b.images)], c))
    return torch.cat(images), torch.cat(labels)


def save_class_grid(path: Path, images: torch.Tensor, per_class: int, cols: int = 10) -> None:
    """PNG of the first `cols` samples of each class, one row per class."""
    from edm2.utils.fileio import atomic_write_bytes, png_bytes

    cols = min(cols, per_class)
    x = images.reshape(10, per_class, *images.shape[1:])[:, :cols]         # [10, cols, C, H, W]
    c, h, w = x.shape[2:]
    x = x.permute(0, 3, 1, 4, 2).reshape(10 * h, cols * w, c).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(x))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rundir", required=True, type=Path, help="training run folder")
    p.add_argument("--label", default=None, help="row label (default: the run folder's name)")
    p.add_argument("--std", default="0.05,0.10", help="EMA lengths sigma_rel, e.g. 0.05,0.10,0.15 (default 0.05,0.10)")
    p.add_argument("--at-nimg", default="", help="training times in images, e.g. 16Ki,28Ki (default: last snapshot)")
    p.add_argument("--steps", default="32", help="sampler steps, one or several: 16,32 (default 32)")
    p.add_argument("--solver", default="heun", choices=["heun", "euler", "dpm++2m"],
                   help="ODE solver (default heun; make demo samples with dpm++2m)")
    p.add_argument("--gnet", type=Path, default=None, help="guiding network for autoguidance, e.g. the run's own "
                   "early snapshot RUNDIR/snapshot-000000004096-0.050.safetensors")
    p.add_argument("--guidance", default="1", help="guidance weights, one or several: 1,2,2.5 (default 1: none; "
                   "weights other than 1 need --gnet)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (default 100: 1000 in all)")
    p.add_argument("--batch", type=int, default=50, help="images per sampler batch (default 50)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo-recipes"),
                   help="post-hoc EMA snapshots (default runs/demo-recipes)")
    p.add_argument("--detector-dir", default=None, help="folder with classifier.safetensors "
                   "(default $EDM2_DETECTOR_DIR or ~/.cache/edm2/detectors)")
    p.add_argument("--ref", required=True, type=Path, help="fd_classifier reference statistics of the Fashion-MNIST "
                   "training split (.npz of `edm2 metrics ref --metrics fd_classifier`)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="CPU threads (default: OMP_NUM_THREADS, else 2)")
    p.add_argument("--grid-dir", type=Path, default=None, help="also write a PNG per row of the table: the first "
                   "10 samples of each class, one row per class")
    p.add_argument("--out", type=Path, default=None, help="also append the table to this markdown file")
    p.add_argument("--train", action="store_true", help="first train RUNDIR with the edm2 train options after --")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if rest and not args.train:
        p.error(f"unrecognised arguments: {' '.join(rest)} (edm2 train options go after --train --)")
    torch.set_num_threads(args.threads)

    from edm2.utils.units import parse_float_list, parse_nimg

    if args.train:
        train(args.rundir, rest)
    if not args.ref.is_file():
        p.error(f"--ref {args.ref}: no such file; make it with `edm2 metrics ref --data TRAIN_SPLIT.zip "
                f"--dest {args.ref} --metrics fd_classifier`")
    if not (args.rundir / "stats.jsonl").is_file():
        p.error(f"--rundir {args.rundir}: not a training run folder (no stats.jsonl); train it first (--train)")
    sigma_rels = parse_float_list(args.std, "--std")
    steps_list = [int(s) for s in args.steps.split(",")]
    weights = parse_float_list(args.guidance, "--guidance")
    if any(w != 1 for w in weights) and args.gnet is None:
        p.error(f"--guidance {args.guidance}: a weight other than 1 needs a guiding network; give --gnet SNAPSHOT")
    if args.gnet is not None and not args.gnet.is_file():
        p.error(f"--gnet {args.gnet}: no such file; give a snapshot (.safetensors) of the run, e.g. its first one")
    times = [parse_nimg(t, "--at-nimg") for t in args.at_nimg.split(",")] if args.at_nimg else [None]
    args.workdir.mkdir(parents=True, exist_ok=True)

    scorer = ClassifierScore(args.ref, args.detector_dir)
    speed, seconds = train_speed(args.rundir)
    label = args.label or args.rundir.name
    lines = ["| run | images | σ_rel | solver | steps | guidance | consistency (%) | FD (classifier) "
             "| sampling s/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for at in times:
        t, snaps = snapshots_for(args.rundir, args.workdir, sigma_rels, at)
        for s, path in snaps.items():
            for steps in steps_list:
                for w in weights:
                    t0 = time.perf_counter()
                    images, labels = generate_per_class(path, args.per_class, steps, args.batch, args.solver,
                                                        args.gnet, w)
                    per_img = (time.perf_counter() - t0) / len(images)
                    cons, fd = scorer(images, labels)
                    if args.grid_dir:
                        name = f"{label}-{t:09d}-{s:.3f}-{args.solver}-{steps}-w{w:g}.png"
                        save_class_grid(args.grid_dir / name, images, args.per_class)
                    guide = "none" if w == 1 else f"{w:g} ({args.gnet.name})"
                    row = (f"| {label} | {t / 1024:g}Ki | {s:.3f} | {args.solver} | {steps} | {guide} | {cons:.1f} "
                           f"| {fd:.2f} | {per_img:.3f} |")
                    lines.append(row)
                    print(row, flush=True)
    lines.append("")
    lines.append(f"{label}: training {speed:.1f} img/s over {seconds:.0f} s (its status lines); "
                 f"{args.per_class} samples per class; {platform.processor() or platform.machine()}, "
                 f"{args.threads} thread(s) for scoring")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")


class ClassifierScore:
    """Class consistency and FD in the Fashion-MNIST classifier's features
    (edm2.metrics.classifier; reference: the Fashion-MNIST training split)."""

    def __init__(self, ref: Path, detector_dir=None):
        from edm2.metrics import detector_dir as resolve_detector_dir
        from edm2.metrics import load_ref
        from edm2.metrics.detectors import load_classifier

        self.detector = load_classifier(resolve_detector_dir(detector_dir) / "classifier.safetensors")
        self.ref = load_ref(ref)
        if "fd_classifier" not in self.ref:
            raise SystemExit(f"{ref}: no fd_classifier statistics (`edm2 metrics ref --metrics fd_classifier`)")

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
        """(consistency in %, FD) of uint8 images generated for `classes`."""
        from edm2.metrics import FeatureStats, distances
        from edm2.metrics.classifier import class_consistency

        stats = FeatureStats(self.detector.feature_dim)
        with torch.no_grad():
            for i in range(0, len(images), 250):
                stats.append(self.detector(images[i:i + 250]))
        fd = distances({"fd_classifier": stats}, self.ref)["fd_classifier"]
        return 100 * class_consistency(self.detector, images, classes), float(fd)


if __name__ == "__main__":
    main()
