"""`EDM2Pipeline`: EDM2 networks as a diffusers pipeline (docs/integrations.md).

    pipe = EDM2Pipeline.from_pretrained("folder or user/repo")
    images = pipe(class_labels=[88, 207], num_inference_steps=32, guidance_scale=1.4,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

The pipeline holds the denoiser `net`, an optional guiding network `gnet`
(unconditional for classifier-free guidance, smaller/earlier for autoguidance),
the optional Stable Diffusion VAE `vae` (AutoencoderKL, latent networks), and in
its config the encoder's standardisation, the class names and the sampler
settings. Sampling runs edm2.sampling.sample_batch, so an image depends only on
its generator, and seeds give the same images as `edm2 generate --seeds`.

The three networks are registered components, so diffusers' `pipe.to(device or
dtype)`, `pipe.device`, `pipe.dtype` and `pipe.components` cover them all, and
`__call__` shows diffusers' progress bar (`set_progress_bar_config`) over the
network evaluations.

Folders: model_index.json + net/ (+ gnet/) in the Hugging Face layout of
edm2.io.hub (config.json, model.safetensors) + vae/ (diffusers). Loading reads JSON
and safetensors only; it never imports or runs code named in the files.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import hub_utils
from huggingface_hub import snapshot_download

from ..encoders import StabilityVAEEncoder, StandardRGBEncoder, encoder_from_meta
from ..generate import check_class, check_guide, load_nets, to_pil_image
from ..nn import Precond
from ..nn.factory import network_config
from ..nn.hub import CONFIG_NAME, HubMixin, looks_local
from ..sampling import SAMPLER_DEFAULTS, SOLVER_DEFAULTS, SeedRandom, check_solver_options, sample_batch
from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import atomic_folder, check_replaceable

__all__ = ["EDM2Pipeline", "export_diffusers"]

_NETS = ("net", "gnet")
_SAMPLER_KEYS = tuple(k for k in SAMPLER_DEFAULTS if k != "num_steps") + tuple(SOLVER_DEFAULTS)
_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "net", "gnet", "vae", "encoder", "class_names",
                "sampler", "guidance"}


class EDM2Pipeline(DiffusionPipeline):
    """Class-conditional or unconditional image generation with an EDM2 network.

    net: the denoiser (edm2.nn.Precond or another edm2.nn.hub.HubMixin network).
    gnet: guiding network for guidance_scale != 1 (optional).
    vae: AutoencoderKL decoding the latents of a latent network (None for pixels).
    encoder: the network's data space, as in snapshot metadata ({'type': 'rgb'} or
        the 'sd-vae' standardisation); default: 'rgb' without a VAE, else the
        Stable Diffusion standardisation (edm2.encoders).
    class_names: names of the classes (informational).
    sampler: edm_sampler defaults (sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
        solver, guidance_interval).
    guidance: default guidance_scale.
    """

    model_cpu_offload_seq = "net->gnet->vae"
    # What `callback_on_step_end` may ask for in its callback_kwargs (diffusers' convention).
    _callback_tensor_inputs = ["latents", "denoised"]
    # Components besides the required `net`: diffusers' `.to()`, `.device`, `.dtype`,
    # `components` and offloading treat them as modules of the pipeline.
    _optional_components = ["gnet", "vae"]

    def __init__(self, net, gnet=None, vae=None, encoder: dict | None = None, class_names=None,
                 sampler: dict | None = None, guidance: float = 1.0):
        super().__init__()
        _check_hub_format({"`net`": net, "`gnet`": gnet})
        if encoder is None:
            encoder = StandardRGBEncoder().to_meta() if vae is None else StabilityVAEEncoder().to_meta()
        check_guide(net, gnet, float(guidance))
        sampler = _check_sampler(sampler or {})
        encoder_from_meta(encoder, vae=vae)  # checks the type and that a pixel network has no VAE
        if encoder.get("type") == StabilityVAEEncoder.kind and vae is None:
            raise EDM2Error("a latent network (encoder 'sd-vae') needs its VAE: pass vae=AutoencoderKL(...)")
        self.register_modules(net=net, gnet=gnet, vae=vae)
        self.register_to_config(encoder=dict(encoder), class_names=None if class_names is None else list(class_names),
                                sampler=sampler, guidance=float(guidance))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_snapshot(cls, net, gnet=None, vae=None, guidance: float = 1.0, device="cpu", **sampler):
        """A pipeline from edm2 snapshots (anything `edm2 generate --net/--gnet`
        accepts). vae: an AutoencoderKL, a folder or hub name; default: the one
        named in the snapshot's metadata (latent networks only)."""
        names = (str(net), f"gnet={gnet}")  # the file, and the argument (`edm2 export`'s source and --gnet)
        net, gnet, encoder, meta = load_nets(net, gnet, device=device)
        _check_hub_format(dict(zip(names, (net, gnet))))
        if isinstance(encoder, StabilityVAEEncoder):
            if vae is None or isinstance(vae, (str, os.PathLike)):
                if vae is not None:
                    encoder.vae_name = str(vae)
                vae = encoder.vae(device)
                if os.path.isdir(encoder.vae_name):  # the VAE travels in vae/; record no local path
                    encoder.vae_name = Path(encoder.vae_name).name
        elif vae is not None:
            given = vae if isinstance(vae, (str, os.PathLike)) else type(vae).__name__
            raise EDM2Error(f"vae={given}: {meta.get('origin', {}).get('run', 'the network')} is a pixel-space "
                            f"network, which takes no VAE; drop `vae`")
        return cls(net=net, gnet=gnet, vae=vae, encoder=encoder.to_meta(),
                   class_names=meta.get("dataset", {}).get("class_names"), sampler=sampler, guidance=guidance)

    # ------------------------------------------------------------------ files

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size=None, push_to_hub: bool = False, overwrite: bool = True, **kwargs):
        """Write model_index.json, net/, gnet/ (if any) and vae/ (if any), all
        safetensors + JSON. The folder appears complete or not at all.

        The options of diffusers' DiffusionPipeline.save_pretrained: with
        push_to_hub=True the folder is then uploaded to the Hub repo `repo_id`
        (default: the folder's name; created if needed), with `commit_message`,
        `private`, `create_pr` and `token` as diffusers takes them.
        safe_serialization must stay True (edm2 never writes pickles), variant
        None (one set of weights), and max_shard_size is not used (one file per
        network)."""
        if not safe_serialization:
            raise EDM2Error("safe_serialization=False: edm2 writes safetensors only (never pickles); drop "
                            "`safe_serialization`")
        if variant is not None:
            raise EDM2Error(f"variant={variant!r}: an EDM2Pipeline folder holds one set of weights; drop `variant` "
                            f"(pipe.to(torch.float16) before saving stores float16 weights)")
        push = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id")
                if k in kwargs}
        if kwargs:
            raise EDM2Error(f"EDM2Pipeline.save_pretrained: unknown option(s) {sorted(kwargs)}; allowed: "
                            f"safe_serialization, variant, max_shard_size, push_to_hub, overwrite, commit_message, "
                            f"private, create_pr, token, repo_id")
        if push and not push_to_hub:
            raise EDM2Error(f"{', '.join(sorted(push))}: only with push_to_hub=True")
        card = None
        if push_to_hub:
            # As diffusers does: the repo first (so a bad token writes nothing), then the folder, then the upload.
            repo_id = push.get("repo_id") or Path(save_directory).name
            repo_id = hub_utils.create_repo(repo_id, exist_ok=True, private=push.get("private"),
                                            token=push.get("token")).repo_id
            card = hub_utils.populate_model_card(
                hub_utils.load_or_create_model_card(repo_id, token=push.get("token"), is_pipeline=True),
                tags=["edm2"])

        def write(tmp: Path):
            self.save_config(tmp)
            for name in _NETS:
                module = getattr(self, name)
                if module is not None:
                    module.save_pretrained(tmp / name)
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            if card is not None:
                card.save(tmp / "README.md")

        out = atomic_folder(save_directory, write, overwrite=overwrite, name="save_directory")
        if push_to_hub:
            self._upload_folder(out, repo_id, token=push.get("token"), commit_message=push.get("commit_message"),
                                create_pr=push.get("create_pr", False))
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device="cpu", revision=None, cache_dir=None,
                        local_files_only: bool = False, token=None, torch_dtype=None, use_safetensors=None,
                        device_map=None, force_download: bool = False, **overrides):
        """Load a folder written by save_pretrained / `edm2 export --format diffusers`,
        or a Hub repo id (downloaded through the Hub client's cache). `overrides`
        replace components (net=..., gnet=None, vae=...).

        Options as diffusers' DiffusionPipeline.from_pretrained takes them:
        torch_dtype (or dtype) casts the weights (`pipe.to(torch_dtype)`);
        use_safetensors may be None or True (edm2 reads safetensors only);
        device_map may be None or "cpu" (one device; move with `pipe.to(device)`)."""
        dtype = overrides.pop("dtype", None)
        if dtype is not None and torch_dtype is not None:
            raise EDM2Error("give either `torch_dtype` or `dtype`, not both")
        torch_dtype = dtype if torch_dtype is None else torch_dtype
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise EDM2Error(f"torch_dtype={torch_dtype!r}: must be a floating-point torch.dtype such as "
                            f"torch.float16")
        if use_safetensors is False:
            raise EDM2Error("use_safetensors=False: edm2 pipeline folders hold safetensors only (never pickles); "
                            "drop `use_safetensors`")
        if device_map not in (None, "cpu"):
            raise EDM2Error(f"device_map={device_map!r}: an EDM2Pipeline runs on one device; drop `device_map` and "
                            f"move it with pipe.to(device)")
        src = str(pretrained_model_name_or_path)
        if os.path.isdir(src):
            folder = Path(src)
        elif looks_local(src):
            raise MissingFileError(f"{src}: no such folder (an EDM2Pipeline folder holds model_index.json; "
                                    f"write one with save_pretrained or `edm2 export --format diffusers`)")
        else:
            folder = Path(snapshot_download(src, revision=revision, cache_dir=cache_dir, token=token,
                                            local_files_only=local_files_only, force_download=force_download,
                                            allow_patterns=["*.json", "*.safetensors", "*.md"]))
        index = folder / cls.config_name
        if not index.is_file():
            raise MissingFileError(f"{folder}: not a pipeline folder (no {cls.config_name}); write one with "
                                    f"EDM2Pipeline.save_pretrained or `edm2 export --format diffusers`")
        try:
            config = json.loads(index.read_text())
        except ValueError as e:
            raise EDM2Error(f"{index}: not valid JSON ({e})") from None
        if not isinstance(config, dict) or config.get("_class_name") != cls.__name__:
            written_for = config.get("_class_name") if isinstance(config, dict) else None
            raise EDM2Error(f"{index}: written for {written_for!r}, "
                             f"not {cls.__name__}")
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise EDM2Error(f"{index}: unknown field(s) {unknown}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        unknown = sorted(set(overrides) - {"net", "gnet", "vae"})
        if unknown:
            raise EDM2Error(f"EDM2Pipeline.from_pretrained: unknown option(s) {unknown}")
        parts = {}
        for name in ("net", "gnet", "vae"):
            if name in overrides:
                parts[name] = overrides[name]
                continue
            parts[name] = _load_component(folder, index, name, config.get(name), device)
        if parts["net"] is None:
            raise EDM2Error(f"{index}: no 'net' component")
        pipe = cls(**parts, encoder=config.get("encoder"), class_names=config.get("class_names"),
                   sampler=config.get("sampler"), guidance=config.get("guidance", 1.0))
        return pipe if torch_dtype is None else pipe.to(torch_dtype)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int = 32, guidance_scale: float | None = None,
                 generator=None, seeds=None, num_images: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **sampler_kwargs):
        """Generate images.

        class_labels: a class index per image, one index for all, or None (a random
            class per image, drawn from its generator, for a conditional network).
        num_inference_steps: sampler steps (Heun: 2 network evaluations each but the
            last; euler and dpm++2m: one each; `edm2.sampling.sampler_nfe`).
        guidance_scale: w of D_g + w (D - D_g) with the gnet component; default: the config's.
        generator: a torch.Generator per image (a single one is shared by the batch),
            or seeds: integers, one per image (the noise of `edm2 generate --seeds`).
            With neither, seeds come from torch's global generator.
        num_images: how many images, when class_labels/seeds/generators do not say.
        output_type: 'pil' (list of PIL images), 'np' (float32 [N, H, W, C] in [0, 1]),
            'pt' (float32 [N, C, H, W] in [0, 1]), 'uint8' (uint8 [N, C, H, W]) or
            'latent' (the network's float32 output, not decoded).
        callback_on_step_end: diffusers' per-step hook, called after each step as
            callback(pipe, i, sigma, callback_kwargs) with callback_kwargs the tensors named in
            callback_on_step_end_tensor_inputs ('latents': the current state x_{i+1},
            'denoised': the step's denoised estimate); a returned dict with 'latents'
            replaces the state for the following steps.
        sampler_kwargs: sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, solver
            ('heun', 'euler', 'dpm++2m'), guidance_interval ((sigma_lo, sigma_hi))
            (default: the config's sampler settings).
        Returns ImagePipelineOutput(images=...) or, with return_dict=False, (images,).
        """
        net, gnet = self.net, self.gnet
        guidance = float(self.config.guidance if guidance_scale is None else guidance_scale)
        check_guide(net, gnet, guidance)  # w != 1 needs the 'gnet' component
        if output_type not in ("pil", "np", "pt", "uint8", "latent"):
            raise EDM2Error(f"output_type={output_type!r}; allowed: 'pil', 'np', 'pt', 'uint8', 'latent'")
        options = _check_sampler(dict(self.config.sampler or {}))
        if guidance == 1 and "guidance_interval" not in sampler_kwargs:
            options.pop("guidance_interval", None)  # the config's interval limits its guidance only
        options.update(_check_sampler(sampler_kwargs))
        options.update(check_solver_options(options.get("solver", "heun"), options.get("guidance_interval"),
                                            options.get("S_churn", 0.0), guidance))
        names = list(callback_on_step_end_tensor_inputs or ())
        unknown = sorted(set(names) - set(self._callback_tensor_inputs))
        if unknown:
            raise EDM2Error(f"callback_on_step_end_tensor_inputs: unknown {unknown}; allowed: "
                            f"{self._callback_tensor_inputs}")
        device = net.device
        n = _count(class_labels, generator, seeds, num_images)
        if seeds is not None:
            if generator is not None:
                raise EDM2Error("give either `generator` or `seeds`, not both")
            rnd = SeedRandom(seeds, device)
        elif generator is None:
            rnd = SeedRandom(torch.randint(0, 1 << 31, [n]).tolist(), device)
        elif isinstance(generator, torch.Generator):
            rnd = SeedRandom.from_generators([generator] * n)
        else:
            rnd = SeedRandom.from_generators(generator)
        if len(rnd) != n:
            raise EDM2Error(f"{len(rnd)} generators/seeds for {n} images; give one per image")
        classes = _classes(net, class_labels, n)
        vae = self.vae.to(device) if self.vae is not None else None
        encoder = None if output_type == "latent" else encoder_from_meta(self.config.encoder, vae=vae)
        for m in (net, gnet):
            if m is not None:
                m.eval().requires_grad_(False)
        steps = int(num_inference_steps)
        with self.progress_bar(total=steps) as bar:  # one tick per sampler step

            def on_step(info):  # the sampler's per-step callback (k-diffusion's convention)
                if callback_on_step_end is not None:
                    given = {"latents": info["x"], "denoised": info["denoised"]}
                    out = callback_on_step_end(self, info["i"], float(info["sigma"]), {k: given[k] for k in names})
                    if isinstance(out, dict) and out.get("latents") is not None and out["latents"] is not info["x"]:
                        info["x"].copy_(out["latents"])
                bar.update(1)

            images, _, _ = sample_batch(net, encoder, rnd, classes, gnet, guidance, num_steps=steps,
                                        callback=on_step, **options)
        if output_type in ("latent", "uint8"):
            out = images
        elif output_type == "pt":
            out = images.to(torch.float32) / 255
        elif output_type == "np":
            out = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32) / 255
        else:
            out = [to_pil_image(image) for image in images.cpu()]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def _check_hub_format(networks: dict) -> None:
    """Refuse a network without the Hugging Face format (configs A-F): the
    pipeline folder stores its networks in that format. `networks`: {how the
    message names it: network or None}."""
    for where, module in networks.items():
        if module is not None and not isinstance(module, HubMixin):
            raise EDM2Error(f"{where}: a config {network_config(module)} network ({type(module).__name__}) has no "
                            f"Hugging Face format; the pipeline takes config G networks (edm2.nn.Precond); sample "
                            f"others with `edm2 generate`")


