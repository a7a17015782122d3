"""The built-in training set: Fashion-MNIST's 10,000-image test split
(shipped in `builtin/`, MIT licence in builtin/LICENSE-fashion-mnist.txt),
converted on first use to a 32×32 (28×28 zero-padded by 2 px), 1-channel,
10-class dataset zip in the cache folder."""
from __future__ import annotations

from pathlib import Path

from ..io.download import cache_root
from ..utils.errors import MissingFileError
from .convert import convert_dataset

BUILTIN_DIR = Path(__file__).parent / "builtin"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_NAME = "fashion-mnist-t10k-32x32-v1.zip"


def default_cache_dir() -> Path:
    """Where the built-in dataset is cached: edm2's cache root (`edm2.io.download.cache_root`:
    $EDM2_CACHE, else ~/.cache/edm2)."""
    return cache_root()


def builtin_dataset_path(cache_dir=None, progress: bool = False) -> Path:
    """Path of the built-in Fashion-MNIST dataset zip, converting it on first use
    (the same IDX code path as `edm2 dataset convert`; written atomically, so
    concurrent first calls are safe). Later calls return the cached file."""
    dest = Path(cache_dir or default_cache_dir()).expanduser() / _NAME
    if dest.is_file():
        return dest
    images = BUILTIN_DIR / "t10k-images-idx3-ubyte.gz"
    if not images.is_file():
        raise MissingFileError(f"the built-in dataset {images} is missing from the installation; reinstall edm2")
    # overwrite=True: another process may have finished the same file meanwhile (identical content).
    convert_dataset(images, dest, resolution=32, transform="pad", class_names=FASHION_MNIST_CLASSES,
                    overwrite=True, progress=progress)
    return dest
