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
# `name as name`: building blocks of the commands and tests, importable from here but not in `__all__`.
from .posthoc import PhemaInput as PhemaInput
from .posthoc import PosthocPlan as PosthocPlan
from .posthoc import find_phema_inputs as find_phema_inputs
from .posthoc import plan_posthoc as plan_posthoc
from .posthoc import plot_profiles as plot_profiles
from .posthoc import reconstruct
from .posthoc import resolve_time as resolve_time
from .profiles import (
           MAX_SIGMA_REL,
           exp_to_std,
           power_function_beta,
           profile_inner_product,
           solve_posthoc_coefficients,
           std_to_exp,
)
from .profiles import check_sigma_rel as check_sigma_rel
from .profiles import profile_density as profile_density
from .profiles import profile_fit_error as profile_fit_error
from .trackers import PowerFunctionEMA, TraditionalEMA, reconstruct_state_dict
from .trackers import trackable as trackable

__all__ = ["PowerFunctionEMA", "TraditionalEMA", "reconstruct_state_dict", "reconstruct", "exp_to_std",
           "std_to_exp", "power_function_beta", "profile_inner_product", "solve_posthoc_coefficients",
           "MAX_SIGMA_REL"]
