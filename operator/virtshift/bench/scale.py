"""``virtshift bench scale``: the operator over many VMIs, idle and during a wave.

A generated scenario (``--vmis`` over ``--nodes``, all on shared storage) is populated by the
simulator; then the operator starts with its own token user and, once its start-up work has
settled, is measured idle (RSS and CPU from /proc, API requests from the audit log) and while a
NodeDrain empties ``--wave-nodes`` nodes at once: API requests per migration and the
event-to-decision latency, from the API server's side: for each write by which the simulated
virt-controller ends a VMIM (the audit log's request body carries the phase), the time until
the operator's next write of any kind is received. Never from the operator's own logs.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtshift.bench import audit
from virtshift.bench.drain import Stage, _percentile
from virtshift.bench.procstat import cpu_seconds, memory_mib
from virtshift.k8s import rest
from virtshift.sim.scenario import Scenario, parse_scenario

WAVE_LABEL = "bench.virtshift.io/scale-wave"


@dataclass
class ScaleConfig:
    vmis: int = 5000
    nodes: int = 100
    idle_seconds: float = 60.0
    wave_nodes: int = 2
    time_scale: float = 60.0
    settle_timeout: float = 300.0  # wall seconds to wait for the operator's start-up work


def scenario(cfg: ScaleConfig) -> Scenario:
    names = [f"node-{i}" for i in range(1, cfg.nodes + 1)]
    per_node = math.ceil(cfg.vmis / cfg.nodes)
    return parse_scenario({
        "seed": 5000, "timeScale": cfg.time_scale,
        "kubevirt": {"parallelMigrationsPerCluster": 10, "parallelOutboundMigrationsPerNode": 2},
        "storageClasses": [{"name": "ceph-rbd", "accessMode": "ReadWriteMany",
                            "copyBandwidth": "1Gi"}],
        "nodes": [{"generate": {"count": cfg.nodes, "prefix": "node-",
                                "cpuModel": "Skylake-Server",
                                "allocatable": {"cpu": str(max(64, 2 * per_node)),
                                                "memory": f"{max(512, 8 * per_node)}Gi"}}}],
        "vms": [{"generate": {"count": cfg.vmis, "prefix": "vm-", "namespace": "scale",
                              "nodes": names, "memory": ["1Gi", "4Gi"],
                              "dirtyRate": ["5Mi", "50Mi"], "labels": {"app": "scale"},
                              "storageClass": "ceph-rbd", "diskSize": "10Gi"}}],
    })


def _settle(pid: int, timeout: float, window: float = 5.0, busy: float = 0.05
            ) -> tuple[float, bool]:
    """Wait until the process uses under ``busy`` of a core over ``window`` seconds (its caches
    loaded, its first reconciles done); returns the wall seconds it took and whether it did
    settle before ``timeout`` (if not, "idle" is measured anyway, and says so)."""
    t0 = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = cpu_seconds(pid)
        if (now - last) / window < busy:
            return time.monotonic() - t0, True
        last = now
    return time.monotonic() - t0, False


def event_to_decision(requests: list[audit.Request], since: float, until: float
                      ) -> dict[str, Any]:
    """From each simulated virt-controller write that ends a VMIM to the operator's next write
    (received by the API server), in wall seconds."""
    first_end: dict[tuple[str | None, str | None], float] = {}
    for r in sorted(requests, key=lambda r: r.completed):
        # The first write that makes a VMIM final (later full-status writes repeat the phase).
        if r.user == audit.SIM_CONTROLLER and since <= r.completed <= until \
                and r.resource.startswith("virtualmachineinstancemigrations") \
                and ((r.body or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            first_end.setdefault((r.namespace, r.name), r.completed)
    ends = sorted(first_end.values())
    writes = sorted(r.received for r in requests
                    if r.user == audit.OPERATOR_USER and r.verb in audit.MUTATING)
    lat: list[float] = []
    j = 0
    for t in ends:
        while j < len(writes) and writes[j] < t:
            j += 1
        if j < len(writes):
            lat.append(writes[j] - t)
    return {"p50": _round(_percentile(lat, 0.5)), "p99": _round(_percentile(lat, 0.99)),
            "max": _round(max(lat) if lat else None), "count": len(lat),
            "source": "kube-apiserver audit log: the simulated virt-controller's patch that "
                      "sets a VMIM's phase to Succeeded/Failed (stageTimestamp) to the next "
                      "create/update/patch/delete by the operator's user "
                      "(requestReceivedTimestamp), wall seconds"}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def run(cfg: ScaleConfig, workdir: Path, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    sc = scenario(cfg)
    t0 = time.monotonic()
    with Stage(workdir, sc, log) as stage:
        assert stage.cp is not None
        populate = time.monotonic() - t0
        log(f"{len(sc.vms)} VMIs Running on {cfg.nodes} nodes after {populate:.0f} s")
        stage.start_operator()
        assert stage.operator is not None
        pid = stage.operator.pid
        settle, settled = _settle(pid, cfg.settle_timeout)
        log(f"operator {'settled' if settled else 'still busy'} after {settle:.0f} s; "
            f"measuring idle for {cfg.idle_seconds:.0f} s")
        cpu0, w0 = cpu_seconds(pid), time.time()
        time.sleep(cfg.idle_seconds)
        cpu1, w1 = cpu_seconds(pid), time.time()
        mem_idle = memory_mib(pid)
        idle_cpu = cpu1 - cpu0
        kube = stage.kube
        wave = [f"node-{i}" for i in range(1, cfg.wave_nodes + 1)]
        for n in wave:
            kube.patch(rest.NODES, n, {"metadata": {"labels": {WAVE_LABEL: "1"}}})
        kube.create(rest.NODE_DRAINS, {
            "apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
            "metadata": {"name": "scale-wave"},
            "spec": {"nodeSelector": {"matchLabels": {WAVE_LABEL: "1"}},
                     "maxUnavailable": cfg.wave_nodes}})
        log(f"wave: draining {', '.join(wave)}")
        deadline = time.monotonic() + 1800
        phase = None
        while time.monotonic() < deadline:
            phase = ((kube.get(rest.NODE_DRAINS, "scale-wave") or {}).get("status")
                     or {}).get("phase")
            if phase in ("Drained", "Stalled"):
                break
            if stage.operator.poll() is not None:
                raise RuntimeError("the operator exited during the wave")
            time.sleep(0.5)
        cpu2, w2 = cpu_seconds(pid), time.time()
        mem_wave = memory_mib(pid)
        migrations = kube.items(rest.VMIMS)
        time.sleep(1.5)
        requests = list(audit.read(stage.cp.audit_log))
        idle_api = audit.count(requests, user=audit.OPERATOR_USER, since=w0, until=w1)
        wave_api = audit.count(requests, user=audit.OPERATOR_USER, since=w1, until=w2 + 1)
        started = audit.count(requests, user=audit.OPERATOR_USER, until=w0)
        return {
            "vmis": len(sc.vms), "nodes": cfg.nodes, "timeScale": cfg.time_scale,
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "populate_wall_s": round(populate, 1),
            "startup": {"settle_wall_s": round(settle, 1), "settled": settled,
                        "cpu_s": round(cpu0, 2),
                        "api_requests": started["total"]},
            "idle": {"seconds": round(w1 - w0, 1), "cpu_s": round(idle_cpu, 2),
                     "cpu_percent": round(100 * idle_cpu / (w1 - w0), 3),
                     "rss_mib": round(mem_idle.get("VmRSS", 0), 1),
                     "peak_rss_mib": round(mem_idle.get("VmHWM", 0), 1),
                     "api_requests": idle_api,
                     "api_requests_per_minute": round(60 * idle_api["total"] / (w1 - w0), 2)},
            "wave": {"nodes": len(wave), "phase": phase, "wall_s": round(w2 - w1, 1),
                     "cpu_s": round(cpu2 - cpu1, 2), "migrations": len(migrations),
                     "succeeded": sum(1 for m in migrations
                                      if (m.get("status") or {}).get("phase") == "Succeeded"),
                     "rss_mib": round(mem_wave.get("VmRSS", 0), 1),
                     "peak_rss_mib": round(mem_wave.get("VmHWM", 0), 1),
                     "api_requests": wave_api | {"per_migration": round(
                         wave_api["total"] / max(len(migrations), 1), 1)},
                     "event_to_decision_s": event_to_decision(requests, w1, w2 + 1)},
            "source": "RSS/CPU: /proc/<pid>/status and /stat of the operator process; API "
                      "requests: kube-apiserver audit log, the operator's own token user",
        }
