"""Bad input of every kind is refused with one line and a non-zero exit, and
nothing on disk changes (every file under the test's folders is hashed before
and after). One parametrised case per kind of mistake; see docs/reliability.md."""
import contextlib
import fractions
import json
import os
import shutil

import numpy as np
import pytest
import torch

from edm2.encoders import StandardRGBEncoder
from edm2.io.snapshot import SnapshotStreamWriter, make_meta, save_snapshot, snapshot_name
from edm2.metrics.detectors import INCEPTION_FILE
from edm2.metrics.evaluate import append_jsonl, check_metric_value, distances
from edm2.metrics.stats import FeatureStats
from edm2.nn import Precond
from edm2.presets import get_preset
from edm2.utils.fileio import HOLDER_NAME, LOCK_NAME
from helpers import write_ema_run, write_images, write_snapshot
from helpers.cli import assert_refused, fill_disk, hold_lock, run_cli, small_tmpfs, tree_hashes

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:only 6 images for 16-d features")]

GEN = ["--steps", "2", "--seeds", "0-1", "--batch", "2", "--device", "cpu"]


def tiny_net(seed, label_dim=3):
    torch.manual_seed(seed)
    kw = dict(get_preset("tiny").net_kwargs(label_dim), img_resolution=16, img_channels=1)
    return kw, Precond(**kw)


