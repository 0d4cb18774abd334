"""The benchmark report's idle-slot figure, from the VMIMs' phase timestamps."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.bench.report import idle_slots


def move(source: str, scheduling: float | None, end: float | None) -> dict[str, Any]:
    stamps = {"Pending": 0.0}
    if scheduling is not None:
        stamps["Scheduling"] = scheduling
    if end is not None:
        stamps["Succeeded"] = end
    return {"source": source, "stamps": stamps}


@pytest.mark.parametrize(("timeline", "spans", "k", "expected"), [
    # Two slots kept busy back to back: nothing idle.
    ([move("n1", 0, 10), move("n1", 0, 10), move("n1", 10, 20), move("n1", 10, 20)],
     {"n1": [0, 20]}, 2, 0.0),
    # The next two start 3 s late (no VMIM queued in time): 2 slots x 3 s.
    ([move("n1", 0, 10), move("n1", 0, 10), move("n1", 13, 23), move("n1", 13, 23)],
     {"n1": [0, 23]}, 2, 6.0),
    # The tail: one VM left, the other slot has nothing to do: not idle time.
    ([move("n1", 0, 10), move("n1", 0, 20)], {"n1": [0, 20]}, 2, 0.0),
    # One VM waits 5 s while one slot is free; a node outside the spans is not counted.
    ([move("n1", 0, 10), move("n1", 5, 15), move("n9", 50, 60)], {"n1": [0, 15]}, 2, 5.0),
    # A wave: each node within its own span; the gap between nodes is no slot's.
    ([move("n1", 0, 10), move("n2", 30, 40), move("n2", 32, 40)],
     {"n1": [0, 10], "n2": [30, 40]}, 2, 2.0),
])
def test_idle_slots(timeline: list[dict[str, Any]], spans: dict[str, list[float]], k: int,
                    expected: float) -> None:
    assert idle_slots(timeline, spans, k) == expected
