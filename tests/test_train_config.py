"""The training configuration: `edm2 train` options made from TrainConfig's
fields, errors shown with flags, named random streams, and the one
`precision` knob of Precond (older use_fp16/reduced_dtype still read)."""
import dataclasses
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.cli import build_parser, flag_message
from edm2.cli.train import config_from_args, flag
from edm2.io.loading import load_network
from edm2.io.snapshot import make_meta, run_fingerprint, save_snapshot
from edm2.nn import Precond, precision_kwargs
from edm2.train.checkpoint import check_run_folder, dataset_fingerprint
from edm2.train.loop import SESSION_FIELDS, RunPlan, Stream, TrainConfig, plan_run, sample_seed
from edm2.utils.errors import EDM2Error
from helpers import make_dataset, write_snapshot

TINY = dict(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1], num_blocks=1,
            attn_resolutions=[], channels_per_head=8)


def _parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_cli_defaults_are_the_dataclass_defaults():
    assert _parse("--outdir", "run") == TrainConfig(outdir="run")


def test_every_config_field_is_an_option_of_edm2_train():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    flags = {s for a in train._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert flag(f.name) in flags, f.name
    assert "--uncond" in flags and "--rampup-Mimg" in flags and "--loss-scaling" in flags


def test_cli_parses_sizes_lists_and_switches():
    cfg = _parse("--outdir", "r", "--duration", "2Ki", "--batch-gpu", "4", "--ema-std", "0.05,0.1", "--uncond",
                 "--lr", "0.02", "--P-mean", "-1.2", "--force-new", "--precision", "bf16", "--rampup-Mimg", "0.5")
    assert (cfg.duration, cfg.batch_gpu, cfg.sigma_rel, cfg.cond) == (2048, 4, (0.05, 0.1), False)
    assert (cfg.lr, cfg.P_mean, cfg.force_new, cfg.precision, cfg.rampup_Mimg) == (0.02, -1.2, True, "bf16", 0.5)
    assert _parse("--outdir", "r", "--cond").cond is True


def test_library_errors_are_shown_with_flags():
    train_parser = build_parser().parse_args(["train", "--outdir", "r"])._parser

    def cli_message(message):
        return flag_message(train_parser, message)

    assert cli_message("lr=nan: must be a finite number > 0") == "--lr nan: must be a finite number > 0"
    assert (cli_message("batch_gpu=3: must divide the per-process batch 8 (batch=8 over 1 processes)")
            == "--batch-gpu 3: must divide the per-process batch 8 (--batch 8 over 1 processes)")
    assert cli_message("cond=True: no labels; use cond=False") == "--cond: no labels; use --uncond"
    assert cli_message("use force_new=True to start over") == "use --force-new to start over"
    assert cli_message("P_mean=nan: bad") == "--P-mean nan: bad"
    # Only whole argument names followed by '=' change (not paths, not other words).
    assert cli_message("/data/lr=3/x.png: unreadable; the lr is fine") == "/data/lr=3/x.png: unreadable; the lr is fine"


def test_random_streams_keep_their_numbers():
    assert [int(s) for s in Stream] == [0, 1, 2, 3]
    assert [s.name for s in Stream] == ["DATA_ORDER", "NOISE", "DROPOUT", "INIT"]
    for stream in Stream:
        want = int(np.random.SeedSequence([7, int(stream), 123]).generate_state(1, np.uint64)[0]) >> 1
        assert sample_seed(7, stream, 123) == sample_seed(7, int(stream), 123) == want
    assert len({sample_seed(7, s, 123) for s in Stream}) == 4


def test_precision_knob_and_the_authors_use_fp16():
    cuda = torch.device("cuda")
    assert Precond(**TINY).compute_dtype(cuda) == torch.float16
    assert Precond(**TINY, precision="bf16").compute_dtype(cuda) == torch.bfloat16
    assert Precond(**TINY, precision="fp32").compute_dtype(cuda) == torch.float32
    assert Precond(**TINY, precision="bf16").compute_dtype(torch.device("cpu")) == torch.float32
    assert Precond(**TINY, use_fp16=False).precision == "fp32"
    assert Precond(**TINY, use_fp16=True).precision == "fp16"
    with pytest.raises(ValueError, match="precision='fp8'"):
        Precond(**TINY, precision="fp8")


@pytest.mark.parametrize("old,want", [
    ({"use_fp16": True}, "fp16"), ({"use_fp16": False}, "fp32"), ({"use_fp16": True, "reduced_dtype": "bf16"}, "bf16"),
    ({"use_fp16": False, "reduced_dtype": "bf16"}, "fp32"), ({}, None), ({"precision": "bf16"}, "bf16"),
])
def test_older_network_arguments_translate_to_precision(old, want):
    kwargs = precision_kwargs(dict(TINY, **old))
    assert "use_fp16" not in kwargs and "reduced_dtype" not in kwargs
    assert kwargs.get("precision") == want
    assert {k: v for k, v in kwargs.items() if k != "precision"} == TINY


def test_snapshot_with_older_metadata_loads(tmp_path):
    net = Precond(**TINY)
    meta = make_meta(dict(TINY, use_fp16=True, reduced_dtype="bf16"), 0, 0.1, {"type": "rgb"}, {})
    save_snapshot(tmp_path / "old.safetensors", net, meta)
    loaded, _ = load_network(tmp_path / "old.safetensors")
    assert loaded.precision == "bf16"
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_run_folder_of_an_older_version_resumes(tmp_path):
    identity = {"preset": "tiny", "net_kwargs": dict(TINY, precision="fp16"), "lr": 0.01}
    (tmp_path / "config.json").write_text(json.dumps(dict(identity, net_kwargs=dict(TINY, use_fp16=True,
                                                                                   reduced_dtype="fp16"))))
    assert check_run_folder(identity, tmp_path) == "resume"
    with pytest.raises(ValueError, match="different run"):
        check_run_folder(dict(identity, net_kwargs=dict(TINY, precision="bf16")), tmp_path)


# ---------------------------------------------------------------------------
# What a resume may change: the --help headings and the refusal follow the same field metadata.
# ---------------------------------------------------------------------------

BASE = dict(preset="tiny", batch=8, duration=16, status=16, snapshot=16, checkpoint=16, grid=0, workers=0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root / "ds", n=8), make_dataset(root / "other", n=8)


def _other_values(data, tmp_path):
    """A valid value different from BASE's (or the default) for every option of `edm2 train`."""
    return dict(data=str(data[1]), preset="cpu-32", config="F", cond=False, xflip=True, duration=32, batch=16,
                batch_gpu=4, lr=0.02, decay=50.0, rampup_Mimg=0.5, channels=32, dropout=0.1, P_mean=-1.0, P_std=1.1,
                sigma_rel=(0.05,), status=32, snapshot=32, checkpoint=32, slice=8, precision="bf16",
                loss_scaling=2.0, compile=True, channels_last=True, seed=1,
                init=str(write_snapshot(tmp_path / "init.safetensors", label_dim=4)), device="cpu", workers=1,
                grid=4, dynamics=8, dynamics_probe=4, log="wandb", threads=1, force_new=True)


def _help_headings():
    """{dest: title of its --help group} of `edm2 train`."""
    train_parser = build_parser().parse_args(["train", "--outdir", "r"])._parser
    return {a.dest: group.title for group in train_parser._action_groups for a in group._group_actions}


def test_help_headings_say_what_a_resume_refuses(tmp_path, datasets):
    """For every option: changed on the resume of a run, is it refused (a different run)? The --help
    heading of the option says "may change when a run is resumed" exactly when it is not."""
    run = tmp_path / "run"
    run.mkdir()
    base = TrainConfig(outdir=str(run), data=str(datasets[0]), **BASE)
    (run / "config.json").write_text(json.dumps(plan_run(base)[0].identity()))
    headings = _help_headings()
    refused, allowed = set(), set()
    for name, value in _other_values(datasets, tmp_path).items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed != base, name
        try:
            check_run_folder(plan_run(changed)[0].identity(), run, changed.force_new)
            allowed.add(name)
        except EDM2Error as e:
            assert "holds a different run" in str(e), (name, e)
            refused.add(name)
    options = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]} - {"outdir"}  # its own run
    assert refused | allowed == options
    for name in options:
        says_may_change = "may change when a run is resumed" in headings[name]
        assert says_may_change == (name in allowed), (name, headings[name])
        assert ("a resume refuses a change" in headings[name]) == (name in refused), (name, headings[name])
    assert {"seed", "precision", "init", "lr", "sigma_rel"} <= refused
    assert {"duration", "batch_gpu", "slice", "channels_last", "threads"} <= allowed
    assert SESSION_FIELDS == tuple(f.name for f in dataclasses.fields(RunPlan) if f.metadata["resume"])


