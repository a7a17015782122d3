"""edm2.data.ImageDataset and the built-in Fashion-MNIST dataset."""
import gzip
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.data import FASHION_MNIST_CLASSES, ImageDataset, builtin_dataset_path, convert_dataset
from edm2.data.builtin import BUILTIN_DIR
from edm2.data.convert import read_idx


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, items, labels=None, class_names=None, ext="png"):
    """A dataset zip in the official layout; items are HWC uint8 (png) or CHW float32 (npy)."""
    names = []
    with zipfile.ZipFile(path, "w") as z:
        for i, item in enumerate(items):
            name = f"{i // 1000:05d}/img{i:08d}.{ext}"
            if ext == "png":
                z.writestr(name, png_bytes(item))
            else:
                buf = io.BytesIO()
                np.save(buf, item)
                z.writestr(name, buf.getvalue())
            names.append(name)
        meta = {"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
        if class_names:
            meta["class_names"] = class_names
        z.writestr("dataset.json", json.dumps(meta))
    return names


@pytest.fixture
def rgb_zip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    make_zip(tmp_path / "d.zip", images, labels, ["a", "b", "c", "d"])
    return tmp_path / "d.zip", images, labels


def test_items_labels_and_attributes(rgb_zip):
    path, images, labels = rgb_zip
    ds = ImageDataset(path)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (10, 8, 3, 4)
    assert ds.has_labels and not ds.is_latent and ds.class_names == ["a", "b", "c", "d"] and ds.path == path
    for i in range(10):
        x, y = ds[i]
        assert x.dtype == np.uint8 and y.dtype == np.float32
        np.testing.assert_array_equal(x, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(y, np.eye(4, dtype=np.float32)[labels[i]])
    np.testing.assert_array_equal(ds.class_counts(), [3, 3, 2, 2])
    with pytest.raises(IndexError):
        ds[10]


def test_xflip_max_size_use_labels(rgb_zip):
    path, images, labels = rgb_zip
    ds = ImageDataset(path, xflip=True)
    assert len(ds) == 20
    for i in (0, 7):
        np.testing.assert_array_equal(ds[10 + i][0], images[i].transpose(2, 0, 1)[:, :, ::-1])
        np.testing.assert_array_equal(ds[10 + i][1], ds[i][1])
    sub = ImageDataset(path, max_size=4)
    assert len(sub) == 4 and sub.label_dim == 4  # one-hot length of the whole dataset
    full = {bytes(ds[i][0]): i for i in range(10)}
    picked = [full[bytes(sub[i][0])] for i in range(4)]
    assert picked == sorted(picked) and len(set(picked)) == 4  # a subset, in file order
    assert picked == [full[bytes(ImageDataset(path, max_size=4)[i][0])] for i in range(4)]  # seeded
    nolab = ImageDataset(path, use_labels=False)
    assert nolab.label_dim == 0 and not nolab.has_labels and nolab[3][1].shape == (0,)


def test_folder_equals_zip_and_grayscale(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    make_zip(tmp_path / "g.zip", gray)
    with zipfile.ZipFile(tmp_path / "g.zip") as z:
        z.extractall(tmp_path / "g")
    a, b = ImageDataset(tmp_path / "g.zip"), ImageDataset(tmp_path / "g")
    assert a.num_channels == b.num_channels == 1 and a.label_dim == b.label_dim == 0
    for i in range(3):
        np.testing.assert_array_equal(a[i][0], gray[i][None])
        np.testing.assert_array_equal(b[i][0], gray[i][None])


def test_latents(tmp_path):
    lat = np.random.default_rng(2).standard_normal((4, 8, 2, 2)).astype(np.float32)
    make_zip(tmp_path / "l.zip", lat, [1, 0, 1, 1], ext="npy")
    ds = ImageDataset(tmp_path / "l.zip", xflip=True)
    assert ds.is_latent and ds.num_channels == 8 and ds.resolution == 2 and ds.label_dim == 2
    x, y = ds[2]
    assert x.dtype == np.float32 and x.shape == (8, 2, 2)
    np.testing.assert_array_equal(x, lat[2])
    np.testing.assert_array_equal(ds[6][0], lat[2][:, :, ::-1])


def test_dataloader_workers_and_pickling(rgb_zip):
    path, images, labels = rgb_zip
    ds = ImageDataset(path, xflip=True)
    ds[0]  # opens the zip handle in this process
    clone = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives: no open handle
    assert clone._zip is None
    np.testing.assert_array_equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    assert x.shape == (20, 3, 8, 8) and x.dtype == torch.uint8
    np.testing.assert_array_equal(x.numpy(), np.stack([ds[i][0] for i in range(20)]))
    np.testing.assert_array_equal(y.numpy(), np.stack([ds[i][1] for i in range(20)]))


def test_bad_item_names_its_path(tmp_path):
    rng = np.random.default_rng(3)
    names = make_zip(tmp_path / "d.zip", rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        z.extractall(tmp_path / "d")
    (tmp_path / "d" / names[1]).write_bytes(b"\x89PNG broken")
    (tmp_path / "d" / names[2]).write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    ds = ImageDataset(tmp_path / "d")
    with pytest.raises(ValueError, match="img00000001.png.*cannot decode"):
        ds[1]
    with pytest.raises(ValueError, match=r"img00000002.png.*shape \[3, 16, 16\]"):
        ds[2]


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="edm2 dataset convert"):
        ImageDataset(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageDataset(tmp_path / "empty")
    (tmp_path / "junk.zip").write_bytes(b"hello")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        ImageDataset(tmp_path / "junk.zip")



def test_truncated_or_corrupt_zip_is_called_so(tmp_path, image_dataset):
    """A zip dataset cut short (an interrupted copy) or with a damaged table of contents is named
    as such, with the fix, by every reader: ImageDataset (train, metrics, info) and convert."""
    convert_dataset(image_dataset, tmp_path / "whole.zip", progress=False)
    data = (tmp_path / "whole.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"dataset .*cut.zip: a truncated or corrupt zip file.*"
                                         r"re-create it with `edm2 dataset convert`"):
        ImageDataset(tmp_path / "cut.zip")
    with pytest.raises(ValueError, match=r"source=.*cut.zip: a truncated or corrupt zip file"):
        convert_dataset(tmp_path / "cut.zip", tmp_path / "out", progress=False)
    damaged = bytearray(data)
    at = damaged.rfind(b"PK\x01\x02")   # the last entry of the central directory
    damaged[at:at + 4] = b"XXXX"
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    assert zipfile.is_zipfile(tmp_path / "damaged.zip")
    for read in (lambda: ImageDataset(tmp_path / "damaged.zip"),
                 lambda: convert_dataset(tmp_path / "damaged.zip", tmp_path / "out", progress=False)):
        with pytest.raises(ValueError, match=r"damaged.zip: a corrupt zip file .*edm2 dataset convert"):
            read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.zip", "damaged.zip", "whole.zip"]


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    builtin_dataset_path(folder)  # converted once for this module
    return folder


def test_builtin_fashion_mnist(builtin_dir):
    assert (BUILTIN_DIR / "LICENSE-fashion-mnist.txt").read_text().count("Zalando") >= 1
    path = builtin_dataset_path(builtin_dir)
    assert path.parent == builtin_dir and path.suffix == ".zip"
    mtime = path.stat().st_mtime_ns
    assert builtin_dataset_path(builtin_dir) == path and path.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in builtin_dir.iterdir()] == [path.name]  # no temporaries left
    ds = ImageDataset(path)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (10000, 32, 1, 10)
    assert ds.class_names == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(ds.class_counts(), [1000] * 10)
    raw = read_idx(BUILTIN_DIR / "t10k-images-idx3-ubyte.gz")
    with gzip.open(BUILTIN_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in (0, 4321, 9999):
        x, y = ds[i]
        np.testing.assert_array_equal(x[0], np.pad(raw[i], 2))  # 28x28 zero-padded by 2 px
        assert int(y.argmax()) == raw_labels[i]


def test_builtin_cache_env(builtin_dir, monkeypatch):
    monkeypatch.setenv("EDM2_CACHE", str(builtin_dir))
    assert builtin_dataset_path() == builtin_dataset_path(builtin_dir)
