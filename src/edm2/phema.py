"""Profile math of power-function EMA (paper Sec. 3.1-3.2, App. C).

Former name of `edm2.ema.profiles`, kept importable because these names are
promised stable (docs/design.md, "Public names"); new code imports from
`edm2.ema` or `edm2.ema.profiles`.
"""
from .ema.profiles import exp_to_std, power_function_beta, profile_inner_product, solve_posthoc_coefficients, std_to_exp

__all__ = ["exp_to_std", "std_to_exp", "power_function_beta", "profile_inner_product", "solve_posthoc_coefficients"]
