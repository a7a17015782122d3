"""VAE latents: encode/decode with randomly initialised diffusers AutoencoderKLs saved to disk."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from edm2.cli import main  # noqa: E402
from edm2.data import ImageDataset, convert_dataset, decode_dataset, encode_dataset  # noqa: E402
from edm2.data.latents import latent_name  # noqa: E402
from edm2.encoders import RAW_MEAN, RAW_STD, StabilityVAEEncoder, VAEUnavailable, load_vae  # noqa: E402
from helpers import SD_VAE_CONFIG, SMALL_CONFIG  # noqa: E402
from helpers.cli import assert_refused  # noqa: E402


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    diffusers.AutoencoderKL(**SMALL_CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """5 labelled 16x16 RGB images (an image dataset zip) and their pixels."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "src.npz", images=pix, labels=np.array([0, 2, 1, 2, 0]))
    convert_dataset(root / "src.npz", root / "img.zip", class_names=["a", "b", "c"], progress=False)
    return root / "img.zip", pix


def test_encode_writes_raw_posterior_then_decode(small_vae, images, tmp_path):
    src, pix = images
    r = encode_dataset(src, tmp_path / "lat.zip", vae=str(small_vae), batch_size=2, device="cpu", progress=False)
    assert (r.count, r.computed, r.resolution) == (5, 5, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.zip"]  # the .partial folder is gone
    lat = ImageDataset(tmp_path / "lat.zip")
    assert lat.is_latent and lat.names[0] == latent_name(0) and lat.class_names == ["a", "b", "c"]
    items = np.stack([lat[i][0] for i in range(5)])
    assert items.dtype == np.float32 and items.shape == (5, 8, 2, 2)  # [8, H/8, W/8]
    assert [int(lat[i][1].argmax()) for i in range(5)] == [0, 2, 1, 2, 0]

    # Stored values are the raw posterior of VAE(pixels / 255): no standardisation yet.
    vae = load_vae(str(small_vae))
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 255)["latent_dist"]
    np.testing.assert_allclose(items[:, :4], dist.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(items[:, 4:], dist.std.numpy(), rtol=1e-4, atol=1e-5)

    # Training applies the App. B.1 standardisation exactly once: (mean - raw_mean) * 0.5 / raw_std.
    enc = StabilityVAEEncoder(vae_name=str(small_vae))
    mean_only = torch.from_numpy(items).clone()
    mean_only[:, 4:] = 0
    expect = (mean_only[:, :4] - torch.tensor(RAW_MEAN).view(1, 4, 1, 1)) * 0.5 / torch.tensor(RAW_STD).view(1, 4, 1, 1)
    torch.testing.assert_close(enc.encode_latents(mean_only), expect, rtol=1e-5, atol=1e-5)

    # Decode: PNGs of the image size, equal to VAE.decode(mean) -> clamp -> x255 -> uint8.
    d = decode_dataset(tmp_path / "lat.zip", tmp_path / "dec", vae=str(small_vae), batch_size=3, device="cpu",
                       progress=False)
    assert d.resolution == 16
    dec = ImageDataset(tmp_path / "dec")
    assert (len(dec), dec.num_channels, dec.resolution, dec.label_dim) == (5, 3, 16, 3)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(items[:, :4]))["sample"].clamp(0, 1).mul(255).to(torch.uint8).numpy()
    got = np.stack([dec[i][0] for i in range(5)])
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # float rounding at truncation only
    assert (got == ref).mean() > 0.99
    assert [int(dec[i][1].argmax()) for i in range(5)] == [0, 2, 1, 2, 0]


