"""`edm2 phema --rundir` on a folder of the authors' raw snapshots
(network-snapshot-<kimg>-<sigma_rel>.pkl, written in the published format)."""
from __future__ import annotations

import pytest
import torch

import helpers.official as fmt
from edm2.cli import main
from edm2.ema.profiles import solve_posthoc_coefficients
from edm2.io.snapshot import load_snapshot, read_snapshot_meta

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "cache"))


def test_phema_on_raw_published_snapshots(tmp_path):
    raw = tmp_path / "raw-snapshots" / "edm2-img512-xs"
    raw.mkdir(parents=True)
    runs = [(1, 0.050), (1, 0.100), (2, 0.050), (2, 0.100), (3, 0.050), (3, 0.100)]
    states = {}
    for i, (kimg, sigma_rel) in enumerate(runs):
        net = fmt.make_tiny_net(seed=0)  # one run: same buffers (fixed at initialisation) ...
        with torch.no_grad():  # ... different EMA weights
            g = torch.Generator().manual_seed(100 + i)
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        fmt.write_published(raw / f"network-snapshot-{kimg:07d}-{sigma_rel:.3f}.pkl", net)
        states[(kimg, sigma_rel)] = {k: v.half().float() for k, v in net.state_dict().items()}

    out = tmp_path / "out"
    assert main(["phema", "--rundir", str(raw), "--outdir", str(out), "--std", "0.07"]) == 0
    # kimg 3 -> nimg 3072 (docs/design.md#post-hoc-reconstruction), the last snapshot's time.
    path = out / "snapshot-000000003072-0.070.safetensors"
    net, meta = load_snapshot(path)
    assert meta["nimg"] == 3072 and meta["ema_std"] == 0.07
    assert meta["net_kwargs"]["model_channels"] == fmt.TINY_KWARGS["model_channels"]
    # The reconstruction is the documented linear combination of the published weights.
    nimg = [(kimg * 1000 + 999) // 1024 * 1024 for kimg, _ in runs]
    X = solve_posthoc_coefficients(nimg, [s for _, s in runs], 3072, [0.07])[:, 0]
    assert abs(X.sum() - 1) < 1e-9 and X.min() < 0 < X.max()  # a genuine (signed) combination
    params = {k for k, _ in net.named_parameters()}
    got = net.state_dict()
    for k in params:
        want = sum(float(c) * states[r][k] for c, r in zip(X, runs))
        tol = 1e-3 * want.abs().max().item() + 1e-6  # outputs keep the inputs' fp16 storage
        assert (got[k] - want).abs().max().item() <= tol, k
    for k in set(got) - params:  # buffers: copied from the inputs
        assert torch.equal(got[k], states[runs[-1]][k]), k
    # The converted inputs live in the cache, not beside the authors' files.
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"network-snapshot-{k:07d}-{s:.3f}.pkl" for k, s in runs)
    assert read_snapshot_meta(path)["origin"]["phema"]["inputs"]
