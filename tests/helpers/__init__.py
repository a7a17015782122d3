"""Shared helpers of the test suite: small datasets, snapshots and VAE
configurations made on the spot (`tests/conftest.py` turns the common ones
into fixtures).

    helpers           make_dataset, write_images, write_snapshot, write_ema_run (EMA snapshots of a
                      fake run), write_run (a run folder with config.json), SD_VAE_CONFIG, SMALL_CONFIG
    helpers.cli       run the CLI in-process, assert a one-line refusal that changed nothing, hold a
                      folder's RunLock from another process (hold_lock)
    helpers.official  pickles in the authors' format, written without their code
"""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from edm2.encoders import StandardRGBEncoder
from edm2.io.snapshot import make_meta, save_snapshot
from edm2.nn import Precond
from edm2.presets import get_preset


def make_dataset(path, n=24, channels=1, labels=True, res=16):
    """n images of 4 classes (a bar whose height depends on the class), dataset.json labels."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        c = i % 4
        img = np.zeros([res, res, channels], np.uint8)
        img[2 + 3 * c:4 + 3 * c, 2:res - 2] = rng.integers(150, 255)
        Image.fromarray(img[:, :, 0] if channels == 1 else img).save(path / f"{i:04d}.png")
        entries.append([f"{i:04d}.png", c])
    if labels:
        (path / "dataset.json").write_text(json.dumps({"labels": entries, "class_names": list("abcd")}))
    return path

def write_snapshot(path, label_dim=3, resolution=16, channels=1, seed=0, encoder=None):
    """A tiny random network with non-zero gains (a fresh one outputs c_skip * x only)."""
    torch.manual_seed(seed)
    kw = dict(get_preset("tiny").net_kwargs(label_dim), img_resolution=resolution, img_channels=channels)
    net = Precond(**kw)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.5)
    encoder = encoder or StandardRGBEncoder().to_meta()
    meta = make_meta(kw, 64, 0.1, encoder, {"resolution": resolution, "channels": channels, "label_dim": label_dim})
    save_snapshot(path, net, meta)
    return path

# The architecture of stabilityai/sd-vae-ft-mse (its config.json).
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu",
                     block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# Same family, narrow: 4 levels (downsampling by 8), fast on a CPU.
SMALL_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1)


# A training run's EMA snapshots.
def write_ema_run(folder, times=(64, 128, 192), sigma_rels=(0.05, 0.10), seed=0, step=0.01, origin=None,
                  dtype=torch.float32, run_id=None, run=None, **net_kwargs):
    """A fake training run, named and described as the trainer does: a tiny Precond
    (preset tiny, unconditional; `net_kwargs` override) whose parameters take a random
    step of size `step` before each snapshot, one file per time (images) and sigma_rel.
    origin: the snapshots' origin metadata (default: preset tiny, run = `run` or the folder, `seed`, and
    `run_id` unless None, as in snapshots written before runs had an id). Returns `folder`."""
    from pathlib import Path

    from edm2.io.snapshot import snapshot_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kw = get_preset("tiny").net_kwargs(0) | net_kwargs
    torch.manual_seed(seed)
    net = Precond(**kw)
    dataset = {"resolution": kw["img_resolution"], "channels": kw["img_channels"], "label_dim": 0,
               "class_names": None}
    if origin is None:
        origin = {"preset": "tiny", "run": str(run or folder), "seed": seed}
        if run_id is not None:
            origin["run_id"] = run_id
    for t in times:
        for sigma_rel in sigma_rels:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(step * torch.randn_like(p))
            meta = make_meta(kw, t, sigma_rel, StandardRGBEncoder().to_meta(), dataset, origin)
            save_snapshot(folder / snapshot_name(t, sigma_rel), net, meta, dtype=dtype)
    return folder


# Fake run folders.

def write_run(folder, times=(64, 128), sigma_rels=(0.05, 0.10), config=None, label_dim=0, data=None, net_at=None):
    """A run folder as `edm2 train` leaves it, without training: config.json (`config`, default {}) and one
    EMA snapshot per (nimg in `times`, sigma_rel in `sigma_rels`), named `snapshot_name(nimg, sigma_rel)`.
    The network stored at nimg is `net_at(nimg)` (default: the tiny preset's fresh network, seed 0), so a
    test can change the weights from one time to the next. `data` is recorded as the snapshots' dataset."""
    from pathlib import Path

    from edm2.io.snapshot import snapshot_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {}))
    kwargs = get_preset("tiny").net_kwargs(label_dim)
    if net_at is None:
        torch.manual_seed(0)
        net = Precond(**kwargs)
        net_at = lambda nimg: net  # noqa: E731
    for nimg in times:
        net = net_at(nimg)
        for sigma_rel in sigma_rels:
            meta = make_meta(kwargs, nimg, sigma_rel, StandardRGBEncoder().to_meta(),
                             {"path": None if data is None else str(data)})
            save_snapshot(folder / snapshot_name(nimg, sigma_rel), net, meta)
    return folder


# Image folders.
def write_images(folder, n=6, size=16, channels=1, seed=0, name="{i:03d}.png"):
    """n PNGs of seeded random pixels in `folder` (created if needed), named `name.format(i=i)`:
    grayscale [size, size] for channels=1, else [size, size, channels]. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name.format(i=i))
    return folder