# config.json of a tiny run as written before RunPlan was made from TrainConfig's fields (DATA: the dataset).
OLD_CONFIG_JSON = {
    "G": '{"preset": "tiny", "config": "G", "loss": "uncertainty", "adam_beta2": 0.99, "ema": "power", '
         '"ema_halflife": 0.0, "ema_rampup_ratio": 0.05, "data": "DATA", "cond": true, "xflip": false, "net_kwargs": '
         '{"img_resolution": 16, "img_channels": 1, "label_dim": 4, "model_channels": 16, "channel_mult": [1, 2], '
         '"num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0, "channels_per_head": 16, "precision": "fp16"}, '
         '"encoder": {"type": "rgb"}, "dataset": {"resolution": 16, "channels": 1, "label_dim": 4, "class_names": '
         '["a", "b", "c", "d"], "path": "DATA", "size": 8, "xflip": false}, "batch": 8, "lr": 0.01, "decay": 100.0, '
         '"rampup_Mimg": 0.0001, "P_mean": -0.8, "P_std": 1.6, "ema_std": [0.05, 0.1], "precision": "fp16", '
         '"loss_scaling": 1.0, "seed": 0, "init": null}',
    "A": '{"preset": "tiny", "config": "A", "loss": "edm", "adam_beta2": 0.999, "ema": "traditional", '
         '"ema_halflife": 1.4901161193847656, "ema_rampup_ratio": 0.05, "data": "DATA", "cond": true, "xflip": false, '
         '"net_kwargs": {"img_resolution": 16, "img_channels": 1, "label_dim": 4, "model_channels": 16, '
         '"channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16, 8], "dropout": 0.1, '
         '"channels_per_head": 16, "precision": "fp16"}, "encoder": {"type": "rgb"}, "dataset": {"resolution": 16, '
         '"channels": 1, "label_dim": 4, "class_names": ["a", "b", "c", "d"], "path": "DATA", "size": 8, '
         '"xflip": false}, "batch": 8, "lr": 0.0001, "decay": 0.0, "rampup_Mimg": 0.0001, "P_mean": -1.2, '
         '"P_std": 1.2, "ema_std": [], "precision": "fp16", "loss_scaling": 100.0, "seed": 0, "init": null}',
}