def test_encode_is_resumable(small_vae, images, tmp_path, monkeypatch):
    src, _ = images
    calls = {"n": 0}
    real = StabilityVAEEncoder.encode_pixels

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run is killed during the third batch
        return real(self, x)
    monkeypatch.setattr(StabilityVAEEncoder, "encode_pixels", flaky)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(src, tmp_path / "lat", vae=str(small_vae), batch_size=2, device="cpu", progress=False)
    assert not (tmp_path / "lat").exists()
    partial = tmp_path / "lat.partial"
    kept = sorted(p for p in partial.rglob("*.npy"))
    assert len(kept) == 4
    before = {p: p.read_bytes() for p in kept}
    monkeypatch.setattr(StabilityVAEEncoder, "encode_pixels", real)
    other = tmp_path / "other.zip"
    other.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match="unfinished encode of another source"):
        encode_dataset(other, tmp_path / "lat", vae=str(small_vae), device="cpu", progress=False)
    r = encode_dataset(src, tmp_path / "lat", vae=str(small_vae), batch_size=2, device="cpu", progress=False)
    assert (r.count, r.computed) == (5, 1) and any("resumed" in n for n in r.notes)
    assert not partial.exists()
    for p, data in before.items():
        assert (tmp_path / "lat" / p.relative_to(partial)).read_bytes() == data
    assert len(ImageDataset(tmp_path / "lat")) == 5


def test_grayscale_needs_multiple_of_8_and_is_repeated(small_vae, tmp_path):
    np.savez(tmp_path / "g.npz", images=np.full((2, 12, 12), 200, np.uint8))
    convert_dataset(tmp_path / "g.npz", tmp_path / "g12", progress=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_dataset(tmp_path / "g12", tmp_path / "lat", vae=str(small_vae), device="cpu", progress=False)
    convert_dataset(tmp_path / "g.npz", tmp_path / "g8", resolution=8, progress=False)
    r = encode_dataset(tmp_path / "g8", tmp_path / "lat", vae=str(small_vae), device="cpu", progress=False)
    assert any("RGB" in n for n in r.notes) and ImageDataset(tmp_path / "lat")[0][0].shape == (8, 1, 1)



@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("flags, message", [(["--batch", "0"], "--batch 0: must be a whole number >= 1"),
                                            (["--batch", "-2"], "--batch -2: must be"),
                                            (["--workers", "-1"], "--workers -1: must be a whole number >= 0")],
                         ids=["batch-zero", "batch-negative", "workers-negative"])
def test_counts_refused_before_anything_is_written(small_vae, images, tmp_path, command, flags, message):
    """With a VAE at hand: a batch of 0 (or below) or negative workers is refused in one line
    before the VAE is loaded and before DEST.partial/ is made (it was left behind, with a traceback)."""
    src = images[0]
    if command == "decode":
        encode_dataset(src, tmp_path / "lat", vae=str(small_vae), device="cpu", progress=False)
        src = tmp_path / "lat"
    argv = ["dataset", command, "--source", src, "--dest", tmp_path / "out", "--vae", small_vae, "--device", "cpu",
            *flags]
    assert_refused(argv, watch=[tmp_path, src], match=[message])
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if command == "encode" else ["lat"])
    fn = encode_dataset if command == "encode" else decode_dataset
    kwargs = {"batch_size": int(flags[1])} if flags[0] == "--batch" else {"workers": int(flags[1])}
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}={flags[1]}: must be"):
        fn(src, tmp_path / "out", vae=str(small_vae), device="cpu", progress=False, **kwargs)


def test_offline_without_vae_fails_at_once(images, tmp_path, monkeypatch, capsys):
    src, _ = images
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VAEUnavailable, match="vae=DIR"):
        encode_dataset(src, tmp_path / "lat.zip", device="cpu", progress=False)
    with pytest.raises(SystemExit) as e:
        main(["dataset", "encode", "--source", str(src), "--dest", str(tmp_path / "lat.zip"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Hugging Face" in err and "--vae DIR" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["dataset", "encode", "--source", str(src), "--dest", str(tmp_path / "l2"), "--vae", str(tmp_path / "no")])
    assert "no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_real_sd_vae_architecture_by_path(tmp_path):
    """The full sd-vae-ft-mse architecture (random weights) saved and loaded by path."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**SD_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # as the published checkpoint
    vae.save_pretrained(tmp_path / "sd-vae")
    del vae
    enc = StabilityVAEEncoder(vae_name=str(tmp_path / "sd-vae"))
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    out = enc.encode_pixels(pixels)
    assert out.shape == (1, 8, 2, 2) and out.dtype == torch.float32 and (out[:, 4:] > 0).all()
    img = enc.decode(enc.encode_latents(out, generator=torch.Generator().manual_seed(0)))
    assert img.shape == (1, 3, 16, 16) and img.dtype == torch.uint8
