"""A NodeDrain whose policyRef names a MigrationPolicy that cannot govern it -- missing,
invalid, being deleted -- waits, says why, and goes on by itself once the policy is there:
it never drains under default rules instead of the ones it names."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, get_drain, phase_of, wait_for

from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

SCENARIO = """
seed: 3
timeScale: 10
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 4}
network: {nodeBandwidth: 1Gi, targetPodStartup: 10s}
storageClasses: [{name: ceph-rbd, accessMode: ReadWriteMany}]
nodes:
  - generate: {count: 4, prefix: node-, cpuModel: Skylake-Server,
               allocatable: {cpu: "64", memory: 512Gi}}
vms:
  - generate: {count: 8, prefix: ref-, namespace: refs, nodes: [node-1], memory: 8Gi}
"""
DRAIN = "ref-node-1"
HOLD = "virtshift.test/hold"  # a finalizer of the test's own: keeps a deleted policy Terminating


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, sim.metrics.url,
                         downtime_source=runner.DOWNTIME_SOURCE).start()
    try:
        yield {"kube": fresh_cluster.kube, "sim": sim, "op": op}
    finally:
        op.stop()
        sim.stop()


def tight(**extra: Any) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "tight"},
            "spec": {"vmSelector": {"matchLabels": {"selects": "nothing"}},
                     "maxParallelMigrations": 1, **extra}}


def stalled(kube: rest.KubeClient, reason: str) -> dict[str, Any] | None:
    """The Stalled condition with this reason, for the drain's current generation."""
    d = get_drain(kube, DRAIN) or {}
    for c in (d.get("status") or {}).get("conditions") or []:
        if c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == reason and \
                c.get("observedGeneration") == d["metadata"]["generation"]:
            return c
    return None


def warnings(kube: rest.KubeClient, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.items(rest.EVENTS, "default")
            if e["involvedObject"].get("name") == DRAIN and e["reason"] == reason
            and e["type"] == "Warning"]


def ours(kube: rest.KubeClient) -> list[dict[str, Any]]:
    return kube.items(rest.VMIMS, "refs")


def describe(kube: rest.KubeClient) -> str:
    return f"{(get_drain(kube, DRAIN) or {}).get('status')}"


def test_drain_waits_for_its_policy_and_then_drains_under_its_limits(env) -> None:
    kube = env["kube"]
    wait_for(lambda: len(kube.items(rest.VMIS, "refs")) == 8, what="VMIs created")
    kube.create(rest.NODE_DRAINS, drain_body(DRAIN, nodeName="node-1",
                                             policyRef={"name": "tight"}))
    # Missing: it waits, says so, and has not begun (no cordon, no migration).
    cond = wait_for(lambda: stalled(kube, "PolicyNotFound"), what=lambda: describe(kube))
    assert "tight" in cond["message"], cond
    assert wait_for(lambda: warnings(kube, "PolicyNotFound"), what="a PolicyNotFound Event")
    time.sleep(2)  # 20 s of cluster time: plenty for a migration to be created
    assert ours(kube) == []
    assert not (kube.get(rest.NODES, "node-1") or {})["spec"].get("unschedulable")

    # Invalid (a window that never opens, which its own Ready condition reports): still waits.
    kube.create(rest.POLICIES, tight(windows=[{"schedule": "0 0 31 2 *", "duration": "1h"}]))
    cond = wait_for(lambda: stalled(kube, "PolicyInvalid"), what=lambda: describe(kube))
    assert "windows[0].schedule" in cond["message"], cond
    assert wait_for(lambda: warnings(kube, "PolicyInvalid"), what="a PolicyInvalid Event")
    time.sleep(1)
    assert ours(kube) == []

    # Fixed: the drain goes on by itself, under the policy's maxParallelMigrations.
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            unfinished = [m for m in ours(kube)
                          if (m.get("status") or {}).get("phase") not in FINAL_PHASES]
            peak = max(peak, len(unfinished))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        kube.patch(rest.POLICIES, "tight", {"spec": {"windows": None}})
        wait_for(lambda: len([m for m in ours(kube) if (m.get("status") or {}).get(
            "phase") == "Succeeded"]) >= 2, timeout=120, what=lambda: describe(kube))

        # Being deleted mid-drain: the migration under way goes on, nothing new starts.
        kube.patch(rest.POLICIES, "tight", {"metadata": {"finalizers": [HOLD]}})
        kube.delete(rest.POLICIES, "tight")
        wait_for(lambda: stalled(kube, "PolicyTerminating"), what=lambda: describe(kube))
        assert wait_for(lambda: warnings(kube, "PolicyTerminating"),
                        what="a PolicyTerminating Event")
        wait_for(lambda: all((m.get("status") or {}).get("phase") in FINAL_PHASES
                             for m in ours(kube)), timeout=60, what="in-flight ones ended")
        held = ours(kube)
        assert all(m["status"]["phase"] == "Succeeded" for m in held), [
            (m["metadata"]["name"], m["status"]["phase"]) for m in held]
        time.sleep(2)
        assert len(ours(kube)) == len(held)
        assert phase_of(kube, DRAIN) == "Stalled"

        # Gone, then created again: the drain finishes under it.
        kube.patch(rest.POLICIES, "tight", {"metadata": {"finalizers": None}})
        wait_for(lambda: stalled(kube, "PolicyNotFound"), what=lambda: describe(kube))
        kube.create(rest.POLICIES, tight())
        wait_for(lambda: phase_of(kube, DRAIN) == "Drained", timeout=240,
                 what=lambda: describe(kube))
    finally:
        stop.set()
        sampler.join()
    migrations = ours(kube)
    assert peak == 1, peak  # maxParallelMigrations: 1, on every VMIM of the drain
    assert len(migrations) == 8 and all(
        m["metadata"]["labels"].get("virtshift.io/policy") == "tight" for m in migrations)
