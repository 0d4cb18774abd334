"""`virtshift demo`: a local control plane, the KubeVirt simulator and the operator draining a
node, with live progress and a summary at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from virtshift.api.units import format_bytes
from virtshift.devenv import crds
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s import rest
from virtshift.k8s.rest import KubeClient
from virtshift.k8s.views import DRAIN_LABEL, parse_time
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

DEFAULT_SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "medium.yaml"


def _line(status: dict[str, Any], elapsed: float) -> str:
    counts = status.get("counts") or {}
    return (f"[{elapsed:5.1f}s] {status.get('phase', '…'):<9} {status.get('progress', '-'):>7} "
            f"moving {counts.get('migrating', 0):>2}  pending {counts.get('pending', 0):>3}  "
            f"failed {counts.get('failed', 0)}  "
            f"ETA {status.get('eta', '-')} ({status.get('plannedSeconds', 0):.0f}s of cluster "
            "time left)")


def summary(kube: KubeClient, drain: dict[str, Any]) -> list[str]:
    status = drain.get("status") or {}
    name = drain["metadata"]["name"]
    migrations = kube.items(rest.VMIMS, label_selector=f"{DRAIN_LABEL}={name}")
    starts, ends, downtimes = [], [], []
    for m in migrations:
        stamps = {t["phase"]: parse_time(t["phaseTransitionTimestamp"])
                  for t in (m.get("status") or {}).get("phaseTransitionTimestamps", [])}
        if "Pending" in stamps:
            starts.append(stamps["Pending"])
        end = stamps.get("Succeeded") or stamps.get("Failed")
        if end:
            ends.append(end)
    for vm in status.get("vms") or []:
        if vm.get("observedDowntimeMs") is not None:
            downtimes.append((vm["observedDowntimeMs"], f"{vm['namespace']}/{vm['name']}",
                              vm.get("downtimeSource")))
    counts = status.get("counts") or {}
    lines = [
        f"NodeDrain {name}: {status.get('phase')}",
        f"  VMs moved:        {counts.get('succeeded', 0)} of {counts.get('total', 0)} "
        f"({format_bytes(status.get('bytesMoved', 0))} of guest memory)",
        f"  migrations:       {len(migrations)} created by virtshift",
    ]
    if starts and ends:
        lines.append(f"  makespan:         {(max(ends) - min(starts)).total_seconds():.0f}s of "
                     "simulated cluster time")
    if downtimes:
        worst = max(downtimes)
        lines.append(f"  longest downtime: {worst[0]} ms ({worst[1]}; observed by "
                     f"{worst[2]})")
    failed = [vm for vm in status.get("vms") or [] if vm["phase"] == "Failed"]
    lines.append(f"  failures:         {len(failed)}")
    lines += [f"    {vm['namespace']}/{vm['name']}: {vm.get('reason')}: {vm.get('message')}"
              for vm in failed]
    return lines


def run_demo(directory: str, scenario_path: str | None, node: str) -> int:
    workdir = Path(directory).resolve()
    cp = LocalControlPlane(workdir / "cluster")
    print("starting a local control plane (etcd + kube-apiserver) ...", flush=True)
    cp.up()
    operator: subprocess.Popen[bytes] | None = None
    sim = None
    try:
        kube = KubeClient.from_kubeconfig(str(cp.kubeconfig))
        from kubernetes import config

        kubevirt, source = crds.kubevirt_crds()
        crds.apply_crds(config.new_client_from_config(str(cp.kubeconfig)),
                        crds.our_crds() + kubevirt)
        print(f"installed the virtshift CRDs and {source}", flush=True)
        scenario = load_scenario(scenario_path or DEFAULT_SCENARIO)
        sim = runner.start(kube, scenario, log=lambda m: print("simulator: " + m, flush=True))
        log = open(workdir / "operator.log", "wb")  # noqa: SIM115 - lives as long as the process
        operator = subprocess.Popen(
            [sys.executable, "-m", "virtshift", "run", "--standalone", "--metrics-port", "0",
             "--kubeconfig", str(cp.kubeconfig), "--time-scale", str(scenario.time_scale),
             "--metrics-source", sim.metrics.url,
             # The simulator's own measurement; real KubeVirt publishes no such downtime.
             "--downtime-source", runner.DOWNTIME_SOURCE],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"operator started (log: {workdir / 'operator.log'})", flush=True)
        name = f"demo-{node}"
        if kube.get(rest.NODE_DRAINS, name):
            kube.delete(rest.NODE_DRAINS, name)
            while kube.get(rest.NODE_DRAINS, name):
                time.sleep(0.2)
        kube.create(rest.NODE_DRAINS, {"apiVersion": "virtshift.io/v1alpha1",
                                       "kind": "NodeDrain", "metadata": {"name": name},
                                       "spec": {"nodeName": node}})
        print(f"applied NodeDrain {name} (nodeName: {node})", flush=True)
        started = time.monotonic()
        drain: dict[str, Any] = {}
        while time.monotonic() - started < 600:
            drain = kube.get(rest.NODE_DRAINS, name) or drain
            status = drain.get("status") or {}
            print(_line(status, time.monotonic() - started), flush=True)
            if status.get("phase") in ("Drained", "Stalled", "Conflict"):
                break
            if operator.poll() is not None:
                print("the operator exited; see its log", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print()
        print("\n".join(summary(kube, drain)))
        return 0 if (drain.get("status") or {}).get("phase") in ("Drained", "Stalled") else 1
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(15)
        if sim is not None:
            sim.stop()
        cp.down(quiet=True)
