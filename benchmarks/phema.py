"""Benchmark: post-hoc EMA by streaming (edm2.ema.posthoc.reconstruct) against the
whole-models-in-memory way (the official tool's: batches of 8 outputs held as
fp32 models, every input loaded whole once per batch).

Synthetic run: `--snapshots` files (half at sigma_rel 0.05, half at 0.10, every
8Mi images) of a real architecture (`--preset`, default img512-s) with the
initial weights scaled per snapshot, stored in `--dtype` (fp16 halves the disk).
Each method runs in its own process; peak RSS is its VmHWM (Linux). Outputs of the
two methods are compared (first and last profile). Prints a markdown table;
`--out FILE.md` writes it. Disk: about (snapshots + outputs + 2) files, i.e.
~55 GB for the default img512-s setting in fp16 (checked before starting).

    .venv/bin/python benchmarks/phema.py                          # img512-s, 64 snapshots -> 31 outputs
    .venv/bin/python benchmarks/phema.py --preset tiny --snapshots 16 --outputs 5   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edm2.ema.posthoc import find_phema_inputs, plan_posthoc, reconstruct, resolve_time
from edm2.io.snapshot import SnapshotStreamWriter, make_meta, save_state_dict, snapshot_name
from edm2.nn import Precond
from edm2.presets import get_preset

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
STEP = 8 * 2 ** 20  # images between snapshots (the paper's default, App. C.5)


def output_sigma_rels(n: int) -> list[float]:
    """n sigma_rel values spread over the paper's sweep range 0.010 .. 0.250."""
    return [round(float(s), 6) for s in np.linspace(0.010, 0.250, n)]


def make_inputs(rundir: Path, preset: str, count: int, dtype: torch.dtype) -> tuple[int, int]:
    """Write `count` synthetic EMA snapshots; returns (bytes of one file, parameters)."""
    p = get_preset(preset)
    kw = p.net_kwargs(1000 if p.latent else 0)
    torch.manual_seed(0)
    net = Precond(**kw)
    state, buffers = net.state_dict(), {k for k, _ in net.named_buffers()}
    del net
    specs = [(k, v.dtype if k in buffers else dtype, tuple(v.shape)) for k, v in state.items()]
    rundir.mkdir(parents=True, exist_ok=True)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    for i in range(count):
        nimg, sigma_rel = STEP * (i // 2 + 1), (0.05, 0.10)[i % 2]
        meta = make_meta(kw, nimg, sigma_rel, {"type": "rgb"}, {"resolution": p.img_resolution}, {"benchmark": True})
        w = SnapshotStreamWriter(rundir / snapshot_name(nimg, sigma_rel), specs, meta)
        for (k, _, _), v in zip(specs, state.values()):  # numpy: cheap on a busy CPU
            w.write(v if k in buffers else torch.from_numpy(np.asarray(v.numpy() * (1 + 0.01 * i), dtype=np_dtype)))
        w.commit()
    n_params = sum(v.numel() for k, v in state.items() if k not in buffers)
    return (rundir / snapshot_name(STEP, 0.05)).stat().st_size, n_params


def whole_models(rundir: Path, outdir: Path, sigma_rels: list[float], batch: int = 8) -> None:
    """The baseline: per batch of outputs, fp32 accumulators of whole models; every
    input file loaded whole (into memory) once per batch."""
    from safetensors.torch import load_file

    inputs = find_phema_inputs(rundir)
    plan = plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs], sigma_rels, resolve_time(inputs),
                        inputs)
    buffers = {"unet.emb_fourier.freqs", "unet.emb_fourier.phases", "logvar_fourier.freqs", "logvar_fourier.phases"}
    for b0 in range(0, len(sigma_rels), batch):
        acc = None
        for i, r in enumerate(plan.inputs):
            state = load_file(str(r.path))
            dtypes = {k: v.dtype for k, v in state.items()}  # the outputs keep the inputs' dtypes
            state = {k: v if k in buffers else v.float() for k, v in state.items()}
            if acc is None:
                acc = [{k: torch.zeros(v.shape, dtype=torch.float32) for k, v in state.items()}
                       for _ in sigma_rels[b0:b0 + batch]]
            for j, a in enumerate(acc):
                for k, v in state.items():
                    if k in buffers:  # copied, not averaged
                        a[k] = v
                    else:
                        a[k].add_(v, alpha=float(plan.coeffs[i, b0 + j]))
            del state
        for j, a in enumerate(acc):
            sigma_rel = sigma_rels[b0 + j]
            meta = dict(plan.inputs[-1].meta, ema_std=sigma_rel, nimg=plan.at_nimg)
            save_state_dict(outdir / snapshot_name(plan.at_nimg, sigma_rel), {k: v.to(dtypes[k]) for k, v in a.items()},
                            meta)
        del acc


