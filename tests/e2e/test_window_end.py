"""A maintenance window that closes mid-drain, end to end: no migration starts after its end.

The simulated clock multiplies everything the operator takes to react (at 60x, a 0.2 s pass
is 12 s of cluster time), so the same drain runs at two time scales. "Starts" is read from
what KubeVirt writes on the migrations: the phase transition out of its queue (Scheduling)
and the transfer's ``migrationState.startTimestamp``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, get_drain, wait_for

from conftest import _serve_cluster
from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.k8s import rest
from virtshift.k8s.views import parse_time
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

# 16 VMs of 16Gi leave node-1 two at a time (KubeVirt's limits), each ~30-45 s of cluster
# time: the drain needs far longer than the window left open when it begins.
SCENARIO = """
seed: 5
timeScale: {scale}
kubevirt: {{parallelMigrationsPerCluster: 2, parallelOutboundMigrationsPerNode: 2}}
network: {{nodeBandwidth: 1Gi, targetPodStartup: 10s}}
storageClasses: [{{name: ceph-rbd, accessMode: ReadWriteMany}}]
nodes:
  - generate: {{count: 4, prefix: node-, cpuModel: Skylake-Server,
               allocatable: {{cpu: "64", memory: 512Gi}}}}
vms:
  - generate: {{count: 16, prefix: win-, namespace: win, nodes: [node-1], memory: 16Gi}}
"""
WINDOW_LEFT = 200  # cluster seconds the window stays open after the drain begins


@pytest.fixture(scope="module", params=[10, 60], ids=lambda s: f"{s}x")
def env(request, control_plane_binaries, tmp_path_factory) -> Iterator[dict[str, Any]]:
    for cluster in _serve_cluster(tmp_path_factory):
        scenario = load_scenario(SCENARIO.format(scale=request.param))
        sim = runner.start(cluster.kube, scenario, log=lambda _m: None)
        op = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                             scenario.time_scale, sim.metrics.url,
                             downtime_source=runner.DOWNTIME_SOURCE).start()
        try:
            yield {"kube": cluster.kube, "sim": sim, "op": op, "scale": request.param}
        finally:
            op.stop()
            sim.stop()


def _sim_now(env) -> dt.datetime:
    clock = env["sim"].clock
    return clock.at(clock.now())


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _started(m: dict[str, Any]) -> list[dt.datetime]:
    """When KubeVirt took the migration out of its queue, and when its transfer began."""
    status = m.get("status") or {}
    out = [parse_time(t["phaseTransitionTimestamp"])
           for t in status.get("phaseTransitionTimestamps") or []
           if t["phase"] == "Scheduling"]
    start = (status.get("migrationState") or {}).get("startTimestamp")
    return out + ([parse_time(start)] if start else [])


def test_no_migration_starts_after_the_window_closes(env) -> None:
    kube, scale = env["kube"], env["scale"]
    wait_for(lambda: len(kube.items(rest.VMIS, "win")) == 16, what="VMIs created")
    now = _sim_now(env)
    opening = now.replace(second=0, microsecond=0)
    end = now.replace(microsecond=0) + dt.timedelta(seconds=WINDOW_LEFT)
    kube.create(rest.POLICIES, {
        "apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "win"}, "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "win"}},
            "windows": [{"schedule": f"{opening.minute} {opening.hour} * * *",
                         "duration": f"{int((end - opening).total_seconds())}s"}]}})
    kube.create(rest.NODE_DRAINS, drain_body("win-node-1", nodeName="node-1"))
    next_open = _stamp(opening + dt.timedelta(days=1))

    def waiting_for_window() -> dict[str, Any] | None:
        d = get_drain(kube, "win-node-1") or {}
        vms = (d.get("status") or {}).get("vms") or []
        return d if _sim_now(env) > end and any(
            v.get("reason") == "OutsideWindow" for v in vms) else None

    drain = wait_for(waiting_for_window, timeout=WINDOW_LEFT / scale + 60,
                     what=lambda: f"the drain waiting for the next window "
                     f"({(get_drain(kube, 'win-node-1') or {}).get('status')})")
    # Let whatever was in flight at the end finish: nothing of ours is left in the queue.
    wait_for(lambda: all((m.get("status") or {}).get("phase") in FINAL_PHASES
                         for m in kube.items(rest.VMIMS, "win")),
             timeout=240 / scale + 30, what="the migrations under way at the end finished")
    migrations = kube.items(rest.VMIMS, "win")
    late = {m["metadata"]["name"]: [_stamp(t) for t in _started(m) if t > end]
            for m in migrations}
    late = {k: v for k, v in late.items() if v}
    assert not late, f"started after the window's end {_stamp(end)}: {late}"
    moved = [m for m in migrations if m["status"]["phase"] == "Succeeded"]
    left = [v for v in kube.items(rest.VMIS, "win") if v["status"].get("nodeName") == "node-1"]
    assert moved and left, (len(moved), len(left))  # the window closed mid-drain

    status = drain["status"]
    waiting = [v for v in status["vms"] if v.get("reason") == "OutsideWindow"]
    assert waiting and all(next_open in v["message"] for v in waiting), waiting[:3]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert "next window" in conditions["Ready"]["message"], conditions["Ready"]
    assert next_open in conditions["Ready"]["message"], conditions["Ready"]
    events = [e for e in kube.items(rest.EVENTS, "default")
              if e["involvedObject"].get("name") == "win-node-1"
              and e["reason"] == "OutsideWindow"]
    assert events and next_open in events[0]["message"], events
