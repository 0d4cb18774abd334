"""`kubectl explain` teaches every field of both CRDs, from the live API server's OpenAPI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from virtshift.api.crdgen import KINDS, crd

RESOURCES = {"NodeDrain": "nodedrains", "MigrationPolicy": "migrationpolicies.virtshift.io"}


def _object_paths(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object-valued path below spec, with its properties (arrays explain their items)."""
    node = schema.get("items", schema)
    props = node.get("properties")
    if not props:
        return
    yield path, props
    for name, sub in props.items():
        yield from _object_paths(sub, f"{path}.{name}")


CASES = [
    (RESOURCES[k.name], path, props)
    for k in KINDS
    for path, props in _object_paths(
        crd(k)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec"
    )
]


@pytest.mark.parametrize(("resource", "path", "props"), CASES,
                         ids=[f"{r}.{p}" for r, p, _ in CASES])
def test_explain_describes_every_field(cluster, resource, path, props) -> None:
    out = cluster.kubectl("explain", f"{resource}.{path}").stdout
    flat = " ".join(out.split())
    for name, sub in props.items():
        assert f"{name}\t" in out or f"{name} " in out or f"{name}\n" in out, (name, out)
        first_words = " ".join(sub["description"].split()[:6])
        assert first_words in flat, (name, first_words, out)


def test_kubevirt_migrationpolicies_stay_reachable_by_full_name(cluster) -> None:
    ours = cluster.kubectl("explain", "migrationpolicies.virtshift.io").stdout
    theirs = cluster.kubectl("explain", "migrationpolicies.migrations.kubevirt.io").stdout
    assert "GROUP:      virtshift.io" in ours or "virtshift.io" in ours.splitlines()[0]
    assert "migrations.kubevirt.io" in theirs
    for short in ("vsmp", "nd"):
        assert cluster.kubectl("get", short).returncode == 0


def test_explain_says_which_downtimes_are_predicted_and_which_observed(cluster) -> None:
    def explain(path: str) -> str:
        return " ".join(cluster.kubectl("explain", path).stdout.split())

    assert "A prediction, never a measurement" in explain(
        "nodedrains.status.vms.predictedDowntimeMs")
    observed = explain("nodedrains.status.vms.observedDowntimeMs")
    assert "Measured switch-over downtime" in observed and "--downtime-source" in observed
    assert "restartTimestamps" in explain("nodedrains.status.vms.downtimeSource")
    assert "never predicted" in explain("migrationpolicies.virtshift.io.status.downtime")
    assert "--downtime-source" in explain(
        "migrationpolicies.virtshift.io.status.downtime.samples")
