"""edm2.generate and `edm2 generate`: per-seed reproducibility (batch size,
torchrun), resumable PNG folders, grid, latent decoding, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.cli import main
from edm2.generate import generate_images, generate_to_dir, load_nets, rank_batches, seed_classes
from edm2.utils.errors import EDM2Error
from helpers import write_snapshot

STEPS = "3"


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    d = tmp_path_factory.mktemp("snaps")
    return {"cond": write_snapshot(d / "cond.safetensors", label_dim=3),
            "cond2": write_snapshot(d / "cond2.safetensors", label_dim=3, seed=1),
            "uncond": write_snapshot(d / "uncond.safetensors", label_dim=0),
            "res8": write_snapshot(d / "res8.safetensors", label_dim=3, resolution=8),
            "labels5": write_snapshot(d / "labels5.safetensors", label_dim=5)}


def read_pngs(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(Path(folder).rglob("*.png"))}


def assert_same_pixels(a, b):
    """uint8 images equal, except that CPU oneDNN/MKL convolutions and matmuls
    sum in a batch-size-dependent order (float32 differences ~1e-6), which may
    flip a rare pixel that sits on a rounding boundary by one step."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.002, (diff.max(), (diff > 0).mean())


def collect(batches):
    out = {}
    for b in batches:
        for i, s in enumerate(b.seeds):
            out[s] = (b.images[i], None if b.classes is None else int(b.classes[i]))
    return out


