"""Hugging Face Hub conventions for edm2 networks (docs/integrations.md).

`HubMixin` is huggingface_hub's `PyTorchModelHubMixin` with stricter loading:
`Precond.save_pretrained(dir)` writes `config.json` (the constructor's
arguments) and `model.safetensors`; `Precond.from_pretrained(dir_or_repo_id)`
reads them back (a Hub repo id goes through the Hub client's cache). Loading
checks the config's fields, requires every weight (strict), never falls back to
pickled weights, and reports problems in one line naming the file.

This is glue to huggingface_hub and safetensors only: it knows nothing of edm2
snapshots. `edm2.io.hub.export_hf` (`edm2 export --format hf`) writes such
folders from snapshots.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save

from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import atomic_write_bytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PAPER = "https://arxiv.org/abs/2312.02696"


class HubMixin(PyTorchModelHubMixin, library_name="edm2", paper_url=_PAPER, tags=["edm2", "diffusion"]):
    """save_pretrained / from_pretrained / push_to_hub for an edm2 network class.

    A class whose constructor forwards **kwargs to inner modules lists those
    modules' classes in `_hub_config_classes`, so that their constructor
    arguments count as known config fields."""

    _hub_config_classes: tuple = ()

    @classmethod
    def config_fields(cls) -> set:
        """The names a config.json may hold: constructor arguments of the class and
        of the classes its **kwargs go to."""
        names = set()
        for c in (cls, *cls._hub_config_classes):
            for p in list(inspect.signature(c.__init__).parameters.values())[1:]:
                if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                    names.add(p.name)
        return names

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(Path(save_directory) / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a folder written by save_pretrained / `edm2 export --format hf`,
        or from a Hub repo id ("user/name", through the Hub client's cache).
        Keyword arguments: those of PyTorchModelHubMixin.from_pretrained
        (revision, cache_dir, local_files_only, token, ...), map_location."""
        src = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(src, CONFIG_NAME)):
            read_config(os.path.join(src, CONFIG_NAME))  # one line naming the file if it is not a JSON object
        elif not looks_local(src):  # a Hub repo id: its config.json, into the cache the loading below reads
            try:
                path = hf_hub_download(repo_id=src, filename=CONFIG_NAME, revision=kwargs.get("revision"),
                                       cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                                       force_download=kwargs.get("force_download", False),
                                       local_files_only=kwargs.get("local_files_only", False))
            except (OSError, ValueError):  # no such repo or file, offline: reported by the loading below
                path = None
            if path is not None:
                read_config(path, shown=f"{src}/{CONFIG_NAME}")
        if not os.path.isdir(src) and looks_local(src):
            raise MissingFileError(f"{src}: no such folder (a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; "
                                    f"write one with save_pretrained or `edm2 export --format hf`)")
        if os.path.isdir(src) and not os.path.isfile(os.path.join(src, CONFIG_NAME)):
            raise MissingFileError(f"{src}: not a model folder (no {CONFIG_NAME}); write one with save_pretrained "
                                    f"or `edm2 export --format hf`")
        return super().from_pretrained(src, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         config=None, map_location="cpu", **model_kwargs):
        if config is not None and not isinstance(config, dict):
            raise EDM2Error(f"{model_id}/{CONFIG_NAME}: holds a JSON {type(config).__name__}, not an object of "
                             f"constructor arguments; write the folder again with save_pretrained")
        if not isinstance(config, dict):
            raise MissingFileError(f"{model_id}: no readable {CONFIG_NAME}; not a model folder or repository")
        unknown = sorted(set(config) - cls.config_fields())
        if unknown:
            raise EDM2Error(f"{model_id}/{CONFIG_NAME}: unknown field(s) {unknown} for {cls.__name__}; the file was "
                             f"written for another model class or edited; known fields: "
                             f"{', '.join(sorted(cls.config_fields()))}")
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise MissingFileError(f"{weights}: missing; the folder has a config but no weights "
                                        f"(save_pretrained writes both)")
        else:
            weights = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, token=token, local_files_only=local_files_only)
        kwargs = {k: v for k, v in model_kwargs.items() if k != "strict"}
        try:
            with torch.device("meta"):
                model = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise EDM2Error(f"{model_id}/{CONFIG_NAME}: cannot build {cls.__name__} from it ({e})") from None
        _load_weights(model, weights, map_location)
        return model.eval()


def looks_local(src: str) -> bool:
    """Does `src` name a local path rather than a Hub repo id ("user/name")?
    (Used by every `from_pretrained` of edm2: a missing folder is reported as such,
    not looked up on the Hub.)"""
    return (os.path.exists(src) or src.startswith((".", "/", "~")) or src.count("/") != 1
            or os.sep in src.replace("/", ""))


def read_config(path, shown=None) -> dict:
    """A config.json as a dict; `EDM2Error` naming the file (as `shown`, default
    its path) if it is not valid JSON or not an object."""
    shown = path if shown is None else shown
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise EDM2Error(f"{shown}: not valid JSON ({e}); write the folder again with save_pretrained") from None
    if not isinstance(config, dict):
        raise EDM2Error(f"{shown}: holds a JSON {type(config).__name__}, not an object of constructor arguments; "
                         f"write the folder again with save_pretrained")
    return config


def state_mismatch(model: torch.nn.Module, state: dict, show: int = 3) -> str | None:
    """How a state dict differs from a model's in one line: the first `show`
    missing and unexpected keys and shape mismatches, with their counts; None if
    every key and shape matches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > show else ""
            parts.append(f"{what}: {', '.join(items[:show])}{more}")
    return "; ".join(parts) or None


def _load_weights(model: torch.nn.Module, path, device="cpu") -> None:
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors' own error types for truncated or foreign files
        raise EDM2Error(f"{path}: unreadable or truncated safetensors file ({type(e).__name__}: {e})") from None
    problem = state_mismatch(model, state)
    if problem:
        raise EDM2Error(f"{path}: weights do not match {CONFIG_NAME} ({problem})")
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
