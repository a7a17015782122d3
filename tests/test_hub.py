"""Hugging Face conventions: Precond.save_pretrained / from_pretrained and
`edm2 export --format hf`, including a model in the authors' published format."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save

import helpers.official as fmt  # noqa: E402
from edm2.cli import main  # noqa: E402
from edm2.io.hub import export_hf  # noqa: E402
from edm2.io.snapshot import load_snapshot, read_snapshot_meta  # noqa: E402
from edm2.nn import Precond  # noqa: E402
from helpers import write_snapshot  # noqa: E402
from helpers.cli import assert_refused  # noqa: E402

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


def test_config_json_problems_are_one_line_naming_the_file(tmp_path):
    """Not JSON, not an object, values the constructor refuses, weights of another shape:
    one EDM2Error naming config.json (or the weights file) and what is wrong."""
    from edm2.utils.errors import EDM2Error

    net = fmt.make_tiny_net(seed=2)
    good = tmp_path / "good"
    net.save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    cases = [("{not json", "config.json: not valid JSON"),
             (json.dumps([config]), "config.json: holds a JSON list"),
             (json.dumps(dict(config, sigma_data=0.0)), "sigma_data=0.0: must be a finite number > 0"),
             (json.dumps(dict(config, sigma_data=-0.5)), "sigma_data=-0.5: must be a finite number > 0"),
             (json.dumps(dict(config, sigma_data=float("nan"))), "sigma_data=nan: must be a finite number > 0"),
             (json.dumps(dict(config, dropout=1.0)), r"dropout=1.0: must be in \[0, 1\)"),
             (json.dumps(dict(config, dropout=-0.1)), r"dropout=-0.1: must be in \[0, 1\)")]
    for text, match in cases:
        (bad / "config.json").write_text(text)
        with pytest.raises(EDM2Error, match=match) as e:
            Precond.from_pretrained(bad)
        assert str(bad) in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    # Weights of another architecture: the first few keys and shapes, not a cut-off torch message.
    (bad / "config.json").write_text(json.dumps(dict(config, model_channels=config["model_channels"] * 2)))
    with pytest.raises(EDM2Error, match=r"model.safetensors: weights do not match config.json \(shape mismatch "
                                        r"\(file vs model\): [\w.]+ \[\d+(, \d+)*\] vs \[\d+") as e:
        Precond.from_pretrained(bad)
    assert re.search(r"\(\d+ in all\)\)$", str(e.value)) and len(str(e.value).splitlines()) == 1
    state = load_file(str(good / "model.safetensors"))
    first = next(iter(state))
    state["extra.weight"] = state.pop(first)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes(save(state))
    with pytest.raises(EDM2Error, match=rf"missing: {re.escape(first)}; unexpected: extra.weight\)$"):
        Precond.from_pretrained(bad)


def test_constructor_checks_are_shared():
    """sigma_data and dropout are checked where every config's network is built."""
    from edm2.nn import build_network
    from edm2.utils.errors import EDM2Error

    kw = {k: v for k, v in fmt.TINY_KWARGS.items() if k != "use_fp16"}
    for config in ("G", "E", "A"):
        with pytest.raises(EDM2Error, match="sigma_data=0: must be a finite number > 0"):
            build_network(config, **dict(kw, sigma_data=0))
        with pytest.raises(EDM2Error, match=r"dropout=1: must be in \[0, 1\)"):
            build_network(config, **dict(kw, dropout=1))


def _rewrite(path, out, **changes):
    """A copy of snapshot `path` with its metadata changed."""
    meta = read_snapshot_meta(path)
    meta.update(changes)
    out.write_bytes(save(load_file(str(path)), metadata={"edm2": json.dumps(meta)}))
    return out


def test_snapshot_metadata_problems_are_one_line_naming_the_file(tmp_path):
    from edm2.io.snapshot import SnapshotError

    snap = write_snapshot(tmp_path / "snap.safetensors")
    kwargs = read_snapshot_meta(snap)["net_kwargs"]
    cases = [({"net_kwargs": [1, 2]}, "metadata net_kwargs is a JSON list"),
             ({"net_kwargs": "big"}, "metadata net_kwargs is a JSON str"),
             ({"net_kwargs": dict(kwargs, colour="red")}, "do not fit config G .*'colour'"),
             ({"net_kwargs": dict(kwargs, sigma_data=-1)}, "net_kwargs: sigma_data=-1: must be a finite number > 0"),
             ({"net_kwargs": dict(kwargs, dropout=1.5)}, r"net_kwargs: dropout=1.5: must be in \[0, 1\)"),
             ({"net_kwargs": dict(kwargs, model_channels=kwargs["model_channels"] * 2)},
              r"weights do not match the architecture in its metadata \(shape mismatch")]
    for changes, match in cases:
        bad = _rewrite(snap, tmp_path / "bad.safetensors", **changes)
        with pytest.raises(SnapshotError, match=match) as e:
            load_snapshot(bad)
        assert str(bad) in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    # Through the CLI: one line naming the file, nothing written.
    assert_refused(["export", "--format", "hf", bad, "--outdir", tmp_path / "o"], watch=[tmp_path],
                   match=[str(bad), "shape mismatch"])


def test_training_checkpoint_is_named_as_such(tmp_path):
    from edm2.train.checkpoint import checkpoint_name, save_checkpoint

    ckpt = tmp_path / checkpoint_name(64)
    save_checkpoint(ckpt, {"nimg": 64, "seed": 0, "net": {"w": torch.zeros(2)}})
    for argv in (["export", "--format", "hf", ckpt, "--outdir", tmp_path / "o"],
                 ["generate", "--net", ckpt, "--outdir", tmp_path / "g", "--seeds", "0", "--device", "cpu"]):
        assert_refused(argv, watch=[tmp_path], match=[str(ckpt), "this is a training checkpoint",
                                                      "pass the run folder or a snapshot"])


def test_export_records_no_local_paths(tmp_path):
    from edm2.io.snapshot import make_meta, save_snapshot

    net = fmt.make_tiny_net(seed=4)
    meta = make_meta(fmt.TINY_KWARGS, 64, 0.1, {"type": "sd-vae", "vae_name": str(tmp_path / "my-vae")},
                     {"resolution": 16, "channels": 4, "label_dim": 3},
                     origin={"run": str(tmp_path / "runs" / "run-7"), "source": "https://example.org/a.pkl",
                             "inputs": [str(tmp_path / "runs" / "run-7" / "snapshot-1.safetensors")]})
    save_snapshot(tmp_path / "snap.safetensors", net, meta)
    export_hf(tmp_path / "snap.safetensors", tmp_path / "hf")
    text = (tmp_path / "hf" / "edm2.json").read_text()
    assert str(tmp_path) not in text
    info = json.loads(text)
    assert info["origin"] == {"run": "run-7", "source": "https://example.org/a.pkl",
                              "inputs": ["snapshot-1.safetensors"]}
    assert info["encoder"]["vae_name"] == "my-vae"


def test_hub_repo_config_problems_are_one_line(tmp_path, monkeypatch):
    """A Hub repo's config.json is checked like a folder's (the download is mocked)."""
    import edm2.nn.hub as hub
    from edm2.utils.errors import EDM2Error

    config = tmp_path / "config.json"
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kwargs: str(tmp_path / filename))
    for text, match in (("[1, 2]", "someone/edm2-model/config.json: holds a JSON list"),
                        ("{oops", "someone/edm2-model/config.json: not valid JSON")):
        config.write_text(text)
        with pytest.raises(EDM2Error, match=match):
            Precond.from_pretrained("someone/edm2-model")
