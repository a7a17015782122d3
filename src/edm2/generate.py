"""Image generation: batches of images from seeds (a Python iterator), and
PNG folders named by seed, resumable and split over torchrun processes.

- `generate_images(net, encoder, seeds, ...)` yields `GeneratedBatch`es
  (uint8 images, seeds, labels); it writes nothing, so metrics can feed a
  detector from it directly.
- `generate_to_dir(...)` writes `{seed:06d}.png` (optionally in folders of
  1000), skips images that exist, and can write a grid PNG.
- `load_nets(net, gnet)` loads and checks the networks and the decoder.

An output folder records what made its images in `generate.json` (the
networks' weight fingerprints, sampler settings, guidance, class) and is
locked (`edm2.utils.fileio.RunLock`) while images are written; a later call with
another network or other settings is refused instead of mixing images.

Every image depends only on its seed (docs/design.md#per-seed-randomness): noise, random class and
churn noise come from the seed's own generator (`edm2.sampling.SeedRandom`). With
`seeds_per_class=K` the class is a function of the seed too (`seed_classes`: seeds 0..K-1
class 0, K..2K-1 class 1, ...), and the grid puts each block of K seeds on its own row, so
`--seeds 0-99 --seeds-per-class 10` draws a 10x10 grid whose row r holds class r.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .encoders import encoder_from_meta
from .io.loading import load_network
from .sampling import SAMPLER_DEFAULTS, SOLVER_DEFAULTS, SeedRandom, check_guidance, check_solver_options, sample_batch
from .utils.distributed import rank_world, resolve_device
from .utils.errors import EDM2Error
from .utils.fileio import RunLock, atomic_write_bytes, png_bytes
from .utils.validate import check_sampler_options

__all__ = ["load_nets", "generate_images", "generate_to_dir", "GeneratedBatch", "compile_for_inference"]

@dataclass
class GeneratedBatch:
    """One batch of results of `generate_images`.

    images: uint8 [N, C, H, W] on the CPU (or float32 network-space samples
            when no encoder was given).
    seeds:  the N seeds, in order.
    labels: one-hot float32 [N, label_dim] on the CPU, or None (unconditional net).
    classes: int64 [N] class indices, or None.
    """
    images: torch.Tensor
    seeds: list
    labels: torch.Tensor | None
    classes: torch.Tensor | None

    def __len__(self):
        return len(self.seeds)


# ---------------------------------------------------------------------------
# Checks, done before anything is generated or written.
# ---------------------------------------------------------------------------

def _shape(net):
    return net.img_resolution, net.img_channels, net.label_dim


def check_guide(net, gnet=None, guidance: float = 1) -> None:
    """Raise `EDM2Error` unless (gnet, guidance) is usable with net (docs/design.md#guidance):
    `edm2.sampling.check_guidance`, then `check_gnet_matches` when there is a gnet."""
    check_guidance(guidance, gnet)
    if gnet is not None:
        check_gnet_matches(net, gnet)


def check_gnet_matches(net, gnet) -> None:
    """Raise `EDM2Error` unless gnet works on the net's data: same resolution and
    channels, and the same label dimension or 0 (an unconditional guide, as
    EDM2's classifier-free guidance uses; it ignores the labels)."""
    names = ("resolution", "channels", "label_dim")
    for name, a, b in zip(names, _shape(net), _shape(gnet)):
        if a != b and not (name == "label_dim" and b == 0):
            raise EDM2Error(f"`gnet`: its {name} is {b} but the net's is {a}; the guiding network must work "
                            f"on the same data (resolution, channels) and labels (the net's label_dim, or 0 "
                            f"for an unconditional guide) as `net`")


def check_class(net, class_idx, seeds_per_class: int | None = None) -> None:
    """Raise `EDM2Error` if class_idx (None = random) or seeds_per_class (None = off)
    cannot be used with net."""
    if seeds_per_class is not None:
        if class_idx is not None:
            raise EDM2Error(f"class_idx={class_idx} and seeds_per_class={seeds_per_class}: give one of them "
                            f"(one class for every image, or classes by blocks of seeds)")
        if not isinstance(seeds_per_class, (int, np.integer)) or isinstance(seeds_per_class, bool) \
                or seeds_per_class < 1:
            raise EDM2Error(f"seeds_per_class={seeds_per_class}: must be an integer >= 1")
        if net.label_dim == 0:
            raise EDM2Error(f"seeds_per_class={seeds_per_class}: the network is unconditional (label_dim 0); "
                            f"drop `seeds_per_class`")
        return
    if class_idx is None:
        return
    if net.label_dim == 0:
        raise EDM2Error(f"class_idx={class_idx}: the network is unconditional (label_dim 0); drop `class_idx`")
    if not isinstance(class_idx, (int, np.integer)) or not 0 <= class_idx < net.label_dim:
        raise EDM2Error(f"class_idx={class_idx}: out of range; the network has classes 0-{net.label_dim - 1} "
                        f"(or none for a random class per image)")


# ---------------------------------------------------------------------------
# Distribution over processes (torchrun).
# ---------------------------------------------------------------------------

def seed_classes(seeds, seeds_per_class: int, label_dim: int) -> torch.Tensor:
    """The class of each seed when classes go by blocks of seeds: seed s gets class
    (s // seeds_per_class) % label_dim (int64 [N]). A function of the seed alone, so an
    image still depends only on its seed and the recorded option."""
    return torch.tensor([(int(s) // seeds_per_class) % label_dim for s in seeds], dtype=torch.int64)


def check_request(net, gnet, guidance: float, class_idx, sampler_kwargs: dict,
                  seeds_per_class: int | None = None) -> dict:
    """Check guidance, class and sampler options of a generation request
    (`EDM2Error`); returns every numeric sampler option, defaults filled in, plus
    `solver` and `guidance_interval` where they differ from the defaults (Heun, every
    step guided), so folders made before these options existed keep their generate.json.
    An interval without guidance (guidance == 1) is refused: it would change nothing."""
    check_guide(net, gnet, guidance)
    check_class(net, class_idx, seeds_per_class)
    unknown = set(sampler_kwargs) - set(SAMPLER_DEFAULTS) - set(SOLVER_DEFAULTS)
    if unknown:
        raise EDM2Error(f"unknown sampler options {sorted(unknown)}; allowed: "
                        f"{', '.join([*SAMPLER_DEFAULTS, *SOLVER_DEFAULTS])}")
    numeric = check_sampler_options({**SAMPLER_DEFAULTS, **{k: v for k, v in sampler_kwargs.items()
                                                             if k in SAMPLER_DEFAULTS}})
    extra = check_solver_options(sampler_kwargs.get("solver", "heun"), sampler_kwargs.get("guidance_interval"),
                                 numeric["S_churn"], guidance)
    return {**numeric, **{k: v for k, v in extra.items() if v != SOLVER_DEFAULTS[k]}}


def rank_batches(seeds, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's batches of seeds.

    The seeds are cut, in order, into ceil(n / (batch_size * world_size)) *
    world_size batches of nearly equal size and dealt round-robin, so every
    process gets the same number of batches (some may be empty only when there
    are fewer seeds than processes), no seed twice and none left out.
    """
    if batch_size < 1:
        raise EDM2Error(f"batch_size={batch_size}: must be >= 1")
    seeds = list(seeds)
    num = max(math.ceil(len(seeds) / (batch_size * world_size)), 1) * world_size
    bounds = np.linspace(0, len(seeds), num + 1).round().astype(int)
    batches = [seeds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return batches[rank::world_size]


# ---------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------

def compile_for_inference(net):
    """torch.compile a network for sampling. Inductor's freezing treats the
    weights as constants, so the weight normalisation (Eq. 47) is folded in
    once at compile time instead of being recomputed at every evaluation
    (eager mode normalises the weights at every call). Sets
    torch._inductor.config.freezing for the process; the first call compiles."""
    torch._inductor.config.freezing = True
    net.eval().requires_grad_(False)
    return torch.compile(net)


def load_nets(net, gnet=None, device=None):
    """Load `net` (and `gnet`) from anything `edm2.io.loading.load_network`
    accepts -> (net, gnet or None, encoder, meta of net). Networks are in eval
    mode; raises `EDM2Error` if gnet does not match net."""
    device = resolve_device(device)
    net, meta = load_network(net, device=device)
    if gnet is not None:
        gnet, gmeta = load_network(gnet, device=device)
        check_gnet_matches(net, gnet)
        kinds = meta["encoder"].get("type"), gmeta["encoder"].get("type")
        if kinds[0] != kinds[1]:
            raise EDM2Error(f"`gnet`: works in space {kinds[1]!r} but the net in {kinds[0]!r}; "
                            f"pass a guiding network trained on the same data")
    encoder = encoder_from_meta(meta["encoder"])
    return net, gnet, encoder, meta


def generate_images(net, encoder, seeds, gnet=None, guidance: float = 1, class_idx: int | None = None,
                    batch_size: int = 32, device=None, rank: int | None = None, world_size: int | None = None,
                    progress: bool = False, seeds_per_class: int | None = None,
                    **sampler_kwargs) -> Iterator[GeneratedBatch]:
    """Generate images for `seeds`, yielding one `GeneratedBatch` per batch.

    net, gnet: denoisers with Precond's interface (gnet guides when guidance != 1).
    encoder: decodes samples to uint8 pixels (`encoder.decode`), e.g.
        `encoder_from_meta(meta['encoder'])`; None yields raw float32 samples.
    class_idx: a class for every image, or None (random class per seed for a
        conditional net, drawn from the seed's generator).
    seeds_per_class: instead of class_idx, classes by blocks of seeds
        (`seed_classes`: seed s gets class (s // seeds_per_class) % label_dim).
    rank, world_size: which share of the seeds to make (`rank_batches`);
        default: this process's place in torch.distributed, or 0 of 1.
    sampler_kwargs: edm_sampler's num_steps, sigma_min, sigma_max, rho,
        S_churn, S_min, S_max, S_noise, solver ('heun', 'euler', 'dpm++2m') and
        guidance_interval ((sigma_lo, sigma_hi): guide only the steps with
        sigma_lo < t_i <= sigma_hi; docs/sampling.md).
    Checks run at the call (`EDM2Error`), generation while iterating. The
    networks are put in eval mode without gradients.
    """
    sampler_kwargs = check_request(net, gnet, guidance, class_idx, sampler_kwargs, seeds_per_class)
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    batches = rank_batches(seeds, batch_size, rank, world_size)
    device = resolve_device(device)
    for m in (net, gnet):
        if m is not None:
            m.eval().requires_grad_(False)
    return _generate(net, encoder, batches, gnet, guidance, class_idx, device, progress, sampler_kwargs,
                     seeds_per_class)


def _generate(net, encoder, batches, gnet, guidance, class_idx, device, progress, sampler_kwargs,
              seeds_per_class=None):
    with tqdm(total=sum(map(len, batches)), unit="img", disable=not progress, desc="generate") as bar:
        for seeds in batches:
            if not seeds:
                yield GeneratedBatch(torch.zeros([0], dtype=torch.uint8), [], None, None)
                continue
            classes = class_idx if seeds_per_class is None else seed_classes(seeds, seeds_per_class, net.label_dim)
            images, labels, classes = sample_batch(net, encoder, SeedRandom(seeds, device), classes, gnet, guidance,
                                                   **sampler_kwargs)
            yield GeneratedBatch(images.cpu(), list(seeds), None if labels is None else labels.cpu(),
                                 None if classes is None else classes.cpu())
            bar.update(len(seeds))


# ---------------------------------------------------------------------------
# PNG folders.
# ---------------------------------------------------------------------------

def image_path(outdir, seed: int, subdirs: bool = False) -> Path:
    """outdir/{seed:06d}.png, or outdir/{first seed of its thousand:06d}/{seed:06d}.png with subdirs."""
    name = f"{seed:06d}.png"
    return Path(outdir) / f"{seed - seed % 1000:06d}" / name if subdirs else Path(outdir) / name


def to_pil_image(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] (C = 1 grey, 3 RGB, 4 RGBA) -> PIL image."""
    arr = image.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def make_grid(paths, row_keys=None) -> Image.Image:
    """Tile PNG files into a near-square grid, row by row; with `row_keys` (one
    per path), a new row starts wherever the key changes (e.g. the class block
    of each seed), and the grid is as wide as the longest row."""
    imgs = [Image.open(p) for p in paths]
    if row_keys is None:
        cols = math.ceil(math.sqrt(len(imgs)))
        places = [(i % cols, i // cols) for i in range(len(imgs))]
    else:
        places, row, col = [], -1, 0
        for i, key in enumerate(row_keys):
            row, col = (row + 1, 0) if i == 0 or key != row_keys[i - 1] else (row, col + 1)
            places.append((col, row))
    cols, rows = max(c for c, _ in places) + 1, max(r for _, r in places) + 1
    w, h = imgs[0].size
    grid = Image.new(imgs[0].mode, (cols * w, rows * h))
    for img, (c, r) in zip(imgs, places):
        grid.paste(img, (c * w, r * h))
    return grid


def _check_outputs(net, encoder, outdir, grid) -> None:
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise EDM2Error(f"outdir={out}: exists and is not a folder; choose another `outdir`")
    if grid is not None:
        g = Path(grid)
        if g.suffix.lower() != ".png":
            raise EDM2Error(f"grid={g}: must be a .png file name")
        if g.is_dir():
            raise EDM2Error(f"grid={g}: is a folder; give a file name like {g / 'grid.png'}")
    kind = getattr(encoder, "kind", None)
    if kind == "rgb" and net.img_channels not in (1, 3, 4):
        raise EDM2Error(f"the network makes {net.img_channels}-channel pixels, which PNG cannot hold "
                         f"(1, 3 or 4 channels); its snapshot metadata says encoder 'rgb'")


MANIFEST_NAME = "generate.json"
MANIFEST_FORMAT = "edm2-generate"


def net_fingerprint(net) -> str:
    """A short hash of a network's weights and buffers (names, dtypes, shapes,
    bytes): equal exactly when the networks compute the same function (a
    different precision counts as different, as its images differ)."""
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()[:24]


def output_manifest(net, gnet=None, guidance: float = 1, class_idx=None, encoder=None, sources: dict | None = None,
                    seeds_per_class: int | None = None, **sampler_kwargs) -> dict:
    """What determines the images of a folder (stored as generate.json): the
    networks (weight fingerprints), the guidance weight, the class option
    ("random", a class index, or {"seeds_per_class": K}), the decoder and every
    sampler setting (defaults filled in). `sources` (e.g. {"net": path}) is
    recorded for people and not compared."""
    sampler = {**SAMPLER_DEFAULTS, **sampler_kwargs}
    if sampler.get("guidance_interval") is not None:  # recorded only when given (older folders lack it)
        sampler["guidance_interval"] = [v if math.isfinite(v) else str(v) for v in sampler["guidance_interval"]]
    sampler = {k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v for k, v in sampler.items()}
    return {"format": MANIFEST_FORMAT, "version": 1,
            "net": net_fingerprint(net), "gnet": None if gnet is None else net_fingerprint(gnet),
            "guidance": float(guidance),
            "class": {"seeds_per_class": int(seeds_per_class)} if seeds_per_class is not None
            else "random" if class_idx is None else int(class_idx),
            "encoder": encoder.to_meta() if hasattr(encoder, "to_meta") else getattr(encoder, "kind", None),
            "sampler": sampler, "sources": dict(sources or {})}


def _manifest_diff(old: dict, new: dict) -> list[str]:
    out = []
    for key in ("net", "gnet", "guidance", "class", "encoder"):
        if old.get(key) != new.get(key):
            what = "weights differ" if key in ("net", "gnet") and old.get(key) and new.get(key) else \
                f"{json.dumps(old.get(key))[:40]} -> {json.dumps(new.get(key))[:40]}"
            out.append(f"{key} ({what})")
    old_s, new_s = old.get("sampler") or {}, new.get("sampler") or {}
    # A missing solver / guidance_interval is its default (heun, every step guided).
    old_s, new_s = {**SOLVER_DEFAULTS, **old_s}, {**SOLVER_DEFAULTS, **new_s}
    out += [f"{k}={old_s.get(k)} -> {new_s.get(k)}"
            for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
    return out


def check_output_folder(outdir, manifest: dict) -> bool:
    """Raise `EDM2Error` unless `outdir` may receive images made as `manifest`
    describes: it is new or empty of PNGs, or its generate.json describes the
    same networks and settings (a resumed job). Reads only. Returns whether
    generate.json still has to be written."""
    out = Path(outdir)
    fix = f"use another `outdir`, or remove {out} to start over"
    if not out.exists():
        return True
    path = out / MANIFEST_NAME
    if not path.is_file():
        pngs = sum(1 for _ in out.rglob("*.png"))
        if pngs:
            raise EDM2Error(f"outdir={out}: holds {pngs} PNG file(s) but no {MANIFEST_NAME}, so it is unknown which "
                            f"network and settings made them and new images could mix with them; {fix}")
        return True
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
            raise EDM2Error("not an edm2 generate.json")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EDM2Error(f"{path}: unreadable ({e}); {fix}") from None
    diff = _manifest_diff(old, manifest)
    if diff:
        raise EDM2Error(f"outdir={out}: holds images of another network or settings ({'; '.join(diff[:3])}); "
                        f"new images would mix with them; {fix}")
    return False


def _missing_seeds(seeds, outdir, subdirs, device) -> list[int]:
    """Seeds whose PNG is not there yet. Rank 0 decides and broadcasts the list,
    so every process splits the same list even while others start writing."""
    rank, world = rank_world()
    if world == 1:
        return [s for s in seeds if not image_path(outdir, s, subdirs).exists()]
    todo = torch.tensor([s for s in seeds if not image_path(outdir, s, subdirs).exists()] if rank == 0 else [],
                        dtype=torch.int64)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([len(todo)], dtype=torch.int64, device=comm)
    dist.broadcast(count, src=0)
    buf = todo.to(comm) if rank == 0 else torch.zeros([int(count)], dtype=torch.int64, device=comm)
    dist.broadcast(buf, src=0)
    return buf.cpu().tolist()


def generate_to_dir(net, encoder, seeds, outdir, gnet=None, guidance: float = 1, class_idx: int | None = None,
                    batch_size: int = 32, device=None, subdirs: bool = False, grid=None, grid_count: int = 100,
                    progress: bool = True, sources: dict | None = None, seeds_per_class: int | None = None,
                    **sampler_kwargs) -> dict:
    """Write one PNG per seed to outdir (`image_path`), skipping images that
    already exist, so an interrupted job can simply be re-run. Under torchrun
    (call `edm2.utils.distributed.init_distributed()` first) the missing seeds are split across the
    processes. With `grid`, rank 0 then tiles the first `grid_count` seeds'
    images into that PNG (with `seeds_per_class`, one row per block of seeds,
    i.e. per class: `seed_classes`). Every file is written atomically (temp + rename).
    The folder is locked while images are written (`RunLock`) and records
    the networks and settings in generate.json; a folder made with others is
    refused (`check_output_folder`). `sources` ({"net": path, ...}) is noted there.
    Returns {'generated': n made by this process, 'skipped': n already there}.
    """
    seeds = [int(s) for s in seeds]
    if encoder is None:
        raise EDM2Error("`encoder`: generate_to_dir needs one to turn samples into pixels "
                        "(encoder_from_meta(meta['encoder']))")
    if not seeds:
        raise EDM2Error("`seeds`: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise EDM2Error("`seeds`: a seed is listed twice; each seed names one image file")
    _check_outputs(net, encoder, outdir, grid)
    sampler_kwargs = check_request(net, gnet, guidance, class_idx, sampler_kwargs, seeds_per_class)
    manifest = output_manifest(net, gnet if guidance != 1 else None, guidance, class_idx, encoder, sources,
                               seeds_per_class=seeds_per_class, **sampler_kwargs)
    device = resolve_device(device)
    rank, world = rank_world()
    with RunLock(outdir, "`outdir`") if rank == 0 else nullcontext():
        fresh = check_output_folder(outdir, manifest)  # every process reads, before anything is written
        if world > 1:
            dist.barrier()
        if fresh and rank == 0:
            atomic_write_bytes(Path(outdir) / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        todo = _missing_seeds(seeds, outdir, subdirs, device)
        made = 0
        try:
            for batch in generate_images(net, encoder, todo, gnet=gnet, guidance=guidance, class_idx=class_idx,
                                         batch_size=batch_size, device=device, progress=progress and rank == 0,
                                         seeds_per_class=seeds_per_class, **sampler_kwargs):
                for seed, image in zip(batch.seeds, batch.images):
                    atomic_write_bytes(image_path(outdir, seed, subdirs), png_bytes(to_pil_image(image)))
                    made += 1
        except BaseException:
            if fresh and rank == 0 and world == 1 and made == 0:  # leave a new folder as it was
                (Path(outdir) / MANIFEST_NAME).unlink(missing_ok=True)
            raise
        if world > 1:
            dist.barrier()
        if grid is not None and rank == 0:
            shown = seeds[:grid_count]
            keys = None if seeds_per_class is None else [s // seeds_per_class for s in shown]
            atomic_write_bytes(grid, png_bytes(make_grid([image_path(outdir, s, subdirs) for s in shown], keys)))
    return {"generated": made, "skipped": len(seeds) - len(todo)}
