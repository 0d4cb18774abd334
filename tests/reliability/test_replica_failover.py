"""Two operator replicas at once (a coordination.k8s.io Lease): only the holder acts, and when
it is SIGKILLed mid-drain the standby takes over and finishes, nothing done twice. Who acted is
read from the cluster: the Lease, and the Events' reportingInstance."""

from __future__ import annotations

import time
from collections import Counter

from harness import FaultRun
from invariants import ClusterState, Watcher, duplicate_migrations
from operator_harness import wait_for

from virtshift.k8s import rest
from virtshift.k8s.leader import LEASES
from virtshift.k8s.views import parse_time

SCENARIO = """
seed: 13
timeScale: 10
kubevirt: {parallelMigrationsPerCluster: 4, parallelOutboundMigrationsPerNode: 2}
nodes:
  - generate: {count: 3, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - generate: {count: 10, prefix: vm-, namespace: apps, nodes: [node-1],
               memory: [1Gi, 4Gi], dirtyRate: [10Mi, 100Mi]}
"""
NS, LEASE = "virtshift", "virtshift"


def holder(kube) -> str | None:
    return ((kube.get(LEASES, LEASE, NS) or {}).get("spec") or {}).get("holderIdentity")


def test_two_replicas_one_acts_and_the_standby_finishes_after_sigkill(make_env) -> None:
    env = make_env(SCENARIO, start_operator=False)
    kube = env.kube
    kube.create_or_get(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": NS}})
    a = env.operator(leader=(NS, LEASE, "replica-a"))
    b = env.operator(leader=(NS, LEASE, "replica-b"))
    a.start()
    wait_for(lambda: holder(kube) == "replica-a", timeout=60, what="replica-a leads")
    b.start()
    wait_for(lambda: "waiting for Lease" in b.logs(), timeout=60, what="replica-b waits")
    run = FaultRun("two replicas, the active one SIGKILLed", "10 VMs")
    with Watcher(kube) as watcher:
        created = env.drain("ha", "node-1")
        wait_for(lambda: sum((m.get("status") or {}).get("phase") == "Succeeded"
                             for m in env.migrations("ha")) >= 2, timeout=120, every=0.02,
                 what="2 VMs moved")
        killed_wall = time.time()
        before = env.activity("ha")
        a.kill()
        started = time.monotonic()
        wait_for(lambda: holder(kube) == "replica-b", timeout=40, what="replica-b takes over")
        takeover = time.monotonic() - started
        run.recover_s = env.next_action("ha", before, started, timeout=60)
        env.wait_done("ha", timeout=180)
        run.finish_s = time.monotonic() - started
    violations = [str(v) for v in watcher.violations] + [str(v) for v in env.settled()]
    dups = duplicate_migrations(ClusterState.read(kube), created["metadata"]["uid"])
    events = [e for e in kube.items(rest.EVENTS, "default")
              if e["involvedObject"].get("name") == "ha"]
    by = Counter(e.get("reportingInstance") for e in events)
    early = [e["reason"] for e in events if e.get("reportingInstance") == "replica-b"
             and parse_time(e["firstTimestamp"]).timestamp() < killed_wall - 1]
    run.figures = {"takeover_s": round(takeover, 1), "events_by": dict(by),
                   "duplicates": len(dups), "standby_acted_early": len(early)}
    env.end("ha")
    violations += [str(v) for v in env.settled()]
    run.violations = violations + dups + [f"replica-b acted before the kill: {early}"] * bool(
        early)
    run.save()
    assert not run.violations, run.violations
    assert by["replica-a"] and by["replica-b"], by
    assert not env.vmis_on("node-1")
