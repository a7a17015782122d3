"""Configs C-G of the paper's ablation ladder (Table 1): sizes, flops, and the
property that defines each rung."""
import json
import math

import pytest
import torch

import edm2.nn.rungs as ladder
from edm2.analysis.flops import count_network
from edm2.loss import EDM2Loss
from edm2.nn import CONFIGS, LadderPrecond, Precond, build_network, mp_cat, mp_silu, mp_sum, network_config
from edm2.nn.layers import MPConv, MPFourier
from edm2.presets import RECIPES, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], channels_per_head=16)


def tiny(config, seed=0, **kw):
    torch.manual_seed(seed)
    return build_network(config, **{**TINY, **kw})


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g))
    labels = torch.eye(10)[torch.randint(10, (n,), generator=g)]
    return x, sigma, labels


# ---------------------------------------------------------------------------
# Table 1 sizes.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config,expected", [("C", 277_816_512), ("D", 277_816_512), ("E", 277_816_512),
                                             ("F", 280_212_672), ("G", 280_212_709)])
def test_parameter_counts_match_table1(config, expected):
    kw = get_preset("img512-s", config).net_kwargs(1000)
    with torch.device("meta"):
        net = build_network(config, **kw)
    u = sum(p.numel() for n, p in net.named_parameters() if n.startswith("logvar_"))
    assert u == 128  # u(sigma): one fully connected layer over 128 Fourier features, no bias
    assert sum(p.numel() for p in net.parameters()) - u == expected
    assert round(expected / 1e6, 1) == RECIPES[config].mparams


def test_f_state_dict_is_g_without_gains():
    f, g = tiny("F").state_dict(), tiny("G").state_dict()
    gains = {k for k in g if k.endswith("emb_gain") or k == "unet.out_gain"}
    assert len(gains) == 10 + 1 and set(f) == set(g) - gains  # 10 blocks and the output
    assert all(f[k].shape == g[k].shape for k in f)


@pytest.mark.parametrize("config,macs,elementwise,casts", [
    ("C", 99_800_070_144, 233_304_792, 303_820_960),
    ("D", 99_800_070_144, 1_066_860_508, 303_820_960),
    ("E", 99_800_070_144, 1_066_860_508, 303_820_960),
    ("F", 100_818_696_192, 1_020_628_348, 275_942_528),
    ("G", 100_818_696_192, 1_091_237_345, 275_942_528),
])
def test_flops_match_table1(config, macs, elementwise, casts):
    r = count_network("img512-s", config=config)
    assert (r.macs_matmul, r.ops_elementwise, r.ops_casts) == (macs, elementwise, casts)
    assert round(r.total_mixed / 1e9, 1) == RECIPES[config].gflops  # Table 1, to its printed precision


# ---------------------------------------------------------------------------
# The factory.
# ---------------------------------------------------------------------------

def test_factory_builds_every_rung_with_one_signature():
    x, sigma, labels = inputs()
    for config in "CDEFG":
        net = tiny(config).eval()
        assert network_config(net) == config
        assert isinstance(net, LadderPrecond) == (config in "CDEF")
        d, u = net(x, sigma, labels, return_logvar=True)
        assert d.shape == x.shape and u.shape == (4, 1, 1, 1)
        assert torch.isfinite(d).all()
    assert Precond.config == "G" and tiny("G").__class__ is Precond


def test_unknown_config_names_the_allowed_values():
    for bad in ("H", "g", "", None, "AB"):
        with pytest.raises(ValueError, match="allowed: A, B, C, D, E, F, G"):
            build_network(bad, **TINY)
    assert CONFIGS == ("A", "B", "C", "D", "E", "F", "G")


