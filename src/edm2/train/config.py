"""What a training run is asked to do: `TrainConfig`, plain data (no torch
import, so that the command line starts fast). Each field carries the help
text and kind that `edm2 train` turns into its --flag, whether the preset
supplies its default, whether it is part of the resolved run (config.json)
and whether it may change when a run is resumed, so an option is declared
once, here."""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")   # U-Net dtypes on CUDA (edm2.nn.Precond's `precision`)


def _option(default=None, help: str = "", *, kind: str = "str", resume: bool, preset: bool = False,
            plan: bool = True, key: str | None = None, flag: str | None = None, metavar: str | None = None,
            choices=None, off_flag: str | None = None, cli: bool = True):
    """A TrainConfig field with what `edm2 train` needs to offer it as --flag.

    - kind: str, int, float, nimg (a number of images, Ki/Mi/Gi suffixes), floats
      (a list), flag (on/off), tristate (on/off/unset; `off_flag` turns it off).
    - resume: whether the value may change when a run is resumed (False: a
      resume with another value is refused as a different run).
    - preset: None means the preset's value.
    - plan: part of the resolved run (`RunPlan`, stored in config.json when
      `resume` is False) under the name `key` (default: the field's name).
    - flag: the command-line flag (default: the name with - for _)."""
    return field(default=default, metadata=dict(help=help, kind=kind, resume=resume, preset=preset, plan=plan,
                                                key=key, flag=flag, metavar=metavar, choices=choices,
                                                off_flag=off_flag, cli=cli))


def may_change_on_resume(f: dataclasses.Field) -> bool:
    """Whether a field of TrainConfig (or of the resolved `RunPlan`) may change
    when a run is resumed: the one rule `edm2 train --help` and the resume check follow."""
    return bool(f.metadata["resume"])


def kept_on_resume(f: dataclasses.Field) -> bool:
    """Whether a field of the resolved `RunPlan` is fixed when the run starts
    although it is derived from a setting that may change on resume: config A's
    EMA half-life, a fraction of the duration (paper App. B.1). Such a value is
    stored in config.json and a resume uses the stored value instead of deriving
    it again, so extending a run with another duration never changes it mid-run."""
    return bool(f.metadata.get("kept"))


