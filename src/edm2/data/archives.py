"""Readers of published small-image datasets, in their distributed formats.

- CIFAR-10 and CIFAR-100 (Krizhevsky 2009), either distribution:
  - the "python version" tarball (`cifar-10-python.tar.gz`,
    `cifar-100-python.tar.gz`): pickled dicts written by Python 2 holding a
    uint8 array `data` [N, 3072] and the labels. They are read with a
    restricted unpickler that only allows builtin containers and numpy array
    reconstruction (`edm2.io.official.unpickle_numpy_data`), so nothing in the
    file can run code;
  - the "binary version" tarball (`cifar-10-binary.tar.gz`,
    `cifar-100-binary.tar.gz`): fixed-size records of 1 label byte (CIFAR-10)
    or 2 (coarse, fine: CIFAR-100) followed by 3072 pixel bytes;
  - or the folder either tarball extracts to.
  Pixels are stored channel-planar (1024 red, 1024 green, 1024 blue bytes, each
  a 32x32 image in row order). Splits: 'train' (the five data batches /
  `train`) and 'test'. CIFAR-100 uses its 100 fine labels.
  The members read for one split (its batches and the class names) may hold
  at most `MAX_READ_BYTES` (256 MiB) together; the largest real split,
  CIFAR-100's train, holds about 154 MB. The size is taken from the tar
  header (or the file's size in a folder) before anything is read, so an
  archive whose header declares a huge member (or a sparse member that
  expands to one) is refused instead of filling the memory.
- Tiny-ImageNet (`tiny-imagenet-200/` as extracted): `wnids.txt` (the class
  order), `words.txt` (names), `train/<wnid>/images/*.JPEG` and
  `val/images/*.JPEG` labelled by `val/val_annotations.txt`. Splits: 'train',
  'val' (the test images have no labels).

`edm2.data.convert` turns them into datasets (`edm2 dataset convert --source
cifar-10-python.tar.gz --split test ...`).
"""
from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.official import UnsafePickleError, unpickle_numpy_data
from ..utils.errors import EDM2Error

CIFAR_SPLITS = ("train", "test")
TINY_IMAGENET_SPLITS = ("train", "val")
_PIXELS = 32 * 32 * 3
# Bound on the bytes read from one archive (the members of one split and the class names):
# CIFAR-100's train split, the largest, holds 50,000 x 3,074 bytes (about 154 MB).
MAX_READ_BYTES = 256 * 2 ** 20

# Member file names (basenames) of each distribution.
_PY10 = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"}
_PY100 = {"train": ["train"], "test": ["test"], "meta": "meta"}
_BIN10 = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"], "meta": "batches.meta.txt"}
_BIN100 = {"train": ["train.bin"], "test": ["test.bin"], "meta": "fine_label_names.txt"}


@dataclass
class CifarData:
    images: np.ndarray          # [N, 32, 32, 3] uint8
    labels: np.ndarray          # [N] int64
    class_names: list[str]
    kind: str                   # 'cifar-10' or 'cifar-100'
    format: str                 # 'python' or 'binary'


def _folder_with(path: Path) -> Path:
    """The folder itself, or its only sub-folder (a wrapping folder such as cifar-10-batches-py/)."""
    subs = [p for p in path.iterdir() if p.is_dir()]
    files = [p for p in path.iterdir() if p.is_file()]
    return subs[0] if len(subs) == 1 and not files else path


