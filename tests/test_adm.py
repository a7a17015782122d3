"""Configs A and B of the paper's ablation (Table 1): the ADM network with EDM
preconditioning, EDM's loss and the traditional EMA."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from edm2.ema.trackers import TraditionalEMA
from edm2.loss import EDM2Loss, EDMLoss
from edm2.nn import set_precision
from edm2.nn.adm import ADMBlock, ADMPrecond, FourierFeatures
from helpers import make_dataset

TINY = dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=32)


def tiny(**kw):
    args = dict(TINY, precision="fp32")
    args.update(kw)
    return ADMPrecond(16, 3, 10, **args)


@functools.cache
def big(ch, config):
    b = dict(attn_resolutions=(16, 8), uncertainty=True) if config == "B" else {}
    with torch.device("meta"):
        return ADMPrecond(64, 4, 1000, model_channels=ch, **b)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("ch,config,expected", [
    (192, "A", 295_902_724), (192, "B", 291_757_828), (128, "A", 131_740_676), (128, "B", 129_894_916)])
def test_parameter_counts_of_table_1(ch, config, expected):
    net = big(ch, config)
    assert net.config == config
    assert count(net.model) == expected
    # u(sigma) is one fully connected layer on 128 Fourier features: 128 weights + 1 bias.
    assert count(net) == expected + (129 if config == "B" else 0)


def test_state_dict_layout():
    a = {k: tuple(v.shape) for k, v in big(192, "A").state_dict().items()}
    b = {k: tuple(v.shape) for k, v in big(192, "B").state_dict().items()}
    # Embedding: 192 -> 768 -> 768 with biases; the class embedding 1000 -> 768 without.
    assert a["model.map_layer0.weight"] == (768, 192) and a["model.map_layer0.bias"] == (768,)
    assert a["model.map_layer1.weight"] == (768, 768)
    assert a["model.map_label.weight"] == (768, 1000) and "model.map_label.bias" not in a
    # Encoder: input conv 4 -> 192, a width change 192 -> 384 through a 1x1 skip conv,
    # adaptive GroupNorm scale and shift 768 -> 2 * 384, attention with qkv 384 -> 3 * 384.
    assert a["model.enc.64x64_conv.weight"] == (192, 4, 3, 3)
    assert a["model.enc.32x32_block0.skip.weight"] == (384, 192, 1, 1)
    assert a["model.enc.32x32_block0.affine.weight"] == (768, 768)
    assert a["model.enc.32x32_block0.norm0.weight"] == (192,)
    assert a["model.enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1)
    assert a["model.enc.32x32_block0.proj.bias"] == (384,)
    # Resampling blocks hold the 2x2 box filter and keep their width (no skip conv).
    assert a["model.enc.32x32_down.conv0.resample_filter"] == (1, 1, 2, 2)
    assert a["model.enc.32x32_down.skip.resample_filter"] == (1, 1, 2, 2)
    assert "model.enc.32x32_down.skip.weight" not in a
    assert a["model.dec.32x32_up.conv0.weight"] == (576, 576, 3, 3)
    # Decoder: in0 has attention at 8x8; the 64x64 blocks take 384 + 192 (first) and 192 + 192 (last) channels.
    assert a["model.dec.8x8_in0.qkv.weight"] == (2304, 768, 1, 1)
    assert "model.dec.8x8_in1.qkv.weight" not in a
    assert a["model.dec.64x64_block0.conv0.weight"] == (192, 576, 3, 3)
    assert a["model.dec.64x64_block3.conv0.weight"] == (192, 384, 3, 3)
    assert a["model.out_norm.weight"] == (192,) and a["model.out_conv.weight"] == (4, 192, 3, 3)
    # Attention: 22 layers in A (32, 16, 8 and in0), 15 in B (no 32x32).
    assert sum(k.endswith(".qkv.weight") for k in a) == 22
    assert sum(k.endswith(".qkv.weight") for k in b) == 15
    assert not any(k.startswith("model.") and "32x32" in k and ".qkv." in k for k in b)
    # u(sigma) only in B.
    assert not any("logvar" in k for k in a)
    assert b["logvar_fourier.freqs"] == (128,) and b["logvar_fourier.phases"] == (128,)
    assert b["logvar_linear.weight"] == (1, 128) and b["logvar_linear.bias"] == (1,)


def test_zero_initialised_layers_make_D_the_skip_connection():
    torch.manual_seed(0)
    net = tiny()
    zero = [k for k, v in net.state_dict().items() if v.ndim > 0 and not v.any()]
    expected = {k for k in net.state_dict() if any(s in k for s in (".conv1.", ".proj.", "out_conv.", "norm"))
                and not k.endswith("norm0.weight") and not k.endswith("norm1.weight")
                and not k.endswith("norm2.weight") and not k.endswith("out_norm.weight")}
    # Zero: the second residual conv, the attention projection, the output conv (weights and biases),
    # and the GroupNorm shifts; nothing else.
    assert set(zero) == expected
    assert any(".proj." in k for k in zero)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 4.0])
    c_skip = (0.25 / (sigma ** 2 + 0.25)).reshape(-1, 1, 1, 1)
    assert torch.equal(net(x, sigma, F.one_hot(torch.tensor([1, 7]), 10)), c_skip * x)


def test_init_distributions():
    torch.manual_seed(0)
    net = ADMPrecond(16, 3, 1000, model_channels=64, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                     precision="fp32")
    w = net.model.enc["16x16_block0"].conv0.weight  # fan_in 64 * 9: U(+-1/24)
    assert w.abs().max().item() <= 1 / 24
    assert w.std().item() == pytest.approx(1 / 24 / math.sqrt(3), rel=0.02)
    b = net.model.map_layer0.bias  # biases share the weights' bound
    assert b.abs().max().item() <= 1 / math.sqrt(64) and b.abs().max().item() > 0.8 / math.sqrt(64)
    label = net.model.map_label.weight  # N(0, 1)
    assert label.std().item() == pytest.approx(1, rel=0.02) and label.mean().item() == pytest.approx(0, abs=0.01)


def test_seeded_build_is_reproducible():
    torch.manual_seed(3)
    a = tiny().state_dict()
    torch.manual_seed(3)
    b = tiny(uncertainty=True).state_dict()  # u(sigma) is created after the U-Net
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_matches_per_head_softmax():
    torch.manual_seed(0)
    block = ADMBlock(64, 64, 16, attention=True, channels_per_head=32).eval()
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(x)  # channel (head * 32 + i) * 3 + s for q (s=0), k (s=1), v (s=2)
    out = torch.empty(2, 64, 16)
    for head in range(2):
        chans = torch.arange(32) + head * 32
        q, k, v = (qkv.reshape(2, 64 * 3, 16)[:, chans * 3 + s] for s in range(3))
        w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(32), dim=2)
        out[:, chans] = torch.einsum("nqk,nck->ncq", w, v)
    assert torch.allclose(block.attention(x), out.reshape(2, 64, 4, 4), atol=1e-6)


def test_forward_in_training_mode_is_deterministic_given_the_seed():
    torch.manual_seed(0)
    net = tiny(dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():  # leave the zero-initialised state, so that F depends on dropout
            p.add_(0.05 * torch.randn_like(p))
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    net.train()
    torch.manual_seed(7)
    a = net(x, sigma)
    torch.manual_seed(7)
    b = net(x, sigma)
    torch.manual_seed(8)
    c = net(x, sigma)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    net.eval()
    d1, d2 = net(x, sigma), net(x, sigma)
    assert torch.equal(d1, d2) and not torch.allclose(a, d1)


def test_config_B_returns_the_uncertainty():
    torch.manual_seed(0)
    net = tiny(uncertainty=True)
    assert net.config == "B"
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.01, 1.0, 50.0])
    D, u = net(x, sigma, F.one_hot(torch.tensor([0, 1, 2]), 10), return_logvar=True)
    assert D.shape == x.shape and u.shape == (3, 1, 1, 1)
    c_noise = sigma.log() / 4
    feats = torch.cos(torch.outer(c_noise, net.logvar_fourier.freqs) + net.logvar_fourier.phases)
    expected = feats @ net.logvar_linear.weight.t() + net.logvar_linear.bias
    assert torch.allclose(u.flatten(), expected.flatten(), atol=1e-6)
    assert torch.equal(net(x, sigma), D)


def test_config_A_refuses_return_logvar():
    net = tiny()
    assert net.config == "A"
    with pytest.raises(ValueError, match="no learned uncertainty"):
        net(torch.zeros(1, 3, 16, 16), torch.ones(1), return_logvar=True)


def test_fourier_features_are_frozen_cosines():
    torch.manual_seed(0)
    f = FourierFeatures(4096)
    assert [n for n, _ in f.named_buffers()] == ["freqs", "phases"] and not list(f.parameters())
    y = f(torch.tensor([0.0, 0.7]))
    assert y.abs().max().item() <= 1
    assert (y ** 2).mean().item() == pytest.approx(0.5, abs=0.02)  # E[cos^2] with uniform phases
    assert (f.freqs / (2 * math.pi)).std().item() == pytest.approx(1, abs=0.05)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="use_fp16"):
        ADMPrecond(16, 3, 0, use_fp16=True)
    with pytest.raises(ValueError, match="attn_resolutions"):  # the default (32, 16, 8) is for 64x64
        ADMPrecond(16, 3, 0)
    with pytest.raises(ValueError, match="precision"):
        ADMPrecond(16, 3, 0, **dict(TINY, precision="fp8"))
    with pytest.raises(ValueError, match="attn_resolutions"):
        ADMPrecond(16, 3, 0, **dict(TINY, attn_resolutions=(7,)))
    with pytest.raises(ValueError, match="model_channels"):
        ADMPrecond(16, 3, 0, **dict(TINY, model_channels=200))


def test_precision_and_clamp():
    net = tiny(precision="bf16")
    assert net.precision == "bf16" and net.compute_dtype(torch.device("cpu")) == torch.float32
    set_precision(net, "fp32")
    assert net.precision == "fp32"
    torch.manual_seed(0)
    block = ADMBlock(32, 32, 16, clip_act=0.25).eval()
    with torch.no_grad():
        block.conv1.weight.normal_()
    y = block(10 * torch.randn(2, 32, 4, 4), torch.randn(2, 16))
    assert y.abs().max().item() == 0.25


class IdentityNet:
    """D(x; sigma) = x (or 0); records sigma and the noisy input."""

    def __init__(self, zero=False):
        self.zero = zero

    def __call__(self, x, sigma, labels=None, return_logvar=False):
        self.sigma, self.x = sigma, x
        d = torch.zeros_like(x) if self.zero else x
        return (d, torch.zeros_like(sigma)) if return_logvar else d


def test_edm_loss_by_hand():
    # sigma = 0.5 exactly (P_std 0): lambda = (0.25 + 0.25) / 0.25^2 = 8; D = 0 and y = 0.5 give 8 * 0.25 = 2.
    y = torch.full([2, 1, 2, 2], 0.5)
    loss = EDMLoss(P_mean=math.log(0.5), P_std=0.0)(IdentityNet(zero=True), y)
    assert loss.shape == y.shape
    assert torch.allclose(loss, torch.full_like(y, 2.0), rtol=1e-6)
    # sigma = 1: lambda = 1.25 / 0.25 = 5; D = identity: the error is the noise n = sigma * z.
    net = IdentityNet()
    g = torch.Generator().manual_seed(4)
    loss = EDMLoss(P_mean=0.0, P_std=0.0)(net, y, generator=g)
    g = torch.Generator().manual_seed(4)
    torch.randn([2, 1, 1, 1], generator=g)  # the noise level is drawn first
    z = torch.randn(y.shape, generator=g)
    assert torch.allclose(loss, 5 * z ** 2, rtol=1e-6)


def test_edm_loss_defaults_and_agreement_with_edm2_loss():
    loss = EDMLoss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.2, 1.2, 0.5)
    y = torch.randn(4, 2, 3, 3)

    def gens():
        return [torch.Generator().manual_seed(s) for s in range(4)]
    a = EDMLoss()(IdentityNet(zero=True), y, generator=gens())
    # With u = 0 the EDM2 loss is EDM's loss; the same generators give the same noise levels.
    b = EDM2Loss(P_mean=-1.2, P_std=1.2)(IdentityNet(zero=True), y, generator=gens())
    assert torch.equal(a, b)
    # One generator per sample: a sample's loss does not depend on the batch it is in.
    half = EDMLoss()(IdentityNet(zero=True), y[2:], generator=gens()[2:])
    assert torch.equal(a[2:], half)


def test_traditional_ema_beta():
    net = torch.nn.Linear(2, 2)
    ema = TraditionalEMA(net, halflife_nimg=50e6, rampup_ratio=0.05)
    assert list(ema.nets) == [50e6]
    assert ema.beta(4096, 4096) == 0  # the first update copies
    # Ramp: 1000 steps of 4096 done before this one -> half-life 0.05 * 4,096,000 = 204,800 images.
    assert ema.beta(4096 * 1001, 4096) == pytest.approx(0.5 ** (4096 / 204_800), rel=1e-12)
    assert ema.beta(4096 * 1001, 4096) == pytest.approx(0.986232704, rel=1e-8)
    # After 1e9 images the half-life is the full 50M images.
    assert ema.beta(10 ** 9 + 4096, 4096) == pytest.approx(0.5 ** (4096 / 50e6), rel=1e-12)
    no_ramp = TraditionalEMA(net, halflife_nimg=1000, rampup_ratio=None)
    assert no_ramp.beta(10, 10) == pytest.approx(0.5 ** 0.01, rel=1e-12)


def test_traditional_ema_update_and_state():
    net = torch.nn.Linear(1, 1, bias=False)
    ema = TraditionalEMA(net, halflife_nimg=100, rampup_ratio=None)
    values = [1.0, 3.0, -2.0]
    expected = net.weight.item()
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update(net, 50 * step, 50)
        beta = 0.5 ** 0.5
        expected = beta * expected + (1 - beta) * v
    assert ema.nets[100.0].weight.item() == pytest.approx(expected, rel=1e-6)
    state = ema.state_dict()
    assert list(state) == ["halflife_nimg=100"]
    other = TraditionalEMA(torch.nn.Linear(1, 1, bias=False), halflife_nimg=100, rampup_ratio=None)
    other.load_state_dict(state)
    assert torch.equal(other.nets[100.0].weight, ema.nets[100.0].weight)
    with pytest.raises(ValueError, match="half-life"):
        TraditionalEMA(torch.nn.Linear(1, 1, bias=False), halflife_nimg=200).load_state_dict(state)
    with pytest.raises(ValueError, match="half-life"):
        TraditionalEMA(net, halflife_nimg=0)


def test_reduced_precision_path():
    # The fp16/bf16 path only runs on CUDA; force it on the CPU with bfloat16 to check the casts:
    # the U-Net runs in bf16, the embedding and the attention softmax in float32, D comes back in float32.
    torch.manual_seed(0)
    net = tiny(precision="bf16").eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    labels = F.one_hot(torch.tensor([2, 5]), 10)
    ref = net(x, sigma, labels)
    net.compute_dtype = lambda device, force_fp32=False: torch.float32 if force_fp32 else torch.bfloat16
    low = net(x, sigma, labels)
    assert low.dtype == torch.float32
    assert torch.equal(net(x, sigma, labels, force_fp32=True), ref)
    err = ((low - ref).norm() / ref.norm()).item()
    assert 0 < err < 1e-2  # bf16 rounding (about 4e-3 here)


# ---------------------------------------------------------------------------
# Configs A and B at a size preset: heads that divide every width with attention
# ---------------------------------------------------------------------------

def test_adm_channels_per_head_divides_the_attention_widths():
    from edm2.nn.adm import adm_channels_per_head

    # cpu-32: widths 24, 48, 48 at 32, 16, 8; attention at 8 (and at 16 for A); preferred 32 -> one head of 48.
    assert adm_channels_per_head(32, 24, (1, 2, 2), (8,), 32) == 48
    assert adm_channels_per_head(32, 24, (1, 2, 2), (16, 8), 32) == 48
    # A preferred width that divides them is kept (tiny: 32 at 8x8, 16 per head; EDM's 64 at widths 192k).
    assert adm_channels_per_head(16, 16, (1, 2), (8,), 16) == 16
    assert adm_channels_per_head(64, 192, (1, 2, 3, 4), (32, 16, 8), 64) == 64
    # No common divisor >= the preferred width: the greatest common divisor (widths 48 and 80 -> 16).
    assert adm_channels_per_head(32, 16, (3, 5), (32, 16), 32) == 16


@pytest.mark.parametrize("config", ["A", "B"])
def test_cpu32_adm_configs_build_and_train_a_step(tmp_path, config):
    from edm2.analysis.flops import count_network
    from edm2.train.loop import TrainConfig, plan_run, train

    data = make_dataset(tmp_path / "ds", res=32)
    n = 64 if config == "A" else 32  # one batch (A doubles cpu-32's batch of 32)
    cfg = TrainConfig(outdir=str(tmp_path / "run"), data=str(data), preset="cpu-32", config=config, duration=n,
                      snapshot=n, checkpoint=n, progress=False)
    plan, _ = plan_run(cfg)
    assert plan.net_kwargs["channels_per_head"] == 48
    assert count_network("cpu-32", resolution=32, channels=1, label_dim=10, config=config).params > 0
    result = train(cfg)
    assert result.finished and result.nimg == cfg.duration
