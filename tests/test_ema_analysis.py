"""The paper's EMA analysis (Sec. 3.2, Fig. 5) through `edm2 sweep`: per-group
sensitivity, the optimum over training time, EMA length x guidance, several
seed sets per point. Tiny networks, a few images, two sampler steps: the
numbers are compared with those of plain sweeps and `gen_metrics`."""
import csv

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from edm2.analysis.ema_analysis import group_tensors, guidance_grid, optimum
from edm2.cli import main
from edm2.io.snapshot import read_snapshot_meta, save_state_dict, snapshot_name
from edm2.metrics import gen_metrics, reference_stats, sweep
from edm2.metrics.sweep import mean_and_spread
from edm2.utils.errors import EDM2Error
from helpers import write_ema_run, write_snapshot
from helpers.cli import assert_refused

STEPS = 2
pytestmark = [pytest.mark.filterwarnings("ignore:only .* images for"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, image_dataset):
    d = tmp_path_factory.mktemp("ema_analysis")
    reference_stats(image_dataset, d / "ref.npz", metrics=["fd_tiny"], workers=0, progress=False)
    return {"ref": d / "ref.npz", "run": write_ema_run(d / "run", times=(64, 128, 192, 256), step=0.3),
            "ugnet": write_snapshot(d / "ugnet.safetensors", label_dim=0, seed=2)}


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _run(files, out, lengths="0.06,0.09", **kw):
    return sweep(files["run"], lengths, files["ref"], outdir=out, num=4, steps=STEPS, progress=False, **kw)


def test_default_groups_split_the_unet_by_block_resolution_and_role(files):
    names = list(load_file(str(files["run"] / snapshot_name(256, 0.05))))
    groups = group_tensors(names)
    assert list(groups) == ["enc-16x16", "enc-8x8", "dec-16x16", "dec-8x8", "attention", "embedding", "output"]
    every = [n for v in groups.values() for n in v]
    assert len(every) == len(set(every))  # each tensor in one group at most
    assert set(names) - set(every) == {n for n in names if n.startswith("logvar")}  # u(sigma): training only
    assert "unet.enc.8x8_block0.attn_qkv.weight" in groups["attention"]
    assert "unet.dec.8x8_block0.conv_res0.weight" in groups["dec-8x8"]
    assert set(groups["embedding"]) == {"unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight"}
    # User groups: first match wins; a group that matches nothing is refused, naming `groups`.
    mine = group_tensors(names, "attn=*attn*,enc=*.enc.*")
    assert "unet.enc.8x8_block0.attn_qkv.weight" in mine["attn"] and mine["attn"] == groups["attention"]
    with pytest.raises(EDM2Error, match="groups=.*'nothing' .* matches no tensor"):
        group_tensors(names, "nothing=*.xyz")
    with pytest.raises(EDM2Error, match="is not NAME=PATTERN"):
        group_tensors(names, "attn")


def test_a_group_of_every_tensor_repeats_the_global_sweep(files, tmp_path):
    rows = _run(files, tmp_path / "s", "0.06,0.09,0.12", groups="all=*", base_std=0.09)
    groups = _read(tmp_path / "s" / "groups.csv")
    assert [(g["group"], float(g["ema_std"]), float(g["base_std"])) for g in groups] == [
        ("all", 0.06, 0.09), ("all", 0.09, 0.09), ("all", 0.12, 0.09)]
    assert [float(g["fd_tiny"]) for g in groups] == [r["fd_tiny"] for r in rows]  # the same numbers
    assert len({r["fd_tiny"] for r in rows}) == 3
    assert not (tmp_path / "s" / "groups").exists()  # the mixed networks are not kept
    with Image.open(tmp_path / "s" / "groups.png") as png:
        assert png.format == "PNG"


def test_one_group_varied_is_that_mixed_network(files, tmp_path):
    out = tmp_path / "s"
    rows = _run(files, out, groups="attn=*attn*")  # base: the sweep's best
    base = min(rows, key=lambda r: r["fd_tiny"])["ema_std"]
    other = 0.06 if base == 0.09 else 0.09
    groups = {float(g["ema_std"]): float(g["fd_tiny"]) for g in _read(out / "groups.csv")}
    assert groups[base] == min(r["fd_tiny"] for r in rows)
    # By hand: the base network with its attention tensors from the other length.
    a, b = (load_file(str(out / snapshot_name(256, s))) for s in (base, other))
    mixed = {k: (b[k] if "attn" in k else v) for k, v in a.items()}
    save_state_dict(tmp_path / "mixed.safetensors", mixed, read_snapshot_meta(out / snapshot_name(256, base)))
    want = gen_metrics(tmp_path / "mixed.safetensors", files["ref"], num=4, progress=False, num_steps=STEPS)
    assert groups[other] == pytest.approx(want["fd_tiny"], rel=1e-12)
    assert groups[other] != next(r["fd_tiny"] for r in rows if r["ema_std"] == other)


def test_several_times_give_one_curve_each_and_the_drift_figure(files, tmp_path):
    out = tmp_path / "s"
    rows = _run(files, out, at_nimg="192,256")
    assert [(r["nimg"], r["ema_std"]) for r in rows] == [(192, 0.06), (192, 0.09), (256, 0.06), (256, 0.09)]
    assert [int(r["nimg"]) for r in _read(out / "sweep.csv")] == [192, 192, 256, 256]
    one = gen_metrics(out / snapshot_name(192, 0.09), files["ref"], num=4, progress=False, num_steps=STEPS)
    assert rows[1]["fd_tiny"] == pytest.approx(one["fd_tiny"], rel=1e-12)
    with Image.open(out / "sweep-time.png") as png:
        assert png.format == "PNG"
    # A time whose reconstruction is refused (between snapshots) is found before any time is reconstructed.
    with pytest.raises(EDM2Error, match="sigma_rel=0.06 at nimg 200 only with a"):
        _run(files, tmp_path / "s2", at_nimg="192,200")
    assert not (tmp_path / "s2").exists()
    with pytest.raises(EDM2Error, match="groups=default: the per-group sweep takes one `at_nimg`"):
        _run(files, tmp_path / "s2", at_nimg="192,256", groups="default")
    assert not (tmp_path / "s2").exists()


def test_guidance_heat_map_row_at_guidance_one_is_the_plain_sweep(files, tmp_path):
    plain = _run(files, tmp_path / "plain")
    both = _run(files, tmp_path / "both", gnet=files["ugnet"], guidance="1,1.5", guidance_interval=(0.001, 90))
    sigma_rels, ws, grid = guidance_grid(both, "fd_tiny")
    assert sigma_rels == [0.06, 0.09] and ws == [1.0, 1.5]
    assert grid[0].tolist() == [r["fd_tiny"] for r in plain]
    assert np.isfinite(grid).all() and not np.array_equal(grid[0], grid[1])
    with Image.open(tmp_path / "both" / "sweep-guidance.png") as png:
        assert png.format == "PNG"
    assert not (tmp_path / "plain" / "sweep-guidance.png").exists()


def test_eval_seeds_mean_and_spread(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--rundir", str(files["run"]), "--std", "0.06,0.09", "--ref", str(files["ref"]),
                 "--num", "4", "--steps", str(STEPS), "--eval-seeds", "2", "--outdir", str(out)]) == 0
    rows = _read(out / "sweep.csv")
    assert list(rows[0]) == ["ema_std", "guidance", "solver", "steps", "nfe", "nimg", "num", "seed", "seeds",
                             "fd_tiny", "fd_tiny_std"]
    snap = out / snapshot_name(256, 0.09)
    single = [gen_metrics(snap, files["ref"], num=4, seed=s, progress=False, num_steps=STEPS)["fd_tiny"]
              for s in (0, 1)]
    assert single[0] != single[1]
    assert float(rows[1]["fd_tiny"]) == pytest.approx(np.mean(single), rel=1e-12)
    assert float(rows[1]["fd_tiny_std"]) == pytest.approx(np.std(single, ddof=1), rel=1e-9)
    assert "within one spread: sigma_rel" in capsys.readouterr().out
    # K = 1, and K sets that are the same images: no spread.
    assert mean_and_spread([{"fd_tiny": single[0]}], ["fd_tiny"]) == {"fd_tiny": single[0], "fd_tiny_std": 0.0}
    assert mean_and_spread([{"fd_tiny": single[0]}] * 2, ["fd_tiny"])["fd_tiny_std"] == 0.0
    one = _run(files, tmp_path / "k1", "0.09")
    assert one[0]["fd_tiny"] == single[0] and one[0]["fd_tiny_std"] == 0.0 and one[0]["seeds"] == 1
    assert_refused(["sweep", "--rundir", files["run"], "--std", "0.06", "--ref", files["ref"], "--eval-seeds", "0",
                    "--outdir", tmp_path / "bad"], watch=[tmp_path], match=["--eval-seeds 0: must be a whole number"])


