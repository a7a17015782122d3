"""Checks of user-given numbers: the one place that decides whether a float
or integer option is usable (finite, in range), for every command and the
Python API alike. Each check raises `EDM2Error` (a ValueError) with a
one-line message `name=value: ...` naming the Python argument and the
accepted range; the command line shows it with the command's flag
(`edm2.cli.flag_message`).

NaN is never accepted (every comparison with NaN is false, so a range check
written as `not lo <= x <= hi` catches it); infinity only where it means
"no limit" (the sampler's S_max).
"""
from __future__ import annotations

import math
import numbers

from .errors import EDM2Error


def _range_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def check_float(value, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float, or EDM2Error unless it is a real number (not NaN;
    infinite only with allow_inf) within [lo, hi] (open ends with lo_open/hi_open).
    `name`: the Python argument, named in the message (`name=value: ...`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EDM2Error(f"{name}={value!r}: expected a number")
    x = float(value)
    ok = not math.isnan(x) and (allow_inf or math.isfinite(x))
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo
    if ok and hi is not None:
        ok = x < hi if hi_open else x <= hi
    if not ok:
        want = _range_text(lo, hi, lo_open, hi_open)
        kind = "a number" if allow_inf else "a finite number"
        raise EDM2Error(f"{name}={value}: must be {kind}{' ' + want if want else ''}")
    return x


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int, or EDM2Error unless it is a whole number within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EDM2Error(f"{name}={value!r}: expected a whole number")
    x = int(value)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise EDM2Error(f"{name}={x}: must be a whole number {_range_text(lo, hi, False, False)}")
    return x


def check_sampler_options(options: dict) -> dict:
    """Check edm_sampler's keyword arguments (those present): num_steps >= 1;
    0 < sigma_min < sigma_max, both finite; rho > 0; S_churn, S_min, S_noise
    finite and >= 0; S_max >= S_min (infinity allowed: no upper limit).
    Messages name the keyword argument (`num_steps=0: ...`).
    Returns them with numbers normalised (floats, int steps)."""
    out = dict(options)
    if "num_steps" in out:
        out["num_steps"] = check_int(out["num_steps"], "num_steps", lo=1)
    for key in ("sigma_min", "sigma_max", "rho"):
        if key in out:
            out[key] = check_float(out[key], key, lo=0, lo_open=True)
    if "sigma_min" in out and "sigma_max" in out and not out["sigma_min"] < out["sigma_max"]:
        raise EDM2Error(f"sigma_min={out['sigma_min']:g} / sigma_max={out['sigma_max']:g}: "
                         f"need sigma_min < sigma_max")
    for key in ("S_churn", "S_min", "S_noise"):
        if key in out:
            out[key] = check_float(out[key], key, lo=0)
    if "S_max" in out:
        out["S_max"] = check_float(out["S_max"], "S_max", lo=out.get("S_min", 0.0), allow_inf=True)
    return out


_UNSAFE_HINTS = ("weights_only", "allow_pickle", "trust_remote_code", "arbitrary code")
UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False", "allow_pickle=True", "trust_remote_code=True")


def safe_error_text(e: BaseException, limit: int = 200) -> str:
    """The first line of a library's error message, for quoting in ours, unless
    it advises loading the file unsafely (torch's "weights_only=False", numpy's
    "allow_pickle=True"): then a neutral description instead. edm2 never
    unpickles data files, so that advice must not reach the user."""
    first = (str(e).strip().splitlines() or [""])[0][:limit]
    if any(h in str(e) for h in _UNSAFE_HINTS):
        return "not a plain tensor/array file; edm2 never loads pickled Python objects from data files"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
