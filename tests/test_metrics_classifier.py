"""edm2.metrics.classifier: a small classifier of your own as the detector of
fd_classifier and of class consistency, on a synthetic three-class dataset
whose classes a CNN separates easily (a bright horizontal bar, a vertical
bar, or both, anywhere in the image)."""
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

from edm2.cli import main
from edm2.encoders import StandardRGBEncoder
from edm2.io.snapshot import make_meta, save_snapshot
from edm2.metrics import load_detector, reference_stats
from edm2.metrics.classifier import class_consistency, classifier_scores, evaluate_classifier, train_classifier
from edm2.metrics.detectors import CLASSIFIER_FILE, ClassifierDetector, load_classifier
from edm2.nn import build_network
from edm2.presets import get_preset
from edm2.utils.fileio import png_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 16
SMALL = dict(widths=(8, 16, 16), feature_dim=16)


def bars(n, seed, res=RES):
    """n grey images [n, 1, res, res] and labels: 0 a horizontal bar, 1 a vertical bar, 2 both."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(60, 20, [n, 1, res, res])
    for i, k in enumerate(labels):
        r, c = rng.integers(2, res - 4, 2)
        if k in (0, 2):
            x[i, 0, r:r + 2, 2:res - 2] += 150
        if k in (1, 2):
            x[i, 0, 2:res - 2, c:c + 2] += 150
    return np.clip(x, 0, 255).astype(np.uint8), labels


def write_zip(path, images, labels=None):
    names = [f"00000/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            z.writestr(name, png_bytes(img[0]))
        meta = {"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)],
                "class_names": ["horizontal", "vertical", "cross"]}
        z.writestr("dataset.json", json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("classifier")
    train = write_zip(d / "train.zip", *bars(240, 0))
    val = write_zip(d / "val.zip", *bars(90, 1))
    info = train_classifier(train, d / CLASSIFIER_FILE, val=val, epochs=4, batch_size=32, lr=1e-2,
                            progress=False, **SMALL)
    return {"dir": d, "train": train, "val": val, "info": info}


def test_trained_classifier_separates_the_classes_and_records_its_accuracy(trained):
    info = trained["info"]
    assert info["accuracy"] >= 0.9          # three easy classes; chance is 1/3
    assert info["train_images"] == 240 and info["val_images"] == 90
    det = load_classifier(trained["dir"] / CLASSIFIER_FILE)
    assert det.meta["accuracy"] == info["accuracy"]
    assert det.meta["class_names"] == ["horizontal", "vertical", "cross"]
    images, labels = bars(90, 1)
    assert evaluate_classifier(det, torch.from_numpy(images), torch.from_numpy(labels)) == info["accuracy"]
    # An untrained network of the same architecture is near chance.
    torch.manual_seed(0)
    fresh = ClassifierDetector(type(det.classifier)(det.classifier.config))
    assert evaluate_classifier(fresh, torch.from_numpy(images), torch.from_numpy(labels)) < 0.7


def test_detector_of_metric_fd_classifier_reads_the_folder(trained, tmp_path):
    det = load_detector("fd_classifier", trained["dir"])
    images = torch.from_numpy(bars(8, 2)[0])
    feats = det(images)
    assert feats.shape == (8, 16) and feats.dtype == torch.float32
    # Grey repeated to RGB gives the same features as grey (the mean over channels is exact).
    torch.testing.assert_close(det(images.repeat(1, 3, 1, 1)), feats)
    # A larger image is resized to the classifier's resolution.
    assert det(torch.nn.functional.interpolate(images.float(), size=32).to(torch.uint8)).shape == (8, 16)
    with pytest.raises(FileNotFoundError, match="edm2 metrics classifier"):
        load_detector("fd_classifier", tmp_path)


def test_class_consistency_counts_agreement(trained):
    det = load_classifier(trained["dir"] / CLASSIFIER_FILE)
    images, labels = bars(60, 3)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    right = class_consistency(det, images, labels)
    wrong = class_consistency(det, images, (labels + 1) % 3)
    assert right >= 0.9 and wrong <= 0.1
    assert right == pytest.approx(float((det.predict(images) == labels).double().mean()))


def test_scores_of_a_conditional_network_in_one_pass(trained):
    d = trained["dir"]
    ref = reference_stats(trained["val"], d / "ref.npz", metrics=["fd_classifier"], detector_dir=d, workers=0,
                          progress=False)
    assert ref["fd_classifier"].num == 90
    preset = get_preset("tiny")
    kw = dict(preset.net_kwargs(label_dim=3))
    torch.manual_seed(0)
    net = build_network("G", **kw)
    meta = make_meta(kw, 0, None, StandardRGBEncoder().to_meta(), {"resolution": RES, "channels": 1, "label_dim": 3})
    save_snapshot(d / "net.safetensors", net, meta)
    from edm2.metrics import load_ref
    det = load_classifier(d / CLASSIFIER_FILE)
    scores = classifier_scores(d / "net.safetensors", load_ref(d / "ref.npz"), det, num=18, batch_size=6,
                               progress=False, num_steps=2)
    assert np.isfinite(scores["fd_classifier"]) and scores["fd_classifier"] > 0
    assert scores["consistency"] is not None and 0 <= scores["consistency"] <= 1
    assert scores["consistency"] * 18 == pytest.approx(round(scores["consistency"] * 18))
    # Guided by itself, D + (w - 1) (D - D) = D: the same scores; guided by another network, other ones.
    ref = load_ref(d / "ref.npz")
    same = classifier_scores(d / "net.safetensors", ref, det, num=18, batch_size=6, progress=False, num_steps=2,
                             gnet=d / "net.safetensors", guidance=2.0)
    assert same["fd_classifier"] == pytest.approx(scores["fd_classifier"], rel=1e-4)
    assert same["consistency"] == scores["consistency"]
    guide = build_network("G", **kw)
    with torch.no_grad():           # a fresh network outputs c_skip x whatever its seed (zero output gain)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_snapshot(d / "guide.safetensors", guide, meta)
    guided = classifier_scores(d / "net.safetensors", ref, det, num=18, batch_size=6, progress=False, num_steps=2,
                               gnet=d / "guide.safetensors", guidance=2.0)
    assert abs(guided["fd_classifier"] - scores["fd_classifier"]) > 1e-3


def test_bad_inputs_are_refused_and_nothing_is_overwritten(trained, tmp_path):
    out = trained["dir"] / CLASSIFIER_FILE
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_classifier(trained["train"], out, progress=False, **SMALL)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    unlabelled = write_zip(tmp_path / "unlabelled.zip", bars(10, 4)[0])
    with pytest.raises(ValueError, match="no class labels"):
        train_classifier(unlabelled, tmp_path / "c.safetensors", progress=False)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_classifier(junk)
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_trains_and_prints_the_accuracy(trained, tmp_path, capsys):
    out = tmp_path / "clf.safetensors"
    assert main(["metrics", "classifier", "--data", str(trained["train"]), "--out", str(out), "--epochs", "1",
                 "--batch", "32"]) == 0
    printed = capsys.readouterr().out
    assert "held-out images" in printed and str(out) in printed
    acc = float(printed.split("accuracy ")[1].split()[0])
    assert acc == load_classifier(out).meta["accuracy"]
    with pytest.raises(SystemExit) as e:
        main(["metrics", "classifier", "--data", str(trained["train"]), "--out", str(out)])
    assert e.value.code == 2
