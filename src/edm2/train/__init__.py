"""Training of EDM2 models (paper Sec. 2-3, App. B-C): `train(TrainConfig(outdir=...))`
trains, or resumes, the run in a folder and returns a `TrainResult`; `dry_run`
shows the resolved run (`RunPlan`, stored as config.json) without writing
anything. `edm2 train` is the same on the command line (docs/training.md).
The pieces live in `edm2.train.loop` (the loop), `edm2.train.config`
(`TrainConfig`), `edm2.train.checkpoint` (resume checkpoints and the run
folder), `edm2.train.log` (status, TensorBoard, sample grids) and
`edm2.train.speed` (channels_last, torch.compile)."""
from .config import TrainConfig
from .loop import RunPlan, TrainResult, dry_run, train

__all__ = ["TrainConfig", "TrainResult", "RunPlan", "train", "dry_run"]
