import json
import math

import pytest
import torch

from edm2.analysis.dynamics import (
    DynamicsTracker,
    bucket_of,
    find_layers,
    load_dynamics,
    make_measurement_batch,
    measure,
    plot_dynamics,
    plot_loss_profile,
    relative_updates,
    weight_magnitudes,
)
from edm2.nn import Precond
from edm2.presets import get_preset
from helpers import write_run

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyUNet(torch.nn.Module):
    """Two 'levels' with EDM-style module names: enc['8x8_conv'] is a 1x1 conv
    (scaled identity), dec['4x4_block0'] holds a conv with a bias and a
    1-D norm scale (both excluded from the weight analysis)."""

    def __init__(self, k=1.0, channels=4):
        super().__init__()
        self.enc = torch.nn.ModuleDict({"8x8_conv": torch.nn.Conv2d(channels, channels, 1, bias=False)})
        block = torch.nn.Module()
        block.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        block.norm = torch.nn.GroupNorm(1, channels)
        self.dec = torch.nn.ModuleDict({"4x4_block0": block})
        with torch.no_grad():
            self.enc["8x8_conv"].weight.copy_(k * torch.eye(channels).reshape(channels, channels, 1, 1))

    def forward(self, x, sigma, labels=None):
        h = self.enc["8x8_conv"](x)
        b = self.dec["4x4_block0"]
        return b.norm(b.conv(torch.nn.functional.avg_pool2d(h, 2))).repeat_interleave(2, 2).repeat_interleave(2, 3)


def _unit_batch(n=64, channels=4, res=8, seed=0):
    # Clean images 0 and sigma 1: the network input is unit-normal noise.
    return make_measurement_batch(torch.zeros(n, channels, res, res), sigma=torch.ones(n), seed=seed)


def test_bucket_names():
    assert bucket_of("unet.enc.32x32_block1.conv_res0") == "enc-32x32"
    assert bucket_of("unet.dec.8x8_in0.attn_qkv") == "dec-8x8"
    assert bucket_of("model.enc.64x64_conv") == "enc-64x64"
    assert bucket_of("unet.emb_noise") is None
    assert bucket_of("unet.out_conv") is None


def test_identity_conv_has_unit_activation_and_scales_with_k():
    batch = _unit_batch()
    m1 = measure(ToyUNet(1.0), batch)
    m3 = measure(ToyUNet(3.0), batch)
    # Unit-normal input through an identity 1x1 conv: per-feature RMS over 64 positions ~ 1.
    assert m1["act_mean"]["enc-8x8"] == pytest.approx(1.0, abs=0.03)
    assert m3["act_mean"]["enc-8x8"] == pytest.approx(3 * m1["act_mean"]["enc-8x8"], rel=1e-5)
    assert m3["act_max"]["enc-8x8"] == pytest.approx(3 * m1["act_max"]["enc-8x8"], rel=1e-5)
    # Weight rows of k*I (4 inputs): RMS k/2.
    assert m1["weight_max"]["enc-8x8"] == pytest.approx(0.5)
    assert m3["weight_mean"]["enc-8x8"] == pytest.approx(1.5)
    # Only tensors with >= 2 dims: the decoder conv weight, not its bias nor the GroupNorm scale.
    names = [layer.name for layer in find_layers(ToyUNet())]
    assert names == ["enc.8x8_conv.weight", "dec.4x4_block0.conv.weight"]
    # The decoder conv's activation is measured after its bias.
    net = ToyUNet()
    with torch.no_grad():
        net.dec["4x4_block0"].conv.weight.zero_()
        net.dec["4x4_block0"].conv.bias.fill_(2.0)
    assert measure(net, batch)["act_max"]["dec-4x4"] == pytest.approx(2.0)


def test_weight_magnitude_scales_linearly():
    torch.manual_seed(0)
    net = ToyUNet()
    base = weight_magnitudes(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.5)
    scaled = weight_magnitudes(net)
    for key in ("weight_max", "weight_mean"):
        for b in base[key]:
            assert scaled[key][b] == pytest.approx(2.5 * base[key][b], rel=1e-6)


def test_relative_update():
    net = ToyUNet()
    before = {layer.name: layer.weight.detach().clone() for layer in find_layers(net)}
    with torch.no_grad():
        net.enc["8x8_conv"].weight.mul_(1.1)
    upd = relative_updates(net, before)
    assert upd["enc-8x8"] == pytest.approx(0.1, rel=1e-5)
    assert upd["dec-4x4"] == 0.0


def _tiny_g(label_dim=0, seed=0):
    torch.manual_seed(seed)
    return Precond(**get_preset("tiny").net_kwargs(label_dim))


