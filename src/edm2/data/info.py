"""`dataset_info`: what a dataset holds (count, resolution, channels, labels, class balance)."""
from __future__ import annotations

import os
from pathlib import Path

from .dataset import ImageDataset


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def dataset_info(path) -> dict:
    """Summary of the dataset at `path` as a JSON-able dict."""
    ds = ImageDataset(path)
    counts = ds.class_counts()
    info = {
        "path": str(ds.path), "format": "zip" if ds.path.is_file() else "folder",
        "kind": "latents" if ds.is_latent else "images", "count": ds.raw_size,
        "resolution": ds.resolution, "channels": ds.num_channels,
        "label_dim": ds.label_dim, "class_names": ds.class_names,
        "class_counts": None if counts is None else counts.tolist(),
        "bytes": _size_bytes(ds.path),
    }
    if ds.is_latent:
        info["image_resolution"] = ds.resolution * 8  # the SD VAE downsamples by 8 (paper App. B.1)
    ds.close()
    return info


def format_info(info: dict) -> str:
    """Human-readable text of `dataset_info`'s dict."""
    shape = f"{info['channels']}x{info['resolution']}x{info['resolution']}"
    images = f" (images {info['image_resolution']}x{info['image_resolution']})" if info["kind"] == "latents" else ""
    lines = [f"dataset     {info['path']} ({info['format']}, {info['bytes'] / 2**20:.1f} MiB)",
             f"items       {info['count']} {info['kind']} of {shape}{images}"]
    if not info["label_dim"]:
        lines.append("labels      none")
        return "\n".join(lines)
    lines.append(f"labels      {info['label_dim']} classes")
    counts = info["class_counts"]
    if counts is not None:
        names = info["class_names"] or [str(i) for i in range(len(counts))]
        lo, hi = min(counts), max(counts)
        lines.append(f"balance     {lo}..{hi} per class" + (" (balanced)" if lo == hi else ""))
        if len(counts) <= 50:
            width = max(len(n) for n in names)
            lines += [f"  {i:4d}  {n:<{width}}  {c}" for i, (n, c) in enumerate(zip(names, counts))]
    return "\n".join(lines)
