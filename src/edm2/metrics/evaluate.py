"""Reference statistics and metrics of image folders or of a network (paper App. D.4, A.5).

- `reference_stats(data, dest)`: mean and covariance of every image of a
  dataset, per metric, saved as .npz (float64, no pickle).
- `calc_metrics(images, ref)`: Fréchet distances of a folder/zip of images
  (a seeded random subset of `num` when it holds more).
- `gen_metrics(net, ref, gnet=None, guidance=1)`: generate `num` images on the
  fly (seeds seed·num ... (seed+1)·num - 1) with `edm2.generate` and evaluate
  them, guided or not, writing no image.

Under torchrun every process takes its share of the images; the float64
feature sums are then added over the processes (`FeatureStats.all_reduce`),
so the result does not depend on the number of processes. Only rank 0
writes files.
"""
from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageDataset
from ..generate import generate_images, load_nets
from ..io.official import load_reference_stats
from ..sampling import check_guidance
from ..utils.distributed import init_distributed, resolve_device
from ..utils.errors import EDM2Error, ExistingFileError, MissingFileError
from ..utils.fileio import atomic_write_bytes
from ..utils.validate import safe_error_text
from .detectors import DETECTORS, detector_record, load_detector
from .stats import FeatureStats, frechet_distance

REF_FORMAT = "edm2-ref-v1"


# ---------------------------------------------------------------------------
# Reference statistics files
# ---------------------------------------------------------------------------