def test_buckets_of_the_tiny_g_network():
    net = _tiny_g()
    layers = find_layers(net)
    assert sorted({layer.bucket for layer in layers}) == ["dec-16x16", "dec-8x8", "enc-16x16", "enc-8x8"]
    by_name = {layer.name: layer.bucket for layer in layers}
    assert by_name["unet.enc.16x16_conv.weight"] == "enc-16x16"
    assert by_name["unet.enc.8x8_down.conv_res0.weight"] == "enc-8x8"
    assert by_name["unet.dec.8x8_in0.attn_qkv.weight"] == "dec-8x8"
    assert by_name["unet.dec.16x16_up.emb_linear.weight"] == "dec-16x16"
    # Embedding network, output conv and u(sigma) are outside the encoder/decoder; gains are excluded.
    assert not any("emb_noise" in n or "out_conv" in n or "logvar" in n or "gain" in n for n in by_name)


def test_measure_tiny_g():
    net = _tiny_g()
    batch = make_measurement_batch(torch.randn(24, 1, 16, 16) * 0.5, seed=1, P_mean=-0.8, P_std=1.6, bins=4)
    m = measure(net, batch, batch_size=10)
    # N(0,1) initial weights: every row has RMS close to 1.
    for b, v in m["weight_mean"].items():
        assert v == pytest.approx(1.0, abs=0.15), b
    # The per-block embedding projection is measured after its gain, which starts at 0.
    emb = [v for n, v in m["layers"].items() if n.endswith("emb_linear.weight")]
    assert emb and all(e["act_max"] == 0.0 for e in emb)
    # Loss per bin: 4 bins of 6 samples each, in increasing sigma. At init the output gain is 0, so
    # D = c_skip x, and with data of std sigma_data lambda(sigma) * E(D - y)^2 = 1 at every sigma (Eq. 15).
    assert len(m["loss"]) == 4 and m["loss_sigma"] == sorted(m["loss_sigma"])
    assert m["loss"] == pytest.approx([1.0] * 4, abs=0.15)
    assert len(m["u"]) == len(m["u_sigma"]) == 24
    # The training mode is restored and the measurement is repeatable.
    assert net.training
    assert measure(net, batch, batch_size=10)["act_max"] == m["act_max"]
    # The number of items per network call changes nothing that is measured.
    whole = measure(net, batch, batch_size=24)
    assert whole["act_max"] == pytest.approx(m["act_max"], rel=1e-5)
    assert whole["act_mean"] == pytest.approx(m["act_mean"], rel=1e-5)
    assert whole["loss"] == pytest.approx(m["loss"], rel=1e-5) and whole["weight_max"] == m["weight_max"]


def test_tracker_writes_and_truncates_on_resume(tmp_path):
    net = ToyUNet()
    batch = _unit_batch(16)
    tr = DynamicsTracker(tmp_path, batch)
    tr.measure(0, {"ema": net, "raw": net})
    with torch.no_grad():
        net.enc["8x8_conv"].weight.mul_(1.2)
    net.enc["8x8_conv"].weight.grad = torch.full_like(net.enc["8x8_conv"].weight, 0.5)
    tr.measure(64, {"ema": net, "raw": net}, grad_net=net, grad_scale=2.0)
    recs = load_dynamics(tmp_path)
    assert [(r["nimg"], r["net"]) for r in recs] == [(0, "ema"), (0, "raw"), (64, "ema"), (64, "raw")]
    assert recs[0]["update"] is None
    assert recs[2]["update"]["enc-8x8"] == pytest.approx(0.2, rel=1e-5)
    assert recs[3]["grad_norm"] == pytest.approx(0.5 * 4 / 2.0)   # ||0.5 * ones(16)|| / 2
    # Resuming from the checkpoint at 0 drops the later records.
    DynamicsTracker(tmp_path, batch, start_nimg=0)
    assert [r["nimg"] for r in load_dynamics(tmp_path)] == [0, 0]
    # A line cut short at the end is ignored; one in the middle is an error.
    with open(tmp_path / "dynamics.jsonl", "a") as f:
        f.write('{"nimg": 12')
    assert len(load_dynamics(tmp_path)) == 2


def _synthetic_run(folder, growth):
    folder.mkdir()
    with open(folder / "dynamics.jsonl", "w") as f:
        for i in range(6):
            nimg = i * 2 ** 20
            rec = {"nimg": nimg, "net": "ema"}
            for q in ("act_max", "act_mean", "weight_max", "weight_mean"):
                buckets = ["enc-32x32", "enc-16x16", "dec-16x16", "dec-32x32"]
                rec[q] = {b: 1.0 + growth * i * (k + 1) for k, b in enumerate(buckets)}
            rec["update"] = None if i == 0 else {"enc-32x32": 0.01, "dec-32x32": 0.02}
            rec["loss_sigma"], rec["loss"] = [0.1, 1.0, 10.0], [0.5, 0.3, 0.2]
            rec["u_sigma"], rec["u"] = [0.1, 1.0, 10.0], [math.log(0.5), math.log(0.3), math.log(0.2)]
            f.write(json.dumps(rec) + "\n")
    return folder


