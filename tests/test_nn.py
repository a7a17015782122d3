"""Core network: layout, magnitude preservation, preconditioning, caching, validation."""
import math

import numpy as np
import pytest
import torch

from edm2.nn import (
    CONFIGS,
    DTYPES,
    Block,
    Denoiser,
    MPConv,
    MPFourier,
    Precond,
    build_network,
    check_config,
    check_precision,
    mp_cat,
    mp_silu,
    mp_sum,
    network_config,
    normalize,
    precond_coefficients,
    set_precision,
)
from edm2.nn.unet import unet_layout
from edm2.presets import get_preset
from edm2.utils.errors import EDM2Error


def rms(x):
    return x.float().square().mean().sqrt().item()


def tiny_net(label_dim=10, **kw):
    args = dict(img_resolution=16, img_channels=3, label_dim=label_dim, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16)
    args.update(kw)
    return Precond(**args)


# --- parameter counts (paper Tables 2-3), built on the meta device -------------------------

@pytest.mark.parametrize("name,label_dim,expected", [
    ("img512-xxs", 1000, 31_309_029), ("img512-xs", 1000, 124_713_253), ("img512-s", 1000, 280_212_837),
    ("img512-m", 1000, 497_807_781), ("img512-l", 1000, 777_498_085), ("img512-xl", 1000, 1_119_283_749),
    ("img512-xxl", 1000, 1_523_164_773), ("img64-s", 1000, 280_209_381), ("img64-xl", 1000, 1_119_276_837),
    ("img512-xs", 0, 124_201_253),
])
def test_parameter_counts(name, label_dim, expected):
    with torch.device("meta"):
        net = Precond(**get_preset(name).net_kwargs(label_dim))
    assert sum(p.numel() for p in net.parameters()) == expected


def test_state_dict_layout_matches_published_names():
    with torch.device("meta"):
        net = Precond(**get_preset("img512-xs").net_kwargs(1000))
    sd = net.state_dict()
    expect = {
        "unet.enc.64x64_conv.weight": (128, 5, 3, 3),
        "unet.enc.32x32_down.conv_res0.weight": (128, 128, 3, 3),
        "unet.enc.32x32_block0.conv_skip.weight": (256, 128, 1, 1),
        "unet.dec.8x8_in0.attn_qkv.weight": (1536, 512, 1, 1),
        "unet.dec.8x8_in0.attn_proj.weight": (512, 512, 1, 1),
        "unet.emb_fourier.freqs": (128,),
        "unet.emb_fourier.phases": (128,),
        "unet.emb_noise.weight": (512, 128),
        "unet.emb_label.weight": (512, 1000),
        "unet.out_gain": (),
        "unet.out_conv.weight": (4, 128, 3, 3),
        "logvar_fourier.freqs": (128,),
        "logvar_linear.weight": (1, 128),
        "unet.dec.64x64_block3.emb_gain": (),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    # No attention at 32x32 or 64x64, none in down/up blocks; in0 always has it.
    assert not any(k.startswith(("unet.enc.32x32_block0.attn", "unet.enc.16x16_down.attn")) for k in sd)
    assert "unet.enc.16x16_block0.attn_qkv.weight" in sd
    assert "unet.dec.8x8_in1.attn_qkv.weight" not in sd
    # Encoder and decoder module order as in the reference.
    enc = list(net.unet.enc.keys())
    assert enc[:5] == ["64x64_conv", "64x64_block0", "64x64_block1", "64x64_block2", "32x32_down"]
    dec = list(net.unet.dec.keys())
    assert dec[:6] == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "8x8_block2", "8x8_block3"]
    assert dec[6] == "16x16_up"


