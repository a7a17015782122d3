"""Post-hoc EMA: build snapshots of any EMA length after training from the
run's stored snapshots (paper Sec. 3.2, Figure 4, App. C.5).

The math is in `edm2.ema.profiles`; this module lists a run's snapshots, checks
them, and streams the linear combinations tensor by tensor: every input file
is opened memory-mapped (safetensors `safe_open`) and read once whatever the
number of outputs, and each output is written as it is computed, so memory
stays at a few row blocks (inputs x block + outputs x block) instead of whole
models. Outputs are ordinary edm2 snapshots (`edm2.io.snapshot`), named by
`snapshot_name(nimg, sigma_rel)`, so `edm2 generate --net` and metrics use them.
"""
from __future__ import annotations

import copy
import json
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ..io.official import convert_official_folder, list_official_pickles
from ..io.snapshot import (
    SAFETENSORS_DTYPES,
    SnapshotError,
    SnapshotStreamWriter,
    list_snapshots,
    read_snapshot_meta,
    snapshot_config,
    snapshot_name,
)
from ..nn import build_network, precision_kwargs
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import RunLock, atomic_write_bytes, pyplot, remove_temp_files, save_figure
from ..utils.units import parse_float_list
from ..utils.validate import check_float
from .profiles import check_sigma_rel, profile_density, profile_fit_error, solve_posthoc_coefficients

# Largest relative L2 error (profiles.profile_fit_error) between the profile a reconstruction realises and
# the wanted one that reconstruct / reconstruct_state_dict accept by default (`max_profile_error`). At the
# last of 256 snapshots of the trainer's two profiles (sigma_rel 0.05, 0.10) it is below 0.5 % for
# sigma_rel 0.01-0.25; between snapshots, or with few snapshots, it grows to several percent and more,
# and the result is then a different average than the one asked for (paper Sec. 3.2, Figure 4; the
# table in docs/posthoc-ema.md).
MAX_PROFILE_ERROR = 0.05

_TORCH_DTYPES = {k: v for k, v in SAFETENSORS_DTYPES.items() if v.is_floating_point}
# Tensors of these dtypes (integer buffers such as counters) are copied from the latest input, not averaged.
_COPIED_DTYPES = {k: v for k, v in SAFETENSORS_DTYPES.items() if not v.is_floating_point}


@dataclass(frozen=True)
class PhemaInput:
    """One stored EMA snapshot of a run: file, training images seen, sigma_rel, metadata."""
    path: Path
    nimg: int
    sigma_rel: float
    meta: dict = field(repr=False, compare=False)


@dataclass
class PosthocPlan:
    """Which stored profiles make which wanted profile: coeffs[i, j] weights input i in output j."""
    in_nimg: np.ndarray      # [in] end times of the stored profiles (training images)
    in_sigma_rel: np.ndarray  # [in] their sigma_rel
    at_nimg: int             # time of every output
    sigma_rels: list         # [out] wanted sigma_rel
    coeffs: np.ndarray       # [in, out], columns sum to 1
    fit_error: np.ndarray    # [out] relative L2 error of the realised profile (profiles.profile_fit_error)
    inputs: list = None      # [in] PhemaInput, when planned from files


