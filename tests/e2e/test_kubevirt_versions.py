"""Where KubeVirt 1.7/1.8 behave differently from 1.9 (scenario ``kubevirt.version: "1.8"``),
checked on the cluster's objects. Each test names the KubeVirt source of the difference."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import kubevirt_objects
import pytest
from kubevirt_objects import POST_COPY_SLOW, simulate, state_of, wait_for

from virtshift.k8s import rest
from virtshift.sim import runner

SCALE = 100
NODE_FAILS_AT = 900  # simulated seconds: 9 s of wall time to get the migration going
SCENARIO = f"""
seed: 9
timeScale: {SCALE}
kubevirt: {{version: "1.8", parallelMigrationsPerCluster: 10,
            parallelOutboundMigrationsPerNode: 2, progressTimeout: 20}}
network: {{nodeBandwidth: 1Gi, targetPodStartup: 10s}}
nodes:
  - generate: {{count: 3, prefix: n-, start: 1, cpuModel: Skylake-Server,
               allocatable: {{cpu: "64", memory: 256Gi}}}}
  # Room for stall-1 only: nothing else of this module migrates onto the failing node.
  - {{name: doomed-1, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 70Gi}}}}
  - {{name: drain-1, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}}}}
vms:
  - {{name: big-8g, namespace: v18, node: n-1, memory: 8Gi, dirtyRate: 3Gi}}
  - {{name: abort-1, namespace: v18, node: n-1, memory: 64Gi, dirtyRate: 100Mi}}
  - {{name: stall-1, namespace: v18, node: doomed-1, memory: 64Gi, dirtyRate: 3Gi}}
  - {{name: flaky-1, namespace: v18, node: n-2, memory: 1Gi}}
  - {{name: plain-1, namespace: v18, node: n-2, memory: 1Gi, labels: {{tier: gold}}}}
  - {{name: pc-1, namespace: v18, node: n-2, memory: 2Gi, dirtyRate: 3Gi,
     labels: {{migration: postcopy-slow}}}}
  - generate: {{count: 5, prefix: evac-, namespace: v18, nodes: [drain-1], memory: [8Gi, 8Gi],
               dirtyRate: [10Mi, 10Mi]}}
faults:
  - {{kind: failTargetPod, vm: v18/flaky-1, attempt: 1}}
  - {{kind: nodeNotReady, node: doomed-1, at: {NODE_FAILS_AT}s}}
"""
SAME_AS_CLUSTER = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
                   "metadata": {"name": "same-as-cluster"},
                   "spec": {"allowPostCopy": False,
                            "selectors": {"virtualMachineInstanceSelector": {"tier": "gold"}}}}

# POST_COPY_SLOW here: post-copy from 4 s on (2 GiB is 3 GB at 1 s per GB), then 2 GiB
# pulled at 4 MiB/s: 512 s.


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    yield from simulate(fresh_cluster.kube, SCENARIO, (SAME_AS_CLUSTER, POST_COPY_SLOW))


@pytest.fixture
def kube(sim, fresh_cluster) -> rest.KubeClient:
    return fresh_cluster.kube


def migrate(kube: rest.KubeClient, name: str, vmi: str) -> None:
    kubevirt_objects.migrate(kube, "v18", name, vmi)


def final(kube: rest.KubeClient, name: str, timeout: float = 30) -> dict[str, Any]:
    return kubevirt_objects.final(kube, "v18", name, timeout)


def test_stall_is_reported_with_the_seconds_it_was_stuck(sim, kube) -> None:
    """1.7/1.8 live-migration-source.go processInflightMigration: "Live migration stuck for %d
    seconds and has been aborted" with the measured delay (progressTimeout 20: 21 s)."""
    assert sim.clock.now() < NODE_FAILS_AT - 30, "the module started too slowly"
    migrate(kube, "move-stall", "stall-1")
    done = final(kube, "move-stall", timeout=(NODE_FAILS_AT + 30) / SCALE + 20)
    state = state_of(done)
    assert state["failureReason"] == "Live migration stuck for 21 seconds and has been aborted"
    assert state["failed"] is True and "completed" not in state
    assert state["abortStatus"] == "Succeeded"


def test_completion_timeout_names_the_budget(kube) -> None:
    """1.7/1.8: "Live migration is not completed after %d seconds and has been aborted" with
    the budget (150 x 9 decimal GB for 8 GiB); ``completed`` is not set with ``failed``
    (migration-source.go setMigrationProgressStatus)."""
    migrate(kube, "move-big", "big-8g")
    done = final(kube, "move-big", timeout=1400 / SCALE + 20)
    state = state_of(done)
    assert state["failureReason"] == \
        "Live migration is not completed after 1350 seconds and has been aborted"
    assert state["failed"] is True and "completed" not in state