def test_seeded_init_is_reproducible_and_ordered():
    torch.manual_seed(3)
    a = tiny_net()
    torch.manual_seed(3)
    b = tiny_net()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # MPFourier: freqs drawn before phases.
    torch.manual_seed(0)
    f = MPFourier(8)
    torch.manual_seed(0)
    freqs = 2 * np.pi * torch.randn(8)
    phases = 2 * np.pi * torch.rand(8)
    assert torch.equal(f.freqs, freqs) and torch.equal(f.phases, phases)


# --- magnitude preservation ---------------------------------------------------------------

def test_primitives_preserve_magnitude():
    torch.manual_seed(0)
    a = torch.randn(64, 256, 8, 8)
    b = torch.randn(64, 128, 8, 8)
    assert rms(normalize(a * 7)) == pytest.approx(1, abs=1e-3)
    assert rms(normalize(a, dim=1)) == pytest.approx(1, abs=1e-3)
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.01)
    for t in (0.3, 0.5, 0.8):
        assert rms(mp_sum(a, torch.randn_like(a), t)) == pytest.approx(1, abs=0.01)
        assert rms(mp_cat(a, b, dim=1, t=t)) == pytest.approx(1, abs=0.01)
    # mp_cat: each part's share of the energy follows the balance t.
    c = mp_cat(a, b, t=0.3)
    share_b = c[:, 256:].square().sum() / c.square().sum()
    assert share_b.item() == pytest.approx(0.3 ** 2 / (0.3 ** 2 + 0.7 ** 2), abs=0.01)
    f = MPFourier(4096)
    assert rms(f(torch.randn(64))) == pytest.approx(1, abs=0.03)
    for kernel in ([], [1, 1], [3, 3]):
        conv = MPConv(256, 192, kernel)
        # 32x32 so that the zero padding of the 3x3 border costs only ~2% of the RMS.
        x = torch.randn(64, 256) if not kernel else torch.randn(4, 256, 32, 32)
        assert rms(conv(x)) == pytest.approx(1, abs=0.05)


def test_normalize_math():
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = normalize(x, eps=1e-4)
    expected = x / (1e-4 + x.square().mean(dim=(1, 2), keepdim=True).sqrt())
    assert torch.allclose(y, expected, rtol=1e-6)
    # Half precision: norm in float32, division in x's dtype.
    xh = torch.randn(4, 8).to(torch.bfloat16)
    assert normalize(xh).dtype == torch.bfloat16


@pytest.mark.parametrize("flavor,mode,cin,cout,attn", [
    ("enc", "keep", 64, 64, False), ("enc", "down", 64, 64, False), ("enc", "keep", 64, 128, True),
    ("dec", "keep", 192, 64, True), ("dec", "up", 64, 64, False),
])
def test_fresh_block_keeps_unit_rms(flavor, mode, cin, cout, attn):
    torch.manual_seed(1)
    block = Block(cin, cout, emb_channels=32, flavor=flavor, resample_mode=mode, attention=attn,
                  channels_per_head=32).eval()
    x = torch.randn(8, cin, 16, 16)
    emb = mp_silu(torch.randn(8, 32))
    with torch.no_grad():
        y = block(x, emb)
    assert y.shape[1] == cout
    assert rms(y) == pytest.approx(1, abs=0.15)


def test_fresh_unet_activations_keep_unit_rms():
    torch.manual_seed(2)
    net = tiny_net(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8],
                   channels_per_head=32).eval()
    seen = {}
    modules = [(f"enc.{k}", m) for k, m in net.unet.enc.items()] + [(f"dec.{k}", m) for k, m in net.unet.dec.items()]
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, rms(out)))
             for name, m in modules]
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        net.unet(x, torch.randn(8), torch.eye(10)[:8])
    for h in hooks:
        h.remove()
    assert len(seen) == len(net.unet.enc) + len(net.unet.dec)
    for name, value in seen.items():
        assert 0.75 < value < 1.3, (name, value)


