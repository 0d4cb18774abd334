"""The migration configuration the simulated virt-controller resolves at handoff, table-driven:
KubeVirt's policy matching (migrationpolicy.go matchPolicy, countMatchingLabels) and its
field-by-field overrides (GetMigrationConfByPolicy in 1.7/1.8, applyMigrationPolicySpec in 1.9;
virt-config.go GetMigrationConfiguration)."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.sim.flight import Config, best_policy


def policy(name: str, vmi: dict[str, str] | None = None, ns: dict[str, str] | None = None,
           **spec: Any) -> dict[str, Any]:
    selectors: dict[str, Any] = {}
    if vmi is not None:
        selectors["virtualMachineInstanceSelector"] = vmi
    if ns is not None:
        selectors["namespaceSelector"] = ns
    return {"metadata": {"name": name}, "spec": {"selectors": selectors, **spec}}


@pytest.mark.parametrize(("policies", "vmi", "ns", "winner"), [
    ([policy("a", {"app": "db"}), policy("b", {"app": "db", "tier": "gold"})],
     {"app": "db", "tier": "gold"}, {}, "b"),  # most matching labels
    ([policy("a", {"app": "db"}), policy("b", {"app": "web"})], {"app": "db"}, {}, "a"),
    ([policy("a", {"app": "db"}), policy("b", ns={"team": "x"})],
     {"app": "db"}, {"team": "x"}, "a"),  # a tie: more VMI labels win
    ([policy("b", {"app": "db"}), policy("a", {"app": "db"})], {"app": "db"}, {}, "a"),  # name
    ([policy("a", {"app": "db"})], {"app": "web"}, {}, None),
    ([policy("a", {})], {"app": "web"}, {}, "a"),  # empty selectors match everything
    ([{"metadata": {"name": "a"}, "spec": {}}], {"app": "web"}, {}, None),  # no selectors
    # As coded in KubeVirt: a VMI without labels skips the selector checks.
    ([policy("a", {"app": "db"}, {"team": "x"})], None, {}, "a"),
])
def test_best_policy(policies, vmi, ns, winner) -> None:
    got = best_policy(policies, vmi, ns)
    assert (got["metadata"]["name"] if got else None) == winner


@pytest.mark.parametrize(("version", "spec", "named", "disruption"), [
    ("1.9", {"allowPostCopy": False}, True, False),  # 1.9 records every match
    ("1.8", {"allowPostCopy": False}, False, False),  # 1.8 only when something changed
    ("1.8", {"allowPostCopy": True}, True, True),  # disruption follows allowPostCopy
    ("1.8", {"allowPostCopy": True, "allowWorkloadDisruption": False}, True, False),
    ("1.8", {"allowWorkloadDisruption": True}, True, True),
    ("1.8", {"bandwidthPerMigration": "64Mi"}, True, False),
])
def test_policy_overrides(version, spec, named, disruption) -> None:
    cfg = Config.from_cluster({}, version)
    cfg.apply_policy("p", spec, version)
    assert (cfg.policy == "p") is named
    assert cfg.workload_disruption is disruption
    assert cfg.wire_fields["allowWorkloadDisruption"] is disruption


def test_cluster_defaults_and_version_fields() -> None:
    nine, eight, seven = (Config.from_cluster({}, v) for v in ("1.9", "1.8", "1.7"))
    assert nine.wire_fields["maxDowntimeMs"] == 900 and "maxDowntimeMs" not in eight.wire_fields
    assert "utilityVolumesTimeout" in eight.wire_fields
    assert "utilityVolumesTimeout" not in seven.wire_fields
    assert nine.wire_fields["bandwidthPerMigration"] == "0Mi" and nine.bandwidth == 0
    assert nine.max_downtime == 0.3  # QEMU's: the legacy path never sets one
    tuned = Config.from_cluster({"bandwidthPerMigration": "1Gi", "allowPostCopy": True}, "1.9")
    assert tuned.bandwidth == 2**30 and tuned.workload_disruption is True
