"""CIFAR-10/100 (python and binary versions) and Tiny-ImageNet sources of `edm2 dataset convert`,
built here in their published byte layouts."""
import io
import json
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edm2.cli import main
from edm2.data import ImageDataset, convert_dataset
from edm2.data.archives import MAX_READ_BYTES, read_cifar

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- A Python 2 style pickle writer (protocol 2, 8-bit strings), as the CIFAR python batches are written ---
def _p2(obj) -> bytes:
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"I01\n" if obj else b"I00\n"
    if isinstance(obj, int):
        if 0 <= obj < 256:
            return b"K" + bytes([obj])
        if 0 <= obj < 65536:
            return b"M" + struct.pack("<H", obj)
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, str):
        obj = obj.encode("latin1")
    if isinstance(obj, bytes):  # a Python 2 str
        return (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    if isinstance(obj, tuple):
        return b"(" + b"".join(_p2(v) for v in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_p2(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_p2(k) + _p2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):  # numpy's own reduce, spelled as numpy 1.x wrote it
        dtype = (b"cnumpy\ndtype\n" + _p2("u1") + _p2(0) + _p2(1) + b"\x87R"
                 + _p2((3, "|", None, None, None, -1, -1, 0)) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _p2(0) + b"\x85" + _p2("b") + b"\x87R"
                + b"(" + _p2(1) + _p2(tuple(obj.shape)) + dtype + _p2(False) + _p2(obj.tobytes()) + b"tb")
    raise TypeError(type(obj))


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _p2(obj) + b"."


def _tar(path, members: dict):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _pixels(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def cifar10_python(path, per_batch=2, seed=0):
    rng = np.random.default_rng(seed)
    members, expect = {}, {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        datas, labels = [], []
        for name in names:
            d, lab = _pixels(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
            members[f"cifar-10-batches-py/{name}"] = py2_pickle({
                "batch_label": f"{name} of 5", "labels": lab, "data": d,
                "filenames": [f"img_{i}.png" for i in range(per_batch)]})
            datas.append(d)
            labels += lab
        expect[split] = (np.concatenate(datas), np.array(labels))
    members["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return _tar(path, members), expect


def _check(ds_path, data, labels, names):
    ds = ImageDataset(ds_path)
    assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (len(data), 32, 3, len(names))
    assert ds.class_names == names
    for i in range(len(data)):
        item, onehot = ds[i]
        np.testing.assert_array_equal(item, data[i].reshape(3, 32, 32))   # channel planes, rows in order
        assert int(onehot.argmax()) == labels[i]


def test_cifar10_python_tarball(tmp_path):
    tar, expect = cifar10_python(tmp_path / "cifar-10-python.tar.gz")
    r = convert_dataset(tar, tmp_path / "train", progress=False, workers=1)
    assert (r.num_images, r.resolution, r.channels, r.label_dim) == (10, 32, 3, 10)
    _check(tmp_path / "train", *expect["train"], CIFAR10_NAMES)
    convert_dataset(tar, tmp_path / "test.zip", split="test", progress=False, workers=1)
    _check(tmp_path / "test.zip", *expect["test"], CIFAR10_NAMES)
    # The extracted folder reads the same.
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "x", filter="data")
    d = read_cifar(tmp_path / "x", "test")
    assert (d.kind, d.format) == ("cifar-10", "python")
    np.testing.assert_array_equal(d.images, expect["test"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar100_python_tarball(tmp_path):
    rng = np.random.default_rng(1)
    fine = [f"fine{i}" for i in range(100)]
    batches = {}
    for split, n in (("train", 5), ("test", 3)):
        d, f, c = _pixels(rng, n), [int(v) for v in rng.integers(0, 100, n)], [int(v) for v in rng.integers(0, 20, n)]
        batches[split] = (d, np.array(f))
        batches[f"cifar-100-python/{split}"] = py2_pickle(
            {"filenames": ["a"] * n, "batch_label": "x", "fine_labels": f, "coarse_labels": c, "data": d})
    meta = py2_pickle({"fine_label_names": fine, "coarse_label_names": [f"c{i}" for i in range(20)]})
    tar = _tar(tmp_path / "cifar-100-python.tar.gz",
               {k: v for k, v in batches.items() if "/" in k} | {"cifar-100-python/meta": meta})
    convert_dataset(tar, tmp_path / "out", split="test", progress=False, workers=1)
    _check(tmp_path / "out", *batches["test"], fine)


def test_cifar_binary_tarballs(tmp_path):
    rng = np.random.default_rng(2)
    # CIFAR-10: records of 1 label byte + 3072 pixel bytes.
    members, expect = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(CIFAR10_NAMES) + "\n\n").encode()}, None
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        d, lab = _pixels(rng, 3), rng.integers(0, 10, 3).astype(np.uint8)
        members[f"cifar-10-batches-bin/{name}"] = np.concatenate([lab[:, None], d], axis=1).tobytes()
        expect = (d, lab)
    convert_dataset(_tar(tmp_path / "c10.tar.gz", members), tmp_path / "c10", split="test", progress=False, workers=1)
    _check(tmp_path / "c10", *expect, CIFAR10_NAMES)
    assert len(ImageDataset(tmp_path / "c10")) == 3
    # CIFAR-100: coarse byte, fine byte, pixels; the fine label is used.
    fine, coarse = [f"f{i}" for i in range(100)], [f"c{i}" for i in range(20)]
    d, f, c = _pixels(rng, 4), rng.integers(0, 100, 4).astype(np.uint8), rng.integers(0, 20, 4).astype(np.uint8)
    rec = np.concatenate([c[:, None], f[:, None], d], axis=1).tobytes()
    members = {"cifar-100-binary/train.bin": rec, "cifar-100-binary/test.bin": rec[:3074],
               "cifar-100-binary/fine_label_names.txt": "\n".join(fine).encode(),
               "cifar-100-binary/coarse_label_names.txt": "\n".join(coarse).encode()}
    convert_dataset(_tar(tmp_path / "c100.tar.gz", members), tmp_path / "c100", progress=False, workers=1)
    _check(tmp_path / "c100", d, f, fine)


def test_malformed_cifar(tmp_path, capsys):
    tar, _ = cifar10_python(tmp_path / "good.tar.gz")
    # Truncated download.
    (tmp_path / "cut.tar.gz").write_bytes(tar.read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.tar.gz"):
        convert_dataset(tmp_path / "cut.tar.gz", tmp_path / "o1", progress=False)
    # A batch asking for a global outside the allow-list is refused before anything runs.
    evil = b"\x80\x02cposix\nsystem\nU\x04trueR."
    with tarfile.open(tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    members["cifar-10-batches-py/test_batch"] = evil
    bad = _tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(ValueError, match="refused.*posix.system"):
        convert_dataset(bad, tmp_path / "o2", split="test", progress=False)
    # A binary batch that is not whole records.
    members = {"b/batches.meta.txt": "\n".join(CIFAR10_NAMES).encode(), "b/test_batch.bin": b"\x01" * 3000}
    with pytest.raises(ValueError, match="not a whole number of 3073-byte"):
        read_cifar(_tar(tmp_path / "bin.tar.gz", members), "test")
    # Wrong split name; --split on a source without splits.
    with pytest.raises(ValueError, match="split='val': CIFAR has the splits train, test"):
        read_cifar(tar, "val")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # The CLI: one line, non-zero exit.
    with pytest.raises(SystemExit) as e:
        main(["dataset", "convert", "--source", str(tmp_path / "cut.tar.gz"), "--dest", str(tmp_path / "o3")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cut.tar.gz" in err


def tiny_imagenet(root, per_class=2, val=3):
    rng = np.random.default_rng(3)
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "train").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n"
                                    "n01641577\tbullfrog, Rana catesbeiana\n")
    pix = {}
    for c, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            p = root / "train" / w / "images" / f"{w}_{i}.JPEG"
            Image.fromarray(arr).save(p, format="JPEG", quality=95)
            pix[p.relative_to(root).as_posix()] = c
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        shape = (64, 64) if i == 0 else (64, 64, 3)   # Tiny-ImageNet has some grey images among the RGB ones
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG",
                                                                          format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[(i + 1) % 3]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return pix


def test_tiny_imagenet(tmp_path):
    pix = tiny_imagenet(tmp_path / "tiny-imagenet-200")
    r = convert_dataset(tmp_path, tmp_path / "train.zip", progress=False, workers=1)   # the wrapping folder works too
    assert (r.num_images, r.resolution, r.channels, r.label_dim) == (6, 64, 3, 3)
    assert r.class_names == ["goldfish", "European fire salamander", "bullfrog"]
    ds = ImageDataset(tmp_path / "train.zip")
    for k, name in enumerate(sorted(pix, key=lambda n: (pix[n], n))):
        item, onehot = ds[k]
        ref = np.asarray(Image.open(tmp_path / "tiny-imagenet-200" / name).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(item, ref)
        assert int(onehot.argmax()) == pix[name]
    r = convert_dataset(tmp_path / "tiny-imagenet-200", tmp_path / "val", split="val", progress=False, workers=1)
    assert (r.num_images, r.channels) == (3, 3)
    labels = json.loads((tmp_path / "val" / "dataset.json").read_text())["labels"]
    assert [c for _, c in labels] == [1, 2, 0]
    # An annotation naming an unknown class is a one-line error naming the file.
    with open(tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt: line 4"):
        convert_dataset(tmp_path / "tiny-imagenet-200", tmp_path / "val2", split="val", progress=False)


def _members(tar):
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_python_batches_are_parsed_without_running_code(tmp_path, monkeypatch):
    """The python version's batches go through the restricted unpickler only: a REDUCE of a
    builtin (here `builtins.eval`) is refused before it is called, and pickle's own unrestricted
    loader is never used."""
    import pickle

    called = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: called.append(a))
    tar, expect = cifar10_python(tmp_path / "good.tar.gz")
    assert np.array_equal(read_cifar(tar, "test").labels, expect["test"][1]) and not called
    members = _members(tar)
    members["cifar-10-batches-py/test_batch"] = b"\x80\x02cbuiltins\neval\nU\x0c__import__()\x85R."
    with pytest.raises(ValueError, match=r"test_batch: refused: .*'builtins.eval'.*nothing was run"):
        read_cifar(_tar(tmp_path / "eval.tar.gz", members), "test")
    assert not called


def _malformed(tmp_path):
    """name -> (tarball, --split, text the one-line error must contain)."""
    tar, _ = cifar10_python(tmp_path / "good.tar.gz")
    py = _members(tar)
    out = {"truncated": (tmp_path / "cut.tar.gz", "train", "cut.tar.gz")}
    (tmp_path / "cut.tar.gz").write_bytes(tar.read_bytes()[: len(tar.read_bytes()) // 2])
    # Member names of neither layout (e.g. a renamed folder's files).
    renamed = {k.replace("data_batch_", "batch").replace("test_batch", "tst"): v for k, v in py.items()}
    out["wrong names"] = (_tar(tmp_path / "renamed.tar.gz", renamed), "test", "not a CIFAR-10/100 archive")
    out["missing batch"] = (_tar(tmp_path / "partial.tar.gz",
                                 {k: v for k, v in py.items() if not k.endswith("data_batch_3")}),
                            "train", "the train split lacks data_batch_3")
    # Labels outside 0..9, in the python and in the binary layout.
    rng = np.random.default_rng(5)
    bad = dict(py, **{"cifar-10-batches-py/test_batch": py2_pickle({"labels": [3, 10], "data": _pixels(rng, 2)})})
    out["python label"] = (_tar(tmp_path / "label.tar.gz", bad), "test", "label 10 out of range 0..9")
    rec = np.concatenate([np.array([[1], [12]], np.uint8), _pixels(rng, 2)], axis=1).tobytes()
    binary = {"cifar-10-batches-bin/batches.meta.txt": "\n".join(CIFAR10_NAMES).encode(),
              "cifar-10-batches-bin/test_batch.bin": rec}
    out["binary label"] = (_tar(tmp_path / "binlabel.tar.gz", binary), "test", "label 12 out of range 0..9")
    out["binary records"] = (_tar(tmp_path / "binshort.tar.gz", dict(binary, **{
        "cifar-10-batches-bin/test_batch.bin": rec[:-7]})), "test", "not a whole number of 3073-byte")
    # A batch that is a pickle of the wrong thing, and one with a wrong pixel count.
    out["not a dict"] = (_tar(tmp_path / "list.tar.gz", dict(py, **{"cifar-10-batches-py/test_batch": py2_pickle(
        [1, 2])})), "test", "not a CIFAR-10 python batch")
    out["pixels"] = (_tar(tmp_path / "pix.tar.gz", dict(py, **{"cifar-10-batches-py/test_batch": py2_pickle(
        {"labels": [1], "data": rng.integers(0, 256, (1, 3000), dtype=np.uint8)})})), "test", "[N, 3072]")
    out["class names"] = (_tar(tmp_path / "names.tar.gz", dict(binary, **{
        "cifar-10-batches-bin/batches.meta.txt": b"cat\ndog\n"})), "test", "2 class names, expected 10")
    return out


def test_malformed_cifar_cli(tmp_path, capsys):
    """Every malformed archive: one line on stderr naming the file, exit status 2, nothing written."""
    cases = _malformed(tmp_path)
    for name, (tar, split, text) in cases.items():
        before = sorted(p.name for p in tmp_path.iterdir())
        for dest in (tmp_path / "out", tmp_path / "out.zip"):
            with pytest.raises(SystemExit) as e:
                main(["dataset", "convert", "--source", str(tar), "--split", split, "--dest", str(dest)])
            assert e.value.code == 2, name
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and text in err and tar.name in err, (name, err)
            assert sorted(p.name for p in tmp_path.iterdir()) == before, name   # no dest, no temporary files


def _sparse_header(name: str, realsize: int) -> bytes:
    """A GNU sparse ('S') tar header that stores no data but expands to `realsize` bytes of zeros:
    a few hundred bytes on disk whose header declares a member of any size."""
    info = tarfile.TarInfo(name)
    info.size, info.type = 0, tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:398] = b"%011o\0" % realsize    # one sparse entry: offset realsize, 0 bytes
    buf[398:410] = b"%011o\0" % 0
    buf[483:495] = b"%011o\0" % realsize    # the expanded size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


@pytest.mark.parametrize("declared", [MAX_READ_BYTES + 1, 2 ** 31], ids=["just-over", "2GiB"])
def test_huge_member_refused_from_its_header(tmp_path, capsys, declared):
    """A tarball of a few KB whose test batch declares more bytes than a CIFAR split can hold is
    refused from the header, before the member is read (no allocation of its declared size)."""
    good, _ = cifar10_python(tmp_path / "good.tar.gz", per_batch=1)
    out = io.BytesIO()
    with tarfile.open(good) as t:
        for m in t.getmembers():
            if m.name.endswith("/test_batch"):
                out.write(_sparse_header(m.name, declared))
                continue
            data = t.extractfile(m).read()
            out.write(m.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512))
    bomb = tmp_path / "cifar-10-python.tar"
    bomb.write_bytes(out.getvalue() + b"\0" * 1024)
    assert bomb.stat().st_size < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"test_batch declares {declared} bytes.*download it again"):
            read_cifar(bomb, "test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20, peak
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        main(["dataset", "convert", "--source", str(bomb), "--split", "test", "--dest", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--source" in err and f"declares {declared} bytes" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_members_read_are_bounded_together(tmp_path):
    """The train split's five batches count together: each under the bound, too many bytes in all."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good, _ = cifar10_python(tmp_path / "good.tar.gz", per_batch=1)
    with tarfile.open(good) as t:
        for m in t.getmembers():
            (folder / Path(m.name).name).write_bytes(t.extractfile(m).read())
    for i in range(1, 6):   # sparse files: 60 MiB each on paper, nothing on disk
        with open(folder / f"data_batch_{i}", "r+b") as f:
            f.truncate(60 * 2 ** 20)
    with pytest.raises(ValueError, match=r"data_batch_5 \(62914560 bytes\) brings the members read to"):
        read_cifar(folder, "train")
