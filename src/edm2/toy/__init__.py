"""2D toy example of the autoguidance paper (arXiv 2406.02507, Sec. 3, Fig. 1):
an exact tree-shaped Gaussian mixture, a small magnitude-preserving MLP that
learns its log-density, training with power-function EMA, post-hoc EMA,
sampling with the project's EDM sampler (optionally guided), a measured score
against the ground truth, and plots.

    gmm.py       ground truth: GaussianMixture, tree_mixture('A' | 'B' | 'AB')
    model.py     ToyNet (log p by MP layers, score by autograd), load_toy
    train.py     train_toy (snapshots by edm2.ema.PowerFunctionEMA), load_toy_run,
                 posthoc_toy (edm2.ema.reconstruct_state_dict)
    evaluate.py  sample_toy (edm_sampler), toy_score
    plot.py      plot_toy
"""
# `name as name`: used by the command and the tests, importable from here but not in `__all__`.
from .evaluate import IN_LOGP as IN_LOGP
from .evaluate import sample_toy, toy_score
from .evaluate import toy_noise as toy_noise
from .evaluate import write_score_json as write_score_json
from .gmm import CLASSES as CLASSES
from .gmm import GaussianMixture, tree_mixture
from .model import ToyNet, ToyNetConfig
from .model import load_toy as load_toy
from .plot import ToyPanel, plot_toy
from .train import ToyRun, ToyTrainConfig, load_toy_run, posthoc_toy, train_toy
from .train import list_toy_snapshots as list_toy_snapshots

__all__ = ["tree_mixture", "GaussianMixture", "ToyNet", "ToyNetConfig", "ToyPanel", "ToyTrainConfig", "ToyRun",
           "train_toy", "load_toy_run", "posthoc_toy", "sample_toy", "toy_score", "plot_toy"]