def _count(class_labels, generator, seeds, num_images) -> int:
    sizes = {}
    if class_labels is not None and not isinstance(class_labels, (int, np.integer)):
        sizes["class_labels"] = len(class_labels)
    if seeds is not None:
        sizes["seeds"] = len(seeds)
    if generator is not None and not isinstance(generator, torch.Generator):
        sizes["generator"] = len(generator)
    if num_images is not None:
        sizes["num_images"] = int(num_images)
    if len(set(sizes.values())) > 1:
        raise EDM2Error(f"inconsistent numbers of images: {sizes}")
    n = next(iter(sizes.values()), 1)
    if n < 1:
        raise EDM2Error("no images requested")
    return n


def _classes(net, class_labels, n):
    if class_labels is None:
        return None
    if net.label_dim == 0:
        raise EDM2Error("`class_labels`: the network is unconditional (label_dim 0); drop `class_labels`")
    labels = [class_labels] * n if isinstance(class_labels, (int, np.integer)) else list(class_labels)
    for c in labels:
        check_class(net, int(c) if isinstance(c, (int, np.integer)) else c)
    return torch.tensor([int(c) for c in labels], dtype=torch.int64)


def _check_sampler(options: dict) -> dict:
    """Sampler options as stored in the config: numbers as floats, the solver's
    name, and the guidance interval as [lo, hi] (JSON has no inf: 'inf' as a string)."""
    unknown = sorted(set(options) - set(_SAMPLER_KEYS))
    if unknown:
        raise EDM2Error(f"unknown sampler option(s) {unknown}; allowed: {', '.join(_SAMPLER_KEYS)} "
                         f"(and num_inference_steps)")
    out = {}
    for k, v in options.items():
        if k == "solver":
            out[k] = check_solver_options(solver=v)["solver"]
        elif k == "guidance_interval":
            interval = check_solver_options(guidance_interval=v)["guidance_interval"]
            out[k] = None if interval is None else [interval[0], interval[1] if math.isfinite(interval[1]) else "inf"]
        else:
            out[k] = float(v)
    return out


