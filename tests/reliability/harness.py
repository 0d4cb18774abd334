"""What the fault tests share: a control plane of their own (they restart it), the simulator, the
operator as a process, the CI/full budgets, and the record each fault run leaves for
``docs/reliability.md`` (``report.py``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from invariants import INVARIANTS, ClusterState, Expect, Violation, check_settled
from kubernetes import config
from operator_harness import OperatorProcess, drain_body, get_drain, wait_for

from virtshift.devenv import crds
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s import rest
from virtshift.k8s.rest import KubeClient
from virtshift.k8s.views import DRAIN_LABEL
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
FULL = os.environ.get("RELIABILITY_FULL", "").lower() in ("1", "true", "yes")
RESULTS = Path(os.environ.get("RELIABILITY_RESULTS", REPO / ".cache" / "reliability" /
                              "results.jsonl"))

# The budgets: `make test` (CI) runs the bounded form, `make reliability` the full one.
SIGKILL_SEEDS = int(os.environ.get("RELIABILITY_SEEDS", 20 if FULL else 3))
FUZZ_EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ", 150 if FULL else 25))


_FRESH = True


_TWO_NODES = """
seed: SEED
timeScale: 10
kubevirt: {parallelMigrationsPerCluster: 4, parallelOutboundMigrationsPerNode: 2}
nodes:
  - generate: {count: 4, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - generate: {count: 16, prefix: vm-, namespace: apps, nodes: [node-1, node-2],
               memory: [1Gi, 4Gi], dirtyRate: [10Mi, 100Mi]}
"""


def two_busy_nodes(seed: int) -> str:
    """The fault tests' scenario: 16 VMs on node-1 and node-2 of four nodes, under KubeVirt's
    limits of 4 migrations and 2 per node; ``seed`` picks their sizes and dirty rates."""
    return _TWO_NODES.replace("SEED", str(seed))


@dataclass
class FaultRun:
    """One run of one fault: what was checked, what broke, how long recovery took."""

    fault: str
    run: str
    violations: list[str] = field(default_factory=list)
    recover_s: float | None = None  # fault over -> the operator's next write
    finish_s: float | None = None  # fault over -> the drain done (or settled)
    figures: dict[str, Any] = field(default_factory=dict)
    invariants: tuple[str, ...] = INVARIANTS

    def save(self) -> None:
        global _FRESH
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        if _FRESH:  # the first record of this run replaces the last run's
            RESULTS.unlink(missing_ok=True)
            _FRESH = False
        with RESULTS.open("a") as f:
            f.write(json.dumps(asdict(self)) + "\n")


class Env:
    """etcd + kube-apiserver in a folder of the test's own, the simulator with ``scenario``,
    and one operator process (more with ``operator()``)."""

    def __init__(self, workdir: Path, scenario: str, time_scale: float | None = None,
                 start_operator: bool = True) -> None:
        self.workdir = workdir
        self.cp = LocalControlPlane(workdir / "cp", log=lambda _m: None)
        self.cp.up()
        api = config.new_client_from_config(str(self.cp.kubeconfig))
        kubevirt, _ = crds.kubevirt_crds()
        crds.apply_crds(api, crds.our_crds() + kubevirt)
        self.kube = KubeClient.from_kubeconfig(str(self.cp.kubeconfig))
        parsed = load_scenario(scenario)
        if time_scale:
            parsed = parsed.model_copy(update={"time_scale": time_scale})
        self.scenario = parsed
        self.sim = runner.start(self.kube, parsed, log=lambda _m: None)
        self.ops: list[OperatorProcess] = []
        self.op = self.operator() if start_operator else None
        if self.op:
            self.op.start()

    def operator(self, leader: tuple[str, str, str] | None = None,
                 kubeconfig: Path | None = None) -> OperatorProcess:
        name = f"operator-{len(self.ops) + 1}"
        (self.workdir / name).mkdir(exist_ok=True)
        op = OperatorProcess(kubeconfig or self.cp.kubeconfig, self.workdir / name,
                             self.scenario.time_scale, self.sim.metrics.url,
                             runner.DOWNTIME_SOURCE, leader_election=leader)
        self.ops.append(op)
        return op

    def close(self) -> None:
        for op in self.ops:
            op.stop()
        self.sim.stop()
        self.cp.down(quiet=True, grace=3)

    # -- reading the cluster ----------------------------------------------------------------

    def vmis_on(self, node: str) -> list[dict[str, Any]]:
        return [v for v in self.kube.items(rest.VMIS)
                if (v.get("status") or {}).get("nodeName") == node]

    def fullest_node(self) -> str:
        counts = {n["metadata"]["name"]: 0 for n in self.kube.items(rest.NODES)
                  if not (n.get("spec") or {}).get("unschedulable")}
        for v in self.kube.items(rest.VMIS):
            node = (v.get("status") or {}).get("nodeName")
            if node in counts:
                counts[node] += 1
        return max(sorted(counts), key=lambda n: counts[n])

    def migrations(self, drain: str) -> list[dict[str, Any]]:
        return self.kube.items(rest.VMIMS, label_selector=f"{DRAIN_LABEL}={drain}")

    def phase(self, drain: str) -> str | None:
        return ((get_drain(self.kube, drain) or {}).get("status") or {}).get("phase")

    def activity(self, drain: str) -> tuple[str | None, frozenset[str]]:
        """The drain's resourceVersion and its migrations' names: only the operator changes
        either (the drain's status, new VMIMs)."""
        d = get_drain(self.kube, drain)
        return ((d or {}).get("metadata", {}).get("resourceVersion"),
                frozenset(m["metadata"]["name"] for m in self.migrations(drain)))

    def next_action(self, drain: str, before: tuple[str | None, frozenset[str]],
                    started: float, timeout: float = 60) -> float | None:
        """Seconds from ``started`` until the operator next wrote something for ``drain``
        (None: the drain was already finished, so nothing was due)."""
        if self.phase(drain) in ("Drained", "Planned"):
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.activity(drain) != before:
                    return time.monotonic() - started
            except Exception:  # the API server may still be coming back
                pass
            time.sleep(0.05)
        return None

    def drain(self, name: str, node: str, **spec: Any) -> dict[str, Any]:
        return self.kube.create(rest.NODE_DRAINS, drain_body(name, nodeName=node, **spec))

    def wait_done(self, name: str, timeout: float = 180,
                  done: tuple[str, ...] = ("Drained",)) -> dict[str, Any]:
        return wait_for(lambda: self.phase(name) in done and get_drain(self.kube, name),
                        timeout=timeout, every=0.1,
                        what=lambda: f"{name} done: {self._conditions(name)}")

    def _conditions(self, name: str) -> object:
        return ((get_drain(self.kube, name) or {}).get("status") or {}).get("conditions")

    def end(self, name: str, timeout: float = 60) -> float:
        """Delete the drain and wait until it is gone (its finalizer removed): seconds taken."""
        started = time.monotonic()
        self.kube.delete(rest.NODE_DRAINS, name)
        wait_for(lambda: get_drain(self.kube, name) is None, timeout=timeout,
                 what=f"{name} gone (finalizer removed)")
        return time.monotonic() - started

    def settled(self, expect: Expect | None = None, timeout: float = 60) -> list[Violation]:
        """The settled invariants, given ``timeout`` to come true."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                violations = check_settled(ClusterState.read(self.kube), expect)
            except Exception as exc:  # unreadable cluster: itself a finding if it lasts
                violations = [Violation("cluster readable", str(exc))]
            if not violations or time.monotonic() > deadline:
                return violations
            time.sleep(0.5)

    def tracebacks(self) -> list[str]:
        return [op.log_dir.name for op in self.ops if "Traceback" in op.logs()]


def timed(fn: Callable[[], Any]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started
