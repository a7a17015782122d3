"""`ImageDataset`: the reader of edm2 / official EDM2 datasets.

A dataset is a folder or a zip holding either
- images: 8-bit PNG (or JPEG, ...), grayscale or RGB, all N×N, or
- latents: float32 `.npy` arrays [8, h, w] = posterior mean (4) and std (4)
  of the Stable Diffusion VAE (paper App. B.1),
plus an optional `dataset.json` = {"labels": [[relative_path, class], ...] | null,
"class_names": [...]} (class_names is our optional addition to the official format).

`ds[i] -> (item, label)`: item is a CHW uint8 array (images) or float32 array
(latents); label is a float32 one-hot vector of length `label_dim` (shape [0]
without labels). With `xflip=True` the dataset has 2N items, N..2N-1 being the
x-flipped copies of 0..N-1.
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.errors import EDM2Error, MissingFileError
from ..utils.validate import safe_error_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LATENT_EXTENSION = ".npy"
LATENT_CHANNELS = 8


def _is_item(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS + (LATENT_EXTENSION,))


_ZIP_FIX = "re-create it with `edm2 dataset convert` (or copy it again if it is a copy)"


def starts_like_zip(path) -> bool:
    """Whether the file begins with a zip entry's signature: a file that does so but
    is no readable zip (`zipfile.is_zipfile`) is a truncated or damaged one."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def list_dataset_files(path) -> list[str]:
    """Sorted relative POSIX paths of every file in a dataset folder or zip (macOS junk left out)."""
    path = Path(path)
    if path.is_dir():
        names = []
        for root, _dirs, files in os.walk(path):
            rel = os.path.relpath(root, path)
            names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
    else:
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as e:   # its table of contents (central directory) is damaged
            raise EDM2Error(f"{path}: a corrupt zip file ({e}); {_ZIP_FIX}") from None
    return sorted(n for n in names if not n.startswith("__MACOSX/") and not Path(n).name.startswith("._"))


def read_dataset_json(data: bytes, where: str) -> dict:
    """Parse and check a dataset.json; `where` names it in error messages."""
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EDM2Error(f"{where}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise EDM2Error(f'{where}: expected {{"labels": [[path, class], ...] or null}}')
    labels = meta["labels"]
    if labels is not None and not (isinstance(labels, list) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) for e in labels)):
        raise EDM2Error(f'{where}: "labels" must be null or a list of [relative_path, class] pairs')
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise EDM2Error(f'{where}: "class_names" must be a list of strings')
    if names is not None and len(names) > MAX_CLASSES:
        raise EDM2Error(f'{where}: {len(names)} "class_names"; at most {MAX_CLASSES} classes are supported')
    if labels is not None:
        meta["labels"] = check_labels(labels, names, where)
    return meta


# Class labels: a class index c becomes a one-hot vector of length label_dim = max(c) + 1 (and
# the network gets one embedding row per class), so a wrong index silently changes the model.
MAX_CLASSES = 1 << 20            # hard limit on label_dim (ImageNet-21k has ~21,800 classes)
_FREE_CLASSES = 1000             # without class_names, indices up to max(1000, 100 x items) are believable


