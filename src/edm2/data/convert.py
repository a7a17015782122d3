"""`convert_dataset`: image collections -> an edm2 / official EDM2 image dataset.

Sources (`open_source`):
- a folder or zip of images; labels are the names of the top-level
  sub-folders (ImageNet's `train/n01440764/...`, CIFAR-10-style `train/cat/...`);
- an existing dataset (folder or zip with a `dataset.json`): its labels are kept;
- MNIST-style IDX files (e.g. Fashion-MNIST `t10k-images-idx3-ubyte.gz`; the
  `...-labels-idx1-ubyte` file next to it gives the labels);
- a `.npz` with an `images` (or `x`) array [N, H, W], [N, H, W, C] or [N, C, H, W]
  and optionally `labels` (or `y`) and `class_names`;
- CIFAR-10/100 tarballs (python or binary version) or their extracted folders,
  and Tiny-ImageNet folders, one split at a time (`edm2.data.archives`).

Every image becomes 8-bit grayscale (if all images are grayscale) or RGB; other
modes (RGBA, CMYK, palette, 16-bit) are converted and counted in the notes.
Transforms (all give N×N, see `TRANSFORMS`): center-crop, center-crop-wide,
center-crop-dhariwal (the ADM crop), pad.
"""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..utils.errors import EDM2Error, MissingFileError
from ..utils.fileio import png_bytes
from ..utils.validate import check_int, safe_error_text
from .archives import is_cifar, is_tiny_imagenet, read_cifar, tiny_imagenet_files
from .dataset import (
    IMAGE_EXTENSIONS,
    LATENT_EXTENSION,
    list_dataset_files,
    match_labels,
    read_dataset_json,
    starts_like_zip,
)
from .writer import DatasetWriter, check_destination, item_name

Image.MAX_IMAGE_PIXELS = None  # large photos are legitimate input here
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# --------------------------------------------------------------------------
# Transforms: PIL image -> N×N PIL image
# --------------------------------------------------------------------------
def center_crop(img: Image.Image, n: int) -> Image.Image:
    """Largest centred square, then Lanczos resize to N×N (the official tool's `center-crop`)."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((n, n), Image.LANCZOS)


def center_crop_wide(img: Image.Image, n: int) -> Image.Image:
    """Keep the full width: scale to width N, centre-crop the height to at most N,
    and letterbox (black bars above and below) to N×N."""
    w, h = img.size
    new_h = max(1, round(h * n / w))
    img = img.resize((n, new_h), Image.LANCZOS)
    if new_h >= n:
        top = (new_h - n) // 2
        return img.crop((0, top, n, top + n))
    canvas = Image.new(img.mode, (n, n))
    canvas.paste(img, (0, (n - new_h) // 2))
    return canvas


def center_crop_dhariwal(img: Image.Image, n: int) -> Image.Image:
    """The ADM crop (Dhariwal & Nichol 2021): halve with a box filter while the
    short side is >= 2N, bicubic-resize so the short side is N, centre-crop N×N."""
    while min(img.size) >= 2 * n:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    scale = n / min(img.size)
    img = img.resize((max(n, round(img.size[0] * scale)), max(n, round(img.size[1] * scale))), Image.BICUBIC)
    left, top = (img.size[0] - n) // 2, (img.size[1] - n) // 2
    return img.crop((left, top, left + n, top + n))


def pad(img: Image.Image, n: int) -> Image.Image:
    """Zero-pad (black) to N×N, image centred; no resampling (e.g. 28×28 MNIST -> 32×32)."""
    w, h = img.size
    if w > n or h > n:
        raise EDM2Error(f"transform=pad: image of {w}x{h} is larger than resolution={n}; "
                         f"use transform=center-crop")
    canvas = Image.new(img.mode, (n, n))
    canvas.paste(img, ((n - w) // 2, (n - h) // 2))
    return canvas


TRANSFORMS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "center-crop": center_crop,
    "center-crop-wide": center_crop_wide,
    "center-crop-dhariwal": center_crop_dhariwal,
    "pad": pad,
}


def to_8bit(img: Image.Image, channels: int) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3).
    Returns (image, note) where note names a conversion that changed the data's mode."""
    mode = img.mode
    if mode in ("L", "RGB"):
        pass
    elif mode.startswith("I") or mode == "F":
        # 16-bit (or 32-bit int / float) grayscale: scale 0..65535 -> 0..255 (PIL's convert would clip).
        arr = np.asarray(img).astype(np.float64)
        if mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255
        elif mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    elif mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA").convert("RGB")
    else:  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    note = None if mode in ("L", "RGB") else f"{mode} -> {img.mode}"
    if channels == 3 and img.mode == "L":
        img = img.convert("RGB")
        note = note or "grayscale -> RGB"
    elif channels == 1 and img.mode == "RGB":
        img = img.convert("L")
        note = note or "RGB -> grayscale"
    return img, note


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------
@dataclass
class SourceItem:
    name: str                                       # relative path / id in the source, for messages
    label: int | None
    read: Callable[[], Image.Image]                 # full decode
    probe: Callable[[], tuple[str, tuple[int, int]]]  # (mode, (w, h)) from the header only