def test_rank_batches_split_without_gaps_or_duplicates():
    seeds = list(range(10, 33))
    for world in (1, 2, 3, 8):
        parts = [rank_batches(seeds, 4, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # same number of batches on every rank
        flat = [s for p in parts for b in p for s in b]
        assert sorted(flat) == seeds and all(len(b) <= 4 for p in parts for b in p)


def test_same_images_for_any_batch_size(snaps):
    net, _, encoder, _ = load_nets(snaps["cond"], device="cpu")
    opts = dict(num_steps=4, S_churn=5, S_min=0.05, S_max=50)  # churn noise must be per seed too
    one = collect(generate_images(net, encoder, range(9), batch_size=1, device="cpu", **opts))
    raw7 = collect(generate_images(net, None, range(9), batch_size=7, device="cpu", **opts))  # batches of 5 + 4
    raw1 = collect(generate_images(net, None, range(9), batch_size=1, device="cpu", **opts))
    assert sorted(one) == sorted(raw7) == list(range(9))
    for s in range(9):
        assert one[s][1] == raw7[s][1]  # same random class
        assert one[s][0].dtype == torch.uint8 and one[s][0].shape == (1, 16, 16)
        assert (raw1[s][0] - raw7[s][0]).abs().max() < 1e-4  # float32 samples agree to rounding
        assert_same_pixels(one[s][0].numpy(), encoder.decode(raw7[s][0]).numpy())
    assert len({c for _, c in one.values()}) > 1  # random classes vary
    assert not torch.equal(one[0][0], one[1][0])
    # A fixed class and a different class give different images from the same seed.
    c0 = collect(generate_images(net, encoder, [3], class_idx=0, device="cpu", num_steps=4))[3]
    c2 = collect(generate_images(net, encoder, [3], class_idx=2, device="cpu", num_steps=4))[3]
    assert c0[1] == 0 and c2[1] == 2 and not torch.equal(c0[0], c2[0])


def test_torchrun_two_processes_match_one(snaps, tmp_path):
    args = ["generate", "--net", str(snaps["cond"]), "--seeds", "995-1005", "--batch", "3", "--steps", STEPS,
            "--subdirs"]
    main(args + ["--outdir", str(tmp_path / "one"), "--grid", str(tmp_path / "grid.png")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "edm2"] + args + ["--outdir", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "by 2 process(es)" in r.stdout
    one, two = read_pngs(tmp_path / "one"), read_pngs(tmp_path / "two")
    expected = [f"000000/{s:06d}.png" for s in range(995, 1000)] + [f"001000/{s:06d}.png" for s in range(1000, 1006)]
    assert sorted(one) == sorted(two) == sorted(expected)
    for name in one:
        assert_same_pixels(one[name], two[name])
    # Grid: 11 images -> 4 columns x 3 rows of 16x16 grey images.
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (64, 48) and grid.mode == "L"
    assert np.array_equal(np.asarray(grid)[16:32, 32:48], one["001000/001001.png"])


def test_rerun_skips_existing_images(snaps, tmp_path):
    net, _, encoder, _ = load_nets(snaps["uncond"], device="cpu")
    out = tmp_path / "out"
    r = generate_to_dir(net, encoder, range(6), out, batch_size=4, device="cpu", num_steps=3, progress=False)
    assert r == {"generated": 6, "skipped": 0}
    first = read_pngs(out)
    (out / "000002.png").unlink()
    marker = np.zeros([16, 16], np.uint8)
    Image.fromarray(marker).save(out / "000003.png")
    r = generate_to_dir(net, encoder, range(6), out, batch_size=4, device="cpu", num_steps=3, progress=False)
    assert r == {"generated": 1, "skipped": 5}
    again = read_pngs(out)
    assert np.array_equal(again["000002.png"], first["000002.png"])
    assert np.array_equal(again["000003.png"], marker)  # existing files are never rewritten
    assert not [p for p in out.iterdir() if p.suffix != ".png" and p.name != "generate.json"]  # no temp files


def test_latent_network_decoded_with_vae_from_metadata(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from edm2.encoders import StabilityVAEEncoder
    from edm2.sampling import SeedRandom, edm_sampler

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    enc = StabilityVAEEncoder(vae_name=str(tmp_path / "vae")).to_meta()
    snap = write_snapshot(tmp_path / "latent.safetensors", label_dim=0, resolution=8, channels=4, encoder=enc)
    main(["generate", "--net", str(snap), "--outdir", str(tmp_path / "out"), "--seeds", "0-9", "--batch", "10",
          "--steps", "2"])
    imgs = read_pngs(tmp_path / "out")
    assert sorted(imgs) == [f"{s:06d}.png" for s in range(10)]
    assert imgs["000007.png"].shape == (64, 64, 3)
    # The PNG is the VAE decoding (after undoing the standardisation) of seed 7's sample.
    net, _, encoder, _ = load_nets(snap, device="cpu")
    x = edm_sampler(net, SeedRandom([7]).randn([1, 4, 8, 8]), num_steps=2)
    with torch.no_grad():
        z = (x - encoder._const(encoder.bias, x)) / encoder._const(encoder.scale, x)
        ref = vae.decode(z)["sample"].clamp(0, 1).mul(255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert_same_pixels(imgs["000007.png"], ref)


def bad_cases(snaps, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"  # a valid safetensors file, but not an edm2 snapshot
    save_file({"w": torch.zeros(2)}, str(foreign))
    cond = ["--net", str(snaps["cond"])]
    return [
        (["--net", str(tmp_path / "missing.safetensors")], "missing"),
        (["--net", str(junk)], "junk.safetensors"),
        (["--net", str(foreign)], "not an edm2 snapshot"),
        (["--net", str(snaps["cond"]), "--guidance", "2"], "--guidance 2: needs --gnet,"),
        (["--net", str(snaps["cond"]), "--gnet", str(snaps["res8"]), "--guidance", "2"], "--gnet: its resolution is 8"),
        (cond + ["--gnet", str(snaps["labels5"]), "--guidance", "2"], "--gnet: its label_dim is 5"),
        (["--net", str(snaps["cond"]), "--class", "3"], "--class 3: out of range"),
        (["--net", str(snaps["cond"]), "--class", "cat"], "--class"),
        (["--net", str(snaps["uncond"]), "--class", "0"], "--class 0: the network is unconditional (label_dim 0); "
                                                           "drop --class"),
        (["--net", str(snaps["cond"]), "--batch", "0"], "--batch 0: must be >= 1"),
        (["--net", str(snaps["cond"]), "--seeds-per-class", "0"], "--seeds-per-class 0: must be >= 1"),
        (["--net", str(snaps["cond"]), "--seeds-per-class", "2", "--class", "1"],
         "--class 1 and --seeds-per-class 2: give one of them"),
        (["--net", str(snaps["uncond"]), "--seeds-per-class", "2"],
         "--seeds-per-class 2: the network is unconditional"),
        (["--net", str(snaps["cond"]), "--steps", "0"], "--steps 0"),
        (["--net", str(snaps["cond"]), "--seeds", "5-2"], "--seeds"),
        (["--net", str(snaps["cond"]), "--seeds", "0-x"], "--seeds"),
        (cond + ["--grid", str(tmp_path / "grid.jpg")], f"--grid {tmp_path / 'grid.jpg'}: must be"),
        (["--seeds", "0-3"], "--net"),
    ]


def test_bad_input_is_one_line_error_and_writes_nothing(snaps, tmp_path, capsys):
    for extra, needle in bad_cases(snaps, tmp_path):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            main(["generate", "--outdir", str(out), "--steps", "1"] + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, extra
        assert len(err.splitlines()) == 1 and needle in err, (extra, err)
        assert not out.exists() and not (tmp_path / "grid.jpg").exists(), extra


def test_python_refusals_name_the_arguments(snaps, tmp_path):
    """The library names its own arguments (the CLI shows them as flags, above)."""
    net, _, encoder, _ = load_nets(snaps["cond"], device="cpu")
    out = tmp_path / "out"
    for kwargs, needle in [(dict(class_idx=3), "class_idx=3: out of range"),
                           (dict(batch_size=0), "batch_size=0: must be >= 1"),
                           (dict(seeds=[1, 1]), "`seeds`: a seed is listed twice"),
                           (dict(seeds=[]), "`seeds`: no seeds given"),
                           (dict(grid=tmp_path / "g.jpg"), "grid="),
                           (dict(guidance=2.0), "guidance=2: needs `gnet`")]:
        kwargs = {"seeds": [0, 1], **kwargs}
        with pytest.raises(EDM2Error) as info:
            generate_to_dir(net, encoder, kwargs.pop("seeds"), out, num_steps=1, progress=False, **kwargs)
        assert needle in str(info.value), (kwargs, str(info.value))
        assert not out.exists()
    generate_to_dir(net, encoder, [0], out, num_steps=1, class_idx=0, progress=False)
    with pytest.raises(EDM2Error, match=r"outdir=.*another network or settings \(num_steps=1 -> 2\)"):
        generate_to_dir(net, encoder, [0, 1], out, num_steps=2, class_idx=0, progress=False)


def test_guided_generation_uses_gnet(snaps, tmp_path):
    base = ["generate", "--net", str(snaps["cond"]), "--seeds", "0-1", "--steps", STEPS, "--class", "1"]
    main(base + ["--outdir", str(tmp_path / "plain")])
    main(base + ["--outdir", str(tmp_path / "same"), "--gnet", str(snaps["cond"]), "--guidance", "3"])
    main(base + ["--outdir", str(tmp_path / "guided"), "--gnet", str(snaps["cond2"]), "--guidance", "3"])
    # Classifier-free guidance: an unconditional guide (label_dim 0) is accepted.
    main(base + ["--outdir", str(tmp_path / "cfg"), "--gnet", str(snaps["uncond"]), "--guidance", "3"])
    # --precision only changes the U-Net dtype on CUDA: on the CPU the images stay the fp32 ones.
    main(base + ["--outdir", str(tmp_path / "bf16"), "--precision", "bf16"])
    plain, same, guided, cfg = (read_pngs(tmp_path / d) for d in ("plain", "same", "guided", "cfg"))
    assert sorted(plain) == sorted(cfg) == ["000000.png", "000001.png"]
    for name, img in read_pngs(tmp_path / "bf16").items():
        assert np.array_equal(img, plain[name])
    for name in plain:
        assert_same_pixels(plain[name], same[name])  # guiding a net by itself changes nothing
        assert np.abs(plain[name].astype(int) - guided[name].astype(int)).max() > 5
        assert np.abs(plain[name].astype(int) - cfg[name].astype(int)).max() > 5


def test_list_presets_prints_the_published_table_and_needs_no_other_option(capsys):
    from edm2.presets import GENERATION_PRESETS, POSTHOC_URL, format_generation_presets

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--list-presets"])  # no --outdir: the listing exits before the required-option check
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "guidance", "interval", "tuned", "for", "reported", "net", "gnet"]
    notes = [p for p in GENERATION_PRESETS.values() if p.description]
    assert len(lines) == 1 + len(GENERATION_PRESETS) + 1 + len(notes)
    rows = {line.split()[0]: line.split() for line in lines[1:1 + len(GENERATION_PRESETS)]}
    assert set(rows) == set(GENERATION_PRESETS)
    assert rows["edm2-img512-s-guid-dino"] == ["edm2-img512-s-guid-dino", "1.9", "-", "FD_DINOv2", "52.32",
                                               "edm2-img512-s-2147483-0.085", "edm2-img512-xs-uncond-2147483-0.085"]
    assert rows["edm2-img64-xl-fid"] == ["edm2-img64-xl-fid", "1", "-", "FID", "1.33", "edm2-img64-xl-0671088-0.040",
                                         "-"]
    assert rows["edm2-img512-xxl-guid-interval-fid"][1:5] == ["2", "0.28,1.61", "FID", "1.4"]
    assert rows["edm2-img512-xxl-guid-interval-dino"][1:5] == ["2.9", "0.6,5", "FD_DINOv2", "-"]
    assert lines[1 + len(GENERATION_PRESETS)] == f"(files: {POSTHOC_URL}/NAME.pkl)"
    assert all("EMA lengths" in line for line in lines[2 + len(GENERATION_PRESETS):])
    # The documentation's Markdown form has the same rows, then the notes.
    md = format_generation_presets(markdown=True).splitlines()
    assert len(md) == 2 + len(GENERATION_PRESETS) + 1 + len(notes)
    assert "| `edm2-img512-xxl-autog-fid` | 2.05 | - | FID | 1.25 | `edm2-img512-xxl-0939524-0.075` | " \
           "`edm2-img512-m-0268435-0.155` |" in md


def test_interval_presets_fill_in_the_interval_and_explicit_values_win():
    from edm2.presets import apply_generation_preset
    net, gnet, w, interval = apply_generation_preset("img512-xxl-guid-interval-fid")
    assert (w, interval) == (2.0, (0.28, 1.61)) and net.endswith("edm2-img512-xxl-0939524-0.015.pkl")
    assert gnet.endswith("edm2-img512-xs-uncond-2147483-0.015.pkl")
    assert apply_generation_preset("img512-xxl-guid-interval-dino", guidance=2.0, guidance_interval="1,2")[2:] == (
        2.0, "1,2")
    assert apply_generation_preset("img512-s-guid-fid")[3] is None  # EDM2's presets guide every step
    assert apply_generation_preset("img512-xxl-guid-interval-fid", guidance=1.0)[3] is None  # nothing to limit
    assert apply_generation_preset(None, "a", None, None, None) == ("a", None, None, None)


def test_solver_and_guidance_interval_in_generate(snaps, tmp_path):
    base = ["generate", "--net", str(snaps["cond"]), "--seeds", "0-1", "--steps", STEPS, "--class", "1",
            "--gnet", str(snaps["uncond"]), "--guidance", "3"]
    main(base + ["--outdir", str(tmp_path / "heun")])
    main(base + ["--outdir", str(tmp_path / "dpm"), "--solver", "dpm++2m"])
    main(base + ["--outdir", str(tmp_path / "all"), "--guidance-interval", "0,inf"])
    main(base + ["--outdir", str(tmp_path / "none"), "--guidance-interval", "100,200"])
    main(base[:-4] + ["--outdir", str(tmp_path / "plain")])
    heun, dpm, full, none, plain = (read_pngs(tmp_path / d) for d in ("heun", "dpm", "all", "none", "plain"))
    for name in heun:
        assert np.array_equal(heun[name], full[name])   # (0, inf): every step guided
        assert np.array_equal(none[name], plain[name])  # no step in the interval: unguided
        assert np.abs(heun[name].astype(int) - dpm[name].astype(int)).max() > 5
    # generate.json records the solver and interval only when they are not the defaults, so
    # folders made before these options resume; another solver in the same folder is refused.
    import json
    assert "solver" not in json.loads((tmp_path / "heun" / "generate.json").read_text())["sampler"]
    manifest = json.loads((tmp_path / "all" / "generate.json").read_text())["sampler"]
    assert manifest["guidance_interval"] == [0.0, "inf"]
    assert json.loads((tmp_path / "dpm" / "generate.json").read_text())["sampler"]["solver"] == "dpm++2m"
    main(base + ["--outdir", str(tmp_path / "all"), "--guidance-interval", "0,inf"])  # resumes
    with pytest.raises(SystemExit):
        main(base + ["--outdir", str(tmp_path / "heun"), "--solver", "euler"])
    net, _, encoder, _ = load_nets(snaps["cond"], device="cpu")
    with pytest.raises(EDM2Error, match="S_churn=1: solver='dpm"):
        generate_to_dir(net, encoder, [0], tmp_path / "x", num_steps=2, solver="dpm++2m", S_churn=1, progress=False)
    with pytest.raises(EDM2Error, match="guidance_interval="):
        generate_to_dir(net, encoder, [0], tmp_path / "x", num_steps=2, gnet=net, guidance=2,
                        guidance_interval=(3, 1), progress=False)
    with pytest.raises(EDM2Error, match="guidance_interval=0.28,1.61: there is no guidance to limit"):
        generate_to_dir(net, encoder, [0], tmp_path / "x", num_steps=2, guidance_interval=(0.28, 1.61),
                        progress=False)
    assert not (tmp_path / "x").exists()


def test_seeds_per_class_puts_class_r_on_grid_row_r(snaps, tmp_path):
    """--seeds-per-class K: seed s is drawn for class (s // K) % label_dim, the grid has
    one row per block of K seeds, generate.json records the option (a resume matches it,
    another class option is refused)."""
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    argv = ["generate", "--net", str(snaps["labels5"]), "--outdir", str(out), "--seeds", "0-14",
            "--seeds-per-class", "3", "--steps", STEPS, "--batch", "4", "--device", "cpu", "--grid", str(grid)]
    assert main(argv) == 0
    pngs = read_pngs(out)
    assert json.loads((out / "generate.json").read_text())["class"] == {"seeds_per_class": 3}
    net, _, encoder, _ = load_nets(snaps["labels5"], device="cpu")
    # The labels passed for each seed: its block's class, and the same images as --class r for that block.
    got = collect(generate_images(net, encoder, range(15), seeds_per_class=3, batch_size=4, num_steps=int(STEPS)))
    assert [got[s][1] for s in range(15)] == [s // 3 for s in range(15)]
    for r in range(5):
        fixed = collect(generate_images(net, encoder, range(3 * r, 3 * r + 3), class_idx=r, num_steps=int(STEPS)))
        for s in range(3 * r, 3 * r + 3):
            assert_same_pixels(fixed[s][0][0].numpy(), pngs[f"{s:06d}.png"])
    # Grid row r, column c = seed 3r + c (5 rows of 3 images of 16x16).
    g = np.asarray(Image.open(grid))
    assert g.shape == (5 * 16, 3 * 16)
    for s in range(15):
        r, c = divmod(s, 3)
        assert np.array_equal(g[16 * r:16 * r + 16, 16 * c:16 * c + 16], pngs[f"{s:06d}.png"])
    # Classes cycle past label_dim; a block cut by the seed range starts its own row.
    assert seed_classes([14, 15, 16, 17], 3, 5).tolist() == [4, 0, 0, 0]
    assert main(argv) == 0  # resume: same option, nothing to do
    with pytest.raises(SystemExit):
        main([*argv[:6], "--class", "1", *argv[8:]])
    with pytest.raises(EDM2Error, match="seeds_per_class=0: must be an integer >= 1"):
        generate_to_dir(net, encoder, [0], tmp_path / "o2", seeds_per_class=0, progress=False)
    with pytest.raises(EDM2Error, match="class_idx=1 and seeds_per_class=2"):
        generate_to_dir(net, encoder, [0], tmp_path / "o2", class_idx=1, seeds_per_class=2, progress=False)
    assert not (tmp_path / "o2").exists()
