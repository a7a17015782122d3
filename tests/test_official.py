"""Safe import of the authors' published EDM2 pickles (edm2.io.official).

The pickles are written by tests/helpers/official.py in the published format
(persistence records with module_src, EasyDict, fp16 tensors through torch's
ordinary pickling), for a tiny network."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers.official as fmt  # noqa: E402
from edm2.cli import main  # noqa: E402
from edm2.encoders import StabilityVAEEncoder, encoder_from_meta  # noqa: E402
from edm2.io import official  # noqa: E402
from edm2.io.download import DownloadError, cached_path  # noqa: E402
from edm2.io.loading import load_network  # noqa: E402
from edm2.io.snapshot import load_snapshot, read_snapshot_meta  # noqa: E402

POSTHOC_NAME = "edm2-img512-s-2147483-0.130.pkl"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks run fastest on one thread (and do not fight over a loaded CI machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    """(original float32 net, its fp16-rounded copy, published pickle bytes)."""
    net = fmt.make_tiny_net(seed=1)
    rounded = fmt.make_tiny_net(seed=1)
    rounded.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    return net, rounded, fmt.published_bytes(net)


@pytest.fixture()
def published(tiny, tmp_path):
    path = tmp_path / POSTHOC_NAME
    path.write_bytes(tiny[2])
    return path


@pytest.fixture(autouse=True)
def _no_marker(tmp_path, monkeypatch):
    """Every test: module_src must never run; downloads go to a private cache."""
    Path(fmt.MARKER_PATH).unlink(missing_ok=True)
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "cache"))
    yield
    assert not Path(fmt.MARKER_PATH).exists(), "module_src stored in the pickle was executed"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.02, 0.7, 25.0])
    labels = torch.eye(3)[[0, 2, 1]]
    return x, sigma, labels


def _outputs(net):
    x, sigma, labels = _inputs()
    with torch.no_grad():
        d, logvar = net(x, sigma, labels, return_logvar=True)
    return d, logvar


# ---------------------------------------------------------------------------
# Import: same network, same numbers.
# ---------------------------------------------------------------------------

def test_imported_network_matches_original(tiny, published):
    net, rounded, _ = tiny
    loaded, meta = official.load_official(published)
    # Architecture recovered from _init_kwargs.
    for key in ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult", "num_blocks",
                "attn_resolutions", "channels_per_head", "dropout", "use_fp16"):
        assert meta["net_kwargs"][key] == fmt.TINY_KWARGS[key], key
    # nimg, sigma_rel from the authors' name: kimg 2147483 -> 2^31 images exactly.
    assert meta["nimg"] == 2 ** 31 and meta["ema_std"] == 0.130
    assert meta["origin"]["source_dtype"] == "float16" and meta["origin"]["loss"]["P_mean"] == -0.4
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # fp16 -> float32 exactly: every tensor is float32 and equals the fp16 rounding of the original.
    state = loaded.state_dict()
    assert set(state) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert state[k].dtype == torch.float32
        assert torch.equal(state[k], v.half().float()), k
    # Outputs identical to the (fp16-rounded) original, D and the uncertainty.
    (d0, u0), (d1, u1) = _outputs(rounded), _outputs(loaded)
    assert torch.equal(d0, d1) and torch.equal(u0, u1)
    # ... and within fp16 rounding of the float32 original (the import is of the published values).
    d_orig, _ = _outputs(net)
    err = (d_orig - d1).abs().max().item()
    assert 0 < err < 1e-2


def test_encoder_and_dataset_metadata(tiny, published, tmp_path):
    _, meta = official.load_official(published)
    enc = meta["encoder"]
    assert enc["type"] == "sd-vae" and enc["vae_name"] == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(enc["raw_mean"], [5.81, 3.25, 0.12, -2.15], rtol=1e-6)
    np.testing.assert_allclose(enc["raw_std"], [4.17, 4.62, 3.71, 3.28], rtol=1e-6)
    # Our encoder rebuilt from the metadata standardises exactly like the pickled scale/bias.
    rec = fmt.vae_encoder_record().state
    ours = encoder_from_meta(enc)
    assert isinstance(ours, StabilityVAEEncoder)
    np.testing.assert_array_equal(ours.scale, rec["scale"])
    np.testing.assert_array_equal(ours.bias, rec["bias"])
    assert meta["dataset"]["channels"] == 8 and meta["dataset"]["label_dim"] == 3
    # A pixel-space model maps to the RGB encoder.
    rgb = tmp_path / "edm2-img64-s-1073741-0.075.pkl"
    fmt.write_published(rgb, fmt.make_tiny_net(img_channels=3), encoder="rgb")
    _, meta = official.load_official(rgb)
    assert meta["encoder"] == {"type": "rgb"} and meta["dataset"]["channels"] == 3
    assert meta["nimg"] == 1073741824 and meta["ema_std"] == 0.075


def test_load_network_accepts_pkl(tiny, published):
    net, meta = load_network(str(published))
    assert torch.equal(_outputs(net)[0], _outputs(tiny[1])[0])


def test_import_official_cli(tiny, published, tmp_path, capsys):
    dest = tmp_path / "imported.safetensors"
    assert main(["import-official", str(published), str(dest)]) == 0
    net, meta = load_snapshot(dest)
    assert torch.equal(_outputs(net)[0], _outputs(tiny[1])[0])
    assert meta["origin"]["stored_dtype"] == "fp32" and meta["origin"]["importer"] == "edm2.io.official"
    assert meta["origin"]["sha256"] == hashlib.sha256(tiny[2]).hexdigest()
    # Never overwrites: one-line error, exit 2, the file is untouched.
    before = dest.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["import-official", str(published), str(dest)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert dest.read_bytes() == before
    # fp16 storage: half the parameter bytes, same network after loading; a folder DEST names the file.
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["import-official", str(published), str(folder), "--dtype", "fp16"]) == 0
    small = folder / "snapshot-002147483648-0.130.safetensors"
    assert small.stat().st_size < 0.6 * dest.stat().st_size
    net16, _ = load_snapshot(small)
    assert all(p.dtype == torch.float32 for p in net16.parameters())
    assert torch.equal(_outputs(net16)[0], _outputs(tiny[1])[0])
    # A DEST that is neither .safetensors nor a folder.
    with pytest.raises(SystemExit):
        main(["import-official", str(published), str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------
# Safety: nothing outside the allow-list runs.
# ---------------------------------------------------------------------------

class _Call:
    """Pickles as a call of `func(*args)` (what a malicious pickle does)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_os_system_is_refused_before_it_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"ema": _Call(os.system, f"touch {marker}")}))
    with pytest.raises(official.UnsafePickleError, match=r"posix\.system|nt\.system"):
        official.load_official(bad)
    assert not marker.exists()
    # The same through the CLI: one line, exit 2, nothing written.
    with pytest.raises(SystemExit) as e:
        main(["import-official", str(bad), str(tmp_path / "out.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "system" in err and "allow-list" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_refused_inside_a_real_model_and_in_storage_blobs(tiny, tmp_path):
    import builtins

    marker = tmp_path / "pwned"
    # A hostile object hidden in an otherwise genuine published pickle.
    hidden = tmp_path / "edm2-img512-s-2147483-0.100.pkl"
    hidden.write_bytes(fmt.published_bytes(tiny[0], extra={"x": _Call(builtins.eval, f"open('{marker}', 'w')")}))
    with pytest.raises(official.UnsafePickleError, match=r"builtins\.eval"):
        official.load_official(hidden)
    # A hostile pickle inside a storage blob: torch.load(weights_only=True) refuses it.
    inner = pickle.dumps(_Call(os.system, f"touch {marker}"))
    blob = tmp_path / "blob.pkl"
    blob.write_bytes(pickle.dumps({"ema": _Call(torch.storage._load_from_bytes, inner)}))
    with pytest.raises(official.OfficialFormatError, match="not a readable pickle"):
        official.load_official(blob)
    # Unknown modules are refused by name too.
    with pytest.raises(official.UnsafePickleError, match=r"subprocess\.Popen"):
        official.safe_unpickle(b"\x80\x04csubprocess\nPopen\n.")
    assert not marker.exists()


def test_broken_and_foreign_files(tiny, tmp_path):
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(tiny[2][: len(tiny[2]) // 2])
    with pytest.raises(official.OfficialFormatError, match="trunc.pkl"):
        official.load_official(trunc)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(official.OfficialFormatError, match="not an EDM2 network pickle"):
        official.load_official(other)
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        official.load_official(tmp_path / "missing.pkl")
    # Stored arguments that disagree with the weights, or that our Precond does not know.
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(fmt.published_bytes(tiny[0], init_kwargs={"model_channels": 16}))
    with pytest.raises(official.OfficialFormatError, match=r"weights do not match .*\(shape mismatch \(file vs"):
        official.load_official(wrong)
    wrong.write_bytes(fmt.published_bytes(tiny[0], init_kwargs={"fancy_option": 1}))
    with pytest.raises(official.OfficialFormatError, match="does not know: fancy_option"):
        official.load_official(wrong)


# ---------------------------------------------------------------------------
# Reference statistics.
# ---------------------------------------------------------------------------

def test_reference_statistics(tmp_path):
    pkl = tmp_path / "img512.pkl"
    pkl.write_bytes(fmt.reference_stats_bytes(dims=(5, 7)))
    expected = pickle.loads(pkl.read_bytes())
    stats = official.load_reference_stats(pkl)
    assert set(stats) == {"fid", "fd_dinov2"}
    for name in stats:
        np.testing.assert_array_equal(stats[name]["mu"], expected[name]["mu"])
        np.testing.assert_array_equal(stats[name]["sigma"], expected[name]["sigma"])
    assert stats["fd_dinov2"]["sigma"].shape == (7, 7)
    # The older EDM .npz (FID only).
    npz = tmp_path / "edm-ref.npz"
    np.savez(npz, mu=expected["fid"]["mu"], sigma=expected["fid"]["sigma"])
    old = official.load_reference_stats(npz)
    assert list(old) == ["fid"] and np.array_equal(old["fid"]["sigma"], expected["fid"]["sigma"])
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.zeros((2, 2))}}))
    with pytest.raises(official.OfficialFormatError, match="not \\[D\\] and \\[D, D\\]"):
        official.load_reference_stats(bad)


# ---------------------------------------------------------------------------
# Downloads: cache, atomic rename, offline error.
# ---------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_to_cache_and_offline_error(tiny, tmp_path):
    served = tmp_path / "served" / "posthoc-reconstructions"
    served.mkdir(parents=True)
    (served / POSTHOC_NAME).write_bytes(tiny[2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/posthoc-reconstructions/{POSTHOC_NAME}"
    try:
        net, meta = official.load_official(url)
    finally:
        server.shutdown()
        server.server_close()
    cached = cached_path(url)
    assert cached.is_file() and cached.read_bytes() == tiny[2]
    assert str(cached).startswith(str(tmp_path / "cache"))
    assert meta["nimg"] == 2 ** 31 and meta["origin"]["source"] == url
    assert [p.name for p in cached.parent.iterdir()] == [POSTHOC_NAME]  # no temporary file left
    # The server is gone: the cached copy is used.
    net2, _ = official.load_official(url)
    assert torch.equal(_outputs(net2)[0], _outputs(tiny[1])[0])
    # Offline: a clear error naming where to put the file by hand; nothing half-written in the cache.
    offline = f"http://127.0.0.1:{_free_port()}/dataset-refs/img512.pkl"
    with pytest.raises(DownloadError) as e:
        official.load_reference_stats(offline)
    msg = str(e.value)
    assert str(cached_path(offline)) in msg and "EDM2_CACHE" in msg and len(msg.splitlines()) == 1
    assert not cached_path(offline).parent.exists() or not any(cached_path(offline).parent.iterdir())


# ---------------------------------------------------------------------------
# Published presets.
# ---------------------------------------------------------------------------

def test_generation_presets():
    from edm2.presets import GENERATION_PRESETS, POSTHOC_URL, get_generation_preset

    assert len(GENERATION_PRESETS) == 38  # EDM2's 36, and the two guidance-interval settings
    p = get_generation_preset("edm2-img512-s-guid-dino")
    assert (p.net, p.gnet, p.guidance) == (f"{POSTHOC_URL}/edm2-img512-s-2147483-0.085.pkl",
                                           f"{POSTHOC_URL}/edm2-img512-xs-uncond-2147483-0.085.pkl", 1.9)
    p = get_generation_preset("img512-s-autog-fid")  # the prefix is optional
    assert (p.net.rsplit("/", 1)[1], p.gnet.rsplit("/", 1)[1], p.guidance) == (
        "edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.1)
    p = get_generation_preset("edm2-img512-xxl-guid-fid")
    assert (p.net.rsplit("/", 1)[1], p.gnet.rsplit("/", 1)[1], p.guidance) == (
        "edm2-img512-xxl-0939524-0.015.pkl", "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.2)
    for p in GENERATION_PRESETS.values():
        assert (p.gnet is None) == (p.guidance == 1.0)
        for url in (p.net, p.gnet):
            if url:  # every file is named in the authors' scheme, so nimg/sigma_rel are recovered
                assert official.parse_official_name(url) is not None
    with pytest.raises(ValueError, match="unknown generation preset 'img512-huge'"):
        get_generation_preset("img512-huge")


# ---------------------------------------------------------------------------
# Raw snapshots -> our snapshots for post-hoc EMA.
# ---------------------------------------------------------------------------

def test_convert_raw_snapshot_folder(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    nets = {}
    for i, (kimg, std) in enumerate([(1, 0.05), (1, 0.10), (2, 0.05), (2, 0.10)]):
        nets[(kimg, std)] = fmt.make_tiny_net(seed=10 + i)
        fmt.write_published(raw / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", nets[(kimg, std)])
    (raw / "notes.txt").write_text("ignored")
    out = tmp_path / "converted"
    out.mkdir()
    assert main(["import-official", str(raw), str(out)]) == 0
    from edm2.io.snapshot import list_snapshots

    found = list_snapshots(out)
    # kimg 1 -> 1024 images, kimg 2 -> 2048 (docs/design.md#post-hoc-reconstruction), sigma_rel from the name.
    assert [(n, s) for n, s, _ in found] == [(1024, 0.05), (1024, 0.10), (2048, 0.05), (2048, 0.10)]
    for nimg, std, path in found:
        net, meta = load_snapshot(path)
        src = nets[(nimg // 1024, std)]
        for k, v in src.state_dict().items():
            assert torch.equal(net.state_dict()[k], v.half().float()), k
        assert read_snapshot_meta(path)["origin"]["stored_dtype"] == "fp16"
    # A second run converts nothing new (same files, same bytes).
    stamp = [p.stat().st_mtime_ns for *_, p in found]
    official.convert_official_folder(raw, out, progress=False)
    assert [p.stat().st_mtime_ns for *_, p in list_snapshots(out)] == stamp


# ---------------------------------------------------------------------------
# edm2 generate --preset (published triple, URLs through the cache).
# ---------------------------------------------------------------------------

def test_generate_with_preset(tmp_path, monkeypatch):
    from PIL import Image

    from edm2.presets import GENERATION_PRESETS, GenerationPreset

    src = tmp_path / "cdn"
    src.mkdir()
    fmt.write_published(src / "edm2-img64-s-1073741-0.045.pkl", fmt.make_tiny_net(seed=3, img_channels=3),
                        encoder="rgb")
    fmt.write_published(src / "edm2-img64-xs-0134217-0.110.pkl", fmt.make_tiny_net(seed=4, img_channels=3),
                        encoder="rgb")
    net_url, gnet_url = (f"file://{src}/edm2-img64-s-1073741-0.045.pkl", f"file://{src}/edm2-img64-xs-0134217-0.110.pkl")
    monkeypatch.setitem(GENERATION_PRESETS, "edm2-tiny-autog", GenerationPreset("edm2-tiny-autog", net_url, gnet_url,
                                                                                 2.0, "fid", 0.0))
    common = ["--seeds", "0-1", "--steps", "3", "--batch", "2", "--device", "cpu"]
    assert main(["generate", "--preset", "tiny-autog", "--outdir", str(tmp_path / "a")] + common) == 0
    assert cached_path(net_url).is_file() and cached_path(gnet_url).is_file()
    # The same as naming the triple by hand.
    assert main(["generate", "--net", str(src / "edm2-img64-s-1073741-0.045.pkl"), "--gnet",
                 str(src / "edm2-img64-xs-0134217-0.110.pkl"), "--guidance", "2", "--outdir", str(tmp_path / "b")]
                + common) == 0
    # ... and different from the unguided net (the preset's guidance was applied).
    argv = ["generate", "--preset", "tiny-autog", "--guidance", "1", "--outdir", str(tmp_path / "c")]
    assert main(argv + common) == 0
    for seed in (0, 1):
        a, b, c = (np.asarray(Image.open(tmp_path / d / f"{seed:06d}.png")) for d in "abc")
        assert a.shape == (8, 8, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
