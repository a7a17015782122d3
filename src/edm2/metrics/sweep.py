"""EMA-length sweep (paper Sec. 3.2 / Figure 5): reconstruct a run's network
at several EMA lengths with post-hoc EMA (`edm2.ema.posthoc.reconstruct`),
evaluate each (optionally at several guidance weights, solvers and step
counts, snapshot times and seed sets) with `gen_metrics`, and write `sweep.csv`
and `sweep.png` (metric vs EMA length, vs guidance when several are given, and
vs network evaluations when several solvers or step counts are given), so the
best EMA length, and the cheapest sampler setting, is one command away.

The paper's EMA analysis (docs/ema-analysis.md; figures in
`edm2.analysis.ema_analysis`): several times give `sweep-time.png` (the
optimum's drift, Fig. 5c), several guidance weights `sweep-guidance.png` (EMA
length x guidance heat map), and `groups` the per-group sensitivity
(`groups.csv`, `groups.png`, Fig. 5b).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch.distributed as dist
from safetensors.torch import load_file

from ..analysis.ema_analysis import (
    group_tensors,
    optimum,
    plot_groups,
    plot_guidance_heatmap,
    plot_times,
)
from ..ema.posthoc import (
    MAX_PROFILE_ERROR,
    check_profile_error,
    find_phema_inputs,
    plan_posthoc,
    reconstruct,
    resolve_time,
)
from ..ema.profiles import check_sigma_rel
from ..generate import load_nets
from ..io.snapshot import read_snapshot_meta, save_state_dict, snapshot_name
from ..sampling import check_guidance, check_solver_options, sampler_nfe
from ..utils.distributed import init_distributed, resolve_device
from ..utils.errors import EDM2Error, ExistingFileError
from ..utils.fileio import RunLock, atomic_write_bytes, pyplot, save_figure
from ..utils.units import parse_float_list, parse_int_list, parse_nimg
from ..utils.validate import check_sampler_options
from .evaluate import check_ref_detectors, gen_metrics, load_detectors, load_ref, resolve_metrics

CSV_NAME, PNG_NAME = "sweep.csv", "sweep.png"
TIME_PNG, GUIDANCE_PNG = "sweep-time.png", "sweep-guidance.png"
GROUPS_CSV, GROUPS_PNG, GROUPS_DIR = "groups.csv", "groups.png", "groups"
# sweep.csv's columns before the metrics. nfe: the main network's evaluations per image
# (`edm2.sampling.sampler_nfe`; a guided step also evaluates the guide); seeds: the number K of
# disjoint seed sets (evaluation seeds seed ... seed+K-1) each point was evaluated with. After
# them, per metric, its mean over the K sets and `<metric>_std`, their standard deviation (0 for K = 1).
SWEEP_KEYS = ("ema_std", "guidance", "solver", "steps", "nfe", "nimg", "num", "seed", "seeds")
GROUP_KEYS = ("group", "tensors", "base_std")


def check_sweep_lengths(sigma_rels, name: str = "sigma_rels") -> list[float]:
    """The EMA lengths of a sweep (list or '0.05,0.1' / '0.010,...,0.250'), duplicates
    dropped, checked by `edm2.ema.profiles.check_sigma_rel` (each in (0, max), and no two
    sharing a snapshot's file name)."""
    values = list(dict.fromkeys(parse_float_list(sigma_rels, name)))
    check_sigma_rel(values, name, distinct=True)
    return values


def row_metrics(rows: list[dict]) -> list[str]:
    """The metric names of sweep rows (the columns that are neither keys nor spreads)."""
    return [k for k in rows[0] if k not in SWEEP_KEYS and k not in GROUP_KEYS and not k.endswith("_std")]


def write_csv(path, rows: list[dict], metrics: list[str], keys=SWEEP_KEYS) -> None:
    """rows -> CSV (ema_std, guidance, solver, steps, nfe, nimg, num, seed, seeds, one column per metric,
    then one `<metric>_std` per metric where the rows have it), atomically. A row is a record of the
    file: its EMA length sigma_rel is under the file's key `ema_std`."""
    buf = io.StringIO()
    spreads = [f"{m}_std" for m in metrics if f"{m}_std" in rows[0]] if rows else []
    writer = csv.DictWriter(buf, [*keys, *metrics, *spreads], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def best_rows(rows: list[dict], metrics: list[str]) -> dict:
    """{metric: the row with the lowest (mean) value}."""
    return {m: min(rows, key=lambda r: r[m]) for m in metrics}


def mean_and_spread(results: list[dict], metrics: list[str]) -> dict:
    """The results of one point on K seed sets ({metric: value} each) -> {metric: mean,
    `<metric>_std`: standard deviation over the sets (ddof=1; 0 for K = 1)}."""
    out = {}
    for m in metrics:
        v = np.array([r[m] for r in results], dtype=np.float64)
        out[m] = float(v.mean())
        out[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def plot_sweep(rows: list[dict], metrics: list[str], path=None) -> bytes:
    """PNG (bytes; also written to `path`) with one column per metric: top,
    the metric against the EMA length sigma_rel, one line per guidance weight
    (like the paper's Figure 5), the best point ringed; next (with several
    guidance weights), the metric against guidance, one line per EMA length;
    last (with several solvers or step counts), the metric against network
    evaluations (nfe), one line per solver. The first two use the rows of the
    first solver at its most steps; with several snapshot times, the rows of the last
    (`plot_times` draws all). A band is one spread (several seed sets)."""
    plt = pyplot()

    last = max(r["nimg"] for r in rows)
    all_rows = rows = [r for r in rows if r["nimg"] == last]
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
            pts = sorted((r["ema_std"], r[m], r.get(f"{m}_std") or 0.0) for r in rows if r["guidance"] == w)
            x, y, s = (np.array(v) for v in zip(*pts))
            line, = ax.plot(x, y, "o-", ms=3, label=f"guidance {w:g}")
            if s.any():
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15, lw=0)
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


def check_sweep_times(at_nimg) -> list:
    """The snapshot times of a sweep: None (the last snapshot), a number of training images, or a
    list ('4Mi,8Mi' or [4194304, 8388608]) -> [None] or the times, duplicates dropped, in order."""
    if at_nimg is None:
        return [None]
    items = at_nimg if isinstance(at_nimg, (list, tuple)) else str(at_nimg).split(",")
    times = [parse_nimg(v.strip() if isinstance(v, str) else v, "at_nimg") for v in items
             if not (isinstance(v, str) and not v.strip())]
    if not times:
        raise EDM2Error(f"at_nimg={at_nimg}: no time; give training images, e.g. 8Mi or 4Mi,8Mi")
    return sorted(dict.fromkeys(int(t) for t in times))


def check_eval_seeds(eval_seeds) -> int:
    if isinstance(eval_seeds, bool) or not isinstance(eval_seeds, (int, np.integer)) or eval_seeds < 1:
        raise EDM2Error(f"eval_seeds={eval_seeds!r}: must be a whole number >= 1 (disjoint seed sets per point)")
    return int(eval_seeds)


def curve_optimum(rows: list[dict], metric: str) -> dict:
    """`edm2.analysis.ema_analysis.optimum` of the curve (same nimg, guidance, solver, steps) holding
    the best point of `rows`."""
    best = min(rows, key=lambda r: r[metric])
    same = ("nimg", "guidance", "solver", "steps")
    return optimum([r for r in rows if all(r.get(k) == best.get(k) for k in same)], metric)


def sweep(rundir, sigma_rels, ref, outdir=None, at_nimg=None, metrics=None, num: int = 50000, seed: int = 0,
          gnet=None, guidance=(1.0,), batch_size: int = 32, detector_dir=None, device=None,
          progress: bool = True, detectors: dict | None = None, solvers=("heun",), steps=None,
          guidance_interval=None, max_profile_error=MAX_PROFILE_ERROR, eval_seeds: int = 1,
          groups=None, base_std=None, **sampler_kwargs) -> list[dict]:
    """Reconstruct `rundir` at each EMA length in `sigma_rels` (list or '0.05,0.1' /
    '0.010,0.015,...,0.250') at time `at_nimg` (default: the last snapshot; a list or '4Mi,8Mi':
    each of several times) into `outdir` (default rundir/sweep), evaluate every (time, EMA length,
    guidance, solver, steps) combination on `num` generated images against `ref`, and write
    outdir/sweep.csv (after every point) and outdir/sweep.png. Returns the rows
    (dicts with ema_std (the EMA length sigma_rel, under sweep.csv's column name),
    guidance, solver, steps, nfe (`edm2.sampling.sampler_nfe`), nimg, num, seed, seeds, and
    per metric its mean and `<metric>_std`).
    solvers: names of `edm2.sampling.SOLVERS` (list or 'heun,dpm++2m'); steps: step
    counts (list or '8,12,16,32'; default sampler_kwargs' num_steps, else 32);
    guidance_interval: (sigma_lo, sigma_hi) for every guided point (docs/sampling.md).
    max_profile_error: the largest relative L2 profile error of a reconstruction accepted
    (edm2.ema.posthoc.reconstruct; None: no check).
    eval_seeds: K disjoint seed sets per point (evaluation seeds seed ... seed+K-1, i.e. image
    seeds seed*num ... (seed+K)*num-1); the CSV holds their mean and standard deviation.
    Several times also write sweep-time.png (the optimum's drift, paper Fig. 5c); several guidance
    weights and lengths sweep-guidance.png (EMA length x guidance heat map).
    groups: per-group sensitivity (paper Fig. 5b; 'default' or NAME=glob pairs, see
    `edm2.analysis.ema_analysis.group_tensors`): with one time, guidance, solver and step count,
    every tensor is set to the base EMA length `base_std` (default: the sweep's best, by the first
    metric), then each group in turn takes each length of `sigma_rels`; written to groups.csv and
    groups.png. Under torchrun rank 0 reconstructs and writes, all processes generate."""
    sigma_rels = check_sweep_lengths(sigma_rels, "sigma_rels")
    eval_seeds = check_eval_seeds(eval_seeds)
    times = check_sweep_times(at_nimg)
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
    if base_std is not None and groups is None:
        raise EDM2Error(f"base_std={base_std}: only used with `groups`; add groups='default' or leave it out")
    if groups is not None:
        if len(times) > 1 or len(ws) * len(solvers) * len(steps) > 1:
            raise EDM2Error(f"groups={groups}: the per-group sweep takes one `at_nimg`, one `guidance`, one solver "
                            f"and one step count (got {len(times)} time(s), {len(ws)} guidance weight(s), "
                            f"{len(solvers)} solver(s), {len(steps)} step count(s)); run it separately")
        if base_std is not None:
            base_std = check_sweep_lengths([base_std], "base_std")[0]
    ref_path, ref = (ref, load_ref(ref)) if not isinstance(ref, dict) else ("REF", ref)
    metrics = resolve_metrics(metrics, ref, ref_path)
    outdir = Path(outdir) if outdir is not None else Path(rundir) / "sweep"
    csv_path, png_path = outdir / CSV_NAME, outdir / PNG_NAME
    outputs = [csv_path, png_path, outdir / TIME_PNG, outdir / GUIDANCE_PNG, outdir / GROUPS_CSV, outdir / GROUPS_PNG]
    for p in outputs:
        if p.exists():
            raise ExistingFileError(f"{p}: a sweep was already written there; choose another `outdir`")
    inputs = find_phema_inputs(rundir)
    times = list(dict.fromkeys(resolve_time(inputs, t) for t in times))
    for t in times:  # every time's reconstruction within the profile-error limit, before any is written
        check_profile_error(plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs],
                                         sigma_rels + ([base_std] if base_std is not None else []), t),
                            max_profile_error)
    tensor_groups = None
    if groups is not None:  # checked on the run's tensor names before any work
        from safetensors import safe_open
        with safe_open(str(inputs[-1].path), framework="pt") as f:
            tensor_groups = group_tensors(list(f.keys()), groups)
    rank, world = init_distributed()
    device = resolve_device(device)
    if gnet is not None and inputs:  # fail before the reconstruction if the guide does not fit the run's network
        load_nets(inputs[-1].path, gnet, "cpu")
    detectors = {m: detectors[m] for m in metrics} if detectors else load_detectors(metrics, detector_dir, device)
    check_ref_detectors(ref, detectors, ref_path)

    # The whole sweep holds the folder's lock: a second sweep into it is refused instead of
    # replacing this one's CSV and figure.
    lock = RunLock(outdir, "`outdir`").acquire() if rank == 0 else None
    try:
        job = _Sweep(rundir=rundir, sigma_rels=sigma_rels, ws=ws, ref=ref, outdir=outdir, outputs=outputs,
                     times=times, metrics=metrics, num=num, seeds=[seed + k for k in range(eval_seeds)], gnet=gnet,
                     batch_size=batch_size, device=device, progress=progress, detectors=detectors, rank=rank,
                     world=world, solvers=solvers, steps=steps, guidance_interval=guidance_interval,
                     max_profile_error=max_profile_error, sampler_kwargs=sampler_kwargs)
        return job.run(tensor_groups, base_std)
    finally:
        if lock is not None:
            lock.release()


