"""Datasets: the reader (`ImageDataset`), conversion of image collections
(`convert_dataset`), VAE latents (`encode_dataset`, `decode_dataset`),
a summary (`dataset_info`) and the built-in Fashion-MNIST set
(`builtin_dataset_path`). Format: docs/datasets.md."""
# `name as name`: used by the commands, importable from here but not in `__all__`
# (not part of the documented API).
from .builtin import FASHION_MNIST_CLASSES, builtin_dataset_path
from .builtin import default_cache_dir as default_cache_dir
from .convert import TRANSFORMS, ConvertResult, convert_dataset
from .dataset import ImageDataset
from .info import dataset_info
from .info import format_info as format_info
from .latents import decode_dataset, encode_dataset

__all__ = ["ImageDataset", "convert_dataset", "ConvertResult", "TRANSFORMS", "encode_dataset", "decode_dataset",
           "dataset_info", "builtin_dataset_path", "FASHION_MNIST_CLASSES"]
