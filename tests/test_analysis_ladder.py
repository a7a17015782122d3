"""`edm2 ladder` / edm2.analysis.ladder.run_ladder: two rungs of the ablation ladder on
a tiny preset, their table against their sweeps, resume of an interrupted
ladder (finished rungs untouched), refusal of changed settings."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import edm2.analysis.ladder as ladder_mod
from edm2.analysis.dynamics import growth_factors, load_dynamics
from edm2.analysis.ladder import LadderConfig, read_csv_rows, run_ladder
from edm2.cli import main as cli_main
from edm2.presets import RECIPES
from edm2.utils.errors import EDM2Error

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, data, **kw):
    return LadderConfig(outdir=str(out), configs=("B", "G"), data=str(data), preset="tiny", duration=32,
                        snapshots=2, dynamics_probe=8, sigma_rels=(0.05, 0.15), num=16, steps=4,
                        metrics=("fd_tiny",), batch_size=16, progress=False, **kw)


def hashes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(image_dataset):
    """The shared labelled dataset (tests/conftest.py)."""
    return image_dataset


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ladder") / "out"
    return out, run_ladder(config(out, data))


def test_table_matches_sweeps(ladder):
    out, rungs = ladder
    assert [r.config for r in rungs] == ["B", "G"]
    with open(out / "ladder.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["config"] for row in table] == ["B", "G"]
    for row, rung in zip(table, rungs):
        sweep = read_csv_rows(out / rung.config / "sweep" / "sweep.csv", ["fd_tiny"])
        assert sorted(r["ema_std"] for r in sweep) == [0.05, 0.15]
        best = min(sweep, key=lambda r: r["fd_tiny"])
        assert float(row["fd_tiny"]) == best["fd_tiny"] == rung.values["fd_tiny"]
        assert float(row["best_sigma_rel"]) == best["ema_std"] == rung.best_sigma_rel
        assert float(row["paper_fid"]) == RECIPES[rung.config].fid
        assert int(row["nimg"]) == 32 and rung.params > 0
        g = growth_factors(load_dynamics(out / rung.config))
        assert float(row["act_max_growth_raw"]) == pytest.approx(g["raw"]["growth"])
        assert g["raw"]["first_nimg"] == 0 and g["raw"]["last_nimg"] == 32
    assert rungs[0].params != rungs[1].params            # B and G are different networks
    # Two seed sets per point (the default): the best by the mean, its spread, the lengths within it.
    for row, rung in zip(table, rungs):
        sweep = read_csv_rows(out / rung.config / "sweep" / "sweep.csv", ["fd_tiny"])
        best = min(sweep, key=lambda r: r["fd_tiny"])
        assert {r["seeds"] for r in sweep} == {2} and best["fd_tiny_std"] > 0
        assert float(row["fd_tiny_std"]) == best["fd_tiny_std"] == rung.spread["fd_tiny"]
        near = [r["ema_std"] for r in sweep if r["fd_tiny"] <= best["fd_tiny"] + best["fd_tiny_std"]]
        assert rung.best_range == [min(near), max(near)]
        assert rung.at_edge and row["best_at_edge"] == "1"  # two lengths: the best is at one end
    md = (out / "ladder.md").read_text()
    assert f"| B | + minor improvements | {rungs[0].params / 1e6:.3f} | {rungs[0].values['fd_tiny']:.4f} |" in md
    assert md.count("\n| ") == 3                        # header and two rows
    # an optimum at the shortest length swept also asks for more snapshots (short lengths reconstruct worst)
    shortest = any(rung.best_sigma_rel == min(r["ema_std"] for r in rung.sweep) for rung in rungs)
    more = "; a shorter length also needs more snapshots to be reconstructed faithfully" if shortest else ""
    assert (f"Best EMA length at a sweep boundary (the optimum may lie outside the swept lengths; widen "
            f"sigma_rels{more}): B ({rungs[0].best_sigma_rel:.3f}), G ({rungs[1].best_sigma_rel:.3f}).") in md
    for name in ("ladder.png", "dynamics.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "ladder.json").read_text())["configs"] == ["B", "G"]


def test_resume_after_interruption(ladder, data, tmp_path, monkeypatch):
    ref_out, ref_rungs = ladder
    out = tmp_path / "out"
    real_train = ladder_mod.train

    def killed_in_g(tc):   # G stops half way, as if the process had been killed after a checkpoint
        return real_train(dataclasses.replace(tc, slice=16) if tc.config == "G" else tc)

    monkeypatch.setattr(ladder_mod, "train", killed_in_g)
    with pytest.raises(EDM2Error, match="training stopped at 16 of 32"):
        run_ladder(config(out, data))
    monkeypatch.setattr(ladder_mod, "train", real_train)
    assert (out / "B" / "ladder-rung.json").is_file() and not (out / "G" / "ladder-rung.json").exists()
    before = hashes(out / "B")
    rungs = run_ladder(config(out, data))
    assert hashes(out / "B") == before                  # the finished rung is untouched
    # The resumed G equals the uninterrupted one (CPU resume is bit for bit), so the tables agree.
    assert [dataclasses.asdict(r) for r in rungs] == [dataclasses.asdict(r) for r in ref_rungs]
    assert (out / "ladder.csv").read_bytes() == (ref_out / "ladder.csv").read_bytes()

    # An interrupted sweep (one of two points written) is evaluated again; the trained run is kept.
    sweep_csv = out / "G" / "sweep" / "sweep.csv"
    lines = sweep_csv.read_text().splitlines(keepends=True)
    sweep_csv.write_text("".join(lines[:2]))
    (out / "G" / "ladder-rung.json").unlink()
    checkpoints = {k: v for k, v in hashes(out / "G").items() if k.startswith("checkpoint-")}
    again = run_ladder(config(out, data))
    assert again[1].values == ref_rungs[1].values
    assert sweep_csv.read_text() == (ref_out / "G" / "sweep" / "sweep.csv").read_text()
    assert {k: v for k, v in hashes(out / "G").items() if k.startswith("checkpoint-")} == checkpoints


def test_changed_settings_refused(ladder, data):
    out, _ = ladder
    before = hashes(out)
    with pytest.raises(ValueError, match=r"other settings \(num: 16 there, 32 now\)"):
        run_ladder(dataclasses.replace(config(out, data), num=32))
    with pytest.raises(ValueError, match="other settings"):
        run_ladder(dataclasses.replace(config(out, data), configs=("B", "C", "G")))
    assert hashes(out) == before


def test_solver(ladder, data, tmp_path):
    """The solver is a recorded setting: the sweeps use it, a ladder written before the setting
    existed continues as Heun's, and another solver on it is refused."""
    out, rungs = ladder
    assert json.loads((out / "ladder.json").read_text())["solver"] == "heun"
    def sweep_rows(path):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    for r in rungs:
        assert {row["solver"] for row in sweep_rows(out / r.config / "sweep" / "sweep.csv")} == {"heun"}
    dpm = tmp_path / "dpm"
    cfg = dataclasses.replace(config(dpm, data), configs=("G",), solver="dpm++2m")
    (g,) = run_ladder(cfg)
    rows = sweep_rows(dpm / "G" / "sweep" / "sweep.csv")
    assert {row["solver"] for row in rows} == {"dpm++2m"} and {row["nfe"] for row in rows} == {"4"}
    assert g.values["fd_tiny"] != rungs[1].values["fd_tiny"]     # same network, another sampler
    assert "(4 dpm++2m sampler steps)" in (dpm / "ladder.md").read_text()
    with pytest.raises(ValueError, match=r"other settings \(solver: 'dpm\+\+2m' there, 'heun' now\)"):
        run_ladder(dataclasses.replace(cfg, solver="heun"))
    # ladder.json of a ladder without the setting: its rungs were sampled with Heun's solver.
    old = tmp_path / "old"
    old.mkdir()
    settings = json.loads((out / "ladder.json").read_text())
    del settings["solver"]
    (old / "ladder.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"other settings \(solver: 'heun' there, 'dpm\+\+2m' now\)"):
        run_ladder(dataclasses.replace(config(old, data), solver="dpm++2m"))
    with pytest.raises(ValueError, match="solver='rk4': unknown"):
        run_ladder(dataclasses.replace(config(tmp_path / "new", data), solver="rk4"))


def test_bad_input(data, tmp_path, capsys):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="`configs`: unknown config 'H'"):
        run_ladder(dataclasses.replace(config(out, data), configs="B,H"))
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no ladder.json"):
        run_ladder(config(busy, data))
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit) as e:
        cli_main(["ladder", "--outdir", str(out), "--configs", "B,X", "--metrics", "fd_tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2 ladder: error: --configs: unknown config 'X'") and "\n" not in err
    assert not out.exists()
    # The library names LadderConfig's fields; the command shows its flags.
    for argv, needle in [(["--std", "0.05,0.5"], "error: --std [0.5]: every EMA length"),
                         (["--batch", "0"], "error: --batch 0: must be >= 1"),
                         (["--dynamics-probe", "0"], "error: --dynamics-probe 0: must be >= 1"),
                         (["--configs", "B,B"], "error: --configs B,B: a config is given twice")]:
        with pytest.raises(SystemExit):
            cli_main(["ladder", "--outdir", str(out), "--metrics", "fd_tiny", "--preset", "tiny", *argv])
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (argv, err)
        assert not out.exists()


def test_second_ladder_on_the_same_folder_refused(ladder, data):
    from edm2.utils.fileio import RunLock

    out, _ = ladder
    before = hashes(out)
    with RunLock(out):   # a ladder running on this folder (here: this process)
        with pytest.raises(EDM2Error, match="is in use by this process"):
            run_ladder(config(out, data))
    assert hashes(out) == before


def test_everything_checked_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "new"
    for argv, needle in [(["--seed", "-1"], "error: --seed -1: must be a whole number >= 0"),
                         (["--std", "0.05,0.0501"], "would share the snapshot file name"),
                         (["--duration", "12"], "--duration 12: must be a positive multiple"),
                         (["--data", str(tmp_path / "none")], str(tmp_path / "none")),
                         (["--metrics", "fd_classifier", "--detector-dir", str(tmp_path / "weights")],
                          "no classifier there")]:
        with pytest.raises(SystemExit):
            cli_main(["ladder", "--outdir", str(out), "--preset", "tiny", "--configs", "B,G", "--data", str(data),
                      "--metrics", "fd_tiny", "--duration", "32", "--snapshots", "2", *argv])
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (argv, err)
        assert not out.exists(), argv
        assert sorted(p.name for p in tmp_path.iterdir()) == [], argv


@pytest.mark.parametrize("damage", ["rung", "sweep"])
def test_damaged_records_named(ladder, data, tmp_path, damage):
    import shutil

    src, _ = ladder
    out = tmp_path / "out"
    shutil.copytree(src, out)
    if damage == "rung":
        path = out / "G" / "ladder-rung.json"
        path.write_text(path.read_text()[:40])          # truncated
    else:
        (out / "G" / "ladder-rung.json").unlink()
        path = out / "G" / "sweep" / "sweep.csv"
        path.write_text("config,value\nB,1\n")          # wrong columns
    with pytest.raises(EDM2Error, match="the file is damaged: delete it") as e:
        run_ladder(config(out, data))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_growth_factors():
    records = [
        {"nimg": 0, "net": "raw", "act_max": {"enc-16x16": 1.0, "dec-8x8": 2.0}},
        {"nimg": 0, "net": "ema", "act_max": {"enc-16x16": 1.0, "dec-8x8": 2.0}},
        {"nimg": 8, "net": "raw", "act_max": {"enc-16x16": 5.0, "dec-8x8": 3.0}},
        {"nimg": 8, "net": "ema", "act_max": {"enc-16x16": 1.5, "dec-8x8": 3.0}},
        {"nimg": 16, "net": "raw", "act_max": {"enc-16x16": 7.0, "dec-8x8": 1.0}},
    ]
    g = growth_factors(records)
    assert g["raw"] == {"first": 2.0, "last": 7.0, "growth": 3.5, "first_nimg": 0, "last_nimg": 16}
    assert g["ema"]["growth"] == 1.5 and g["ema"]["last_nimg"] == 8
    assert growth_factors(records, "weight_max") == {}
    late = growth_factors(records, from_nimg=8)
    assert late["raw"] == {"first": 5.0, "last": 7.0, "growth": 1.4, "first_nimg": 8, "last_nimg": 16}
    assert late["ema"]["growth"] == 1.0 and growth_factors(records, from_nimg=17) == {}


def test_default_ema_lengths_fit_the_profile_error_limit_of_the_default_snapshots():
    import numpy as np

    from edm2.ema.posthoc import plan_posthoc

    cfg = LadderConfig(outdir="")
    t = np.arange(1, cfg.snapshots + 1) * 4096  # the trainer's two profiles at each snapshot
    plan = plan_posthoc(np.repeat(t, 2), np.tile([0.05, 0.10], cfg.snapshots), cfg.sigma_rels, int(t[-1]))
    assert plan.fit_error.max() <= cfg.max_profile_error
    assert min(cfg.sigma_rels) < 0.05 and max(cfg.sigma_rels) > 0.2  # room for an interior optimum
    assert cfg.eval_seeds >= 2


def test_table_without_a_boundary_optimum():
    from edm2.analysis.ladder import LadderRung, format_table

    rung = LadderRung(config="G", title="t", params=10**6, nimg=32, best_sigma_rel=0.1, values={"m": 1.0}, sweep=[],
                      paper_fid=2.0, paper_sigma_rel=0.085, growth={}, spread={"m": 0.25}, best_range=[0.075, 0.15])
    table = format_table([rung], ["m"])
    assert "| 0.2500 | 0.075-0.150 |" in table and table.endswith("No best EMA length at a sweep boundary.\n")


def test_table_names_more_snapshots_only_for_an_optimum_at_the_shortest_length():
    from edm2.analysis.ladder import LadderRung, format_table

    sweep = [{"ema_std": s, "m": 1.0 + s} for s in (0.025, 0.05, 0.10)]
    def rung(best):
        return LadderRung(config="G", title="t", params=10**6, nimg=32, best_sigma_rel=best, values={"m": 1.0},
                          sweep=sweep, paper_fid=2.0, paper_sigma_rel=0.085, growth={}, spread={"m": 0.0},
                          best_range=[best, best], at_edge=True)
    assert format_table([rung(0.025)], ["m"]).endswith(
        "widen sigma_rels; a shorter length also needs more snapshots to be reconstructed faithfully): G (0.025).\n")
    assert format_table([rung(0.10)], ["m"]).endswith("widen sigma_rels): G (0.100).\n")
