"""Sampling the toy models with the project's EDM sampler, and the measured
score against the exact ground truth (autoguidance paper, Sec. 3 / Fig. 1).

Score of a set of samples x_i of class c:
  - mean_logp: mean of log p_c(x_i), the ground-truth log-likelihood (sigma = 0);
  - in_fraction: fraction with log p_c(x_i) >= IN_LOGP, i.e. on the tree's
    branches rather than between them. IN_LOGP = -1.8 is fixed from the
    ground truth alone: about 99% of real class-A samples lie above it.
"""
from __future__ import annotations

import json

import torch

from ..sampling import edm_sampler, sigma_steps
from ..utils.fileio import atomic_write_bytes
from .gmm import tree_mixture

IN_LOGP = -1.8
SIGMA_MAX = 5.0   # the toy's data lives in [-1.5, 1.5]^2; sigma_max = 80 would only waste steps


def toy_noise(num: int, seed: int = 0) -> torch.Tensor:
    """Unit normal starting noise [num, 2] from one generator seeded with `seed`."""
    return torch.randn([num, 2], generator=torch.Generator().manual_seed(seed))


def sample_toy(net, num: int = 4096, seed: int = 0, gnet=None, guidance: float = 1, num_steps: int = 32,
               sigma_max: float = SIGMA_MAX, sigma_min: float = 0.002, rho: float = 7,
               trajectories: bool = False, solver: str = "heun", guidance_interval=None):
    """Samples [num, 2] from a toy denoiser (a ToyNet or a GaussianMixture, both
    callable as net(x, sigma, labels)) with edm2.sampling.edm_sampler: 32-step
    Heun (or `solver`), optionally guided by gnet with weight `guidance`
    (autoguidance Eq. 1), in `guidance_interval` if given.

    With trajectories=True also returns the path [num_steps + 1, num, 2]: the
    starting point t_0 * noise, then the state after every step, recorded by
    the sampler's per-step callback."""
    noise = toy_noise(num, seed)
    path = []

    def record(info):
        path.append(info["x"].detach().clone())

    samples = edm_sampler(net, noise, gnet=gnet, guidance=guidance, num_steps=num_steps, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho, solver=solver, guidance_interval=guidance_interval,
                          callback=record if trajectories else None)
    if not trajectories:
        return samples
    start = noise.to(torch.float32) * sigma_steps(num_steps, sigma_min, sigma_max, rho)[0]
    return samples, torch.stack([start, *path])


def toy_score(samples: torch.Tensor, classes: str = "A") -> dict:
    """Ground-truth log-likelihood statistics of samples (see module docstring)."""
    logp = tree_mixture(classes).logp(samples.to(torch.float64))
    finite = torch.isfinite(logp)
    return {"classes": classes, "num": int(len(samples)),
            "in_fraction": float((logp >= IN_LOGP).double().mean()),
            "mean_logp": float(logp[finite].mean()) if finite.any() else float("-inf"),
            "in_logp_threshold": IN_LOGP}


def write_score_json(path, scores) -> None:
    """Write score dict(s) as JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(scores, indent=2) + "\n").encode())