@pytest.mark.parametrize("config", ["G", "A"])
def test_config_json_of_the_earlier_runplan_resumes(tmp_path, datasets, config):
    data = str(datasets[0].resolve())
    old = json.loads(OLD_CONFIG_JSON[config].replace("DATA", data))
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2))
    sigma_rel = (0.05, 0.1) if config == "G" else None
    plan, _ = plan_run(TrainConfig(outdir=str(tmp_path), data=data, config=config, sigma_rel=sigma_rel, **BASE))
    assert plan.identity() == old
    assert run_fingerprint(plan.identity()) == run_fingerprint(old)   # snapshots' run_id: post-hoc EMA mixes them
    assert check_run_folder(plan.identity(), tmp_path) == "resume"
    assert plan.sigma_rel == old["ema_std"] and "sigma_rel" not in plan.as_dict()


# ---------------------------------------------------------------------------
# Config A's EMA half-life follows the run's duration and is kept on resume.
# ---------------------------------------------------------------------------

def test_config_a_halflife_comes_from_the_runs_duration(tmp_path, datasets):
    """App. B.1: 50M of 2147.5M images; at cpu-32 with 12Ki images that is 286 images (not the 381 of the
    preset's 16Ki default), in `edm2 train` and in every rung of the ladder."""
    from edm2.analysis.ladder import LadderConfig, rung_train_config
    want = 12 * 1024 * 50e6 / 2 ** 31
    config = TrainConfig(outdir=str(tmp_path / "run"), data=str(datasets[0]), preset="cpu-32", config="A",
                         duration=12 * 1024)
    assert plan_run(config)[0].ema_halflife == pytest.approx(want) and round(want) == 286
    rung = rung_train_config(LadderConfig(outdir=str(tmp_path / "ladder"), configs=("A",), data=str(datasets[0]),
                                          duration=12 * 1024, sigma_rels=()), "A")
    assert plan_run(rung)[0].ema_halflife == pytest.approx(want)