# ---------------------------------------------------------------------------
# The property that defines each rung.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", "CDEFG")
def test_uncertainty_is_in_the_loss(config):
    """B and later: u(sigma) enters the loss (Eq. 21) and is trained with the network."""
    net = tiny(config).train()
    x, _, labels = inputs()
    loss = EDM2Loss(P_mean=-0.8, P_std=1.6)(net, x, labels, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert net.logvar_linear.weight.grad.abs().sum() > 0
    # d loss / d u = 1 - weighted error, per element: the loss moves with u.
    with torch.no_grad():
        net.logvar_linear.weight.mul_(-1)
    loss2 = EDM2Loss(P_mean=-0.8, P_std=1.6)(net, x, labels, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(loss, loss2)


@pytest.mark.parametrize("config", "CDEFG")
def test_no_biases_and_a_constant_input_channel(config):
    net = tiny(config)
    for name, p in net.named_parameters():
        assert name.endswith("weight") or name.endswith("_gain"), name  # no bias anywhere (App. B.3)
        assert p.ndim >= 2 or name.endswith("_gain")
    conv = net.unet.enc["16x16_conv"]
    assert conv.weight.shape[1] == TINY["img_channels"] + 1
    # With a zero image the first conv still sees the constant-1 channel: its output is not zero.
    out = {}
    conv.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    net.eval()(torch.zeros(1, 1, 16, 16), torch.ones(1) * 1e-3, torch.eye(10)[:1])
    assert out["y"].abs().amax() > 0.01


@pytest.mark.parametrize("config", "CDEFG")
def test_cosine_attention_ignores_query_key_value_magnitudes(config):
    """C and later: q, k and v are normalised per head, so scaling the qkv
    projection by any factor changes nothing (Eqs. 30-34)."""
    net = tiny(config).eval()
    block = net.unet.enc["8x8_block0"]
    assert block.num_heads == 2
    x = torch.randn(2, block.out_channels, 8, 8)
    with torch.no_grad():
        ref = block.attention(x)
        if config == "C":  # no weight normalisation: the stored magnitude is the used one
            block.attn_qkv.weight.mul_(7.0)
        else:  # weight-normalised layers ignore stored magnitudes anyway; scale the input instead
            x = x * 7.0
        y = block.attention(x)
        # A dot-product attention would sharpen its softmax 49-fold and scale v by 7.
        assert (y - ref).norm() / ref.norm() < 1e-3  # (the 1e-4 epsilon of the normalisation)


def test_d_normalises_weights_on_use():
    """D: standard weight normalisation (Eq. 47): the layer's output does not
    depend on the stored weight's norm, and the gradient is orthogonal to w (Eq. 59)."""
    net = tiny("D").train()
    layer = net.unet.enc["16x16_block0"].conv_res0
    assert isinstance(layer, ladder.LadderConv) and layer.weight_norm == "standard"
    x = torch.randn(2, layer.in_channels, 16, 16)
    y = layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-5)
    stored = layer.weight.detach().clone()
    layer(x).square().sum().backward()
    assert torch.equal(layer.weight, stored)  # standard WN never rewrites the stored weight
    w, g = layer.weight.flatten(1), layer.weight.grad.flatten(1)
    cos = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1))
    assert cos.abs().max() < 1e-4 and g.norm() > 0
    # C, by contrast, uses its weights as stored.
    c = tiny("C").unet.enc["16x16_block0"].conv_res0
    y = c(x)
    with torch.no_grad():
        c.weight.mul_(3.0)
    torch.testing.assert_close(c(x), 3 * y, rtol=1e-4, atol=1e-5)


def _norms_after_steps(config, steps=3):
    net = tiny(config).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, sigma, labels = inputs()
    for _ in range(steps):
        opt.zero_grad()
        d, u = net(x, sigma, labels, return_logvar=True)
        (d.square().sum() + u.sum()).backward()
        opt.step()
    net(x, sigma, labels, return_logvar=True)  # forced weight normalisation happens on the next training-mode use
    out = {}
    for name, p in net.named_parameters():
        if name.endswith("weight"):
            out[name] = (p.detach().flatten(1).norm(dim=1), math.sqrt(p[0].numel()))
    return out


@pytest.mark.parametrize("config", "EFG")
def test_forced_weight_normalisation_keeps_rows_at_sqrt_fan_in(config):
    """E and later: after optimiser steps every weight row has norm sqrt(fan_in) (Eq. 66)."""
    norms = _norms_after_steps(config)
    assert len(norms) > 10
    for name, (n, target) in norms.items():
        # normalize() adds 1e-4 to the RMS: rows land within 1e-4 relative of sqrt(fan_in)
        torch.testing.assert_close(n, torch.full_like(n, target), rtol=2e-4, atol=0, msg=name)


def test_without_forced_weight_normalisation_norms_drift():
    """D (standard weight normalisation only): Adam steps grow the raw weight norms (Sec. 2.3)."""
    norms = _norms_after_steps("D")
    grown = [name for name, (n, target) in norms.items() if (n > target * 1.001).any()]
    assert len(grown) > len(norms) // 2


