"""The environment of the observability tests: the medium scenario (10x time) with one
injected target-pod failure on node-2, a MigrationPolicy for the app VMs, the simulator and the
operator serving /metrics with JSON logs."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from operator_harness import OperatorProcess

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import Fault, load_scenario

REPO = Path(__file__).resolve().parents[2]
MEDIUM = REPO / "examples" / "scenarios" / "medium.yaml"
TIME_SCALE = 10
POLICY = "gold"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name}, "spec": spec}


@contextlib.contextmanager
def observe_env(cluster: Any, workdir: Path) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(MEDIUM)
    faulty = next(v for v in scenario.vms if v.node == "node-2")
    scenario = scenario.model_copy(update={
        "time_scale": TIME_SCALE,
        "faults": [Fault(kind="failTargetPod", vm=f"{faulty.namespace}/{faulty.name}",
                         attempt=1)]})
    kube: rest.KubeClient = cluster.kube
    kube.create(rest.POLICIES, policy_body(POLICY, vmSelector={"matchLabels": {"app": "app"}}))
    sim = runner.start(kube, scenario, log=lambda _m: None)
    port = free_port()
    op = OperatorProcess(cluster.kubeconfig, workdir, scenario.time_scale, sim.metrics.url,
                         downtime_source=runner.DOWNTIME_SOURCE, metrics_port=port,
                         extra_args=("--log-format", "json")).start()
    try:
        yield {"kube": kube, "sim": sim, "op": op, "scenario": scenario, "cluster": cluster,
               "metrics": f"http://127.0.0.1:{port}/metrics", "faulty": faulty,
               "kubeconfig": str(cluster.kubeconfig), "sim_metrics": sim.metrics.url}
    finally:
        op.stop()
        sim.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def virtshift(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtshift", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def plan_json(env: dict[str, Any], node: str) -> dict[str, Any]:
    out = virtshift("plan", node, "--json", "--kubeconfig", env["kubeconfig"],
                    "--metrics-source", env["sim_metrics"], "--time-scale", str(TIME_SCALE))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
