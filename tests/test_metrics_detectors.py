"""The real detector architectures with random weights (nothing is downloaded):
features of the right shape and dtype, deterministic, grayscale handled, and
the weight-loading path reading files the tests write; offline errors."""
import pytest
import torch

from edm2.metrics import load_detector, random_detector
from edm2.metrics.detectors import DINOV2_FOLDER, DINOV2_VITL14, INCEPTION_FILE, DINOv2Detector, _random_dinov2


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, [2, 3, 40, 40], dtype=torch.uint8, generator=g)


def test_inception_features_and_weight_file_round_trip(images, tmp_path):
    det = random_detector("fid", seed=0)
    grey = images[1:, :1]
    feats = det(torch.cat([images[:1], grey.repeat(1, 3, 1, 1)]))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert (feats >= 0).all() and feats.abs().sum() > 0  # pool features after ReLU
    assert not torch.equal(feats[0], feats[1])
    # torch-fidelity's weight file layout (a plain state dict), written from the random model.
    torch.save(det.net.state_dict(), tmp_path / INCEPTION_FILE)
    loaded = load_detector("fid", tmp_path, download=False)
    # Same weights, same image: bit-identical (deterministic); grayscale is repeated to RGB.
    assert torch.equal(loaded(grey), feats[1:])


def test_inception_bad_and_missing_weight_files(tmp_path, monkeypatch):
    (tmp_path / INCEPTION_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 weight file"):
        load_detector("fid", tmp_path, download=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached copy either
    with pytest.raises(FileNotFoundError) as e:
        load_detector("fid", tmp_path / "empty", download=False)
    assert str(tmp_path / "empty" / INCEPTION_FILE) in str(e.value) and "put it at" in str(e.value)
    with pytest.raises(ValueError, match="uint8 images"):
        random_detector("fd_tiny")(torch.zeros([1, 3, 8, 8]))


def test_dinov2_vitl14_random_features(images):
    """The full ViT-L/14 (304M parameters), once: 1024-d float32 class token, deterministic,
    independent of the batch it is in."""
    det = random_detector("fd_dinov2", seed=0)
    assert sum(p.numel() for p in det.parameters()) > 300e6
    feats = det(images[:1])
    assert feats.shape == (1, 1024) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert torch.allclose(det(images[:1]), feats, rtol=0, atol=1e-5)


def test_dinov2_weight_folder_round_trip_and_offline_error(images, tmp_path, monkeypatch):
    """The loading path with a folder the test writes (save_pretrained), from a
    ViT-L/14 of reduced depth (1 block instead of 24, to stay cheap)."""
    torch.manual_seed(1)
    model = _random_dinov2({**DINOV2_VITL14, "num_hidden_layers": 1})
    model.save_pretrained(tmp_path / DINOV2_FOLDER)
    loaded = load_detector("fd_dinov2", tmp_path, download=False)
    expected = DINOv2Detector(model)(images)
    assert loaded(images).shape == (2, 1024)
    assert torch.allclose(loaded(images), expected, rtol=0, atol=1e-5)
    # FD_DINOv2 preprocessing (docs/design.md#metrics): bicubic antialiased resize of 0-255 floats to 224, /255, ImageNet mean/std.
    x = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).pooler_output, expected, rtol=0, atol=1e-5)

    (tmp_path / DINOV2_FOLDER / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_detector("fd_dinov2", tmp_path, download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FileNotFoundError) as e:
        load_detector("fd_dinov2", tmp_path / "empty")
    assert str(tmp_path / "empty" / DINOV2_FOLDER) in str(e.value) and "hf download facebook/dinov2-large" in str(e.value)