def test_f_has_no_group_normalisation(monkeypatch):
    calls = {"n": 0}
    real = ladder.group_rms_norm

    def counting(x, groups, eps=1e-4):
        calls["n"] += 1
        return real(x, groups, eps)

    monkeypatch.setattr(ladder, "group_rms_norm", counting)
    x, sigma, labels = inputs()
    for config, expected in (("C", 2 * 10 + 1), ("E", 2 * 10 + 1), ("F", 0)):
        calls["n"] = 0
        tiny(config).eval()(x, sigma, labels)
        assert calls["n"] == expected, config  # two per block (10 blocks) plus the output block


@pytest.mark.parametrize("config,invariant", [("E", False), ("F", True), ("G", True)])
def test_encoder_main_path_is_pixel_normalised(config, invariant):
    """F and later: PixNorm at the start of every encoder block, so an encoder
    block does not see the magnitude of its input; in E the main path carries it."""
    net = tiny(config).eval()
    emb = torch.randn(2, 32)
    for name in ("16x16_block0", "8x8_down", "8x8_block0"):
        block = net.unet.enc[name]
        r = 8 if name == "8x8_block0" else 16
        x = torch.randn(2, block.in_channels, r, r)
        y = block(x, emb)
        change = ((block(5 * x, emb) - y).norm() / y.norm()).item()
        assert (change < 1e-3) == invariant, (name, change)  # F, G: ~1e-4 (the normalisation's epsilon); E: ~2


