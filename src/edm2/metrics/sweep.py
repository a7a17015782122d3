"""EMA-length sweep (paper Sec. 3.2 / Figure 5): reconstruct a run's network
at several EMA lengths with post-hoc EMA (`edm2.ema.posthoc.reconstruct`),
evaluate each (optionally at several guidance weights, solvers and step
counts) with `gen_metrics`, and write `sweep.csv` and `sweep.png` (metric vs
EMA length, vs guidance when several are given, and vs network evaluations
when several solvers or step counts are given), so the best EMA length, and
the cheapest sampler setting, is one command away.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch.distributed as dist

from ..ema.posthoc import MAX_PROFILE_ERROR, find_phema_inputs, reconstruct, resolve_time
from ..ema.profiles import check_sigma_rel
from ..generate import load_nets
from ..io.snapshot import read_snapshot_meta, snapshot_name
from ..sampling import check_guidance, check_solver_options, sampler_nfe
from ..utils.distributed import init_distributed, resolve_device
from ..utils.errors import EDM2Error, ExistingFileError
from ..utils.fileio import RunLock, atomic_write_bytes, pyplot, save_figure
from ..utils.units import parse_float_list, parse_int_list
from ..utils.validate import check_sampler_options
from .evaluate import check_ref_detectors, gen_metrics, load_detectors, load_ref, resolve_metrics

CSV_NAME, PNG_NAME = "sweep.csv", "sweep.png"
# sweep.csv's columns before the metrics. nfe: the main network's evaluations per image
# (`edm2.sampling.sampler_nfe`; a guided step also evaluates the guide).
SWEEP_KEYS = ("ema_std", "guidance", "solver", "steps", "nfe", "nimg", "num", "seed")


def check_sweep_lengths(sigma_rels, name: str = "sigma_rels") -> list[float]:
    """The EMA lengths of a sweep (list or '0.05,0.1' / '0.010,...,0.250'), duplicates
    dropped, checked by `edm2.ema.profiles.check_sigma_rel` (each in (0, max), and no two
    sharing a snapshot's file name)."""
    values = list(dict.fromkeys(parse_float_list(sigma_rels, name)))
    check_sigma_rel(values, name, distinct=True)
    return values


def write_csv(path, rows: list[dict], metrics: list[str]) -> None:
    """rows -> CSV (ema_std, guidance, solver, steps, nfe, nimg, num, seed, one column per metric),
    atomically. A row is a record of the file: its EMA length sigma_rel is under the file's key `ema_std`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [*SWEEP_KEYS, *metrics], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def best_rows(rows: list[dict], metrics: list[str]) -> dict:
    """{metric: the row with the lowest value}."""
    return {m: min(rows, key=lambda r: r[m]) for m in metrics}


def plot_sweep(rows: list[dict], metrics: list[str], path=None) -> bytes:
    """PNG (bytes; also written to `path`) with one column per metric: top,
    the metric against the EMA length sigma_rel, one line per guidance weight
    (like the paper's Figure 5), the best point ringed; next (with several
    guidance weights), the metric against guidance, one line per EMA length;
    last (with several solvers or step counts), the metric against network
    evaluations (nfe), one line per solver. The first two use the rows of the
    first solver at its most steps."""
    plt = pyplot()

    all_rows = rows
    samplers = list(dict.fromkeys((r.get("solver", "heun"), r.get("steps")) for r in all_rows))
    ref_solver = samplers[0][0]
    ref_steps = max(st for so, st in samplers if so == ref_solver)
    rows = [r for r in all_rows if (r.get("solver", "heun"), r.get("steps")) == (ref_solver, ref_steps)]
    sigma_rels = sorted({r["ema_std"] for r in rows})
    ws = sorted({r["guidance"] for r in rows})
    nfe_row = len(samplers) > 1
    nrows = 1 + (len(ws) > 1) + nfe_row
    fig, axes = plt.subplots(nrows, len(metrics), figsize=(4.5 * len(metrics), 3.6 * nrows), squeeze=False)
    for col, m in enumerate(metrics):
        if nfe_row:
            ax3 = axes[-1, col]
            curves = dict.fromkeys((r["solver"], r["ema_std"], r["guidance"]) for r in all_rows)
            for so, sr, w in curves:
                pts = sorted((r["nfe"], r[m]) for r in all_rows
                             if (r["solver"], r["ema_std"], r["guidance"]) == (so, sr, w))
                extra = (f", sigma_rel {sr:.3f}" if len(sigma_rels) > 1 else "") + (f", w {w:g}" if len(ws) > 1 else "")
                ax3.plot(*zip(*pts), "o-", ms=3, label=so + extra)
            ax3.set_xlabel("network evaluations per image (NFE)")
            ax3.set_ylabel(m)
            ax3.grid(alpha=0.3)
            ax3.legend(fontsize=7)
        ax = axes[0, col]
        for w in ws:
            pts = sorted((r["ema_std"], r[m]) for r in rows if r["guidance"] == w)
            ax.plot(*zip(*pts), "o-", ms=3, label=f"guidance {w:g}")
        best = min(rows, key=lambda r: r[m])
        ax.plot(best["ema_std"], best[m], "o", ms=10, mfc="none", color="k")
        ax.set_title(f"{m}: best {best[m]:.3f} at sigma_rel {best['ema_std']:.3f}"
                     + (f", w {best['guidance']:g}" if len(ws) > 1 else "")
                     + (f" ({ref_solver}, {ref_steps} steps)" if nfe_row else ""), fontsize=9)
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        if len(ws) > 1:
            ax.legend(fontsize=7)
            ax2 = axes[1, col]
            for s in sigma_rels:
                pts = sorted((r["guidance"], r[m]) for r in rows if r["ema_std"] == s)
                ax2.plot(*zip(*pts), "o-", ms=3, label=f"sigma_rel {s:.3f}")
            ax2.set_xlabel("guidance weight")
            ax2.set_ylabel(m)
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=7)
    nimg, num = rows[0]["nimg"], rows[0]["num"]
    fig.suptitle(f"post-hoc EMA sweep at nimg={nimg}, {num} images per point", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def sweep(rundir, sigma_rels, ref, outdir=None, at_nimg=None, metrics=None, num: int = 50000, seed: int = 0,
          gnet=None, guidance=(1.0,), batch_size: int = 32, detector_dir=None, device=None,
          progress: bool = True, detectors: dict | None = None, solvers=("heun",), steps=None,
          guidance_interval=None, max_profile_error=MAX_PROFILE_ERROR,
          **sampler_kwargs) -> list[dict]:
    """Reconstruct `rundir` at each EMA length in `sigma_rels` (list or '0.05,0.1' /
    '0.010,0.015,...,0.250') at time `at_nimg` (default: the last snapshot) into
    `outdir` (default rundir/sweep), evaluate every (EMA length, guidance, solver,
    steps) combination on `num` generated images against `ref`, and write
    outdir/sweep.csv (after every point) and outdir/sweep.png. Returns the rows
    (dicts with ema_std (the EMA length sigma_rel, under sweep.csv's column name),
    guidance, solver, steps, nfe (`edm2.sampling.sampler_nfe`), nimg, num, seed and
    one value per metric).
    solvers: names of `edm2.sampling.SOLVERS` (list or 'heun,dpm++2m'); steps: step
    counts (list or '8,12,16,32'; default sampler_kwargs' num_steps, else 32);
    guidance_interval: (sigma_lo, sigma_hi) for every guided point (docs/sampling.md).
    max_profile_error: the largest relative L2 profile error of a reconstruction accepted
    (edm2.ema.posthoc.reconstruct; None: no check).
    Under torchrun rank 0 reconstructs and writes, all processes generate."""
    sigma_rels = check_sweep_lengths(sigma_rels, "sigma_rels")
    ws = list(dict.fromkeys(parse_float_list(guidance, "guidance")))
    for w in ws:
        check_guidance(w, gnet)
    if "solver" in sampler_kwargs:  # one solver given as gen_metrics takes it
        solvers = [sampler_kwargs.pop("solver")]
    if steps is None:
        steps = [sampler_kwargs.pop("num_steps", 32)]
    elif "num_steps" in sampler_kwargs:
        raise EDM2Error("`num_steps` and `steps` both given; pass the step counts as `steps`")
    steps = list(dict.fromkeys(parse_int_list(steps, "steps")))
    solvers = list(dict.fromkeys(solvers.split(",") if isinstance(solvers, str) else solvers))
    check_sampler_options(sampler_kwargs)
    for n in steps:
        check_sampler_options({"num_steps": n})
    for solver in solvers:  # an interval needs a guided point (it applies to those with guidance != 1)
        check_solver_options(solver, guidance_interval, sampler_kwargs.get("S_churn", 0.0),
                             guidance=1 if all(w == 1 for w in ws) else None)
    ref_path, ref = (ref, load_ref(ref)) if not isinstance(ref, dict) else ("REF", ref)
    metrics = resolve_metrics(metrics, ref, ref_path)
    outdir = Path(outdir) if outdir is not None else Path(rundir) / "sweep"
    csv_path, png_path = outdir / CSV_NAME, outdir / PNG_NAME
    for p in (csv_path, png_path):
        if p.exists():
            raise ExistingFileError(f"{p}: a sweep was already written there; choose another `outdir`")
    rank, world = init_distributed()
    device = resolve_device(device)
    if gnet is not None:  # fail before the reconstruction if the guide does not fit the run's network
        inputs = find_phema_inputs(rundir)
        if inputs:
            load_nets(inputs[-1].path, gnet, "cpu")
    detectors = {m: detectors[m] for m in metrics} if detectors else load_detectors(metrics, detector_dir, device)
    check_ref_detectors(ref, detectors, ref_path)

    # The whole sweep holds the folder's lock: a second sweep into it is refused instead of
    # replacing this one's CSV and figure.
    lock = RunLock(outdir, "`outdir`").acquire() if rank == 0 else None
    try:
        return _sweep_locked(rundir, sigma_rels, ws, ref, outdir, csv_path, png_path, at_nimg, metrics, num, seed,
                             gnet, batch_size, device, progress, detectors, rank, world, solvers, steps,
                             guidance_interval, max_profile_error, sampler_kwargs)
    finally:
        if lock is not None:
            lock.release()


def _sweep_locked(rundir, sigma_rels, ws, ref, outdir, csv_path, png_path, at_nimg, metrics, num, seed, gnet,
                  batch_size, device, progress, detectors, rank, world, solvers, steps, guidance_interval,
                  max_profile_error, sampler_kwargs) -> list[dict]:
    if rank == 0:
        for p in (csv_path, png_path):  # again, now that the folder is ours
            if p.exists():
                raise ExistingFileError(f"{p}: a sweep was already written there; choose another `outdir`")
        # Snapshots left by an interrupted sweep are rebuilt unless they are exactly this reconstruction
        # (posthoc never replaces the run's own snapshots); the sweep already holds the folder's lock.
        paths = reconstruct(rundir, outdir, sigma_rels, at_nimg=at_nimg, overwrite=True, progress=progress,
                            max_profile_error=max_profile_error, lock=False)
    if world > 1:
        dist.barrier()
    if rank != 0:
        t = resolve_time(find_phema_inputs(rundir), at_nimg)
        paths = [outdir / snapshot_name(t, s) for s in sigma_rels]

    rows = []
    for path, sigma_rel in zip(paths, sigma_rels):
        nimg = int(read_snapshot_meta(path)["nimg"])
        for w in ws:
            for solver in solvers:
                for n in steps:
                    values = gen_metrics(path, ref, gnet=gnet if w != 1 else None, guidance=w, metrics=metrics,
                                         num=num, seed=seed, batch_size=batch_size, device=device,
                                         progress=progress, detectors=detectors, solver=solver, num_steps=n,
                                         guidance_interval=guidance_interval if w != 1 else None, **sampler_kwargs)
                    rows.append({"ema_std": sigma_rel, "guidance": w, "solver": solver, "steps": n,
                                 "nfe": sampler_nfe(solver, n), "nimg": nimg, "num": num, "seed": seed, **values})
                    if rank == 0:
                        write_csv(csv_path, rows, metrics)
                        if progress:
                            print(f"sigma_rel {sigma_rel:.4f}  guidance {w:g}  {solver} {n} steps  " +
                                  "  ".join(f"{m} {values[m]:.4f}" for m in metrics), flush=True)
    if rank == 0:
        plot_sweep(rows, metrics, png_path)
    return rows
