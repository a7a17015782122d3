"""The CIFAR-scale preset (`cifar-32`): network sizes per config and its training recipe
composed with --config C / E / G (docs/training.md#the-cifar-scale-preset)."""
import pytest
import torch

from edm2.nn import build_network
from edm2.presets import Ki, Mi, get_preset


@pytest.mark.parametrize("config,label_dim,expected", [
    ("C", 0, 39_509_888), ("E", 0, 39_509_888), ("G", 0, 39_542_685),
    ("G", 10, 39_547_805),     # + the class embedding, 10 x 512
    ("A", 0, 43_186_947), ("B", 0, 42_855_427), ("D", 0, 39_509_888), ("F", 0, 39_542_656),
])
def test_parameter_counts(config, label_dim, expected):
    kw = get_preset("cifar-32", config).net_kwargs(label_dim)
    with torch.device("meta"):
        net = build_network(config, **kw)
    u = sum(p.numel() for n, p in net.named_parameters() if n.startswith("logvar_"))
    assert sum(p.numel() for p in net.parameters()) - u == expected
    # Config G unconditional: the published CIFAR-scale re-implementation's 39,542,685 parameters.
    if (config, label_dim) == ("G", 0):
        assert round(expected / 1e6, 1) == 39.5


def test_network_shape():
    kw = get_preset("cifar-32").net_kwargs(0)
    assert (kw["img_resolution"], kw["img_channels"], kw["model_channels"]) == (32, 3, 128)
    assert kw["channel_mult"] == [1, 2, 2, 2] and kw["num_blocks"] == 2 and kw["attn_resolutions"] == [16]
    assert kw["channel_mult_emb"] == 4 and kw["channels_per_head"] == 64
    # The other presets keep the default embedding width (their snapshots' metadata is unchanged).
    assert "channel_mult_emb" not in get_preset("cpu-32").net_kwargs(0)


def test_recipes_c_e_g():
    c, e, g = (get_preset("cifar-32", x) for x in "CEG")
    assert (g.lr, e.lr, c.lr) == (0.02, 0.02, 0.0004)      # C: x0.02 of G's alpha_ref (Table 1)
    assert (g.decay, e.decay, c.decay) == (39062, 39062, 0)  # C: constant learning rate
    assert all(p.batch == 512 and p.duration == 96 * Mi and p.rampup_Mimg == 10 for p in (c, e, g))
    assert all((p.P_mean, p.P_std) == (-0.8, 1.6) for p in (c, e, g))
    assert (g.dropout, e.dropout, c.dropout) == (0.13, 0.10, 0.10)
    assert (c.loss_scaling, e.loss_scaling, g.loss_scaling) == (100.0, 1.0, 1.0)
    assert all(p.adam_beta2 == 0.99 and p.ema == "power" and p.sigma_rel == (0.05, 0.10) for p in (c, e, g))
    # Every interval is a whole number of batches, also at config A's doubled batch.
    a = get_preset("cifar-32", "A")
    assert a.batch == 1024 and all(v % 1024 == 0 for v in (a.duration, a.status, a.snapshot, a.checkpoint))
    assert (g.status, g.snapshot, g.checkpoint) == (256 * Ki, 4 * Mi, 16 * Mi)


@pytest.mark.parametrize("config", ["C", "E", "G"])
def test_snapshot_round_trip_keeps_the_embedding_width(tmp_path, config):
    """channel_mult_emb reaches the snapshot metadata, and load_network rebuilds the same network."""
    from edm2.io.loading import load_network
    from edm2.io.snapshot import make_meta, save_snapshot

    kw = get_preset("cifar-32", config).replace(model_channels=8).net_kwargs(0)   # narrow: a small file
    torch.manual_seed(0)
    net = build_network(config, **kw)
    path = tmp_path / "s.safetensors"
    save_snapshot(path, net, make_meta(kw, 0, 0.1, {"type": "rgb"}, {"resolution": 32, "channels": 3,
                                                                     "label_dim": 0}, config=config))
    loaded, meta = load_network(path)
    assert meta["net_kwargs"]["channel_mult_emb"] == 4
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 2.0])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, sigma, None), net(x, sigma, None))