def find_phema_inputs(rundir) -> list[PhemaInput]:
    """Every EMA snapshot of a run folder, sorted by (nimg, sigma_rel), with its
    metadata checked: readable (a truncated file is an error naming it), one
    architecture for all, no duplicate (nimg, sigma_rel). Raw-weight snapshots and
    earlier post-hoc outputs (origin has "phema") are not inputs: the latter are
    combinations of the others and would make the system singular.
    This is the one place that lists inputs (a converter for other formats hooks in here)."""
    rundir = Path(rundir)
    if not rundir.is_dir():
        raise MissingFileError(f"rundir={rundir}: no such folder; pass the training run folder holding "
                                f"snapshot-*.safetensors")
    if not list_snapshots(rundir):  # the authors' raw snapshots (network-snapshot-<kimg>-<sigma_rel>.pkl): convert once
        if list_official_pickles(rundir):
            rundir = convert_official_folder(rundir)  # safe import into the download cache (edm2.io.official)
    found = []
    for _, _, path in list_snapshots(rundir):
        meta = read_snapshot_meta(path)  # SnapshotError (a ValueError) names unreadable/truncated files
        if "ema_halflife" in meta:
            raise EDM2Error(f"{path}: a config-{snapshot_config(meta)} run with a traditional EMA (half-life "
                             f"{meta['ema_halflife']:.0f} images) has no power-function EMA profiles (sigma_rel) "
                             f"to reconstruct from; post-hoc EMA needs a run of configs B-G. Use its snapshots as "
                             f"they are")
        if meta.get("ema_std") is None or "phema" in meta.get("origin", {}):
            continue
        found.append(PhemaInput(path, int(meta["nimg"]), float(meta["ema_std"]), meta))
    found.sort(key=lambda r: (r.nimg, r.sigma_rel))
    for a, b in zip(found, found[1:]):
        if (a.nimg, a.sigma_rel) == (b.nimg, b.sigma_rel):
            raise EDM2Error(f"{a.path} and {b.path}: both hold nimg={a.nimg}, sigma_rel={a.sigma_rel}; remove one")
    for r in found[1:]:
        if precision_kwargs(r.meta["net_kwargs"]) != precision_kwargs(found[0].meta["net_kwargs"]):
            raise EDM2Error(f"{found[0].path} and {r.path}: different architectures (net_kwargs) in one run folder; "
                             f"move the snapshots of other runs elsewhere")
    check_one_run(found)
    return found


def check_one_run(inputs: list[PhemaInput]) -> None:
    """Raise `EDM2Error` unless the snapshots come from one training run.

    The trainer records the run in each snapshot's metadata: `origin.run_id`, a
    fingerprint of the run's settings (config.json: data, architecture,
    learning rate, seed, ...), and `origin.run`, the run folder;
    `edm2.ema.trackers.PowerFunctionEMA` records its own random `run_id`, kept
    across a resume through its state_dict. Snapshots with
    run_id must all have the same one (a run moved to another folder and
    resumed keeps it). Older snapshots without run_id are compared by run folder,
    seed and preset. Snapshots without any run record (imported ones) are not
    compared; the architecture and initialisation checks still apply."""
    def legacy(r):
        o = r.meta.get("origin") or {}
        return (o.get("run"), o.get("seed"), o.get("preset")) if "run" in o else None

    with_id = [r for r in inputs if (r.meta.get("origin") or {}).get("run_id")]
    for r in with_id[1:]:
        a, b = with_id[0].meta["origin"]["run_id"], r.meta["origin"]["run_id"]
        if a != b:
            raise EDM2Error(f"{with_id[0].path} and {r.path}: snapshots of different training runs (run id {a} vs "
                             f"{b}: other settings, or another start of a script); post-hoc EMA combines one run's "
                             f"snapshots only; move the other run's snapshots to a folder of their own")
    known = {legacy(r) for r in with_id}
    old = [r for r in inputs if r not in with_id and legacy(r) is not None]
    for r in old:
        ref = next(iter(known)) if known else legacy(old[0])
        if legacy(r) not in known and legacy(r) != ref:
            other = with_id[0] if with_id else old[0]
            raise EDM2Error(f"{other.path} and {r.path}: snapshots of different training runs (run folder, seed "
                             f"or preset differ); post-hoc EMA combines one run's snapshots only; move the other "
                             f"run's snapshots to a folder of their own")


