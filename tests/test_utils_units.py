"""edm2.utils.units: counts read exactly, within 64-bit integers."""
import pytest

from edm2.utils.units import parse_nimg


@pytest.mark.parametrize("text, value", [("128Ki", 131072), ("8Mi", 8388608), ("1.5Mi", 1572864), (" 20000 ", 20000),
                                         ("1e3", 1000), ("0", 0), (str(2 ** 63 - 1), 2 ** 63 - 1),
                                         ("9223372036.854775807G", 2 ** 63 - 1), (64, 64)])
def test_counts(text, value):
    assert parse_nimg(text, "n") == value


@pytest.mark.parametrize("text, message", [
    ("1e999", "too large"), (str(2 ** 63), "too large"), (2 ** 63, "too large"), ("9.3e18", "too large"),
    ("1e99999999999", "too large"), ("0.1Ki", "not a whole number"),
    ("8.000000000000000000000000000001G", "not a whole number"),   # beyond float and 28-digit decimal precision
    ("-1", "expected a number"), ("inf", "expected a number"), (True, "expected a number"), (-3, "must be >= 0")])
def test_counts_refused(text, message):
    with pytest.raises(ValueError, match=f"^n={text!r}: {message}"):
        parse_nimg(text, "n")
