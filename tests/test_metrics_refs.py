"""Reference statistics record their detector and resolution, and every reader
checks them: a Fréchet distance between features of two different
classifiers, or of images of two resolutions, is refused, not reported."""
import hashlib

import pytest
import torch

from edm2.metrics import calc_metrics, load_ref, reference_stats
from edm2.metrics.detectors import CLASSIFIER_FILE, Classifier, ClassifierConfig, save_classifier
from edm2.metrics.evaluate import save_ref
from edm2.metrics.stats import FeatureStats
from edm2.utils.errors import EDM2Error
from helpers.cli import assert_refused

pytestmark = [pytest.mark.filterwarnings("ignore:only .* images for"), pytest.mark.usefixtures("one_thread")]
SMALL = ClassifierConfig(img_channels=1, resolution=16, num_classes=3, widths=(4, 4, 4), feature_dim=4)


def _classifier_dir(path, seed):
    torch.manual_seed(seed)
    path.mkdir()
    save_classifier(path / CLASSIFIER_FILE, Classifier(SMALL), {})
    return path


@pytest.fixture(scope="module")
def refs(tmp_path_factory, image_dataset):
    d = tmp_path_factory.mktemp("refs")
    a, b = _classifier_dir(d / "a", 0), _classifier_dir(d / "b", 1)
    stats = reference_stats(image_dataset, d / "ref.npz", metrics=["fd_classifier"], detector_dir=a, workers=0,
                            progress=False)
    return {"dir": d, "a": a, "b": b, "ref": d / "ref.npz", "data": image_dataset, "stats": stats}


def test_ref_records_classifier_hash_and_resolution(refs):
    ref = load_ref(refs["ref"])["fd_classifier"]
    assert ref["detector"] == {"name": "fd_classifier",
                               "sha256": hashlib.sha256((refs["a"] / CLASSIFIER_FILE).read_bytes()).hexdigest()}
    assert ref["resolution"] == 16  # the 16x16 images of image_dataset
    # The same classifier scores against it.
    value = calc_metrics(refs["data"], refs["ref"], num=24, workers=0, detector_dir=refs["a"], progress=False)
    assert value["fd_classifier"] == pytest.approx(0, abs=1e-6)


def test_other_classifier_refused(refs, tmp_path):
    jsonl = tmp_path / "m.jsonl"
    assert_refused(["metrics", "calc", "--images", refs["data"], "--ref", refs["ref"], "--num", "24",
                    "--workers", "0", "--detector-dir", refs["b"], "--jsonl", jsonl],
                   watch=[tmp_path, refs["dir"]],
                   match=[f"--ref {refs['ref']}: fd_classifier statistics made with classifier",
                          "but scoring with classifier", "edm2 metrics ref"])
    assert not jsonl.exists()


def test_classifier_ref_without_record_refused(refs, tmp_path):
    old = tmp_path / "old.npz"
    save_ref(old, refs["stats"], source=str(refs["data"]))  # no detector record, as files of earlier versions
    with pytest.raises(EDM2Error, match="do not record which classifier"):
        calc_metrics(refs["data"], old, num=24, workers=0, detector_dir=refs["a"], progress=False)
    assert_refused(["metrics", "calc", "--images", refs["data"], "--ref", old, "--num", "24", "--workers", "0",
                    "--detector-dir", refs["a"], "--jsonl", tmp_path / "m.jsonl"],
                   watch=[tmp_path], match=[f"--ref {old}: its fd_classifier statistics do not record",
                                            f"edm2 metrics ref --data {refs['data']} --dest {tmp_path / 'old-new.npz'}",
                                            "--metrics fd_classifier"])


def test_other_resolution_refused(refs, tmp_path):
    s = FeatureStats(16)
    s.append(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)))
    ref = tmp_path / "r64.npz"
    save_ref(ref, {"fd_tiny": s}, source="x", resolution=64)
    assert load_ref(ref)["fd_tiny"]["resolution"] == 64
    assert_refused(["metrics", "calc", "--images", refs["data"], "--ref", ref, "--num", "24", "--workers", "0",
                    "--jsonl", tmp_path / "m.jsonl"], watch=[tmp_path],
                   match=[f"--ref {ref}: made from 64x64 images but the images in {refs['data']} are 16x16"])


def test_sweep_and_gen_refuse_another_classifier_before_any_work(refs, tmp_path, tiny_snapshot):
    from helpers import write_ema_run

    run = write_ema_run(tmp_path / "run", times=(64, 128), step=0.3)
    assert_refused(["sweep", "--rundir", run, "--std", "0.06", "--ref", refs["ref"], "--num", "6",
                    "--detector-dir", refs["b"], "--outdir", tmp_path / "sweep"],
                   watch=[tmp_path], match=["made with classifier", "but scoring with classifier"])
    assert not (tmp_path / "sweep").exists()
    assert_refused(["metrics", "gen", "--net", tiny_snapshot, "--ref", refs["ref"], "--num", "6",
                    "--detector-dir", refs["b"], "--jsonl", tmp_path / "m.jsonl"],
                   watch=[tmp_path], match=["made with classifier", "but scoring with classifier"])