def test_optimum_range_within_one_spread():
    rows = [{"ema_std": s, "m": v, "m_std": 0.5} for s, v in [(0.05, 3.0), (0.1, 2.0), (0.15, 2.6), (0.2, 2.45)]]
    o = optimum(rows, "m")
    assert (o["row"]["ema_std"], o["lo"], o["hi"], o["edge"]) == (0.1, 0.1, 0.2, False)
    o = optimum([{**r, "m_std": 0.0} for r in rows[1:]], "m")
    assert (o["lo"], o["hi"], o["edge"]) == (0.1, 0.1, True)


def test_cli_default_groups_with_a_base_outside_the_sweep(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--rundir", str(files["run"]), "--std", "0.06,0.09", "--ref", str(files["ref"]),
                 "--num", "4", "--steps", str(STEPS), "--groups", "--base-std", "0.075", "--outdir", str(out)]) == 0
    groups = _read(out / "groups.csv")
    assert list(groups[0])[:4] == ["group", "tensors", "base_std", "ema_std"]
    names = ["enc-16x16", "enc-8x8", "dec-16x16", "dec-8x8", "attention", "embedding", "output"]
    assert [(g["group"], float(g["ema_std"])) for g in groups] == [(n, s) for n in names for s in (0.06, 0.09)]
    assert {float(g["base_std"]) for g in groups} == {0.075}
    assert (out / snapshot_name(256, 0.075)).is_file()  # the base, reconstructed once
    assert len({g["fd_tiny"] for g in groups}) == len(groups)
    printed = capsys.readouterr().out
    assert "groups.csv, groups.png" in printed
    att = min((g for g in groups if g["group"] == "attention"), key=lambda g: float(g["fd_tiny"]))
    assert (f"group attention: best fd_tiny {float(att['fd_tiny']):.4f} at sigma_rel {float(att['ema_std']):.4f} "
            f"(others at 0.0750)") in printed
    assert_refused(["sweep", "--rundir", files["run"], "--std", "0.06", "--ref", files["ref"], "--groups",
                    "--guidance", "1,1.5", "--gnet", files["ugnet"], "--outdir", tmp_path / "bad"], watch=[tmp_path],
                   match=["--groups default: the per-group sweep takes one --at-nimg, one --guidance"])
    assert_refused(["sweep", "--rundir", files["run"], "--std", "0.06", "--ref", files["ref"], "--base-std", "0.07",
                    "--outdir", tmp_path / "bad"], watch=[tmp_path], match=["--base-std 0.07: only used with --groups"])