def test_plots_write_pngs(tmp_path):
    a = _synthetic_run(tmp_path / "C", 20.0)
    b = _synthetic_run(tmp_path / "G", 0.0)
    png = plot_dynamics([a, b], tmp_path / "dyn.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "dyn.png").read_bytes() == png
    png = plot_loss_profile([a, b], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no dynamics.jsonl"):
        plot_dynamics([tmp_path], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no records of the 'raw'"):
        plot_dynamics([a], tmp_path / "x.png", net="raw")


def test_plot_command(tmp_path, capsys):
    from edm2.cli import main

    a = _synthetic_run(tmp_path / "C", 20.0)
    b = _synthetic_run(tmp_path / "G", 0.0)
    main(["dynamics", "plot", str(a), str(b), "--out", str(tmp_path / "fig.png"), "--labels", "C,G"])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fig-loss.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["dynamics", "plot", str(empty), "--out", str(tmp_path / "bad.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no dynamics.jsonl" in err and str(empty) in err
    assert not (tmp_path / "bad.png").exists()


def test_adm_network_buckets_and_no_uncertainty():
    """Configs A/B (EDM's ADM names: model.enc['16x16_block0'].conv0, .affine, .qkv, ...): every weight is found
    and measured after its bias; config A has no u(sigma), config B has one."""
    adm = pytest.importorskip("edm2.nn.adm")
    for uncertainty in (False, True):
        torch.manual_seed(0)
        net = adm.ADMPrecond(16, 1, 0, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                             channels_per_head=16, uncertainty=uncertainty, precision="fp32")
        layers = find_layers(net)
        assert sorted({layer.bucket for layer in layers}) == ["dec-16x16", "dec-8x8", "enc-16x16", "enc-8x8"]
        assert all(layer.hooked for layer in layers)
        assert "model.dec.8x8_in0.qkv.weight" in [layer.name for layer in layers]
        batch = make_measurement_batch(torch.randn(16, 1, 16, 16) * 0.5, seed=0, P_mean=-1.2, P_std=1.2, bins=4)
        m = measure(net, batch)
        assert ("u" in m) == uncertainty
        # The zero-initialised last layers make D = c_skip x: the weighted loss is 1 at every sigma.
        assert m["loss"] == pytest.approx([1.0] * 4, abs=0.15)


def test_measure_stored_snapshots(tmp_path, capsys):
    import numpy as np

    from edm2.cli import main
    from edm2.data import convert_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    convert_dataset(tmp_path / "d.npz", tmp_path / "data", progress=False, workers=1)
    net = _tiny_g()

    def net_at(nimg):   # the weights grow by 1.5 from the first snapshot to the second
        with torch.no_grad():
            for layer in find_layers(net):
                layer.weight.mul_(1.5 if nimg == 128 else 1.0)
        return net

    run = write_run(tmp_path / "run", times=(64, 128), sigma_rels=(0.05, 0.1), data=tmp_path / "data",
                    config={"data": str(tmp_path / "data"), "seed": 3, "P_mean": -0.8, "P_std": 1.6}, net_at=net_at)
    main(["dynamics", "measure", str(run), "--probe", "8", "--device", "cpu"])
    recs = load_dynamics(run)     # no dynamics.jsonl: the snapshot records
    assert [(r["nimg"], r["ema_std"], r["net"]) for r in recs] == [(64, 0.1, "ema"), (128, 0.1, "ema")]
    assert recs[1]["update"]["enc-16x16"] == pytest.approx(0.5, rel=1e-5)
    for b, v in recs[0]["weight_max"].items():
        assert recs[1]["weight_max"][b] == pytest.approx(1.5 * v, rel=1e-5)
    main(["dynamics", "plot", str(run), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p-loss.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["dynamics", "measure", str(run), "--ema-std", "0.2"])
    assert "--ema-std 0.2: the run stores the EMA lengths 0.050, 0.100" in capsys.readouterr().err


def test_measure_never_truncates_and_refuses_bad_counts(tmp_path):
    import numpy as np

    from edm2.data import convert_dataset
    from helpers.cli import assert_refused

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    convert_dataset(tmp_path / "d.npz", tmp_path / "data", progress=False, workers=1)
    run = write_run(tmp_path / "run", times=(64, 128), sigma_rels=(0.05, 0.1), data=tmp_path / "data",
                    config={"data": str(tmp_path / "data"), "seed": 3}, net_at=lambda nimg: _tiny_g())
    log = run / "stats.jsonl"
    log.write_text('{"nimg": 64, "loss": 0.5}\n')
    mine = tmp_path / "mine.jsonl"
    mine.write_text("kept\n")
    base = ["dynamics", "measure", run, "--device", "cpu"]
    # The run's own training log is never replaced, with or without --overwrite.
    for extra in ([], ["--overwrite"]):
        assert_refused(base + ["--probe", "8", "--out", log, *extra], watch=[tmp_path],
                       match=["is a file of the run itself"])
    assert_refused(base + ["--probe", "8", "--out", mine], watch=[tmp_path],
                   match=[f"--out {mine}: already exists", "--overwrite"])
    for extra, needle in [(["--probe", "0"], "--probe 0: must be a whole number >= 1"),
                          (["--probe", "-3"], "--probe -3: must be"),
                          (["--ema-std", "nan"], "--ema-std nan: must be a finite number"),
                          (["--ema-std", "inf"], "--ema-std inf: must be a finite number")]:
        assert_refused(base + extra, watch=[tmp_path], match=[needle])
    # With --overwrite an earlier output is replaced, atomically, at the end.
    from edm2.cli import main
    main([str(a) for a in base + ["--probe", "8", "--out", mine, "--overwrite"]])
    assert [json.loads(line)["nimg"] for line in mine.read_text().splitlines()] == [64, 128]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_plot_refuses_existing_files(tmp_path):
    from edm2.cli import main
    from helpers.cli import assert_refused

    a = _synthetic_run(tmp_path / "C", 20.0)
    (tmp_path / "fig-loss.png").write_bytes(b"mine")
    assert_refused(["dynamics", "plot", a, "--out", tmp_path / "fig.png"], watch=[tmp_path],
                   match=["fig-loss.png already exists", "--overwrite"])
    main(["dynamics", "plot", str(a), "--out", str(tmp_path / "fig.png"), "--overwrite"])
    assert (tmp_path / "fig-loss.png").read_bytes()[:4] == b"\x89PNG"


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in records]


def test_hook_schedule():
    from edm2.analysis.dynamics import DynamicsHook

    hook = DynamicsHook(24)
    # Batch 8, 64 images: image 0, the first maintenance point at or after 24 and 48, and the end.
    assert [n for n in range(0, 72, 8) if hook.due(n, 8, 0, 64)] == [0, 24, 48, 64]
    assert [n for n in range(0, 72, 16) if hook.due(n, 16, 0, 64)] == [0, 32, 48, 64]
    # A resumed session does not measure again at its first image (measured before that checkpoint).
    assert [n for n in range(32, 72, 8) if hook.due(n, 8, 32, 64)] == [48, 64]
    with pytest.raises(ValueError, match="dynamics=0"):
        DynamicsHook(0)


def test_train_records_dynamics_and_resumes_identically(tmp_path):
    import numpy as np

    from edm2.data import convert_dataset
    from edm2.train.loop import TrainConfig, train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 16, 16), dtype=np.uint8))
    convert_dataset(tmp_path / "d.npz", tmp_path / "data", progress=False, workers=1)
    common = dict(data=str(tmp_path / "data"), preset="tiny", duration=64, snapshot=32, checkpoint=32, grid=0,
                  dynamics=16, dynamics_probe=8, progress=False)
    train(TrainConfig(outdir=str(tmp_path / "a"), **common))
    recs = load_dynamics(tmp_path / "a")
    assert [(r["nimg"], r["net"]) for r in recs] == [(n, t) for n in (0, 16, 32, 48, 64) for t in ("ema", "raw")]
    assert recs[0]["update"] is None and recs[2]["update"]["enc-16x16"] > 0
    assert "grad_norm" not in recs[1] and recs[3]["grad_norm"] > 0
    assert sorted(recs[0]["act_max"]) == ["dec-16x16", "dec-8x8", "enc-16x16", "enc-8x8"]
    # Interrupted after 32 images and resumed: the same records, updates included (the measurement batch comes from
    # the seed; the weights at the checkpoint are those of the last measurement).
    train(TrainConfig(outdir=str(tmp_path / "b"), slice=32, **common))
    assert [r["nimg"] for r in load_dynamics(tmp_path / "b")] == [0, 0, 16, 16, 32, 32]
    train(TrainConfig(outdir=str(tmp_path / "b"), **common))
    assert _strip(load_dynamics(tmp_path / "b")) == _strip(recs)
    with pytest.raises(ValueError, match="dynamics_probe=0"):
        train(TrainConfig(outdir=str(tmp_path / "c"), **{**common, "dynamics_probe": 0}))
    assert not (tmp_path / "c").exists()
