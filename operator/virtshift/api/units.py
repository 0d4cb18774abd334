"""Parse the Kubernetes quantities and Go durations our APIs and scenarios accept."""

from __future__ import annotations

import re
from decimal import Decimal

from virtshift.api.common import DURATION_PATTERN, QUANTITY_PATTERN

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}

GiB = 2**30
MiB = 2**20


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("16Gi", "500m", "1e3", 42) as a number of base units."""
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip()
    if not re.match(QUANTITY_PATTERN, s):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (such as 512Mi, 2Gi or 1.5)")
    m = re.match(r"^\+?([0-9.]+)([eE][-+]?[0-9]+)?(.*)$", s)
    assert m
    number = Decimal(m.group(1) + (m.group(2) or ""))
    suffix = m.group(3)
    if suffix in _BINARY:
        return float(number * _BINARY[suffix])
    return float(number * _DECIMAL[suffix])


def parse_duration(text: str | int | float) -> float:
    """A Go duration ("90s", "1h30m", "300ms") in seconds; bare numbers are seconds."""
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip()
    if not re.match(DURATION_PATTERN, s):
        raise ValueError(f"{text!r} is not a duration (such as 300ms, 90s, 5m or 1h30m)")
    return sum(
        float(value) * _DURATION_UNITS[unit]
        for value, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)", s)
    )


def format_bytes(n: float) -> str:
    for unit, size in (("Ti", 2**40), ("Gi", GiB), ("Mi", MiB), ("Ki", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}B"
