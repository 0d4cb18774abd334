"""Faults of the cluster under a drain, and people changing things under it. One simulated
cluster (12 nodes; each test drains a node of its own, so they do not interfere), at 30x:

- KubeVirt: a target pod failing during preparation (the simulator's ``failTargetPod``) and
  before it (the target node going NotReady while the target pod is scheduled), the source
  node going NotReady mid-migration, a VMI deleted mid-migration, a migration that never
  converges (``dirtyRateSpike`` far above the bandwidth), a PodDisruptionBudget refusing
  evictions for a while;
- people: the MigrationPolicy deleted mid-drain, the node uncordoned by someone else, the
  NodeDrain edited mid-drain.

After each: every invariant, from the cluster's objects; and the drain either done or, where the
fault makes that impossible, saying why in its Ready condition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import FaultRun
from invariants import Expect, Watcher
from operator_harness import get_drain, wait_for

from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.domain.drain import CORDONED_BY
from virtshift.k8s import rest

SCENARIO = """
seed: 21
timeScale: 30
kubevirt: {parallelMigrationsPerCluster: 6, parallelOutboundMigrationsPerNode: 2,
           progressTimeout: 60, completionTimeoutPerGiB: 60}
nodes:
  - generate: {count: 12, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - generate: {count: 27, prefix: vm-, namespace: apps,
               nodes: [node-1, node-2, node-3, node-4, node-5, node-6, node-7, node-8, node-9],
               memory: [1Gi, 2Gi], dirtyRate: [10Mi, 50Mi]}
faults:
  - {kind: failTargetPod, vm: apps/vm-1, attempt: 1}
  - {kind: dirtyRateSpike, vm: apps/vm-5, dirtyRate: 40Gi, at: 0s}
"""
# vm-N sits on node-((N-1) % 9 + 1): vm-1 on node-1, vm-5 on node-5.


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(SCENARIO)


def unfinished(env, drain: str) -> list[dict[str, Any]]:
    return [m for m in env.migrations(drain) if (m.get("status") or {}).get("phase")
            not in FINAL_PHASES]


def in_phase(env, drain: str, phases: tuple[str, ...]) -> dict[str, Any] | None:
    return next((m for m in env.migrations(drain)
                 if (m.get("status") or {}).get("phase") in phases), None)


def run_fault(env, fault: str, node: str, name: str, during: Callable[[], Any] | None = None,
              done: tuple[str, ...] = ("Drained",), expect: Expect | None = None,
              reason: str | None = None, **spec: Any) -> dict[str, Any]:
    """Drain ``node``; ``during`` injects the fault (returns when it is in); wait until the
    drain is in one of ``done`` (with ``reason`` on Ready when given); check; end; check."""
    total = len(env.vmis_on(node))
    run = FaultRun(fault, f"{name} ({total} VMs)")
    with Watcher(env.kube) as watcher:
        env.drain(name, node, **spec)
        started = time.monotonic()
        if during:
            during()
            started = time.monotonic()
        drain = wait_for(lambda: env.phase(name) in done and (
            reason is None or _ready_reason(env, name) == reason) and get_drain(env.kube, name),
            timeout=180, every=0.1, what=lambda: f"{name} in {done} ({reason}): "
            f"{(get_drain(env.kube, name) or {}).get('status', {}).get('conditions')}")
        run.finish_s = time.monotonic() - started
    violations = [str(v) for v in watcher.violations]
    violations += [str(v) for v in env.settled(expect)]
    run.figures = {"vms": total, "left_on_node": len(env.vmis_on(node)),
                   "phase": env.phase(name), "reason": _ready_reason(env, name)}
    run.figures["finalizer_removed_s"] = round(env.end(name), 2)
    violations += [str(v) for v in env.settled(expect)]
    node_obj = env.kube.get(rest.NODES, node)
    if CORDONED_BY in (node_obj["metadata"].get("annotations") or {}):
        violations.append(f"{node} still carries {CORDONED_BY} after its drain went")
    run.violations = violations
    run.save()
    assert not violations, violations
    assert not env.tracebacks(), "a traceback in the operator's log"
    return drain


def _ready_reason(env, name: str) -> str | None:
    d = get_drain(env.kube, name) or {}
    return next((c.get("reason") for c in (d.get("status") or {}).get("conditions") or []
                 if c["type"] == "Ready"), None)


# -- KubeVirt -------------------------------------------------------------------------------------


def test_target_pod_fails_during_preparation(env) -> None:
    """vm-1's first migration fails at PreparingTarget; the retry waits out the backoff and
    succeeds (the backoff invariant reads the two attempts' timestamps)."""
    run_fault(env, "target pod failure during preparation", "node-1", "ft-prep")
    attempts = [m for m in env.migrations("ft-prep") if m["spec"]["vmiName"] == "vm-1"]
    assert sorted(m["status"]["phase"] for m in attempts) == ["Failed", "Succeeded"]


def test_target_pod_fails_before_preparation(env) -> None:
    """The only allowed target goes NotReady while the target pod is being scheduled: KubeVirt
    fails the migration before handoff; nowhere else to go, so the drain says so."""
    def during() -> None:
        wait_for(lambda: in_phase(env, "ft-sched", ("Pending", "Scheduling", "Scheduled")),
                 timeout=30, every=0.02, what="a migration being scheduled")
        env.sim.kubevirt.node_not_ready("node-12")
        wait_for(lambda: in_phase(env, "ft-sched", ("Failed",)), timeout=60, every=0.05,
                 what="the migration failed")

    # Pinned to a NotReady node, nothing can move: the drain must not say Drained, and its
    # Ready condition gives the reason (checked by the invariants).
    run_fault(env, "target pod failure before preparation (target NotReady)", "node-2",
              "ft-sched", during, done=("Stalled", "Draining"),
              targetNodeSelector={"kubernetes.io/hostname": "node-12"})
    assert env.phase("ft-sched") is None  # ended


def test_source_node_not_ready_mid_migration(env) -> None:
    def during() -> None:
        wait_for(lambda: in_phase(env, "src-down", ("Scheduled", "PreparingTarget",
                                                    "TargetReady", "Running")),
                 timeout=60, every=0.02, what="a migration under way")
        env.sim.kubevirt.node_not_ready("node-3")

    run_fault(env, "source node NotReady mid-migration", "node-3", "src-down", during,
              done=("Stalled", "Drained"))


def test_vmi_deleted_mid_migration(env) -> None:
    gone: set[str] = set()

    def during() -> None:
        m = wait_for(lambda: in_phase(env, "vmi-gone", ("Running", "PreparingTarget",
                                                        "TargetReady")),
                     timeout=60, every=0.02, what="a migration under way")
        env.kube.delete(rest.VMIS, m["spec"]["vmiName"], m["metadata"]["namespace"])
        gone.add(f"{m['metadata']['namespace']}/{m['spec']['vmiName']}")

    run_fault(env, "VMI deleted mid-migration", "node-4", "vmi-gone", during,
              done=("Drained", "Stalled"), expect=Expect(gone_vmis=gone))


def test_a_migration_that_never_converges(env) -> None:
    """vm-5 dirties memory 4x faster than the NIC sends it: plain pre-copy never converges, so
    either the operator's downtime ladder moves it another way (Drained), or after maxAttempts
    the drain stalls saying why; never a fourth attempt (the backoff invariant)."""
    drain = run_fault(env, "a migration that never converges", "node-5", "no-converge",
                      done=("Stalled", "Drained"))
    attempts = [m for m in env.migrations("no-converge") if m["spec"]["vmiName"] == "vm-5"]
    entry = next(v for v in drain["status"]["vms"] if v["name"] == "vm-5")
    print(f"vm-5: {entry['phase']} ({entry.get('mode')}, {entry.get('reason')}), "
          f"{len(attempts)} VMIMs")
    assert len(attempts) <= 3


def test_pdb_blocks_evictions_for_a_while(env) -> None:
    kube = env.kube
    kube.create(rest.PODS, {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": "guarded", "namespace": "apps",
                                         "labels": {"app": "guarded"}},
                            "spec": {"nodeName": "node-6",
                                     "containers": [{"name": "c", "image": "app"}]}})
    kube.create(rest.PDBS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                            "metadata": {"name": "guarded", "namespace": "apps"},
                            "spec": {"minAvailable": 1,
                                     "selector": {"matchLabels": {"app": "guarded"}}}})

    def during() -> None:
        wait_for(lambda: ((get_drain(kube, "pdb") or {}).get("status") or {}).get(
            "blockingPods"), timeout=60, what="the eviction refused")
        time.sleep(2)
        kube.delete(rest.PDBS, "guarded", "apps")

    run_fault(env, "a PodDisruptionBudget blocking evictions for a while", "node-6", "pdb",
              during, evictPods=True)
    assert kube.get(rest.PODS, "guarded", "apps") is None