def _load_component(folder: Path, index: Path, name: str, entry, device):
    """One component named in model_index.json, loaded by our own fixed classes."""
    if entry is None or list(entry) == [None, None]:
        return None
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise EDM2Error(f"{index}: component {name!r} must be [library, class], got {entry!r}")
    library, class_name = entry
    sub = folder / name
    if not sub.is_dir():
        raise MissingFileError(f"{sub}: missing; {index} lists component {name!r}")
    if name in _NETS:
        if not (str(library).split(".")[0] == "edm2" and class_name == Precond.__name__):
            raise EDM2Error(f"{index}: component {name!r} is {entry!r}; this edm2 loads edm2 Precond networks")
        return Precond.from_pretrained(sub, map_location=str(device))
    if class_name != "AutoencoderKL":
        raise EDM2Error(f"{index}: component 'vae' is {entry!r}; expected a diffusers AutoencoderKL")
    if not (sub / CONFIG_NAME).is_file():
        raise MissingFileError(f"{sub}: not a diffusers AutoencoderKL folder (no {CONFIG_NAME})")
    try:
        vae = AutoencoderKL.from_pretrained(sub, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EDM2Error(f"{sub}: cannot load the VAE ({str(e).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False).to(device)


def export_diffusers(net, outdir, gnet=None, vae=None, guidance: float = 1.0, overwrite: bool = False,
                     **sampler) -> Path:
    """`edm2 export --format diffusers`: an EDM2Pipeline folder from edm2 snapshots
    (EDM2Pipeline.from_snapshot, then save_pretrained)."""
    check_replaceable(outdir, {"net": net, "gnet": gnet, "vae": vae})   # never replace an input or a run
    pipe = EDM2Pipeline.from_snapshot(net, gnet=gnet, vae=vae, guidance=guidance, **sampler)
    return pipe.save_pretrained(outdir, overwrite=overwrite)

