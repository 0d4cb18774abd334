"""MigrationPolicy end to end: the operator as a process, the simulator, a real API server with
KubeVirt's real CRDs (every KubeVirt MigrationPolicy the operator renders passes KubeVirt's own
schema). The tests share one small scenario and run in file order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, get_drain, phase_of, wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

SCENARIO = """
seed: 5
timeScale: 40
# MigrationStallDetection: KubeVirt v1.9 takes maxDowntimeMs only with it (until the test that
# turns it off).
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 2,
           featureGates: [MigrationStallDetection]}
network: {nodeBandwidth: 1Gi, targetPodStartup: 2s}
nodes:
  - generate: {count: 3, prefix: node-, start: 1, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - {name: db-1, namespace: prod, node: node-1, memory: 1Gi, dirtyRate: 1Mi,
     labels: {app: db}}
  - {name: db-2, namespace: prod, node: node-2, memory: 1Gi, dirtyRate: 1Mi,
     labels: {app: db}}
  - {name: web-1, namespace: prod, node: node-1, memory: 1Gi, labels: {app: web}}
  - {name: batch-1, namespace: batch, node: node-2, memory: 1Gi}
"""
POLICY = "virtshift.io/policy"
MODE = "virtshift.io/migration-mode"
MANAGED = "app.kubernetes.io/managed-by"
TIMEOUT = 20


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, downtime_source=runner.DOWNTIME_SOURCE).start()
    try:
        yield {"kube": fresh_cluster.kube, "op": op}
    finally:
        op.stop()
        sim.stop()


@pytest.fixture
def kube(env) -> rest.KubeClient:
    return env["kube"]


def policy_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name}, "spec": spec}


def status_of(kube: rest.KubeClient, name: str) -> dict[str, Any]:
    return (kube.get(rest.POLICIES, name) or {}).get("status") or {}


def ready(kube: rest.KubeClient, name: str, generation: int = 1) -> dict[str, Any] | None:
    s = status_of(kube, name)
    cond = next((c for c in s.get("conditions") or [] if c["type"] == "Ready"), None)
    if s.get("observedGeneration") == generation and cond:
        return s
    return None


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def events_of(kube: rest.KubeClient, name: str, reason: str) -> list[dict[str, Any]]:
    """Events about the cluster-scoped object ``name`` (recorded in namespace default)."""
    return [e for e in kube.items(rest.EVENTS, "default",
                                  field_selector=f"involvedObject.name={name}")
            if e["reason"] == reason]


def labels(kube: rest.KubeClient) -> dict[str, str | None]:
    return {f"{v['metadata']['namespace']}/{v['metadata']['name']}":
            (v["metadata"].get("labels") or {}).get(POLICY) for v in kube.items(rest.VMIS)}


def kubevirt_policies(kube: rest.KubeClient) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in kube.items(rest.KUBEVIRT_POLICIES)}


def migrate(kube: rest.KubeClient, name: str, vmi: str, policy: str) -> dict[str, Any]:
    kube.create(rest.VMIMS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name, "namespace": "prod", "labels": {POLICY: policy}},
        "spec": {"vmiName": vmi}})
    return wait_for(lambda: (o := kube.get(rest.VMIMS, name, "prod"))
                    and o.get("status", {}).get("phase") in ("Succeeded", "Failed") and o,
                    timeout=TIMEOUT, what=f"migration {name}")


def test_renders_kubevirt_policies_that_kubevirts_schema_accepts(kube) -> None:
    kube.create(rest.POLICIES, policy_body(
        "db", vmSelector={"matchLabels": {"app": "db"}}, bandwidthPerMigration="64Mi",
        maxDowntime="300ms", completionTimeoutPerGiB=100, allowPostCopy=False,
        onDowntimeExceeded=["AutoConverge", "PostCopy", "Abort"]))
    status = wait_for(lambda: ready(kube, "db"), timeout=TIMEOUT, what="db reported")
    cond = condition(status, "Ready")
    assert (cond["status"], cond["reason"]) == ("True", "Rendered"), cond
    # This module's operator has no metrics source (the chart's default): maxDowntime cannot
    # be predicted, and the policy says so, with an Event.
    predictions = condition(status, "PredictionsAvailable")
    assert (predictions["status"], predictions["reason"]) == ("False", "NoMetricsSource")
    assert "--metrics-source" in predictions["message"]
    assert "2 VMs this policy governs" in predictions["message"], predictions
    wait_for(lambda: events_of(kube, "db", "NoMetricsSource"), timeout=TIMEOUT,
             what="NoMetricsSource event on the policy")
    assert status["kubevirtPolicy"] == "virtshift-db" and status["matchedVMs"] == 2
    assert status["inFlight"] == 0 and status["windowOpen"] is True

    owner = kube.get(rest.POLICIES, "db")["metadata"]["uid"]
    found = kubevirt_policies(kube)
    assert set(found) == {"virtshift-db", "virtshift-db-autoconverge", "virtshift-db-postcopy"}
    # allowPostCopy is set (to false), allowAutoConverge is not: KubeVirt's own applies.
    common = {"bandwidthPerMigration": "64Mi", "maxDowntimeMs": 300,
              "completionTimeoutPerGiB": 100, "allowPostCopy": False}
    expected = {
        "virtshift-db": ({**common}, {POLICY: "db"}),
        "virtshift-db-autoconverge": ({**common, "allowAutoConverge": True},
                                      {POLICY: "db", MODE: "AutoConverge"}),
        # The policy's own completionTimeoutPerGiB: KubeVirt switches to post-copy there.
        "virtshift-db-postcopy": ({**common, "allowPostCopy": True},
                                  {POLICY: "db", MODE: "PostCopy"}),
    }
    for name, (fields, selector) in expected.items():
        obj = found[name]  # as stored: KubeVirt's structural schema pruned nothing
        assert obj["spec"] == {**fields, "selectors": {"virtualMachineInstanceSelector":
                                                       selector}}
        assert obj["metadata"]["labels"] == {MANAGED: "virtshift", POLICY: "db"}
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "MigrationPolicy", "db", owner, True)

    assert labels(kube) == {"prod/db-1": "db", "prod/db-2": "db", "prod/web-1": None,
                            "batch/batch-1": None}
    stored = kube.get(rest.POLICIES, "db")["spec"]
    assert "allowAutoConverge" not in stored and stored["allowPostCopy"] is False

    def versions() -> dict[str, str]:
        objs = [kube.get(rest.POLICIES, "db"), *kubevirt_policies(kube).values(),
                *kube.items(rest.VMIS)]
        return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in objs}

    before = versions()
    time.sleep(2.5)  # more than one resync: a settled policy writes nothing
    assert versions() == before


def test_kubevirt_picks_the_rendered_policy_and_status_counts_it(kube) -> None:
    done = migrate(kube, "move-db-1", "db-1", "db")
    assert done["status"]["phase"] == "Succeeded"
    state = kube.get(rest.VMIS, "db-1", "prod")["status"]["migrationState"]
    assert state.get("migrationPolicyName") == "virtshift-db", state
    # A VMI labelled for post-copy (as a drain does first) gets the more specific variant.
    kube.patch(rest.VMIS, "db-2", {"metadata": {"labels": {MODE: "PostCopy"}}}, "prod")
    migrate(kube, "move-db-2", "db-2", "db")
    state = kube.get(rest.VMIS, "db-2", "prod")["status"]["migrationState"]
    assert state["migrationPolicyName"] == "virtshift-db-postcopy"

    status = wait_for(lambda: (s := status_of(kube, "db"))
                      and s.get("outcomes", {}).get("succeeded") == 2 and s,
                      timeout=TIMEOUT, what="outcomes counted")
    assert status["inFlight"] == 0 and status["downtime"]["samples"] == 2
    assert 0 < status["downtime"]["p50Ms"] <= status["downtime"]["maxMs"]
    assert status["downtime"]["source"] == "annotation:sim.virtshift.io/downtime-ms"
    assert status["outcomes"]["downtimeBreaches"] == sum(
        int(kube.get(rest.VMIMS, m, "prod")["metadata"]["annotations"][
            "sim.virtshift.io/downtime-ms"]) > 300 for m in ("move-db-1", "move-db-2"))


def _overridden(kube: rest.KubeClient, name: str) -> dict[str, Any] | None:
    return next((c for c in status_of(kube, name).get("conditions") or []
                 if c["type"] == "KubeVirtPolicyOverridden"), None)


def test_an_admins_kubevirt_policy_that_wins_over_ours_is_reported(kube) -> None:
    """An administrator's own KubeVirt MigrationPolicy selecting more labels of db's VMIs
    (app=db and the namespace's team, two labels; ours selects one) is what KubeVirt applies
    to their migrations (migrationpolicy.go matchPolicy): db's limits silently do nothing
    there. db says so in a condition naming it and the VMIs, with an Event, and clears both
    once it is gone."""
    kube.patch(rest.NAMESPACES, "prod", {"metadata": {"labels": {"team": "dbas"}}})
    kube.create(rest.KUBEVIRT_POLICIES, {
        "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "admin-db"},
        "spec": {"bandwidthPerMigration": "32Mi", "selectors": {
            "virtualMachineInstanceSelector": {"app": "db"},
            "namespaceSelector": {"team": "dbas"}}}})
    cond = wait_for(lambda: _overridden(kube, "db"), timeout=TIMEOUT,
                    what=lambda: f"override reported: {status_of(kube, 'db')}")
    assert (cond["status"], cond["reason"]) == ("True", "ForeignPolicyWins")
    assert "KubeVirt MigrationPolicy admin-db wins KubeVirt's matching for 2 VMIs " \
        "(prod/db-1, prod/db-2): it matches 2 labels (1 of the VMI, 1 of its namespace), " \
        "ours 1" in cond["message"], cond
    assert condition(status_of(kube, "db"), "Ready")["status"] == "True"
    wait_for(lambda: events_of(kube, "db", "KubeVirtPolicyOverridden"), timeout=TIMEOUT,
             what="KubeVirtPolicyOverridden event")
    # What KubeVirt does: the administrator's policy configures db-1's migration.
    migrate(kube, "move-db-1-admin", "db-1", "none")
    state = kube.get(rest.VMIS, "db-1", "prod")["status"]["migrationState"]
    assert state["migrationPolicyName"] == "admin-db", state

    kube.delete(rest.KUBEVIRT_POLICIES, "admin-db")
    wait_for(lambda: _overridden(kube, "db") is None, timeout=TIMEOUT, what="override cleared")
    wait_for(lambda: events_of(kube, "db", "KubeVirtPolicyOverrideCleared"), timeout=TIMEOUT,
             what="KubeVirtPolicyOverrideCleared event")
    kube.patch(rest.NAMESPACES, "prod", {"metadata": {"labels": {"team": None}}})


def test_spec_changes_update_the_rendered_policies(kube) -> None:
    kube.patch(rest.POLICIES, "db", {"spec": {"bandwidthPerMigration": "128Mi",
                                              "onDowntimeExceeded": ["PostCopy", "Abort"]}})
    wait_for(lambda: ready(kube, "db", generation=2), timeout=TIMEOUT, what="generation 2")
    found = wait_for(lambda: (f := kubevirt_policies(kube))
                     and "virtshift-db-autoconverge" not in f and f,
                     timeout=TIMEOUT, what="auto-converge variant removed")
    assert set(found) == {"virtshift-db", "virtshift-db-postcopy"}
    assert all(p["spec"]["bandwidthPerMigration"] == "128Mi" for p in found.values())


def test_a_foreign_kubevirt_policy_of_our_name_is_reported_and_left_alone(kube) -> None:
    foreign = kube.create(rest.KUBEVIRT_POLICIES, {
        "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "virtshift-legacy"},
        "spec": {"allowPostCopy": True,
                 "selectors": {"virtualMachineInstanceSelector": {"app": "legacy"}}}})
    kube.create(rest.POLICIES, policy_body("legacy", vmSelector={"matchLabels": {
        "app": "legacy"}}, bandwidthPerMigration="1Gi"))
    status = wait_for(lambda: ready(kube, "legacy"), timeout=TIMEOUT, what="legacy reported")
    [cond] = status["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", "KubeVirtPolicyConflict")
    assert "virtshift-legacy" in cond["message"] and "kubevirtPolicy" not in status
    events = wait_for(lambda: [e for e in kube.items(
        rest.EVENTS, "default", field_selector="involvedObject.name=legacy")
        if e["reason"] == "KubeVirtPolicyConflict"], timeout=TIMEOUT, what="event")
    assert events[0]["type"] == "Warning" and "virtshift-legacy" in events[0]["message"]
    assert events[0]["involvedObject"]["kind"] == "MigrationPolicy"

    kube.delete(rest.POLICIES, "legacy")
    wait_for(lambda: kube.get(rest.POLICIES, "legacy") is None, timeout=TIMEOUT,
             what="legacy deleted")
    after = kube.get(rest.KUBEVIRT_POLICIES, "virtshift-legacy")
    assert after["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
    assert after["spec"] == foreign["spec"] and "labels" not in after["metadata"]


def test_the_higher_priority_policy_labels_the_vms(kube) -> None:
    kube.create(rest.POLICIES, policy_body(
        "db-critical", priority=10, vmSelector={"matchLabels": {"app": "db"}},
        maxDowntime="500ms"))  # QEMU switches over at 300 ms: KubeVirt sets no limit
    kube.patch(rest.NAMESPACES, "batch", {"metadata": {"labels": {"team": "batch"}}})
    kube.create(rest.POLICIES, policy_body("fallback", priority=-10, namespaceSelector={
        "matchLabels": {"team": "batch"}}))
    want = {"prod/db-1": "db-critical", "prod/db-2": "db-critical",
            "prod/web-1": None, "batch/batch-1": "fallback"}
    wait_for(lambda: labels(kube) == want, timeout=TIMEOUT, what="labels by precedence")
    wait_for(lambda: status_of(kube, "db").get("matchedVMs") == 0
             and status_of(kube, "db-critical").get("matchedVMs") == 2
             and status_of(kube, "fallback").get("matchedVMs") == 1,
             timeout=TIMEOUT, what="matched counts")
    assert kubevirt_policies(kube)["virtshift-db-critical"]["spec"]["maxDowntimeMs"] == 500


def _vm_entry(kube: rest.KubeClient, drain: str, vm: str) -> dict[str, Any] | None:
    status = (get_drain(kube, drain) or {}).get("status") or {}
    return next((e for e in status.get("vms") or [] if e["name"] == vm), None)


def test_a_drain_migrates_under_the_rendered_policy(kube) -> None:
    """Without a metrics source db-1's dirty rate is unknown: nothing can predict that it
    meets db-critical's maxDowntime, so the drain holds it (the ladder ends in Abort) and
    says why, on the VM and in a condition; once the policy's ladder allows it (Allow), it
    migrates under the rendered policy."""
    node = kube.get(rest.VMIS, "db-1", "prod")["status"]["nodeName"]
    policy = wait_for(lambda: (s := status_of(kube, "db-critical")) and any(
        c["type"] == "PredictionsAvailable" for c in s.get("conditions") or []) and s,
        timeout=TIMEOUT, what="db-critical says whether it can predict")
    assert condition(policy, "PredictionsAvailable")["reason"] == "NoMetricsSource"
    kube.create(rest.NODE_DRAINS, drain_body("drain-db", nodeName=node))
    held = wait_for(lambda: (e := _vm_entry(kube, "drain-db", "db-1"))
                    and e["phase"] == "Waiting" and e, timeout=TIMEOUT,
                    what=lambda: f"db-1 held: {get_drain(kube, 'drain-db').get('status')}")
    assert held["reason"] == "DirtyRateUnknown", held
    assert "dirty rate unknown (no metrics source)" in held["message"], held
    assert "predictedDowntimeMs" not in held, held
    status = get_drain(kube, "drain-db")["status"]
    predictions = condition(status, "PredictionsAvailable")
    assert (predictions["status"], predictions["reason"]) == ("False", "NoMetricsSource")
    assert "prod/db-1" in predictions["message"] and "lower bound" in predictions["message"]
    wait_for(lambda: events_of(kube, "drain-db", "NoMetricsSource"), timeout=TIMEOUT,
             what="NoMetricsSource event on the drain")
    assert not [m for m in kube.items(rest.VMIMS, "prod")
                if m["spec"]["vmiName"] == "db-1"
                and m["metadata"]["labels"].get("virtshift.io/drain") == "drain-db"]

    kube.patch(rest.POLICIES, "db-critical", {"spec": {"onDowntimeExceeded": ["Allow"]}})
    wait_for(lambda: phase_of(kube, "drain-db") == "Drained", timeout=TIMEOUT,
             what=lambda: f"drained: {get_drain(kube, 'drain-db').get('status')}")
    [vmim] = [m for m in kube.items(rest.VMIMS, "prod", label_selector=f"{POLICY}=db-critical")
              if m["spec"]["vmiName"] == "db-1"]
    vmi = kube.get(rest.VMIS, "db-1", "prod")
    assert vmi["status"]["nodeName"] != node and vmi["metadata"]["labels"][POLICY] == "db-critical"
    assert vmi["status"]["migrationState"]["migrationPolicyName"] == "virtshift-db-critical"
    assert vmim["status"]["phase"] == "Succeeded"
    wait_for(lambda: status_of(kube, "db-critical").get("outcomes", {}).get("succeeded") == 1,
             timeout=TIMEOUT, what="counted under db-critical")
    kube.delete(rest.NODE_DRAINS, "drain-db")  # ends maintenance (the finalizer may lag)
    wait_for(lambda: not kube.get(rest.NODES, node)["spec"].get("unschedulable"),
             timeout=TIMEOUT, what="uncordoned")


def test_without_stall_detection_max_downtime_is_not_rendered(kube) -> None:
    """KubeVirt v1.9 refuses maxDowntimeMs without MigrationStallDetection
    (migrationpolicy-admitter.go: (*MigrationPolicyAdmitter).Admit). When the gate goes, the
    operator renders its policies without the field (removing it is admitted)."""
    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {
        "developerConfiguration": {"featureGates": []}}}}, "kubevirt")
    wait_for(lambda: all("maxDowntimeMs" not in p["spec"]
                         for p in kubevirt_policies(kube).values()),
             timeout=TIMEOUT, what="maxDowntimeMs no longer rendered")
    assert kubevirt_policies(kube)["virtshift-db-critical"]["spec"]["selectors"] == {
        "virtualMachineInstanceSelector": {POLICY: "db-critical"}}
    with pytest.raises(rest.ApiError) as err:
        kube.create(rest.KUBEVIRT_POLICIES, {
            "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "by-hand"},
            "spec": {"maxDowntimeMs": 300, "selectors": {}}})
    assert err.value.status == 422
    assert err.value.message == (
        'admission webhook "migration-policy-validator.kubevirt.io" denied the request: '
        "maxDowntimeMs cannot be modified without enabling the MigrationStallDetection feature "
        "gate")


def test_deleting_policies_removes_what_they_rendered_and_their_labels(kube) -> None:
    kube.delete(rest.POLICIES, "db-critical")
    wait_for(lambda: labels(kube)["prod/db-1"] == "db" and labels(kube)["prod/db-2"] == "db",
             timeout=TIMEOUT, what="back to db")
    assert "virtshift-db-critical" not in kubevirt_policies(kube)
    for name in ("db", "fallback"):
        kube.delete(rest.POLICIES, name)
    wait_for(lambda: all(kube.get(rest.POLICIES, n) is None for n in ("db", "fallback")),
             timeout=TIMEOUT, what="policies deleted")
    assert set(labels(kube).values()) == {None}
    assert set(kubevirt_policies(kube)) == {"virtshift-legacy"}  # only the foreign one
