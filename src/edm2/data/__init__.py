"""Datasets: the reader (`ImageDataset`), conversion of image collections
(`convert_dataset`), VAE latents (`encode_dataset`, `decode_dataset`),
a summary (`dataset_info`) and the built-in Fashion-MNIST set
(`builtin_dataset_path`). Format: docs/datasets.md."""
from .builtin import FASHION_MNIST_CLASSES, builtin_dataset_path, default_cache_dir
from .convert import TRANSFORMS, ConvertResult, balanced_subset, convert_dataset, open_source, read_idx
from .dataset import ImageDataset
from .info import dataset_info, format_info
from .latents import decode_dataset, encode_dataset

__all__ = ["ImageDataset", "builtin_dataset_path", "default_cache_dir", "FASHION_MNIST_CLASSES",
           "convert_dataset", "ConvertResult", "TRANSFORMS", "balanced_subset", "open_source", "read_idx",
           "encode_dataset", "decode_dataset", "dataset_info", "format_info"]