def test_user_abort_reason_keeps_kubevirts_trailing_space(kube) -> None:
    """1.7/1.8 asyncMigrationAbort: "Live migration aborted " (sic)."""
    migrate(kube, "move-abort", "abort-1")
    wait_for(lambda: (kube.get(rest.VMIMS, "move-abort", "v18") or {}).get(
        "status", {}).get("phase") == "Running")
    kube.delete(rest.VMIMS, "move-abort", "v18")
    vmi = wait_for(lambda: (v := kube.get(rest.VMIS, "abort-1", "v18")) and state_of(v).get(
        "failed") and v)
    state = state_of(vmi)
    assert state["failureReason"] == "Live migration aborted "
    assert state["abortRequested"] is True and state["abortStatus"] == "Succeeded"


def test_an_abort_in_post_copy_fails_and_the_migration_completes(kube) -> None:
    """1.7/1.8 setMigrationProgressStatus copies the launcher's abort status onto the VMI on
    every sync: deleting the VMIM in post-copy shows abortRequested with abortStatus Failed
    (asyncMigrationAbort: libvirt refuses AbortJob in post-copy), and the migration goes on
    to Succeeded, the VMIM keeping that state."""
    uid = kubevirt_objects.migrate(kube, "v18", "move-pc", "pc-1", addedNodeSelector={
        "kubernetes.io/hostname": "n-3"})["metadata"]["uid"]

    def state() -> dict[str, Any]:
        return state_of(kube.get(rest.VMIS, "pc-1", "v18"))

    wait_for(lambda: (s := state()).get("migrationUid") == uid and s.get("mode") == "PostCopy")
    assert kube.get(rest.VMIMS, "move-pc", "v18")["status"]["phase"] == "Running"
    kube.delete(rest.VMIMS, "move-pc", "v18")
    refused = wait_for(lambda: (s := state()).get("abortStatus") == "Failed" and s)
    assert refused["abortRequested"] is True and not refused.get("completed")
    done = wait_for(lambda: (s := state()).get("completed") and s, timeout=600 / SCALE + 20)
    assert (done["mode"], done["abortStatus"], done.get("failed")) == ("PostCopy", "Failed",
                                                                         None), done
    assert "failureReason" not in done
    assert kube.get(rest.VMIS, "pc-1", "v18")["status"]["nodeName"] == "n-3"
    wait_for(lambda: kube.get(rest.VMIMS, "move-pc", "v18") is None)  # finalizer gone


def test_target_pod_down_reason_does_not_reach_the_vmi(kube) -> None:
    """1.7/1.8 handleMarkMigrationFailedOnVMI sets "Target pod is down" after the patch is
    sent: the VMI shows failed and completed with no reason."""
    migrate(kube, "move-flaky", "flaky-1")
    state = state_of(final(kube, "move-flaky"))
    assert state["failed"] is True and state["completed"] is True
    assert "failureReason" not in state


def test_policy_name_only_when_the_policy_changed_something(kube) -> None:
    """1.7/1.8 GetMigrationConfByPolicy: a matching policy that changes nothing leaves
    migrationPolicyName unset (1.9 records every match)."""
    migrate(kube, "move-plain", "plain-1")
    state = state_of(final(kube, "move-plain"))
    assert "migrationPolicyName" not in state
    assert state["migrationConfiguration"]["allowPostCopy"] is False
    assert "maxDowntimeMs" not in state["migrationConfiguration"]  # a 1.9 field


def test_evacuation_without_the_priority_queue_respects_the_limits_itself(kube) -> None:
    """1.7/1.8 with MigrationPriorityQueue off: evacuation.go sync creates at most
    min(parallelMigrationsPerCluster - running, parallelOutboundMigrationsPerNode - running
    from the node) VMIMs, with no spec.priority."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            unfinished = [m for m in kube.items(rest.VMIMS, "v18")
                          if m["spec"]["vmiName"].startswith("evac-")
                          and m.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
            samples.append(len(unfinished))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        kube.patch(rest.NODES, "drain-1", {"spec": {"taints": [
            {"key": "kubevirt.io/drain", "effect": "NoSchedule"}]}})
        wait_for(lambda: all(kube.get(rest.VMIS, f"evac-{i}", "v18")["status"]["nodeName"]
                             != "drain-1" for i in range(1, 6)), timeout=60)
    finally:
        stop.set()
        sampler.join()
    created = [m for m in kube.items(rest.VMIMS, "v18") if m["spec"]["vmiName"].startswith(
        "evac-")]
    assert len(created) == 5
    assert all("priority" not in m["spec"] for m in created)
    assert max(samples) == 2
