"""Pictures of the toy example: ground-truth contours with samples and
optional sampling trajectories, one panel per configuration (cf. the
autoguidance paper's Fig. 1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..utils.errors import EDM2Error
from ..utils.fileio import pyplot, save_figure
from .evaluate import IN_LOGP, sample_toy, toy_score
from .gmm import tree_mixture


@dataclass
class ToyPanel:
    """One panel: samples of `net` (a ToyNet, or a GaussianMixture for the exact
    denoiser) by the EDM sampler, optionally guided by `gnet` with weight
    `guidance`; net=None shows real samples of the ground truth instead."""
    title: str
    net: object
    gnet: object = None
    guidance: float = 1.0


def _grid(view, resolution):
    x0, x1, y0, y1 = view
    gx, gy = np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution)
    pts = torch.as_tensor(np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1))
    return gx, gy, pts


def plot_toy(panels, out, classes: str = "A", num: int = 4096, seed: int = 0, trajectories: int = 0,
             view=(-0.9, 1.5, -0.9, 1.5), resolution: int = 200, panel_inches: float = 3.6,
             dpi: int = 80) -> list[dict]:
    """Draw every panel (ground-truth regions log p >= IN_LOGP of both classes
    in grey and of `classes` in orange, samples as dots, `trajectories` of them
    as lines) into one PNG at `out` (written atomically). Returns each panel's
    toy_score dict (with its title)."""
    if resolution < 2 or trajectories < 0 or num < 1 or not panels:
        raise EDM2Error(f"plot_toy: need panels, num >= 1, resolution >= 2, trajectories >= 0 "
                         f"(got {len(panels)}, {num}, {resolution}, {trajectories})")
    plt = pyplot()

    gx, gy, pts = _grid(view, resolution)
    # float32 is plenty for drawing a contour (errors ~0.01 nats) and twice as fast as float64.
    regions = [(tree_mixture("AB").logp(pts, dtype=torch.float32).numpy(), "#e6e6e6", "#b3b3b3"),
               (tree_mixture(classes).logp(pts, dtype=torch.float32).numpy(), "#ffcc99", "#cc9980")]
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_inches * len(panels), panel_inches + 0.5), squeeze=False)
    scores = []
    for ax, panel in zip(axes[0], panels):
        if panel.net is None:
            samples, path = tree_mixture(classes).sample(num, generator=torch.Generator().manual_seed(seed)), None
        else:
            result = sample_toy(panel.net, num, seed=seed, gnet=panel.gnet, guidance=panel.guidance,
                                trajectories=trajectories > 0)
            samples, path = result if trajectories > 0 else (result, None)
        score = dict(toy_score(samples, classes), title=panel.title, guidance=panel.guidance)
        scores.append(score)
        for logp, fill, line in regions:
            ax.contourf(gx, gy, logp, levels=[IN_LOGP, np.inf], colors=[fill])
            ax.contour(gx, gy, logp, levels=[IN_LOGP], colors=[line], linewidths=0.8)
        if path is not None:
            ax.plot(path[:, :trajectories, 0].numpy(), path[:, :trajectories, 1].numpy(), "-", color="tab:blue",
                    alpha=0.35, linewidth=0.7)
        s = samples.numpy()
        ax.scatter(s[:, 0], s[:, 1], s=1.0, c="black", alpha=0.35, linewidths=0, rasterized=True)
        ax.set_xlim(view[0], view[1])
        ax.set_ylim(view[2], view[3])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{panel.title}\nin {score['in_fraction']:.3f}, log p {score['mean_logp']:.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=dpi)
    return scores
