"""MigrationPolicy rules enforced during drains, end to end: limits under two concurrent
drains, maintenance windows in simulated time, and CPU-model compatibility."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, get_drain, phase_of, wait_for

from virtshift.api.kubevirt import FINAL_PHASES, IN_FLIGHT_PHASES
from virtshift.k8s import rest
from virtshift.k8s.views import parse_time
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

SCENARIO = """
seed: 11
timeScale: 20
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 3}
network: {nodeBandwidth: 10Gi, targetPodStartup: 10s}
storageClasses: [{name: ceph-rbd, accessMode: ReadWriteMany}]
nodes:
  - generate: {count: 7, prefix: node-, cpuModel: Skylake-Server,
               allocatable: {cpu: "256", memory: 1Ti}}
  - generate: {count: 2, prefix: rome-, cpuModel: EPYC-Rome,
               allocatable: {cpu: "256", memory: 1Ti}}
  # An island of its own CPU model (host-model guests move only between equal hosts): what
  # happens here cannot spill onto the nodes of the other tests.
  - generate: {count: 2, prefix: cl-, cpuModel: Cascadelake-Server,
               allocatable: {cpu: "64", memory: 256Gi}}
  - generate: {count: 3, prefix: il-, cpuModel: Icelake-Server,
               allocatable: {cpu: "64", memory: 256Gi}}
  # Quick migrations (issue 20 items 6 and 13): small nodes in three groups (label qm), so
  # that a restart placed without the drain's rules would land on a big node- one; a CPU
  # model of their own keeps the other tests' live migrations off them.
  - {name: qm-1, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: a}}
  - {name: qm-2, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: a}}
  - {name: qm-3, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: a}}
  - {name: qm-4, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: c}}
  - {name: qm-5, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: b}}
  - {name: qm-6, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: b}}
  - {name: qm-7, cpuModel: Cooperlake, allocatable: {cpu: "16", memory: 32Gi}, labels: {qm: c}}
