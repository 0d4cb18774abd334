"""The API server itself rejects bad NodeDrains and MigrationPolicies, naming the field."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from virtshift.api.migrationpolicy import MigrationPolicy
from virtshift.api.nodedrain import NodeDrain

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
GROUP, VERSION = "virtshift.io", "v1alpha1"

DRAIN = {"nodeName": "node-1"}
POLICY: dict[str, Any] = {}

# (kind, spec, the field path the error must name, a fragment of the message)
BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    ("nodedrains", {"nodeName": "n1", "nodeSelector": {"matchLabels": {"a": "b"}}},
     "spec", "exactly one of spec.nodeName or spec.nodeSelector"),
    ("nodedrains", {}, "spec", "exactly one of spec.nodeName or spec.nodeSelector"),
    ("nodedrains", {"nodeName": "Node_1"}, "spec.nodeName", "should match"),
    ("nodedrains", {**DRAIN, "maxUnavailable": 0}, "spec.maxUnavailable", "greater than or equal"),
    ("nodedrains", {**DRAIN, "deadline": "2 hours"}, "spec.deadline", "should match"),
    ("nodedrains", {**DRAIN, "deadline": "0s"}, "spec.deadline", "greater than zero"),
    ("nodedrains", {**DRAIN, "nonMigratable": "Reboot"}, "spec.nonMigratable", "Unsupported value"),
    ("nodedrains", {**DRAIN, "evictPods": "yes"}, "spec.evictPods", "must be of type boolean"),
    ("nodedrains", {"nodeSelector": {"matchExpressions": [{"key": "zone", "operator": "In"}]}},
     "spec.nodeSelector.matchExpressions[0]", "values must be non-empty"),
    ("nodedrains", {**DRAIN, "nodeNme": "typo"}, "spec.nodeNme", "unknown field"),
    ("nodedrains", {**DRAIN, "policyRef": {}}, "spec.policyRef.name", "Required value"),
    ("migrationpolicies", {"maxDowntime": "fast"}, "spec.maxDowntime", "should match"),
    ("migrationpolicies", {"bandwidthPerMigration": "lots"}, "spec.bandwidthPerMigration",
     "should match"),
    ("migrationpolicies", {"bandwidthPerMigration": "0"}, "spec.bandwidthPerMigration",
     "greater than zero"),
    ("migrationpolicies", {"maxParallelMigrations": 0}, "spec.maxParallelMigrations",
     "greater than or equal"),
    ("migrationpolicies", {"maxAttempts": 0}, "spec.maxAttempts", "greater than or equal"),
    ("migrationpolicies", {"priority": 5000}, "spec.priority", "less than or equal"),
    ("migrationpolicies", {"windows": [{"schedule": "every night", "duration": "4h"}]},
     "spec.windows[0].schedule", "should match"),
    ("migrationpolicies", {"windows": [{"schedule": "61 * * * *", "duration": "4h"}]},
     "spec.windows[0].schedule", "should match"),
    ("migrationpolicies", {"windows": [{"schedule": "0 22 * * *"}]},
     "spec.windows[0].duration", "Required value"),
    ("migrationpolicies",
     {"windows": [{"schedule": "0 22 * * *", "duration": "4h", "timeZone": "Not a zone!"}]},
     "spec.windows[0].timeZone", "should match"),
    ("migrationpolicies", {"onDowntimeExceeded": ["Abort", "PostCopy"]},
     "spec.onDowntimeExceeded", "only the last entry"),
    ("migrationpolicies", {"onDowntimeExceeded": ["PostCopy", "PostCopy"]},
     "spec.onDowntimeExceeded[1]", "Duplicate value"),
    ("migrationpolicies", {"onDowntimeExceeded": []}, "spec.onDowntimeExceeded",
     "should have at least 1 items"),
    ("migrationpolicies", {"backoff": {"initial": "20m", "max": "10m"}},
     "spec.backoff.initial", "initial must not be longer than max"),
    ("migrationpolicies", {"maxParallelMigrations": 5, "maxParallelOutboundPerNode": 10},
     "spec.maxParallelOutboundPerNode", "must not exceed maxParallelMigrations"),
    ("migrationpolicies", {"bandwidthPerMigration": "4Gi", "nodeBandwidth": "1Gi"},
     "spec.bandwidthPerMigration", "must not exceed nodeBandwidth"),
    ("migrationpolicies", {"storage": {"mode": "Always"}}, "spec.storage.targetStorageClass",
     "Required value"),
    ("migrationpolicies", {"storage": {"targetStorageClass": "ceph", "mode": "Sometimes"}},
     "spec.storage.mode", "Unsupported value"),
    ("migrationpolicies", {"completionTimeoutPerGiB": -5}, "spec.completionTimeoutPerGiB",
     "greater than or equal"),
]


def _kind(plural: str) -> str:
    return "NodeDrain" if plural == "nodedrains" else "MigrationPolicy"


def _create(cluster, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": _kind(plural),
            "metadata": {"name": name}, "spec": spec}
    return cluster.custom.create_cluster_custom_object(
        GROUP, VERSION, plural, body, field_validation="Strict"
    )


def test_at_least_fifteen_distinct_bad_specs() -> None:
    assert len({json.dumps(s, sort_keys=True) for _k, s, _f, _m in BAD_SPECS}) >= 15


@pytest.mark.parametrize(("plural", "spec", "field", "fragment"), BAD_SPECS,
                         ids=[f"{b[0]}:{b[2]}:{i}" for i, b in enumerate(BAD_SPECS)])
def test_bad_spec_is_rejected_naming_the_field(cluster, unique, plural, spec, field, fragment):
    with pytest.raises(ApiException) as err:
        _create(cluster, plural, f"bad-{unique}", copy.deepcopy(spec))
    assert err.value.status in (400, 422), err.value.body
    message = json.loads(err.value.body)["message"]
    assert re.search(rf'{re.escape(field)}(["\s:,]|$)', message), message
    assert fragment in message, message


def test_node_name_is_immutable(cluster, unique) -> None:
    name = f"immutable-{unique}"
    _create(cluster, "nodedrains", name, {"nodeName": "node-1"})
    with pytest.raises(ApiException) as err:
        cluster.custom.patch_cluster_custom_object(
            GROUP, VERSION, "nodedrains", name, {"spec": {"nodeName": "node-2"}}
        )
    message = json.loads(err.value.body)["message"]
    assert "spec.nodeName" in message and "immutable" in message, message


def test_schema_defaults_match_the_models(cluster, unique) -> None:
    drain = _create(cluster, "nodedrains", f"defaults-{unique}", {"nodeName": "node-9"})
    policy = _create(cluster, "migrationpolicies", f"defaults-{unique}", {})
    assert drain["spec"] == NodeDrain.model_validate(drain).spec.wire()
    assert policy["spec"] == MigrationPolicy.model_validate(policy).spec.wire()
    assert policy["spec"]["backoff"] == {"initial": "30s", "max": "10m"}
    assert policy["spec"]["onDowntimeExceeded"] == ["Abort"]
    assert drain["spec"]["cancelOnDelete"] is True


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted(cluster, path: Path) -> None:
    out = cluster.kubectl("apply", "--server-side", "--field-manager=tests", "-f", str(path))
    doc = yaml.safe_load(path.read_text())
    assert doc["metadata"]["name"] in out.stdout
    plural = "nodedrains" if doc["kind"] == "NodeDrain" else "migrationpolicies"
    stored = cluster.custom.get_cluster_custom_object(GROUP, VERSION, plural,
                                                      doc["metadata"]["name"])
    model = NodeDrain if doc["kind"] == "NodeDrain" else MigrationPolicy
    assert model.model_validate(stored).spec.wire() == stored["spec"]
    for key, value in doc["spec"].items():
        assert stored["spec"][key] == value
    # Cluster-wide objects: left behind, an example policy (bulk selects every VM) would
    # govern the VMs of the tests that share this control plane.
    cluster.kubectl("delete", "-f", str(path), "--wait=false")