def test_forced_weight_normalisation_after_optimizer_step():
    torch.manual_seed(0)
    net = tiny_net().train()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    x, sigma, labels = torch.randn(4, 3, 16, 16), torch.rand(4) + 0.1, torch.eye(10)[:4]
    for _ in range(2):
        opt.zero_grad()
        d, logvar = net(x, sigma, labels, return_logvar=True)
        (d.square().mean() + logvar.mean()).backward()
        opt.step()
    # The step moved the weights off the sphere; the next training-mode forward puts them back.
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    off = max((m.weight.flatten(1).square().mean(1).sqrt() - 1).abs().max().item() for m in convs)
    assert off > 1e-3
    with torch.no_grad():
        net(x, sigma, labels, return_logvar=True)  # touches every MPConv, logvar_linear included
    for m in convs:
        channel_rms = m.weight.flatten(1).square().mean(1).sqrt()
        assert torch.allclose(channel_rms, torch.ones_like(channel_rms), atol=1e-3)


def test_gradient_is_tangent_to_weight_sphere():
    # Standard weight normalisation inside autograd: grad is orthogonal to the (unit) weight.
    torch.manual_seed(0)
    conv = MPConv(16, 8, [3, 3]).train()
    conv(torch.randn(2, 16, 8, 8)).square().sum().backward()
    w = conv.weight.flatten(1)
    g = conv.weight.grad.flatten(1)
    cos = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1))
    # Not exactly 0: eps = 1e-4 in normalize() leaves a component of order eps / RMS(w).
    assert cos.abs().max().item() < 1e-3


def _unfused_training_weight(weight, gain):
    """Training-mode MPConv weight as Algorithm 1 writes it: forced normalisation in
    place, then normalise inside autograd and scale by gain / sqrt(fan_in)."""
    with torch.no_grad():
        weight.copy_(normalize(weight))
    return normalize(weight) * (gain / np.sqrt(weight[0].numel()))


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (8, 16, 1, 1), (32, 24)])
@pytest.mark.parametrize("tensor_gain", [False, True])
def test_fused_training_weight_matches_unfused_math(shape, tensor_gain):
    from edm2.nn.layers import _force_normalize_, _TrainingWeight

    torch.manual_seed(0)
    w0, grad_out = torch.randn(shape) * 3, torch.randn(shape)
    w0[1] = 0  # an all-zero channel: finite output and gradient, as in autograd's norm backward
    results = []
    for fused in (False, True):
        w = w0.clone().requires_grad_(True)
        gain = torch.tensor(0.7, requires_grad=True) if tensor_gain else 0.7
        if fused:
            with torch.no_grad():
                _force_normalize_(w)
            y = _TrainingWeight.apply(w, gain, 1e-4)
        else:
            y = _unfused_training_weight(w, gain)
        (y * grad_out).sum().backward()
        results.append((w.detach().clone(), y.detach(), w.grad, gain.grad if tensor_gain else None))
    (wa, ya, ga, gga), (wb, yb, gb, ggb) = results
    assert torch.equal(wa, wb)  # the forced normalisation is bit for bit the same
    assert torch.allclose(ya, yb, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6 * ga.abs().max().item())
    assert torch.isfinite(gb).all()
    if tensor_gain:
        assert torch.allclose(gga, ggb, rtol=1e-5)


def test_compiled_training_forward_keeps_the_forced_normalisation():
    """Compiled, MPConv leaves its in-place forced normalisation to force_normalize_
    (a traced graph would drop it); with it, compiled and eager training agree."""
    from edm2.nn import force_normalize_

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        conv = MPConv(8, 16, (3, 3)).train()
        with torch.no_grad():
            conv.weight.mul_(3)
        f = torch.compile(conv) if compiled else conv
        for step in range(2):   # the stored weight is renormalised at every call
            if compiled:
                force_normalize_(conv)
            y = f(torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(step)), gain=0.7)
            y.square().sum().backward()
        results.append((conv.weight.detach().clone(), y.detach(), conv.weight.grad))
    (wa, ya, ga), (wb, yb, gb) = results
    assert wa.square().mean().sqrt().item() == pytest.approx(1, abs=1e-3)   # from RMS 3
    assert torch.equal(wa, wb)
    assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5 * ga.abs().max().item())


