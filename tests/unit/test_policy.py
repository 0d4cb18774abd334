"""MigrationPolicy in the domain: rendering into KubeVirt MigrationPolicies, which policy governs
a VM (and so which label it carries), and the status derived from its migrations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from virtshift.api.common import Condition
from virtshift.api.crdgen import KINDS, crd
from virtshift.api.migrationpolicy import MigrationPolicySpec, MigrationPolicyStatus
from virtshift.domain import policy as p
from virtshift.domain.naming import kubevirt_policy_name, label_value
from virtshift.domain.rules import NamedPolicy, governing_policy, rules_from
from virtshift.domain.views import DowntimeObservation, KubeVirtMigrationConfig, MigrationInfo
from virtshift.k8s import views

NOW = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
BASE_KEYS = {"apiVersion", "kind", "metadata", "spec"}


def spec(**fields: Any) -> MigrationPolicySpec:
    return MigrationPolicySpec.model_validate(fields)


def named(name: str, **fields: Any) -> NamedPolicy:
    return NamedPolicy(name, spec(**fields))


def test_label_keys_agree_with_the_k8s_layer() -> None:
    assert p.POLICY_LABEL == views.POLICY_LABEL
    assert p.MODE_LABEL == views.MODE_LABEL


# -- rendering ------------------------------------------------------------------------------------

RENDER_CASES = [
    pytest.param(
        {}, {}, [], id="nothing set: only the selector"),
    pytest.param(
        {"bandwidthPerMigration": "1Gi", "completionTimeoutPerGiB": 150, "maxDowntime": "300ms",
         "allowAutoConverge": True, "allowPostCopy": False},
        {"bandwidthPerMigration": "1Gi", "completionTimeoutPerGiB": 150, "maxDowntimeMs": 300,
         "allowAutoConverge": True, "allowPostCopy": False}, [], id="every field"),
    pytest.param(
        {"maxDowntime": "1.5s"}, {"maxDowntimeMs": 1500}, [], id="seconds to ms"),
    pytest.param(
        {"maxDowntime": "100us"}, {"maxDowntimeMs": 1}, [], id="below KubeVirt's minimum"),
    pytest.param(
        {"maxDowntime": "1h"}, {"maxDowntimeMs": 2_000_000}, [], id="above KubeVirt's maximum"),
    pytest.param(
        {"bandwidthPerMigration": "500M", "onDowntimeExceeded": ["AutoConverge", "Abort"]},
        {"bandwidthPerMigration": "500M"}, ["AutoConverge"], id="auto-converge variant"),
    pytest.param(
        {"onDowntimeExceeded": ["PostCopy", "Fail"]}, {}, ["PostCopy"], id="post-copy variant"),
    pytest.param(
        {"completionTimeoutPerGiB": 20, "onDowntimeExceeded": ["PostCopy", "Fail"]},
        {"completionTimeoutPerGiB": 20}, ["PostCopy"],
        id="post-copy variant keeps the user's completionTimeoutPerGiB"),
    pytest.param(
        {"completionTimeoutPerGiB": 0}, {"completionTimeoutPerGiB": 0}, [],
        id="completionTimeoutPerGiB 0 (never, as in KubeVirt) is rendered, not dropped"),
    pytest.param(
        {"onDowntimeExceeded": ["AutoConverge", "PostCopy", "QuickMigration", "Allow"]}, {},
        ["AutoConverge", "PostCopy"], id="both variants, other steps render nothing"),
    pytest.param(
        {"onDowntimeExceeded": ["QuickMigration", "Abort"]}, {}, [], id="no convergence steps"),
]


@pytest.mark.parametrize(("fields", "expected", "modes"), RENDER_CASES)
def test_render(fields: dict, expected: dict, modes: list[str]) -> None:
    """With the KubeVirt CR enabling MigrationStallDetection (v1.9+), maxDowntime is rendered."""
    out = p.render("gold", "uid-1", spec(**fields), max_downtime=True)
    names = [o["metadata"]["name"] for o in out]
    assert names == ["virtshift-gold"] + [
        {"AutoConverge": "virtshift-gold-autoconverge",
         "PostCopy": "virtshift-gold-postcopy"}[m] for m in modes]
    for obj, mode in zip(out, [None, *modes], strict=True):
        assert set(obj) == BASE_KEYS
        assert obj["apiVersion"] == "migrations.kubevirt.io/v1alpha1"
        assert obj["kind"] == "MigrationPolicy"
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "virtshift",
                                             "virtshift.io/policy": "gold"}
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy", "name": "gold",
            "uid": "uid-1", "controller": True}]
        selector = {"virtshift.io/policy": "gold"}
        extra = {}
        if mode:
            # A variant is the base policy plus its one flag: the user's completionTimeoutPerGiB
            # (or none, leaving KubeVirt's) holds there too, as the CRD's text says.
            selector["virtshift.io/migration-mode"] = mode
            extra = {"AutoConverge": {"allowAutoConverge": True},
                     "PostCopy": {"allowPostCopy": True}}[mode]
        assert obj["spec"] == {**expected, **extra,
                               "selectors": {"virtualMachineInstanceSelector": selector}}


@pytest.mark.parametrize(("fields", "expected", "modes"), RENDER_CASES)
def test_render_leaves_max_downtime_out_unless_kubevirt_takes_it(fields: dict, expected: dict,
                                                                 modes: list[str]) -> None:
    """KubeVirt v1.9 refuses maxDowntimeMs without MigrationStallDetection
    (migrationpolicy-admitter.go); v1.7 and v1.8 have no such field. Everything else stays."""
    gated = p.render("gold", "uid-1", spec(**fields), max_downtime=True)
    plain = p.render("gold", "uid-1", spec(**fields))
    assert len(plain) == len(gated)
    for without, with_it in zip(plain, gated, strict=True):
        assert "maxDowntimeMs" not in without["spec"]
        assert without["spec"] == {k: v for k, v in with_it["spec"].items()
                                   if k != "maxDowntimeMs"}


@pytest.mark.parametrize(("kv", "applies"), [
    (None, False),
    ({"status": {"observedKubeVirtVersion": "v1.9.0"}}, False),
    ({"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationStallDetection"]}}},
      "status": {"observedKubeVirtVersion": "v1.9.0"}}, True),
    ({"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationStallDetection"]}}},
      "status": {"observedKubeVirtVersion": "v1.10.2"}}, True),
    ({"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationStallDetection"]}}},
      "status": {"observedKubeVirtVersion": "v1.8.4"}}, False),  # no such field before 1.9
    ({"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationStallDetection"]}}}}, True),  # version not reported yet
])
def test_kubevirt_takes_max_downtime_only_with_stall_detection(kv: Any, applies: bool) -> None:
    assert views.kubevirt_applies_max_downtime(kv) is applies


def test_render_long_names_stay_valid_and_distinct() -> None:
    name = "x" * 253
    out = p.render(name, "u", spec(onDowntimeExceeded=["AutoConverge", "PostCopy", "Abort"]))
    names = [o["metadata"]["name"] for o in out]
    assert len(set(names)) == 3 and all(len(n) <= 253 for n in names)
    assert names[0] == kubevirt_policy_name(name)
    assert names == p.all_rendered_names(name)
    value = out[0]["metadata"]["labels"]["virtshift.io/policy"]
    assert value == label_value(name) and len(value) <= 63


OWNERSHIP_CASES = [
    pytest.param({"app.kubernetes.io/managed-by": "virtshift", "virtshift.io/policy": "gold"},
                 None, id="ours"),
    pytest.param({}, ("virtshift-gold", None), id="foreign, no labels"),
    pytest.param({"app.kubernetes.io/managed-by": "helm", "virtshift.io/policy": "gold"},
                 ("virtshift-gold", None), id="someone else manages it"),
    pytest.param({"app.kubernetes.io/managed-by": "virtshift", "virtshift.io/policy": "silver"},
                 ("virtshift-gold", "silver"), id="another virtshift policy's"),
]


@pytest.mark.parametrize(("labels", "conflict"), OWNERSHIP_CASES)
def test_ownership(labels: dict, conflict: tuple | None) -> None:
    existing = {"metadata": {"name": "virtshift-gold", "labels": labels}}
    found = p.ownership(existing, "gold")
    assert (found and (found.name, found.owner)) == (conflict or None)
    if found:
        assert "virtshift-gold" in found.message()


def test_update_keeps_foreign_metadata_and_replaces_spec() -> None:
    desired = p.render("gold", "uid-2", spec(bandwidthPerMigration="2Gi"))[0]
    existing = {
        "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "virtshift-gold", "resourceVersion": "7", "uid": "k",
                     "managedFields": [{}], "annotations": {"a": "b"},
                     "labels": {"app.kubernetes.io/managed-by": "virtshift",
                                "virtshift.io/policy": "gold", "team": "x"},
                     "ownerReferences": [
                         {**desired["metadata"]["ownerReferences"][0], "uid": "old-uid"},
                         {"apiVersion": "v1", "kind": "X", "name": "y", "uid": "z"}]},
        "spec": {"bandwidthPerMigration": "1Gi", "allowPostCopy": True, "selectors": {}},
    }
    assert not p.up_to_date(existing, desired)
    new = p.updated(existing, desired)
    assert new["spec"] == desired["spec"]
    assert new["metadata"]["resourceVersion"] == "7" and "managedFields" not in new["metadata"]
    assert new["metadata"]["labels"]["team"] == "x"
    assert new["metadata"]["annotations"] == {"a": "b"}
    assert [r["uid"] for r in new["metadata"]["ownerReferences"]] == ["z", "uid-2"]
    assert p.up_to_date(new, desired)


# -- precedence and labels ------------------------------------------------------------------------

PRECEDENCE_CASES = [
    pytest.param([named("a"), named("b", priority=1)], {}, {}, None, "b",
                 id="higher priority wins"),
    pytest.param([named("a", priority=5, vmSelector={"matchLabels": {"app": "db"}}),
                  named("b", priority=-5)], {"app": "db"}, {}, None, "a",
                 id="priority beats specificity"),
    pytest.param([named("a"), named("b", vmSelector={"matchLabels": {"app": "db"}})],
                 {"app": "db"}, {}, None, "b", id="more specific wins on a priority tie"),
    pytest.param([named("a", namespaceSelector={"matchLabels": {"env": "prod"}}),
                  named("b", vmSelector={"matchExpressions": [
                      {"key": "app", "operator": "Exists"},
                      {"key": "tier", "operator": "In", "values": ["1"]}]})],
                 {"app": "db", "tier": "1"}, {"env": "prod"}, None, "b",
                 id="specificity counts terms of both selectors"),
    pytest.param([named("zeta"), named("alpha")], {}, {}, None, "alpha",
                 id="name breaks the last tie"),
    pytest.param([named("a", vmSelector={"matchLabels": {"app": "web"}})], {"app": "db"}, {},
                 None, None, id="nothing matches"),
    pytest.param([named("a", namespaceSelector={"matchLabels": {"env": "prod"}})], {},
                 {"env": "dev"}, None, None, id="namespace selector excludes"),
    pytest.param([named("a", priority=100), named("b", vmSelector={"matchLabels": {"x": "y"}})],
                 {}, {}, "b", "b", id="policyRef overrides, even without a match"),
    pytest.param([named("a")], {}, {}, "missing", None, id="policyRef to a missing policy"),
]


@pytest.mark.parametrize(("policies", "vm", "ns", "ref", "winner"), PRECEDENCE_CASES)
def test_governing_policy(policies, vm, ns, ref, winner) -> None:
    chosen = governing_policy(policies, vm, ns, ref)
    assert (chosen.name if chosen else None) == winner


def vmi(key: str, labels: dict | None = None, ns: dict | None = None, **kw: Any
        ) -> p.VMIPolicyView:
    return p.VMIPolicyView(key=key, labels=labels or {}, namespace_labels=ns or {}, **kw)


POLICIES = [named("gold", priority=10, vmSelector={"matchLabels": {"tier": "gold"}}),
            named("bronze")]
LABEL = "virtshift.io/policy"

LABEL_CASES = [
    pytest.param("gold", vmi("ns/a", {"tier": "gold"}), "gold", id="unlabelled, governed"),
    pytest.param("bronze", vmi("ns/a", {"tier": "gold"}), None,
                 id="what another policy governs is left to that one"),
    pytest.param("gold", vmi("ns/a", {"tier": "gold", LABEL: "gold"}), None,
                 id="already right: no write"),
    pytest.param("gold", vmi("ns/a", {LABEL: "gold"}), "bronze",
                 id="no longer governed: relabelled to the winner"),
    pytest.param("gold", vmi("ns/a", {"tier": "gold", LABEL: "bronze"}), "gold",
                 id="taken over by the higher priority"),
    pytest.param("gold", vmi("ns/a", {LABEL: "deleted-policy"}), "bronze",
                 id="label of a policy that is gone"),
    pytest.param("gold", vmi("ns/a", {LABEL: "bronze"}), None,
                 id="another policy's VMI: not ours to touch"),
    pytest.param("gold", vmi("ns/a", {"tier": "gold", LABEL: "bronze"}, pinned=True,
                             pinned_label="bronze"), None,
                 id="in flight under bronze (policyRef): left alone"),
    pytest.param("gold", vmi("ns/a", {LABEL: "gold"}, pinned=True, pinned_label="gold"), None,
                 id="in flight under gold: keeps gold"),
    pytest.param("gold", vmi("ns/a", {"tier": "gold", LABEL: "gone"}, pinned=True,
                             pinned_label="gone"), "gold",
                 id="in flight under a deleted policy: not pinned"),
]


@pytest.mark.parametrize(("policy", "view", "written"), LABEL_CASES)
def test_label_changes(policy: str, view: p.VMIPolicyView, written: str | None) -> None:
    changes = p.label_changes(policy, POLICIES, [view])
    assert changes == ({view.key: written} if written else {})


def test_label_clean_up_after_deletion() -> None:
    vmis = [vmi("ns/a", {"tier": "gold", LABEL: "gold"}), vmi("ns/b", {LABEL: "bronze"})]
    others = [q for q in POLICIES if q.name != "gold"]
    assert p.label_changes("gold", others, vmis) == {"ns/a": "bronze"}
    assert p.label_changes("gold", [], vmis) == {"ns/a": None, "ns/b": None}


def test_governed_counts_namespace_selection() -> None:
    policies = [named("prod", namespaceSelector={"matchLabels": {"env": "prod"}}),
                named("rest", priority=-1)]
    vmis = [vmi("p/a", ns={"env": "prod"}), vmi("p/b", ns={"env": "prod"}), vmi("d/c")]
    assert p.governed("prod", policies, vmis) == ["p/a", "p/b"]
    assert p.governed("rest", policies, vmis) == ["d/c"]


# -- status ---------------------------------------------------------------------------------------


def mig(name: str, phase: str, downtime: int | None = None, attempt: int = 1,
        drain: str | None = "d", terminating: bool = False) -> MigrationInfo:
    observed = DowntimeObservation(downtime, "annotation:test") if downtime is not None else None
    return MigrationInfo(namespace="ns", name=name, vmi=name, phase=phase, drain=drain,
                         policy="gold", attempt=attempt, downtime=observed,
                         terminating=terminating)


@pytest.mark.parametrize(("values", "p50", "p99", "top"), [
    pytest.param([], None, None, None, id="no samples"),
    pytest.param([7], 7, 7, 7, id="one sample"),
    pytest.param([10, 20], 10, 20, 20, id="two: median is the lower"),
    pytest.param([5, 1, 3, 2, 4], 3, 5, 5, id="odd count, unsorted"),
    pytest.param(list(range(1, 101)), 50, 99, 100, id="1..100"),
    pytest.param(list(range(1, 201)), 100, 198, 200, id="1..200"),
])
def test_downtime_percentiles_nearest_rank(values, p50, p99, top) -> None:
    migrations = [mig(f"m{i}", "Succeeded", v) for i, v in enumerate(values)]
    _counters, summary = p.outcomes(spec(), migrations)
    assert (summary.samples, summary.p50_ms, summary.p99_ms, summary.max_ms) == (
        len(values), p50, p99, top)


COUNTER_CASES = [
    pytest.param({}, [], (0, 0, 0, 0), id="nothing yet"),
    pytest.param({"maxDowntime": "300ms"},
                 [mig("a", "Succeeded", 100), mig("b", "Succeeded", 300),
                  mig("c", "Succeeded", 301), mig("d", "Succeeded")],
                 (4, 0, 1, 3), id="breach is strictly above maxDowntime"),
    pytest.param({}, [mig("a", "Succeeded", 5000)], (1, 0, 0, 1),
                 id="no maxDowntime: no breaches"),
    pytest.param({"maxAttempts": 3},
                 [mig("a", "Failed", attempt=1), mig("a2", "Failed", attempt=3),
                  mig("b", "Failed", attempt=0, drain=None)],
                 (0, 2, 0, 0), id="failed counts the final attempt and unretried ones"),
    pytest.param({}, [mig("a", "Running"), mig("b", "Pending"), mig("c", "Failed", attempt=3)],
                 (0, 1, 0, 0), id="unfinished count nowhere"),
]


@pytest.mark.parametrize(("fields", "migrations", "expected"), COUNTER_CASES)
def test_outcome_counters(fields, migrations, expected) -> None:
    counters, summary = p.outcomes(spec(**fields), migrations)
    assert (counters.succeeded, counters.failed, counters.downtime_breaches,
            summary.samples) == expected


def test_downtime_summary_says_where_its_observations_come_from() -> None:
    _counters, summary = p.outcomes(spec(), [mig("a", "Succeeded", 120),
                                             mig("b", "Succeeded")])
    assert (summary.samples, summary.max_ms, summary.source) == (1, 120, "annotation:test")
    _counters, none = p.outcomes(spec(maxDowntime="1ms"), [mig("a", "Succeeded")])
    assert (none.samples, none.source, _counters.downtime_breaches) == (0, None, 0)


def snapshot(**kw: Any) -> p.PolicySnapshot:
    defaults: dict[str, Any] = {
        "name": "gold", "generation": 3, "spec": spec(), "status": MigrationPolicyStatus(),
        "now": NOW, "rendered": ["virtshift-gold"]}
    return p.PolicySnapshot(**{**defaults, **kw})


def test_status_ready_and_counts() -> None:
    decision = p.derive_status(snapshot(
        matched=4, migrations=[mig("a", "Running"), mig("b", "Pending"),
                               mig("c", "Running", terminating=True), mig("d", "Succeeded", 90)]))
    s = decision.status.wire()
    assert s["observedGeneration"] == 3 and s["matchedVMs"] == 4
    assert s["kubevirtPolicy"] == "virtshift-gold" and s["inFlight"] == 2
    assert s["outcomes"]["succeeded"] == 1
    assert s["downtime"] == {"samples": 1, "p50Ms": 90, "p99Ms": 90, "maxMs": 90,
                             "source": "annotation:test"}
    assert s["windowOpen"] is True and "nextWindow" not in s
    [ready] = s["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Rendered")
    assert ready["observedGeneration"] == 3 and ready["lastTransitionTime"] == \
        "2026-03-02T12:00:00Z"
    assert decision.events == [("Normal", "Rendered", ready["message"])]


def test_status_conflict_then_resolved() -> None:
    conflict = p.Conflict("virtshift-gold")
    first = p.derive_status(snapshot(conflicts=[conflict], rendered=[]))
    s = first.status.wire()
    [ready] = s["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "KubeVirtPolicyConflict")
    assert "virtshift-gold" in ready["message"] and "kubevirtPolicy" not in s
    assert [e[:2] for e in first.events] == [("Warning", "KubeVirtPolicyConflict")]
    later = NOW + dt.timedelta(minutes=5)
    again = p.derive_status(snapshot(conflicts=[conflict], rendered=[], status=first.status,
                                     now=later))
    assert again.events == [] and again.status == first.status  # nothing to write
    fixed = p.derive_status(snapshot(status=first.status, now=later))
    [ready] = fixed.status.wire()["conditions"]
    assert (ready["status"], ready["lastTransitionTime"]) == ("True", "2026-03-02T12:05:00Z")
    assert [e[:2] for e in fixed.events] == [("Normal", "Rendered")]


def test_status_invalid_window() -> None:
    windows = [{"schedule": "0 2 * * *", "duration": "2h", "timeZone": "Mars/Olympus"}]
    s = p.derive_status(snapshot(spec=spec(windows=windows))).status.wire()
    [ready] = s["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidWindow")
    assert "windows[0].timeZone" in ready["message"]
    assert "windowOpen" not in s and "nextWindow" not in s


@pytest.mark.parametrize(("now", "is_open", "next_open"), [
    (dt.datetime(2026, 3, 2, 1, 0, tzinfo=dt.UTC), False, "2026-03-02T02:00:00Z"),
    (dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC), True, "2026-03-03T02:00:00Z"),
])
def test_status_window(now, is_open, next_open) -> None:
    windows = [{"schedule": "0 2 * * *", "duration": "2h"}]
    s = p.derive_status(snapshot(spec=spec(windows=windows), now=now)).status
    assert (s.window_open, s.next_window) == (is_open, next_open)


def test_invalid_spec_keeps_the_rest_of_the_status() -> None:
    before = MigrationPolicyStatus(matched_v_ms=2, conditions=[Condition(
        type="Ready", status="True", reason="Rendered", last_transition_time="t0")])
    decision = p.invalid_spec(before, 4, "spec.windows: bad", NOW)
    assert decision.status.matched_v_ms == 2 and decision.status.observed_generation == 4
    assert decision.status.conditions[0].reason == "InvalidSpec"
    assert decision.events == [("Warning", "InvalidSpec", "spec.windows: bad")]
    assert p.invalid_spec(decision.status, 4, "spec.windows: bad", NOW).events == []


@pytest.mark.parametrize(("old", "new", "patch"), [
    ({}, {}, None),
    ({"a": 1}, {"a": 1}, None),
    ({"a": 1}, {"a": 2}, {"a": 2}),
    ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    ({"d": {"x": 1, "y": 2}}, {"d": {"x": 1}}, {"d": {"y": None}}),
    ({"c": [1, 2]}, {"c": [1]}, {"c": [1]}),
    ({}, {"d": {"x": 1}}, {"d": {"x": 1}}),
])
def test_merge_patch(old, new, patch) -> None:
    assert p.merge_patch(old, new) == patch


# -- what the spec means for a VM's rules (rules_from) --------------------------------------------

KV = KubeVirtMigrationConfig


def test_convergence_flags_have_no_default_so_kubevirt_s_apply() -> None:
    """Issue 9: a CRD default of false made every policy override KubeVirt's cluster-wide
    allowAutoConverge/allowPostCopy. Unset must stay unset, on the wire and in the schema."""
    assert spec().allow_auto_converge is None and spec().allow_post_copy is None
    props = crd(next(k for k in KINDS if k.name == "MigrationPolicy"))["spec"]["versions"][0][
        "schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("allowAutoConverge", "allowPostCopy"):
        assert "default" not in props[field], field
        assert "KubeVirt CR" in props[field]["description"], field
    rendered = p.render("gold", "u", spec())[0]["spec"]
    assert "allowAutoConverge" not in rendered and "allowPostCopy" not in rendered


INHERIT_CASES = [
    # (policy fields, KubeVirt CR's migrations, (autoConverge, postCopy, workloadDisruption,
    #  completionTimeoutPerGiB))
    pytest.param({}, KV(), (False, False, False, 150), id="nothing set anywhere"),
    pytest.param({}, KV(allow_post_copy=True), (False, True, True, 150),
                 id="unset: KubeVirt's post-copy, disruption follows it"),
    pytest.param({}, KV(allow_post_copy=True, allow_workload_disruption=False),
                 (False, True, False, 150), id="unset: KubeVirt's explicit disruption"),
    pytest.param({}, KV(allow_workload_disruption=True), (False, False, True, 150),
                 id="unset: disruption without post-copy (KubeVirt pauses the guest)"),
    pytest.param({}, KV(allow_auto_converge=True, completion_timeout_per_gib=40),
                 (True, False, False, 40), id="unset: KubeVirt's auto-converge and timeout"),
    pytest.param({"allowPostCopy": False},
                 KV(allow_post_copy=True, allow_workload_disruption=True),
                 (False, False, False, 150), id="false overrides, disruption follows the policy"),
    pytest.param({"allowPostCopy": True}, KV(allow_workload_disruption=False),
                 (False, True, True, 150), id="true overrides, disruption follows the policy"),
    pytest.param({"allowAutoConverge": False, "completionTimeoutPerGiB": 80},
                 KV(allow_auto_converge=True, completion_timeout_per_gib=40),
                 (False, False, False, 80), id="set values win"),
]


@pytest.mark.parametrize(("fields", "kubevirt", "expected"), INHERIT_CASES)
def test_rules_inherit_what_the_policy_leaves_to_kubevirt(fields, kubevirt, expected) -> None:
    """What KubeVirt resolves at handoff (virt-config.go GetMigrationConfiguration, then the
    rendered policy applied field by field; allowWorkloadDisruption follows the policy's
    allowPostCopy when set) is what the predictions must assume."""
    r = rules_from(named("gold", **fields), kubevirt=kubevirt)
    assert (r.allow_auto_converge, r.allow_post_copy, r.allow_workload_disruption,
            r.completion_timeout_per_gib) == expected
    assert rules_from(None, kubevirt=kubevirt).allow_post_copy == kubevirt.allow_post_copy


@pytest.mark.parametrize(("fields", "attempts", "waits"), [
    pytest.param({}, 3, [0, 30, 60, 120, 240, 480, 600, 600],
                 id="defaults: 3, 30s doubling to 10m"),
    pytest.param({"maxAttempts": 5, "backoff": {"initial": "10s", "max": "1m"}}, 5,
                 [0, 10, 20, 40, 60, 60, 60, 60], id="maxAttempts and backoff"),
    pytest.param({"maxAttempts": 1, "backoff": {"initial": "1m30s", "max": "2h"}}, 1,
                 [0, 90, 180, 360, 720, 1440, 2880, 5760], id="durations parsed"),
])
def test_rules_take_max_attempts_and_backoff_from_the_spec(fields, attempts, waits) -> None:
    r = rules_from(named("gold", **fields))
    assert r.policy == "gold" and r.max_attempts == attempts
    assert [r.backoff(n) for n in range(8)] == waits


def test_rules_take_the_limits_by_their_crd_names() -> None:
    r = rules_from(named("gold", maxParallelMigrations=4, maxParallelOutboundPerNode=2,
                         maxParallelInboundPerNode=1, progressTimeout="45s"))
    assert (r.max_parallel, r.max_outbound_per_node, r.max_inbound_per_node) == (4, 2, 1)
    assert r.progress_timeout == 45.0
    assert rules_from(named("gold")).progress_timeout is None
    assert rules_from(named("gold"), non_migratable_override="Skip").non_migratable == "Skip"


def test_kubevirt_migration_config_reads_the_kubevirt_cr() -> None:
    assert views.kubevirt_migration_config(None) == KV()
    kv = {"spec": {"configuration": {"migrations": {
        "allowAutoConverge": True, "allowPostCopy": True, "allowWorkloadDisruption": False,
        "completionTimeoutPerGiB": 60, "progressTimeout": 30}}}}
    got = views.kubevirt_migration_config(kv)
    assert got == KV(allow_auto_converge=True, allow_post_copy=True,
                     allow_workload_disruption=False, completion_timeout_per_gib=60,
                     progress_timeout=30)
    assert got.workload_disruption is False and KV(allow_post_copy=True).workload_disruption


# -- outcomes from a drain's VM entries and virtshift's aborts -------------------------------------

OUTCOME_CASES = [
    pytest.param([], [], (0, 0, 0), id="nothing"),
    pytest.param([], [p.DrainVM("d", "ns", "gpu", "Skipped", reason="HostDeviceNotLiveMigratable"),
                      p.DrainVM("d", "ns", "gone", "Skipped", reason="VMIGone")],
                 (1, 0, 0), id="skipped by nonMigratable Skip, not a VMI that vanished"),
    pytest.param([], [p.DrainVM("d", "ns", "gpu", "Succeeded", mode="QuickMigration",
                                reason="QuickMigrated"),
                      p.DrainVM("d", "ns", "hot", "Succeeded", mode="QuickMigration",
                                reason="DowntimeExceeded"),
                      p.DrainVM("d", "ns", "stopping", "Migrating", mode="QuickMigration"),
                      p.DrainVM("d", "ns", "live", "Succeeded", mode="LiveMigration")],
                 (0, 2, 0), id="quick migrated: finished restarts only"),
    pytest.param([], [p.DrainVM("d", "ns", "hot", "Waiting", reason="NotConverging"),
                      p.DrainVM("d", "ns", "warm", "Waiting", reason="DowntimeExceeded"),
                      p.DrainVM("d", "ns", "late", "Waiting", reason="OutsideWindow"),
                      p.DrainVM("d", "ns", "done", "Succeeded", reason="DowntimeExceeded"),
                      p.DrainVM("d", "ns", "blind", "Waiting", reason="DirtyRateUnknown")],
                 (0, 0, 3), id="held back by the ladder's Abort"),
    pytest.param([MigrationInfo(namespace="ns", name="m1", vmi="a", phase="Failed",
                                aborted="ProgressTimeout", attempt=1, drain="d"),
                  MigrationInfo(namespace="ns", name="m2", vmi="a", phase="Running",
                                attempt=2, drain="d"),
                  MigrationInfo(namespace="ns", name="m3", vmi="b", phase="Failed",
                                failure="Live migration has been aborted")],
                 [], (0, 0, 1), id="aborted by virtshift for progressTimeout"),
]


@pytest.mark.parametrize(("migrations", "drain_vms", "expected"), OUTCOME_CASES)
def test_outcomes_skipped_quick_migrated_aborted(migrations, drain_vms, expected) -> None:
    counters, _ = p.outcomes(spec(), migrations, drain_vms)
    assert (counters.skipped, counters.quick_migrated, counters.aborted) == expected


def test_status_reports_outcomes_of_drains() -> None:
    s = p.derive_status(snapshot(drain_vms=[
        p.DrainVM("d", "ns", "gpu", "Skipped", reason="HostDeviceNotLiveMigratable")]))
    assert s.status.wire()["outcomes"]["skipped"] == 1


# -- PredictionsAvailable: maxDowntime and the ladder need dirty rates (issue 20 item 8) --------

PREDICTION_CASES = [
    pytest.param({"maxDowntime": "300ms"}, False, ["ns/a", "ns/b"],
                 ("False", "NoMetricsSource"), ["--metrics-source", "2 VMs", "the VM waits"],
                 id="maxDowntime, no metrics source"),
    pytest.param({"onDowntimeExceeded": ["QuickMigration"]}, True, ["ns/b"],
                 ("False", "DirtyRateUnknown"), ["ns/b"], id="ladder, a VM not reported"),
    pytest.param({"maxDowntime": "300ms"}, True, [], ("True", "DirtyRatesKnown"), [],
                 id="every rate known"),
    pytest.param({}, False, ["ns/a"], None, [], id="neither: the rate decides nothing"),
    pytest.param({"onDowntimeExceeded": ["Abort"]}, False, ["ns/a"], None, [],
                 id="the default ladder alone"),
]


@pytest.mark.parametrize(("fields", "source", "unknown", "expected", "words"),
                         PREDICTION_CASES)
def test_status_says_whether_max_downtime_can_be_predicted(fields, source, unknown, expected,
                                                           words) -> None:
    """Without dirty rates maxDowntime and onDowntimeExceeded cannot be predicted: the policy
    says so (today: nothing, and every VM is taken to converge)."""
    decision = p.derive_status(snapshot(spec=spec(**fields), matched=2, metrics_source=source,
                                        unknown_rates=unknown))
    cond = next((c for c in decision.status.conditions if c.type == "PredictionsAvailable"),
                None)
    if expected is None:
        assert cond is None
        return
    assert (cond.status, cond.reason) == expected
    assert all(w in cond.message for w in words), cond.message
    warned = [e for e in decision.events if e[1] == expected[1]]
    assert warned == ([("Warning", expected[1], cond.message)] if expected[0] == "False"
                      else [])


def test_predictions_condition_clears_with_an_event_and_goes_with_max_downtime() -> None:
    blind = p.derive_status(snapshot(spec=spec(maxDowntime="300ms"), matched=1,
                                     unknown_rates=["ns/a"]))
    same = p.derive_status(snapshot(spec=spec(maxDowntime="300ms"), matched=1,
                                    unknown_rates=["ns/a"], status=blind.status))
    assert same.events == []
    seen = p.derive_status(snapshot(spec=spec(maxDowntime="300ms"), matched=1,
                                    metrics_source=True, status=blind.status))
    assert ("Normal", "DirtyRatesKnown") in [e[:2] for e in seen.events]
    dropped = p.derive_status(snapshot(spec=spec(), status=blind.status, unknown_rates=["ns/a"]))
    assert "PredictionsAvailable" not in {c.type for c in dropped.status.conditions}


# -- a KubeVirt policy virtshift did not render wins KubeVirt's matching (issue 20 item 9) -----

DB_VMIS = [p.VMIPolicyView("prod/db-1", {"app": "db", "tier": "gold"}, {"team": "x"}),
           p.VMIPolicyView("prod/db-2", {"app": "db"}, {"team": "x"}),
           p.VMIPolicyView("prod/web-1", {"app": "web", "tier": "gold"}, {"team": "x"})]


def admin(name: str, vmi: dict | None = None, ns: dict | None = None) -> dict:
    selectors: dict[str, Any] = {}
    if vmi is not None:
        selectors["virtualMachineInstanceSelector"] = vmi
    if ns is not None:
        selectors["namespaceSelector"] = ns
    return {"metadata": {"name": name}, "spec": {"allowPostCopy": True, "selectors": selectors}}


OVERRIDE_CASES = [
    pytest.param(admin("admin-db", {"app": "db", "tier": "gold"}), ["Abort"],
                 {"admin-db": ("prod/db-1",)}, id="more VMI labels win"),
    pytest.param(admin("aaa-db", {"app": "db"}), ["Abort"],
                 {"aaa-db": ("prod/db-1", "prod/db-2")}, id="as many labels, name sorts first"),
    pytest.param(admin("zzz-db", {"app": "db"}), ["Abort"], {}, id="as many, name sorts after"),
    pytest.param(admin("admin-ns", ns={"team": "x"}), ["Abort"], {},
                 id="as many, but namespace labels: ours has more VMI labels"),
    pytest.param(admin("admin-both", {"app": "db"}, {"team": "x"}), ["Abort"],
                 {"admin-both": ("prod/db-1", "prod/db-2")}, id="VMI plus namespace labels"),
    pytest.param(admin("admin-pc", {"app": "db", p.MODE_LABEL: "PostCopy"}),
                 ["PostCopy", "Abort"], {"admin-pc": ("prod/db-1", "prod/db-2")},
                 id="wins over our -postcopy variant when the ladder migrates in that mode"),
    pytest.param(admin("admin-pc", {"app": "db", p.MODE_LABEL: "PostCopy"}), ["Abort"], {},
                 id="a mode we never label for"),
    pytest.param(admin("admin-web", {"app": "web", "tier": "gold"}), ["Abort"], {},
                 id="only VMIs this policy governs"),
    pytest.param({"metadata": {"name": "aaa"}, "spec": {}}, ["Abort"], {},
                 id="no selectors: KubeVirt never matches it"),
]


@pytest.mark.parametrize(("foreign", "ladder", "expected"), OVERRIDE_CASES)
def test_overridden_by_a_kubevirt_policy_virtshift_did_not_render(foreign, ladder,
                                                                 expected) -> None:
    """KubeVirt's precedence (migrationpolicy.go matchPolicy) over what exists: ours (rendered
    from "db" and "web"), plus an administrator's own."""
    policies = [named("db", vmSelector={"matchLabels": {"app": "db"}},
                      onDowntimeExceeded=ladder),
                named("web", vmSelector={"matchLabels": {"app": "web"}})]
    rendered = [o for n in policies for o in p.render(n.name, "uid", n.spec)]
    kubevirt = [p.kubevirt_policy_view(o) for o in [*rendered, foreign]]
    owned = [o["metadata"]["name"] for o in p.render("db", "uid", policies[0].spec)]
    got = p.overridden("db", policies[0].spec, policies, DB_VMIS, kubevirt, owned)
    assert {o.kubevirt_policy: o.vmis for o in got} == expected


