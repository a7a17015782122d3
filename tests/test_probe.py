import csv

import numpy as np
import pytest
import torch

from edm2.analysis.dynamics import bucket_of, find_blocks
from edm2.analysis.probe import (
    CSV_FIELDS,
    default_layer,
    fit_linear_classifier,
    linear_probe,
    list_layers,
    probe_sweep,
    write_probe_csv,
)
from edm2.cli import main
from edm2.data import convert_dataset
from edm2.nn import Precond
from edm2.presets import get_preset
from helpers import write_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(label_dim=0):
    torch.manual_seed(0)
    return Precond(**get_preset("tiny").net_kwargs(label_dim))


def _dataset(path, n=80, separable=True, seed=0):
    """Grey 16x16 images, two classes: dark vs bright (separable) or the same distribution (not)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = rng.integers(0, 60, size=(n, 16, 16))
    images = base + (150 * labels[:, None, None] if separable else 0)
    np.savez(path.with_suffix(".npz"), images=images.astype(np.uint8), labels=labels)
    convert_dataset(path.with_suffix(".npz"), path, progress=False, workers=1)
    return path


def test_layer_names_and_default():
    net = _net()
    names = list_layers(net)
    assert names[:2] == ["enc.16x16_conv", "enc.16x16_block0"]
    dec = [n for n in names if n.startswith("dec.")]
    assert dec == ["dec.8x8_in0", "dec.8x8_in1", "dec.8x8_block0", "dec.8x8_block1", "dec.16x16_up",
                   "dec.16x16_block0", "dec.16x16_block1"]
    assert default_layer(net) == "dec.8x8_block1"
    # One block finder for the probe and the dynamics buckets.
    assert names == list(find_blocks(net))
    assert [bucket_of(n) for n in (names[0], names[-1], "dec.8x8_in0.conv_res0")] == ["enc-16x16", "dec-16x16",
                                                                                      "dec-8x8"]


def test_classifier_on_separable_and_random_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=g) * 3
    x = centres[y] + torch.randn(300, 16, generator=g)
    predict = fit_linear_classifier(x[:200], y[:200], 3)
    assert float((predict(x[200:]) == y[200:]).double().mean()) == 1.0
    # Labels unrelated to the features: held-out accuracy near chance (1/3).
    noise = torch.randn(300, 16, generator=g)
    predict = fit_linear_classifier(noise[:200], y[:200], 3)
    assert float((predict(noise[200:]) == y[200:]).double().mean()) < 0.55


def test_probe_on_tiny_network(tmp_path, tiny_snapshot):
    snap = tiny_snapshot
    good = _dataset(tmp_path / "good")
    r = linear_probe(snap, good, sigma=0.05, holdout=0.25)
    assert r.layer == "dec.8x8_block1" and r.n_test == 20 and r.n_train == 60 and r.num_classes == 2
    assert r.channels == 32 and r.accuracy == 1.0
    bad = _dataset(tmp_path / "bad", separable=False)
    r = linear_probe(snap, bad, sigma=0.05, holdout=0.5, layer="8x8_in0")
    assert r.layer == "dec.8x8_in0" and r.accuracy < 0.8
    with pytest.raises(ValueError, match=r"layers='nope': no such block; allowed: enc.16x16_conv, .*dec.16x16_block1"):
        linear_probe(snap, good, sigma=0.05, layer="nope")
    cond = write_snapshot(tmp_path / "cond.safetensors", label_dim=2)
    with pytest.raises(ValueError, match="class-conditional"):
        linear_probe(cond, good, sigma=0.05)


def test_sweep_csv(tmp_path, tiny_snapshot):
    snap = tiny_snapshot
    train = _dataset(tmp_path / "train", n=40)
    test = _dataset(tmp_path / "test", n=20, seed=1)
    results = probe_sweep(snap, train, [0.05, 5.0], ["dec.8x8_block1", "16x16_block0"], test_data=test)
    write_probe_csv(results, tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS
    assert [(r["sigma"], r["layer"]) for r in rows] == [("0.05", "dec.8x8_block1"), ("0.05", "dec.16x16_block0"),
                                                       ("5.0", "dec.8x8_block1"), ("5.0", "dec.16x16_block0")]
    assert all(r["n_train"] == "40" and r["n_test"] == "20" for r in rows)
    assert float(rows[0]["accuracy"]) == 1.0


def test_cli(tmp_path, tiny_snapshot, capsys):
    snap = tiny_snapshot
    data = _dataset(tmp_path / "d", n=40)
    main(["probe", "--net", str(snap), "--list-layers", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dec.8x8_block1   (default)" in out
    main(["probe", "--net", str(snap), "--data", str(data), "--sigma", "0.05,1.0", "--sweep", "--layer", "all",
          "--csv", str(tmp_path / "s.csv"), "--device", "cpu"])
    with open(tmp_path / "s.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 7
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["probe", "--net", str(snap), "--data", str(data), "--sigma", "0.05", "--layer", "dec.99x99_x",
              "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layer 'dec.99x99_x': no such block; allowed: enc.16x16_conv" in err


def test_cli_refuses_bad_counts_and_existing_csv(tmp_path, tiny_snapshot):
    from helpers.cli import assert_refused

    data = _dataset(tmp_path / "d", n=40)
    out = tmp_path / "s.csv"
    out.write_text("mine\n")
    base = ["probe", "--net", tiny_snapshot, "--data", data, "--device", "cpu"]
    for extra, needle in [(["--sigma", "0.05", "--batch", "0"], "--batch 0: must be a whole number >= 1"),
                          (["--sigma", "0.05", "--max-images", "0"], "--max-images 0: must be"),
                          (["--sigma", "0.05", "--max-images", "-5"], "--max-images -5: must be"),
                          (["--sigma", "0.05", "--seed", "-1"], "--seed -1: must be"),
                          (["--sigma", "inf"], "finite noise levels"),
                          (["--sigma", "nan"], "finite noise levels"),
                          (["--sigma", "0.05", "--holdout", "nan"], "--holdout nan: must be between 0 and 1"),
                          (["--sigma", "0.05", "--csv", out], f"--csv {out}: already exists")]:
        assert_refused(base + extra, watch=[tmp_path], match=[needle])
    main([str(a) for a in base + ["--sigma", "0.05", "--csv", out, "--overwrite"]])
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 1


def test_cli_default_data_is_the_builtin(tmp_path, tiny_snapshot, capsys, monkeypatch):
    """Without --data the probe uses the built-in dataset (that of `edm2 train` without --data)."""
    import edm2.cli.probe as cli_probe

    snap = tiny_snapshot
    data = _dataset(tmp_path / "builtin", n=40)
    monkeypatch.setattr(cli_probe, "builtin_dataset_path", lambda progress=False: data)
    main(["probe", "--net", str(snap), "--sigma", "0.05", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dec.8x8_block1" in out and "accuracy 1.0000" in out and "32 train / 8 test images, 2 classes" in out
