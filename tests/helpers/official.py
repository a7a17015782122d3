"""Test-only writer of pickles in the authors' published EDM2 format.

What the authors' training/reconstruction code writes (see src/edm2/io/official.py
and docs/published-models.md): `pickle.dump` of a `dnnlib.util.EasyDict` with keys
`encoder`, `dataset_kwargs`, `loss_fn`, `ema`, where every object of their
"persistent" classes is written as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {'type': 'class', 'version': 6, 'module_src': <source text>,
'class_name': ..., 'state': <the object's __dict__>}`; torch modules keep their
`_parameters`/`_buffers`/`_modules` ordered dicts plus `_init_args` and
`_init_kwargs`; `enc`/`dec` are plain `torch.nn.ModuleDict`s; tensors use
torch's ordinary pickling (`_rebuild_parameter`, `_rebuild_tensor_v2`,
`torch.storage._load_from_bytes`); the network was cast to fp16 before saving.

To emit the authors' global names without their packages, stand-in modules
`dnnlib.util` and `torch_utils.persistence` are registered in sys.modules
only while pickling (`_fake_modules`), and removed afterwards.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import pickle
import sys
import types

import numpy as np
import torch

from edm2.nn import Block, MPConv, MPFourier, Precond, UNet

# Source text stored in every record. If anything ever executed it, it would
# create the file named by MARKER_PATH (tests check that it never appears).
MARKER_PATH = "/tmp/edm2-official-module-src-was-executed"
MODULE_SRC = f"import pathlib\npathlib.Path({MARKER_PATH!r}).write_text('module_src was executed')\n"

TINY_KWARGS = dict(img_resolution=8, img_channels=4, label_dim=3, model_channels=8, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.0, use_fp16=True)


def _reconstruct_persistent_obj(meta):  # only its name is written; never called
    raise AssertionError("the stand-in persistence hook must never run")


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


@contextlib.contextmanager
def _fake_modules():
    """Make `dnnlib.util.EasyDict` and `torch_utils.persistence._reconstruct_persistent_obj`
    importable by name while pickling, as in the authors' environment."""
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    torch_utils, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    util.EasyDict, dnnlib.util = EasyDict, util
    persistence._reconstruct_persistent_obj, torch_utils.persistence = _reconstruct_persistent_obj, persistence
    EasyDict.__module__, _reconstruct_persistent_obj.__module__ = "dnnlib.util", "torch_utils.persistence"
    mods = {"dnnlib": dnnlib, "dnnlib.util": util, "torch_utils": torch_utils, "torch_utils.persistence": persistence}
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """An object of one of the authors' persistent classes: pickles as
    `_reconstruct_persistent_obj(meta)`, exactly like their wrapper's __reduce__."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


# Attributes of our modules that the authors' classes do not have.
_OURS_ONLY = {"in_channels", "reduced_dtype", "label_dim"}


def _init_args(module, name_in_parent):
    """(_init_args, _init_kwargs) as the authors' constructors were called."""
    if isinstance(module, MPConv):
        w = module.weight
        return (w.shape[1], w.shape[0]), {"kernel": list(w.shape[2:])}
    if isinstance(module, MPFourier):
        return (module.freqs.shape[0],), {}
    if isinstance(module, Block):
        kw = dict(flavor=module.flavor)
        if module.resample_mode != "keep":
            kw["resample_mode"] = module.resample_mode
        else:
            kw["attention"] = bool(module.num_heads)
        kw.update(channels_per_head=TINY_KWARGS["channels_per_head"], dropout=module.dropout)
        return (module.in_channels, module.out_channels, module.emb_linear.weight.shape[1]), kw
    return (), {}


def _record(module, init_args=(), init_kwargs=None):
    """The authors' pickled form of one of our modules (recursively)."""
    state = {k: v for k, v in module.__dict__.items() if k not in _OURS_ONLY}
    children = collections.OrderedDict()
    for name, child in module._modules.items():
        if isinstance(child, torch.nn.ModuleDict):  # not persistent: torch's own class, pickled as is
            holder = torch.nn.ModuleDict()
            holder.eval()
            holder.__dict__["_modules"] = collections.OrderedDict(
                (n, _record(m, *_init_args(m, n))) for n, m in child._modules.items())
            children[name] = holder
        elif child is not None:
            children[name] = _record(child, *_init_args(child, name))
    state["_modules"] = children
    state["_init_args"] = tuple(init_args)
    state["_init_kwargs"] = dict(init_kwargs or {})
    names = {Precond: "Precond", UNet: "UNet", Block: "Block", MPConv: "MPConv", MPFourier: "MPFourier"}
    class_name = names[type(module)]
    return Persistent(class_name, state)


def make_tiny_net(seed=0, **overrides) -> Precond:
    """A tiny Precond with non-trivial gains (so that every parameter matters)."""
    kwargs = dict(TINY_KWARGS, **overrides)
    torch.manual_seed(seed)
    net = Precond(**kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:  # emb_gain, out_gain start at 0
                p.fill_(0.3 + 0.1 * (hash(name) % 5))
    return net.eval()


def vae_encoder_record(raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28)):
    scale = np.float32(0.5) / np.float32(list(raw_std))
    bias = np.float32(0) - np.float32(list(raw_mean)) * scale
    return Persistent("StabilityVAEEncoder", dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=bias,
                                                  batch_size=8, _vae=None, _init_args=(), _init_kwargs={}))


def rgb_encoder_record():
    return Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))


def published_bytes(net: Precond, encoder="vae", extra=None, init_kwargs=None) -> bytes:
    """The pickle the authors would have written for `net` (a snapshot: fp16 copy)."""
    ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    stored = {k: getattr(net, k) for k in ("img_resolution", "img_channels", "label_dim")}
    stored.update({k: v for k, v in TINY_KWARGS.items() if k not in stored}, **(init_kwargs or {}))
    data = EasyDict(
        encoder=vae_encoder_record() if encoder == "vae" else rgb_encoder_record(),
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                                use_labels=True),
        loss_fn=Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(),
                                            _init_kwargs=dict(P_mean=-0.4, P_std=1.0))),
    )
    data.ema = _record(ema, (), stored)
    if extra:
        data.update(extra)
    with _fake_modules():
        return pickle.dumps(data, protocol=4)


def write_published(path, net, **kwargs):
    with open(path, "wb") as f:
        f.write(published_bytes(net, **kwargs))
    return path


def reference_stats_bytes(dims=(5, 7), seed=0) -> bytes:
    """dataset-refs/*.pkl: {'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}} of numpy arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, d in zip(("fid", "fd_dinov2"), dims):
        a = rng.standard_normal((d, d))
        out[name] = {"mu": rng.standard_normal(d), "sigma": a @ a.T}
    return pickle.dumps(out, protocol=4)