def save_ref(path, stats: dict, source: str = "", detectors: dict | None = None,
             resolution: int | None = None) -> Path:
    """Write {metric: FeatureStats} as .npz: `<metric>_mu`, `<metric>_sigma`
    (float64), `<metric>_num`, plus `format`, `source` and `meta` (strings). `meta`
    is JSON: the detector of each metric (`edm2.metrics.detectors.detector_record`:
    name, and the classifier's sha256 for fd_classifier), the image resolution and
    the source, which readers check (`check_ref_detectors`, `check_ref_resolution`). Atomic."""
    meta = {"source": str(source), "resolution": None if resolution is None else int(resolution),
            "detectors": {m: detector_record(m, d) for m, d in (detectors or {}).items() if m in stats}}
    arrays = {"format": np.array(REF_FORMAT), "source": np.array(str(source)), "meta": np.array(json.dumps(meta))}
    for metric, s in stats.items():
        arrays[f"{metric}_mu"] = s.mean()
        arrays[f"{metric}_sigma"] = s.cov()
        arrays[f"{metric}_num"] = np.array(s.num, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def check_ref_stats(ref: dict, where: str = "REF") -> dict:
    """Raise EDM2Error unless every entry of reference statistics is usable:
    mu a finite [D] vector, sigma a finite [D, D] matrix that is symmetric and
    positive semi-definite up to round-off (relative tolerance 1e-6 of its
    largest entry / eigenvalue), as a covariance must be. Returns ref."""
    if not isinstance(ref, dict) or not ref:
        raise EDM2Error(f"ref={where}: holds no statistics")
    for m, s in ref.items():
        mu, sigma = np.asarray(s["mu"]), np.asarray(s["sigma"])
        what = f"ref={where}: {m}"
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or mu.size == 0:
            raise EDM2Error(f"{what}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]; "
                             f"the file is damaged: recompute it with `edm2 metrics ref`")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise EDM2Error(f"{what}: holds NaN or infinite values; the file is damaged: recompute it "
                             f"with `edm2 metrics ref`")
        scale = max(float(np.abs(sigma).max()), 1e-300)
        if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
            raise EDM2Error(f"{what}: the covariance is not symmetric, so it is not a covariance; the file is "
                             f"damaged: recompute it with `edm2 metrics ref`")
        w = np.linalg.eigvalsh((sigma + sigma.T) / 2)
        if w.min() < -1e-6 * max(float(w.max()), 1e-300):
            raise EDM2Error(f"{what}: the covariance has a negative eigenvalue ({w.min():.3g}), so it is not a "
                             f"covariance; the file is damaged: recompute it with `edm2 metrics ref`")
    return ref


def load_ref(path) -> dict:
    """Reference statistics -> {metric: {'mu': [D], 'sigma': [D, D]}} (float64),
    checked with `check_ref_stats` (finite, symmetric, positive semi-definite).

    Reads our .npz (`save_ref`), and through `edm2.io.official.load_reference_stats`
    the authors' published EDM2 .pkl (restricted unpickler, also URLs) and the
    older EDM .npz (FID only)."""
    return check_ref_stats(_read_ref(path), str(path))


def _read_ref(path) -> dict:
    text = str(path)
    if "://" not in text and not Path(text).is_file():
        raise MissingFileError(f"ref={text}: no such file; compute one with `edm2 metrics ref --data DATASET "
                                f"--dest {text}` or pass the authors' reference .pkl")
    if text.endswith(".npz") and "://" not in text:
        try:
            with np.load(text, allow_pickle=False) as z:
                if "format" in z.files:
                    if str(z["format"]) != REF_FORMAT:
                        raise EDM2Error(f"ref={text}: format {str(z['format'])!r}, this edm2 reads {REF_FORMAT!r}")
                    names = [k[:-3] for k in z.files if k.endswith("_mu")]
                    meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
                    if not isinstance(meta, dict):
                        raise ValueError("its meta record is not a JSON object")
                    dets = meta.get("detectors") or {}
                    return {m: {"mu": z[f"{m}_mu"].astype(np.float64), "sigma": z[f"{m}_sigma"].astype(np.float64),
                                "detector": dets.get(m), "resolution": meta.get("resolution"),
                                "source": meta.get("source") or str(z["source"]), "path": text}
                            for m in names}
        except EDM2Error:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise EDM2Error(f"ref={text}: unreadable statistics file ({safe_error_text(e)})") from None
    return load_reference_stats(text)


def _where(ref: dict, ref_path) -> str:
    """The reference's file for messages: `ref_path`, or the path `load_ref` kept in a loaded dict."""
    if ref_path != "REF":
        return str(ref_path)
    return next((s["path"] for s in ref.values() if isinstance(s, dict) and s.get("path")), "REF")


def _recompute_hint(ref: dict, metric: str, ref_path) -> str:
    data = (ref.get(metric) or {}).get("source") or "DATASET"
    new = Path(str(ref_path)).with_name(Path(str(ref_path)).stem + "-new.npz") if ref_path != "REF" else "NEW.npz"
    return f"recompute it with `edm2 metrics ref --data {data} --dest {new} --metrics {metric} --detector-dir DIR`"


def check_ref_detectors(ref: dict, detectors: dict, ref_path="REF") -> None:
    """Refuse reference statistics made with another detector than the one scoring now
    (a Fréchet distance between features of two different networks means nothing).
    fd_classifier statistics must record their classifier's sha256 (`save_ref`); the
    fixed, published detectors (fid, fd_dinov2) are named by their metric, and files
    without a record (the authors' .pkl, older files) are taken as made with them."""
    ref_path = _where(ref, ref_path)
    for m, det in detectors.items():
        if m not in ref:
            continue
        have = detector_record(m, det)
        made = ref[m].get("detector")
        if m == "fd_classifier" and not (isinstance(made, dict) and made.get("sha256")):
            raise EDM2Error(f"ref={ref_path}: its fd_classifier statistics do not record which classifier made "
                            f"them, so they cannot be checked against classifier {have['sha256'][:12]}; "
                            + _recompute_hint(ref, m, ref_path))
        if not isinstance(made, dict):
            continue
        if made.get("name") != m or made.get("sha256") != have.get("sha256"):
            what = "classifier" if m == "fd_classifier" else "detector"
            was = (made.get("sha256") or "?")[:12] if m == "fd_classifier" else made.get("name")
            now = have["sha256"][:12] if m == "fd_classifier" else m
            raise EDM2Error(f"ref={ref_path}: {m} statistics made with {what} {was} but scoring with {what} {now}; "
                            + _recompute_hint(ref, m, ref_path))


def check_ref_resolution(ref: dict, resolution: int, ref_path="REF", what: str = "images") -> None:
    """Refuse scoring images of another resolution than the reference's (when it recorded one)."""
    ref_path = _where(ref, ref_path)
    for s in ref.values():
        res = s.get("resolution") if isinstance(s, dict) else None
        if res is not None and int(res) != int(resolution):
            raise EDM2Error(f"ref={ref_path}: made from {res}x{res} images but the {what} are "
                            f"{resolution}x{resolution}; use reference statistics of data at {resolution}x"
                            f"{resolution} (`edm2 metrics ref`)")


def _check_batches_resolution(batches, ref: dict, ref_path, what: str):
    """Pass batches through, checking the first one's resolution against the reference."""
    first = True
    for images in batches:
        if first and len(images):
            check_ref_resolution(ref, int(images.shape[-1]), ref_path, what)
            first = False
        yield images


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

def resolve_metrics(metrics, ref: dict | None = None, ref_path="REF") -> list[str]:
    """'fid,fd_dinov2' / list / None -> list of metric names, checked against the
    known detectors and (if given) the metrics the reference holds. None: every
    metric in the reference (or fid and fd_dinov2 without one)."""
    if metrics is None:
        names = [m for m in (ref or {"fid": 0, "fd_dinov2": 0}) if m in DETECTORS]
        if not names:
            raise EDM2Error(f"ref={ref_path}: holds no statistics of a known metric ({', '.join(ref)})")
    else:
        names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
        names = list(dict.fromkeys(m for m in names if m))
        if not names:
            raise EDM2Error(f"metrics={metrics!r}: empty; give e.g. fid,fd_dinov2")
    given = metrics if isinstance(metrics, str) or metrics is None else ",".join(map(str, metrics))
    for m in names:
        if m not in DETECTORS:
            raise EDM2Error(f"metrics={given!r}: unknown metric {m!r}; choose from fid, fd_dinov2")
        if ref is not None and m not in ref:
            raise EDM2Error(f"ref={ref_path}: has no {m} statistics (it holds {', '.join(ref)}); recompute it "
                             f"with `edm2 metrics ref --metrics {','.join(names)}` or drop {m} from `metrics`")
    return names


def load_detectors(metrics, detector_dir=None, device="cpu", download: bool = True) -> dict:
    """{metric: Detector} for a list of metric names (see `load_detector`)."""
    return {m: load_detector(m, detector_dir, device, download) for m in metrics}


def _compute_stats(batches, detectors: dict, device="cpu") -> dict:
    """Feed uint8 image batches [N, C, H, W] to every detector ->
    {metric: FeatureStats}, summed over torch.distributed processes."""
    stats = {m: FeatureStats(d.feature_dim, device) for m, d in detectors.items()}
    for images in batches:
        if len(images) == 0:
            continue
        images = torch.as_tensor(images).to(device)
        for m, det in detectors.items():
            stats[m].append(det(images))
    for s in stats.values():
        s.all_reduce()
    return stats


def distances(stats: dict, ref: dict) -> dict:
    """{metric: Fréchet distance of FeatureStats to the reference}."""
    out = {}
    for m, s in stats.items():
        if ref[m]["mu"].shape != (s.dim,):
            raise EDM2Error(f"reference {m} statistics are {ref[m]['mu'].shape[0]}-d but the detector gives "
                             f"{s.dim}-d features; the reference was made with another detector")
        mu, cov = s.mean(), s.cov()
        if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
            raise EDM2Error(f"{m}: the detector's features are not finite (NaN/inf); the images or the detector "
                             f"weights are damaged; no result was recorded")
        out[m] = check_metric_value(m, frechet_distance(mu, cov, ref[m]["mu"], ref[m]["sigma"]),
                                    scale=float(np.trace(cov) + np.trace(ref[m]["sigma"])))
    return out


def check_metric_value(name: str, value: float, scale: float = 1.0) -> float:
    """A Fréchet distance is a squared distance: >= 0 and finite. Round-off may
    make it slightly negative for (nearly) identical statistics; within 1e-9 of
    the covariances' total variance `scale` it is clipped to 0, anything else
    is an error (a damaged reference or features), never a number in the output."""
    if not np.isfinite(value) or value < -1e-9 * max(abs(scale), 1.0):
        raise EDM2Error(f"{name}: the computed distance is {value}, which a Fréchet distance cannot be; the "
                         f"reference statistics or the features are damaged; no result was recorded")
    return max(float(value), 0.0)


def _open_images(path, what: str):
    ds = ImageDataset(path, use_labels=False)
    if ds.is_latent:
        raise EDM2Error(f"{what}={path}: holds VAE latents; statistics are computed on pixels, so pass the "
                         f"image dataset (folder or zip of PNGs) the latents were encoded from")
    if ds.num_channels not in (1, 3):
        raise EDM2Error(f"{what}={path}: {ds.num_channels}-channel images; detectors take grayscale or RGB")
    return ds


def _stack_images(items):
    return torch.from_numpy(np.stack([image for image, _ in items]))


def _dataset_batches(ds, indices, batch_size: int, workers: int):
    if batch_size < 1:
        raise EDM2Error(f"batch_size={batch_size}: must be >= 1")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(indices)), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_stack_images)
    yield from loader


