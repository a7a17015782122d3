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
from .evaluate import IN_LOGP, sample_toy, toy_noise, toy_score, write_score_json
from .gmm import CLASSES, GaussianMixture, tree_mixture
from .model import ToyNet, ToyNetConfig, load_toy
from .plot import ToyPanel, plot_toy
from .train import ToyRun, ToyTrainConfig, list_toy_snapshots, load_toy_run, posthoc_toy, train_toy

__all__ = ["CLASSES", "GaussianMixture", "tree_mixture", "ToyNet", "ToyNetConfig", "load_toy",
           "ToyTrainConfig", "ToyRun", "train_toy", "list_toy_snapshots", "load_toy_run", "posthoc_toy",
           "IN_LOGP", "toy_noise", "sample_toy", "toy_score", "write_score_json", "ToyPanel", "plot_toy"]
