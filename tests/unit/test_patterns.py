"""The string formats the CRDs enforce, table-driven (the API server applies the same regexes)."""

from __future__ import annotations

import re

import pytest

from virtshift.api.common import (
    CRON_PATTERN,
    DURATION_PATTERN,
    QUANTITY_PATTERN,
    TIMEZONE_PATTERN,
)

CASES = [
    (DURATION_PATTERN, "300ms", True),
    (DURATION_PATTERN, "1h30m", True),
    (DURATION_PATTERN, "1.5s", True),
    (DURATION_PATTERN, "90s", True),
    (DURATION_PATTERN, "2 hours", False),
    (DURATION_PATTERN, "5", False),
    (DURATION_PATTERN, "", False),
    (DURATION_PATTERN, "-5s", False),
    (QUANTITY_PATTERN, "500Mi", True),
    (QUANTITY_PATTERN, "1Gi", True),
    (QUANTITY_PATTERN, "1.5G", True),
    (QUANTITY_PATTERN, "100", True),
    (QUANTITY_PATTERN, "1e3", True),
    (QUANTITY_PATTERN, "lots", False),
    (QUANTITY_PATTERN, "1GB", False),
    (QUANTITY_PATTERN, "-1Gi", False),
    (CRON_PATTERN, "0 22 * * *", True),
    (CRON_PATTERN, "*/15 1-5 * * MON-FRI", True),
    (CRON_PATTERN, "0 8 * * SAT,SUN", True),
    (CRON_PATTERN, "30 2 1,15 JAN,JUL *", True),
    (CRON_PATTERN, "@daily", True),
    (CRON_PATTERN, "0  22 * * *", True),
    (CRON_PATTERN, "61 * * * *", False),
    (CRON_PATTERN, "0 24 * * *", False),
    (CRON_PATTERN, "0 0 32 * *", False),
    (CRON_PATTERN, "0 0 * 13 *", False),
    (CRON_PATTERN, "0 0 * * 8", False),
    (CRON_PATTERN, "0 22 * *", False),
    (CRON_PATTERN, "every night", False),
    (CRON_PATTERN, "@sometimes", False),
    (TIMEZONE_PATTERN, "UTC", True),
    (TIMEZONE_PATTERN, "Europe/Berlin", True),
    (TIMEZONE_PATTERN, "America/Argentina/Buenos_Aires", True),
    (TIMEZONE_PATTERN, "Etc/GMT+5", True),
    (TIMEZONE_PATTERN, "Not a zone!", False),
    (TIMEZONE_PATTERN, "/Berlin", False),
]


@pytest.mark.parametrize(("pattern", "text", "ok"), CASES, ids=[c[1] or "empty" for c in CASES])
def test_pattern(pattern: str, text: str, ok: bool) -> None:
    assert bool(re.match(pattern, text)) is ok
