"""EDM2 training loss with learned uncertainty, EDM's loss (config A of the
paper's Table 1), and the learning-rate schedule (paper App. B.1 Eqs. 13-16,
App. B.2 Eq. 21; App. B.5 Eq. 67)."""
from __future__ import annotations

import math

import torch

__all__ = ["EDM2Loss", "EDMLoss", "learning_rate_schedule"]


class _DenoisingLoss:
    """What both losses share: ln(sigma) ~ N(P_mean, P_std^2), the weight
    lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (paper Eqs. 13-16) and
    n ~ N(0, sigma^2 I), drawn by `draw` (noise level first, then the noise,
    from `generator` or one generator per sample); `evaluate` is the
    deterministic rest, per element, and `__call__` is both."""

    def __init__(self, P_mean: float, P_std: float, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, generator: torch.Generator | None = None):
        return self.evaluate(net, labels, *self.draw(images, generator))

    def draw(self, images, generator: torch.Generator | None = None):
        """The random part: (float32 images y, sigma [N,1,1,1], lambda(sigma), y + n)."""
        return _noise(images, self.P_mean, self.P_std, self.sigma_data, generator)

    def evaluate(self, net, labels, images, sigma, weight, noisy):
        raise NotImplementedError


class EDM2Loss(_DenoisingLoss):
    """Per-element loss (lambda(sigma) / exp(u)) * ||D(y+n; sigma) - y||^2 + u.

    ln(sigma) ~ N(P_mean, P_std^2); lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2.
    Returns the unreduced [N, C, H, W] tensor. `generator` makes the noise
    reproducible (used for exact resume); a list of one generator per sample
    makes each sample's noise independent of the batch it is in.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)

    def evaluate(self, net, labels, images, sigma, weight, noisy):
        """The deterministic part, Eq. 21 per element, on what `draw` returned
        (what `edm2.train.speed.compile_loss` compiles, with its backward)."""
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


class EDMLoss(_DenoisingLoss):
    """EDM's loss (Karras et al. 2022), used by config A of the paper's Table 1
    (App. B.1): per element lambda(sigma) * (D(y+n; sigma) - y)^2.

    ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2,
    n ~ N(0, sigma^2 I). Same calling convention and noise draws as `EDM2Loss`
    (noise level first, then the noise, from `generator` or one generator per
    sample); the network is called without `return_logvar`. Returns the
    unreduced [N, C, H, W] tensor.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)

    def evaluate(self, net, labels, images, sigma, weight, noisy):
        """The deterministic part, per element, on what `draw` returned."""
        return weight * ((net(noisy, sigma, labels) - images) ** 2)


def _noise(images, P_mean, P_std, sigma_data, generator):
    """(float32 images y, sigma [N,1,1,1] with ln sigma ~ N(P_mean, P_std^2),
    lambda(sigma), y + n with n ~ N(0, sigma^2)); sigma is drawn before n."""
    images = images.to(torch.float32)
    rnd = _randn([images.shape[0], 1, 1, 1], images.device, generator)
    sigma = (rnd * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = _randn(images.shape, images.device, generator) * sigma
    return images, sigma, weight, images + noise


def _randn(shape, device, generator):
    """Normal noise from one generator, or from a list of one generator per sample
    (sample n's slice from generator n: the trainer's noise then does not depend on
    how a batch is split over processes or accumulation rounds)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(list(shape[1:]), device=device, generator=g) for g in generator])
    return torch.randn(shape, device=device, generator=generator)


def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10) -> float:
    """Inverse-square-root decay after ref_batches, linear warm-up over rampup_Mimg
    decimal millions of images (paper Eq. 67, Figs. 16-22). cur_nimg counts images before the step."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr
