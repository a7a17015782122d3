"""Hugging Face conventions: Precond.save_pretrained / from_pretrained and
`edm2 export --format hf`, including a model in the authors' published format."""
import json

import pytest
import torch

import helpers.official as fmt  # noqa: E402
from edm2.cli import main  # noqa: E402
from edm2.io.hub import export_hf  # noqa: E402
from edm2.io.snapshot import load_snapshot  # noqa: E402
from edm2.nn import Precond  # noqa: E402
from helpers import write_snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _outputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.3, 4.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), net.label_dim).float() if net.label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels)


def test_save_pretrained_round_trip_gives_identical_tensors_and_outputs(tmp_path):
    net = fmt.make_tiny_net(seed=3)
    net.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: config[k] for k in fmt.TINY_KWARGS} == fmt.TINY_KWARGS
    back = Precond.from_pretrained(tmp_path / "m")
    assert type(back) is Precond and not back.training
    _same_tensors(net, back)
    assert torch.equal(_outputs(net), _outputs(back))
    # And again from the loaded copy: the config travels with the model.
    back.save_pretrained(tmp_path / "m2")
    assert json.loads((tmp_path / "m2" / "config.json").read_text()) == config


def test_published_format_snapshot_exports_and_loads(tmp_path):
    """A snapshot converted from the authors' published pickle format -> `edm2 export --format hf`
    -> from_pretrained."""
    net = fmt.make_tiny_net(seed=1)
    pkl = fmt.write_published(tmp_path / "edm2-img512-xs-2147483-0.135.pkl", net)
    assert main(["import-official", str(pkl), str(tmp_path / "imported.safetensors")]) == 0
    assert main(["export", "--format", "hf", str(tmp_path / "imported.safetensors"), "--outdir",
                 str(tmp_path / "hf")]) == 0
    snap, meta = load_snapshot(tmp_path / "imported.safetensors")
    back = Precond.from_pretrained(str(tmp_path / "hf"))
    _same_tensors(snap, back)
    assert torch.equal(_outputs(snap), _outputs(back))
    info = json.loads((tmp_path / "hf" / "edm2.json").read_text())
    assert info["class_name"] == "Precond" and info["encoder"]["type"] == "sd-vae"
    assert info["nimg"] == meta["nimg"] and info["ema_std"] == meta["ema_std"]
    # The .pkl itself is accepted as well (imported safely on the way).
    export_hf(pkl, tmp_path / "hf2")
    _same_tensors(back, Precond.from_pretrained(tmp_path / "hf2"))
    # Nothing but the output folders was created next to them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["edm2-img512-xs-2147483-0.135.pkl", "hf", "hf2",
                                                                 "imported.safetensors"])


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_input_one_line_errors_nothing_written(tmp_path, capsys):
    net = fmt.make_tiny_net(seed=2)
    good = tmp_path / "good"
    net.save_pretrained(good)

    # A folder that is not a model.
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Precond.from_pretrained(tmp_path / "notamodel")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Precond.from_pretrained(tmp_path / "missing")
    err = _cli_error(capsys, ["export", "--format", "hf", str(tmp_path / "notamodel"), "--outdir", str(tmp_path / "o")])
    assert "notamodel" in err and "snapshot" in err

    # A config with unknown fields.
    bad = tmp_path / "unknown"
    bad.mkdir()
    config = json.loads((good / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, attention_heads=4, colour="red")))
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"config.json: unknown field\(s\) \['attention_heads', 'colour'\]"):
        Precond.from_pretrained(bad)

    # A config with a wrong architecture for the weights, and truncated weights.
    (bad / "config.json").write_text(json.dumps(dict(config, model_channels=16)))
    with pytest.raises(ValueError, match="weights do not match config.json"):
        Precond.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        Precond.from_pretrained(bad)

    # A missing weights file.
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        Precond.from_pretrained(bad)

    # Export never replaces a non-empty folder without --overwrite, and leaves no temporary files.
    snap = write_snapshot(tmp_path / "snap.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _cli_error(capsys, ["export", "--format", "hf", str(snap), "--outdir", str(out)])
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    err = _cli_error(capsys, ["export", "--format", "hf", str(snap), "--outdir", str(tmp_path / "o"), "--gnet", "x"])
    assert "--gnet" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good", "notamodel", "unknown", "snap.safetensors",
                                                                 "out"])
    assert main(["export", "--format", "hf", str(snap), "--outdir", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    _same_tensors(load_snapshot(snap)[0], Precond.from_pretrained(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good", "notamodel", "unknown", "snap.safetensors",
                                                                 "out"])


def test_networks_do_not_import_file_io():
    """The Hub conventions are part of the network classes (edm2.nn.hub), with no import of edm2.io."""
    import ast
    from pathlib import Path

    import edm2.nn

    imported = set()
    for path in Path(edm2.nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level + (node.module or ""), path.name))
            elif isinstance(node, ast.Import):
                imported.update((a.name, path.name) for a in node.names)
    assert ("huggingface_hub", "hub.py") in imported and (".hub", "unet.py") in imported  # the scan sees them
    assert [m for m in imported if m[0].startswith(("..io", "edm2.io"))] == []
    assert {"save_pretrained", "from_pretrained", "push_to_hub"} <= set(dir(Precond))
