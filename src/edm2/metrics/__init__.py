"""Evaluation (paper App. D.4, A.5): FID and FD_DINOv2 of image folders or of a network
against reference statistics, and post-hoc EMA sweeps.

- `detectors`: the feature networks (`load_detector`, `random_detector`).
- `stats`: `FeatureStats`, `frechet_distance`.
- `pipeline`: `reference_stats`, `calc_metrics`, `gen_metrics` (torchrun-aware).
- `sweep`: `sweep` (reconstruct EMA lengths, evaluate, CSV + PNG).
"""
from .detectors import (
                        DETECTORS,
                        Detector,
                        DINOv2Detector,
                        InceptionDetector,
                        TinyDetector,
                        detector_dir,
                        load_detector,
                        random_detector,
)
from .evaluate import (
                        append_jsonl,
                        calc_metrics,
                        check_metric_value,
                        check_ref_stats,
                        compute_stats,
                        distances,
                        gen_metrics,
                        gen_seeds,
                        load_detectors,
                        load_ref,
                        reference_stats,
                        resolve_metrics,
                        save_ref,
)
from .stats import FeatureStats, frechet_distance
from .sweep import plot_sweep, sweep

__all__ = ["DETECTORS", "Detector", "InceptionDetector", "DINOv2Detector", "TinyDetector", "detector_dir",
           "load_detector", "random_detector", "FeatureStats", "frechet_distance", "append_jsonl", "calc_metrics",
           "compute_stats", "distances", "gen_metrics", "gen_seeds", "load_detectors", "load_ref", "reference_stats",
           "resolve_metrics", "save_ref", "sweep", "plot_sweep", "check_ref_stats", "check_metric_value"]
