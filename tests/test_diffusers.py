"""EDM2Pipeline (diffusers): the same images as `edm2 generate --seeds`, bitwise on
CPU, for pixel and latent networks, guidance, save/load round trips, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from edm2.cli import main  # noqa: E402
from edm2.encoders import StabilityVAEEncoder  # noqa: E402
from edm2.io.diffusers import EDM2Pipeline  # noqa: E402
from helpers import SMALL_CONFIG, write_snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
SEEDS = [0, 1, 7, 12]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**SMALL_CONFIG).save_pretrained(d / "vae")
    latent = StabilityVAEEncoder(vae_name=str(d / "vae")).to_meta()
    return {"cond": write_snapshot(d / "cond.safetensors", label_dim=3, channels=3),
            "uncond": write_snapshot(d / "uncond.safetensors", label_dim=0, channels=3, seed=1),
            "latent": write_snapshot(d / "latent.safetensors", label_dim=3, resolution=8, channels=4, seed=2,
                                     encoder=latent),
            "vae": d / "vae"}


def _generate(tmp_path, net, *extra):
    out = tmp_path / "gen"
    main(["generate", "--net", str(net), "--outdir", str(out), "--seeds", ",".join(map(str, SEEDS)),
          "--steps", str(STEPS), "--batch", str(len(SEEDS)), "--device", "cpu", *extra])
    return [np.asarray(Image.open(out / f"{s:06d}.png")) for s in SEEDS]


def _assert_same(pil_images, pngs):
    assert len(pil_images) == len(pngs)
    for img, ref in zip(pil_images, pngs):
        got = np.asarray(img)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)


def test_pixel_network_same_images_as_generate(nets, tmp_path):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"])
    # A fixed class for every image (generate --class 1).
    ref = _generate(tmp_path / "a", nets["cond"], "--class", "1")
    _assert_same(pipe(class_labels=[1] * 4, num_inference_steps=STEPS, seeds=SEEDS).images, ref)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    _assert_same(pipe(class_labels=1, num_inference_steps=STEPS, generator=gens).images, ref)
    # A random class per seed, drawn from the seed's generator like generate does.
    ref = _generate(tmp_path / "b", nets["cond"])
    _assert_same(pipe(num_inference_steps=STEPS, seeds=SEEDS).images, ref)
    # Per-image classes, other outputs.
    mixed = pipe(class_labels=[0, 2, 1, 2], num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images
    assert mixed.dtype == torch.uint8 and mixed.shape == (4, 3, 16, 16)
    one = pipe(class_labels=[2], num_inference_steps=STEPS, seeds=[12], output_type="uint8").images
    # An image depends on its seed and class alone, not on the batch (up to the rare pixel
    # that CPU kernels' batch-size-dependent summation order moves by one step).
    assert (one[0].int() - mixed[3].int()).abs().max() <= 1 and (one[0] == mixed[3]).float().mean() > 0.99
    arr = pipe(class_labels=[0, 2, 1, 2], num_inference_steps=STEPS, seeds=SEEDS, output_type="np").images
    assert arr.dtype == np.float32 and np.array_equal(arr * 255, mixed.permute(0, 2, 3, 1).numpy().astype(np.float32))
    assert not torch.equal(mixed[0], mixed[1])


def test_guidance_with_a_second_network_and_save_load(nets, tmp_path):
    """CFG with an unconditional guide (autoguidance works the same with a weaker conditional one)."""
    ref = _generate(tmp_path / "a", nets["cond"], "--gnet", str(nets["uncond"]), "--guidance", "1.7", "--class", "2")
    pipe = EDM2Pipeline.from_snapshot(nets["cond"], gnet=nets["uncond"], guidance=1.7)
    _assert_same(pipe(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS).images, ref)
    unguided = pipe(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS, guidance_scale=1.0, output_type="uint8")
    assert not torch.equal(unguided.images, torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2))

    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "EDM2Pipeline" and index["guidance"] == 1.7 and index["vae"] == [None, None]
    assert (tmp_path / "p" / "net" / "model.safetensors").is_file()
    assert (tmp_path / "p" / "gnet" / "config.json").is_file()
    back = EDM2Pipeline.from_pretrained(tmp_path / "p")
    _assert_same(back(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS).images, ref)


def test_latent_network_with_vae_same_images_and_round_trip(nets, tmp_path):
    ref = _generate(tmp_path / "a", nets["latent"], "--class", "0")
    assert ref[0].shape == (64, 64, 3)  # 8x8 latents decoded by the 8x VAE
    assert main(["export", "--format", "diffusers", str(nets["latent"]), "--outdir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    index = (tmp_path / "p" / "model_index.json").read_text()  # the VAE travels in vae/: no local path recorded
    assert str(nets["vae"].parent) not in index and json.loads(index)["encoder"]["vae_name"] == "vae"
    pipe = EDM2Pipeline.from_pretrained(str(tmp_path / "p"))
    assert isinstance(pipe.vae, diffusers.AutoencoderKL) and pipe.config.encoder["type"] == "sd-vae"
    _assert_same(pipe(class_labels=0, num_inference_steps=STEPS, seeds=SEEDS).images, ref)
    lat = pipe(class_labels=0, num_inference_steps=STEPS, seeds=SEEDS, output_type="latent").images
    assert lat.shape == (4, 4, 8, 8) and lat.dtype == torch.float32


def test_bad_input(nets, tmp_path, capsys):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"])
    with pytest.raises(ValueError, match="needs `gnet`, a guiding network"):
        pipe(seeds=[0], guidance_scale=2.0, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="out of range"):
        pipe(class_labels=[5], seeds=[0], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="inconsistent numbers"):
        pipe(class_labels=[0, 1], seeds=[0], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="unknown sampler option"):
        pipe(seeds=[0], num_inference_steps=STEPS, sigma_maximum=3)
    with pytest.raises(ValueError, match="needs its VAE"):
        EDM2Pipeline.from_snapshot(nets["latent"]).__class__(net=pipe.net, encoder={"type": "sd-vae"})

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        EDM2Pipeline.from_pretrained(tmp_path / "empty")
    pipe.save_pretrained(tmp_path / "p")
    index = tmp_path / "p" / "model_index.json"
    good = json.loads(index.read_text())
    index.write_text(json.dumps(dict(good, scheduler=["diffusers", "DDIMScheduler"])))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['scheduler'\]"):
        EDM2Pipeline.from_pretrained(tmp_path / "p")
    index.write_text(json.dumps(dict(good, net=["os", "system"])))
    with pytest.raises(ValueError, match="loads edm2 Precond"):
        EDM2Pipeline.from_pretrained(tmp_path / "p")
    index.write_text(json.dumps(good))
    (tmp_path / "p" / "net" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        EDM2Pipeline.from_pretrained(tmp_path / "p")

    # CLI: one line, exit 2, nothing written.
    for argv in (["export", "--format", "diffusers", str(tmp_path / "empty"), "--outdir", str(tmp_path / "o")],
                 ["export", "--format", "diffusers", str(nets["cond"]), "--outdir", str(tmp_path / "o"),
                  "--guidance", "2"],
                 ["export", "--format", "diffusers", str(nets["cond"]), "--outdir", str(tmp_path / "o"),
                  "--vae", str(nets["vae"])]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--vae {nets['vae']}: " in err and "drop --vae" in err  # the Python argument shown as its flag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "p"]


def test_components_move_together_and_report_device_and_dtype(nets, tmp_path):
    """net, gnet and the VAE are registered components: diffusers' .to(), .device, .dtype see all three."""
    pipe = EDM2Pipeline.from_snapshot(nets["latent"], gnet=nets["latent"], guidance=1.5)
    assert sorted(pipe.components) == ["gnet", "net", "vae"]
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    ref = pipe(class_labels=0, num_inference_steps=STEPS, seeds=SEEDS[:2], output_type="uint8").images
    assert pipe.to(torch.float16) is pipe
    assert {pipe.net.dtype, pipe.gnet.dtype, pipe.vae.dtype, pipe.dtype} == {torch.float16}
    # float16 weights (and a float16 VAE, which gets float16 latents) give nearly the same images.
    half = pipe(class_labels=0, num_inference_steps=STEPS, seeds=SEEDS[:2], output_type="uint8").images
    assert half.dtype == torch.uint8 and (half.int() - ref.int()).abs().float().mean() < 2
    pipe.to(dtype=torch.float32)
    assert {pipe.net.dtype, pipe.gnet.dtype, pipe.vae.dtype} == {torch.float32}

    # .to("cuda") reaches every component (the modules' own .to is recorded, not run).
    calls = []
    for name in ("net", "gnet", "vae"):
        module = getattr(pipe, name)
        object.__setattr__(module, "to", lambda *a, _name=name, **k: calls.append((_name, a, k)))
    pipe.to("cuda")
    assert sorted(c[0] for c in calls) == ["gnet", "net", "vae"]
    assert all(torch.device(c[1][0]).type == "cuda" for c in calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_cuda(nets):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"]).to("cuda")
    assert pipe.device.type == "cuda" and pipe.net.device.type == "cuda"
    images = pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images
    assert images.shape == (4, 3, 16, 16)


def test_progress_bar_counts_sampler_steps(nets, capsys):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"])
    pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS[:1], output_type="uint8")
    err = capsys.readouterr().err
    assert f"{STEPS}/{STEPS}" in err  # one tick per step, whatever the solver
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS[:1], output_type="uint8")
    assert capsys.readouterr().err == ""