def _progress(batches, total, desc, enabled):
    with tqdm(total=total, unit="img", desc=desc, disable=not enabled) as bar:
        for b in batches:
            bar.update(len(b))
            yield b


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------

def reference_stats(data, dest, metrics=("fid", "fd_dinov2"), batch_size: int = 64, workers: int = 2,
                    detector_dir=None, device=None, progress: bool = True, detectors: dict | None = None) -> dict:
    """Statistics of every image of the dataset `data` (folder or zip) for each
    metric, saved to `dest` (.npz, never overwritten). Returns {metric: FeatureStats}.
    detectors: preloaded {metric: Detector} (default: `load_detectors`)."""
    dest = Path(dest)
    if dest.suffix != ".npz":
        raise EDM2Error(f"dest={dest}: reference statistics are written as .npz; use a name ending in .npz")
    if dest.exists():
        raise ExistingFileError(f"dest={dest}: already exists; delete it or choose another name")
    metrics = resolve_metrics(list(detectors) if detectors else metrics)
    ds = _open_images(data, "data")
    rank, world = init_distributed()
    device = resolve_device(device)
    detectors = detectors or load_detectors(metrics, detector_dir, device)
    batches = _dataset_batches(ds, range(rank, len(ds), world), batch_size, workers)
    stats = _compute_stats(_progress(batches, len(range(rank, len(ds), world)), "ref", progress and rank == 0),
                          detectors, device)
    if rank == 0:
        save_ref(dest, stats, source=str(data), detectors=detectors, resolution=ds.resolution)
    return stats


