"""The KubeVirt simulator against the real API server, with KubeVirt's real CRD schemas:
what a user would see of KubeVirt when migrating by hand, evicting, and aborting."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from operator_harness import wait_for as harness_wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.kubevirt import IN_FLIGHT
from virtshift.sim.scenario import load_scenario

SCENARIO = """
seed: 3
timeScale: 40
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 2}
network: {nodeBandwidth: 1Gi, targetPodStartup: 10s}
storageClasses:
  - {name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 1Gi}
nodes:
  - generate: {count: 6, prefix: node-, start: 1, cpuModel: Skylake-Server,
               allocatable: {cpu: "256", memory: 1Ti}}
vms:
  - {name: db-1, namespace: prod, node: node-1, memory: 2Gi, cpu: 2, dirtyRate: 50Mi,
     volumes: [{name: rootdisk, claimName: db-1-root, size: 10Gi, storageClass: ceph-rbd}]}
  - {name: gpu-1, namespace: prod, node: node-1, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: abort-me, namespace: prod, node: node-2, memory: 64Gi, dirtyRate: 100Mi}
  - {name: evict-me, namespace: prod, node: node-3, memory: 1Gi,
     evictionStrategy: LiveMigrate}
  - generate: {count: 60, prefix: bulk-, namespace: bulk,
               nodes: [node-1, node-2, node-3, node-4], memory: [1Gi, 3Gi],
               dirtyRate: [1Mi, 20Mi]}
"""


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    simulator = runner.start(fresh_cluster.kube, load_scenario(SCENARIO), log=lambda _m: None)
    yield simulator
    simulator.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 60, every: float = 0.1) -> Any:
    return harness_wait_for(predicate, timeout, every)


def vmim(name: str, namespace: str, vmi: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"vmiName": vmi, **spec}}


def final_vmim(kube: rest.KubeClient, name: str, ns: str) -> dict[str, Any]:
    return wait_for(lambda: (o := kube.get(rest.VMIMS, name, ns)) and
                    o.get("status", {}).get("phase") in ("Succeeded", "Failed") and o)


def test_scenario_objects_exist_as_kubevirt_would_create_them(sim, fresh_cluster) -> None:
    kube = fresh_cluster.kube
    vmi = kube.get(rest.VMIS, "db-1", "prod")
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == "node-1"
    conds = {c["type"]: c["status"] for c in vmi["status"]["conditions"]}
    assert conds == {"Ready": "True", "LiveMigratable": "True", "StorageLiveMigratable": "True"}
    pods = kube.items(rest.PODS, "prod", label_selector="kubevirt.io=virt-launcher")
    launcher = [p for p in pods if p["metadata"]["labels"]["kubevirt.io/created-by"] ==
                vmi["metadata"]["uid"]]
    assert len(launcher) == 1 and launcher[0]["spec"]["nodeName"] == "node-1"
    node = kube.get(rest.NODES, "node-2")
    assert node["metadata"]["labels"]["cpu-model-migration.node.kubevirt.io/Skylake-Server"] == \
        "true"
    kv = kube.get(rest.KUBEVIRTS, "kubevirt", "kubevirt")
    assert kv["spec"]["configuration"]["migrations"]["parallelMigrationsPerCluster"] == 5


def test_migration_walks_kubevirts_phases_in_order(sim, fresh_cluster) -> None:
    """migration.go processMigrationPhase: one entry per phase reached, in order; updateStatus
    copies the VMI's migrationState onto the final VMIM and removes the finalizer."""
    kube = fresh_cluster.kube
    kube.create(rest.VMIMS, vmim("move-db-1", "prod", "db-1"))
    done = final_vmim(kube, "move-db-1", "prod")
    phases = [t["phase"] for t in done["status"]["phaseTransitionTimestamps"]]
    assert phases == ["Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady",
                      "Running", "Succeeded"]
    stamps = [t["phaseTransitionTimestamp"] for t in done["status"]["phaseTransitionTimestamps"]]
    assert stamps == sorted(stamps)
    vmi = kube.get(rest.VMIS, "db-1", "prod")
    state = vmi["status"]["migrationState"]
    assert state["completed"] is True and state["sourceNode"] == "node-1"
    assert state["migrationUid"] == done["metadata"]["uid"]
    assert vmi["status"]["nodeName"] == state["targetNode"] != "node-1"
    assert vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == state["targetNode"]
    assert state["startTimestamp"] <= state["endTimestamp"]
    assert done["status"]["migrationState"] == state
    assert int(done["metadata"]["annotations"]["sim.virtshift.io/downtime-ms"]) <= 300
    assert done["metadata"]["labels"]["kubevirt.io/vmi-name"] == "db-1"
    wait_for(lambda: "kubevirt.io/migrationJobFinalize" not in (
        kube.get(rest.VMIMS, "move-db-1", "prod")["metadata"].get("finalizers") or []))


