"""The training configuration: `edm2 train` options made from TrainConfig's
fields, errors shown with flags, named random streams, and the one
`precision` knob of Precond (older use_fp16/reduced_dtype still read)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from edm2.cli import build_parser, flag_message
from edm2.cli.train import config_from_args, flag
from edm2.io.loading import load_network
from edm2.io.snapshot import make_meta, save_snapshot
from edm2.nn import Precond, precision_kwargs
from edm2.train.checkpoint import check_run_folder
from edm2.train.loop import Stream, TrainConfig, sample_seed

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