# -- people ---------------------------------------------------------------------------------------


def test_policy_deleted_mid_drain(env) -> None:
    kube = env.kube
    kube.create(rest.POLICIES, {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
                                "metadata": {"name": "slow"},
                                "spec": {"maxParallelMigrations": 1,
                                         "vmSelector": {"matchLabels": {}}}})

    def during() -> None:
        wait_for(lambda: in_phase(env, "no-policy", ("Running", "Succeeded")), timeout=60,
                 every=0.02, what="a migration under the policy")
        kube.delete(rest.POLICIES, "slow")
        wait_for(lambda: kube.get(rest.POLICIES, "slow") is None, timeout=60,
                 what="the policy gone (its finalizer removed)")

    run_fault(env, "MigrationPolicy deleted mid-drain", "node-7", "no-policy", during)
    assert not [p for p in kube.items(rest.KUBEVIRT_POLICIES)
                if p["metadata"]["name"].endswith("slow")], "KubeVirt policy left behind"


def test_node_uncordoned_by_someone_else(env) -> None:
    """Someone uncordons the node mid-drain: the drain must not finish with the node open
    unless it says so; whatever it does, when it goes no annotation of ours stays."""
    def during() -> None:
        wait_for(lambda: env.migrations("uncordoned"), timeout=60, every=0.02,
                 what="a migration")
        env.kube.patch(rest.NODES, "node-8", {"spec": {"unschedulable": None}})

    run_fault(env, "node uncordoned by someone else mid-drain", "node-8", "uncordoned", during)


def test_nodedrain_edited_mid_drain(env) -> None:
    """Paused mid-drain (nothing new starts), then resumed with a target selector."""
    kube = env.kube

    def during() -> None:
        wait_for(lambda: env.migrations("edited"), timeout=60, every=0.02, what="a migration")
        kube.patch(rest.NODE_DRAINS, "edited", {"spec": {"paused": True}})
        wait_for(lambda: (get_drain(kube, "edited").get("status") or {}).get(
            "observedGeneration") == 2, timeout=30, what="generation 2 observed")
        before = {m["metadata"]["name"] for m in env.migrations("edited")}
        time.sleep(1)
        # Those still queued in KubeVirt are withdrawn (deleted); none is created.
        assert {m["metadata"]["name"] for m in env.migrations("edited")} <= before, \
            "a migration was created while paused"
        kube.patch(rest.NODE_DRAINS, "edited", {"spec": {
            "paused": False, "targetNodeSelector": {"kubernetes.io/hostname": "node-10"}}})

    run_fault(env, "NodeDrain edited mid-drain (paused, resumed, target changed)", "node-9",
              "edited", during)
