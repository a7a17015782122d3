"""EDM sampler (Karras et al. 2022, Algorithm 2) with optional guidance by a
second network (paper App. D.1, Eq. 152; autoguidance paper Eq. 1), the
per-seed random generators that make every image depend only on its seed,
and `sample_batch`, which turns a batch of seeds into images.

Every sampler-like function here takes `net(x, sigma, labels)` (Precond's
call signature) and returns float32 samples in the network's space. Nothing
here reads or writes files: `edm2.generate` writes PNG folders, and the
training loop's sample grids and `edm2.io.diffusers` call `sample_batch`.
"""
from __future__ import annotations

import math

import torch

from .utils.errors import EDM2Error
from .utils.validate import check_float, check_sampler_options

__all__ = ["edm_sampler", "sample_batch", "sigma_steps", "guided_denoiser", "SeedRandom", "SOLVERS", "sampler_nfe"]

# edm_sampler's keyword arguments and their defaults (paper App. D.1), for the CLI and docs.
SAMPLER_DEFAULTS = dict(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                        S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0)
# Its other options: the solver and the guidance interval (None = guide every step).
SOLVER_DEFAULTS = dict(solver="heun", guidance_interval=None)


def sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, device=None) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} (EDM Eq. 5) followed by t_N = 0.

    Computed in float32 arithmetic (step times in float32, as the authors' code), so the
    steps are bit-identical to the reference's and images match seed for seed.
    """
    if num_steps < 1:
        raise EDM2Error(f"num_steps={num_steps}: must be >= 1")
    if not 0 < sigma_min < sigma_max:
        raise EDM2Error(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
    if rho <= 0:
        raise EDM2Error(f"rho={rho}: must be > 0")
    i = torch.arange(num_steps, dtype=torch.float32, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def check_guidance(guidance: float, gnet=None) -> None:
    """Raise `EDM2Error` unless the guidance weight w can be used: a finite
    number >= 0, and w != 1 only with a guiding network `gnet` (a network, or the
    name of one before it is loaded). w = 1 is plain sampling.
    The one check of this rule: the sampler, generation, metrics and the CLI
    commands all call it."""
    check_float(guidance, "guidance", lo=0)  # finite; w < 0 would push away from the conditional net
    if guidance != 1 and (gnet is None or (isinstance(gnet, str) and not gnet)):
        raise EDM2Error(f"guidance={guidance:g}: needs `gnet`, a guiding network (unconditional for "
                        f"classifier-free guidance, smaller or less trained for autoguidance); "
                        f"or use guidance=1")


def guided_denoiser(net, gnet=None, guidance: float = 1):
    """D~ = D_g + w (D - D_g) (autoguidance paper Eq. 1); the guide is not evaluated when w == 1."""
    check_guidance(guidance, gnet)

    def denoise(x, t, labels):
        d = net(x, t, labels).to(torch.float32)
        if guidance == 1:
            return d
        ref = gnet(x, t, labels).to(torch.float32)
        return ref.lerp(d, guidance)
    return denoise


# Solvers of `edm_sampler` (docs/sampling.md): EDM's 2nd-order Heun (the default), 1st-order
# Euler, and DPM-Solver++(2M) (Lu et al. 2022), all on EDM's time steps (Eq. 5).
SOLVERS = ("heun", "euler", "dpm++2m")


def check_solver(solver) -> str:
    """Raise `EDM2Error` unless `solver` is one of `SOLVERS`; returns it."""
    if solver not in SOLVERS:
        raise EDM2Error(f"solver={solver!r}: unknown; allowed: {', '.join(SOLVERS)}")
    return solver


def check_guidance_interval(guidance_interval):
    """None, or (sigma_lo, sigma_hi) with 0 <= sigma_lo <= sigma_hi (sigma_hi may be inf)
    -> (float, float). A string 'LO,HI' is accepted too. `EDM2Error` otherwise."""
    if guidance_interval is None:
        return None
    text = guidance_interval
    if isinstance(text, str):
        text = [p.strip() for p in text.split(",")]
    try:
        lo, hi = (float(v) for v in text)
    except (TypeError, ValueError):
        raise EDM2Error(f"guidance_interval={guidance_interval}: expected two noise levels LO,HI "
                        f"(guidance where LO < sigma <= HI), e.g. 0.28,1.61") from None
    if not (math.isfinite(lo) and lo >= 0 and hi >= lo and not math.isnan(hi)):
        raise EDM2Error(f"guidance_interval={guidance_interval}: need 0 <= LO <= HI (HI may be inf), "
                        f"e.g. 0.28,1.61")
    return lo, hi


def check_solver_options(solver="heun", guidance_interval=None, S_churn=0.0, guidance=None) -> dict:
    """Check `edm_sampler`'s solver and guidance_interval (and that churn fits the solver;
    with `guidance` given, that an interval has guidance to limit, guidance != 1);
    returns {'solver', 'guidance_interval'} normalised. `EDM2Error` names the argument."""
    check_solver(solver)
    if solver == "dpm++2m" and S_churn > 0:
        raise EDM2Error(f"S_churn={S_churn:g}: solver='dpm++2m' is a deterministic multistep method and cannot "
                        f"add churn noise; use S_churn=0, or solver='heun' / 'euler' for a stochastic sampler")
    interval = check_guidance_interval(guidance_interval)
    if interval is not None and guidance == 1:
        raise EDM2Error(f"guidance_interval={interval[0]:g},{interval[1]:g}: there is no guidance to limit "
                        f"(guidance=1); give `guidance` != 1 with `gnet`, or drop `guidance_interval`")
    return dict(solver=solver, guidance_interval=interval)


def guided_step_mask(t_steps, guidance_interval) -> list[bool]:
    """Which steps are guided: step i is when sigma_lo < t_i <= sigma_hi, t_i its noise level
    before churn (Kynkäänniemi et al. 2024, Sec. 3). t_steps: `sigma_steps` (t_N = 0 included)."""
    ts = t_steps[:-1].tolist()
    if guidance_interval is None:
        return [True] * len(ts)
    lo, hi = check_guidance_interval(guidance_interval)
    return [lo < t <= hi for t in ts]


def sampler_nfe(solver: str = "heun", num_steps: int = 32, guide: bool = False, guidance_interval=None,
                sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7) -> int:
    """Network evaluations per sample (docs/sampling.md#counting-network-evaluations).
    Without `guide`, the main network's: heun 2N-1 (no correction on the last step, to t_N = 0),
    euler N, dpm++2m N, the usual NFE. With `guide=True` the guiding network's evaluations
    are added: one per evaluation of a guided step, every step, or with `guidance_interval`
    those `guided_step_mask` selects on the time steps of (num_steps, sigma_min, sigma_max, rho)."""
    check_solver(solver)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho)
    per_step = [2 if solver == "heun" and i < num_steps - 1 else 1 for i in range(num_steps)]
    total = sum(per_step)
    if guide:
        mask = guided_step_mask(t_steps, guidance_interval)
        total += sum(n for n, m in zip(per_step, mask) if m)
    return total


@torch.no_grad()
def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, randn_like=torch.randn_like,
                solver="heun", guidance_interval=None, callback=None):
    """Sample from `noise` with one of `SOLVERS` on EDM's time steps (Karras et al. 2022, Eq. 5):
    "heun": the 2nd-order sampler of EDM (Alg. 2; paper App. D.1), the default;
    "euler": its 1st-order Euler step alone;
    "dpm++2m": DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in EDM's sigma parameterisation:
    a multistep 2nd-order method with one evaluation per step.
    Deterministic unless S_churn > 0 (heun and euler only; EDM Alg. 2 lines 4-6).

    noise: unit-variance starting noise [N, C, H, W] (scaled by t_0 here).
    labels: one-hot [N, label_dim] or None, given to both networks.
    guidance, gnet: D~ = D_g + w (D - D_g) (`guided_denoiser`).
    guidance_interval: (sigma_lo, sigma_hi) or None: guide only the steps with
        sigma_lo < t_i <= sigma_hi (t_i the step's noise level before churn), in all of
        that step's evaluations; elsewhere only `net` runs (Kynkäänniemi et al. 2024).
        None guides every step.
    randn_like draws the churn noise (pass `SeedRandom.randn_like` for
    results that do not depend on the batch).
    callback: called after each step with {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
        (k-diffusion's convention): the new x, the step index, t_i, the noise level after
        churn and the denoiser's output at (x_hat, sigma_hat).
    Returns float32 samples. Everything constant over the run (the noise levels,
    the churn factors, the guided steps) is computed once before the loop.
    """
    opts = check_sampler_options(dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                      S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise))
    num_steps, S_churn, S_min, S_max, S_noise = (opts[k] for k in ("num_steps", "S_churn", "S_min", "S_max", "S_noise"))
    check_solver_options(solver, guidance_interval, S_churn)
    guided = guided_denoiser(net, gnet, guidance)
    plain = guided_denoiser(net)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    # Churn factor gamma_i per step (EDM Alg. 2 line 4), as Python floats.
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    gammas = [gamma_max if gamma_max > 0 and S_min <= t <= S_max else 0.0 for t in t_steps[:-1].tolist()]
    mask = guided_step_mask(t_steps, guidance_interval)
    denoisers = [guided if m else plain for m in mask]

    if solver == "dpm++2m":
        return _dpmpp_2m(denoisers, noise, labels, t_steps, callback)
    x_next = noise.to(torch.float32) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoise = denoisers[i]
        # Optional churn: raise the noise level to t_hat, adding fresh noise.
        if gammas[i] > 0:
            t_hat = t_cur + gammas[i] * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur
        # Euler step from (x_hat, t_hat) to t_next.
        denoised = denoise(x_hat, t_hat, labels)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Trapezoidal (Heun) correction, every step but the last (t_N = 0).
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next, labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback({"x": x_next, "i": i, "sigma": t_cur, "sigma_hat": t_hat, "denoised": denoised})
    return x_next


def _dpmpp_2m(denoisers, noise, labels, t_steps, callback):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with lambda = -log(sigma) (EDM's
    x = y + sigma n, so alpha = 1). Each step is the exact exponential-integrator update
    x <- (sigma'/sigma) x + (1 - sigma'/sigma) D, with D extrapolated linearly in lambda
    from this step's and the previous step's denoised values (1st order on the first
    step and on the last step, to sigma = 0, where it returns D)."""
    x = noise.to(torch.float32) * t_steps[0]
    old_denoised, h_last = None, None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        denoised = denoisers[i](x, t_cur, labels)
        if t_next == 0:
            x_new = denoised
        else:
            h = (t_cur / t_next).log()  # lambda(t_next) - lambda(t_cur)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x_new = (t_next / t_cur) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = x_new
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "sigma_hat": t_cur, "denoised": denoised})
    return x


def sample_batch(net, encoder, rnd: SeedRandom, class_idx=None, gnet=None, guidance: float = 1, **sampler_kwargs):
    """One batch from per-sample generators `rnd` -> (images, labels, classes).

    The draws follow the authors' order: noise, then (conditional net) the class
    index when class_idx is None, then churn noise inside edm_sampler.
    class_idx: None (random per sample), an int for every sample, or an int64
    tensor [N] of per-sample classes. images: encoder.decode of the samples
    (uint8 pixels), or the float32 network-space samples when encoder is None.
    labels (one-hot float32) and classes (int64) are None for an unconditional net.
    This is the one place that turns seeds into images (`edm2.generate.generate_images`,
    the training loop's sample grids and `edm2.io.diffusers.EDM2Pipeline` call it)."""
    n, device = len(rnd), rnd.device
    noise = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution])
    labels = classes = None
    if net.label_dim:
        if class_idx is None:
            classes = rnd.randint(net.label_dim, [n])
        elif torch.is_tensor(class_idx):
            classes = class_idx.to(device=device, dtype=torch.int64).reshape(n)
        else:
            classes = torch.full([n], int(class_idx), dtype=torch.int64, device=device)
        labels = torch.nn.functional.one_hot(classes, net.label_dim).to(torch.float32)
    with torch.no_grad():
        x = edm_sampler(net, noise, labels, gnet=gnet, guidance=guidance, randn_like=rnd.randn_like, **sampler_kwargs)
        if not torch.isfinite(x).all():
            bad = [s for s, ok in zip(rnd.seeds, torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
            raise EDM2Error(f"the network produced non-finite values (NaN/inf) for seed(s) "
                            f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}; its weights "
                            f"are probably damaged or training diverged; nothing was written for them")
        images = encoder.decode(x) if encoder is not None else x
    return images, labels, classes


class SeedRandom:
    """One `torch.Generator` per sample, seeded with seed % 2**32 (docs/design.md#per-seed-randomness).

    Every draw has shape [N, *per_sample_shape]; sample n's slice comes from
    generator n alone, so a sample never depends on the batch it is in or on
    how seeds are spread over processes. The order of draws is: noise
    ([C, H, W] per seed), then (conditional net, no given class) the class
    index, then churn noise inside the sampler.
    """

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    @classmethod
    def from_generators(cls, generators) -> SeedRandom:
        """Draw from given torch.Generators, one per sample (the same object may
        repeat: its samples then draw one after another from it)."""
        generators = list(generators)
        if not generators:
            raise EDM2Error("SeedRandom.from_generators: no generators")
        devices = {torch.device(g.device) for g in generators}
        if len(devices) != 1:
            raise EDM2Error(f"SeedRandom.from_generators: generators on several devices {sorted(map(str, devices))}")
        out = cls([])
        out.device, out.generators = devices.pop(), generators
        return out

    def __len__(self):
        return len(self.generators)

    def _check(self, size):
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise EDM2Error(f"SeedRandom: leading size {size[:1]} must equal the number of seeds ({len(self)})")
        return size[1:]

    def randn(self, size, dtype=torch.float32, device=None):
        """Standard normal [N, *size[1:]], one slice per generator."""
        per = self._check(size)
        return torch.stack([torch.randn(per, generator=g, dtype=dtype, device=device or self.device)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size, dtype=torch.int64, device=None):
        """Integers in [0, high) of shape [N, *size[1:]], one slice per generator."""
        per = self._check(size)
        return torch.stack([torch.randint(high, per, generator=g, dtype=dtype, device=device or self.device)
                            for g in self.generators])
