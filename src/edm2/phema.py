"""Profile math of power-function EMA (paper Sec. 3.1-3.2, App. C).

Former name of `edm2.ema.profiles`, kept importable because these names are
promised stable (docs/design.md, "Public names"); new code imports from
`edm2.ema` or `edm2.ema.profiles`.
"""
# `name as name`: re-exported names (the module is an alias of edm2.ema.profiles for these five).
from .ema.profiles import exp_to_std as exp_to_std
from .ema.profiles import power_function_beta as power_function_beta
from .ema.profiles import profile_inner_product as profile_inner_product
from .ema.profiles import solve_posthoc_coefficients as solve_posthoc_coefficients
from .ema.profiles import std_to_exp as std_to_exp
