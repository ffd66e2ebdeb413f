"""Rates and durations as operators write them: ``20mbit``, ``512kbit``, ``600ms``, ``0.6s``.

One parser for the config file (``[link]``, where a unit is required: ``rtt = 600`` could be
seconds or milliseconds, and a wrong guess is a factor of 1000) and for the lab's command line
(where a bare number has a stated default unit: milliseconds, Mbit/s). Rates are decimal, as
``tc`` and every data sheet count them: 1 Mbit/s = 10^6 bit/s. Pure functions; errors are
``ValueError`` with a message saying what is allowed, which each caller prefixes with its key.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "format_rate", "parse_duration", "parse_rate"]

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "k": 1e3, "mbit": 1e6, "m": 1e6, "gbit": 1e9, "g": 1e9}
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0}


def parse_rate(text: str, default_unit: str | None = None) -> int:
    """``20mbit``, ``20M``, ``512kbit``, ``1gbit``, ``20mbit/s`` -> bit/s (an int).

    A bare number takes ``default_unit`` (one of bit, kbit, mbit, gbit); with none, a unit is
    required. Range checks are the caller's: what is sane differs (a link, a lab profile).
    """
    value = _parse(text, r"([a-z]*?)(?:/s|ps)?", _RATE_UNITS, default_unit, _RATE_EXAMPLE)
    return round(value)


def parse_duration(text: str, default_unit: str | None = None) -> float:
    """``600ms``, ``0.6s`` -> seconds; a bare number takes ``default_unit`` (ms or s)."""
    return _parse(text, r"(ms|s)?", _DURATION_UNITS, default_unit, "600ms or 0.6s")


_RATE_EXAMPLE = "20mbit, 512kbit or 1gbit (decimal units)"


def _parse(
    text: str, unit_re: str, factors: dict[str, float], default_unit: str | None, example: str
) -> float:
    """A number and its unit (``unit_re``'s group), scaled by ``factors``."""
    t = text.strip().lower() if isinstance(text, str) else ""
    m = re.fullmatch(_NUM + r"\s*" + unit_re, t)
    unit = (m.group(2) or default_unit or "") if m else ""
    if not m or unit not in factors:
        need = "a number with a unit" if default_unit is None else "a number"
        raise ValueError(f"must be {need} such as {example}")
    return float(m.group(1)) * factors[unit]


def format_rate(bps: float) -> str:
    """7_500_000 -> '7.5 Mbit/s' (for status and logs)."""
    for unit, factor in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= factor:
            return f"{bps / factor:.3g} {unit}"
    return f"{bps:.0f} bit/s"


def format_duration(seconds: float) -> str:
    """0.6 -> '600 ms', 1.5 -> '1.5 s'."""
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"
