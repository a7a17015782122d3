"""Parsing of the command line's sizes and lists (one place for all of them).

`name` is the Python argument the text is for; messages say `name='text': ...`
(the command line shows them with the command's flag)."""
from __future__ import annotations

import re
from decimal import Decimal, localcontext

from .errors import EDM2Error

__all__ = ["parse_nimg", "parse_float_list", "parse_int_list"]

MAX_COUNT = 2 ** 63 - 1   # counts are stored as 64-bit integers (torch/numpy int64, metadata)
_SUFFIX = {"": 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}


def parse_nimg(text, name: str = "size") -> int:
    """'128Ki' -> 131072, '8Mi' -> 8388608, '1.5Mi', '20000' (images; docs/design.md#units).
    Binary suffixes Ki/Mi/Gi and decimal K/M/G; the result must be a whole number
    from 0 to `MAX_COUNT` (2^63 - 1: counts are stored as 64-bit integers). The
    text is read as an exact decimal, so '9223372036854775808' or '1e999' is
    refused rather than rounded or overflowing."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(Ki|Mi|Gi|K|M|G|)\s*", str(text))
        if not m:
            raise EDM2Error(f"{name}={text!r}: expected a number of images like 20000, 128Ki, 8Mi or 2Gi")
        number = Decimal(m.group(1))
        if number.adjusted() > 30:   # far beyond MAX_COUNT; keeps the product below exact
            raise EDM2Error(f"{name}={text!r}: too large; at most {MAX_COUNT} (2^63 - 1) images")
        with localcontext() as ctx:
            ctx.prec = len(m.group(1)) + 20   # exact: no rounding of the digits given
            value = number * _SUFFIX[m.group(2)]
        if value != value.to_integral_value():
            raise EDM2Error(f"{name}={text!r}: not a whole number of images")
        value = int(value)
    if value < 0:
        raise EDM2Error(f"{name}={text!r}: must be >= 0")
    if value > MAX_COUNT:
        raise EDM2Error(f"{name}={text!r}: too large; at most {MAX_COUNT} (2^63 - 1) images")
    return value


def parse_float_list(text, name: str = "list") -> list[float]:
    """'0.05,0.1' or an arithmetic range '0.010,0.015,...,0.250' (inclusive)."""
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i < 2 or i != len(parts) - 2:
                raise ValueError
            head = [float(p) for p in parts[:i]]
            start, step, stop = head[-2], head[-1] - head[-2], float(parts[-1])
            if step == 0 or (stop - start) * step < 0:
                raise ValueError
            n = int(round((stop - start) / step))
            values = head[:-2] + [round(start + k * step, 10) for k in range(n + 1)]
        else:
            values = [float(p) for p in parts]
    except ValueError:
        raise EDM2Error(f"{name}={text!r}: expected numbers like 0.05,0.1 "
                         f"or a range like 0.010,0.015,...,0.250") from None
    if not values:
        raise EDM2Error(f"{name}={text!r}: empty list")
    return values


def parse_int_list(text, name: str = "list") -> list[int]:
    """'0-49999', '1,2,5-10' -> list of ints (ranges inclusive)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise EDM2Error(f"{name}={text!r}: expected integers and ranges like 0-49999 or 1,2,5-10")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        out.extend(range(lo, hi + 1))
    return out