@pytest.fixture(scope="module")
def w(tmp_path_factory, ema_run):
    """Shared inputs; tests copy what they modify."""
    root = tmp_path_factory.mktemp("refusals")
    write_snapshot(root / "netA.safetensors", seed=0)
    write_snapshot(root / "netB.safetensors", seed=1)
    code, _, err = run_cli(["generate", "--net", root / "netA.safetensors", "--outdir", root / "imgsA", *GEN])
    assert code == 0, err
    write_images(root / "plain")
    (root / "bad.json").write_text("{not json")
    (root / "empty").mkdir()
    (root / "empty.safetensors").write_bytes(b"")
    # Two runs with the same seed and architecture but other settings (an lr sweep), copied into one folder.
    shutil.copytree(ema_run, root / "run1")   # run id aaaa1111
    write_ema_run(root / "run2", run_id="bbbb2222", times=(64, 128, 192, 256))
    mixed = shutil.copytree(root / "run1", root / "mixed")
    shutil.copy(root / "run2" / snapshot_name(256, 0.10), mixed)
    # Older snapshots (no run_id): told apart by run folder.
    write_ema_run(root / "old1", run_id=None)
    old = shutil.copytree(root / "old1", root / "oldmixed")
    write_ema_run(root / "old2", run_id=None, times=(256,))
    shutil.copy(root / "old2" / snapshot_name(256, 0.05), old)
    # Reference statistics of the stand-in detector.
    code, _, err = run_cli(["metrics", "ref", "--data", root / "plain", "--dest", root / "ref.npz", "--metrics",
                            "fd_tiny", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    return root


def _labelled(tmp, labels, class_names=None):
    data = write_images(tmp / "data", n=len(labels))
    meta = {"labels": [[f"{i:03d}.png", c] for i, c in enumerate(labels)]}
    if class_names is not None:
        meta["class_names"] = class_names
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def _ref(w, tmp, change):
    with np.load(w / "ref.npz") as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(tmp / "ref.npz", **arrays)
    return tmp / "ref.npz"


def _nan_mu(a):
    a["fd_tiny_mu"] = a["fd_tiny_mu"].copy()
    a["fd_tiny_mu"][3] = np.nan


def _asym(a):
    s = a["fd_tiny_sigma"].copy()
    s[0, 1] += 1.0
    a["fd_tiny_sigma"] = s


def _negative(a):
    # Symmetric, finite, but with a large negative eigenvalue: FID came out negative before.
    a["fd_tiny_sigma"] = a["fd_tiny_sigma"] - 10 * np.eye(len(a["fd_tiny_mu"]))


def _wrong_dims(a):
    a["fd_tiny_sigma"] = a["fd_tiny_sigma"][:-1, :-1]


def _object_array(a):
    a["fd_tiny_mu"] = np.array([object()] * 16, dtype=object)


def _pickled_fid_weights(tmp):
    """A torch pickle holding a Python object where FID's weights belong: torch's own
    message advises weights_only=False, which must not reach the user."""
    folder = tmp / "detectors"
    folder.mkdir()
    torch.save({"weight": fractions.Fraction(1, 3)}, folder / INCEPTION_FILE)
    return folder


_HOLDERS = contextlib.ExitStack()   # lock-holding processes of the current case


@pytest.fixture(autouse=True)
def _end_lock_holders():
    yield
    _HOLDERS.close()


def _locked_by_another_process(folder):
    """`folder` locked by a live process (RunLock), until the end of the test."""
    _HOLDERS.enter_context(hold_lock(folder))


def _training_run(w, folder):
    """A copy of run1 with what `edm2 train` adds around its snapshots: config.json, the log, a checkpoint."""
    shutil.copytree(w / "run1", folder)
    (folder / "config.json").write_text("{}")
    (folder / "stats.jsonl").write_text("{}\n")
    (folder / "checkpoint-000000000192.pt").write_bytes(b"state")
    return folder


def _truncated_zip(w, tmp):
    """An image dataset zip cut in half, as an interrupted copy leaves it."""
    code, _, err = run_cli(["dataset", "convert", "--source", w / "plain", "--dest", tmp / "whole.zip"])
    assert code == 0, err
    data = (tmp / "whole.zip").read_bytes()
    (tmp / "cut.zip").write_bytes(data[:len(data) // 2])
    (tmp / "whole.zip").unlink()
    return tmp / "cut.zip"


# (id, function (w, tmp) -> (argv, strings the message must contain))
CASES = [
    # --- generation: settings, mixing, locks
    ("generate-S-noise-nan", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                            "--S-noise", "nan", *GEN], ["--S-noise nan", "finite"])),
    ("generate-S-churn-negative", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                                 "--S-churn", "-1", *GEN], ["--S-churn -1"])),
    ("generate-sigma-min-nan", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                              "--sigma-min", "nan", *GEN], ["--sigma-min nan"])),
    ("generate-sigma-max-inf", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                              "--sigma-max", "inf", *GEN], ["--sigma-max inf"])),
    ("generate-sigma-min-above-max", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                                    "--sigma-min", "90", *GEN], ["sigma_min < sigma_max"])),
    ("generate-rho-zero", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                         "--rho", "0", *GEN], ["--rho 0"])),
    ("generate-S-max-nan", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", t / "o",
                                          "--S-max", "nan", *GEN], ["--S-max nan"])),
    ("generate-guidance-inf", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--gnet",
                                             w / "netB.safetensors", "--guidance", "inf", "--outdir", t / "o", *GEN],
                                            ["--guidance inf"])),
    ("generate-other-net-into-folder", lambda w, t: (["generate", "--net", w / "netB.safetensors", "--outdir",
                                                      w / "imgsA", *GEN], ["another network", "net (weights differ)",
                                                                           "another --outdir"])),
    ("generate-other-sampler-into-folder", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir",
                                                          w / "imgsA", *GEN[:2], "--seeds", "0-3", "--S-churn", "5"],
                                                         ["another network or settings", "--S-churn 0.0 -> 5.0"])),
    ("generate-guidance-interval-reversed", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--gnet",
                                                           w / "netB.safetensors", "--guidance", "2",
                                                           "--guidance-interval", "3,1", "--outdir", t / "o", *GEN],
                                                          ["--guidance-interval 3,1", "LO <= HI"])),
    ("generate-guidance-interval-unguided", lambda w, t: (["generate", "--net", w / "netA.safetensors",
                                                           "--guidance-interval", "0.28,1.61", "--outdir", t / "o",
                                                           *GEN], ["--guidance-interval 0.28,1.61", "--guidance"])),
    ("generate-dpm-with-churn", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--solver", "dpm++2m",
                                               "--S-churn", "1", "--outdir", t / "o", *GEN],
                                              ["--S-churn 1", "dpm++2m", "deterministic"])),
    ("generate-other-solver-into-folder", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir",
                                                         w / "imgsA", *GEN, "--solver", "euler"],
                                                        ["another network or settings", "--solver heun -> euler"])),
    ("generate-other-class-into-folder", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir",
                                                        w / "imgsA", *GEN, "--class", "1"], ["class"])),
    ("generate-seeds-per-class-into-folder", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir",
                                                            w / "imgsA", *GEN, "--seeds-per-class", "1"],
                                                           ["another network or settings", "class"])),
    ("generate-into-unrecorded-pngs", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir",
                                                     w / "plain", *GEN], ["no generate.json", "PNG"])),
    ("generate-manifest-malformed", lambda w, t: (
        [shutil.copytree(w / "imgsA", t / "o"), (t / "o" / "generate.json").write_text("{oops"),
         ["generate", "--net", w / "netA.safetensors", "--outdir", t / "o", *GEN]][-1],
        ["generate.json", "unreadable"])),
    ("generate-locked-elsewhere", lambda w, t: (
        [_locked_by_another_process(t / "o"),
         ["generate", "--net", w / "netA.safetensors", "--outdir", t / "o", *GEN]][-1],
        ["is in use by process", LOCK_NAME, "choose another --outdir"])),
    # --- post-hoc EMA
    ("phema-two-runs-one-folder", lambda w, t: (["phema", "--rundir", w / "mixed", "--outdir", t / "o", "--std",
                                                 "0.07"], ["different training runs", "aaaa1111"])),
    ("phema-two-old-runs-one-folder", lambda w, t: (["phema", "--rundir", w / "oldmixed", "--outdir", t / "o",
                                                     "--std", "0.07"], ["different training runs"])),
    ("phema-std-nan", lambda w, t: (["phema", "--rundir", w / "run1", "--outdir", t / "o", "--std", "0.05,nan"],
                                    ["--std"])),
    ("phema-locked-elsewhere", lambda w, t: (
        [_locked_by_another_process(t / "o"),
         ["phema", "--rundir", w / "run1", "--outdir", t / "o", "--std", "0.07"]][-1],
        ["is in use by process", LOCK_NAME])),
    ("phema-foreign-file-in-the-way", lambda w, t: (
        [(t / "o").mkdir(), (t / "o" / snapshot_name(192, 0.07)).write_bytes(b"mine"),
         ["phema", "--rundir", w / "run1", "--outdir", t / "o", "--std", "0.07"]][-1], ["--overwrite"])),
    ("phema-empty-folder", lambda w, t: (["phema", "--rundir", w / "empty", "--outdir", t / "o", "--std", "0.07"],
                                         ["no EMA snapshots"])),
    # --- sweep / metrics options
    ("sweep-guidance-nan", lambda w, t: (["sweep", "--rundir", w / "run1", "--std", "0.07", "--ref", w / "ref.npz",
                                          "--metrics", "fd_tiny", "--guidance", "1,nan"], ["--guidance nan"])),
    ("metrics-gen-guidance-nan", lambda w, t: (["metrics", "gen", "--net", w / "netA.safetensors", "--ref",
                                                w / "ref.npz", "--guidance", "nan", "--jsonl", t / "m.jsonl"],
                                               ["--guidance nan"])),
    ("metrics-gen-steps-zero", lambda w, t: (["metrics", "gen", "--net", w / "netA.safetensors", "--ref",
                                              w / "ref.npz", "--steps", "0", "--jsonl", t / "m.jsonl"], ["--steps 0"])),
    # --- reference statistics
    ("ref-nan", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", _ref(w, t, _nan_mu), "--num", "6",
                               "--jsonl", t / "m.jsonl", "--device", "cpu"], ["NaN or infinite", "recompute"])),
    ("ref-not-symmetric", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", _ref(w, t, _asym),
                                         "--num", "6", "--jsonl", t / "m.jsonl"], ["not symmetric"])),
    ("ref-negative-eigenvalue", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref",
                                               _ref(w, t, _negative), "--num", "6", "--jsonl", t / "m.jsonl"],
                                              ["negative eigenvalue"])),
    ("ref-wrong-dimensions", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref",
                                            _ref(w, t, _wrong_dims), "--num", "6", "--jsonl", t / "m.jsonl"],
                                           ["[D] and [D, D]"])),
    ("ref-object-array", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref",
                                        _ref(w, t, _object_array), "--num", "6", "--jsonl", t / "m.jsonl"],
                                       ["unreadable statistics file"])),
    ("fid-weights-pickled", lambda w, t: (["metrics", "ref", "--data", w / "plain", "--dest", t / "ref.npz",
                                           "--metrics", "fid", "--detector-dir", _pickled_fid_weights(t),
                                           "--device", "cpu", "--workers", "0"],
                                          [INCEPTION_FILE, "never loads pickled Python objects"])),
    ("ref-malformed", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", w / "bad.json", "--num",
                                     "6", "--jsonl", t / "m.jsonl"], ["bad.json"])),
    # --- dataset labels
    ("labels-fraction", lambda w, t: (["dataset", "info", _labelled(t, [0, 1, 1.5, 0])],
                                      ["label 1.5", "not a class index"])),
    ("labels-huge", lambda w, t: (["dataset", "info", _labelled(t, [0, 1, 10 ** 9, 0])],
                                  ["class index 1000000000", "below 1000"])),
    ("labels-negative", lambda w, t: (["dataset", "info", _labelled(t, [0, -1, 1, 0])], ["label -1"])),
    ("labels-boolean", lambda w, t: (["dataset", "info", _labelled(t, [0, True, 1, 0])], ["label True"])),
    ("labels-mixed-kinds", lambda w, t: (["dataset", "info", _labelled(t, [0, [0.5, 0.5], 1, 0])], ["mixes"])),
    ("labels-beyond-class-names", lambda w, t: (["dataset", "info", _labelled(t, [0, 1, 2, 0], ["a", "b"])],
                                                ["class index 2", "2 class_names"])),
    ("labels-fraction-convert", lambda w, t: (["dataset", "convert", "--source", _labelled(t, [0, 1.5, 1, 0]),
                                               "--dest", t / "out"], ["label 1.5"])),
    ("labels-huge-convert", lambda w, t: (["dataset", "convert", "--source", _labelled(t, [0, 10 ** 9, 1, 0]),
                                           "--dest", t / "out.zip"], ["class index 1000000000"])),
    ("dataset-json-malformed", lambda w, t: (
        [write_images(t / "d"), (t / "d" / "dataset.json").write_text("[1,"),
         ["dataset", "info", t / "d"]][-1], ["dataset.json", "not valid JSON"])),
    # --- missing files, wrong types, empty folders
    ("generate-missing-net", lambda w, t: (["generate", "--net", t / "nope.safetensors", "--outdir", t / "o", *GEN],
                                           ["no such snapshot"])),
    ("generate-empty-file-as-net", lambda w, t: (["generate", "--net", w / "empty.safetensors", "--outdir", t / "o",
                                                  *GEN], ["unreadable or truncated snapshot"])),
    ("generate-json-as-net", lambda w, t: (["generate", "--net", w / "bad.json", "--outdir", t / "o", *GEN],
                                           ["bad.json"])),
    ("generate-empty-folder-as-net", lambda w, t: (["generate", "--net", w / "empty", "--outdir", t / "o", *GEN],
                                                   ["holds no snapshot"])),
    ("generate-outdir-is-file", lambda w, t: (["generate", "--net", w / "netA.safetensors", "--outdir", w / "bad.json",
                                               *GEN], ["not a folder"])),
    ("dataset-info-missing", lambda w, t: (["dataset", "info", t / "nope"], ["does not exist"])),
    ("dataset-info-empty-folder", lambda w, t: (["dataset", "info", w / "empty"], ["holds no images"])),
    ("dataset-convert-dest-under-a-file", lambda w, t: (["dataset", "convert", "--source", w / "plain", "--dest",
                                                         w / "bad.json" / "out"], ["bad.json"])),
    ("dataset-convert-existing-dest", lambda w, t: (["dataset", "convert", "--source", w / "plain", "--dest",
                                                     w / "imgsA"], ["already exists", "--overwrite"])),
    ("metrics-calc-missing-ref", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", t / "no.npz",
                                                "--jsonl", t / "m.jsonl"], ["no such file"])),
    # --- the library names Python arguments; each command shows its own flags
    ("dataset-convert-transform-without-resolution", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--transform", "pad"],
        ["--transform pad needs --resolution"])),
    ("dataset-convert-resolution-zero", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--resolution", "0"],
        ["--resolution 0: must be >= 1"])),
    ("dataset-convert-max-images-zero", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--max-images", "0"],
        ["--max-images 0: must be >= 1"])),
    ("dataset-convert-max-images-text", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--max-images", "many"],
        ["--max-images 'many': expected a number of images"])),
    ("dataset-convert-mixed-levels", lambda w, t: (
        [shutil.copytree(w / "plain", t / "src"), write_images(t / "src" / "cls", n=2),
         ["dataset", "convert", "--source", t / "src", "--dest", t / "out"]][-1],
        ["--source " + str(t / "src"), "pass --no-labels"])),
    ("dataset-convert-split-of-folder", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--split", "test"],
        ["--split test:", "drop --split"])),
    ("dataset-convert-max-images-overflow", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--max-images", "1e999"],
        ["--max-images '1e999': too large", "2^63 - 1"])),
    ("dataset-convert-max-images-2-63", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--max-images", str(2 ** 63)],
        [f"--max-images '{2 ** 63}': too large"])),
    ("dataset-convert-workers-negative", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", t / "out", "--workers", "-1"],
        ["--workers -1: must be a whole number >= 0"])),
    # --- no command replaces a folder holding its input or a training run, not even with --overwrite
    ("dataset-convert-dest-holds-source", lambda w, t: (
        [shutil.copytree(w / "plain", t / "d" / "src"),
         ["dataset", "convert", "--source", t / "d" / "src", "--dest", t / "d", "--overwrite"]][-1],
        [f"--dest {t / 'd'}: holds the input --source {t / 'd' / 'src'}", "choose another --dest"])),
    ("dataset-convert-dest-is-source", lambda w, t: (
        [shutil.copytree(w / "plain", t / "src"),
         ["dataset", "convert", "--source", t / "src", "--dest", t / "src", "--overwrite"]][-1],
        [f"--dest {t / 'src'}: is the input --source"])),
    ("dataset-convert-dest-inside-source", lambda w, t: (
        [shutil.copytree(w / "plain", t / "src"), write_images(t / "src" / "old", n=1),
         ["dataset", "convert", "--source", t / "src", "--dest", t / "src" / "old", "--overwrite",
          "--no-labels"]][-1],
        ["lies inside --source", "would delete part of the source"])),
    ("dataset-convert-dest-is-a-run", lambda w, t: (
        ["dataset", "convert", "--source", w / "plain", "--dest", _training_run(w, t / "run"), "--overwrite"],
        [f"--dest {t / 'run'}: is an edm2 training run folder"])),
    ("dataset-info-truncated-zip", lambda w, t: (["dataset", "info", _truncated_zip(w, t)],
                                                 ["cut.zip: a truncated or corrupt zip file",
                                                  "re-create it with `edm2 dataset convert`"])),
    ("dataset-convert-truncated-zip", lambda w, t: (
        ["dataset", "convert", "--source", _truncated_zip(w, t), "--dest", t / "out"],
        [f"--source {t / 'cut.zip'}: a truncated or corrupt zip file"])),
    ("export-hf-outdir-is-the-run", lambda w, t: (
        ["export", _training_run(w, t / "run"), "--format", "hf", "--outdir", t / "run", "--overwrite"],
        [f"--outdir {t / 'run'}: is the input {t / 'run'}", "choose another --outdir"])),
    ("export-hf-outdir-holds-the-run", lambda w, t: (
        ["export", _training_run(w, t / "runs" / "r1"), "--format", "hf", "--outdir", t / "runs", "--overwrite"],
        [f"--outdir {t / 'runs'}: holds the input"])),
    ("export-hf-outdir-holds-another-run", lambda w, t: (
        [_training_run(w, t / "o" / "r2"),
         ["export", w / "netA.safetensors", "--format", "hf", "--outdir", t / "o", "--overwrite"]][-1],
        [f"--outdir {t / 'o'}: holds an edm2 training run ({t / 'o' / 'r2'})"])),
    ("export-hf-outdir-holds-the-snapshot", lambda w, t: (
        [(t / "o").mkdir(), shutil.copy(w / "netA.safetensors", t / "o" / "mine.safetensors"),
         ["export", t / "o" / "mine.safetensors", "--format", "hf", "--outdir", t / "o", "--overwrite"]][-1],
        [f"--outdir {t / 'o'}: holds the input {t / 'o' / 'mine.safetensors'}"])),
    ("export-diffusers-outdir-is-the-run", lambda w, t: (
        ["export", _training_run(w, t / "run"), "--format", "diffusers", "--outdir", t / "run", "--overwrite"],
        [f"--outdir {t / 'run'}: is the input"])),
    ("metrics-ref-not-npz", lambda w, t: (["metrics", "ref", "--data", w / "plain", "--dest", t / "ref.txt",
                                           "--metrics", "fd_tiny", "--device", "cpu"],
                                          ["--dest " + str(t / "ref.txt")])),
    ("metrics-ref-batch-zero", lambda w, t: (["metrics", "ref", "--data", w / "plain", "--dest", t / "ref.npz",
                                              "--metrics", "fd_tiny", "--batch", "0", "--device", "cpu",
                                              "--workers", "0"], ["--batch 0: must be >= 1"])),
    ("metrics-calc-unknown-metric", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", w / "ref.npz",
                                                   "--metrics", "fd_tiny,kid", "--num", "6", "--jsonl", t / "m.jsonl"],
                                                  ["--metrics 'fd_tiny,kid': unknown metric 'kid'"])),
    ("metrics-calc-num-text", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", w / "ref.npz",
                                             "--num", "lots", "--jsonl", t / "m.jsonl"], ["--num 'lots'"])),
    ("metrics-calc-seed-text", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", w / "ref.npz",
                                              "--num", "6", "--seed", "x", "--jsonl", t / "m.jsonl"], ["--seed 'x'"])),
    ("metrics-classifier-existing-out", lambda w, t: (["metrics", "classifier", "--data", w / "plain", "--out",
                                                       w / "bad.json"], ["--out " + str(w / "bad.json"),
                                                                         "pass --overwrite"])),
    ("metrics-classifier-batch-zero", lambda w, t: (["metrics", "classifier", "--data", w / "plain", "--out",
                                                     t / "c.safetensors", "--batch", "0"], ["--batch 0"])),
    ("sweep-std-text", lambda w, t: (["sweep", "--rundir", w / "run1", "--std", "0.05,wide", "--ref", w / "ref.npz",
                                      "--metrics", "fd_tiny"], ["--std '0.05,wide'"])),
    ("sweep-steps-zero", lambda w, t: (["sweep", "--rundir", w / "run1", "--std", "0.07", "--ref", w / "ref.npz",
                                        "--metrics", "fd_tiny", "--steps", "0"], ["--steps 0"])),
    ("metrics-calc-too-few-images", lambda w, t: (["metrics", "calc", "--images", w / "plain", "--ref", w / "ref.npz",
                                                   "--num", "50", "--jsonl", t / "m.jsonl", "--device", "cpu"],
                                                  ["holds 6 images"])),
]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(w, tmp_path, make):
    before = tree_hashes([w])
    argv, match = make(w, tmp_path)
    assert_refused(argv, watch=[w, tmp_path], match=match)
    assert tree_hashes([w]) == before


