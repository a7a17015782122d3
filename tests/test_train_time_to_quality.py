"""benchmarks/time_to_quality.py: its options, keep points and the authors' side skipped without --ref
(the training itself is checked by running the script; it takes minutes)."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).parents[1] / "benchmarks" / "time_to_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("time_to_quality_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(bench, capsys):
    args = bench.parse_args(["--ref-stats", "r.npz"])
    assert args.minutes == [2.5, 5.0, 10.0] and args.num == 1000 and args.ema == [0.1]
    assert bench.parse_args(["--ref-stats", "r.npz", "--ema", "0.1,0.05"]).ema == [0.05, 0.1]
    assert args.sides == ["edm2", "authors"]
    assert (args.solver, args.steps) == ("dpm++2m", 16)   # make demo's sampler
    assert args.guide_at == pytest.approx(1 / 6)
    assert bench.keep_points(args) == [(2.5, "budget2.5"), (5.0, "budget5.0"), (10.0, "budget10.0")]
    args = bench.parse_args(["--ref-stats", "r.npz", "--minutes", "10,2", "--guidance", "2", "--guide-at", "0.5"])
    assert bench.keep_points(args) == [(1.0, "guide2.0"), (2.0, "budget2.0"), (5.0, "guide10.0"),
                                       (10.0, "budget10.0")]
    for bad in (["--minutes", "0,5"], ["--minutes", "x"], ["--num", "1"], ["--sides", "edm2,theirs"],
                ["--guide-at", "1"], ["--ema", "0.2"],
                ["--ema", "0.05,x"], ["--solver", "rk4"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--ref-stats", "r.npz", *bad])
    with pytest.raises(SystemExit):
        bench.parse_args([])  # --ref-stats is required
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["-h"])
    assert e.value.code == 0 and "--ref DIR" in capsys.readouterr().out


def test_authors_side_skipped_without_a_checkout(bench, tmp_path, capsys):
    """No --ref (or a folder without their code): a message, and nothing else is loaded or trained."""
    missing = str(tmp_path / "no-such-stats.npz")   # never read: only the authors' side was asked for
    assert bench.main(["--ref-stats", missing, "--sides", "authors"]) == 0
    assert "no --ref given: the authors' side is skipped" in capsys.readouterr().out
    assert bench.main(["--ref-stats", missing, "--sides", "authors", "--ref", str(tmp_path)]) == 0
    assert "no training/networks_edm2.py there" in capsys.readouterr().out
    assert bench.reference_code(None)[0] is None
    assert not list(tmp_path.iterdir())


def test_table(bench):
    row = dict(side="edm2", minutes=2.5, nimg=4096, img_per_s=27.31, ema=0.1, fd_classifier=1.23456, consistency=0.5)
    assert bench.table([row]).splitlines()[-1] == "| edm2 | 2.5 | 4096 | 27.3 | 0.100 | 1.235 | 0.500 |"
