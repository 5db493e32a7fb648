"""Number formatting shared by the verdict (evidence lines) and the report."""

from __future__ import annotations

import math


def unknown(value: object) -> bool:
    """True for figures the doctor could not read (None or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def seconds(value: float | None) -> str:
    """A duration as a person reads it: µs / ms below a second, s, then min."""
    if unknown(value):
        return "unknown"
    assert value is not None
    if math.isinf(value):
        return "never"
    if value < 0:
        return "off"
    if value == 0:
        return "0 s"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 600:
        return f"{value:.3g} s"
    return f"{value / 60:.3g} min"


def count(value: float | None) -> str:
    """A count or gauge value; integers without a decimal point."""
    if unknown(value):
        return "unknown"
    assert value is not None
    if math.isinf(value):
        return "unlimited"
    if float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2g}"


def share(value: float | None) -> str:
    """A 0..1 share as a percentage."""
    if unknown(value):
        return "unknown"
    assert value is not None
    return f"{value * 100:.0f}%"


def rate(value: float | None) -> str:
    """Events per second."""
    if unknown(value):
        return "unknown"
    assert value is not None
    return f"{value:.3g}/s"


def flag(value: float | None) -> str:
    """A 0/1 configuration gauge."""
    if unknown(value):
        return "unknown"
    return "on" if value else "off"


def code_site(function: str | None, path: str | None, line: object = None) -> str | None:
    """``function (path:line)``: how every tool names a code site (None when unknown)."""
    where = f"{path}:{line}" if path and line else path
    if function and where:
        return f"{function} ({where})"
    return function or where