# ---------------------------------------------------------------------------
# What still works next to the refusals.
# ---------------------------------------------------------------------------

def test_generate_resumes_matching_folder(w, tmp_path):
    out = shutil.copytree(w / "imgsA", tmp_path / "o")
    (out / "000001.png").unlink()
    code, stdout, err = run_cli(["generate", "--net", w / "netA.safetensors", "--outdir", out, *GEN[:2],
                                 "--seeds", "0-2", "--device", "cpu"])
    assert code == 0, err
    assert "2 images generated" in stdout and "1 already there" in stdout
    assert (out / "000001.png").read_bytes() == (w / "imgsA" / "000001.png").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "generate.json"]


def test_lock_of_a_killed_process_is_free(w, tmp_path):
    out = tmp_path / "o"
    with hold_lock(out) as proc:
        proc.kill()
        proc.wait()
        code, _, err = run_cli(["generate", "--net", w / "netA.safetensors", "--outdir", out, *GEN])
    assert code == 0 and "no longer running" in err
    assert not (out / LOCK_NAME).exists() and not (out / HOLDER_NAME).exists()


def test_phema_same_run_moved_folder_is_accepted(w, tmp_path):
    """A run moved to another folder and resumed keeps its run_id: still one run."""
    run = shutil.copytree(w / "run1", tmp_path / "run")
    write_ema_run(tmp_path / "later", run_id="aaaa1111", run=tmp_path / "elsewhere", times=(256,))
    for p in (tmp_path / "later").iterdir():
        shutil.copy(p, run)
    code, stdout, err = run_cli(["phema", "--rundir", run, "--outdir", tmp_path / "o", "--std", "0.07"])
    assert code == 0, err
    assert "from 8 snapshots" in stdout


