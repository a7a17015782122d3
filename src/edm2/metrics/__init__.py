"""Evaluation (paper App. D.4, A.5): FID and FD_DINOv2 of image folders or of a network
against reference statistics, and post-hoc EMA sweeps.

- `reference_stats(data, dest)`, `calc_metrics(images, ref)`, `gen_metrics(net, ref)`
  (module `edm2.metrics.evaluate`; torchrun-aware), `load_ref(path)`.
- `sweep(rundir, sigma_rels, ref)` and its figure `plot_sweep` (module `edm2.metrics.sweep`).
- `FeatureStats`, `frechet_distance` (module `edm2.metrics.stats`).
- The feature networks: `load_detector(metric)`, `random_detector`, `DETECTORS`,
  `Detector` (module `edm2.metrics.detectors`); a classifier of your own:
  `train_classifier`, `load_classifier`, `classifier_scores` (module `edm2.metrics.classifier`).
"""
# `name as name`: building blocks of the commands and benchmarks, importable from here but not in
# `__all__` (not part of the documented API).
from .classifier import classifier_scores, train_classifier
from .detectors import DETECTORS, Detector, load_classifier, load_detector, random_detector
from .detectors import detector_dir as detector_dir
from .evaluate import append_jsonl as append_jsonl
from .evaluate import calc_metrics, gen_metrics, load_ref, reference_stats
from .evaluate import check_metric_value as check_metric_value
from .evaluate import distances as distances
from .evaluate import load_detectors as load_detectors
from .evaluate import resolve_metrics as resolve_metrics
from .stats import FeatureStats, frechet_distance
from .sweep import plot_sweep, sweep

__all__ = ["reference_stats", "calc_metrics", "gen_metrics", "load_ref", "sweep", "plot_sweep", "FeatureStats",
           "frechet_distance", "load_detector", "random_detector", "DETECTORS", "Detector", "train_classifier",
           "classifier_scores", "load_classifier"]
