"""Power-function EMA and post-hoc EMA (paper Sec. 3.1-3.2, App. C).

- `edm2.ema.profiles`: the math of power-function profiles, numpy float64
  (`exp_to_std`, `std_to_exp`, `power_function_beta`, `profile_inner_product`,
  `solve_posthoc_coefficients`, ...).
- `edm2.ema.trackers`: `PowerFunctionEMA` tracks profiles of any
  `torch.nn.Module` and writes their snapshots; `reconstruct_state_dict` turns
  a folder of snapshots into the state dict of any other EMA length;
  `TraditionalEMA` is config A's half-life EMA.
- `edm2.ema.posthoc`: `reconstruct` writes post-hoc EMA snapshots of a run as
  files (`edm2 phema`), streaming tensor by tensor.

The EMA length is called `sigma_rel` everywhere in Python (the snapshot
metadata keeps its key `ema_std`). See docs/posthoc-ema.md.
"""
from .posthoc import PhemaInput, PosthocPlan, find_phema_inputs, plan_posthoc, plot_profiles, reconstruct, resolve_time
from .profiles import (
    MAX_SIGMA_REL,
    check_sigma_rel,
    exp_to_std,
    power_function_beta,
    profile_density,
    profile_fit_error,
    profile_inner_product,
    solve_posthoc_coefficients,
    std_to_exp,
)
from .trackers import PowerFunctionEMA, TraditionalEMA, reconstruct_state_dict, trackable

__all__ = [
    "PowerFunctionEMA", "TraditionalEMA", "reconstruct_state_dict", "trackable",
    "exp_to_std", "std_to_exp", "power_function_beta", "profile_inner_product", "solve_posthoc_coefficients",
    "profile_density", "profile_fit_error", "check_sigma_rel", "MAX_SIGMA_REL",
    "reconstruct", "find_phema_inputs", "resolve_time", "plan_posthoc", "plot_profiles", "PosthocPlan", "PhemaInput",
]