class _Files:
    """Basename -> bytes of the regular files in a tarball or an extracted folder."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = None
        self.bytes_read = 0   # the sizes of the members read so far (bounded by MAX_READ_BYTES)
        if path.is_dir():
            self.members = {p.name: p for p in sorted(_folder_with(path).iterdir()) if p.is_file()}
        else:
            try:
                self.tar = tarfile.open(path, "r:*")
                self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise EDM2Error(f"source={path}: unreadable tar archive ({type(e).__name__}: {e})") from None

    def has(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        """The member's size as its tar header declares it (for a sparse member: expanded), or the file's."""
        m = self.members[name]
        return m.stat().st_size if self.tar is None else m.size

    def read(self, name: str) -> bytes:
        m = self.members[name]
        size = self.size(name)
        if self.bytes_read + size > MAX_READ_BYTES:   # checked before reading: the header may lie
            what = (f"{name} declares {size} bytes" if size > MAX_READ_BYTES else
                    f"{name} ({size} bytes) brings the members read to {self.bytes_read + size} bytes")
            raise EDM2Error(f"source={self.path}: {what}, more than the {MAX_READ_BYTES} bytes a CIFAR split can "
                             f"hold (the largest real one about 154 MB); the archive is damaged or not a CIFAR "
                             f"archive: download it again")
        self.bytes_read += size
        if self.tar is None:
            return m.read_bytes()
        try:
            return self.tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise EDM2Error(f"source={self.path}: cannot read {m.name} from the archive "
                             f"({type(e).__name__}: {e}); the download may be truncated") from None

    def close(self):
        if self.tar is not None:
            self.tar.close()


def _layout(files: _Files):
    for fmt, kind, layout in (("python", "cifar-10", _PY10), ("python", "cifar-100", _PY100),
                              ("binary", "cifar-10", _BIN10), ("binary", "cifar-100", _BIN100)):
        if files.has(layout["meta"]) and all(files.has(n) for n in layout["test"]):
            return fmt, kind, layout
    return None


def is_cifar(path) -> bool:
    """Whether `path` is a CIFAR tarball or extracted folder (by its member names)."""
    path = Path(path)
    if not (path.is_dir() or (path.is_file() and tarfile.is_tarfile(path))):
        return False
    try:
        files = _Files(path)
    except ValueError:
        return path.is_file() and "cifar" in path.name.lower()   # a damaged CIFAR tarball: let read_cifar say why
    try:
        return _layout(files) is not None
    finally:
        files.close()


def _text_lines(data: bytes, where: str) -> list[str]:
    try:
        return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise EDM2Error(f"{where}: not a text file of class names") from None


def _python_batch(files: _Files, name: str, kind: str):
    where = f"{files.path}:{name}"
    refusal = "the allow-list for CIFAR batches (builtin containers and numpy arrays only); nothing was run"
    try:
        batch = unpickle_numpy_data(files.read(name), where, refusal)
    except UnsafePickleError as e:
        raise EDM2Error(str(e)) from None
    key = "labels" if kind == "cifar-10" else "fine_labels"
    if not isinstance(batch, dict) or "data" not in batch or key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise EDM2Error(f"{where}: not a {kind.upper()} python batch (expected a dict with 'data' and {key!r}; "
                         f"found {found})")
    data, labels = batch["data"], np.asarray(batch[key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", None)
        raise EDM2Error(f"{where}: 'data' must be a uint8 array [N, 3072], found {type(data).__name__} {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise EDM2Error(f"{where}: {key!r} must hold {len(data)} integer labels, found shape {labels.shape}")
    return data, labels.astype(np.int64)


def _binary_batch(files: _Files, name: str, kind: str):
    where = f"{files.path}:{name}"
    head = 1 if kind == "cifar-10" else 2
    raw = np.frombuffer(files.read(name), dtype=np.uint8)
    record = head + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise EDM2Error(f"{where}: {raw.size} bytes is not a whole number of {record}-byte {kind.upper()} records "
                         f"(truncated or not a CIFAR binary batch)")
    raw = raw.reshape(-1, record)
    return raw[:, head:], raw[:, head - 1].astype(np.int64)   # CIFAR-100: (coarse, fine), the fine label last


def read_cifar(path, split: str = "train") -> CifarData:
    """Read one split of a CIFAR-10/100 tarball (python or binary version) or
    of the folder it extracts to. Raises ValueError naming the file for
    anything malformed."""
    path = Path(path)
    if split not in CIFAR_SPLITS:
        raise EDM2Error(f"split={split!r}: CIFAR has the splits {', '.join(CIFAR_SPLITS)}")
    files = _Files(path)
    try:
        found = _layout(files)
        if found is None:
            raise EDM2Error(f"source={path}: not a CIFAR-10/100 archive (no batches.meta/meta with test batches; "
                             f"found {', '.join(sorted(files.members)[:8]) or 'no files'})")
        fmt, kind, layout = found
        missing = [n for n in layout[split] if not files.has(n)]
        if missing:
            raise EDM2Error(f"source={path}: the {split} split lacks {', '.join(missing)}; "
                             f"the archive is incomplete")
        num_classes = 10 if kind == "cifar-10" else 100
        if fmt == "python":
            meta_where = f"{path}:{layout['meta']}"
            meta = unpickle_numpy_data(files.read(layout["meta"]), meta_where,
                                       "the allow-list for CIFAR metadata (builtin containers only); nothing was run")
            key = "label_names" if kind == "cifar-10" else "fine_label_names"
            names = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise EDM2Error(f"{meta_where}: no list of class names {key!r}")
            parts = [_python_batch(files, n, kind) for n in layout[split]]
        else:
            names = _text_lines(files.read(layout["meta"]), f"{path}:{layout['meta']}")
            parts = [_binary_batch(files, n, kind) for n in layout[split]]
    except UnsafePickleError as e:
        raise EDM2Error(str(e)) from None
    finally:
        files.close()
    if len(names) != num_classes:
        raise EDM2Error(f"source={path}: {len(names)} class names, expected {num_classes} for {kind.upper()}")
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise EDM2Error(f"source={path}: label {int(bad[0])} out of range 0..{num_classes - 1} of {kind.upper()} "
                         f"({bad.size} such labels in the {split} split); the archive is damaged")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)   # channel planes -> [N, H, W, C]
    return CifarData(np.ascontiguousarray(images), labels, list(names), kind, fmt)


# ---------------------------------------------------------------------------
# Tiny-ImageNet.
# ---------------------------------------------------------------------------

@dataclass
class TinyImageNetFiles:
    root: Path                   # the folder holding wnids.txt
    names: list[str]             # image paths relative to root
    labels: dict[str, int]       # relative path -> class index (wnids.txt order)
    class_names: list[str]       # first name of each class in words.txt (the wnid when absent)
    wnids: list[str]


def _tiny_root(path: Path) -> Path | None:
    if (path / "wnids.txt").is_file():
        return path
    subs = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    if len(subs) == 1 and (subs[0] / "wnids.txt").is_file():
        return subs[0]
    return None


def is_tiny_imagenet(path) -> bool:
    path = Path(path)
    return path.is_dir() and _tiny_root(path) is not None


def tiny_imagenet_files(path, split: str = "train") -> TinyImageNetFiles:
    """List the labelled images of a Tiny-ImageNet folder's split ('train' or 'val')."""
    path = Path(path)
    if split not in TINY_IMAGENET_SPLITS:
        raise EDM2Error(f"split={split!r}: Tiny-ImageNet has the labelled splits {', '.join(TINY_IMAGENET_SPLITS)}")
    root = _tiny_root(path)
    if root is None:
        raise EDM2Error(f"source={path}: not a Tiny-ImageNet folder (no wnids.txt)")
    wnids = _text_lines((root / "wnids.txt").read_bytes(), f"{root}/wnids.txt")
    if not wnids or len(set(wnids)) != len(wnids):
        raise EDM2Error(f"{root}/wnids.txt: needs one distinct class id per line")
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in _text_lines((root / "words.txt").read_bytes(), f"{root}/words.txt"):
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip() or wnid
    class_names = [words.get(w, w) for w in wnids]
    names, labels = [], {}
    if split == "train":
        for w in wnids:
            folder = root / "train" / w / "images"
            if not folder.is_dir():
                raise EDM2Error(f"{folder}: missing; every class of wnids.txt needs train/<wnid>/images/")
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in (".jpeg", ".jpg", ".png") and p.is_file():
                    rel = p.relative_to(root).as_posix()
                    names.append(rel)
                    labels[rel] = index[w]
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise EDM2Error(f"{ann}: missing; the val split is labelled by val/val_annotations.txt")
        for k, line in enumerate(_text_lines(ann.read_bytes(), str(ann))):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise EDM2Error(f"{ann}: line {k + 1} should be '<file>\\t<wnid>...' with a wnid of wnids.txt, "
                                 f"got {line[:60]!r}")
            rel = f"val/images/{fields[0]}"
            if not (root / rel).is_file():
                raise EDM2Error(f"{root / rel}: listed in {ann.name} but missing")
            names.append(rel)
            labels[rel] = index[fields[1]]
        names.sort()
    if not names:
        raise EDM2Error(f"source={path}: the {split} split holds no images")
    return TinyImageNetFiles(root, names, labels, class_names, wnids)