def resolve_time(inputs, at_nimg=None, at_kimg=None) -> int:
    """The output time in training images: at_nimg, or at_kimg in the reference's
    naming (the latest snapshot whose nimg // 1000 == at_kimg, else at_kimg * 1000),
    or by default the last snapshot's. Must lie within the stored snapshots."""
    if not inputs:
        raise EDM2Error("no EMA snapshots (snapshot-*-<sigma_rel>.safetensors) found; train first")
    last = max(r.nimg for r in inputs)
    if at_nimg is not None and at_kimg is not None:
        raise EDM2Error("give either `at_nimg` or `at_kimg`, not both")
    if at_kimg is not None:
        match = [r.nimg for r in inputs if r.nimg // 1000 == int(at_kimg)]
        at_nimg = max(match) if match else int(at_kimg) * 1000
    t = last if at_nimg is None else int(at_nimg)
    if t <= 0:
        raise EDM2Error(f"at_nimg={t}: must be > 0")
    if t > last:
        raise EDM2Error(f"at_nimg={t}: beyond the last snapshot (nimg {last}); choose a time <= {last}")
    return t


def plan_posthoc(in_nimg, in_sigma_rel, sigma_rels, at_nimg, inputs=None) -> PosthocPlan:
    """Coefficients for the wanted sigma_rel list at time at_nimg from stored profiles
    (in_nimg, in_sigma_rel); only those with 0 < nimg <= at_nimg take part (docs/design.md#post-hoc-reconstruction)."""
    sigma_rels = [float(s) for s in np.atleast_1d(check_sigma_rel(sigma_rels, "sigma_rels"))]
    in_nimg, in_sigma_rel = np.asarray(in_nimg, np.int64), np.asarray(in_sigma_rel, np.float64)
    use = (in_nimg > 0) & (in_nimg <= at_nimg)
    if use.sum() < 2:
        raise EDM2Error(f"only {int(use.sum())} snapshot(s) with 0 < nimg <= {at_nimg}; post-hoc EMA needs at least 2 "
                         f"(train longer or choose a later `at_nimg`)")
    inputs = None if inputs is None else [r for r, u in zip(inputs, use) if u]
    in_nimg, in_sigma_rel = in_nimg[use], in_sigma_rel[use]
    X = solve_posthoc_coefficients(in_nimg, in_sigma_rel, at_nimg, sigma_rels)
    err = profile_fit_error(in_nimg, in_sigma_rel, X, at_nimg, sigma_rels)
    return PosthocPlan(in_nimg, in_sigma_rel, int(at_nimg), sigma_rels, X, err, inputs)


def check_profile_error(plan: PosthocPlan, max_profile_error=MAX_PROFILE_ERROR) -> None:
    """Raise `EDM2Error` if a wanted profile is realised with a relative L2 error
    (plan.fit_error) above max_profile_error (None: no check)."""
    if max_profile_error is None:
        return
    limit = check_float(max_profile_error, "max_profile_error", lo=0)
    bad = [j for j, e in enumerate(plan.fit_error) if not e <= limit]
    if bad:
        j = max(bad, key=lambda j: plan.fit_error[j])
        times = sorted({int(t) for t in plan.in_nimg})
        if plan.at_nimg in times:
            fix = (f"the {len(times)} snapshot times are too few for it; choose an EMA length nearer the stored "
                   f"ones ({', '.join(f'{s:g}' for s in sorted(set(plan.in_sigma_rel.tolist())))})")
        else:
            fix = (f"at_nimg={plan.at_nimg} lies after the last snapshot it can use (nimg {times[-1]}); choose a "
                   f"snapshot time")
        raise EDM2Error(f"max_profile_error={limit:g}: the stored snapshots realise sigma_rel={plan.sigma_rels[j]:g} "
                        f"at nimg {plan.at_nimg} only with a {plan.fit_error[j]:.1%} profile error (relative L2; "
                        f"{len(bad)} of {len(plan.sigma_rels)} EMA length(s) above the limit): {fix}, or pass a larger "
                        f"`max_profile_error` (None: no check)")


def plot_name(nimg: int, sigma_rel: float) -> str:
    return snapshot_name(nimg, sigma_rel).replace("snapshot-", "phema-").replace(".safetensors", ".png")


def plot_profiles(plan: PosthocPlan, j: int, path=None) -> bytes:
    """PNG (bytes; also written to `path` if given) of output j, like the paper's
    Figure 4: left, the stored profiles scaled by their coefficients; right, the
    wanted profile against the one the combination realises."""
    plt = pyplot()

    t, sigma_rel, X = plan.at_nimg, plan.sigma_rels[j], plan.coeffs[:, j]
    tau = np.unique(np.concatenate([np.linspace(0, t, 2001), plan.in_nimg, plan.in_nimg * (1 + 1e-9)]))
    tau = tau[tau <= t]
    unit, scale = next((u, s) for u, s in (("Mi", 2 ** 20), ("Ki", 2 ** 10), ("", 1)) if t >= 4 * s)
    x = tau / scale
    parts = X[:, None] * profile_density(tau[None, :], plan.in_nimg[:, None], plan.in_sigma_rel[:, None]) * t
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for i, part in enumerate(parts):
        ax0.plot(x, part, lw=0.8, color="tab:blue" if plan.in_sigma_rel[i] == plan.in_sigma_rel.min() else "tab:orange")
    ax0.set_title(f"{len(X)} stored profiles x coefficients (blue: sigma_rel {plan.in_sigma_rel.min():.3f})",
                  fontsize=9)
    ax1.plot(x, profile_density(tau, t, sigma_rel) * t, "k--", lw=2, label=f"wanted, sigma_rel={sigma_rel:.3f}")
    ax1.plot(x, parts.sum(0), color="tab:red", lw=1.2, label="realised by the combination")
    ax1.set_title(f"relative L2 error {plan.fit_error[j]:.2e}", fontsize=9)
    ax1.legend(fontsize=8)
    for ax in (ax0, ax1):
        ax.set_xlabel(f"training images{' (' + unit + ')' if unit else ''}")
        ax.grid(alpha=0.3)
    ax0.set_ylabel("weight density x t")
    fig.suptitle(f"post-hoc EMA at nimg={t}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _tensor_layout(inputs: list[PhemaInput]):
    """Names/shapes/dtypes of the tensors, checked across every input, and the
    names copied from the latest input instead of averaged -> (specs, copied names).

    edm2 networks (metadata with net_kwargs): the layout comes from the
    architecture and the copied tensors are its buffers (fixed at initialisation,
    so inputs that differ come from different runs). Snapshots of any other
    module (edm2.ema.trackers.PowerFunctionEMA, net_kwargs null): the layout comes from
    the latest file, and only non-float tensors (integer buffers) are copied."""
    if inputs[-1].meta.get("net_kwargs") is not None:
        with torch.device("meta"):
            net = build_network(snapshot_config(inputs[-1].meta), **precision_kwargs(inputs[-1].meta["net_kwargs"]))
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        buffers = {k for k, _ in net.named_buffers()}
        what = "the architecture in its metadata"
    else:
        with safe_open(str(inputs[-1].path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            buffers = {k for k in shapes if f.get_slice(k).get_dtype() not in _TORCH_DTYPES}
        what = f"the tensors of {inputs[-1].path.name}"
    dtypes, first = {}, {}
    for r in reversed(inputs):
        with safe_open(str(r.path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if got != shapes:
                raise SnapshotError(f"{r.path}: tensors do not match {what}; the file is damaged, not written by "
                                    f"edm2, or from another model")
            for k in shapes:
                dtypes.setdefault(k, f.get_slice(k).get_dtype())
            if inputs[-1].meta.get("net_kwargs") is None:
                continue
            # Buffers are fixed at initialisation: inputs that differ come from different runs.
            for k in buffers:
                first.setdefault(k, (f.get_tensor(k), r.path))
                if not torch.equal(f.get_tensor(k), first[k][0]):
                    raise EDM2Error(f"{r.path} and {first[k][1]}: different {k} (fixed at initialisation), so "
                                     f"they come from different runs; keep one run per folder")
    bad = sorted({d for k, d in dtypes.items()
                  if d not in _TORCH_DTYPES and (k not in buffers or d not in _COPIED_DTYPES)})
    if bad:
        raise SnapshotError(f"{inputs[-1].path}: tensor dtypes {bad} cannot be averaged")
    return [(k, SAFETENSORS_DTYPES[dtypes[k]], shapes[k]) for k in shapes], buffers


class _Readers:
    """Memory-mapped inputs. Touched pages of a mapping count in our RSS until it is
    closed, so the files are reopened after every `budget` bytes read."""

    def __init__(self, paths, budget=128 << 20):
        self.paths, self.budget, self.read, self.stack = paths, budget, 0, None
        self.reopen()

    def reopen(self):
        self.close()
        self.stack = ExitStack()
        self.files = [self.stack.enter_context(safe_open(str(p), framework="pt")) for p in self.paths]
        self.read = 0

    def rows(self, i, name, r0, r1, ndim):
        t = self.files[i].get_slice(name)[r0:r1] if ndim else self.files[i].get_tensor(name)
        self.read += t.numel() * t.element_size()
        return t

    def maybe_reopen(self):
        if self.read >= self.budget:
            self.reopen()

    def close(self):
        if self.stack is not None:
            self.stack.close()


# Conversions and the GEMM go through numpy: torch's thread pool costs milliseconds
# per call on small tensors when the CPU is busy, numpy's does not.
def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _from_numpy(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(x).to(dtype)
    return torch.from_numpy(x.astype(torch.empty((), dtype=dtype).numpy().dtype, copy=False))


def _stream(plan: PosthocPlan, specs, buffers, writers, chunk_elems: int, progress: bool):
    """theta_out[j] = sum_i coeffs[i, j] theta_in[i] per row block: one float32 GEMM
    [out, in] x [in, block] (solved in float64, accumulated in float32).
    Buffers (MPFourier freqs/phases) are copied from the latest input, not averaged."""
    coef = plan.coeffs.T.astype(np.float32)  # [out, in]
    n_in = coef.shape[1]
    readers = _Readers([r.path for r in plan.inputs])
    try:
        for name, dtype, shape in tqdm(specs, desc="post-hoc EMA", unit="tensor", disable=not progress):
            rows = shape[0] if len(shape) else 1
            row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) else 1
            if name in buffers:
                data = readers.rows(n_in - 1, name, 0, rows, len(shape))
                if data.is_floating_point() and not torch.isfinite(data).all():
                    _refuse_non_finite(plan.inputs[n_in - 1].path, name)
                for w in writers:
                    w.write(data)
                continue
            step = max(1, chunk_elems // max(row_elems, 1))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                block = np.empty((n_in, (r1 - r0) * row_elems), dtype=np.float32)
                for i in range(n_in):
                    block[i] = _as_numpy(readers.rows(i, name, r0, r1, len(shape))).reshape(-1)
                    if not np.isfinite(block[i]).all():
                        _refuse_non_finite(plan.inputs[i].path, name)
                out = coef @ block
                for j, w in enumerate(writers):
                    data = _from_numpy(out[j], dtype)
                    if not torch.isfinite(data).all():  # finite inputs, but out of the output dtype's range
                        raise EDM2Error(f"{name}: the post-hoc EMA of sigma_rel={plan.sigma_rels[j]:g} overflows "
                                        f"{dtype} (non-finite values); nothing was written")
                    w.write(data)
                readers.maybe_reopen()
    finally:
        readers.close()


def _refuse_non_finite(path: Path, name: str):
    raise EDM2Error(f"{path}: tensor {name} holds NaN or infinite values (the run diverged by this snapshot?); "
                    f"post-hoc EMA would be NaN; choose an earlier `at_nimg` or move this snapshot out of the "
                    f"run folder; nothing was written")


def _output_meta(plan: PosthocPlan, j: int) -> dict:
    meta = copy.deepcopy(plan.inputs[-1].meta)
    meta["nimg"], meta["ema_std"] = plan.at_nimg, plan.sigma_rels[j]
    meta["origin"]["phema"] = {
        "at_nimg": plan.at_nimg, "ema_std": plan.sigma_rels[j], "fit_error": float(plan.fit_error[j]),
        "inputs": [{"file": r.path.name, "nimg": r.nimg, "ema_std": r.sigma_rel, "coeff": float(c)}
                   for r, c in zip(plan.inputs, plan.coeffs[:, j])]}
    return meta


class _StateDictWriter:
    """`_stream`'s output side for in-memory results: fills one tensor per spec
    from the row blocks, in order."""

    def __init__(self, specs):
        self.state = {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in specs}
        self.flat = [(t.view(-1) if t.dim() else t.view(1)) for t in self.state.values()]
        self.i, self.pos = 0, 0

    def write(self, data: torch.Tensor) -> None:
        data = data.reshape(-1)
        while data.numel():
            dst = self.flat[self.i]
            n = min(data.numel(), dst.numel() - self.pos)
            dst[self.pos:self.pos + n] = data[:n]
            data, self.pos = data[n:], self.pos + n
            if self.pos == dst.numel():
                self.i, self.pos = self.i + 1, 0


def stream_state_dicts(plan: PosthocPlan, progress: bool = False, chunk_elems: int = 1 << 18) -> list[dict]:
    """The outputs of a plan made from files (plan_posthoc(..., inputs)) as state
    dicts in memory, one per wanted sigma_rel, computed by the same streaming
    combination that `reconstruct` writes to files."""
    specs, buffers = _tensor_layout(plan.inputs)
    writers = [_StateDictWriter(specs) for _ in plan.sigma_rels]
    _stream(plan, specs, buffers, writers, chunk_elems, progress)
    return [w.state for w in writers]


def reconstruct(rundir, outdir, sigma_rels, at_nimg=None, at_kimg=None, plot=False, overwrite=False,
                progress=True, chunk_elems=1 << 18, max_profile_error=MAX_PROFILE_ERROR,
                lock: bool = True) -> list[Path]:
    """Write post-hoc EMA snapshots of a training run (paper Sec. 3.2, App. C.5).

    rundir: the run folder (its snapshot-<nimg>-<sigma_rel>.safetensors files);
    outdir: where outputs go, named snapshot_name(t, sigma_rel);
    sigma_rels: wanted sigma_rel values (list or '0.05,0.1' / '0.010,0.015,...,0.250');
    at_nimg / at_kimg: output time (default: the last snapshot);
    plot: also write phema-<nimg>-<sigma_rel>.png per output (plot_profiles);
    overwrite: replace existing output files (never an input);
    max_profile_error: refuse (`EDM2Error`) if a wanted profile is realised with a
        larger relative L2 error (see `MAX_PROFILE_ERROR`, the default); None: no check;
    lock: take `outdir`'s RunLock while writing; False when the caller already holds it.
    Everything is checked before anything is written, and inputs holding NaN or
    infinite values are refused (nothing is written). Returns the snapshot paths."""
    sigma_rels = list(dict.fromkeys(parse_float_list(sigma_rels, "sigma_rels")))
    check_sigma_rel(sigma_rels, "sigma_rels", distinct=True)  # one output file name each
    inputs = find_phema_inputs(rundir)
    t = resolve_time(inputs, at_nimg, at_kimg)
    plan = plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs], sigma_rels, t, inputs)
    check_profile_error(plan, max_profile_error)

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ExistingFileError(f"outdir={outdir}: exists and is not a folder")
    out_paths = [outdir / snapshot_name(t, s) for s in sigma_rels]
    png_paths = [outdir / plot_name(t, s) for s in sigma_rels] if plot else []
    in_files = {r.path.resolve() for r in inputs}
    for p in out_paths:
        if p.resolve() in in_files:
            raise ExistingFileError(f"{p}: would replace a training snapshot; choose another `outdir`")
    specs, buffers = _tensor_layout(plan.inputs)
    with RunLock(outdir, "`outdir`") if lock else nullcontext():
        # Leftovers of a killed run: temp files (only ours can be there, as we hold the lock).
        remove_temp_files(outdir, ("snapshot-", "phema-"))
        # Outputs of exactly this reconstruction (same inputs, time, EMA length) are kept: a re-run resumes.
        done = [p.is_file() and _same_output(p, _output_meta(plan, j)) for j, p in enumerate(out_paths)]
        todo = [j for j in range(len(sigma_rels)) if not done[j]]
        in_way = [out_paths[j] for j in todo if out_paths[j].exists()]
        in_way += [png_paths[j] for j in todo if plot and png_paths[j].exists()]
        if in_way and not overwrite:
            raise ExistingFileError(f"{in_way[0]}: already exists and is not this reconstruction's output "
                                  f"({len(in_way)} file(s) in the way); pass overwrite=True or choose another `outdir`")
        writers = []
        try:
            for j in todo:
                writers.append(SnapshotStreamWriter(out_paths[j], specs, _output_meta(plan, j)))
            if writers:
                _stream(plan, specs, buffers, writers, chunk_elems, progress)
            for w in writers:
                w.commit()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for j in range(len(sigma_rels)) if plot else []:
            if j in todo or not png_paths[j].exists():
                atomic_write_bytes(png_paths[j], plot_profiles(plan, j))
    return out_paths


def _same_output(path: Path, meta: dict) -> bool:
    """Is `path` a complete output with exactly this metadata (same inputs, coefficients, run)?"""
    try:
        old = read_snapshot_meta(path)
    except SnapshotError:
        return False
    return old == json.loads(json.dumps(meta))