@dataclass
class TrainConfig:
    """What the user asks for; None means "the preset's value" (or automatic).

    Sizes count training images (docs/design.md#units). `batch` is the global batch; `batch_gpu` the
    micro-batch per process (gradient accumulation when it is smaller than
    batch / processes). `slice` stops this invocation after that many images
    (with a checkpoint); re-running continues. `sigma_rel` lists the EMA lengths
    of the power-function profiles (paper Sec. 3.1). The `edm2 train` options are
    made from these fields (flag: the name with - for _, unless the field names
    another, e.g. `sigma_rel` is --ema-std); `edm2 train --help` lists under
    "may change when a run is resumed" exactly the fields whose metadata says
    `resume=True`, and a resume refuses a change of any other field.
    """
    outdir: str = _option(MISSING, help="run folder (snapshots, checkpoints, logs); another folder is another "
                          "run", resume=False, plan=False, metavar="DIR")
    data: str | None = _option(help="dataset folder or zip (images or 8-channel latents); "
                               "default: the built-in Fashion-MNIST", resume=False, metavar="PATH")
    preset: str = _option("cpu-32", "training preset (cpu-32, tiny, img512-xs, img64-s, ...; the edm2- prefix is "
                          "accepted; default cpu-32)", resume=False, metavar="NAME")
    config: str = _option("G", "config of the paper's ablation ladder (Table 1), A-G: the network and its "
                          "training recipe, composed with the preset (default G; docs/ablation.md)", resume=False,
                          metavar="X")
    cond: bool | None = _option(help="class-conditional (default: if the dataset has labels)", kind="tristate",
                                resume=False, off_flag="--uncond")
    xflip: bool = _option(False, "x-flip augmentation (doubles the dataset)", kind="flag", resume=False)
    duration: int | None = _option(help="training images in all (config A's EMA half-life is computed from it "
                                   "when the run starts and kept on resume)", kind="nimg", resume=True,
                                   preset=True)
    batch: int | None = _option(help="global batch size", kind="nimg", resume=False, preset=True)
    batch_gpu: int | None = _option(help="micro-batch per process (gradient accumulation when smaller; default: "
                                    "the per-process batch)", kind="nimg", resume=True)
    lr: float | None = _option(help="reference learning rate", kind="float", resume=False, preset=True, metavar="X")
    decay: float | None = _option(help="learning-rate decay start, in batches (0: none)", kind="float",
                                  resume=False, preset=True)
    rampup_Mimg: float | None = _option(help="learning-rate warm-up, millions of images (0: none)", kind="float",
                                        resume=False, preset=True, metavar="X")
    channels: int | None = _option(help="model channels", kind="int", resume=False, preset=True, plan=False)
    dropout: float | None = _option(help="dropout probability", kind="float", resume=False, preset=True,
                                    plan=False, metavar="X")
    P_mean: float | None = _option(help="mean of ln(sigma) in training", kind="float", resume=False, preset=True,
                                   metavar="X")
    P_std: float | None = _option(help="std of ln(sigma) in training", kind="float", resume=False, preset=True,
                                  metavar="X")
    sigma_rel: tuple | None = _option(help="EMA lengths sigma_rel, e.g. 0.05,0.10", kind="floats", resume=False,
                                      preset=True, key="ema_std", flag="--ema-std", metavar="LIST")
    status: int | None = _option(help="status interval, images", kind="nimg", resume=True, preset=True)
    snapshot: int | None = _option(help="snapshot interval, images", kind="nimg", resume=True, preset=True)
    checkpoint: int | None = _option(help="checkpoint interval, images", kind="nimg", resume=True, preset=True)
    slice: int | None = _option(help="train at most N images in this invocation, then checkpoint and stop",
                                kind="nimg", resume=True)
    precision: str = _option("fp16", "U-Net dtype on CUDA (default fp16, as the reference; the CPU computes in "
                             "fp32)", resume=False, choices=PRECISIONS)
    loss_scaling: float | None = _option(help="loss scaling factor (default: the config's, 100 for A-C, 1 for "
                                         "D-G)", kind="float", resume=False, preset=True, metavar="X")
    compile: bool = _option(False, "torch.compile the network", kind="flag", resume=True)
    channels_last: bool = _option(False, "keep the network's convolution weights in channels_last memory format "
                                  "(same arithmetic; docs/training.md#speed)", kind="flag", resume=True)
    seed: int = _option(0, "random seed: initialisation, data order, noise (default 0)", kind="int", resume=False)
    init: str | None = _option(help="start from this network (snapshot, run folder or .pkl): fine-tuning",
                               resume=False, metavar="SNAPSHOT")
    device: str | None = _option(help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)",
                                 resume=True)
    workers: int | None = _option(help="data loader processes (default: 2 on CUDA, 0 on CPU)", kind="int",
                                  resume=True)
    grid: int = _option(60, "images in the sample grid at each snapshot (conditional: 10 class rows; 0: none)",
                        kind="int", resume=True)
    dynamics: int | None = _option(help="every N images, measure activation and weight magnitudes per U-Net level "
                                   "into dynamics.jsonl (docs/dynamics.md; default: off)", kind="nimg", resume=True,
                                   plan=False)
    dynamics_probe: int = _option(256, "training items in the --dynamics probe batch (default 256)", kind="int",
                                  resume=True, plan=False)
    log: str | None = _option(help="also log the status records to: tensorboard (OUTDIR/tensorboard/), wandb "
                              "(Weights & Biases), or both, comma-separated (default: none; log.txt and stats.jsonl "
                              "are always written; docs/training.md#logging)", resume=True, plan=False,
                              metavar="LIST")
    threads: int | None = _option(help="CPU threads per process (default: OMP_NUM_THREADS if set, else this "
                                  "machine's cores shared by its training processes, at most 4 each)", kind="int",
                                  resume=True, plan=False)
    force_new: bool = _option(False, "start over in an --outdir that holds another run (its files move to "
                              "DIR/previous-N/)", kind="flag", resume=True, plan=False)
    progress: bool | None = _option(help="tqdm bar (None: when stderr is a terminal)", resume=True, plan=False,
                                    cli=False)
