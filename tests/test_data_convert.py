"""edm2.data conversion: sources, transforms, subsets, bad input, CLI."""
import gzip
import json
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from edm2.cli import main
from edm2.data import ImageDataset, convert_dataset
from edm2.data.convert import TRANSFORMS, balanced_subset, read_idx
from edm2.data.writer import DatasetWriter


def save(path, arr, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)


def make_class_folders(root, classes=("cat", "dog", "frog"), per_class=4, size=(16, 16), seed=0):
    """root/<class>/<i>.png with random RGB pixels; returns {relpath: (pixels HWC, class index)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            save(root / name / f"{i:02d}.png", arr)
            out[f"{name}/{i:02d}.png"] = (arr, c)
    return out


def write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_folder_to_zip_round_trip(tmp_path):
    src = tmp_path / "src"
    expected = make_class_folders(src)
    r = convert_dataset(src, tmp_path / "out.zip", progress=False)
    assert (r.num_images, r.resolution, r.channels, r.label_dim) == (12, 16, 3, 3)
    assert r.class_names == ["cat", "dog", "frog"]
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        meta = json.loads(z.read("dataset.json"))
        assert "00000/img00000000.png" in z.namelist()
    assert meta["class_names"] == ["cat", "dog", "frog"]
    assert len(meta["labels"]) == 12
    ds = ImageDataset(tmp_path / "out.zip")
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim, ds.is_latent) == (12, 16, 3, 3, False)
    for k, name in enumerate(sorted(expected)):  # items keep the source's sorted order
        pixels, cls = expected[name]
        item, label = ds[k]
        assert item.dtype == np.uint8 and item.shape == (3, 16, 16)
        np.testing.assert_array_equal(item, pixels.transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[cls])

    # zip -> folder again (an existing dataset as source keeps its labels and names)
    r2 = convert_dataset(tmp_path / "out.zip", tmp_path / "again", progress=False)
    ds2 = ImageDataset(tmp_path / "again")
    assert r2.class_names == ["cat", "dog", "frog"] and len(ds2) == 12
    for k in range(12):
        np.testing.assert_array_equal(ds2[k][0], ds[k][0])
        np.testing.assert_array_equal(ds2[k][1], ds[k][1])


def test_idx_to_dataset_with_pad(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 3, 1, 2, 0], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    names = [f"c{i}" for i in range(10)]
    r = convert_dataset(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "mnist.zip", resolution=32,
                        transform="pad", class_names=names, progress=False)
    assert (r.num_images, r.channels, r.label_dim) == (7, 1, 10)
    ds = ImageDataset(tmp_path / "mnist.zip")
    assert ds.class_names == names and ds.num_channels == 1 and ds.resolution == 32
    for i in range(7):
        item, label = ds[i]
        np.testing.assert_array_equal(item[0], np.pad(images[i], 2))
        assert label.argmax() == labels[i] and label.sum() == 1


def test_npz_source_nchw(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([1, 0, 1, 1, 0]))
    convert_dataset(tmp_path / "d.npz", tmp_path / "d", progress=False)
    ds = ImageDataset(tmp_path / "d")
    np.testing.assert_array_equal(np.stack([ds[i][0] for i in range(5)]), images)
    assert [int(ds[i][1].argmax()) for i in range(5)] == [1, 0, 1, 1, 0]


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("size", [(45, 15), (15, 45), (64, 40)])
def test_every_transform_gives_NxN(tmp_path, transform, size):
    # left third red, middle green, right third blue
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3, 0] = 255
    arr[:, w // 3: 2 * w // 3, 1] = 255
    arr[:, 2 * w // 3:, 2] = 255
    save(tmp_path / "src" / "a.png", arr)
    n = 72 if transform == "pad" else 12
    r = convert_dataset(tmp_path / "src", tmp_path / "out", resolution=n, transform=transform, progress=False)
    item = ImageDataset(tmp_path / "out")[0][0]
    assert r.resolution == n and item.shape == (3, n, n)
    centre = item[:, n // 2, n // 2]
    if w == 3 * h and transform in ("center-crop", "center-crop-dhariwal"):
        assert centre.argmax() == 1 and item[1].mean() > 200  # only the green middle is kept
    if transform == "center-crop-wide" and w > h:
        assert item[:, 0].max() == 0 and item[:, -1].max() == 0  # letterbox bars
        assert item[0, n // 2, 0] > 200 and item[2, n // 2, -1] > 200  # full width kept
    if transform == "pad":
        top, left = (n - h) // 2, (n - w) // 2
        np.testing.assert_array_equal(item[:, top:top + h, left:left + w], arr.transpose(2, 0, 1))
        assert item.sum() == arr.sum()


def test_dhariwal_crop_halves_then_bicubic():
    # 200x100 -> box halving while the short side >= 2N=32 (100 -> 50 -> 25), bicubic to short side 16
    img = Image.fromarray(np.full((100, 200), 77, np.uint8))
    out = TRANSFORMS["center-crop-dhariwal"](img, 16)
    assert out.size == (16, 16) and np.asarray(out).min() == 77 == np.asarray(out).max()


def test_max_images_is_class_balanced(tmp_path):
    src = tmp_path / "src"
    make_class_folders(src, classes=("a", "b", "c"), per_class=5, size=(8, 8))
    r = convert_dataset(src, tmp_path / "out.zip", max_images=7, progress=False)
    counts = ImageDataset(tmp_path / "out.zip").class_counts()
    assert r.num_images == 7 and counts.sum() == 7 and counts.max() - counts.min() <= 1 and counts.min() >= 2
    # a plain prefix (the official tool's behaviour) would have been class 'a' only
    labels = [0] * 5 + [1] * 5 + [2] * 5
    assert balanced_subset(labels, 6) == [0, 1, 5, 6, 10, 11]
    assert balanced_subset([None] * 9, 4) == [0, 1, 2, 3]
    assert balanced_subset([0, 0, 0, 0, 1], 4) == [0, 1, 2, 4]  # a class that runs out


def test_corrupt_image_error_or_skip(tmp_path):
    src = tmp_path / "src"
    make_class_folders(src, classes=("a",), per_class=3, size=(8, 8))
    (src / "a" / "bad.png").write_bytes(b"not a png at all")
    good = src / "a" / "00.png"
    (src / "a" / "truncated.png").write_bytes(good.read_bytes()[:60])  # valid header, cut data
    with pytest.raises(ValueError, match="bad.png.*skip_bad=True"):
        convert_dataset(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [src]  # nothing left behind
    (src / "a" / "bad.png").unlink()
    with pytest.raises(ValueError, match="truncated.png"):  # found only when decoding the pixels
        convert_dataset(src, tmp_path / "out.zip", progress=False)
    assert list(tmp_path.iterdir()) == [src]
    (src / "a" / "bad.png").write_bytes(b"garbage")
    r = convert_dataset(src, tmp_path / "out.zip", skip_bad=True, progress=False)
    assert r.num_images == 3 and len(r.skipped) == 2
    assert any("bad.png" in s for s in r.skipped) and any("truncated.png" in s for s in r.skipped)
    assert len(ImageDataset(tmp_path / "out.zip")) == 3


def test_mixed_sizes_need_resolution(tmp_path):
    save(tmp_path / "src" / "a.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "src" / "b.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes.*`resolution`"):
        convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    r = convert_dataset(tmp_path / "src", tmp_path / "out", resolution=8, progress=False)
    assert r.resolution == 8 and ImageDataset(tmp_path / "out")[1][0].shape == (3, 8, 8)


def test_grayscale_and_rgb_mixed_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    save(tmp_path / "src" / "a.png", gray)
    save(tmp_path / "src" / "b.png", np.full((8, 8, 3), 9, np.uint8))
    r = convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert r.channels == 3 and any("grayscale -> RGB" in n and "1 image" in n for n in r.notes)
    item = ImageDataset(tmp_path / "out")[0][0]
    np.testing.assert_array_equal(item, np.stack([gray] * 3))


def test_cmyk_rgba_16bit_converted(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 128, np.uint8)], axis=2)
    save(tmp_path / "src" / "1_rgba.png", rgba, "RGBA")
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "src" / "2_cmyk.tif")
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(sixteen.astype(np.uint16)).save(tmp_path / "src" / "3_gray16.png")
    assert Image.open(tmp_path / "src" / "3_gray16.png").mode.startswith("I")
    r = convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert r.channels == 3 and r.num_images == 3
    ds = ImageDataset(tmp_path / "out")
    np.testing.assert_array_equal(ds[0][0], rgb.transpose(2, 0, 1))  # alpha dropped
    np.testing.assert_array_equal(ds[1][0], np.asarray(cmyk.convert("RGB")).transpose(2, 0, 1))
    expect16 = np.round(sixteen / 257).astype(np.uint8)  # scaled, not clipped at 255
    np.testing.assert_array_equal(ds[2][0], np.stack([expect16] * 3))
    assert len([n for n in r.notes if "->" in n]) == 3


def test_empty_source_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        convert_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_dataset(tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_labels_json_naming_missing_files(tmp_path):
    src = tmp_path / "src"
    save(src / "00000" / "img00000000.png", np.zeros((8, 8, 3), np.uint8))
    (src / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0],
                                                             ["00000/img00000001.png", 1]]}))
    with pytest.raises(ValueError, match="img00000001.png"):
        convert_dataset(src, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="img00000001.png"):
        ImageDataset(src)
    assert not (tmp_path / "out").exists()


def test_destination_exists_refused_unless_overwrite(tmp_path):
    src = tmp_path / "src"
    make_class_folders(src, classes=("a", "b"), per_class=2, size=(8, 8))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_dataset(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    convert_dataset(src, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and len(ImageDataset(tmp_path / "out")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporaries left



def test_destination_never_replaces_the_source(tmp_path):
    """Not even with overwrite=True: a dest that is the source, holds it, or lies inside it (whose
    files are all read) is refused before anything is written, and the source is left whole."""
    src = tmp_path / "d" / "src"
    make_class_folders(src, classes=("a", "b"), per_class=2, size=(8, 8))
    (src / "a" / "old").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for dest, match in [(src, "is the input source="), (tmp_path / "d", "holds the input source="),
                        (tmp_path, "holds the input source="), (src / "a", "lies inside source="),
                        (src / "a" / "old", "lies inside source=")]:
        for make in (convert_dataset, DatasetWriter):
            with pytest.raises(ValueError, match=rf"dest={dest}: {match}"):
                make(src, dest, overwrite=True) if make is convert_dataset else make(dest, True, src)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob(".*.tmp"))
    r = convert_dataset(src, src.parent / "out", overwrite=True, progress=False)   # beside it: fine
    assert r.num_images == 4

def test_cli_convert_info_and_errors(tmp_path, capsys):
    src = tmp_path / "src"
    make_class_folders(src, classes=("x", "y"), per_class=3, size=(20, 12))
    with pytest.raises(SystemExit) as e:
        main(["dataset", "convert", "--source", str(src), "--dest", str(tmp_path / "o.zip")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not square" in err and "--transform" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    main(["dataset", "convert", "--source", str(src), "--dest", str(tmp_path / "o.zip"), "--resolution", "8",
          "--transform", "center-crop", "--max-images", "4"])
    assert "wrote 4 images of 3x8x8 (2 classes)" in capsys.readouterr().out
    main(["dataset", "info", str(tmp_path / "o.zip"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 4 and info["class_counts"] == [2, 2] and info["class_names"] == ["x", "y"]
    main(["dataset", "info", str(tmp_path / "o.zip")])
    assert "balanced" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["dataset", "convert", "--source", str(src), "--dest", str(tmp_path / "o.zip"), "--resolution", "8",
              "--transform", "center-crop"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_zip_source_with_wrapping_folder(tmp_path):
    src = tmp_path / "src"
    expected = make_class_folders(src / "train", classes=("ant", "bee"), per_class=2, size=(8, 8))
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:
        for name in expected:
            z.write(src / "train" / name, f"train/{name}")
    r = convert_dataset(tmp_path / "train.zip", tmp_path / "out", progress=False)
    assert r.class_names == ["ant", "bee"] and r.label_dim == 2  # 'train/' is not a class
    ds = ImageDataset(tmp_path / "out")
    for k, name in enumerate(sorted(expected)):
        np.testing.assert_array_equal(ds[k][0], expected[name][0].transpose(2, 0, 1))
        assert int(ds[k][1].argmax()) == expected[name][1]
    # a single folder of images is unlabeled, not a 1-class dataset
    r = convert_dataset(src / "train" / "ant", tmp_path / "one", progress=False)
    assert r.label_dim == 0 and ImageDataset(tmp_path / "one").label_dim == 0
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as z:
        z.write(src / "train" / "ant" / "00.png", "photos/00.png")
    r = convert_dataset(tmp_path / "one.zip", tmp_path / "one2", progress=False)
    assert r.label_dim == 0 and any("one sub-folder" in n for n in r.notes)


def test_shape_errors_before_any_work(tmp_path):
    save(tmp_path / "src" / "a.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "src" / "b.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="b.png is 12x8, not square; pass transform=center-crop"):
        convert_dataset(tmp_path / "src", tmp_path / "out", resolution=8, progress=False)
    with pytest.raises(ValueError, match="b.png is 12x8, larger than resolution=10"):
        convert_dataset(tmp_path / "src", tmp_path / "out", resolution=10, transform="pad", progress=False)
    with pytest.raises(ValueError, match="needs `resolution`"):
        convert_dataset(tmp_path / "src", tmp_path / "out", transform="center-crop", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_has_usual_permissions(tmp_path):
    import os
    save(tmp_path / "src" / "a.png", np.zeros((8, 8, 3), np.uint8))
    convert_dataset(tmp_path / "src", tmp_path / "o.zip", progress=False)
    convert_dataset(tmp_path / "src", tmp_path / "o", progress=False)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "o.zip").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~mask
