"""Post-hoc EMA on snapshot files (edm2.ema.posthoc.reconstruct and `edm2 phema`)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edm2.cli import main
from edm2.ema.posthoc import PhemaInput, find_phema_inputs, reconstruct, resolve_time
from edm2.ema.profiles import solve_posthoc_coefficients
from edm2.io.snapshot import load_snapshot, read_snapshot_meta, save_snapshot, snapshot_name
from edm2.nn import Precond
from helpers import write_ema_run
from helpers.cli import assert_refused

BATCH, EVERY = 8, 64       # images per step, images between snapshots
TIMES = [EVERY * k for k in range(1, 7)]
STORED = (0.05, 0.10)


def make_run(folder, seed=0, dtype=torch.float32, model_channels=16, times=TIMES):
    """A fake training run: a tiny Precond whose parameters wander, two EMA profiles
    saved at every snapshot time (as the trainer names and describes them)."""
    return write_ema_run(folder, times, STORED, seed=seed, step=1.0, dtype=dtype, model_channels=model_channels)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = make_run(tmp_path_factory.mktemp("phema") / "run")
    # Neither a raw-weight snapshot nor a training-state file is an EMA input, and
    # the trainer's snapshots at image 0 take no part (0 < nimg; docs/design.md#post-hoc-reconstruction).
    net, meta = load_snapshot(folder / snapshot_name(TIMES[-1], 0.10))
    save_snapshot(folder / snapshot_name(TIMES[-1], None), net, meta | {"ema_std": None})
    for sigma_rel in STORED:
        save_snapshot(folder / snapshot_name(0, sigma_rel), net, meta | {"nimg": 0, "ema_std": sigma_rel})
    (folder / "training-state-000000000384.pt").write_bytes(b"not a snapshot")
    return folder


def _inputs(folder, upto):
    """Independent re-read of the stored snapshots: (times, sigma_rels, float64 state dicts)."""
    rows = [(t, s) for t in TIMES if t <= upto for s in STORED]
    states = [{k: v.double() for k, v in load_file(folder / snapshot_name(t, s)).items()} for t, s in rows]
    return [r[0] for r in rows], [r[1] for r in rows], states


def test_reconstruct_writes_the_weighted_sums(run, tmp_path):
    at = TIMES[3]
    paths = reconstruct(run, tmp_path / "out", [0.07, 0.10, 0.2], at_nimg=at, plot=True, progress=False,
                        chunk_elems=2000,  # small row blocks: big tensors are streamed in several pieces
                        max_profile_error=None)  # sigma_rel 0.2 from 4 snapshot times: 22 % profile error
    assert [p.name for p in paths] == [snapshot_name(at, s) for s in (0.07, 0.10, 0.2)]
    in_t, in_sigma_rel, states = _inputs(run, at)
    assert len(states) == 8  # only snapshots with nimg <= at take part
    X = solve_posthoc_coefficients(in_t, in_sigma_rel, at, [0.07, 0.10, 0.2])
    buffers = {k for k, _ in Precond(**read_snapshot_meta(paths[0])["net_kwargs"]).named_buffers()}
    for j, path in enumerate(paths):
        got = load_file(path)
        assert set(got) == set(states[0])
        for k, v in got.items():
            assert v.dtype == torch.float32
            if k in buffers:  # copied, not averaged
                assert torch.equal(v.double(), states[-1][k])
            else:
                want = sum(X[i, j] * states[i][k] for i in range(len(states)))
                torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-4)
        meta = read_snapshot_meta(path)
        src = read_snapshot_meta(run / snapshot_name(at, 0.10))
        assert meta["nimg"] == at and meta["ema_std"] == [0.07, 0.10, 0.2][j]
        assert meta["net_kwargs"] == src["net_kwargs"] and meta["dataset"] == src["dataset"]
        assert meta["encoder"] == src["encoder"] and meta["origin"]["preset"] == "tiny"
        used = meta["origin"]["phema"]["inputs"]
        assert [u["nimg"] for u in used] == in_t and [u["ema_std"] for u in used] == in_sigma_rel
        np.testing.assert_allclose([u["coeff"] for u in used], X[:, j])
    # The stored profile (0.10 at `at`) comes back as that very snapshot.
    stored = load_file(run / snapshot_name(at, 0.10))
    for k, v in load_file(paths[1]).items():
        torch.testing.assert_close(v, stored[k], rtol=1e-4, atol=1e-3 * float(stored[k].abs().max()) + 1e-6)
    # A usable network, and one PNG per profile.
    net, meta = load_snapshot(paths[0])
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]))).all()
    for s in (0.07, 0.10, 0.2):
        png = tmp_path / "out" / f"phema-{at:012d}-{s:.3f}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something is drawn


def test_default_time_fp16_inputs_and_earlier_outputs_ignored(tmp_path):
    folder = make_run(tmp_path / "run16", seed=1, dtype=torch.float16, times=TIMES[:3])
    # Earlier post-hoc outputs in the run folder are not used as inputs.
    reconstruct(folder, folder, [0.13], progress=False, max_profile_error=None)
    assert len(find_phema_inputs(folder)) == 6
    (path,) = reconstruct(folder, tmp_path / "out", [0.13], progress=False, max_profile_error=None)
    assert path.name == snapshot_name(TIMES[2], 0.13)  # default time: the last snapshot
    assert all(v.dtype == torch.float16 for k, v in load_file(path).items() if k.endswith("weight"))
    name = "unet.out_conv.weight"
    torch.testing.assert_close(load_file(path)[name], load_file(folder / path.name)[name])


def test_cli_phema_and_overwrite(run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["phema", "--rundir", str(run), "--outdir", str(out), "--std", "0.06,0.08,...,0.12", "--at-nimg", "384"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("from 12 snapshots") == 4
    files = sorted(p.name for p in out.iterdir())
    assert files == [snapshot_name(TIMES[-1], s) for s in (0.06, 0.08, 0.10, 0.12)]
    before = (out / files[0]).read_bytes()
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    # A killed run leaves a temp file and misses outputs: the same command resumes,
    # keeping the finished outputs untouched and removing the temp file.
    (out / files[3]).unlink()
    (out / f".{files[3]}.abc123.tmp").write_bytes(b"partial")
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == files
    assert all((out / f).stat().st_mtime_ns == stamps[f] for f in files[:3])
    # A file that is not this reconstruction's output is only replaced with --overwrite.
    (out / files[0]).write_bytes(b"old")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / files[0]).read_bytes() == b"old"
    (out / f".{files[1]}.xyz.tmp").write_bytes(b"partial")
    assert main(argv + ["--overwrite"]) == 0
    assert (out / files[0]).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == files


def test_resolve_time():
    inputs = [PhemaInput(Path(f"s{k}"), k * 8 * 2 ** 20, s, {}) for k in (1, 2, 3) for s in STORED]
    assert resolve_time(inputs) == 3 * 8 * 2 ** 20
    assert resolve_time(inputs, at_nimg=10 ** 7) == 10 ** 7
    assert resolve_time(inputs, at_kimg=16777) == 2 * 8 * 2 ** 20  # the reference's name of that snapshot
    assert resolve_time(inputs, at_kimg=20000) == 20_000_000
    with pytest.raises(ValueError, match="beyond the last snapshot"):
        resolve_time(inputs, at_kimg=30000)


@pytest.mark.parametrize("sigma_rel,at,match", [
    ("0.0", None, "--std [0.0]: every EMA length sigma_rel must lie in (0, 0.2887)"), ("-0.1", None, "0.2887"),
    ("0.2887", None, "0.2887"), ("0.05,0.3", None, "--std [0.3]"),
    ("0.1", str(TIMES[-1] + 1), f"--at-nimg {TIMES[-1] + 1}: beyond the last snapshot (nimg {TIMES[-1]})"),
    ("0.1", "0", "must be > 0"),
    ("0.1", str(TIMES[0] - 1), "needs at least 2 (train longer or choose a later --at-nimg)"),
    ("0.1001,0.1004", None, "--std 0.1001,0.1004: 0.1001 and 0.1004 would share the snapshot file name")])
def test_bad_options_write_nothing(run, tmp_path, sigma_rel, at, match):
    argv = ["phema", "--rundir", str(run), "--outdir", str(tmp_path / "out"), "--std", sigma_rel]
    assert_refused(argv + ([] if at is None else ["--at-nimg", at]), watch=[run, tmp_path], match=match, code=2)
    assert not (tmp_path / "out").exists()


def test_bad_run_folders_write_nothing(run, tmp_path):
    def copy(name):
        return shutil.copytree(run, tmp_path / name)

    out = tmp_path / "out"
    argv = lambda folder: ["phema", "--rundir", str(folder), "--outdir", str(out), "--std", "0.07"]
    def _error(argv):
        return assert_refused(argv, watch=[run, tmp_path], code=2)

    assert f"--rundir {tmp_path / 'missing'}: no such folder" in _error(argv(tmp_path / "missing"))
    # One snapshot only.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(run / snapshot_name(TIMES[0], 0.05), single)
    assert "needs at least 2" in _error(argv(single))
    # A truncated file.
    bad = copy("truncated")
    victim = bad / snapshot_name(TIMES[2], 0.10)
    victim.write_bytes(victim.read_bytes()[:-1000])
    err = _error(argv(bad))
    assert str(victim) in err and "truncated" in err
    # Another architecture in the same folder.
    mixed = copy("mixed")
    other = make_run(tmp_path / "other", model_channels=8, times=[TIMES[-1] + EVERY])
    shutil.copy(other / snapshot_name(TIMES[-1] + EVERY, 0.05), mixed)
    err = _error(argv(mixed))
    assert "different architectures" in err and snapshot_name(TIMES[-1] + EVERY, 0.05) in err
    # Same architecture, other run (other initialisation: its fixed Fourier buffers differ).
    two = copy("tworuns")
    stranger = make_run(tmp_path / "stranger", seed=7, times=[TIMES[-1] + EVERY])
    shutil.copy(stranger / snapshot_name(TIMES[-1] + EVERY, 0.10), two)
    assert "different training runs" in _error(argv(two))
    assert not out.exists()
    # Outputs never replace the run's own snapshots, even with --overwrite.
    err = _error(["phema", "--rundir", str(run), "--outdir", str(run), "--std", "0.1", "--overwrite"])
    assert "would replace a training snapshot; choose another --outdir" in err