def calc_metrics(images, ref, metrics=None, num: int = 50000, seed: int = 0, batch_size: int = 64,
                 workers: int = 2, detector_dir=None, device=None, progress: bool = True,
                 detectors: dict | None = None) -> dict:
    """Fréchet distances of the images in a folder/zip against the reference
    statistics `ref` (path or loaded dict). With more than `num` images a random
    subset of `num` is used (seeded by `seed`); fewer is an error.
    Returns {metric: value}."""
    ref_path, ref = (ref, load_ref(ref)) if not isinstance(ref, dict) else ("REF", ref)
    metrics = resolve_metrics(metrics, ref, ref_path)
    ds = _open_images(images, "images")
    if num < 2 or len(ds) < num:
        raise EDM2Error(f"images={images}: holds {len(ds)} images but num={num}; pass num={len(ds)} "
                         f"or fewer (at least 2; the paper uses 50000)")
    chosen = np.arange(len(ds)) if len(ds) == num else np.sort(
        np.random.RandomState(seed % (1 << 32)).choice(len(ds), num, replace=False))
    rank, world = init_distributed()
    device = resolve_device(device)
    check_ref_resolution(ref, ds.resolution, ref_path, f"images in {images}")
    detectors = {m: detectors[m] for m in metrics} if detectors else load_detectors(metrics, detector_dir, device)
    check_ref_detectors(ref, detectors, ref_path)
    mine = chosen[rank::world]
    batches = _dataset_batches(ds, mine, batch_size, workers)
    stats = _compute_stats(_progress(batches, len(mine), "calc", progress and rank == 0), detectors, device)
    return distances(stats, ref)


def gen_seeds(num: int, seed: int = 0) -> range:
    """Seeds of evaluation `seed`: seed·num ... (seed+1)·num - 1 (disjoint for seeds 0, 1, 2)."""
    return range(seed * num, (seed + 1) * num)


def gen_metrics(net, ref, gnet=None, guidance: float = 1, metrics=None, num: int = 50000, seed: int = 0,
                batch_size: int = 32, detector_dir=None, device=None, progress: bool = True,
                detectors: dict | None = None, **sampler_kwargs) -> dict:
    """Generate `num` images with `net` (snapshot, run folder or authors' .pkl;
    guided by `gnet` with weight `guidance`) for the seeds `gen_seeds(num, seed)`
    and return {metric: Fréchet distance to `ref`}. Nothing is written.
    sampler_kwargs: edm_sampler's options (num_steps, S_churn, ...)."""
    ref_path, ref = (ref, load_ref(ref)) if not isinstance(ref, dict) else ("REF", ref)
    metrics = resolve_metrics(metrics, ref, ref_path)
    if num < 2:
        raise EDM2Error(f"num={num}: need at least 2 images (the paper uses 50000)")
    check_guidance(guidance, gnet)
    rank, world = init_distributed()
    device = resolve_device(device)
    net, gnet, encoder, _ = load_nets(net, gnet, device)  # also checks that gnet fits net
    detectors = {m: detectors[m] for m in metrics} if detectors else load_detectors(metrics, detector_dir, device)
    check_ref_detectors(ref, detectors, ref_path)
    batches = (b.images for b in generate_images(net, encoder, gen_seeds(num, seed), gnet=gnet, guidance=guidance,
                                                   batch_size=batch_size, device=device, rank=rank,
                                                   world_size=world, progress=progress and rank == 0,
                                                   **sampler_kwargs))
    batches = _check_batches_resolution(batches, ref, ref_path, "generated images")
    return distances(_compute_stats(batches, detectors, device), ref)


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line to `path` (rewritten atomically: temp file + rename)."""
    path = Path(path)
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    try:
        line = json.dumps(record, allow_nan=False)  # strict JSON: a NaN result is an error, not a token
    except ValueError:
        raise EDM2Error(f"{path}: a result is NaN or infinite ({record}); nothing was appended") from None
    atomic_write_bytes(path, old + (line + "\n").encode())