class _Sweep:
    """One sweep's settings (checked by `sweep`) and its steps, run while holding outdir's lock."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def point(self, path, w, solver, n) -> dict:
        """The metrics of one network (mean and spread over the seed sets)."""
        results = [gen_metrics(path, self.ref, gnet=self.gnet if w != 1 else None, guidance=w, metrics=self.metrics,
                               num=self.num, seed=s, batch_size=self.batch_size, device=self.device,
                               progress=self.progress, detectors=self.detectors, solver=solver, num_steps=n,
                               guidance_interval=self.guidance_interval if w != 1 else None, **self.sampler_kwargs)
                   for s in self.seeds]
        return mean_and_spread(results, self.metrics)

    def row(self, sigma_rel, w, solver, n, nimg, values) -> dict:
        return {"ema_std": sigma_rel, "guidance": w, "solver": solver, "steps": n, "nfe": sampler_nfe(solver, n),
                "nimg": nimg, "num": self.num, "seed": self.seeds[0], "seeds": len(self.seeds), **values}

    def say(self, text: str, values: dict) -> None:
        if self.rank == 0 and self.progress:
            print(text + "  " + "  ".join(f"{m} {values[m]:.4f}" + (f" ± {values[f'{m}_std']:.4f}"
                                                                  if len(self.seeds) > 1 else "")
                                          for m in self.metrics), flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def run(self, tensor_groups, base_std) -> list[dict]:
        if self.rank == 0:
            for p in self.outputs:  # again, now that the folder is ours
                if p.exists():
                    raise ExistingFileError(f"{p}: a sweep was already written there; choose another `outdir`")
        lengths = self.sigma_rels + ([base_std] if base_std is not None and base_std not in self.sigma_rels else [])
        paths = {}
        for t in self.times:
            if self.rank == 0:
                # Snapshots left by an interrupted sweep are rebuilt unless they are exactly this reconstruction
                # (posthoc never replaces the run's own snapshots); the sweep already holds the folder's lock.
                got = reconstruct(self.rundir, self.outdir, lengths, at_nimg=t, overwrite=True,
                                  progress=self.progress, max_profile_error=self.max_profile_error, lock=False)
            else:
                got = [self.outdir / snapshot_name(t, s) for s in lengths]
            paths.update({(t, s): p for s, p in zip(lengths, got)})
        self.barrier()

        rows = []
        csv_path = self.outdir / CSV_NAME
        for t in self.times:
            for sigma_rel in self.sigma_rels:
                path = paths[t, sigma_rel]
                nimg = int(read_snapshot_meta(path)["nimg"])
                for w in self.ws:
                    for solver in self.solvers:
                        for n in self.steps:
                            values = self.point(path, w, solver, n)
                            rows.append(self.row(sigma_rel, w, solver, n, nimg, values))
                            if self.rank == 0:
                                write_csv(csv_path, rows, self.metrics)
                            self.say(f"nimg {nimg}  sigma_rel {sigma_rel:.4f}  guidance {w:g}  {solver} {n} steps",
                                     values)
        if self.rank == 0:
            plot_sweep(rows, self.metrics, self.outdir / PNG_NAME)
            first = [r for r in rows if (r["solver"], r["steps"]) == (self.solvers[0], max(self.steps))]
            if len(self.times) > 1:
                plot_times([r for r in first if r["guidance"] == self.ws[0]], self.metrics, self.outdir / TIME_PNG)
            if len(self.ws) > 1 and len(self.sigma_rels) > 1:
                note = (f", guided for {self.guidance_interval[0]:g} < t <= {self.guidance_interval[1]:g}"
                        if self.guidance_interval is not None else "")
                plot_guidance_heatmap([r for r in first if r["nimg"] == rows[-1]["nimg"]], self.metrics,
                                      self.outdir / GUIDANCE_PNG, title=note)
        if tensor_groups is not None:
            self.run_groups(rows, paths, tensor_groups, base_std)
        return rows

    def run_groups(self, rows, paths, tensor_groups, base_std) -> list[dict]:
        """Per-group sensitivity (paper Fig. 5b): every tensor at the base EMA length, one group's
        tensors at each swept length, evaluated; groups.csv and groups.png."""
        (t,), w, solver, n = self.times, self.ws[0], self.solvers[0], self.steps[0]
        m0 = self.metrics[0]
        if base_std is None:
            base_std = min(rows, key=lambda r: r[m0])["ema_std"]
        base_path = paths[t, base_std]
        nimg = int(read_snapshot_meta(base_path)["nimg"])
        base = next((r for r in rows if r["ema_std"] == base_std), None)
        if base is None:  # a base outside the swept lengths: evaluated once
            base = self.row(base_std, w, solver, n, nimg, self.point(base_path, w, solver, n))
            self.say(f"base sigma_rel {base_std:.4f}", base)
        tmp_dir = self.outdir / GROUPS_DIR
        base_state = load_file(str(base_path)) if self.rank == 0 else None
        base_meta = read_snapshot_meta(base_path)
        group_rows = []
        for sigma_rel in self.sigma_rels:
            state = load_file(str(paths[t, sigma_rel])) if self.rank == 0 and sigma_rel != base_std else None
            for i, (group, names) in enumerate(tensor_groups.items()):
                if sigma_rel == base_std:  # the very network of the base point
                    values = {k: base[k] for k in base if k in self.metrics or k.endswith("_std")}
                else:
                    mixed = tmp_dir / f"group{i}-{snapshot_name(nimg, sigma_rel)}"
                    if self.rank == 0:
                        # The base network with this group's tensors taken from the length sigma_rel.
                        chosen = set(names)
                        meta = json.loads(json.dumps(base_meta))
                        meta.setdefault("origin", {})["ema_groups"] = {"group": group, "ema_std": sigma_rel,
                                                                       "base_std": base_std}
                        save_state_dict(mixed, {k: (state[k] if k in chosen else v) for k, v in base_state.items()},
                                        meta)
                    self.barrier()
                    try:
                        values = self.point(mixed, w, solver, n)
                    finally:
                        self.barrier()
                        if self.rank == 0:
                            mixed.unlink(missing_ok=True)
                group_rows.append({"group": group, "tensors": len(names), "base_std": base_std,
                                   **self.row(sigma_rel, w, solver, n, nimg, values)})
                self.say(f"group {group}  sigma_rel {sigma_rel:.4f}", values)
                if self.rank == 0:
                    order = list(tensor_groups)
                    write_csv(self.outdir / GROUPS_CSV,
                              sorted(group_rows, key=lambda r: (order.index(r["group"]), r["ema_std"])),
                              self.metrics, keys=(*GROUP_KEYS, *SWEEP_KEYS))
            state = None
        if self.rank == 0 and self.progress:
            for group in tensor_groups:
                o = optimum([r for r in group_rows if r["group"] == group], m0)
                print(f"group {group}: best {m0} {o['row'][m0]:.4f} at sigma_rel {o['row']['ema_std']:.4f} (others "
                      f"at {base_std:.4f})" + (f"; within one spread: {o['lo']:.4f}-{o['hi']:.4f}"
                                                if len(self.seeds) > 1 else ""), flush=True)
        if self.rank == 0:
            if tmp_dir.is_dir() and not any(tmp_dir.iterdir()):
                tmp_dir.rmdir()
            plot_groups(group_rows, [r for r in rows if r["nimg"] == nimg], self.metrics, base_std,
                        self.outdir / GROUPS_PNG)
        return group_rows

