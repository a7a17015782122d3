"""Stable Diffusion VAE latents (paper App. B.1) for the ImageNet-512 recipe.

`encode_dataset`: image dataset -> latent dataset of float32 `.npy` items
[8, H/8, W/8] = [posterior mean (4), posterior std (4)] of the VAE encoder,
pixels /255 as its input. The stored values are raw: the standardisation
(scale 0.5/raw_std, bias -raw_mean·scale) is applied once, at training time, by
`StabilityVAEEncoder.encode_latents`. Encoding is resumable: items go to
`DEST.partial/` one by one, and a re-run keeps those already written.

`decode_dataset`: latent dataset -> PNG image dataset, decoding each item's
posterior mean through `StabilityVAEEncoder.decode`.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..encoders import DEFAULT_VAE, StabilityVAEEncoder
from ..utils.distributed import resolve_device
from ..utils.errors import EDM2Error
from ..utils.fileio import atomic_write_bytes, move_into_place, png_bytes
from ..utils.validate import check_int
from .dataset import ImageDataset
from .writer import DatasetWriter, check_destination, item_name, write_dataset_json


@dataclass
class LatentResult:
    dest: Path
    count: int            # items in the result
    computed: int         # items computed by this call (the rest were kept from an earlier run)
    resolution: int       # of the result's items
    notes: list[str]


def latent_name(idx: int) -> str:
    """The official tool's name of latent items: '00000/img-mean-std-00000000.npy'."""
    return item_name(idx, "npy", "img-mean-std-")


def _labels(ds: ImageDataset, names: list[str]):
    if ds.raw_labels is None:
        return None
    return [[n, int(c)] for n, c in zip(names, ds.raw_labels)]


def _npy_ok(path: Path, shape) -> bool:
    """Is `path` a complete float32 .npy of `shape` (an item kept from an earlier run)?"""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return arr.dtype == np.float32 and arr.shape == tuple(shape)
    except Exception:
        return False


def _check_counts(batch_size, workers) -> tuple[int, int]:
    """The VAE batch size (>= 1) and the number of DataLoader processes (>= 0), or EDM2Error."""
    return check_int(batch_size, "batch_size", lo=1), check_int(workers, "workers", lo=0)


def _batches(ds: ImageDataset, indices: list[int], batch_size: int, workers: int):
    """Yield (indices, stacked items) in order; `workers` > 0 reads with DataLoader processes."""
    if not indices:
        return
    subset = torch.utils.data.Subset(ds, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False)
    pos = 0
    for items, _labels in loader:
        yield indices[pos:pos + len(items)], items
        pos += len(items)