def child(args) -> None:
    sigma_rels = output_sigma_rels(args.outputs)
    t0 = time.perf_counter()
    if args.child == "stream":
        reconstruct(args.rundir, args.outdir, sigma_rels, progress=False, max_profile_error=None)  # speed only
    elif args.child == "whole":
        whole_models(Path(args.rundir), Path(args.outdir), sigma_rels)
    seconds = time.perf_counter() - t0
    # VmHWM: peak resident memory of this process since exec (a fork's ru_maxrss would
    # start from the parent's RSS). Includes the mapped pages of the input files.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_gb": hwm_kb * 1024 / 1e9}))


def run_child(mode: str, rundir: Path, outdir: Path, outputs: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--rundir", str(rundir), "--outdir", str(outdir),
           "--outputs", str(outputs)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=True)
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def compare(dir_a: Path, dir_b: Path) -> float:
    """Largest |a - b| / max|b| over every tensor of the outputs kept in dir_a (first and last profile)."""
    from safetensors import safe_open

    worst = 0.0
    for path in sorted(dir_a.glob("snapshot-*.safetensors")):
        with safe_open(str(path), "pt") as fa, safe_open(str(dir_b / path.name), "pt") as fb:
            for k in fa.keys():
                a, b = fa.get_tensor(k).double(), fb.get_tensor(k).double()
                worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="img512-s", help="architecture of the synthetic snapshots (default img512-s)")
    ap.add_argument("--snapshots", type=int, default=64, help="input files, half per stored profile (default 64)")
    ap.add_argument("--outputs", type=int, default=31, help="output profiles, 0.010..0.250 (default 31)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="dtype of the snapshot files (default fp16)")
    ap.add_argument("--methods", default="stream,whole", help="which to run (default stream,whole)")
    ap.add_argument("--workdir", help="scratch folder (default: a new one in the system temp folder, removed after)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rundir", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edm2-phema-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    p = get_preset(args.preset)
    with torch.device("meta"):
        n_elems = sum(v.numel() for v in Precond(**p.net_kwargs(1000 if p.latent else 0)).state_dict().values())
    need = (args.snapshots + args.outputs + 2) * n_elems * (2 if args.dtype == "fp16" else 4)
    if shutil.disk_usage(work).free < need * 1.05:
        raise SystemExit(f"{work}: needs about {need / 1e9:.0f} GB free disk (inputs + outputs); use --workdir "
                         f"elsewhere or a smaller --preset/--snapshots")
    try:
        t0 = time.perf_counter()
        size, n_params = make_inputs(work / "run", args.preset, args.snapshots, DTYPES[args.dtype])
        make_s = time.perf_counter() - t0
        idle = run_child("none", work / "run", work / "none", args.outputs)
        rows, dirs = [], {}
        methods = args.methods.split(",")
        for m in methods:
            dirs[m] = work / f"out-{m}"
            r = run_child(m, work / "run", dirs[m], args.outputs)
            passes = 1 if m == "stream" else math.ceil(args.outputs / 8)
            rows.append(f"| {m} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                        f"{passes * args.snapshots * size / 1e9:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)  # partial results survive an interrupted run
            if m == methods[0]:  # keep two outputs to compare with the other method; free the disk
                for path in sorted(dirs[m].glob("snapshot-*.safetensors"))[1:-1]:
                    path.unlink()
        diff = compare(dirs[methods[0]], dirs[methods[1]]) if len(methods) == 2 else float("nan")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        f"post-hoc EMA: {args.snapshots} snapshots of preset {args.preset} ({n_params / 1e6:.1f}M parameters, "
        f"{args.dtype} files of {size / 1e6:.0f} MB) "
        f"-> {args.outputs} profiles; inputs written in {make_s:.0f} s",
        "",
        "| method | time (s) | peak RSS (GB) | input data read (GB) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Peak RSS of a process that only imports edm2: {idle['peak_rss_gb']:.2f} GB. "
        f"Largest relative difference between the methods' outputs: {diff:.1e}.",
    ])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
