"""Which VMs a drain left behind, judged from the cluster's objects at the end: the drained
nodes' VMIs at the start, compared by UID with where they run now and with the Succeeded
VMIMs (a wave releases nodes, so VMs may land on them again)."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.bench.drain import left_behind

BEFORE = {"u-a": ("ns/a", "n1"), "u-b": ("ns/b", "n1"), "u-gpu": ("ns/gpu", "n2")}


def vmi(uid: str, name: str, node: str, migratable: bool = True) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": "ns", "name": name},
            "status": {"nodeName": node, "conditions": [
                {"type": "LiveMigratable", "status": "True" if migratable else "False"}]}}


@pytest.mark.parametrize(("case", "now", "left_from", "left", "unmovable"), [
    ("all moved away", [vmi("u-a", "a", "n3"), vmi("u-b", "b", "n3")], set(), [], set()),
    ("one never moved", [vmi("u-a", "a", "n3"), vmi("u-b", "b", "n1")], set(), ["ns/b"], set()),
    # Moved off n1, then back onto n1 once the wave released it.
    ("moved and came back", [vmi("u-b", "b", "n1")], {("ns/b", "n1")}, [], set()),
    # A quick migration restarts the VM: a new VMI (new UID) on n1 is not the old one.
    ("restarted, same node", [vmi("u-b2", "b", "n1")], set(), [], set()),
    ("cannot live-migrate", [vmi("u-gpu", "gpu", "n2", migratable=False)], set(), ["ns/gpu"],
     {"ns/gpu"}),
])
def test_left_behind(case: str, now: list[dict[str, Any]], left_from: set[tuple[str, str]],
                     left: list[str], unmovable: set[str]) -> None:
    assert left_behind(now, BEFORE, left_from) == (left, unmovable), case
