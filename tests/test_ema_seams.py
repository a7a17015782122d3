"""Where the EMA trackers meet post-hoc EMA: snapshot names, run ids, models that change
shape or tie weights, non-finite and integer tensors, and the profile error of a
reconstruction (paper Sec. 3.1-3.2)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edm2.ema.posthoc import MAX_PROFILE_ERROR, find_phema_inputs, plan_posthoc, reconstruct
from edm2.ema.profiles import check_sigma_rel
from edm2.ema.trackers import PowerFunctionEMA, TraditionalEMA, reconstruct_state_dict
from edm2.io.snapshot import read_snapshot_meta, snapshot_name
from edm2.utils.errors import EDM2Error
from edm2.utils.fileio import LockError, RunLock
from helpers.cli import assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY = 8


class Net(torch.nn.Module):
    def __init__(self, tie=False, counter=torch.int64, rows=4):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.g = torch.nn.Parameter(torch.ones(rows, 4))
        if tie:
            self.b.weight = self.a.weight
        self.register_buffer("count", torch.zeros(3, dtype=counter))


def _train(folder, net=None, steps=8, bad_at=None, ema=None, start=0, **kw):
    """`steps` updates of EVERY images each, a snapshot after each; the parameters drift, the counter counts.
    bad_at: make the parameters NaN before that update."""
    net = net if net is not None else Net(**kw)
    ema = ema or PowerFunctionEMA(net, (0.05, 0.10), outdir=folder, snapshot_every=EVERY)
    for i in range(start, start + steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if bad_at == i:
                net.a.bias.fill_(float("nan"))
            net.count += 1
        ema.update(net, (i + 1) * EVERY)
    return net, ema


# -- snapshot file names -------------------------------------------------------------------------

def test_sigma_rels_that_share_a_file_name_are_refused():
    with pytest.raises(EDM2Error, match="sigma_rels=0.05,0.0504: 0.05 and 0.0504 would share the snapshot file "
                                        r"name \.\.\.-0\.050\.safetensors"):
        PowerFunctionEMA(Net(), (0.05, 0.0504))
    with pytest.raises(EDM2Error, match="every value must be different"):
        check_sigma_rel([0.1, 0.1], "sigma_rels", distinct=True)
    assert check_sigma_rel([0.05, 0.0504]).tolist() == [0.05, 0.0504]  # the math accepts any values
    from edm2.toy import ToyTrainConfig

    with pytest.raises(EDM2Error, match="0.05 and 0.0504 would share the snapshot file name"):
        ToyTrainConfig(sigma_rels=(0.05, 0.0504)).check()


# -- pairing by name and shape -------------------------------------------------------------------

def test_a_model_with_an_added_layer_is_refused():
    torch.manual_seed(0)
    net = Net()
    for ema in (PowerFunctionEMA(net, (0.05,)), TraditionalEMA(net, halflife_nimg=100)):
        net.extra = torch.nn.Linear(4, 4)
        with pytest.raises(EDM2Error, match=r"does not have the tracked parameters and buffers \(new in `net`: "
                                            r"\['extra.bias', 'extra.weight'\]"):
            ema.update(net, 8, 8)
        del net.extra


def test_a_parameter_of_another_shape_is_refused_not_broadcast():
    torch.manual_seed(0)
    tracked, other = Net(rows=1), Net(rows=4)  # g: (1, 4) tracked, (4, 4) given
    for ema in (PowerFunctionEMA(tracked, (0.05,)), TraditionalEMA(tracked, halflife_nimg=100)):
        with pytest.raises(EDM2Error, match=r"`net` has g of shape \(4, 4\) but the tracked one is \(1, 4\)"):
            ema.update(other, 8, 8)
        ema.update(tracked, 8, 8)  # the tracked model itself is fine


def test_parameters_are_paired_by_name():
    """A module whose parameters are registered in another order still gets each one's own average."""
    class A(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(4))
            self.y = torch.nn.Parameter(torch.ones(4))

    class B(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.y = torch.nn.Parameter(torch.full((4,), 3.0))
            self.x = torch.nn.Parameter(torch.full((4,), 2.0))

    ema = PowerFunctionEMA(A(), (0.05,))
    ema.update(B(), 4)  # the first update copies
    assert ema.nets[0.05].x.tolist() == [2.0] * 4 and ema.nets[0.05].y.tolist() == [3.0] * 4


# -- tied weights ----------------------------------------------------------------------------------

def test_tied_weights_are_written_and_reconstructed(tmp_path):
    torch.manual_seed(0)
    net, ema = _train(tmp_path, tie=True)
    model = reconstruct_state_dict(tmp_path, 0.05, model=Net(tie=True))
    assert torch.equal(model.a.weight, ema.nets[0.05].a.weight)  # a tracked profile comes back exactly
    assert model.b.weight is model.a.weight
    state = reconstruct_state_dict(tmp_path, 0.07)
    assert torch.equal(state["a.weight"], state["b.weight"])


# -- run ids ---------------------------------------------------------------------------------------

def test_two_runs_in_one_folder_are_refused_and_a_resumed_run_is_not(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path / "twice", steps=8)
    _train(tmp_path / "twice", steps=4)  # a script run again into the same outdir, stopped earlier
    ids = {read_snapshot_meta(p)["origin"]["run_id"] for p in (tmp_path / "twice").glob("snapshot-*")}
    assert len(ids) == 2
    with pytest.raises(EDM2Error, match="snapshots of different training runs"):
        reconstruct_state_dict(tmp_path / "twice", 0.07)
    assert_refused(["phema", "--rundir", tmp_path / "twice", "--outdir", tmp_path / "out", "--std", "0.07"],
                   watch=[tmp_path], match="snapshots of different training runs", code=2)

    net, ema = _train(tmp_path / "resumed", steps=4)
    state = ema.state_dict()
    resumed = PowerFunctionEMA(net, (0.05, 0.10), outdir=tmp_path / "resumed", snapshot_every=EVERY)
    resumed.load_state_dict(state, nimg=ema.nimg)
    assert resumed.run_id == ema.run_id
    _train(tmp_path / "resumed", net=net, ema=resumed, steps=4, start=4)
    assert len(find_phema_inputs(tmp_path / "resumed")) == 16
    reconstruct_state_dict(tmp_path / "resumed", 0.07)


# -- non-finite and integer tensors ----------------------------------------------------------------

def test_phema_refuses_a_diverged_run(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path / "run", bad_at=6)
    bad = tmp_path / "run" / snapshot_name(7 * EVERY, 0.05)
    assert_refused(["phema", "--rundir", tmp_path / "run", "--outdir", tmp_path / "out", "--std", "0.07"],
                   watch=[tmp_path], match=[f"{bad}: tensor a.bias holds NaN or infinite values"], code=2)
    with pytest.raises(EDM2Error, match="holds NaN or infinite values"):
        reconstruct_state_dict(tmp_path / "run", 0.07)
    # Before the divergence the run is fine.
    code, out, err = run_cli(["phema", "--rundir", tmp_path / "run", "--outdir", tmp_path / "out", "--std", "0.07",
                              "--at-nimg", str(6 * EVERY)])
    assert code == 0, err


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_integer_buffers_are_copied_from_the_latest_snapshot(tmp_path, dtype):
    torch.manual_seed(0)
    _train(tmp_path / "run", counter=dtype)
    code, out, err = run_cli(["phema", "--rundir", tmp_path / "run", "--outdir", tmp_path / "out", "--std", "0.07"])
    assert code == 0, err
    got = load_file(tmp_path / "out" / snapshot_name(8 * EVERY, 0.07))["count"]
    assert got.dtype == dtype and torch.equal(got, torch.full((3,), 8).to(dtype))


# -- profile error ---------------------------------------------------------------------------------

def test_reconstruction_between_snapshots_is_refused_above_the_profile_error_limit(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path / "run")
    inputs = find_phema_inputs(tmp_path / "run")
    plan = lambda at, s: plan_posthoc([r.nimg for r in inputs], [r.sigma_rel for r in inputs], [s], at)  # noqa: E731
    at = 6 * EVERY + 4  # half-way between two snapshots
    err = float(plan(at, 0.07).fit_error[0])
    assert err > MAX_PROFILE_ERROR
    with pytest.raises(EDM2Error, match=rf"max_profile_error=0.05: .* sigma_rel=0.07 at nimg {at} only with a "
                                        rf"{100 * err:.1f}% profile error"):
        reconstruct_state_dict(tmp_path / "run", 0.07, at=at)
    with pytest.raises(EDM2Error, match="profile error"):
        reconstruct(tmp_path / "run", tmp_path / "out", [0.07], at_nimg=at, progress=False)
    assert not (tmp_path / "out").exists()
    reconstruct_state_dict(tmp_path / "run", 0.07, at=at, max_profile_error=None)
    reconstruct_state_dict(tmp_path / "run", 0.07, at=at, max_profile_error=1.01 * err)
    # At the last snapshot the same EMA length is well within the limit.
    assert plan(8 * EVERY, 0.07).fit_error[0] < MAX_PROFILE_ERROR
    reconstruct_state_dict(tmp_path / "run", 0.07)


def test_cli_phema_max_profile_error(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path / "run")
    argv = ["phema", "--rundir", tmp_path / "run", "--outdir", tmp_path / "out", "--std", "0.07",
            "--at-nimg", str(6 * EVERY + 4)]
    assert_refused(argv, watch=[tmp_path], match=["--max-profile-error 0.05: the stored snapshots realise "
                                                   "sigma_rel=0.07", "--at-nimg"], code=2)
    assert_refused(argv + ["--max-profile-error", "-1"], watch=[tmp_path],
                   match="--max-profile-error -1.0: must be a finite number >= 0", code=2)
    assert_refused(argv + ["--max-profile-error", "x"], watch=[tmp_path], match="--max-profile-error 'x'", code=2)
    code, out, err = run_cli(argv + ["--max-profile-error", "none"])
    assert code == 0, err
    meta = read_snapshot_meta(tmp_path / "out" / snapshot_name(6 * EVERY + 4, 0.07))
    assert meta["origin"]["phema"]["fit_error"] > MAX_PROFILE_ERROR
    assert np.isfinite(meta["origin"]["phema"]["fit_error"])


# -- the output folder's lock ----------------------------------------------------------------------

def test_reconstruct_inside_the_callers_lock(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path / "run")
    with RunLock(tmp_path / "out"):
        with pytest.raises(LockError):
            reconstruct(tmp_path / "run", tmp_path / "out", [0.07], progress=False)
        (path,) = reconstruct(tmp_path / "run", tmp_path / "out", [0.07], progress=False, lock=False)
    assert path.is_file()


def test_the_documented_profile_errors():
    """docs/posthoc-ema.md's table: snapshots at t/n, ..., t of sigma_rel 0.05 and 0.10, wanted at t."""
    from pathlib import Path

    from edm2.ema.profiles import profile_fit_error, solve_posthoc_coefficients

    def shown(x):  # a percentage as the table writes it
        return "< 0.1 %" if x < 0.05 else f"{x:.0f} %" if x >= 10 else f"{x:.1f} %"

    text = (Path(__file__).parents[1] / "docs" / "posthoc-ema.md").read_text()
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| snapshots n |"))
    outs = [float(c.strip().split()[-1]) for c in lines[head].strip("|").split("|")[1:]]
    rows = [line.strip("|").split("|") for line in lines[head + 2:] if line.startswith("| ")]
    assert len(rows) == 3
    for row in rows:
        n = int(row[0])
        t, s = np.repeat(np.arange(1, n + 1) / n, 2), np.tile([0.05, 0.10], n)
        got = profile_fit_error(t, s, solve_posthoc_coefficients(t, s, 1.0, outs), 1.0, outs)
        assert [shown(100 * x) for x in got] == [c.strip() for c in row[1:]], n
