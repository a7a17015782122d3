"""The scripts of examples/ run and print the right result: an EMA length
reconstructed post hoc from two tracked ones (paper Sec. 3.2) is close to the
same length tracked directly."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"post-hoc sigma_rel 0.07 vs tracked: max relative difference (\S+)", out.stdout)
    assert m, out.stdout
    snapshots = re.search(r"snapshots: (\S+)", out.stdout).group(1)
    files = sorted(Path(snapshots).glob("snapshot-*.safetensors"))  # JSON metadata in the safetensors header
    shutil.rmtree(snapshots)
    assert len(files) == 2 * 10  # 2 profiles x 10 snapshots (every 20 of 200 steps)
    return float(m.group(1))


def test_plain_pytorch_example():
    diff = run_example("posthoc_ema_plain.py")
    assert 0 < diff < 1e-2, diff


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="accelerate is not installed (pip install accelerate, or the 'test' extra)")
def test_accelerate_example():
    diff = run_example("posthoc_ema_accelerate.py")
    assert 0 < diff < 1e-2, diff