@dataclass
class Source:
    path: Path
    kind: str                                       # 'folder', 'zip', 'dataset', 'idx', 'npz'
    items: list[SourceItem]
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None        # releases an open zip

    @property
    def has_labels(self) -> bool:
        return bool(self.items) and self.items[0].label is not None


def _pil_from_bytes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _probe_bytes(data_fn):
    def probe():
        with Image.open(io.BytesIO(data_fn())) as img:
            return img.mode, img.size
    return probe


def _file_items(root: Path, names: list[str], read_bytes, labels: dict | None) -> list[SourceItem]:
    items = []
    for n in names:
        def data(n=n):
            return read_bytes(n)
        items.append(SourceItem(n, None if labels is None else labels[n],
                                lambda d=data: _pil_from_bytes(d()), _probe_bytes(data)))
    return items


def _open_collection(path: Path, use_labels: bool) -> Source:
    """A folder or zip of images, or an existing dataset (with dataset.json)."""
    is_zip = path.is_file()
    files = list_dataset_files(path)
    if is_zip:
        zf = zipfile.ZipFile(path)  # reads of different members are thread-safe in CPython
        read_bytes = zf.read
    else:
        def read_bytes(n):
            return (path / n).read_bytes()
    names = [n for n in files if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        if any(n.lower().endswith(LATENT_EXTENSION) for n in files):
            raise EDM2Error(f"source={path} holds .npy latents, not images; use `edm2 dataset decode`")
        if any("idx3-ubyte" in n for n in files):
            raise EDM2Error(f"source={path} holds IDX files; pass the images file itself, "
                             f"e.g. source={path}/train-images-idx3-ubyte.gz")
        raise EDM2Error(f"source={path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); nothing to convert")
    notes, class_names, labels = [], None, None
    if "dataset.json" in files:  # an existing dataset: keep its labels
        meta = read_dataset_json(read_bytes("dataset.json"), f"{path}/dataset.json")
        kind = "dataset"
        if meta["labels"] is not None and use_labels:
            labels = match_labels(meta["labels"], names, f"{path}/dataset.json")
            if not all(isinstance(c, int) and c >= 0 for c in labels.values()):
                raise EDM2Error(f"{path}/dataset.json: labels must be class indices >= 0 for conversion")
            class_names = meta.get("class_names")
    else:  # labels from top-level sub-folder names
        kind = "zip" if is_zip else "folder"
        # A common wrapping folder (e.g. a zip of `train/` holding `train/cat/1.png`) is not a class.
        rel = {n: n for n in names}
        while len({r.split("/", 1)[0] for r in rel.values()}) == 1 and all(r.count("/") >= 2 for r in rel.values()):
            rel = {n: r.split("/", 1)[1] for n, r in rel.items()}
        in_sub = ["/" in rel[n] for n in names]
        if use_labels and all(in_sub):
            class_names = sorted({rel[n].split("/", 1)[0] for n in names})
            index = {c: i for i, c in enumerate(class_names)}
            labels = {n: index[rel[n].split("/", 1)[0]] for n in names}
            if len(class_names) == 1:
                notes.append(f"all images are in one sub-folder ({class_names[0]}): no labels")
                class_names, labels = None, None
        elif use_labels and any(in_sub):
            first = names[in_sub.index(False)]
            raise EDM2Error(f"source={path} has images both at the top level (e.g. {first}) and in "
                             f"sub-folders; labels come from sub-folder names: move them, or pass use_labels=False")
    return Source(path, kind, _file_items(path, names, read_bytes, labels), class_names, notes,
                  zf.close if is_zip else (lambda: None))


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped): big-endian header, uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise EDM2Error(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise EDM2Error(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise EDM2Error(f"{path}: IDX header says {shape} but holds {arr.size} values (truncated?)")
    return arr.reshape(shape)


def _array_items(prefix: str, images: np.ndarray, labels) -> list[SourceItem]:
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[1 if images.ndim == 3 else images.shape[3]]
    if images.dtype == np.uint16:
        mode = "I;16"
    size = (images.shape[2], images.shape[1])

    def read(i):
        a = images[i]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return Image.fromarray(a.astype(np.int32), "I") if a.dtype == np.uint16 else Image.fromarray(a)
    return [SourceItem(f"{prefix}[{i}]", None if labels is None else int(labels[i]),
                       lambda i=i: read(i), lambda: (mode, size)) for i in range(len(images))]


def _open_idx(path: Path, use_labels: bool) -> Source:
    images = read_idx(path)
    if images.ndim not in (3, 4):
        raise EDM2Error(f"{path}: expected IDX images [N, H, W] or [N, H, W, C], got shape {images.shape}")
    notes, labels = [], None
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if use_labels and label_path != path and label_path.exists():
        labels = read_idx(label_path)
        if labels.shape != (len(images),):
            raise EDM2Error(f"{label_path}: {labels.shape} labels for {len(images)} images in {path}")
    elif use_labels:
        notes.append(f"no labels file {label_path.name} next to {path.name}: unlabeled")
    return Source(path, "idx", _array_items(path.name, images, labels), None, notes)


def _open_npz(path: Path, use_labels: bool) -> Source:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EDM2Error(f"source={path}: cannot read .npz ({safe_error_text(e)})") from None
    key = next((k for k in ("images", "x", "arr_0") if k in npz.files), None)
    if key is None:
        raise EDM2Error(f"source={path}: no 'images' (or 'x') array; found {npz.files}")
    images = npz[key]
    if images.dtype not in (np.uint8, np.uint16):
        raise EDM2Error(f"source={path}: images are {images.dtype}; store them as uint8 (0-255)")
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise EDM2Error(f"source={path}: images of shape {images.shape}; expected [N,H,W], [N,H,W,C] or [N,C,H,W]")
    labels = None
    lkey = next((k for k in ("labels", "y") if k in npz.files), None)
    if use_labels and lkey is not None:
        labels = np.asarray(npz[lkey]).reshape(-1)
        if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise EDM2Error(f"source={path}: '{lkey}' must hold {len(images)} class indices >= 0")
    class_names = [str(c) for c in npz["class_names"]] if "class_names" in npz.files and labels is not None else None
    return Source(path, "npz", _array_items(path.name, images, labels), class_names, [])


def _open_cifar(path: Path, use_labels: bool, split: str | None) -> Source:
    """A CIFAR-10/100 tarball or extracted folder (edm2.data.archives), one split."""
    data = read_cifar(path, split or "train")
    labels = data.labels if use_labels else None
    note = f"{data.kind.upper()} ({data.format} version), {split or 'train'} split"
    return Source(path, "cifar", _array_items(f"{path.name}:{split or 'train'}", data.images, labels),
                  data.class_names if use_labels else None, [note])


def _open_tiny_imagenet(path: Path, use_labels: bool, split: str | None) -> Source:
    """A Tiny-ImageNet folder (edm2.data.archives), one split; classes in wnids.txt order."""
    files = tiny_imagenet_files(path, split or "train")

    def read_bytes(n):
        return (files.root / n).read_bytes()
    labels = files.labels if use_labels else None
    return Source(path, "tiny-imagenet", _file_items(files.root, files.names, read_bytes, labels),
                  files.class_names if use_labels else None, [f"Tiny-ImageNet, {split or 'train'} split"])


def open_source(source, use_labels: bool = True, split: str | None = None) -> Source:
    """Recognise the kind of source and list its items (nothing is decoded yet).
    `split` picks the part of a CIFAR ('train', 'test') or Tiny-ImageNet
    ('train', 'val') source; default 'train'."""
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"source={path} does not exist")
    if is_cifar(path) or (path.is_file() and tarfile.is_tarfile(path)):
        # The only tarballs read are CIFAR's: for any other, read_cifar says what is missing.
        return _open_cifar(path, use_labels, split)
    if is_tiny_imagenet(path):
        return _open_tiny_imagenet(path, use_labels, split)
    if split is not None:
        raise EDM2Error(f"split={split}: only CIFAR archives and Tiny-ImageNet folders have splits; "
                         f"drop `split` for {path}")
    if path.is_dir():
        return _open_collection(path, use_labels)
    name = path.name.lower()
    if name.endswith(".npz"):
        return _open_npz(path, use_labels)
    if zipfile.is_zipfile(path):
        return _open_collection(path, use_labels)
    if "idx" in name and "ubyte" in name:
        return _open_idx(path, use_labels)
    if starts_like_zip(path):   # a zip cut short (interrupted download or copy)
        raise EDM2Error(f"source={path}: a truncated or corrupt zip file (its table of contents at the end is "
                         f"missing); download or copy it again, or re-create it with `edm2 dataset convert`")
    raise EDM2Error(f"source={path}: not a folder, .zip, .npz or IDX (*-images-idx3-ubyte[.gz]) file")


def balanced_subset(labels: list, n: int) -> list[int]:
    """Indices of at most n items. With labels, a class-balanced choice: the first
    items of every class taken in turn (class counts differ by at most one unless a
    class runs out), returned in source order. Without labels, the first n."""
    if n >= len(labels):
        return list(range(len(labels)))
    if labels[0] is None:
        return list(range(n))
    by_class = defaultdict(list)
    for i, c in enumerate(labels):
        by_class[c].append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen, r = [], 0
    while len(chosen) < n:
        for q in queues:
            if r < len(q) and len(chosen) < n:
                chosen.append(q[r])
        r += 1
    return sorted(chosen)


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------
@dataclass
class ConvertResult:
    dest: Path
    num_images: int
    resolution: int
    channels: int
    label_dim: int
    class_names: list[str] | None
    skipped: list[str]                   # "name: reason" of bad items skipped with skip_bad
    notes: list[str]                     # conversions that were made (counted)


def convert_dataset(source, dest, resolution: int | None = None, transform: str | None = None,
                    max_images: int | None = None, skip_bad: bool = False, overwrite: bool = False,
                    class_names: list[str] | None = None, use_labels: bool = True, workers: int = 4,
                    compress_level: int = 1, progress: bool = True, split: str | None = None) -> ConvertResult:
    """Convert `source` (see module doc) to an image dataset at `dest` (folder, or zip if it ends in .zip).

    resolution: output N×N; without it every image must already be square and of one size.
    transform: one of TRANSFORMS; without it, square images are Lanczos-resized to N
        and non-square ones are an error.
    max_images: keep a class-balanced subset (`balanced_subset`).
    skip_bad: skip unreadable images (counted in `skipped`) instead of failing.
    class_names: names for the class indices (e.g. for IDX sources).
    split: the part of a CIFAR / Tiny-ImageNet source (see `open_source`).
    The output is written under a temporary name and renamed at the end.
    """
    check_destination(dest, overwrite, source)
    if transform is not None and transform not in TRANSFORMS:
        raise EDM2Error(f"transform={transform!r}: choose one of {', '.join(TRANSFORMS)}")
    if transform is not None and resolution is None:
        raise EDM2Error(f"transform={transform} needs `resolution`")
    if resolution is not None and resolution < 1:
        raise EDM2Error(f"resolution={resolution}: must be >= 1")
    if max_images is not None and max_images < 1:
        raise EDM2Error(f"max_images={max_images}: must be >= 1")
    workers = check_int(workers, "workers", lo=0)
    src = open_source(source, use_labels, split)
    try:
        return _convert(src, dest, resolution, transform, max_images, skip_bad, overwrite, class_names, workers,
                        compress_level, progress)
    finally:
        src.close()


def _convert(src: Source, dest, resolution, transform, max_images, skip_bad, overwrite, class_names, workers,
             compress_level, progress) -> ConvertResult:
    source = src.path
    notes = list(src.notes)
    skipped: list[str] = []

    # 1. Header scan: modes and sizes decide the channels and catch mixed sizes before any work.
    good, modes, sizes = [], [], []
    for item in tqdm(src.items, desc="scanning", unit="img", disable=not progress or len(src.items) < 10000):
        try:
            mode, size = item.probe()
        except Exception as e:
            if not skip_bad:
                raise EDM2Error(f"{src.path}: cannot read image {item.name} ({type(e).__name__}: {e}); "
                                 f"delete it or pass skip_bad=True") from None
            skipped.append(f"{item.name}: {type(e).__name__}")
            continue
        good.append(item)
        modes.append(mode)
        sizes.append(size)
    if not good:
        raise EDM2Error(f"source={src.path}: no readable images")
    channels = 1 if all(m in GRAY_MODES for m in modes) else 3
    if resolution is None:
        if len(set(sizes)) > 1:
            other = next(i for i, s in enumerate(sizes) if s != sizes[0])
            raise EDM2Error(f"source={src.path} has images of different sizes ({sizes[0][0]}x{sizes[0][1]} "
                             f"in {good[0].name}, {sizes[other][0]}x{sizes[other][1]} in {good[other].name}); "
                             f"pass `resolution` and transform=center-crop")
        w, h = sizes[0]
        if w != h:
            raise EDM2Error(f"source={src.path}: images are {w}x{h}, not square; "
                             f"pass `resolution` and transform=center-crop")
        resolution = w
    # Shapes that the transform cannot handle fail now, before any work.
    for i, (w, h) in enumerate(sizes):
        if transform is None and w != h and (w, h) != (resolution, resolution):
            raise EDM2Error(f"source={src.path}: image {good[i].name} is {w}x{h}, not square; pass "
                             f"transform=center-crop (or center-crop-wide, center-crop-dhariwal)")
        if transform == "pad" and (w > resolution or h > resolution):
            raise EDM2Error(f"transform=pad: image {good[i].name} is {w}x{h}, larger than "
                             f"resolution={resolution}; use transform=center-crop")

    # 2. Labels and the subset.
    labels = [it.label for it in good]
    if max_images is not None:
        keep = balanced_subset(labels, max_images)
        good, labels = [good[i] for i in keep], [labels[i] for i in keep]
    names = class_names if class_names is not None else src.class_names
    label_dim = 0
    if src.has_labels:
        label_dim = max(max(labels) + 1, len(names or []))
        if names is not None and len(names) < label_dim:
            raise EDM2Error(f"{len(names)} class names for {label_dim} classes; give one name per class")
    elif class_names is not None:
        raise EDM2Error("`class_names` given but the source has no labels")

    # 3. Decode, convert, transform and encode in threads (PIL releases the GIL); write in order.
    fn = TRANSFORMS.get(transform)

    def process(item: SourceItem):
        try:
            img = item.read()
        except Exception as e:
            return None, f"{item.name}: {type(e).__name__}: {e}", None
        img, note = to_8bit(img, channels)
        if img.size != (resolution, resolution):
            if fn is not None:
                try:
                    img = fn(img, resolution)
                except ValueError as e:
                    raise EDM2Error(f"{src.path}: image {item.name}: {e}") from None
            elif img.size[0] == img.size[1]:
                img = img.resize((resolution, resolution), Image.LANCZOS)
            else:
                raise EDM2Error(f"{src.path}: image {item.name} is {img.size[0]}x{img.size[1]}, not square; "
                                 f"pass transform=center-crop (or center-crop-wide, center-crop-dhariwal)")
        return png_bytes(img, compress_level), None, note

    converted = Counter()
    out_labels = []
    with DatasetWriter(dest, overwrite, source) as writer, \
            ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(good), desc="converting", unit="img", disable=not progress) as bar:
        chunk = 256
        for start in range(0, len(good), chunk):
            batch = good[start:start + chunk]
            for _item, label, (data, error, note) in zip(batch, labels[start:start + chunk], pool.map(process, batch)):
                bar.update(1)
                if error is not None:
                    if not skip_bad:
                        raise EDM2Error(f"{src.path}: cannot decode image {error}; delete it or pass skip_bad=True")
                    skipped.append(error)
                    continue
                if note:
                    converted[note] += 1
                name = item_name(writer.count)
                writer.add(name, data)
                if label is not None:
                    out_labels.append([name, int(label)])
        if writer.count == 0:
            raise EDM2Error(f"source={src.path}: every image was unreadable; nothing written")
        writer.commit(out_labels if src.has_labels else None, names if src.has_labels else None)
    notes += [f"converted {n} image(s) {k}" for k, n in sorted(converted.items())]
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image(s)")
    return ConvertResult(Path(dest), writer.count, resolution, channels, label_dim,
                         list(names) if (names is not None and src.has_labels) else None, skipped, notes)
