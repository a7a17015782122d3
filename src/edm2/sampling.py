"""EDM sampler (Karras et al. 2022, Algorithm 2) with optional guidance by a
second network (EDM2 Sec. 5 / autoguidance paper Eq. 1; SPEC §8).

Every sampler-like function here takes `net(x, sigma, labels)` (Precond's
call signature) and returns float32 samples in the network's space.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["edm_sampler", "sigma_steps", "guided_denoiser"]


def sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, device=None) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} (EDM Eq. 5) followed by t_N = 0, float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])]).to(torch.float32)


def guided_denoiser(net, gnet=None, guidance: float = 1):
    """D~ = D_g + w (D - D_g); the guide is not evaluated when w == 1."""
    if guidance != 1 and gnet is None:
        raise ValueError(f"guidance={guidance} needs a guiding network (gnet); use guidance=1 for plain sampling")

    def denoise(x, t, labels):
        d = net(x, t, labels).to(torch.float32)
        if guidance == 1:
            return d
        ref = gnet(x, t, labels).to(torch.float32)
        return ref.lerp(d, guidance)
    return denoise


@torch.no_grad()
def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, randn_like=torch.randn_like):
    """2nd-order Heun sampler of EDM, deterministic unless S_churn > 0.

    noise: unit-variance starting noise [N, C, H, W]. randn_like draws the
    churn noise (pass per-seed generators for batch-independent results).
    """
    denoise = guided_denoiser(net, gnet, guidance)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0

    x_next = noise.to(torch.float32) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Optional churn: raise the noise level a little, adding fresh noise.
        if gamma_max > 0 and S_min <= t_cur <= S_max:
            t_hat = t_cur + gamma_max * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur
        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat, labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Trapezoidal (Heun) correction, all steps but the last.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next, labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
