"""Quality against cost of the sampler's solvers: for every (solver, steps) point,
FD in a classifier's features (fd_classifier), class consistency (fraction of
samples the classifier assigns to the class they were generated for) and
wall-clock seconds per image, against network evaluations (NFE, main network;
docs/sampling.md#counting-network-evaluations). Guided runs are measured with
guidance on every step and, with --guidance-interval, in the interval only.

Writes OUT.csv and OUT.png (FD vs NFE and consistency vs NFE, one line per
solver and guidance variant) and prints, per variant, the cheapest setting
whose FD is within 5 % of Heun at 32 steps, with its s/img against Heun-32's
measured in the same run.

    python benchmarks/sampler_nfe.py --net RUN_OR_SNAPSHOT --ref REF.npz --detector-dir DIR \\
        --num 2000 --solvers heun,euler,dpm++2m --steps 8,12,16,32 --out sampler_nfe
    python benchmarks/sampler_nfe.py --net NET --gnet GUIDE --guidance 2 --guidance-interval 0.28,1.61 \\
        --ref REF.npz --detector-dir DIR --num 20 --steps 8,32      # quick check

`--figure OUT.png --cond A.csv B.csv --uncond C.csv` draws one figure from the
CSVs of earlier runs instead (conditional FD and consistency, unconditional FD,
against all network evaluations, main and guide).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch

from edm2.generate import generate_images, load_nets
from edm2.metrics import FeatureStats, distances, load_ref
from edm2.metrics import detector_dir as resolve_detector_dir
from edm2.metrics.detectors import load_classifier
from edm2.metrics.evaluate import gen_seeds
from edm2.sampling import SOLVERS, check_guidance_interval, sampler_nfe
from edm2.utils.fileio import atomic_write_bytes, pyplot, save_figure
from edm2.utils.units import parse_int_list

COLUMNS = ["variant", "solver", "steps", "nfe", "guide_nfe", "fd_classifier", "consistency", "s_per_img"]
REFERENCE = ("heun", 32)   # the setting the others are compared with
TOLERANCE = 0.05           # "within 5 % of Heun-32's FD"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--net", required=True, help="snapshot file or run folder (conditional, for consistency)")
    p.add_argument("--gnet", help="guiding network (unconditional for CFG, weaker for autoguidance)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (default 1: none)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="also measure guidance only in LO < sigma <= HI (needs --gnet and --guidance)")
    p.add_argument("--ref", required=True, help="reference statistics with fd_classifier (`edm2 metrics ref`)")
    p.add_argument("--detector-dir", help="folder with classifier.safetensors (default: edm2's detector folder)")
    p.add_argument("--num", type=int, default=2000, help="samples per point (default 2000)")
    p.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated (default {','.join(SOLVERS)})")
    p.add_argument("--steps", default="8,12,16,32",
                   help="comma-separated step counts for every solver (default 8,12,16,32), or per solver: "
                        "'heun:4,8,16,32/dpm++2m:6,8,12,16' (then --solvers is taken from it)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed k: seeds k*num ... (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--out", default="sampler_nfe", help="output stem: OUT.csv, OUT.png (default sampler_nfe)")
    args = p.parse_args(argv)
    if ":" in args.steps:  # per solver
        parts = [part.split(":", 1) for part in args.steps.split("/")]
        if any(len(part) != 2 for part in parts):
            p.error(f"--steps {args.steps}: give every solver its steps, e.g. 'heun:8,16,32/dpm++2m:6,8'")
        per = dict(parts)
        args.solvers = [s.strip() for s in per]
        args.steps = {s.strip(): sorted(set(parse_int_list(v, "steps"))) for s, v in per.items()}
    else:
        args.solvers = list(dict.fromkeys(s.strip() for s in args.solvers.split(",")))
        steps = sorted(set(parse_int_list(args.steps, "steps")))
        args.steps = {s: steps for s in args.solvers}
    for s in args.solvers:
        if s not in SOLVERS:
            p.error(f"--solvers: unknown solver {s!r}; allowed: {', '.join(SOLVERS)}")
    if args.guidance != 1 and not args.gnet:
        p.error("--guidance needs --gnet")
    if args.guidance_interval is not None:
        if args.guidance == 1:
            p.error("--guidance-interval needs --gnet and --guidance != 1")
        args.guidance_interval = check_guidance_interval(args.guidance_interval)
    if args.num < 2:
        p.error("--num: need at least 2 samples")
    return args


def points(args) -> list[tuple[str, str, int]]:
    """(variant, solver, steps) to measure; Heun-32 is always included (the reference)."""
    variants = ["unguided"] if args.guidance == 1 else ["guided"]
    if args.guidance_interval is not None:
        variants.append("interval")
    grid = [(s, n) for s in args.solvers for n in args.steps[s]]
    if REFERENCE not in grid:
        grid.insert(0, REFERENCE)
    return [(v, s, n) for v in variants for s, n in grid]


def measure(net, gnet, encoder, detector, ref, args, variant, solver, steps) -> dict:
    """Generate args.num images at one point; FD, consistency and s/img (generation only)."""
    guided = variant != "unguided"
    interval = args.guidance_interval if variant == "interval" else None
    stats, hits, total, seconds = FeatureStats(detector.feature_dim), 0, 0, 0.0
    sync = torch.cuda.synchronize if args.device_obj.type == "cuda" else (lambda: None)
    batches = generate_images(net, encoder, gen_seeds(args.num, args.seed), gnet=gnet if guided else None,
                              guidance=args.guidance if guided else 1.0, batch_size=args.batch,
                              device=args.device_obj, rank=0, world_size=1, num_steps=steps, solver=solver,
                              guidance_interval=interval)
    while True:
        sync()
        t = time.perf_counter()
        b = next(batches, None)
        sync()
        seconds += time.perf_counter() - t
        if b is None:
            break
        with torch.no_grad():
            features = detector.classifier.features(detector.classifier.prepare(b.images.to(args.device_obj)))
            stats.append(features)
            if b.classes is not None:
                hits += int((detector.classifier.head(features).argmax(dim=1).cpu() == b.classes).sum())
        total += len(b)
    fd = float(distances({"fd_classifier": stats}, ref)["fd_classifier"])
    guide_nfe = (sampler_nfe(solver, steps, guide=True, guidance_interval=interval) - sampler_nfe(solver, steps)
                 if guided else 0)
    return {"variant": variant, "solver": solver, "steps": steps, "nfe": sampler_nfe(solver, steps),
            "guide_nfe": guide_nfe, "fd_classifier": fd,
            "consistency": hits / total if net.label_dim else float("nan"), "s_per_img": seconds / total}


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    for key, ax, label in (("fd_classifier", axes[0], "FD (classifier features)"),
                           ("consistency", axes[1], "class consistency")):
        for variant, solver in dict.fromkeys((r["variant"], r["solver"]) for r in rows):
            pts = sorted((r["nfe"], r[key]) for r in rows if (r["variant"], r["solver"]) == (variant, solver))
            # One colour per solver; the guidance interval dashed.
            ax.plot(*zip(*pts), "o--" if variant == "interval" else "o-", ms=3, color=f"C{solvers.index(solver)}",
                    label=f"{solver} ({variant})")
        ax.set_xlabel("network evaluations per image (NFE, main network)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def recommend(rows: list[dict]) -> list[str]:
    """Per variant: the cheapest setting (fewest NFE, then s/img) with FD within 5 % of Heun-32's."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        ref = next(r for r in mine if (r["solver"], r["steps"]) == REFERENCE)
        ok = [r for r in mine if r["fd_classifier"] <= (1 + TOLERANCE) * ref["fd_classifier"]]
        best = min(ok, key=lambda r: (r["nfe"] + r["guide_nfe"], r["s_per_img"]))
        out.append(f"{variant}: {best['solver']} {best['steps']} steps, NFE {best['nfe']} "
                   f"(+{best['guide_nfe']} guide), "
                   f"FD {best['fd_classifier']:.3f} vs Heun-32 {ref['fd_classifier']:.3f}; "
                   f"{best['s_per_img']:.4f} s/img vs Heun-32 {ref['s_per_img']:.4f} s/img "
                   f"({ref['s_per_img'] / best['s_per_img']:.2f}x faster)")
    return out


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("steps", "nfe", "guide_nfe"):
            r[k] = int(r[k])
        for k in ("fd_classifier", "consistency", "s_per_img"):
            r[k] = float(r[k])
    return rows