def test_metric_values_never_nan_or_negative(tmp_path):
    with pytest.raises(ValueError, match="cannot be"):
        check_metric_value("fid", float("nan"))
    with pytest.raises(ValueError, match="cannot be"):
        check_metric_value("fid", -0.5, scale=10.0)
    assert check_metric_value("fid", -1e-12, scale=10.0) == 0.0  # round-off of identical statistics
    assert check_metric_value("fid", 3.25) == 3.25
    stats = FeatureStats(2)
    stats.append(torch.tensor([[0.0, float("nan")], [1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="not finite"):
        distances({"fid": stats}, {"fid": {"mu": np.zeros(2), "sigma": np.eye(2)}})
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"results": {"fid": 1.5}})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="NaN or infinite"):
        append_jsonl(path, {"results": {"fid": float("nan")}})
    assert path.read_bytes() == before
    assert json.loads(before)["results"] == {"fid": 1.5}


def test_nonfinite_network_output_writes_nothing(w, tmp_path):
    kw, net = tiny_net(0)
    with torch.no_grad():
        net.unet.out_gain.fill_(float("nan"))
    save_snapshot(tmp_path / "nan.safetensors", net, make_meta(kw, 64, 0.1, StandardRGBEncoder().to_meta(),
                                                                 {"resolution": 16, "channels": 1, "label_dim": 3}))
    msg = assert_refused(["generate", "--net", tmp_path / "nan.safetensors", "--outdir", tmp_path / "o", *GEN],
                         watch=[tmp_path], match="non-finite values")
    assert "seed(s) 0, 1" in msg
    assert not (tmp_path / "o").exists()  # a new folder is left as it was: absent