def check_labels(labels: list, class_names, where: str) -> list:
    """Check dataset.json's [[path, label], ...] and return it with whole-number
    labels as ints. A label is either a class index (a whole number >= 0; 3.0 is
    read as 3) or, for every item alike, a vector (list) of finite numbers.
    Class indices must be below len(class_names) when class names are given,
    else below max(1000, 100 x number of items) and 2^20, so that a typo such
    as 1000000000 or 1.5 is refused instead of turning into a huge or a
    continuous label."""
    values = [c for _, c in labels]
    if not values:
        return labels
    if all(isinstance(v, (list, tuple)) for v in values):
        dims = {len(v) for v in values}
        if len(dims) > 1:
            raise EDM2Error(f"{where}: vector labels of different lengths {sorted(dims)[:4]}; give every item a "
                             f"vector of the same length")
        dim = dims.pop()
        if not 1 <= dim <= MAX_CLASSES:
            raise EDM2Error(f"{where}: vector labels of length {dim}; need 1 to {MAX_CLASSES}")
        for (path, v) in labels:
            if not all(_is_number(x) and math.isfinite(x) for x in v):
                raise EDM2Error(f"{where}: label of {path} holds a non-number or NaN/infinity ({v}); vector labels "
                                 f"must be finite numbers")
        return labels
    out = []
    for path, v in labels:
        if isinstance(v, (list, tuple)):
            raise EDM2Error(f"{where}: mixes class indices and vector labels (e.g. {path}: {v}); use one kind")
        if not _is_number(v) or not math.isfinite(v) or v != int(v) or v < 0:
            raise EDM2Error(f"{where}: label {v!r} of {path} is not a class index (a whole number >= 0); "
                             f"fix the label (vector labels are written as lists)")
        out.append([path, int(v)])
    top = max(c for _, c in out)
    if class_names is not None:
        if top >= len(class_names):
            raise EDM2Error(f"{where}: class index {top} but only {len(class_names)} class_names; fix the label "
                             f"or add the class names")
    else:
        limit = min(MAX_CLASSES, max(_FREE_CLASSES, 100 * len(out)))
        if top >= limit:
            raise EDM2Error(f"{where}: class index {top} for {len(out)} items; without \"class_names\" class indices "
                             f"must be below {limit} (max(1000, 100 x items), at most 2^20), so this looks like a "
                             f"typo; fix the label, or list the classes in \"class_names\"")
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def match_labels(labels, names, where: str) -> dict:
    """{file: label} from dataset.json's label list, checked against the files
    present: every label names an existing file and every file has a label."""
    label_map = {str(p).replace("\\", "/"): c for p, c in labels}
    missing = sorted(set(label_map) - set(names))
    if missing:
        raise EDM2Error(f"{where} names {len(missing)} file(s) that are not in the dataset "
                         f"(first: {missing[0]}); fix the labels or restore the files")
    unlabeled = [n for n in names if n not in label_map]
    if unlabeled:
        raise EDM2Error(f"{where} has no label for {len(unlabeled)} file(s) "
                         f"(first: {unlabeled[0]}); add labels or remove the files")
    return label_map


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> CHW uint8 (grayscale -> [1, H, W], RGB -> [3, H, W])."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                raise EDM2Error(f"{where}: image mode {img.mode} is not 8-bit grayscale or RGB; "
                                 f"prepare the dataset with `edm2 dataset convert`")
            arr = np.array(img)  # a writable copy (torch warns about read-only arrays)
    except ValueError:
        raise
    except Exception as e:
        raise EDM2Error(f"{where}: cannot decode image ({type(e).__name__}: {e}); "
                         f"delete or replace the file, or re-run `edm2 dataset convert --skip-bad`") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageDataset:
    """Images or latents from a folder or zip, with optional one-hot labels.

    Args:
        path: dataset folder or zip file.
        xflip: double the dataset with x-flipped copies (items N..2N-1).
        max_size: keep at most this many items: a random subset (seeded by
            `random_seed`, kept in file order), like the reference.
        use_labels: False gives every item a [0]-shaped label.
        random_seed: seed of the `max_size` subset.

    Attributes: `path`, `resolution`, `num_channels` (1, 3 or 8), `label_dim`,
    `has_labels`, `class_names` (list or None), `is_latent`, `names` (relative
    path of each raw item), `raw_labels` (int class per raw item, or None).
    """

    def __init__(self, path, xflip: bool = False, max_size: int | None = None, use_labels: bool = True,
                 random_seed: int = 0):
        self.path = Path(path)
        self.xflip = bool(xflip)
        if max_size is not None and max_size < 1:
            raise EDM2Error(f"max_size={max_size}: must be >= 1 (or None for the whole dataset)")
        if not self.path.exists():
            raise MissingFileError(f"dataset {self.path} does not exist; create one with `edm2 dataset convert`")
        self._is_zip = self.path.is_file()
        if self._is_zip and not zipfile.is_zipfile(self.path):
            if starts_like_zip(self.path):   # e.g. a copy or a write that was cut short
                raise EDM2Error(f"dataset {self.path}: a truncated or corrupt zip file (its table of contents at "
                                 f"the end is missing); {_ZIP_FIX}")
            raise EDM2Error(f"dataset {self.path} is neither a folder nor a zip file")
        self._zip = None
        self._zip_pid = None

        files = list_dataset_files(self.path)
        names = [n for n in files if _is_item(n)]
        if not names:
            raise EDM2Error(f"dataset {self.path} holds no images or .npy latents; "
                             f"create one with `edm2 dataset convert`")
        latent = [n.lower().endswith(LATENT_EXTENSION) for n in names]
        if any(latent) and not all(latent):
            raise EDM2Error(f"dataset {self.path} mixes images and .npy latents; keep one kind per dataset")
        self.is_latent = all(latent)

        # Labels (dataset.json at the root), checked against the files present.
        self.class_names = None
        label_map = None
        if "dataset.json" in files:
            meta = read_dataset_json(self._read("dataset.json"), f"{self.path}/dataset.json")
            self.class_names = meta.get("class_names")
            if meta["labels"] is not None:
                label_map = match_labels(meta["labels"], names, f"{self.path}/dataset.json")

        # Subset as in the reference: a seeded random choice, kept in file order.
        idx = np.arange(len(names))
        if max_size is not None and len(idx) > max_size:
            rng = np.random.RandomState(random_seed % (1 << 31))
            idx = np.sort(rng.permutation(len(idx))[:max_size])
        self.names = [names[i] for i in idx]

        self.raw_labels = None
        self._label_vectors = None
        self.label_dim = 0
        if label_map is not None and use_labels:
            values = [label_map[n] for n in self.names]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in label_map.values()):
                self.raw_labels = np.asarray(values, dtype=np.int64)
                if min(label_map.values()) < 0:
                    raise EDM2Error(f"{self.path}/dataset.json: class indices must be >= 0")
                # label_dim from all labels, so a max_size subset keeps the full one-hot length
                dim = max(len(self.class_names or []), max(label_map.values()) + 1)
                if self.class_names is not None and dim > len(self.class_names):
                    raise EDM2Error(f"{self.path}/dataset.json: class index {dim - 1} but only "
                                     f"{len(self.class_names)} class_names")
                self.label_dim = dim
            else:  # vector labels (as the reference allows)
                try:
                    self._label_vectors = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
                except (ValueError, TypeError):
                    raise EDM2Error(f"{self.path}/dataset.json: labels must all be class indices or "
                                     f"all be equal-length vectors") from None
                self.label_dim = self._label_vectors.shape[1]
        if not self.label_dim:
            self.class_names = None
        self.has_labels = self.label_dim > 0

        # Shape from the first item; every other item is checked when read.
        first = self._load(0)
        if first.ndim != 3 or first.shape[1] != first.shape[2]:
            raise EDM2Error(f"{self._where(0)}: item shape {list(first.shape)} is not square CHW; "
                             f"re-run `edm2 dataset convert` with --resolution and --transform")
        self._raw_shape = first.shape
        self.num_channels = int(first.shape[0])
        self.resolution = int(first.shape[1])
        if self.is_latent and self.num_channels != LATENT_CHANNELS:
            raise EDM2Error(f"{self._where(0)}: latents must have {LATENT_CHANNELS} channels "
                             f"(VAE mean and std), found {self.num_channels}")

    # -- raw access -------------------------------------------------------
    def _where(self, raw_idx: int) -> str:
        return f"{self.path}/{self.names[raw_idx]}" if not self._is_zip else f"{self.path}:{self.names[raw_idx]}"

    def _read(self, name: str) -> bytes:
        if not self._is_zip:
            return (self.path / name).read_bytes()
        # One zip handle per process: DataLoader workers reopen it after fork/spawn.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.read(name)

    def _load(self, raw_idx: int) -> np.ndarray:
        where = self._where(raw_idx)
        try:
            data = self._read(self.names[raw_idx])
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise EDM2Error(f"{where}: cannot read ({type(e).__name__}: {e})") from None
        if not self.is_latent:
            return decode_image(data, where)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise EDM2Error(f"{where}: not a valid .npy array ({safe_error_text(e)})") from None
        if arr.dtype != np.float32:
            raise EDM2Error(f"{where}: latent dtype {arr.dtype}, expected float32")
        return arr

    def close(self):
        if self._zip is not None:
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None  # never send an open file handle to a worker
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- public -----------------------------------------------------------
    @property
    def raw_size(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> list[int]:
        """[C, H, W] of an item."""
        return list(self._raw_shape)

    def __len__(self) -> int:
        return self.raw_size * (2 if self.xflip else 1)

    def get_label(self, idx: int) -> np.ndarray:
        raw_idx = idx % self.raw_size
        if self._label_vectors is not None:
            return self._label_vectors[raw_idx].copy()
        if self.raw_labels is not None and self.label_dim:
            onehot = np.zeros(self.label_dim, dtype=np.float32)
            onehot[self.raw_labels[raw_idx]] = 1
            return onehot
        return np.zeros([0], dtype=np.float32)

    def __getitem__(self, idx: int):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} items")
        idx = idx % len(self)
        raw_idx = idx % self.raw_size
        item = self._load(raw_idx)
        if item.shape != self._raw_shape:
            raise EDM2Error(f"{self._where(raw_idx)}: shape {list(item.shape)} differs from the first item's "
                             f"{list(self._raw_shape)}; re-run `edm2 dataset convert --resolution N`")
        if idx >= self.raw_size:  # the x-flipped half
            item = item[:, :, ::-1]
        return np.ascontiguousarray(item), self.get_label(idx)

    def class_counts(self) -> np.ndarray | None:
        """Number of raw items per class (None without integer class labels)."""
        if self.raw_labels is None or not self.label_dim:
            return None
        return np.bincount(self.raw_labels, minlength=self.label_dim)

    def __repr__(self):
        kind = "latents" if self.is_latent else "images"
        return (f"ImageDataset({str(self.path)!r}: {self.raw_size} {kind}, {self.num_channels}x{self.resolution}x"
                f"{self.resolution}, label_dim={self.label_dim}{', xflip' if self.xflip else ''})")