def test_solver_and_guidance_interval_same_images_as_generate(nets, tmp_path):
    extra = ["--gnet", str(nets["uncond"]), "--guidance", "2.5", "--class", "2", "--solver", "dpm++2m",
             "--guidance-interval", "0.5,20"]
    ref = _generate(tmp_path / "a", nets["cond"], *extra)
    pipe = EDM2Pipeline.from_snapshot(nets["cond"], gnet=nets["uncond"], guidance=2.5, solver="dpm++2m",
                                      guidance_interval=(0.5, 20))
    _assert_same(pipe(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS).images, ref)
    # As call options of a pipeline without them, and after a save/load round trip (inf stored as "inf").
    plain = EDM2Pipeline.from_snapshot(nets["cond"], gnet=nets["uncond"], guidance=2.5)
    _assert_same(plain(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS, solver="dpm++2m",
                       guidance_interval=(0.5, 20)).images, ref)
    wide = EDM2Pipeline.from_snapshot(nets["cond"], gnet=nets["uncond"], guidance=2.5,
                                      guidance_interval=(0, float("inf")))
    wide.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["sampler"]["guidance_interval"] == [0, "inf"]
    back = EDM2Pipeline.from_pretrained(tmp_path / "p")
    a = back(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images
    b = plain(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images
    assert torch.equal(a, b)  # the interval (0, inf) guides every step
    # guidance_scale=1 drops the config's interval instead of refusing it.
    unguided = back(class_labels=2, num_inference_steps=STEPS, seeds=SEEDS, guidance_scale=1, output_type="uint8")
    assert not torch.equal(unguided.images, a)


def test_callback_on_step_end(nets):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"])
    seen = []

    def record(p, i, sigma, kwargs):
        assert p is pipe and set(kwargs) == {"latents", "denoised"}
        seen.append((i, sigma, kwargs["latents"].clone()))
        return kwargs

    out = pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS[:2], output_type="latent",
               callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert seen[0][1] == pytest.approx(80.0) and seen[-1][1] < seen[0][1]
    assert torch.equal(seen[-1][2], out)  # the last step's state is the output
    # Returned latents replace the state: zeroing it after the last step gives zeros.
    zeros = pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS[:2], output_type="latent",
                 callback_on_step_end=lambda p, i, s, kw: {"latents": torch.zeros_like(kw["latents"])}).images
    assert torch.count_nonzero(zeros) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(num_inference_steps=STEPS, seeds=SEEDS[:1], callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["noise_pred"])


@pytest.fixture
def hub_calls(monkeypatch):
    """diffusers' Hub calls, recorded instead of made (no network)."""
    from diffusers.utils import hub_utils
    from huggingface_hub import ModelCard

    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"someone/{repo_id}"})()

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", kwargs["repo_id"], sorted(p.name for p in folder.iterdir())))

    monkeypatch.setattr(hub_utils, "create_repo", create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    monkeypatch.setattr(hub_utils, "load_or_create_model_card",
                        lambda repo_id, **kwargs: ModelCard("---\nlibrary_name: edm2\n---\n# EDM2 pipeline\n"))
    return calls


def test_save_and_load_take_diffusers_options(nets, tmp_path, hub_calls):
    pipe = EDM2Pipeline.from_snapshot(nets["cond"])
    ref = pipe(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True, variant=None, max_shard_size="5GB")
    assert not hub_calls
    pipe.save_pretrained(tmp_path / "my-pipeline", push_to_hub=True, commit_message="first", private=True)
    assert hub_calls == [("create_repo", "my-pipeline", {"exist_ok": True, "private": True, "token": None}),
                         ("upload_folder", "someone/my-pipeline", ["README.md", "model_index.json", "net"])]
    hub_calls.clear()
    pipe.push_to_hub("user/edm2-pipeline")  # diffusers' own push_to_hub, through save_pretrained
    assert hub_calls[0][:2] == ("create_repo", "user/edm2-pipeline")
    assert hub_calls[1] == ("upload_folder", "user/edm2-pipeline", ["README.md", "model_index.json", "net"])
    for kwargs, match in ((dict(safe_serialization=False), "safe_serialization=False: edm2 writes safetensors only"),
                          (dict(variant="fp16"), "variant='fp16': .* one set of weights"),
                          (dict(colour="red"), r"unknown option\(s\) \['colour'\]"),
                          (dict(commit_message="x"), "only with push_to_hub=True")):
        with pytest.raises(ValueError, match=match):
            pipe.save_pretrained(tmp_path / "q", **kwargs)
    assert not (tmp_path / "q").exists()

    back = EDM2Pipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float16, use_safetensors=True,
                                        device_map="cpu")
    assert back.dtype == torch.float16 and back.net.dtype == torch.float16
    assert EDM2Pipeline.from_pretrained(tmp_path / "p", dtype=torch.float32).dtype == torch.float32
    same = EDM2Pipeline.from_pretrained(tmp_path / "p", device_map=None, use_safetensors=None)
    assert torch.equal(same(class_labels=1, num_inference_steps=STEPS, seeds=SEEDS, output_type="uint8").images, ref)
    for kwargs, match in ((dict(device_map="auto"), "device_map='auto': an EDM2Pipeline runs on one device"),
                          (dict(use_safetensors=False), "use_safetensors=False: .* safetensors only"),
                          (dict(torch_dtype="float16"), "torch_dtype='float16': must be a floating-point")):
        with pytest.raises(ValueError, match=match):
            EDM2Pipeline.from_pretrained(tmp_path / "p", **kwargs)