# ---------------------------------------------------------------------------
# Full disk and read-only folders (a small tmpfs; skipped where mounting is not allowed).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dest", ["big.zip", "bigdir"])
def test_convert_on_full_disk_leaves_nothing(tmp_path, dest):
    src = write_images(tmp_path / "src", n=40, size=96, channels=3)  # ~1.1 MB of noise PNGs
    with small_tmpfs(tmp_path / "mnt", size="512k") as (mnt, _):
        (mnt / "keep.txt").write_text("existing file")
        msg = assert_refused(["dataset", "convert", "--source", src, "--dest", mnt / dest, "--workers", "1"],
                             watch=[mnt, src], match=[str(mnt / dest), "no space left"], code=1)
        assert sorted(os.listdir(mnt)) == ["keep.txt"], msg


def test_convert_into_read_only_folder(tmp_path, w):
    with small_tmpfs(tmp_path / "mnt", size="1m", read_only=True) as (mnt, make_read_only):
        (mnt / "keep.txt").write_text("existing file")
        make_read_only()
        for dest in ("out.zip", "out"):
            assert_refused(["dataset", "convert", "--source", w / "plain", "--dest", mnt / dest],
                           watch=[mnt], match=[str(mnt / dest), "read-only"], code=1)
        assert_refused(["generate", "--net", w / "netA.safetensors", "--outdir", mnt / "o", *GEN],
                       watch=[mnt], match="read-only", code=1)
        assert_refused(["phema", "--rundir", w / "run1", "--outdir", mnt / "o", "--std", "0.07"],
                       watch=[mnt], match="read-only", code=1)


