"""The paper's ablation ladder (Table 1) in miniature: train configs A-G at an
equal budget, find each one's best EMA length by post-hoc EMA, tabulate and
plot (docs/ladder.md).

This module is the experiment; the networks of its rungs are built by
`edm2.nn.factory.build_network` (A, B: `edm2.nn.adm`; C-F: `edm2.nn.rungs`;
G: `edm2.nn.unet`).

`run_ladder(LadderConfig(outdir=...))` does, for every config ("rung") asked for:

1. train it into `OUTDIR/<letter>/` with `edm2.train.loop.train`: the same size
   preset, images, seed and data for every rung, each with its own recipe of
   `edm2.presets.RECIPES` (nothing is tuned per rung), recording the training
   dynamics (`--dynamics`, docs/dynamics.md) at every snapshot;
2. reconstruct the EMA lengths `sigma_rels` from its snapshots and evaluate
   each with `edm2.metrics.sweep` (`OUTDIR/<letter>/sweep/sweep.csv`); config A
   has a traditional EMA and no post-hoc EMA (Sec. 3.1), so its stored EMA is
   evaluated instead;
3. pick the best EMA length per rung (lowest mean of the first metric over
   `eval_seeds` seed sets), with the range of lengths within one spread of it,
   and flag an optimum at either end of the swept lengths (the sweep is then too
   narrow to show it).

It writes `OUTDIR/ladder.json` (the settings; a rerun with others is refused),
`OUTDIR/ref.npz` (reference statistics of the data, computed once),
`OUTDIR/<letter>/ladder-rung.json` (a finished rung), `OUTDIR/ladder.csv`,
`OUTDIR/ladder.md` (a Table-1-style table), and the figures
`OUTDIR/ladder.png` (metric per rung; EMA sweeps), `OUTDIR/dynamics.png`
(activation/weight magnitudes per rung, paper Fig. 3 / Fig. 15) and
`OUTDIR/loss.png` (loss per noise level and u(sigma)).

Re-running continues: every rung is a normal run folder (training resumes
from its newest checkpoint), a finished rung (trained, swept and evaluated)
is skipped and none of its files is touched, an interrupted sweep is redone.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import builtin_dataset_path
from ..io.snapshot import list_snapshots
from ..metrics import gen_metrics, load_detectors, load_ref, reference_stats, resolve_metrics, sweep
from ..metrics.evaluate import check_ref_detectors
from ..metrics.sweep import CSV_NAME, check_eval_seeds, check_sweep_lengths, mean_and_spread, write_csv
from ..nn import CONFIGS, check_config
from ..presets import RECIPES, get_preset
from ..sampling import check_solver
from ..train.checkpoint import list_checkpoints
from ..train.loop import TrainConfig, plan_run, train
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import LOCK_FILES, RunLock, atomic_write_bytes, pyplot, save_figure
from ..utils.units import parse_float_list
from .dynamics import growth_factors, load_dynamics, plot_dynamics, plot_loss_profile
from .ema_analysis import optimum
from .flops import count_network

__all__ = ["LadderConfig", "LadderRung", "run_ladder", "rung_train_config", "read_csv_rows", "format_table",
           "plot_ladder"]

LADDER_FILE = "ladder.json"
# Settings added to ladder.json after its first version, with the value a ladder written without them used.
SETTINGS_BEFORE_FIELDS = {"solver": "heun"}
RUNG_FILE = "ladder-rung.json"
REF_NAME = "ref.npz"


@dataclass
class LadderConfig:
    """What `run_ladder` is asked to do. Sizes count training images.

    `duration`: images per rung (None: the preset's); `snapshots`: snapshots
    per rung (the post-hoc EMA's inputs; also the checkpoint and, unless
    `dynamics` is given, the dynamics interval); `dynamics_probe`: items in
    the dynamics measurement batch (`edm2.analysis.dynamics.MeasurementBatch`);
    `grid`: sample-grid images at each snapshot (0: none, as sampling them costs about as much as the training at
    these sizes); `sigma_rels`: the EMA lengths
    to reconstruct and evaluate; `num`: generated images per evaluation;
    `steps`: sampler steps; `solver`: the sampler's ODE solver (`edm2.sampling.SOLVERS`);
    `metrics`: detectors, the first one picks the best
    EMA length; `eval_seeds`: disjoint seed sets per evaluation (their mean picks
    the best length, their spread gives the range of lengths as good). Every field but `threads`,
    `detector_dir`, `progress` and `max_profile_error` is
    recorded in ladder.json and must match on a rerun."""
    outdir: str
    configs: tuple = ("B", "C", "D", "E", "F", "G")
    data: str | None = None
    preset: str = "cpu-32"
    duration: int | None = None
    snapshots: int = 8
    dynamics: int | None = None
    dynamics_probe: int = 256
    grid: int = 0
    # Wide enough for an interior optimum (the paper's optima lie between 0.05 and 0.20, Table 1), and
    # every length reconstructable within `max_profile_error` from 8 snapshots: the relative L2 profile
    # errors at the last snapshot are 16 % (0.025), 18 % (0.25), at most 8 % in between; 0.01 would be 52 %.
    sigma_rels: tuple = (0.025, 0.05, 0.075, 0.10, 0.15, 0.20, 0.25)
    num: int = 1000
    eval_seeds: int = 2
    steps: int = 32
    solver: str = "heun"
    metrics: tuple = ("fd_classifier",)
    seed: int = 0
    batch_size: int = 64
    detector_dir: str | None = None
    threads: int | None = None
    progress: bool = True
    # The sweeps' limit on the post-hoc profile error (edm2.ema.posthoc.MAX_PROFILE_ERROR): a rung's few
    # snapshots reconstruct the long EMA lengths only roughly (8 snapshots: about 8 % at sigma_rel 0.20).
    max_profile_error: float | None = 0.25


@dataclass
class LadderRung:
    """The result of one rung (one row of ladder.csv / ladder.md)."""
    config: str
    title: str
    params: int                  # parameters without u(sigma), as the paper counts them
    nimg: int                    # training images
    best_sigma_rel: float | None  # None for config A (traditional EMA)
    values: dict                 # {metric: value at the best EMA length}
    sweep: list                  # the rows of its sweep.csv
    paper_fid: float
    paper_sigma_rel: float | None
    growth: dict                 # edm2.analysis.dynamics.growth_factors of its dynamics.jsonl
    spread: dict | None = None   # {metric: its standard deviation over the seed sets at the best EMA length}
    best_range: list | None = None  # [shortest, longest] EMA length whose mean is within one spread of the best
    at_edge: bool = False        # the best EMA length is the shortest or the longest swept


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

def _check(cfg: LadderConfig) -> LadderConfig:
    """Normalise and check every setting (nothing is written before this)."""
    configs = cfg.configs.split(",") if isinstance(cfg.configs, str) else list(cfg.configs)
    configs = [c.strip().upper() for c in configs if c.strip()]
    if not configs:
        raise EDM2Error("`configs`: empty; give letters of the paper's Table 1, e.g. B,C,D,E,F,G")
    for c in configs:
        try:
            check_config(c)
        except ValueError:
            raise EDM2Error(f"`configs`: unknown config {c!r}; allowed: {', '.join(CONFIGS)} (the rows of the "
                            f"paper's Table 1)") from None
    for c in configs:  # every rung's network must exist at this size before anything is written
        try:
            count_network(cfg.preset, config=c)
        except ValueError as e:
            raise EDM2Error(f"configs={c}: config {c} cannot be built at preset {cfg.preset} ({e}); leave it "
                            f"out or choose another `preset`") from None
    if len(set(configs)) != len(configs):
        raise EDM2Error(f"configs={','.join(configs)}: a config is given twice")
    configs = sorted(configs)
    if any(c != "A" for c in configs):  # in (0, max), and no two sharing a snapshot file name
        sigma_rels = check_sweep_lengths(cfg.sigma_rels, "sigma_rels")
    else:
        sigma_rels = list(dict.fromkeys(parse_float_list(cfg.sigma_rels, "sigma_rels")))
    metrics = resolve_metrics(cfg.metrics)
    preset = get_preset(cfg.preset)
    duration = int(cfg.duration if cfg.duration is not None else preset.duration)
    if duration < preset.batch or duration % preset.batch:
        raise EDM2Error(f"duration={duration}: must be a positive multiple of the {cfg.preset} batch "
                        f"{preset.batch}")
    if cfg.snapshots < 1:
        raise EDM2Error(f"snapshots={cfg.snapshots}: must be >= 1")
    if cfg.dynamics is not None and cfg.dynamics < 1:
        raise EDM2Error(f"dynamics={cfg.dynamics}: must be >= 1 (images between measurements)")
    if cfg.dynamics_probe < 1:
        raise EDM2Error(f"dynamics_probe={cfg.dynamics_probe}: must be >= 1")
    if cfg.grid < 0:
        raise EDM2Error(f"grid={cfg.grid}: must be >= 0")
    if cfg.num < 2:
        raise EDM2Error(f"num={cfg.num}: need at least 2 images per evaluation")
    if cfg.steps < 1:
        raise EDM2Error(f"steps={cfg.steps}: must be >= 1")
    check_solver(cfg.solver)
    check_eval_seeds(cfg.eval_seeds)
    if cfg.batch_size < 1:
        raise EDM2Error(f"batch_size={cfg.batch_size}: must be >= 1")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise EDM2Error(f"seed={cfg.seed!r}: must be a whole number >= 0")
    data = str(Path(cfg.data).resolve()) if cfg.data is not None else None
    return dataclasses.replace(cfg, configs=tuple(configs), sigma_rels=tuple(sigma_rels), metrics=tuple(metrics),
                               duration=duration, data=data)


def _interval(cfg: LadderConfig) -> int:
    """The snapshot (and checkpoint) interval: duration / snapshots, a multiple of the batch."""
    batch = get_preset(cfg.preset).batch
    return max(cfg.duration // cfg.snapshots // batch, 1) * batch


def ladder_settings(cfg: LadderConfig) -> dict:
    """The settings recorded in ladder.json (those that change the results)."""
    cfg = _check(cfg)
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("outdir", "detector_dir", "threads",
                                                                           "progress", "max_profile_error")}
    keep.update(configs=list(cfg.configs), sigma_rels=list(cfg.sigma_rels), metrics=list(cfg.metrics),
                snapshot_interval=_interval(cfg), dynamics=cfg.dynamics or _interval(cfg))
    return keep


def rung_train_config(cfg: LadderConfig, letter: str) -> TrainConfig:
    """The `edm2.train.loop.TrainConfig` of one rung: the same for every rung but
    the config letter (and with it the recipe, `edm2.presets.RECIPES`)."""
    cfg = _check(cfg)
    every = _interval(cfg)
    return TrainConfig(outdir=str(Path(cfg.outdir) / letter), data=cfg.data, preset=cfg.preset, config=letter,
                       duration=cfg.duration, snapshot=every, checkpoint=every, seed=cfg.seed,
                       dynamics=cfg.dynamics or every, dynamics_probe=cfg.dynamics_probe, grid=cfg.grid,
                       threads=cfg.threads, progress=cfg.progress)


def _claim_outdir(out: Path, settings: dict) -> None:
    """Refuse an outdir holding something else, or a ladder of other settings; record ours."""
    path = out / LADDER_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise EDM2Error(f"{path}: not JSON; the file is damaged: choose another `outdir`") from None
        if not isinstance(old, dict):
            raise EDM2Error(f"{path}: not a JSON object; the file is damaged: choose another `outdir`")
        old = {**SETTINGS_BEFORE_FIELDS, **old}
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
            raise EDM2Error(f"outdir={out}: holds a ladder of other settings ({shown}); rerun with its settings "
                            f"to continue it, or choose another `outdir`")
        return
    # A new ladder goes into a new or empty folder; a *.log file (the command's own output, e.g.
    # `nohup edm2 ladder --outdir DIR > DIR/ladder.log`) is allowed there.
    if out.exists() and (not out.is_dir() or any(p.suffix != ".log" and p.name not in LOCK_FILES
                                                 for p in out.iterdir())):
        raise ExistingFileError(f"outdir={out}: exists and holds no {LADDER_FILE}; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------
# The ladder
# ---------------------------------------------------------------------------

def _say(cfg: LadderConfig, text: str) -> None:
    if cfg.progress:
        print(f"[ladder] {text}", flush=True)


def read_csv_rows(path, metrics) -> list[dict]:
    """The rows of a sweep.csv (numbers as numbers; an empty ema_std: None). A file
    without the columns ema_std, guidance, nimg, num, seed and one per metric, or
    with a value that is not a number, raises `EDM2Error` naming it."""
    rows = []
    want = ["ema_std", "guidance", "nimg", "num", "seed", *metrics]
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in want if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"no column {missing[0]!r}")
            for r in reader:
                # seeds and <metric>_std: the seed sets and their spread (a sweep.csv without them: one set)
                rows.append({"ema_std": float(r["ema_std"]) if r["ema_std"] else None,
                             "guidance": float(r["guidance"]), "nimg": int(r["nimg"]), "num": int(r["num"]),
                             "seed": int(r["seed"]), "seeds": int(r.get("seeds") or 1),
                             **{m: float(r[m]) for m in metrics},
                             **{f"{m}_std": float(r.get(f"{m}_std") or 0) for m in metrics}})
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise EDM2Error(f"{path}: not a sweep.csv with the columns {', '.join(want)} ({str(e)[:120]}); the file "
                        f"is damaged: delete it to evaluate again") from None
    return rows


def _trained(rundir: Path, duration: int) -> bool:
    return any(n == duration for n, _ in list_checkpoints(rundir))


def _evaluate(cfg: LadderConfig, letter: str, rundir: Path, ref: dict, detectors: dict) -> list[dict]:
    """The rung's sweep rows: post-hoc EMA sweep (B-G) or its stored EMA (A)."""
    sweep_dir = rundir / "sweep"
    csv_path = sweep_dir / CSV_NAME
    want = 1 if letter == "A" else len(cfg.sigma_rels)
    if csv_path.is_file():
        rows = read_csv_rows(csv_path, cfg.metrics)
        if len(rows) == want:
            return rows
        _say(cfg, f"{letter}: {csv_path} holds {len(rows)} of {want} points (interrupted); evaluating again")
        csv_path.unlink()
    sampler = dict(num_steps=cfg.steps)
    if letter == "A":  # traditional EMA (Sec. 3.1): no post-hoc reconstruction, evaluate the stored one
        last = [(n, p) for n, _, p in list_snapshots(rundir)
                if n == cfg.duration and p.name.endswith("-ema.safetensors")]
        if not last:
            raise MissingFileError(f"{rundir}: no EMA snapshot at {cfg.duration} images; the run is incomplete")
        results = [gen_metrics(last[0][1], ref, metrics=list(cfg.metrics), num=cfg.num, seed=cfg.seed + k,
                               batch_size=cfg.batch_size, device="cpu", progress=cfg.progress, detectors=detectors,
                               solver=cfg.solver, **sampler) for k in range(cfg.eval_seeds)]
        rows = [{"ema_std": None, "guidance": 1.0, "nimg": cfg.duration, "num": cfg.num, "seed": cfg.seed,
                 "seeds": cfg.eval_seeds, **mean_and_spread(results, list(cfg.metrics))}]
        sweep_dir.mkdir(exist_ok=True)
        write_csv(csv_path, rows, list(cfg.metrics))
        return read_csv_rows(csv_path, cfg.metrics)
    png = sweep_dir / "sweep.png"
    if png.exists():
        png.unlink()  # of the interrupted sweep; sweep() refuses to overwrite it
    sweep(rundir, list(cfg.sigma_rels), ref, outdir=sweep_dir, at_nimg=cfg.duration, metrics=list(cfg.metrics),
          num=cfg.num, seed=cfg.seed, batch_size=cfg.batch_size, device="cpu", progress=cfg.progress,
          detectors=detectors, max_profile_error=cfg.max_profile_error, eval_seeds=cfg.eval_seeds,
          solvers=(cfg.solver,), **sampler)
    return read_csv_rows(csv_path, cfg.metrics)  # as stored (the CSV rounds nothing, but reads back the same)


def _params(cfg: LadderConfig, letter: str, rundir: Path) -> int:
    kw = json.loads((rundir / "config.json").read_text())["net_kwargs"]
    return count_network(cfg.preset, resolution=kw["img_resolution"], channels=kw["img_channels"],
                         label_dim=kw["label_dim"], config=letter).params


def _rung(cfg: LadderConfig, letter: str, ref: dict, detectors: dict) -> LadderRung:
    rundir = Path(cfg.outdir) / letter
    done = rundir / RUNG_FILE
    if done.is_file():
        _say(cfg, f"{letter}: finished earlier ({done})")
        return _read_rung(done)
    if _trained(rundir, cfg.duration):
        _say(cfg, f"{letter}: trained earlier")
    else:
        _say(cfg, f"{letter}: training {cfg.duration} images ({RECIPES[letter].title})")
        result = train(rung_train_config(cfg, letter))
        if not result.finished:
            raise EDM2Error(f"{rundir}: training stopped at {result.nimg} of {cfg.duration} images; rerun to "
                               f"continue")
    _say(cfg, f"{letter}: evaluating " + ("its stored EMA" if letter == "A" else
                                          f"{len(cfg.sigma_rels)} EMA lengths") + f" on {cfg.num} images each")
    rows = _evaluate(cfg, letter, rundir, ref, detectors)
    best = min(rows, key=lambda r: r[cfg.metrics[0]])
    opt = optimum(rows, cfg.metrics[0]) if best["ema_std"] is not None else None
    recipe = RECIPES[letter]
    rung = LadderRung(config=letter, title=recipe.title, params=_params(cfg, letter, rundir), nimg=cfg.duration,
                      best_sigma_rel=best["ema_std"], values={m: best[m] for m in cfg.metrics}, sweep=rows,
                      paper_fid=recipe.fid, paper_sigma_rel=recipe.sigma_rel,
                      growth=growth_factors(load_dynamics(rundir)),
                      spread={m: best[f"{m}_std"] for m in cfg.metrics},
                      best_range=None if opt is None else [opt["lo"], opt["hi"]],
                      at_edge=bool(opt and opt["edge"]))
    atomic_write_bytes(done, (json.dumps(dataclasses.asdict(rung), indent=2) + "\n").encode())
    _say(cfg, f"{letter}: {cfg.metrics[0]} {best[cfg.metrics[0]]:.4f}"
         + (f" at sigma_rel {best['ema_std']:.3f}" if best["ema_std"] is not None else " (stored EMA)"))
    return rung


def _read_rung(path: Path) -> LadderRung:
    """A finished rung's ladder-rung.json; a damaged one raises `EDM2Error` naming it."""
    try:
        rung = LadderRung(**json.loads(path.read_text()))
        if not (isinstance(rung.values, dict) and isinstance(rung.sweep, list) and isinstance(rung.config, str)):
            raise ValueError("values, sweep or config of the wrong type")
        return rung
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise EDM2Error(f"{path}: not a finished rung's record ({type(e).__name__}: {str(e)[:120]}); the file is "
                        f"damaged: delete it to evaluate the rung again (its training is kept)") from None


def _reference(cfg: LadderConfig, detectors: dict) -> dict:
    path = Path(cfg.outdir) / REF_NAME
    if not path.is_file():
        data = cfg.data or str(builtin_dataset_path())
        _say(cfg, f"reference statistics of {data} -> {path}")
        reference_stats(data, path, metrics=list(cfg.metrics), workers=0, device="cpu", progress=cfg.progress,
                        detectors=detectors)
    ref = load_ref(path)
    try:
        check_ref_detectors(ref, detectors, str(path))
    except EDM2Error as e:
        raise EDM2Error(f"{e}; or, to continue this ladder, rerun with the detector_dir it was evaluated "
                        f"with") from None
    return ref


def run_ladder(cfg: LadderConfig) -> list[LadderRung]:
    """Train, evaluate, tabulate and plot the rungs of `cfg` (see the module
    docstring); returns one `LadderRung` per config, in letter order."""
    cfg = _check(cfg)
    out = Path(cfg.outdir)
    settings = ladder_settings(cfg)
    # Everything is checked before anything is written: every rung's training settings and
    # dataset (as `train` will check them), and the detectors' weights.
    for letter in cfg.configs:
        plan_run(rung_train_config(cfg, letter))
    detectors = load_detectors(list(cfg.metrics), cfg.detector_dir, "cpu")
    # One ladder at a time in a folder: a second `edm2 ladder` on it is refused, not joined.
    with RunLock(out, "`outdir`"):
        _claim_outdir(out, settings)
        ref = _reference(cfg, detectors)
        rungs = [_rung(cfg, letter, ref, detectors) for letter in cfg.configs]
        write_outputs(cfg, rungs)
    return rungs


# ---------------------------------------------------------------------------
# Table and figures
# ---------------------------------------------------------------------------

CSV_FIELDS = ["config", "title", "params", "nimg", "best_sigma_rel", "paper_fid", "paper_sigma_rel",
              "act_max_growth_ema", "act_max_growth_raw", "sigma_rel_lo", "sigma_rel_hi", "best_at_edge"]


def _growth(rung: LadderRung, net: str):
    g = (rung.growth or {}).get(net)
    return None if g is None else g["growth"]


def _csv(cfg: LadderConfig, rungs: list[LadderRung]) -> bytes:
    buf = io.StringIO()
    spreads = [f"{m}_std" for m in cfg.metrics]
    w = csv.DictWriter(buf, CSV_FIELDS[:5] + list(cfg.metrics) + CSV_FIELDS[5:] + spreads, lineterminator="\n")
    w.writeheader()
    for r in rungs:
        lo, hi = r.best_range or ("", "")
        extra = {"sigma_rel_lo": lo, "sigma_rel_hi": hi, "best_at_edge": int(r.at_edge),
                 **{f"{m}_std": (r.spread or {}).get(m, "") for m in cfg.metrics}}
        w.writerow({"config": r.config, "title": r.title, "params": r.params, "nimg": r.nimg,
                    "best_sigma_rel": "" if r.best_sigma_rel is None else r.best_sigma_rel, **r.values,
                    "paper_fid": r.paper_fid, "paper_sigma_rel": "" if r.paper_sigma_rel is None else r.paper_sigma_rel,
                    "act_max_growth_ema": _growth(r, "ema"), "act_max_growth_raw": _growth(r, "raw"), **extra})
    return buf.getvalue().encode()


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(rungs: list[LadderRung], metrics) -> str:
    """The Markdown table of ladder.md (one row per rung, like the paper's Table 1), then one line
    naming the rungs whose best EMA length is at an end of the swept lengths (or saying there is none)."""
    metrics = list(metrics)
    head = (["Config", "", "Params (M)"] + [f"{m} at best" for m in metrics]
            + ["best sigma_rel", "paper FID (img512-s)", "paper sigma_rel", "act. max growth EMA / raw",
               f"{metrics[0]} spread", "sigma_rel within one spread"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rungs:
        best = "stored EMA" if r.best_sigma_rel is None else f"{r.best_sigma_rel:.3f}"
        paper_s = "traditional EMA" if r.paper_sigma_rel is None else f"{r.paper_sigma_rel:.3f}"
        cells = ([r.config, r.title, f"{r.params / 1e6:.3f}"] + [f"{r.values[m]:.4f}" for m in metrics]
                 + [best, f"{r.paper_fid:.2f}", paper_s,
                    f"{_fmt(_growth(r, 'ema'), '.2f')} / {_fmt(_growth(r, 'raw'), '.2f')}",
                    _fmt((r.spread or {}).get(metrics[0]), ".4f"),
                    "-" if not r.best_range else f"{r.best_range[0]:.3f}-{r.best_range[1]:.3f}"])
        lines.append("| " + " | ".join(cells) + " |")
    edge = [f"{r.config} ({r.best_sigma_rel:.3f})" for r in rungs if r.at_edge]
    shortest = any(r.at_edge and r.best_sigma_rel == min(row["ema_std"] for row in r.sweep) for r in rungs)
    lines.append("\n" + ("Best EMA length at a sweep boundary (the optimum may lie outside the swept lengths; "
                         "widen sigma_rels" + ("; a shorter length also needs more snapshots to be "
                                               "reconstructed faithfully" if shortest else "")
                         + "): " + ", ".join(edge) + "." if edge else
                         "No best EMA length at a sweep boundary."))
    return "\n".join(lines) + "\n"


def _markdown(cfg: LadderConfig, rungs: list[LadderRung]) -> str:
    m = cfg.metrics[0]
    return (f"# Ablation ladder at preset {cfg.preset}\n\n"
            f"{cfg.duration} training images per rung, seed {cfg.seed}; each EMA length evaluated on {cfg.num} "
            f"generated images ({cfg.steps} {cfg.solver} sampler steps) with {', '.join(cfg.metrics)}; "
            f"the best EMA length is "
            f"the one with the lowest {m}. Activation growth: the largest per-level activation magnitude "
            f"(act_max) at the last measurement over the first.\n\n" + format_table(rungs, cfg.metrics))


def plot_ladder(rungs: list[LadderRung], metric: str, path=None) -> bytes:
    """PNG: left, `metric` at the best EMA length per rung (with the paper's
    FID on a second axis); right, each rung's metric against the EMA length
    (config A, without post-hoc EMA, as a horizontal line)."""
    plt = pyplot()
    import matplotlib  # for its colormaps; already loaded by pyplot()

    cmap = matplotlib.colormaps["tab10"]
    fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rungs))
    spreads = [(r.spread or {}).get(metric) or 0.0 for r in rungs]   # one spread over the seed sets
    ax_b.errorbar(xs, [r.values[metric] for r in rungs], yerr=spreads, fmt="o-", capsize=3, color="C0",
                  label=f"{metric} (ours, ± one spread)")
    ax_b.set_xticks(list(xs), [r.config for r in rungs])
    ax_b.set_xlabel("config (paper Table 1)")
    ax_b.set_ylabel(f"{metric} at the best EMA length", color="C0")
    ax_b.grid(alpha=0.3)
    ax_p = ax_b.twinx()
    ax_p.plot(xs, [r.paper_fid for r in rungs], "s--", color="C3", alpha=0.7, label="paper FID (img512-s)")
    ax_p.set_ylabel("paper FID (ImageNet-512, EDM2-S)", color="C3")
    ax_b.set_title("quality per rung", fontsize=10)
    for i, r in enumerate(rungs):
        colour = cmap(i % 10)
        if r.best_sigma_rel is None:
            ax_s.axhline(r.values[metric], color=colour, ls=":", label=f"{r.config} (stored EMA)")
            continue
        pts = sorted((row["ema_std"], row[metric], row.get(f"{metric}_std") or 0.0) for row in r.sweep)
        x, y, spread = (np.array(v, dtype=float) for v in zip(*pts))
        ax_s.plot(x, y, "o-", ms=3, color=colour, label=r.config)
        if spread.any():  # one spread over the seed sets
            ax_s.fill_between(x, y - spread, y + spread, color=colour, alpha=0.15, lw=0)
        ax_s.plot(r.best_sigma_rel, r.values[metric], "o", ms=9, mfc="none", color=colour)
    ax_s.set_xlabel("EMA length sigma_rel (post-hoc)")
    ax_s.set_ylabel(metric)
    ax_s.set_title("post-hoc EMA sweep per rung (ring: best; band: one spread)", fontsize=10)
    ax_s.grid(alpha=0.3)
    ax_s.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(cfg: LadderConfig, rungs: list[LadderRung]) -> None:
    """ladder.csv, ladder.md, ladder.png, dynamics.png (and dynamics-CEG.png
    when C, E and G are rungs) and loss.png in cfg.outdir."""
    out = Path(cfg.outdir)
    atomic_write_bytes(out / "ladder.csv", _csv(cfg, rungs))
    atomic_write_bytes(out / "ladder.md", _markdown(cfg, rungs).encode())
    plot_ladder(rungs, cfg.metrics[0], out / "ladder.png")
    runs = [out / r.config for r in rungs]
    labels = [f"{r.config}: {r.title.lstrip('+ ')}" for r in rungs]
    plot_dynamics(runs, out / "dynamics.png", quantities=["act_max", "weight_max"], labels=labels, dpi=70)
    if {"C", "E", "G"} <= {r.config for r in rungs}:
        pick = [i for i, r in enumerate(rungs) if r.config in "CEG"]
        plot_dynamics([runs[i] for i in pick], out / "dynamics-CEG.png", labels=[labels[i] for i in pick], dpi=80)
    plot_loss_profile(runs, out / "loss.png", labels=[r.config for r in rungs])
    _say(cfg, f"wrote {out / 'ladder.md'}, ladder.csv, ladder.png, dynamics.png, loss.png")
