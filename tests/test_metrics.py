"""edm2.metrics: Fréchet distance, feature statistics, reference files, and
the ref / calc / gen / sweep pipeline end to end on CPU with the cheap
stand-in detector (metric "fd_tiny"; the real detectors: test_metrics_detectors.py)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from edm2.cli import main
from edm2.generate import generate_to_dir, load_nets
from edm2.io.snapshot import snapshot_name
from edm2.metrics import FeatureStats, calc_metrics, frechet_distance, gen_metrics, load_ref, sweep
from edm2.metrics.detectors import TinyDetector
from edm2.utils.errors import EDM2Error
from helpers import write_ema_run, write_snapshot

STEPS = 2        # sampler steps: the pipeline, not image quality, is under test


# Tiny image counts are the point here; the few-samples warning is tested once, explicitly.
pytestmark = [pytest.mark.filterwarnings("ignore:only .* images for"), pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------
# Fréchet distance and statistics
# ---------------------------------------------------------------------------

def _random_cov(rng, d, rank=None):
    a = rng.standard_normal([d, rank or d])
    return a @ a.T / (rank or d)


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (3, 40):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-9)
        assert ours > 0


def test_frechet_distance_zero_for_identical_and_closed_form_for_isotropic():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(64), _random_cov(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    # Singular covariance (fewer samples than dimensions): still finite, still 0 for itself.
    singular = _random_cov(rng, 64, rank=10)
    assert abs(frechet_distance(mu, singular, mu, singular)) < 1e-9
    # N(mu1, a^2 I) vs N(mu2, b^2 I) in D dims: |mu1 - mu2|^2 + D (a - b)^2.
    d, a, b = 50, 1.5, 0.5
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + d * (a - b) ** 2
    assert frechet_distance(mu1, a * a * np.eye(d), mu2, b * b * np.eye(d)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="expected \\[D\\], \\[D, D\\]"):
        frechet_distance(mu1, np.eye(d), mu2[:3], np.eye(3))


def test_feature_stats_mean_unbiased_covariance_and_merge():
    rng = np.random.default_rng(2)
    x = rng.standard_normal([300, 5]) * [1, 2, 3, 4, 5] + 7
    a, b = FeatureStats(5), FeatureStats(5)
    for chunk in np.array_split(x[:200], 7):
        a.append(torch.from_numpy(chunk).float())
    b.append(x[200:])
    a.merge(b)
    x32 = np.concatenate([x[:200].astype(np.float32), x[200:]])  # what was appended
    assert a.num == 300
    np.testing.assert_allclose(a.mean(), x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.cov(), np.cov(x32, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)
    assert a.cov().dtype == np.float64
    few = FeatureStats(5)
    few.append(x[:4])
    with pytest.warns(UserWarning, match="only 4 images for 5-d features"):
        few.cov()


# ---------------------------------------------------------------------------
# Fixtures: reference statistics of `image_dataset`, tiny networks
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, image_dataset):
    d = tmp_path_factory.mktemp("metrics")
    data = image_dataset
    assert main(["metrics", "ref", "--data", str(data), "--dest", str(d / "ref.npz"), "--metrics", "fd_tiny",
                 "--workers", "0"]) == 0
    return {"dir": d, "data": data, "ref": d / "ref.npz",
            "net": write_snapshot(d / "net.safetensors", seed=0),
            "gnet": write_snapshot(d / "gnet.safetensors", seed=1),
            "ugnet": write_snapshot(d / "ugnet.safetensors", label_dim=0, seed=2)}


def tiny_features(folder):
    imgs = np.stack([np.asarray(Image.open(p))[None] for p in sorted(Path(folder).rglob("*.png"))])
    return TinyDetector()(torch.from_numpy(imgs)).double().numpy()


# ---------------------------------------------------------------------------
# ref / calc / gen
# ---------------------------------------------------------------------------

def test_ref_file_holds_float64_mean_and_unbiased_covariance(files):
    feats = tiny_features(files["data"])
    with np.load(files["ref"], allow_pickle=False) as z:
        assert str(z["format"]) == "edm2-ref-v1" and int(z["fd_tiny_num"]) == 24
        assert z["fd_tiny_mu"].dtype == np.float64 and z["fd_tiny_sigma"].shape == (16, 16)
        np.testing.assert_allclose(z["fd_tiny_mu"], feats.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(z["fd_tiny_sigma"], np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
    ref = load_ref(files["ref"])
    assert set(ref) == {"fd_tiny"}


def test_old_edm_npz_reference_reads_as_fid(tmp_path):
    path = tmp_path / "edm.npz"
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
    ref = load_ref(path)
    assert list(ref) == ["fid"] and ref["fid"]["sigma"].shape == (4, 4)


def test_end_to_end_generate_then_calc(files, capsys):
    """tiny dataset -> ref stats -> `edm2 generate` with a tiny snapshot -> `metrics calc`."""
    d = files["dir"]
    assert main(["generate", "--net", str(files["net"]), "--outdir", str(d / "gen"), "--seeds", "0-19",
                 "--steps", str(STEPS)]) == 0
    jsonl = d / "calc.jsonl"
    assert main(["metrics", "calc", "--images", str(d / "gen"), "--ref", str(files["ref"]), "--num", "20",
                 "--workers", "0", "--jsonl", str(jsonl)]) == 0
    out = capsys.readouterr().out
    # The same number from the features directly (an independent computation).
    feats, ref = tiny_features(d / "gen"), load_ref(files["ref"])["fd_tiny"]
    expected = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
    record = json.loads(jsonl.read_text().splitlines()[-1])
    assert record["results"]["fd_tiny"] == pytest.approx(expected, rel=1e-6)
    assert record["num"] == 20 and record["images"] == str(d / "gen") and expected > 0.01
    assert f"fd_tiny {expected:.4f}" in out
    # The dataset against its own statistics: 0; a 12-image subset: seeded, so repeatable.
    assert calc_metrics(files["data"], files["ref"], num=24, workers=0, progress=False)["fd_tiny"] == \
        pytest.approx(0, abs=1e-9)
    a = calc_metrics(files["data"], files["ref"], num=12, seed=1, workers=0, progress=False)["fd_tiny"]
    b = calc_metrics(files["data"], files["ref"], num=12, seed=1, workers=0, progress=False)["fd_tiny"]
    c = calc_metrics(files["data"], files["ref"], num=12, seed=2, workers=0, progress=False)["fd_tiny"]
    assert a == b != c and a > 0


def test_gen_with_guidance_equals_calc_on_the_same_images(files, capsys):
    """`metrics gen` evaluates on the fly exactly the images `generate` writes (same seeds, guidance)."""
    d = files["dir"]
    net, gnet, enc, _ = load_nets(files["net"], files["gnet"], "cpu")
    generate_to_dir(net, enc, range(10, 20), d / "guided", gnet=gnet, guidance=2.0, progress=False,
                    num_steps=STEPS)
    on_disk = calc_metrics(d / "guided", files["ref"], num=10, workers=0, progress=False)
    jsonl = d / "gen.jsonl"
    assert main(["metrics", "gen", "--net", str(files["net"]), "--gnet", str(files["gnet"]), "--guidance", "2",
                 "--ref", str(files["ref"]), "--num", "10", "--seed", "1,0", "--steps", str(STEPS),
                 "--jsonl", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["seed"] for r in records] == [1, 0] and records[0]["guidance"] == 2.0
    assert records[0]["results"]["fd_tiny"] == pytest.approx(on_disk["fd_tiny"], rel=1e-6)  # seed 1: seeds 10-19
    assert records[1]["results"]["fd_tiny"] != records[0]["results"]["fd_tiny"]
    out = capsys.readouterr().out
    assert "min    fd_tiny" in out
    unguided = gen_metrics(files["net"], files["ref"], num=10, seed=1, progress=False, num_steps=STEPS)
    assert unguided["fd_tiny"] != pytest.approx(on_disk["fd_tiny"], rel=1e-3)


def test_gen_under_torchrun_matches_one_process(files):
    """Two gloo processes split the seeds; the summed statistics give the one-process number.
    ("--" after `-m edm2`: torchrun would otherwise read --num as an abbreviation of its --numa-binding.)"""
    d = files["dir"]
    jsonl = d / "torchrun.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edm2", "--", "metrics", "gen", "--net", str(files["net"]), "--ref", str(files["ref"]), "--num", "10",
           "--batch", "3", "--steps", str(STEPS), "--jsonl", str(jsonl)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 1  # written by rank 0 only
    one = gen_metrics(files["net"], files["ref"], num=10, seed=0, batch_size=4, progress=False, num_steps=STEPS)
    assert records[0]["results"]["fd_tiny"] == pytest.approx(one["fd_tiny"], rel=1e-9)


def test_sweep_two_points_with_guidance_writes_csv_and_png(files, tmp_path, capsys):
    run = write_ema_run(tmp_path / "run", times=(64, 128, 192, 256), step=0.3)
    out = tmp_path / "sweep"
    assert main(["sweep", "--rundir", str(run), "--std", "0.06,0.09", "--ref", str(files["ref"]), "--num", "6",
                 "--gnet", str(files["ugnet"]), "--guidance", "1,1.5", "--steps", str(STEPS),
                 "--outdir", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["ema_std"]), float(r["guidance"])) for r in rows] == [(0.06, 1), (0.06, 1.5), (0.09, 1),
                                                                           (0.09, 1.5)]
    assert {r["nimg"] for r in rows} == {"256"} and all(float(r["fd_tiny"]) > 0 for r in rows)
    assert len({r["fd_tiny"] for r in rows}) == 4
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    # The CSV's numbers are those of the reconstructed snapshots it kept.
    snap = out / snapshot_name(256, 0.09)
    again = gen_metrics(snap, files["ref"], num=6, progress=False, num_steps=STEPS)
    assert float(rows[2]["fd_tiny"]) == pytest.approx(again["fd_tiny"], rel=1e-9)
    best = min(rows, key=lambda r: float(r["fd_tiny"]))
    assert f"sigma_rel {float(best['ema_std']):.4f}, guidance {float(best['guidance']):g}" in capsys.readouterr().out
    # A second sweep into the same folder would overwrite it: refused.
    assert _cli_error(["sweep", "--rundir", str(run), "--std", "0.06", "--ref", str(files["ref"]), "--num", "6",
                       "--outdir", str(out)], capsys) .endswith(
        "a sweep was already written there; choose another --outdir")


def test_sweep_solvers_and_steps_against_network_evaluations(files, tmp_path, capsys):
    run = write_ema_run(tmp_path / "run", times=(64, 128), step=0.3)
    out = tmp_path / "sweep"
    assert main(["sweep", "--rundir", str(run), "--std", "0.08", "--ref", str(files["ref"]), "--num", "4",
                 "--gnet", str(files["ugnet"]), "--guidance", "1.5", "--guidance-interval", "0.5,20",
                 "--solver", "heun,euler,dpm++2m", "--steps", "2,3", "--outdir", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["ema_std", "guidance", "solver", "steps", "nfe"]
    assert [(r["solver"], int(r["steps"]), int(r["nfe"])) for r in rows] == [
        ("heun", 2, 3), ("heun", 3, 5), ("euler", 2, 2), ("euler", 3, 3), ("dpm++2m", 2, 2), ("dpm++2m", 3, 3)]
    # Each row is what gen_metrics gives for that solver, steps and interval.
    one = gen_metrics(out / snapshot_name(128, 0.08), files["ref"], gnet=files["ugnet"], guidance=1.5, num=4,
                      progress=False, solver="dpm++2m", num_steps=3, guidance_interval=(0.5, 20))
    assert float(rows[-1]["fd_tiny"]) == pytest.approx(one["fd_tiny"], rel=1e-9)
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG"
    assert "evaluations)" in capsys.readouterr().out
    # An interval with no guided point, or dpm++2m with churn: refused before anything is written.
    assert "there is no guidance to limit" in _cli_error(
        ["sweep", "--rundir", str(run), "--std", "0.08", "--ref", str(files["ref"]), "--num", "4",
         "--guidance-interval", "0.5,20", "--outdir", str(tmp_path / "s2")], capsys)
    assert not (tmp_path / "s2").exists()
    with pytest.raises(EDM2Error, match="S_churn=1: solver='dpm"):
        sweep(run, "0.08", files["ref"], outdir=tmp_path / "s3", num=4, solvers="heun,dpm++2m", S_churn=1)
    assert not (tmp_path / "s3").exists()

def test_second_sweep_into_the_same_folder_is_refused_while_the_first_runs(files, tmp_path, monkeypatch):
    from helpers.cli import assert_refused

    sweep_module = sys.modules["edm2.metrics.sweep"]  # the module (edm2.metrics.sweep is also the function's name)
    run = write_ema_run(tmp_path / "run", times=(64, 128, 192, 256), step=0.3)
    out = tmp_path / "sweep"
    argv = ["sweep", "--rundir", str(run), "--std", "0.06,0.09", "--ref", str(files["ref"]), "--num", "6",
            "--steps", str(STEPS), "--outdir", str(out)]
    real, seen = sweep_module.gen_metrics, []

    def gen_metrics_with_a_second_sweep(*args, **kwargs):
        if not seen:  # the first sweep has reconstructed its snapshots and evaluates: a second one starts
            seen.append(assert_refused(argv[:4] + ["0.07"] + argv[5:], watch=[out],
                                       match=["is in use by this process", "choose another --outdir"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "gen_metrics", gen_metrics_with_a_second_sweep)
    assert main(argv) == 0
    assert len(seen) == 1
    with open(out / "sweep.csv") as f:
        assert [float(r["ema_std"]) for r in csv.DictReader(f)] == [0.06, 0.09]
    assert sorted(p.name for p in out.iterdir()) == sorted([snapshot_name(256, 0.06), snapshot_name(256, 0.09),
                                                            "sweep.csv", "sweep.png"])


def test_sweep_refuses_lengths_that_share_a_file_name(files, tmp_path):
    from helpers.cli import assert_refused

    run = write_ema_run(tmp_path / "run", times=(64, 128), step=0.3)
    assert_refused(["sweep", "--rundir", run, "--std", "0.05,0.0501", "--ref", files["ref"], "--num", "6",
                    "--outdir", tmp_path / "sweep"], watch=[tmp_path], match=["would share the snapshot file name"])

def test_sweep_forwards_max_profile_error(files, tmp_path):
    from helpers.cli import assert_refused

    run = write_ema_run(tmp_path / "run", times=(64, 128, 192, 256), step=0.3)
    argv = ["sweep", "--rundir", run, "--std", "0.06", "--ref", files["ref"], "--num", "6", "--steps", STEPS,
            "--outdir", tmp_path / "sweep"]
    # Between two snapshots the profile is far from the wanted one: refused before anything is generated.
    assert_refused(argv + ["--at-nimg", "200"], watch=[tmp_path],
                   match=["--max-profile-error 0.05: the stored snapshots realise sigma_rel=0.06 at nimg 200",
                          "--at-nimg 200 lies after the last snapshot it can use (nimg 192)"], code=2)
    assert_refused(argv + ["--max-profile-error", "1e-9"], watch=[tmp_path],
                   match="--max-profile-error 1e-09: the stored snapshots realise sigma_rel=0.06 at nimg 256", code=2)


# ---------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------

def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    ref, data = str(files["ref"]), str(files["data"])
    err = _cli_error(["metrics", "ref", "--data", data, "--dest", ref, "--metrics", "fd_tiny"], capsys)
    assert "already exists" in err and ref in err
    err = _cli_error(["metrics", "calc", "--images", data, "--ref", ref, "--metrics", "fid",
                      "--jsonl", str(tmp_path / "x.jsonl")], capsys)
    assert "has no fid statistics" in err
    err = _cli_error(["metrics", "calc", "--images", data, "--ref", ref, "--jsonl", str(tmp_path / "x.jsonl")], capsys)
    assert "holds 24 images but --num 50000; pass --num 24 or fewer" in err
    err = _cli_error(["metrics", "gen", "--net", str(files["net"]), "--ref", ref, "--guidance", "2"], capsys)
    assert "needs --gnet" in err
    err = _cli_error(["metrics", "calc", "--images", data, "--ref", str(tmp_path / "none.npz")], capsys)
    assert "no such file" in err and "edm2 metrics ref" in err
    err = _cli_error(["metrics", "ref", "--data", data, "--dest", str(tmp_path / "r.npz"), "--metrics", "kid"], capsys)
    assert "unknown metric 'kid'" in err
    # Offline without detector weights: names the missing file and where to put it.
    monkeypatch.setenv("EDM2_OFFLINE", "1")
    err = _cli_error(["metrics", "ref", "--data", data, "--dest", str(tmp_path / "r.npz"), "--metrics", "fid",
                      "--detector-dir", str(tmp_path / "weights")], capsys)
    assert str(tmp_path / "weights" / "weights-inception-2015-12-05-6726825d.pth") in err and "put it at" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