@pytest.mark.parametrize("command", ["generate", "phema"])
def test_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, w, command):
    argv = {"generate": ["generate", "--net", w / "netA.safetensors", *GEN],
            "phema": ["phema", "--rundir", w / "run1", "--std", "0.07"]}[command]
    with small_tmpfs(tmp_path / "mnt", size="1m") as (mnt, _):
        (mnt / "o").mkdir()
        (mnt / "o" / "keep.txt").write_text("existing file")
        fill_disk(mnt, leave=4096)   # room for the lock file, not for an image or a snapshot
        assert_refused([*argv, "--outdir", mnt / "o"], watch=[mnt], match="no space left", code=1)
        assert sorted(os.listdir(mnt / "o")) == ["keep.txt"]


@pytest.mark.parametrize("again", [[], ["--overwrite"]], ids=["same-command", "overwrite"])
def test_interrupted_phema_leaves_no_temp_file_and_resumes(w, tmp_path, monkeypatch, again):
    """Ctrl-C after the first of two outputs is complete: that one stays, the
    other's temp file is removed; the same command (also with --overwrite)
    keeps the finished output and builds the missing one."""
    out = tmp_path / "o"
    argv = ["phema", "--rundir", w / "run1", "--outdir", out, "--std", "0.06,0.08"]
    real_commit = SnapshotStreamWriter.commit

    def commit_then_interrupt(self):
        real_commit(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(SnapshotStreamWriter, "commit", commit_then_interrupt)
    code, _, err = run_cli(argv)
    assert code == 130 and err.splitlines()[-1] == "edm2 phema: interrupted; rerun the same command to resume"
    monkeypatch.undo()
    first, second = snapshot_name(192, 0.06), snapshot_name(192, 0.08)
    assert sorted(os.listdir(out)) == [first]        # no temp file, no lock
    kept = (out / first).stat().st_mtime_ns, (out / first).read_bytes()
    code, _, err = run_cli([*argv, *again])
    assert code == 0, err
    assert sorted(os.listdir(out)) == [first, second]
    assert ((out / first).stat().st_mtime_ns, (out / first).read_bytes()) == kept