def encode_dataset(source, dest, vae: str = DEFAULT_VAE, batch_size: int = 8, device: str | None = None,
                   overwrite: bool = False, workers: int = 0, progress: bool = True) -> LatentResult:
    """Encode the image dataset `source` to a latent dataset at `dest` (folder, or zip if it ends in .zip).

    vae: hub name or a folder written by `AutoencoderKL.save_pretrained`; loaded before any
        work, so a missing VAE fails at once (`VAEUnavailable`, a RuntimeError, with a how-to).
    Grayscale images are repeated to RGB. Resumable: see the module doc.
    batch_size >= 1 and workers >= 0 are checked before anything is read or written.
    """
    batch_size, workers = _check_counts(batch_size, workers)
    dest = check_destination(dest, overwrite, source)
    ds = ImageDataset(source)
    if ds.is_latent:
        raise EDM2Error(f"source={source} already holds latents; encode needs an image dataset")
    if ds.resolution % 8:
        raise EDM2Error(f"source={source}: resolution {ds.resolution} is not a multiple of 8 (the VAE "
                         f"downsamples by 8); convert it with `edm2 dataset convert --resolution N`, N a multiple of 8")
    notes = ["grayscale images repeated to RGB for the VAE"] if ds.num_channels == 1 else []
    device = resolve_device(device)
    encoder = StabilityVAEEncoder(vae_name=vae, batch_size=batch_size)
    encoder.vae(device)  # load now: fail before any work

    partial = dest.with_name(dest.name + ".partial")
    shape = (8, ds.resolution // 8, ds.resolution // 8)
    _claim_partial(partial, {"source": str(Path(source).resolve()), "count": ds.raw_size,
                             "resolution": ds.resolution, "vae": str(vae)})
    names = [latent_name(i) for i in range(ds.raw_size)]
    todo = [i for i in range(ds.raw_size) if not _npy_ok(partial / names[i], shape)]
    if len(todo) < ds.raw_size:
        notes.append(f"resumed: kept {ds.raw_size - len(todo)} item(s) from {partial}")

    with tqdm(total=ds.raw_size, initial=ds.raw_size - len(todo), desc="encoding", unit="img",
              disable=not progress) as bar:
        for idx, items in _batches(ds, todo, batch_size, workers):
            if items.shape[1] == 1:
                items = items.repeat(1, 3, 1, 1)
            latents = encoder.encode_pixels(items.to(device)).cpu().numpy()
            for i, latent in zip(idx, latents):
                _save_npy(partial / names[i], latent)
            bar.update(len(idx))

    labels = _labels(ds, names)
    (partial / _MARKER).unlink()
    if dest.suffix.lower() == ".zip":
        with DatasetWriter(dest, overwrite, source) as writer:
            for name in tqdm(names, desc="packing", unit="item", disable=not progress):
                writer.add_file(name, partial / name)
            writer.commit(labels, ds.class_names)
        shutil.rmtree(partial)
    else:
        atomic_write_bytes(partial / "dataset.json", write_dataset_json(labels, ds.class_names))
        move_into_place(partial, dest)
    ds.close()
    return LatentResult(dest, ds.raw_size, len(todo), shape[1], notes)


_MARKER = ".edm2-encode.json"


def _claim_partial(partial: Path, job: dict) -> None:
    """Create DEST.partial/ with a note of the job, or check that an existing one is the same job."""
    marker = partial / _MARKER
    if partial.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if old != job:
            raise EDM2Error(f"{partial} holds an unfinished encode of another source or VAE ({old}); "
                             f"delete that folder to start over, or rerun the same command to resume it")
        return
    partial.mkdir(parents=True)
    atomic_write_bytes(marker, json.dumps(job).encode())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Write one item under a temporary name, then rename (a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def decode_dataset(source, dest, vae: str = DEFAULT_VAE, batch_size: int = 8, device: str | None = None,
                   overwrite: bool = False, workers: int = 0, progress: bool = True) -> LatentResult:
    """Decode the latent dataset `source` to a PNG image dataset at `dest`.

    Each item's posterior mean is standardised and passed to `StabilityVAEEncoder.decode`,
    which undoes the standardisation, runs the VAE decoder, clamps to [0, 1] and
    truncates x·255 to uint8 (as the authors' code): the net effect is VAE.decode(mean), the
    constants being applied exactly once in each direction.
    """
    batch_size, workers = _check_counts(batch_size, workers)
    dest = check_destination(dest, overwrite, source)
    ds = ImageDataset(source)
    if not ds.is_latent:
        raise EDM2Error(f"source={source} holds images, not latents; decode needs a latent dataset")
    device = resolve_device(device)
    encoder = StabilityVAEEncoder(vae_name=vae, batch_size=batch_size)
    encoder.vae(device)
    names = []
    with DatasetWriter(dest, overwrite, source) as writer, \
            tqdm(total=ds.raw_size, desc="decoding", unit="img", disable=not progress) as bar:
        for idx, items in _batches(ds, list(range(ds.raw_size)), batch_size, workers):
            mean = items[:, :4].to(device)
            z = mean * encoder._const(encoder.scale, mean) + encoder._const(encoder.bias, mean)
            pixels = encoder.decode(z).cpu().numpy()
            for i, img in zip(idx, pixels):
                name = item_name(i)
                writer.add(name, png_bytes(img.transpose(1, 2, 0), compress_level=1))
                names.append(name)
            bar.update(len(idx))
        writer.commit(_labels(ds, names), ds.class_names)
    ds.close()
    return LatentResult(dest, ds.raw_size, ds.raw_size, ds.resolution * 8, [])