def test_override_condition_names_the_policy_and_clears_with_an_event() -> None:
    db = spec(vmSelector={"matchLabels": {"app": "db"}})
    kubevirt = [p.kubevirt_policy_view(o) for o in
                [*p.render("db", "uid", db), admin("aaa-db", {"app": "db"})]]
    overrides = p.overridden("db", db, [NamedPolicy("db", db)], DB_VMIS, kubevirt,
                             ["virtshift-db"])
    first = p.derive_status(snapshot(name="db", spec=db, matched=2, overrides=overrides,
                                     rendered=["virtshift-db"]))
    cond = next(c for c in first.status.conditions if c.type == "KubeVirtPolicyOverridden")
    assert (cond.status, cond.reason) == ("True", "ForeignPolicyWins")
    assert "KubeVirt MigrationPolicy aaa-db wins KubeVirt's matching for 2 VMIs " \
        "(prod/db-1, prod/db-2)" in cond.message
    assert "ours 1 and its name sorts first" in cond.message
    assert [e[:2] for e in first.events if e[1] != "Rendered"] == [
        ("Warning", "KubeVirtPolicyOverridden")]
    ready = next(c for c in first.status.conditions if c.type == "Ready")
    assert ready.status == "True"  # rendered fine: KubeVirt just prefers another
    again = p.derive_status(snapshot(name="db", spec=db, matched=2, overrides=overrides,
                                     rendered=["virtshift-db"], status=first.status))
    assert again.events == []
    cleared = p.derive_status(snapshot(name="db", spec=db, matched=2, rendered=["virtshift-db"],
                                       status=first.status))
    assert "KubeVirtPolicyOverridden" not in {c.type for c in cleared.status.conditions}
    assert [e[:2] for e in cleared.events] == [("Normal", "KubeVirtPolicyOverrideCleared")]


def test_completion_timeout_0_is_never_for_the_prediction_too() -> None:
    """Issue 20 item 11: a policy may say completionTimeoutPerGiB 0, KubeVirt's "never": the
    rules carry 0 (not the KubeVirt CR's value), and a VM that cannot converge is predicted to
    run on in pre-copy, never switched to post-copy by a timeout."""
    from virtshift.domain.eta import Estimator
    from virtshift.domain.views import VMIInfo

    r = rules_from(named("gold", completionTimeoutPerGiB=0, allowPostCopy=True))
    assert r.completion_timeout_per_gib == 0
    hot = VMIInfo(namespace="ns", name="hot", node="n1", memory=4 * 1024**3,
                  dirty_rate=20 * 1024**3)
    p_ = Estimator().transfer(hot, r, None, 1)
    assert (p_.converges, str(p_.mode)) == (False, "PreCopy")
