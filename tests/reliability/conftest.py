"""The fault-injection suite (issue 14): every test here is marked ``reliability`` (and ``e2e``:
it needs the control plane, so it fails rather than skips when CI=true and binaries are
missing, through ``control_plane_binaries``).

``make test`` runs the bounded form; ``make reliability`` sets RELIABILITY_FULL=1 (20+ SIGKILL
seeds, a larger fuzz budget) and RELIABILITY_REPORT=docs/reliability.md, which this conftest
writes at the end from the runs' records (``harness.RESULTS``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "e2e"):  # operator_harness, fault_proxy
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from harness import FULL, RESULTS, Env  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("RELIABILITY_REPORT")
    if target and RESULTS.exists():
        from report import write_report

        write_report(RESULTS, Path(target), full=FULL)


@pytest.fixture(scope="module")
def make_env(control_plane_binaries, tmp_path_factory) -> Iterator:
    """Build an ``Env`` (a control plane of its own); closed after the test module."""
    made: list[Env] = []

    def make(scenario: str, **kwargs) -> Env:
        env = Env(tmp_path_factory.mktemp("env"), scenario, **kwargs)
        made.append(env)
        return env

    try:
        yield make
    finally:
        for env in made:
            env.close()