def test_non_migratable_vmi_is_refused_with_kubevirts_reason(sim, fresh_cluster) -> None:
    """virt-api refuses the VMIM itself (migration-create-admitter.go: isMigratable)."""
    kube = fresh_cluster.kube
    with pytest.raises(rest.ApiError) as err:
        kube.create(rest.VMIMS, vmim("move-gpu-1", "prod", "gpu-1"))
    assert err.value.status == 400
    assert err.value.message == (
        'admission webhook "migration-create-validator.kubevirt.io" denied the request: '
        "Cannot migrate VMI, Reason: HostDeviceNotLiveMigratable, Message: VMI uses a feature "
        "that prevents live migration (HostDeviceNotLiveMigratable)")
    assert kube.get(rest.VMIMS, "move-gpu-1", "prod") is None
    assert kube.get(rest.VMIS, "gpu-1", "prod")["status"]["nodeName"] == "node-1"


def test_deleting_a_vmim_mid_flight_aborts_it(sim, fresh_cluster) -> None:
    """migration.go markMigrationAbortInVmiStatus (once Running) and the source handler's
    abort: abortRequested, abortStatus Succeeded, and (1.9) "Live migration has been aborted"
    with completed and failed both set; the VMI stays where it was."""
    kube = fresh_cluster.kube
    kube.create(rest.VMIMS, vmim("move-big", "prod", "abort-me"))
    wait_for(lambda: kube.get(rest.VMIMS, "move-big", "prod").get("status", {}).get("phase")
             == "Running")
    kube.delete(rest.VMIMS, "move-big", "prod")
    wait_for(lambda: kube.get(rest.VMIMS, "move-big", "prod") is None)
    vmi = wait_for(lambda: (v := kube.get(rest.VMIS, "abort-me", "prod"))
                   and v["status"]["migrationState"].get("abortStatus") and v)
    state = vmi["status"]["migrationState"]
    assert state["abortStatus"] == "Succeeded" and state["abortRequested"] is True
    assert state["failed"] is True and state["completed"] is True
    assert state["failureReason"] == "Live migration has been aborted"
    assert vmi["status"]["nodeName"] == "node-2"


def test_kubevirt_limits_hold_with_fifty_requests_at_once(sim, fresh_cluster) -> None:
    kube = fresh_cluster.kube
    names = [f"bulk-{i}" for i in range(1, 51)]
    samples: list[tuple[int, Counter[str]]] = []
    stop = threading.Event()

    # Each bulk VM migrates once, from the node the scenario put it on.
    home = {vm.name: vm.node for vm in sim.scenario.vms if vm.namespace == "bulk"}

    def sample() -> None:
        while not stop.is_set():
            items = kube.items(rest.VMIMS, "bulk")
            active = [o for o in items if o.get("status", {}).get("phase") in IN_FLIGHT]
            sources = Counter(home[o["spec"]["vmiName"]] for o in active)
            samples.append((len(active), sources))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for name in names:
            kube.create(rest.VMIMS, vmim(f"m-{name}", "bulk", name))
        wait_for(lambda: all(o.get("status", {}).get("phase") in ("Succeeded", "Failed")
                             for o in kube.items(rest.VMIMS, "bulk")), timeout=240)
    finally:
        stop.set()
        sampler.join()
    assert max(n for n, _ in samples) == 5  # the limit was reached, and never exceeded
    assert max(max(c.values(), default=0) for _, c in samples) <= 2
    phases = Counter(o["status"]["phase"] for o in kube.items(rest.VMIMS, "bulk"))
    assert phases == {"Succeeded": 50}


def test_evicting_a_launcher_pod_triggers_evacuation(sim, fresh_cluster) -> None:
    kube = fresh_cluster.kube
    vmi = kube.get(rest.VMIS, "evict-me", "prod")
    pod = next(p for p in kube.items(rest.PODS, "prod", label_selector="kubevirt.io=virt-launcher")
               if p["metadata"]["labels"]["kubevirt.io/created-by"] == vmi["metadata"]["uid"])
    name = pod["metadata"]["name"]
    with pytest.raises(rest.ApiError) as err:
        kube.create(rest.PODS, {"apiVersion": "policy/v1", "kind": "Eviction",
                                "metadata": {"name": name, "namespace": "prod"}},
                    namespace="prod", name=name, subresource="eviction")
    assert err.value.status == 429
    assert "Eviction triggered evacuation of VMI" in json.loads(err.value.body)["message"]
    migration = wait_for(lambda: next(
        (o for o in kube.items(rest.VMIMS, "prod") if o["spec"]["vmiName"] == "evict-me"), None))
    assert migration["metadata"]["name"].startswith("kubevirt-evacuation-")
    done = final_vmim(kube, migration["metadata"]["name"], "prod")
    assert done["status"]["phase"] == "Succeeded"
    moved = kube.get(rest.VMIS, "evict-me", "prod")
    assert moved["status"]["nodeName"] != "node-3"
    assert kube.get(rest.PODS, name, "prod") is None  # the source pod is gone