def test_force_normalize_reaches_every_mpconv_and_only_them():
    from edm2.nn import force_normalize_

    torch.manual_seed(0)
    net = torch.nn.Sequential(MPConv(4, 6, (3, 3)), torch.nn.Linear(3, 3), MPConv(6, 5))
    with torch.no_grad():
        net[0].weight.mul_(4)
        net[2].weight.mul_(0.25)
    linear = net[1].weight.detach().clone()
    assert force_normalize_(net) is net
    for conv in (net[0], net[2]):
        rms = conv.weight.detach().flatten(1).square().mean(1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert torch.equal(net[1].weight, linear)


def test_channels_last_training_step_matches_contiguous():
    from edm2.loss import EDM2Loss
    from edm2.train.speed import to_channels_last

    grads, losses, states = [], [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = tiny_net().train()
        with torch.no_grad():
            for q in net.parameters():
                if q.ndim == 0:
                    q.fill_(0.5)
        x = torch.randn(4, 3, 16, 16)
        if channels_last:
            net = to_channels_last(net)
            x = x.contiguous(memory_format=torch.channels_last)
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        loss = EDM2Loss()(net, x, torch.eye(10)[:4], generator=gens)
        loss.sum().backward()
        losses.append(loss.sum().item())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        states.append(net.state_dict())
    assert states[1]["unet.enc.16x16_conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert list(states[0]) == list(states[1])
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


# --- preconditioning ----------------------------------------------------------------------

def test_denoiser_is_skip_connection_at_init():
    torch.manual_seed(0)
    net = tiny_net().eval()
    x = torch.randn(4, 3, 16, 16)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    with torch.no_grad():
        d, logvar = net(x, sigma, torch.eye(10)[:4], return_logvar=True)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(d, c_skip.reshape(-1, 1, 1, 1) * x, atol=1e-6)
    assert logvar.shape == (4, 1, 1, 1)


def test_denoiser_formula_with_nonzero_gains():
    torch.manual_seed(0)
    net = tiny_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(10)[[1, 4, 7]]
    with torch.no_grad():
        d = net(x, sigma, labels)
        s = sigma.reshape(-1, 1, 1, 1)
        F = net.unet(x / (0.25 + s ** 2).sqrt(), sigma.log() / 4, labels)
    expect = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * F
    assert torch.allclose(d, expect, atol=1e-5)
    assert (d - 0.25 / (s ** 2 + 0.25) * x).abs().max() > 1e-2  # the U-Net now contributes


def test_labels_handling():
    torch.manual_seed(0)
    net = tiny_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
        x = torch.randn(2, 3, 16, 16)
        zero = net(x, 1.0, torch.zeros(2, 10))
        assert torch.allclose(net(x, 1.0), zero, atol=1e-6)  # missing labels = zero row
        assert not torch.allclose(net(x, 1.0, torch.eye(10)[:2]), zero, atol=1e-4)
        # Scalar sigma equals a per-sample vector of the same value.
        assert torch.allclose(net(x, 1.0, zero.new_zeros(2, 10)), net(x, torch.ones(2), torch.zeros(2, 10)), atol=1e-6)
        unc = tiny_net(label_dim=0).eval()
        assert torch.equal(unc(x, 1.0, torch.eye(10)[:2]), unc(x, 1.0))


@pytest.mark.parametrize("res,ch,label_dim,mult,blocks", [
    (8, 1, 0, [1], 1), (16, 3, 5, [1, 2], 2), (32, 4, 0, [1, 1, 2], 1), (64, 2, 3, [1, 2, 2, 2], 1),
])
def test_any_shape(res, ch, label_dim, mult, blocks):
    net = Precond(img_resolution=res, img_channels=ch, label_dim=label_dim, model_channels=8,
                  channel_mult=mult, num_blocks=blocks, attn_resolutions=[8], channels_per_head=8).eval()
    x = torch.randn(2, ch, res, res)
    labels = torch.eye(label_dim)[:2] if label_dim else None
    with torch.no_grad():
        assert net(x, torch.ones(2), labels).shape == x.shape


def test_reduced_precision_dtype_selection_and_bf16_unet():
    net = tiny_net().eval()
    assert net.compute_dtype(torch.device("cpu")) == torch.float32
    assert net.compute_dtype(torch.device("cuda")) == torch.float16
    set_precision(net, "bf16")
    assert net.compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert net.compute_dtype(torch.device("cuda"), force_fp32=True) == torch.float32
    set_precision(net, "fp32")
    assert net.compute_dtype(torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="precision"):
        set_precision(net, "fp8")
    # The U-Net itself runs in bf16 (weights cast per call; embedding stays float32).
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
        x = torch.randn(2, 3, 16, 16)
        ref = net.unet(x, torch.zeros(2), torch.eye(10)[:2])
        low = net.unet(x.bfloat16(), torch.zeros(2), torch.eye(10)[:2])
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# --- attention ----------------------------------------------------------------------------

def test_sdpa_matches_explicit_attention():
    torch.manual_seed(0)
    block = Block(64, 64, 16, flavor="dec", attention=True, channels_per_head=16).eval()
    x = torch.randn(3, 64, 8, 8)
    with torch.no_grad():
        y = block.attention(x)
        # Explicit formula of cosine attention (paper App. B.3, Eqs. 30-34).
        n, c, h, w = x.shape
        heads = block.num_heads
        qkv = block.attn_qkv(x).reshape(n, heads, c // heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(c // heads)).softmax(dim=3)
        ref = block.attn_proj(torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, c, h, w))
    assert torch.allclose(y, ref, atol=1e-5)


# --- eval mode ----------------------------------------------------------------------------

def test_eval_forward_follows_the_stored_weights():
    torch.manual_seed(0)
    net = tiny_net().eval()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.eye(10)[:2]
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
        first = net(x, sigma, labels)
        assert torch.equal(net(x, sigma, labels), first)  # repeatable
    # With gradients enabled the numbers are the same.
    with torch.enable_grad():
        assert torch.allclose(net(x, sigma, labels), first, atol=1e-6)
    # An in-place weight change (as an optimizer step does) shows at once.
    with torch.no_grad():
        net.unet.out_conv.weight.mul_(-1)
        flipped = net(x, sigma, labels)
    assert not torch.allclose(flipped, first, atol=1e-4)
    # So does load_state_dict.
    other = tiny_net().eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(other(x, sigma, labels), flipped, atol=1e-6)
        net.load_state_dict(tiny_net().state_dict())
        assert not torch.allclose(net(x, sigma, labels), flipped, atol=1e-4)
    # Eval mode keeps nothing beside the parameters and buffers.
    net.train()
    assert set(net.state_dict()) == set(other.state_dict())


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(img_resolution=24), "img_resolution"), (dict(img_resolution=4), "img_resolution"),
    (dict(channel_mult=[]), "channel_mult"), (dict(label_dim=-1), "label_dim"),
    (dict(img_channels=0), "img_channels"), (dict(img_resolution=8, channel_mult=[1, 1, 1, 1, 1]), "channel_mult"),
])
def test_bad_architecture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_net(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset.*img512-xs"):
        get_preset("img512-huge")
    assert get_preset("edm2-img512-xs") is get_preset("img512-xs")


# --- one base for every config's network ----------------------------------------------

def _small_kwargs(config):
    """A small network of any config (config A-B widths fit GroupNorm's groups)."""
    return dict(img_resolution=16, img_channels=2, label_dim=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], channels_per_head=32)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_network_initialises_its_base_once(monkeypatch, config):
    """Each config's network runs Denoiser.__init__ (none skips its parent's) and gets its attributes there."""
    calls = []
    init = Denoiser.__init__

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "__init__", counting)
    net = build_network(config, **_small_kwargs(config), precision="bf16", sigma_data=0.6)
    assert len(calls) == 1 and isinstance(net, Denoiser) and network_config(net) == config
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 2, 3)
    assert (net.precision, net.sigma_data) == ("bf16", 0.6)
    assert net.compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert net.compute_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(EDM2Error, match="precision='fp8'"):
        build_network(config, **_small_kwargs(config), precision="fp8")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_network_is_the_preconditioned_unet(config):
    """D = c_skip x + c_out F(c_in x; c_noise) (Eqs. 4-7), whatever F is; u(sigma) from the logvar head."""
    torch.manual_seed(0)
    net = build_network(config, **_small_kwargs(config), precision="fp32").eval()
    x, sigma, labels = torch.randn(3, 2, 16, 16), torch.tensor([0.1, 1.0, 20.0]), torch.eye(3)
    c_skip, c_out, c_in, c_noise = precond_coefficients(sigma.reshape(-1, 1, 1, 1), net.sigma_data)
    assert torch.allclose(c_skip, torch.tensor([0.25 / 0.26, 0.25 / 1.25, 0.25 / 400.25]).reshape(-1, 1, 1, 1))
    with torch.no_grad():
        F_x = getattr(net, net.backbone)(c_in * x, c_noise.flatten(), labels)
        assert torch.equal(net(x, sigma, labels), c_skip * x + c_out * F_x)
        if config != "A":
            _, logvar = net(x, sigma, labels, return_logvar=True)
            u = net.logvar_linear(net.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
            assert logvar.shape == (3, 1, 1, 1) and torch.equal(logvar, u)


def test_check_precision_names_the_argument():
    assert [check_precision("precision", p) for p in DTYPES] == ["fp16", "bf16", "fp32"]
    with pytest.raises(EDM2Error, match=r"^reduced='fp8': allowed: fp16, bf16, fp32$"):
        check_precision("reduced", "fp8")


def test_all_configs_share_the_unet_layout():
    """A, E and G have the same encoder/decoder modules, in the authors' order (unet_layout)."""
    nets = {c: build_network(c, **_small_kwargs(c)) for c in "AEG"}
    enc, dec = unet_layout(16, 3, [32, 64], 1, [8])
    assert [n for n, *_ in enc] == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert [n for n, *_ in dec] == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "16x16_up", "16x16_block0",
                                    "16x16_block1"]
    # Encoder outputs, the skips (the down block's too): 32, 32, 32, 64. Each decoder "block" takes the
    # last one left: in = previous out + the skip's width.
    assert [(cin, cout) for _, cin, cout, _ in enc] == [(3, 32), (32, 32), (32, 32), (32, 64)]
    assert [(cin, cout) for _, cin, cout, _ in dec] == [(64, 64), (64, 64), (128, 64), (96, 64), (64, 64),
                                                       (96, 32), (64, 32)]
    assert [kw.get("attention", False) for *_, kw in dec] == [True, False, True, True, False, False, False]
    for net in nets.values():
        unet = getattr(net, net.backbone)
        assert list(unet.enc) == [n for n, *_ in enc] and list(unet.dec) == [n for n, *_ in dec]


def test_presets_depend_on_nn_not_the_reverse():
    """The network configs are nn's (edm2.nn.CONFIGS); importing edm2.nn does not import edm2.presets."""
    import subprocess
    import sys

    code = "import sys, edm2.nn; assert 'edm2.presets' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    import edm2.presets
    assert edm2.presets.check_config is check_config
    with pytest.raises(EDM2Error, match="config='H'"):
        check_config("H")