def test_a_resume_with_another_duration_keeps_the_halflife(tmp_path, datasets):
    run = tmp_path / "run"
    run.mkdir()
    first = TrainConfig(outdir=str(run), data=str(datasets[0]), config="A", **dict(BASE, batch=16, duration=48))
    (run / "config.json").write_text(json.dumps(plan_run(first)[0].identity()))
    longer = dataclasses.replace(first, duration=96)
    plan = plan_run(longer)[0]
    assert plan.ema_halflife == pytest.approx(48 * 50e6 / 2 ** 31)   # not 96's
    assert check_run_folder(plan.identity(), run) == "resume"
    fresh = plan_run(dataclasses.replace(longer, outdir=str(tmp_path / "new")))[0]
    assert fresh.ema_halflife == pytest.approx(96 * 50e6 / 2 ** 31)
    with pytest.raises(EDM2Error, match=r"^duration=32: config A's EMA half-life.* use duration=48 or more"):
        plan_run(dataclasses.replace(longer, outdir=str(tmp_path / "short"), duration=32))


# ---------------------------------------------------------------------------
# A different run: every differing setting, in full.
# ---------------------------------------------------------------------------

def test_different_run_message_names_every_differing_leaf_in_full(tmp_path):
    long_path = "/data/" + "x" * 80 + "/imagenet-512.zip"
    old = {"data": long_path, "lr": 0.01, "seed": 0, "batch": 8, "net_kwargs": dict(TINY, precision="fp16")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    new = dict(old, data=long_path + "2", lr=0.02, seed=1, batch=16,
               net_kwargs=dict(TINY, model_channels=16, precision="fp16"))
    with pytest.raises(EDM2Error) as e:
        check_run_folder(new, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for text in (f'data: "{long_path}" -> "{long_path}2"', "lr: 0.01 -> 0.02", "seed: 0 -> 1", "batch: 8 -> 16",
                 "net_kwargs.model_channels: 8 -> 16"):
        assert text in msg, (text, msg)


# ---------------------------------------------------------------------------
# The dataset's content: a fingerprint in config.json.
# ---------------------------------------------------------------------------

def _repaint(path):
    """Same file name, other pixels."""
    Image.fromarray(np.full([16, 16], 77, np.uint8)).save(path)


def test_resume_on_changed_dataset_content_is_refused(tmp_path, datasets):
    data = shutil.copytree(datasets[0], tmp_path / "ds")
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(outdir=str(run), data=str(data), **BASE)
    (run / "config.json").write_text(json.dumps(plan_run(config)[0].identity()))
    assert check_run_folder(plan_run(config)[0].identity(), run) == "resume"
    _repaint(data / "0003.png")
    with pytest.raises(EDM2Error, match=r"^data=.*ds: the dataset's content changed since the run in .* started "
                                        r"\(fingerprint dir:\w+ -> dir:\w+\); .*force_new=True"):
        check_run_folder(plan_run(config)[0].identity(), run)


def test_dataset_fingerprint_of_a_zip_sees_any_member(tmp_path):
    folder = make_dataset(tmp_path / "ds", n=40)
    prints = []
    for i, change in enumerate([None, "0039.png"]):
        if change:
            _repaint(folder / change)
        with zipfile.ZipFile(tmp_path / f"ds{i}.zip", "w") as z:
            for p in sorted(folder.iterdir()):
                z.write(p, p.name)
        prints.append(dataset_fingerprint(tmp_path / f"ds{i}.zip"))
    assert prints[0] != prints[1] and prints[0].startswith("zip:")
    # Folders: names and sizes of all files, bytes of the first 32 (and of dataset.json).
    before = dataset_fingerprint(folder)
    (folder / "0005.png").write_bytes((folder / "0005.png").read_bytes() + b"\0")
    assert dataset_fingerprint(folder) != before
    copy = shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copyfile)   # new mtimes, same print
    assert dataset_fingerprint(copy) == dataset_fingerprint(folder)