vms:
  - generate: {count: 6, prefix: gold-a-, namespace: gold, nodes: [node-1], memory: 2Gi}
  - generate: {count: 8, prefix: bulk-a-, namespace: bulk, nodes: [node-1], memory: 2Gi}
  - generate: {count: 6, prefix: gold-b-, namespace: gold, nodes: [node-2], memory: 2Gi}
  - generate: {count: 8, prefix: bulk-b-, namespace: bulk, nodes: [node-2], memory: 2Gi}
  - generate: {count: 6, prefix: night-, namespace: night, nodes: [node-3], memory: 1Gi}
  - generate: {count: 4, prefix: host-, namespace: cpu, nodes: [rome-1], memory: 1Gi}
  - generate: {count: 2, prefix: named-, namespace: cpu, nodes: [rome-1], memory: 1Gi,
               cpuModel: EPYC-Rome}
  # Guests that dirty memory faster than any NIC here can send it, too big to stop-and-copy
  # within 300ms even at the full 10Gi/s: pre-copy never converges.
  - {name: hot, namespace: hot-abort, node: node-4, memory: 8Gi, dirtyRate: 20Gi}
  - {name: hot, namespace: hot-postcopy, node: node-4, memory: 8Gi, dirtyRate: 20Gi}
  - {name: hot, namespace: hot-quick, node: node-4, memory: 8Gi, dirtyRate: 20Gi}
  - {name: gpu, namespace: restart, node: node-5, memory: 4Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: gpu, namespace: skip, node: node-5, memory: 4Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  # Never converges at the 1Gi/s its policy allows: only KubeVirt's post-copy can move it.
  - {name: hot, namespace: hot-inherit, node: cl-1, memory: 1Gi, dirtyRate: 20Gi}
  - {name: slow, namespace: stall, node: il-1, memory: 1Gi}
  - {name: vm, namespace: qm-manual, node: qm-1, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: vm, namespace: qm-running, node: qm-1, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: vm, namespace: qm-again, node: qm-5, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: vm, namespace: qm-stuck, node: qm-4, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  # Matched by one policy, drained under another named by the drain's policyRef.
  - generate: {count: 4, prefix: ref-, namespace: refns, nodes: [node-7], memory: 1Gi}
"""
LADDERS = {"hot-abort": ["Abort"], "hot-postcopy": ["PostCopy", "Abort"],
           "hot-quick": ["QuickMigration"]}
KUBEVIRT = ("kubevirt", "kubevirt")  # the KubeVirt CR: name, namespace


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    kube = fresh_cluster.kube
    for ns in ("gold", "bulk", "night", "cpu", "restart", "skip", "hot-inherit", "stall",
               "refns", *LADDERS):
        kube.patch(rest.NAMESPACES, ns, {"metadata": {"labels": {"tier": ns}}})
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, sim.metrics.url,
                         downtime_source=runner.DOWNTIME_SOURCE).start()
    try:
        yield {"kube": kube, "sim": sim, "op": op, "scenario": scenario}
    finally:
        op.stop()
        sim.stop()


def outcomes_of(kube, name: str) -> dict[str, int]:
    return ((kube.get(rest.POLICIES, name) or {}).get("status") or {}).get("outcomes") or {}


def _unfinished(sample: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in sample if m.get("status", {}).get("phase") not in FINAL_PHASES]


def test_policy_ref_governs_the_drains_vms_and_kubevirt_applies_it(env) -> None:
    """The drain's policyRef overrides the policies' own matching, all the way to KubeVirt:
    the VMIs carry its label through their migrations (the policy that matches them must not
    revert it) and KubeVirt's handoff picks the MigrationPolicy rendered from it. First in
    this module, while node-7 holds only these VMs."""
    kube = env["kube"]
    kube.create(rest.POLICIES, policy(
        "rival", priority=50, namespaceSelector={"matchLabels": {"tier": "refns"}}))
    kube.create(rest.POLICIES, policy("ref", vmSelector={"matchLabels": {"selects": "nothing"}},
                                      bandwidthPerMigration="2Gi"))
    wait_for(lambda: kube.get(rest.KUBEVIRT_POLICIES, "virtshift-ref"), what="ref rendered")
    wait_for(lambda: all((v["metadata"].get("labels") or {}).get("virtshift.io/policy")
                         == "rival" for v in kube.items(rest.VMIS, "refns")),
             what="rival labels")
    reverted: list[str] = []
    labelled: set[str] = set()  # migrations whose VMI has carried the ref label
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            flying = {m["spec"]["vmiName"]: m["metadata"]["name"]
                      for m in _unfinished(kube.items(rest.VMIMS, "refns"))
                      if m["metadata"]["labels"].get("virtshift.io/drain") == "ref-node-7"}
            for v in kube.items(rest.VMIS, "refns"):
                label = (v["metadata"].get("labels") or {}).get("virtshift.io/policy")
                mig = flying.get(v["metadata"]["name"])
                if mig and label == "ref":
                    labelled.add(mig)
                elif mig in labelled:  # labelled for its migration, then changed mid-flight
                    reverted.append(f"{mig}: {label}")
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        kube.create(rest.NODE_DRAINS, drain_body(
            "ref-node-7", nodeName="node-7", policyRef={"name": "ref"},
            targetNodeSelector={"kubernetes.io/hostname": "node-6"}))
        wait_for(lambda: phase_of(kube, "ref-node-7") == "Drained", timeout=120,
                 what=lambda: f"node-7 drained ({get_drain(kube, 'ref-node-7').get('status')})")
    finally:
        stop.set()
        sampler.join()
    ours = [m for m in kube.items(rest.VMIMS, "refns")
            if m["metadata"]["labels"].get("virtshift.io/drain") == "ref-node-7"]
    assert len(ours) == 4 and all(m["metadata"]["labels"]["virtshift.io/policy"] == "ref"
                                  for m in ours)
    # KubeVirt (1.9) records the MigrationPolicy it matched at handoff.
    assert {m["status"]["migrationState"].get("migrationPolicyName") for m in ours} == {
        "virtshift-ref"}
    assert not reverted, reverted[:5]


def test_two_policies_two_drains_every_limit_holds(env) -> None:
    kube = env["kube"]
    kube.create(rest.POLICIES, policy(
        "gold", priority=10, namespaceSelector={"matchLabels": {"tier": "gold"}},
        maxParallelMigrations=2, maxParallelInboundPerNode=1))
    kube.create(rest.POLICIES, policy(
        "bulk", namespaceSelector={"matchLabels": {"tier": "bulk"}},
        bandwidthPerMigration="1Gi", nodeBandwidth="2Gi", maxParallelMigrations=3))
    samples: list[list[dict[str, Any]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(kube.items(rest.VMIMS))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for node in ("node-1", "node-2"):
            kube.create(rest.NODE_DRAINS, drain_body(f"limits-{node}", nodeName=node))
        for node in ("node-1", "node-2"):
            wait_for(lambda n=node: phase_of(kube, f"limits-{n}") == "Drained", timeout=240,
                     what=f"{node} drained")
    finally:
        stop.set()
        sampler.join()
    peak: Counter[str] = Counter()
    for s in samples:
        live = _unfinished(s)
        by_policy = Counter(m["metadata"]["labels"].get("virtshift.io/policy") for m in live)
        by_source = Counter(m["metadata"]["labels"].get("virtshift.io/source-node") for m in live)
        bulk_by_source = Counter(m["metadata"]["labels"]["virtshift.io/source-node"] for m in live
                                 if m["metadata"]["labels"].get("virtshift.io/policy") == "bulk")
        gold_inbound = Counter(
            (m.get("status", {}).get("migrationState", {}).get("targetNode")
             or m["spec"].get("addedNodeSelector", {}).get("kubernetes.io/hostname"))
            for m in live if m["metadata"]["labels"].get("virtshift.io/policy") == "gold")
        # KubeVirt's limits bound the migrations it runs (rounds more may wait in its
        # queue); the policies' limits bound every unfinished one.
        running = [m for m in live if m.get("status", {}).get("phase") in IN_FLIGHT_PHASES]
        running_by_source = Counter(m["metadata"]["labels"].get("virtshift.io/source-node")
                                    for m in running)
        checks = {
            "cluster": len(running), "gold": by_policy["gold"], "bulk": by_policy["bulk"],
            "outbound": max(running_by_source.values(), default=0),
            "queued-outbound": max(by_source.values(), default=0),
            "bulk-bandwidth": max(bulk_by_source.values(), default=0),
            "gold-inbound": max(gold_inbound.values(), default=0),
        }
        for k, v in checks.items():
            peak[k] = max(peak[k], v)
    limits = {"cluster": 5, "gold": 2, "bulk": 3, "outbound": 3, "queued-outbound": 6,
              "bulk-bandwidth": 2, "gold-inbound": 1}
    assert all(peak[k] <= v for k, v in limits.items()), peak
    assert peak["cluster"] >= 3 and peak["gold"] == 2, peak  # the limits were reached
    ours = [m for m in kube.items(rest.VMIMS) if m["metadata"]["labels"].get(
        "virtshift.io/drain", "").startswith("limits-")]
    failures = [(m["metadata"]["name"], m["status"].get("migrationState", {}).get(
        "failureReason")) for m in ours if m["status"]["phase"] != "Succeeded"]
    assert len(ours) == 28 and not failures, failures


def _sim_now(env) -> dt.datetime:
    clock = env["sim"].clock
    return clock.at(clock.now())


def test_window_holds_migrations_until_it_opens(env) -> None:
    kube = env["kube"]
    opens = (_sim_now(env) + dt.timedelta(minutes=3)).replace(second=0, microsecond=0) \
        + dt.timedelta(minutes=1)
    kube.create(rest.POLICIES, policy(
        "night", namespaceSelector={"matchLabels": {"tier": "night"}},
        windows=[{"schedule": f"{opens.minute} {opens.hour} * * *", "duration": "1h"}]))
    kube.create(rest.NODE_DRAINS, drain_body("night-node-3", nodeName="node-3"))
    drain = wait_for(lambda: (d := get_drain(kube, "night-node-3")) and any(
        v.get("reason") == "OutsideWindow" for v in d.get("status", {}).get("vms") or []) and d,
        what="waiting for the window")
    waiting = [v for v in drain["status"]["vms"] if v["reason"] == "OutsideWindow"]
    assert opens.strftime("%Y-%m-%dT%H:%M:%SZ") in waiting[0]["message"]
    assert kube.items(rest.VMIMS, "night") == []  # nothing starts outside the window
    assert _sim_now(env) < opens
    wait_for(lambda: phase_of(kube, "night-node-3") == "Drained", timeout=120,
             what="drained after the window opened")
    started = [parse_time(t["phaseTransitionTimestamp"]) for m in kube.items(rest.VMIMS, "night")
               for t in m["status"]["phaseTransitionTimestamps"] if t["phase"] == "Pending"]
    assert len(started) == 6 and min(started) >= opens


def test_cpu_models_are_respected(env) -> None:
    kube = env["kube"]
    kube.create(rest.NODE_DRAINS, drain_body("cpu-rome-1", nodeName="rome-1"))
    wait_for(lambda: phase_of(kube, "cpu-rome-1") == "Drained", timeout=120, what="rome drained")
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in kube.items(rest.NODES)}
    for vmi in kube.items(rest.VMIS, "cpu"):
        node = vmi["status"]["nodeName"]
        assert node == "rome-2", (vmi["metadata"]["name"], node)
        model = vmi["spec"]["domain"]["cpu"]["model"]
        label = ("host-model-cpu.node.kubevirt.io/EPYC-Rome" if model == "host-model"
                 else f"cpu-model-migration.node.kubevirt.io/{model}")
        assert nodes[node].get(label) == "true"


def test_no_compatible_target_is_reported_with_the_model(env) -> None:
    kube = env["kube"]
    kube.create(rest.NODE_DRAINS, drain_body("cpu-rome-2", nodeName="rome-2"))
    drain = wait_for(lambda: phase_of(kube, "cpu-rome-2") == "Stalled"
                     and get_drain(kube, "cpu-rome-2"), what="stalled")
    stalled = next(c for c in drain["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "NoCompatibleTarget"
    assert all(v["reason"] == "NoCompatibleTarget" and "EPYC-Rome" in v["message"]
               for v in drain["status"]["vms"])
    assert not [m for m in _unfinished(kube.items(rest.VMIMS, "cpu"))
                if m["metadata"]["labels"].get("virtshift.io/drain") == "cpu-rome-2"]


def test_downtime_ladder_abort_post_copy_and_quick_migration(env) -> None:
    kube = env["kube"]
    for ns, ladder in LADDERS.items():
        # PostCopy switches at the policy's completion timeout (2 s per GB: 18 s for 8Gi).
        kube.create(rest.POLICIES, policy(
            ns, namespaceSelector={"matchLabels": {"tier": ns}}, maxDowntime="300ms",
            onDowntimeExceeded=ladder, completionTimeoutPerGiB=2))
    # KubeVirt must know the post-copy variant before the migration that needs it starts.
    wait_for(lambda: any(p["spec"].get("allowPostCopy") for p in kube.items(
        rest.KUBEVIRT_POLICIES)), what="rendered post-copy policy")
    kube.create(rest.NODE_DRAINS, drain_body("hot-node-4", nodeName="node-4"))
    drain = wait_for(lambda: phase_of(kube, "hot-node-4") == "Stalled"
                     and get_drain(kube, "hot-node-4"), timeout=120, what="stalled on abort")
    vms = {v["namespace"]: v for v in drain["status"]["vms"]}
    assert (vms["hot-abort"]["phase"], vms["hot-abort"]["reason"]) == ("Waiting",
                                                                       "NotConverging")
    assert "would not converge" in vms["hot-abort"]["message"]
    assert kube.items(rest.VMIMS, "hot-abort") == []  # never started: the policy forbids it
    assert kube.get(rest.VMIS, "hot", "hot-abort")["status"]["nodeName"] == "node-4"

    assert vms["hot-postcopy"]["phase"] == "Succeeded"
    state = kube.get(rest.VMIS, "hot", "hot-postcopy")["status"]["migrationState"]
    assert state["mode"] == "PostCopy" and state["completed"] is True
    # Predicted before it started (post-copy's pause), observed by the configured source.
    post_copy = wait_for(lambda: (v := next(
        e for e in get_drain(kube, "hot-node-4")["status"]["vms"]
        if e["namespace"] == "hot-postcopy")).get("observedDowntimeMs") is not None and v,
        timeout=30, what="post-copy downtime observed")
    [vmim] = kube.items(rest.VMIMS, "hot-postcopy")
    assert post_copy["observedDowntimeMs"] == int(
        vmim["metadata"]["annotations"]["sim.virtshift.io/downtime-ms"]) <= 300
    assert post_copy["downtimeSource"] == "annotation:sim.virtshift.io/downtime-ms"
    assert 0 < post_copy["predictedDowntimeMs"] <= 300

    assert (vms["hot-quick"]["phase"], vms["hot-quick"]["mode"]) == ("Succeeded",
                                                                     "QuickMigration")
    assert vms["hot-quick"]["observedDowntimeMs"] > 0
    assert vms["hot-quick"]["downtimeSource"] == "restartTimestamps"
    assert kube.items(rest.VMIMS, "hot-quick") == []  # a restart, not a live migration
    assert kube.get(rest.VMIS, "hot", "hot-quick")["status"]["nodeName"] != "node-4"

    # Each policy's status counts what the drain did with its VM (issue 9: never set before).
    wanted = {"hot-abort": {"aborted": 1, "quickMigrated": 0, "succeeded": 0},
              "hot-quick": {"aborted": 0, "quickMigrated": 1, "succeeded": 0},
              "hot-postcopy": {"aborted": 0, "quickMigrated": 0, "succeeded": 1}}
    wait_for(lambda: all({k: outcomes_of(kube, p).get(k) for k in want} == want
                         for p, want in wanted.items()),
             what=lambda: f"outcomes: { {p: outcomes_of(kube, p) for p in wanted} }")


def _kubevirt_migrations(kube, **fields: Any) -> dict[str, Any]:
    """Set fields of the KubeVirt CR's spec.configuration.migrations; returns what they were."""
    before = kube.get(rest.KUBEVIRTS, *KUBEVIRT)["spec"]["configuration"]["migrations"]
    kube.patch(rest.KUBEVIRTS, KUBEVIRT[0], {"spec": {"configuration": {"migrations": fields}}},
               KUBEVIRT[1])
    return {k: before.get(k) for k in fields}


def test_unset_post_copy_follows_kubevirts_cluster_setting(env) -> None:
    """Issue 9: allowPostCopy left unset means KubeVirt's own (the KubeVirt CR's
    spec.configuration.migrations), as its description says. The rendered KubeVirt policy
    leaves it out, the operator predicts with KubeVirt's post-copy (so the Abort ladder does
    not hold the VM back) and KubeVirt switches the migration to post-copy at its completion
    timeout (5 s per GB here, also the KubeVirt CR's)."""
    kube = env["kube"]
    # The CR change reaches every policy that leaves these fields to KubeVirt: end the stalled
    # drain of the hot VMs first, so that it does not start moving them now.
    kube.delete(rest.NODE_DRAINS, "hot-node-4")
    wait_for(lambda: get_drain(kube, "hot-node-4") is None, what="hot-node-4 gone")
    kube.create(rest.POLICIES, policy(
        "hot-inherit", namespaceSelector={"matchLabels": {"tier": "hot-inherit"}},
        maxDowntime="300ms", bandwidthPerMigration="1Gi"))
    rendered = wait_for(lambda: kube.get(rest.KUBEVIRT_POLICIES, "virtshift-hot-inherit"),
                        what="rendered")
    assert "allowPostCopy" not in rendered["spec"], rendered["spec"]
    assert "allowAutoConverge" not in rendered["spec"], rendered["spec"]
    stored = kube.get(rest.POLICIES, "hot-inherit")["spec"]
    assert "allowPostCopy" not in stored and "allowAutoConverge" not in stored

    before = _kubevirt_migrations(kube, allowPostCopy=True, completionTimeoutPerGiB=5)
    try:
        kube.create(rest.NODE_DRAINS, drain_body("inherit-cl-1", nodeName="cl-1"))
        drain = wait_for(lambda: phase_of(kube, "inherit-cl-1") in ("Drained", "Stalled")
                         and get_drain(kube, "inherit-cl-1"), timeout=120, what="drained")
        [vm] = drain["status"]["vms"]
        assert (drain["status"]["phase"], vm["phase"]) == ("Drained", "Succeeded"), vm
    finally:
        _kubevirt_migrations(kube, **before)
    state = kube.get(rest.VMIS, "hot", "hot-inherit")["status"]["migrationState"]
    assert state["mode"] == "PostCopy" and state["completed"] is True
    assert state["migrationPolicyName"] == "virtshift-hot-inherit"
    config = state["migrationConfiguration"]
    assert (config["allowPostCopy"], config["allowWorkloadDisruption"],
            config["completionTimeoutPerGiB"], config["bandwidthPerMigration"]) == (
        True, True, 5, "1Gi")
    kube.delete(rest.NODE_DRAINS, "inherit-cl-1")


def test_non_migratable_vm_is_quick_migrated_with_downtime_measured(env) -> None:
    kube = env["kube"]
    kube.create(rest.POLICIES, policy(
        "restart", namespaceSelector={"matchLabels": {"tier": "restart"}},
        nonMigratable="Restart"))
    kube.create(rest.POLICIES, policy(
        "skip", namespaceSelector={"matchLabels": {"tier": "skip"}}, nonMigratable="Skip"))
    kube.create(rest.NODE_DRAINS, drain_body("restart-node-5", nodeName="node-5"))
    drain = wait_for(lambda: phase_of(kube, "restart-node-5") == "Drained"
                     and get_drain(kube, "restart-node-5"), timeout=120, what="drained")
    gpu = next(v for v in drain["status"]["vms"] if v["namespace"] == "restart")
    assert (gpu["phase"], gpu["mode"], gpu["reason"]) == ("Succeeded", "QuickMigration",
                                                          "QuickMigrated")
    skipped = next(v for v in drain["status"]["vms"] if v["namespace"] == "skip")
    assert (skipped["phase"], skipped["reason"]) == ("Skipped", "HostDeviceNotLiveMigratable")
    # Issue 20 item 14: the node is not empty; Ready says what still runs there.
    ready = next(c for c in drain["status"]["conditions"] if c["type"] == "Ready")
    assert ready["message"] == ("node-5 is empty but for 1 skipped VM still running there: "
                                "skip/gpu on node-5; it stays cordoned until this NodeDrain "
                                "is deleted"), ready
    assert kube.get(rest.VMIS, "gpu", "skip")["status"]["nodeName"] == "node-5"
    wait_for(lambda: outcomes_of(kube, "restart").get("quickMigrated") == 1
             and outcomes_of(kube, "skip").get("skipped") == 1,
             what=lambda: f"outcomes: {outcomes_of(kube, 'restart')} {outcomes_of(kube, 'skip')}")
    assert outcomes_of(kube, "restart").get("skipped") == 0
    assert outcomes_of(kube, "skip").get("quickMigrated") == 0
    # Stop, then start on another node: the target pod start-up (10s) at least.
    assert gpu["observedDowntimeMs"] >= 10_000
    assert gpu["downtimeSource"] == "restartTimestamps"
    vmi = kube.get(rest.VMIS, "gpu", "restart")
    assert vmi["status"]["nodeName"] not in (None, "node-5")
    vm = kube.get(rest.VMS, "gpu", "restart")
    assert vm["spec"]["runStrategy"] == "Always"
    assert kube.items(rest.VMIMS, "restart") == []


def test_progress_timeout_aborts_a_stalled_transfer_and_the_drain_retries(env) -> None:
    """progressTimeout is held by virtshift (KubeVirt's MigrationPolicy has no such field):
    once KubeVirt's kubevirt_vmi_migration_data_remaining_bytes for the VMI stops dropping for
    30 s, virtshift deletes the migration (KubeVirt aborts it), records the abort on the VMI,
    and the drain retries after the policy's backoff, elsewhere. KubeVirt's own progress
    timeout (150 s, cluster-wide) would act far later."""
    kube, sim = env["kube"], env["sim"]
    kube.create(rest.POLICIES, policy(
        "stall", namespaceSelector={"matchLabels": {"tier": "stall"}},
        bandwidthPerMigration="8Mi", progressTimeout="30s", maxAttempts=2,
        backoff={"initial": "10s", "max": "1m"}))
    wait_for(lambda: kube.get(rest.KUBEVIRT_POLICIES, "virtshift-stall"), what="rendered")
    assert "progressTimeout" not in kube.get(rest.KUBEVIRT_POLICIES, "virtshift-stall")["spec"]
    kube.patch(rest.NODES, "il-3", {"spec": {"unschedulable": True}})  # attempt 1: to il-2
    kube.create(rest.NODE_DRAINS, drain_body("stall-il-1", nodeName="il-1"))
    def attempt(n: int) -> dict[str, Any] | None:
        return next((m for m in kube.items(
            rest.VMIMS, "stall", label_selector=f"virtshift.io/drain=stall-il-1,"
            f"virtshift.io/attempt={n}")), None)

    first = wait_for(lambda: (m := attempt(1)) and m.get("status", {}).get("phase")
                     == "Running" and m, what="attempt 1 transferring")
    first_name = first["metadata"]["name"]
    state = kube.get(rest.VMIS, "slow", "stall")["status"]["migrationState"]
    assert (state["migrationUid"], state["targetNode"]) == (first["metadata"]["uid"], "il-2")
    stalled_at = _sim_now(env)
    sim.kubevirt.node_not_ready("il-2")  # the transfer to il-2 stops moving
    kube.patch(rest.NODES, "il-3", {"spec": {"unschedulable": None}})

    def records() -> list[dict[str, Any]]:
        vmi = kube.get(rest.VMIS, "slow", "stall")
        raw = (vmi["metadata"].get("annotations") or {}).get("virtshift.io/aborted-migrations")
        return json.loads(raw) if raw else []

    [record] = wait_for(records, timeout=60, what="the abort recorded on the VMI")
    assert (record["migration"], record["reason"], record["attempt"], record["policy"],
            record["drain"]) == (first_name, "ProgressTimeout", 1, "stall",
                                 "stall-il-1")
    assert "progressTimeout 30s" in record["message"]
    waited = (parse_time(record["at"]) - stalled_at).total_seconds()
    assert 25 <= waited < 150, waited  # virtshift's 30 s, not KubeVirt's 150 s
    events = wait_for(lambda: [e for e in kube.items(
        rest.EVENTS, "default", field_selector="involvedObject.name=stall")
        if e["reason"] == "ProgressTimeout"], what="event")
    assert events[0]["type"] == "Warning" and first_name in events[0]["message"]

    drain = wait_for(lambda: phase_of(kube, "stall-il-1") in ("Drained", "Stalled")
                     and get_drain(kube, "stall-il-1"), timeout=120, what="drained")
    [vm] = drain["status"]["vms"]
    assert (drain["status"]["phase"], vm["phase"], vm["attempts"], vm["targetNode"]) == (
        "Drained", "Succeeded", 2, "il-3"), vm
    assert kube.get(rest.VMIMS, first_name, "stall") is None  # KubeVirt removed it
    second = attempt(2)
    assert second["status"]["phase"] == "Succeeded"
    started = next(parse_time(t["phaseTransitionTimestamp"])
                   for t in second["status"]["phaseTransitionTimestamps"]
                   if t["phase"] == "Pending")
    assert (started - parse_time(record["at"])).total_seconds() >= 10  # the policy's backoff
    wait_for(lambda: {k: outcomes_of(kube, "stall").get(k) for k in ("aborted", "succeeded",
                                                                     "failed")}
             == {"aborted": 1, "succeeded": 1, "failed": 0},
             what=lambda: f"outcomes: {outcomes_of(kube, 'stall')}")


# -- issue 20 items 6 and 13: quick migrations -----------------------------------------------

QUICK = "virtshift.io/quick-migration"
VAP = rest.Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies",
                    namespaced=False)
VAP_BINDING = rest.Resource("admissionregistration.k8s.io", "v1",
                            "validatingadmissionpolicybindings", namespaced=False)


def _vmi_node(kube, ns: str) -> str | None:
    vmi = kube.get(rest.VMIS, "vm", ns)
    return ((vmi or {}).get("status") or {}).get("nodeName") if vmi and (
        vmi.get("status") or {}).get("phase") == "Running" else None


def _vm_entries(kube, drain: str) -> dict[str, dict[str, Any]]:
    return {v["namespace"]: v for v in ((get_drain(kube, drain) or {}).get("status") or {})
            .get("vms") or []}


def _drained_wound_up_and_gone(kube, name: str, node: str, what: str) -> None:
    """The drain ``name`` (its VM in namespace ``name``) drains onto ``node``, its quick
    migration's record goes and leaves nothing behind, then the drain is deleted and gone."""
    wait_for(lambda: phase_of(kube, name) == "Drained", timeout=120,
             what=lambda: f"{what} drained: {get_drain(kube, name).get('status')}")
    assert _vm_entries(kube, name)[name]["targetNode"] == node
    wait_for(lambda: QUICK not in (kube.get(rest.VMS, "vm", name)["metadata"].get(
        "annotations") or {}), timeout=30, what=f"{what} record removed")
    _assert_wound_up(kube, name, node)
    kube.delete(rest.NODE_DRAINS, name)
    wait_for(lambda: get_drain(kube, name) is None, timeout=60, what=f"{what} gone")


def _assert_wound_up(kube, ns: str, node: str) -> dict[str, Any]:
    """The VM runs on ``node``, and the quick migration left nothing behind: no record, no
    node selector in its template, none on its VMI (KubeVirt's LiveUpdate took it back), no
    RestartRequired, and no migration was made of it."""
    vm = kube.get(rest.VMS, "vm", ns)
    assert QUICK not in (vm["metadata"].get("annotations") or {}), vm["metadata"]
    assert not vm["spec"]["template"]["spec"].get("nodeSelector"), vm["spec"]["template"]
    assert "RestartRequired" not in {c["type"] for c in vm["status"].get("conditions") or []}
    # KubeVirt's VM controller copies the template's node selector onto the VMI.
    vmi = wait_for(lambda: (v := kube.get(rest.VMIS, "vm", ns)) and not v["spec"].get(
        "nodeSelector") and v, timeout=10, what=lambda: f"{ns}: the VMI's node selector gone "
        f"({kube.get(rest.VMIS, 'vm', ns)['spec'].get('nodeSelector')})")
    assert vmi["status"]["nodeName"] == node and vmi["status"]["phase"] == "Running"
    assert kube.items(rest.VMIMS, ns) == []
    return vm


def test_a_waves_restarts_land_only_where_its_migrations_could_and_keep_their_run_strategy(
        env) -> None:
    """Item 6: a wave over qm-1 and qm-2 with targetNodeSelector qm=a restarts qm-1's VMs on
    qm-3 only: not on qm-2 (the wave drains it later), not on the emptier node- ones
    (targetNodeSelector). Item 13: each VM gets back its run strategy (Manual; the deprecated
    spec.running), and the record and the node selector the restart needed go once it runs."""
    kube = env["kube"]
    kube.patch(rest.VMS, "vm", {"spec": {"runStrategy": "Manual"}}, "qm-manual")
    kube.patch(rest.VMS, "vm", {"spec": {"runStrategy": None, "running": True}}, "qm-running")
    for n in ("qm-1", "qm-2"):
        kube.patch(rest.NODES, n, {"metadata": {"labels": {"qmwave": "yes"}}})
    time.sleep(1)  # 20 s of cluster time: Manual and running:true do not stop a running VM
    assert _vmi_node(kube, "qm-manual") == _vmi_node(kube, "qm-running") == "qm-1"
    kube.create(rest.NODE_DRAINS, drain_body(
        "qm-wave", nodeSelector={"matchLabels": {"qmwave": "yes"}}, maxUnavailable=1,
        releaseAfter="0s", targetNodeSelector={"qm": "a"}, nonMigratable="Restart"))
    drain = wait_for(lambda: phase_of(kube, "qm-wave") in ("Drained", "Stalled")
                     and get_drain(kube, "qm-wave"), timeout=120,
                     what=lambda: f"wave done: {get_drain(kube, 'qm-wave').get('status')}")
    assert drain["status"]["phase"] == "Drained", drain["status"]
    entries = _vm_entries(kube, "qm-wave")
    for ns in ("qm-manual", "qm-running"):
        e = entries[ns]
        assert (e["phase"], e["reason"], e["targetNode"]) == ("Succeeded", "QuickMigrated",
                                                             "qm-3"), e
    wait_for(lambda: all(QUICK not in (kube.get(rest.VMS, "vm", ns)["metadata"].get(
        "annotations") or {}) for ns in ("qm-manual", "qm-running")), timeout=30,
             what="the quick-migration records removed")
    manual = _assert_wound_up(kube, "qm-manual", "qm-3")
    assert manual["spec"]["runStrategy"] == "Manual"
    running = _assert_wound_up(kube, "qm-running", "qm-3")
    assert running["spec"].get("running") is True and "runStrategy" not in running["spec"]
    # Still reported once the records are gone.
    time.sleep(0.5)
    entries = _vm_entries(kube, "qm-wave")
    assert (entries["qm-manual"]["phase"], entries["qm-running"]["phase"]) == (
        "Succeeded", "Succeeded")
    kube.delete(rest.NODE_DRAINS, "qm-wave")
    wait_for(lambda: get_drain(kube, "qm-wave") is None, timeout=60, what="qm-wave gone")


def test_a_drain_created_again_under_the_same_name_quick_migrates_afresh(env) -> None:
    """Item 13: the record of a quick migration is keyed by the drain's UID and removed once
    the VM runs: a NodeDrain of the same name created later moves the VM again instead of
    taking the old record for its own (Restarting, or moved, forever)."""
    kube = env["kube"]
    kube.create(rest.NODE_DRAINS, drain_body(
        "qm-again", nodeName="qm-5", targetNodeSelector={"kubernetes.io/hostname": "qm-6"},
        nonMigratable="Restart"))
    wait_for(lambda: phase_of(kube, "qm-again") == "Drained", timeout=120, what="first drained")
    landed = _vmi_node(kube, "qm-again")
    assert landed == "qm-6"
    kube.delete(rest.NODE_DRAINS, "qm-again")
    wait_for(lambda: get_drain(kube, "qm-again") is None, timeout=60, what="first gone")
    _assert_wound_up(kube, "qm-again", "qm-6")
    kube.create(rest.NODE_DRAINS, drain_body(
        "qm-again", nodeName=landed, targetNodeSelector={"kubernetes.io/hostname": "qm-5"},
        nonMigratable="Restart"))
    _drained_wound_up_and_gone(kube, "qm-again", "qm-5", "second")


def test_a_restart_that_cannot_be_scheduled_stalls_the_drain_with_the_schedulers_reason(
        env) -> None:
    """Item 13: the VM is stopped, its start is refused for a while (an admission policy:
    StartFailed, item 12) and meanwhile the only node it may start on is cordoned: once
    started, its launcher pod cannot be scheduled. The drain says so with the scheduler's
    reason and message and goes Stalled; the node uncordoned, the VM starts there and the
    drain completes."""
    kube = env["kube"]
    kube.create(VAP, {"apiVersion": "admissionregistration.k8s.io/v1",
                      "kind": "ValidatingAdmissionPolicy", "metadata": {"name": "qm-halted"},
                      "spec": {"failurePolicy": "Fail", "matchConstraints": {
                          "resourceRules": [{"apiGroups": ["kubevirt.io"], "apiVersions": ["*"],
                                             "operations": ["UPDATE"],
                                             "resources": ["virtualmachines"]}]},
                          "validations": [{"expression": (
                              "object.metadata.namespace != 'qm-stuck' || "
                              "(has(object.spec.runStrategy) && "
                              "object.spec.runStrategy == 'Halted')"),
                              "message": "stays halted (test)"}]}})
    kube.create(VAP_BINDING, {"apiVersion": "admissionregistration.k8s.io/v1",
                              "kind": "ValidatingAdmissionPolicyBinding",
                              "metadata": {"name": "qm-halted"},
                              "spec": {"policyName": "qm-halted",
                                       "validationActions": ["Deny"]}})

    def refused() -> bool:
        try:
            kube.patch(rest.VMS, "vm", {"metadata": {"labels": {"probe": "x"}}}, "qm-stuck",
                       dry_run=True)
        except rest.ApiError as exc:
            return "stays halted (test)" in str(exc)
        return False

    wait_for(refused, timeout=30, what="the admission policy in force")
    try:
        kube.create(rest.NODE_DRAINS, drain_body(
            "qm-stuck", nodeName="qm-4", targetNodeSelector={"qm": "c"},
            nonMigratable="Restart"))
        e = wait_for(lambda: (e := _vm_entries(kube, "qm-stuck").get("qm-stuck")) and
                     e.get("reason") == "StartFailed" and e, timeout=60,
                     what=lambda: f"StartFailed: {_vm_entries(kube, 'qm-stuck')}")
        assert "stays halted (test)" in e["message"]
        assert kube.get(rest.VMIS, "vm", "qm-stuck") is None
        kube.patch(rest.NODES, "qm-7", {"spec": {"unschedulable": True}})
    finally:
        kube.delete(VAP_BINDING, "qm-halted")
        kube.delete(VAP, "qm-halted")
    try:
        e = wait_for(lambda: (e := _vm_entries(kube, "qm-stuck").get("qm-stuck")) and
                     e.get("reason") == "Unschedulable" and e, timeout=60,
                     what=lambda: f"Unschedulable: {_vm_entries(kube, 'qm-stuck')}")
        assert e["phase"] == "Waiting" and "0/" in e["message"], e
        vmi = kube.get(rest.VMIS, "vm", "qm-stuck")
        assert vmi["status"]["phase"] == "Scheduling", vmi["status"]
        scheduled = next(c for c in vmi["status"]["conditions"] if c["type"] == "PodScheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
        drain = wait_for(lambda: phase_of(kube, "qm-stuck") == "Stalled"
                         and get_drain(kube, "qm-stuck"), timeout=30, what="Stalled")
        stalled = next(c for c in drain["status"]["conditions"] if c["type"] == "Stalled")
        assert stalled["reason"] == "Unschedulable" and "qm-stuck/vm" in stalled["message"]
    finally:
        kube.patch(rest.NODES, "qm-7", {"spec": {"unschedulable": None}})
    _drained_wound_up_and_gone(kube, "qm-stuck", "qm-7", "the stuck one")
