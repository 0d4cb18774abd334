"""What the KubeVirt end-to-end tests read and do on the cluster, in one place: start a
simulator for a module, create VMIMs, wait for them to end, read states and timestamps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

from operator_harness import wait_for as harness_wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

FINAL = ("Succeeded", "Failed")
# A KubeVirt policy that puts a VMI labelled migration=postcopy-slow in post-copy soon (1 s per
# GB of memory) and pulls it at 4 MiB/s, so that it stays in post-copy for minutes.
POST_COPY_SLOW = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
                  "metadata": {"name": "postcopy-slow"},
                  "spec": {"allowPostCopy": True, "completionTimeoutPerGiB": 1,
                           "bandwidthPerMigration": "4Mi",
                           "selectors": {"virtualMachineInstanceSelector": {
                               "migration": "postcopy-slow"}}}}


def simulate(kube: rest.KubeClient, scenario: str,
             policies: tuple[dict[str, Any], ...] = ()) -> Iterator[runner.Simulator]:
    """Body of a module fixture: KubeVirt policies first (so its caches start with them),
    then the simulator, stopped afterwards."""
    for policy in policies:
        kube.create(rest.KUBEVIRT_POLICIES, policy)
    simulator = runner.start(kube, load_scenario(scenario), log=lambda _m: None)
    try:
        yield simulator
    finally:
        simulator.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 30, every: float = 0.05) -> Any:
    return harness_wait_for(predicate, timeout, every)


def migrate(kube: rest.KubeClient, ns: str, name: str, vmi: str, **spec: Any) -> dict[str, Any]:
    return kube.create(rest.VMIMS, {"apiVersion": "kubevirt.io/v1",
                                    "kind": "VirtualMachineInstanceMigration",
                                    "metadata": {"name": name, "namespace": ns},
                                    "spec": {"vmiName": vmi, **spec}})


def final(kube: rest.KubeClient, ns: str, name: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (o := kube.get(rest.VMIMS, name, ns)) and o.get(
        "status", {}).get("phase") in FINAL and o, timeout)


def state_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status", {}).get("migrationState") or {}


def seconds(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def stamps(obj: dict[str, Any]) -> dict[str, float]:
    return {t["phase"]: seconds(t["phaseTransitionTimestamp"])
            for t in obj["status"]["phaseTransitionTimestamps"]}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions") or []}