def figure(path: Path, cond: list[dict], uncond: list[dict]) -> None:
    """FD and consistency of a conditional net, FD of an unconditional one, against
    evaluations of both networks per image (main + guide)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((cond, "fd_classifier", "conditional: FD (classifier features)"),
              (cond, "consistency", "conditional: class consistency"),
              (uncond, "fd_classifier", "unconditional: FD (classifier features)"))
    styles = {"unguided": "-", "guided": ":", "interval": "--"}
    for ax, (rows, key, title) in zip(axes, panels):
        for variant, solver in dict.fromkeys((r["variant"], r["solver"]) for r in rows):
            pts = sorted((r["nfe"] + r["guide_nfe"], r[key]) for r in rows
                         if (r["variant"], r["solver"]) == (variant, solver))
            ax.plot(*zip(*pts), "o" + styles.get(variant, "-"), ms=3, color=f"C{SOLVERS.index(solver)}",
                    label=f"{solver}, {variant}")
        ax.set_xscale("log", base=2)
        if key == "fd_classifier":
            ax.set_yscale("log")
        ax.set_xlabel("network evaluations per image (main + guide)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--figure" in argv:
        f = argparse.ArgumentParser(description="one figure from earlier runs' CSVs")
        f.add_argument("--figure", required=True)
        f.add_argument("--cond", nargs="+", required=True)
        f.add_argument("--uncond", nargs="*", default=[])
        fa = f.parse_args(argv)
        figure(Path(fa.figure), [r for c in fa.cond for r in read_csv(c)], [r for c in fa.uncond for r in read_csv(c)])
        print(f"wrote {fa.figure}")
        return 0
    args = parse_args(argv)
    args.device_obj = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, gnet, encoder, _ = load_nets(args.net, args.gnet, args.device_obj)
    detector = load_classifier(resolve_detector_dir(args.detector_dir) / "classifier.safetensors")
    detector.classifier.to(args.device_obj)
    ref = load_ref(args.ref)
    if "fd_classifier" not in ref:
        raise SystemExit(f"{args.ref}: no fd_classifier statistics (`edm2 metrics ref --metrics fd_classifier`)")
    rows = []
    for variant, solver, steps in points(args):
        rows.append(measure(net, gnet, encoder, detector, ref, args, variant, solver, steps))
        r = rows[-1]
        print(f"{variant:9s} {solver:8s} {steps:3d} steps  NFE {r['nfe']:3d}  FD {r['fd_classifier']:.4f}  "
              f"consistency {r['consistency']:.3f}  {r['s_per_img']:.4f} s/img", flush=True)
        write_csv(Path(args.out + ".csv"), rows)
    plot(Path(args.out + ".png"), rows)
    for line in recommend(rows):
        print("cheapest within 5 % of Heun-32's FD, " + line)
    print(f"wrote {args.out}.csv and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
