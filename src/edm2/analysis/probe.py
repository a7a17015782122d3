"""Linear probe: how much class information a denoiser's features hold.

A denoiser trained without labels still has to recognise what it denoises;
one way to see how well it does is to freeze it and fit a *linear*
classifier on its internal features. For one noise level sigma:

1. every image y of a labelled dataset gets fixed Gaussian noise n (its own
   seeded generator) and goes through the denoiser once, D(y + sigma·n; sigma);
2. a forward hook takes the output of a chosen U-Net block (by default a
   middle decoder block) and averages it over the spatial positions: one
   C-dimensional feature vector per image;
3. a linear classifier (one affine layer on features standardised with the
   training split's mean and std, softmax cross-entropy, a small L2 penalty,
   full-batch L-BFGS from zero, so the result is deterministic) is fitted on
   the training split and its top-1 accuracy is measured on held-out images
   (a separate test dataset, or a seeded fraction of the data).

Only unconditional networks are probed: a class-conditional denoiser is
given the class as input, so its features would report the label it was
handed rather than what it recognised; `linear_probe` refuses such a network.
See docs/dynamics.md ("Linear probe").
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageDataset
from ..encoders import encoder_from_meta
from ..io.loading import load_network
from ..utils.errors import EDM2Error, ExistingFileError
from ..utils.fileio import atomic_write_bytes
from .dynamics import find_blocks

__all__ = ["linear_probe", "probe_sweep", "ProbeResult", "write_probe_csv", "list_layers", "default_layer",
           "extract_features", "fit_linear_classifier"]


def list_layers(net: torch.nn.Module) -> list[str]:
    """Names that `layers` accepts: the blocks of `edm2.analysis.dynamics.find_blocks`,
    'enc.16x16_block0', ..., 'dec.8x8_in0', ... (encoder, then decoder)."""
    return list(find_blocks(net))


def default_layer(net: torch.nn.Module) -> str:
    """The middle decoder block (half-way through the decoder's modules)."""
    dec = [n for n in find_blocks(net) if n.startswith("dec.")]
    if not dec:
        raise EDM2Error(f"{type(net).__name__}: no decoder blocks (modules named dec['<R>x<R>_...']) to probe")
    return dec[len(dec) // 2]


def _resolve_layers(net, layers) -> list[str]:
    allowed = list_layers(net)
    if layers is None:
        return [default_layer(net)]
    if isinstance(layers, str):
        layers = [layers]
    if list(layers) == ["all"]:
        return [n for n in allowed if n.startswith("dec.")]
    out = []
    for name in layers:
        full = name if name in allowed else (f"dec.{name}" if f"dec.{name}" in allowed else None)
        if full is None:
            raise EDM2Error(f"layers={name!r}: no such block; allowed: {', '.join(allowed)} "
                            f"(or 'all' decoder blocks)")
        out.append(full)
    return out


@torch.no_grad()
def extract_features(net, dataset: ImageDataset, encoder, sigma: float, layers, seed: int = 0, batch_size: int = 128,
                     device="cpu", indices=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: [N, C] float32}: spatially averaged outputs of `layers` for the
    dataset items `indices` (default all) noised at `sigma` and denoised once.
    Item i's noise comes from its own generator seeded by (seed, i)."""
    blocks = find_blocks(net)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    feats: dict[str, list] = {name: [] for name in layers}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            current[name] = h.detach().to(torch.float32).flatten(2).mean(2).cpu()
        return hook

    handles = [blocks[name].register_forward_hook(make_hook(name)) for name in layers]
    was_training = net.training
    net.eval()
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc=f"features at sigma {sigma:g}", unit="batch",
                          disable=not progress):
            idx = indices[start:start + batch_size]
            raw = torch.as_tensor(np.stack([dataset[i][0] for i in idx])).to(device)
            gens = [torch.Generator(device).manual_seed(int(seed) * 1_000_003 + i) for i in idx]
            if dataset.is_latent:
                y = torch.cat([encoder.encode_latents(raw[k:k + 1], g) for k, g in enumerate(gens)])
            else:
                y = encoder.encode_latents(raw)
            noise = torch.stack([torch.randn(y.shape[1:], device=device, generator=g) for g in gens])
            current.clear()
            net(y + sigma * noise, torch.full([len(idx)], float(sigma), device=device), None)
            for name in layers:
                feats[name].append(current[name])
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return {name: torch.cat(v) for name, v in feats.items()}


def fit_linear_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4,
                          max_iter: int = 200):
    """Fit softmax(W·(x - mu)/sd + b) by full-batch L-BFGS from zero -> predict(x) function."""
    x = x.to(torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(features: torch.Tensor) -> torch.Tensor:
        return (((features.to(torch.float64) - mu) / sd) @ w + b).argmax(1)
    return predict


@dataclass
class ProbeResult:
    layer: str
    sigma: float
    accuracy: float          # top-1 on the held-out images
    train_accuracy: float
    n_train: int
    n_test: int
    num_classes: int
    channels: int            # feature dimension


CSV_FIELDS = list(ProbeResult.__dataclass_fields__)


def _labels(ds: ImageDataset, where: str) -> np.ndarray:
    if ds.raw_labels is None:
        raise EDM2Error(f"{where}={ds.path}: the linear probe needs class labels (a dataset.json with class "
                        f"indices); convert a labelled source with `edm2 dataset convert`")
    if ds.xflip:
        return np.concatenate([ds.raw_labels, ds.raw_labels])
    return ds.raw_labels


def _open_dataset(data, net, what: str, max_images, seed) -> ImageDataset:
    ds = data if isinstance(data, ImageDataset) else ImageDataset(data, max_size=max_images, random_seed=seed)
    res, channels = getattr(net, "img_resolution", ds.resolution), getattr(net, "img_channels", None)
    have = 4 if ds.is_latent else ds.num_channels
    if ds.resolution != res or (channels is not None and have != channels):
        raise EDM2Error(f"{what}={ds.path}: items are {have}x{ds.resolution}x{ds.resolution} but the network "
                        f"takes {channels}x{res}x{res}; probe with a dataset like the training data")
    return ds


def _whole(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EDM2Error(f"{name}={value!r}: must be a whole number >= {low}")


def check_probe_options(sigmas, batch_size: int = 128, max_images=None, seed: int = 0, holdout: float = 0.2) -> None:
    """Refuse unusable probe settings before any work: noise levels finite and > 0,
    batch_size >= 1, max_images None or >= 1, seed >= 0, holdout in (0, 1) (None: not used)."""
    values = [sigmas] if isinstance(sigmas, (int, float)) else list(sigmas)
    if not values or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0
                         for s in values):
        raise EDM2Error(f"sigmas={values}: give one or more finite noise levels > 0")
    _whole("batch_size", batch_size, 1)
    _whole("max_images", max_images, 1, allow_none=True)
    _whole("seed", seed, 0)
    if holdout is not None and not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise EDM2Error(f"holdout={holdout}: must be between 0 and 1")


def probe_sweep(net, data, sigmas, layers=None, test_data=None, holdout: float = 0.2, max_images: int | None = None,
                seed: int = 0, batch_size: int = 128, device="cpu", meta: dict | None = None,
                progress: bool = False) -> list[ProbeResult]:
    """Linear-probe accuracy for every (sigma, layer). `net`: a network or
    anything `load_network` accepts; `data` / `test_data`: dataset paths (or
    ImageDatasets). Without `test_data`, a seeded `holdout` fraction of `data`
    is held out. `max_images` caps each dataset (a seeded random subset).
    One pass over the data per sigma gives every layer's features."""
    check_probe_options(sigmas, batch_size=batch_size, max_images=max_images, seed=seed,
                        holdout=holdout if test_data is None else None)
    if not isinstance(net, torch.nn.Module):
        net, meta = load_network(net, device=device)
    net = net.to(device)
    if getattr(net, "label_dim", 0):
        raise EDM2Error(f"`net`: the network is class-conditional (label_dim {net.label_dim}); the linear probe is "
                        f"for unconditional networks (train one with `edm2 train --uncond`)")
    encoder = encoder_from_meta((meta or {}).get("encoder", {"type": "rgb"}))
    layers = _resolve_layers(net, layers)
    sigmas = [float(s) for s in sigmas]
    train_ds = _open_dataset(data, net, "data", max_images, seed)
    labels = torch.as_tensor(_labels(train_ds, "data"))
    if test_data is not None:
        test_ds = _open_dataset(test_data, net, "test_data", max_images, seed)
        test_labels = torch.as_tensor(_labels(test_ds, "test_data"))
        splits = [(train_ds, list(range(len(train_ds)))), (test_ds, list(range(len(test_ds))))]
        y_train, y_test = labels, test_labels
    else:
        if not 0 < holdout < 1:
            raise EDM2Error(f"holdout={holdout}: must be between 0 and 1")
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(perm) * holdout)))
        if n_test >= len(perm):
            raise EDM2Error(f"data={train_ds.path}: {len(perm)} images are too few to hold out {holdout:.0%}")
        test_idx, train_idx = sorted(perm[:n_test]), sorted(perm[n_test:])
        splits = [(train_ds, train_idx), (train_ds, test_idx)]
        y_train, y_test = labels[train_idx], labels[test_idx]
    num_classes = int(max(int(y_train.max()), int(y_test.max())) + 1)

    results = []
    for sigma in sigmas:
        f_train, f_test = (extract_features(net, ds, encoder, sigma, layers, seed=seed + k, batch_size=batch_size,
                                            device=device, indices=idx, progress=progress)
                           for k, (ds, idx) in enumerate(splits))
        for layer in layers:
            predict = fit_linear_classifier(f_train[layer], y_train, num_classes)
            results.append(ProbeResult(
                layer=layer, sigma=sigma,
                accuracy=float((predict(f_test[layer]) == y_test).double().mean()),
                train_accuracy=float((predict(f_train[layer]) == y_train).double().mean()),
                n_train=len(y_train), n_test=len(y_test), num_classes=num_classes,
                channels=int(f_train[layer].shape[1])))
    return results


def linear_probe(net, data, sigma: float, layer: str | None = None, **kwargs) -> ProbeResult:
    """The accuracy of one (sigma, layer); see `probe_sweep` for the arguments."""
    return probe_sweep(net, data, [sigma], None if layer is None else [layer], **kwargs)[0]


def write_probe_csv(results, path, overwrite: bool = False) -> None:
    """One row per result, columns CSV_FIELDS; written atomically. An existing
    file is refused unless `overwrite`."""
    if Path(path).exists() and not overwrite:
        raise ExistingFileError(f"csv={path}: already exists; choose another file or pass overwrite=True")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(asdict(r))
    atomic_write_bytes(Path(path), buf.getvalue().encode())