def test_g_fixed_function_layers_preserve_unit_magnitude():
    """G: SiLU, sums, concatenation and Fourier features keep unit RMS on
    unit-normal inputs (Eqs. 75-103); F's plain versions do not."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 64, 64, 64).unbind(0)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.01)
    assert rms(torch.nn.functional.silu(a)) == pytest.approx(0.596, abs=0.01)
    assert rms(mp_sum(a, b, t=0.3)) == pytest.approx(1, abs=0.01)
    assert rms(a + b) == pytest.approx(math.sqrt(2), abs=0.02)
    assert rms(mp_cat(a[:, :48], b[:, :16], t=0.5)) == pytest.approx(1, abs=0.01)
    assert rms(torch.cat([a[:, :48], b[:, :16]], dim=1)) == pytest.approx(1, abs=0.01)  # F's concat: also 1 here,
    assert rms(mp_cat(3 * a[:, :48], b[:, :16], t=0.5)[:, 48:]) == pytest.approx(  # but MP-Cat balances the parts
        rms(mp_cat(a[:, :48], b[:, :16], t=0.5)[:, 48:]), rel=1e-6)
    sigma = torch.exp(torch.randn(100_000))
    assert rms(MPFourier(256)(sigma.log() / 4)) == pytest.approx(1, abs=0.02)
    assert rms(ladder.Fourier(256)(sigma.log() / 4)) == pytest.approx(math.sqrt(0.5), abs=0.02)


def test_rung_layers_are_the_expected_kinds():
    assert all(isinstance(m, ladder.LadderConv) and m.weight_norm == "none"
               for m in tiny("C").modules() if hasattr(m, "weight") and not isinstance(m, ladder.LadderBlock))
    kinds = {type(m) for m in tiny("E").modules() if isinstance(m, (ladder.LadderConv, MPConv))}
    assert kinds == {MPConv}
    # C's uniform initialisation: |w| <= 1/sqrt(fan_in); D-F: N(0, 1).
    w = tiny("C").unet.dec["16x16_block0"].conv_res0.weight
    assert w.abs().max() <= 1 / math.sqrt(w[0].numel()) and w.std() > 0.5 / math.sqrt(3 * w[0].numel())
    assert tiny("D").unet.dec["16x16_block0"].conv_res0.weight.std().item() == pytest.approx(1, abs=0.05)


# ---------------------------------------------------------------------------
# Recipes (paper Figs. 16-22) and their composition with smaller presets.
# ---------------------------------------------------------------------------

def test_recipes_at_the_paper_size():
    want = {  # lr, decay, beta2, P_mean, P_std, dropout, loss scaling, batch, attention, loss, EMA
        "A": (1e-4, 0, 0.999, -1.2, 1.2, 0.10, 100, 4096, (32, 16, 8), "edm", "traditional"),
        "B": (2e-4, 0, 0.99, -0.4, 1.0, 0.10, 100, 2048, (16, 8), "uncertainty", "power"),
        "C": (2e-4, 0, 0.99, -0.4, 1.0, 0.10, 100, 2048, (16, 8), "uncertainty", "power"),
        "D": (1e-2, 0, 0.99, -0.4, 1.0, 0.10, 1, 2048, (16, 8), "uncertainty", "power"),
        "E": (1e-2, 70000, 0.99, -0.4, 1.0, 0.10, 1, 2048, (16, 8), "uncertainty", "power"),
        "F": (1e-2, 70000, 0.99, -0.4, 1.0, 0.10, 1, 2048, (16, 8), "uncertainty", "power"),
        "G": (1e-2, 70000, 0.99, -0.4, 1.0, 0.00, 1, 2048, (16, 8), "uncertainty", "power"),
    }
    for config, w in want.items():
        p = get_preset("img512-s", config)
        got = (p.lr, p.decay, p.adam_beta2, p.P_mean, p.P_std, p.dropout, p.loss_scaling, p.batch,
               tuple(p.attn_resolutions), p.loss, p.ema)
        assert got == w, config
        assert p.config == config and p.duration == 2048 * 2 ** 20
    assert get_preset("img512-s", "A").ema_halflife == 50e6 and get_preset("img512-s", "A").sigma_rel == ()
    assert get_preset("img512-s", "B").sigma_rel == (0.05, 0.10)
    assert get_preset("img512-s") == get_preset("img512-s", "G")


def test_recipes_compose_with_smaller_presets():
    tiny_g = get_preset("tiny")
    a = get_preset("tiny", "A")
    assert (a.batch, a.duration, a.attn_resolutions) == (2 * tiny_g.batch, tiny_g.duration, (16, 8))
    assert a.ema_halflife == pytest.approx(tiny_g.duration * 50e6 / 2 ** 31) and a.lr == pytest.approx(1e-4)
    xs = {c: get_preset("img512-xs", c) for c in CONFIGS}
    assert [xs[c].lr for c in CONFIGS] == pytest.approx([1.2e-4, 2.4e-4, 2.4e-4, 0.012, 0.012, 0.012, 0.012])
    assert [xs[c].decay for c in CONFIGS] == [0, 0, 0, 0, 70000, 70000, 70000]
    assert get_preset("img64-s", "B").P_mean == -0.8 and get_preset("img64-s", "A").P_mean == -1.2
    assert get_preset("img512-m", "F").dropout == 0.10 and get_preset("img512-m", "G").dropout == 0.10
    assert get_preset("cpu-32", "E").decay == get_preset("cpu-32").decay
    with pytest.raises(ValueError, match="allowed: A, B, C, D, E, F, G"):
        get_preset("tiny", "X")


def test_snapshot_metadata_carries_the_config(tmp_path):
    from safetensors.torch import save_file

    from edm2.io.snapshot import SnapshotError, load_snapshot, make_meta, read_snapshot_meta, save_snapshot

    net = tiny("E").eval()
    kwargs = {**TINY}
    save_snapshot(tmp_path / "e.safetensors", net, make_meta(kwargs, 64, 0.1, {"type": "rgb"}, {}, config="E"))
    loaded, meta = load_snapshot(tmp_path / "e.safetensors")
    assert meta["config"] == "E" and type(loaded) is LadderPrecond and loaded.config == "E"
    x, sigma, labels = inputs()
    torch.testing.assert_close(loaded(x, sigma, labels), net(x, sigma, labels))
    # Older metadata without a letter is config G.
    g = tiny("G").eval()
    meta = make_meta(kwargs, 64, 0.1, {"type": "rgb"}, {})
    del meta["config"]
    save_snapshot(tmp_path / "g.safetensors", g, meta)
    assert "config" not in read_snapshot_meta(tmp_path / "g.safetensors")
    assert type(load_snapshot(tmp_path / "g.safetensors")[0]) is Precond
    # A letter that is no config, or weights of another rung, are one-line errors.
    bad = {**make_meta(kwargs, 64, 0.1, {}, {}), "config": "Z"}
    with pytest.raises(SnapshotError, match="allowed: A, B, C, D, E, F, G"):
        save_snapshot(tmp_path / "z.safetensors", net, bad)
    assert not (tmp_path / "z.safetensors").exists()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "z.safetensors"),
              metadata={"edm2": json.dumps(bad)})
    with pytest.raises(SnapshotError, match="config 'Z'; allowed: A, B, C, D, E, F, G"):
        load_snapshot(tmp_path / "z.safetensors")
    save_snapshot(tmp_path / "f.safetensors", net, make_meta(kwargs, 64, 0.1, {}, {}, config="F"))
    with pytest.raises(SnapshotError, match="do not match the architecture"):
        load_snapshot(tmp_path / "f.safetensors")