def test_networks_without_hub_format_are_refused(tmp_path):
    """Configs A-F (edm2.nn.build_network) have no Hugging Face format: one line, nothing written."""
    from edm2.io.snapshot import make_meta, save_snapshot
    from edm2.nn import build_network
    from helpers.cli import assert_refused

    kw = dict(img_resolution=16, img_channels=3, label_dim=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[8], channels_per_head=16)
    for config in ("A", "E"):
        torch.manual_seed(0)
        net = build_network(config, **kw)
        snap = tmp_path / f"{config}.safetensors"
        save_snapshot(snap, net, make_meta(kw, 64, 0.1, {"type": "rgb"}, {"resolution": 16, "channels": 3,
                                                                           "label_dim": 3}, config=config))
        assert_refused(["export", "--format", "diffusers", snap, "--outdir", tmp_path / "o"], watch=[tmp_path],
                       match=[f"{snap}: a config {config} network", "has no Hugging Face format"])
        with pytest.raises(ValueError, match=f"`net`: a config {config} network"):
            EDM2Pipeline(net=net)


def test_documented_journey(tmp_path, monkeypatch, hub_calls):
    """The diffusers example of docs/integrations.md runs as written (a tiny conditional
    network with 1000 classes stands in for the ImageNet one; Hub calls recorded)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "push_to_hub(" in b]
    monkeypatch.chdir(tmp_path)
    snap = write_snapshot(tmp_path / "snap.safetensors", label_dim=1000, channels=3)
    EDM2Pipeline.from_snapshot(snap).save_pretrained("my-pipeline")
    exec(compile(block, "docs/integrations.md", "exec"), {})
    assert Image.open("flamingo.png").size == (16, 16)
    assert (tmp_path / "my-pipeline-copy" / "model_index.json").is_file()
    assert [c[:2] for c in hub_calls] == [("create_repo", "your-name/edm2-pipeline"),
                                          ("upload_folder", "your-name/edm2-pipeline")]
