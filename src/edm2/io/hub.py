"""Hugging Face model folders from edm2 snapshots (docs/integrations.md).

`export_hf` (`edm2 export --format hf`) writes the network of a snapshot as a
Hugging Face model folder, loadable with `Precond.from_pretrained`. The
save/load conventions themselves (`HubMixin`: config.json + model.safetensors,
strict loading) are part of the network classes, in `edm2.nn.hub`, re-exported
here. The diffusers pipeline export is `edm2.io.diffusers.export_diffusers`
(it needs diffusers).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..nn.hub import CONFIG_NAME, WEIGHTS_NAME, HubMixin, looks_local  # noqa: F401 (importable here too)
from ..utils.errors import EDM2Error
from ..utils.fileio import atomic_folder, check_replaceable
from .loading import load_network

__all__ = ["export_hf", "EDM2_JSON"]

EDM2_JSON = "edm2.json"


def portable(value):
    """Metadata to publish: every absolute local path (a run folder, an imported
    file, a VAE folder) replaced by its last component, so that an exported
    folder names no directory of the machine it was written on. URLs and other
    values are kept."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and "://" not in value and (os.path.isabs(value) or value.startswith("~")):
        return Path(value).name
    return value


def export_hf(source, outdir, overwrite: bool = False) -> Path:
    """Write the network of an edm2 snapshot (file, run folder, or anything
    `edm2.io.loading.load_network` accepts) as a Hugging Face model folder:
    config.json + model.safetensors (via save_pretrained, loadable with
    `<class>.from_pretrained(outdir)`), README.md (model card) and edm2.json
    (the snapshot's metadata: encoder, dataset, nimg, sigma_rel as "ema_std", origin;
    local paths as names only, see `portable`).
    Nothing is written unless everything succeeds."""
    check_replaceable(outdir, {"source": source})   # never replace the input or a run, even with overwrite
    net, meta = load_network(source)
    if not isinstance(net, HubMixin):
        raise EDM2Error(f"source={source}: its network class {type(net).__name__} has no Hugging Face support "
                        f"(edm2.nn.hub.HubMixin); export is available for Precond")
    info = portable({k: meta.get(k) for k in ("net_kwargs", "nimg", "ema_std", "encoder", "dataset", "origin")})
    info["class_name"] = type(net).__name__

    def write(tmp: Path):
        net.save_pretrained(tmp, model_card_kwargs={})
        (tmp / EDM2_JSON).write_text(json.dumps(info, indent=2) + "\n")

    return atomic_folder(outdir, write, overwrite=overwrite)
