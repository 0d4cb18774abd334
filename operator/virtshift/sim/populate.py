"""Create a scenario's cluster objects: nodes, storage, VMs, VMIs, launcher pods, KubeVirt CR."""

from __future__ import annotations

import datetime as dt
import random
import string
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, KubeClient
from virtshift.sim import objects
from virtshift.sim.clock import SimClock
from virtshift.sim.scenario import Scenario, StorageClassSpec, VMSpec


@dataclass
class SimVM:
    """The simulator's own record of one VM (what virt-handler would know)."""

    spec: VMSpec
    node: str
    vmi_uid: str
    pod_name: str
    dirty_rate: float
    claims: dict[str, str]
    attempts: int = 0
    running: bool = True
    start_at: float | None = None  # restart pending (quick migration), simulated seconds
    stopped_at: float | None = None
    pod_uid: str | None = None
    pod_selector: dict[str, str] = field(default_factory=dict)  # the launcher pod's
    migration_uid: str | None = None  # whose state the VMI's status.migrationState holds
    target_node_label: str | None = None  # kubevirt.io/migrationTargetNodeName
    clear_evacuation: bool = False  # the next VMI write clears status.evacuationNodeName
    # A volume migration (VM controller): the VMI's spec.volumes and status.migratedVolumes
    # point at the destination claims while the domain still uses ``claims``.
    vmi_claims: dict[str, str] | None = None
    migrated_volumes: list[dict[str, Any]] | None = None
    volume_classes: dict[str, str] = field(default_factory=dict)  # volume -> new class
    volume_change: dict[str, Any] | None = None  # the VMI's VolumesChange condition
    vm_conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # on the VM
    volume_migration_state: list[dict[str, Any]] | None = None  # VM volumeUpdateState
    refused_update: dict[str, str] | None = None  # a volume update already refused as is
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # by type, as written
    # A VMI started but not yet running: its launcher pod waits for the scheduler.
    scheduling: bool = False
    status_strategy: str = "Always"  # the run strategy the VM's status last showed
    # The VMI's spec.nodeSelector and spec.affinity (from the VM's template at its start,
    # then live-updated), and the VM resourceVersion whose template was last synced to it.
    vmi_node_selector: dict[str, str] = field(default_factory=dict)
    vmi_affinity: dict[str, Any] | None = None
    synced_version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.spec.namespace}/{self.spec.name}"


@dataclass
class World:
    scenario: Scenario
    vms: dict[str, SimVM] = field(default_factory=dict)


def pod_suffix(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def _parallel(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 16) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def populate(kube: KubeClient, scenario: Scenario, clock: SimClock,
             log: Callable[[str], None] = print) -> World:
    rng = random.Random(scenario.seed)
    stamp = clock.stamp(0)
    world = World(scenario)
    classes = {sc.name: sc for sc in scenario.storage_classes}
    shared = {sc.name: sc.access_mode == "ReadWriteMany" for sc in scenario.storage_classes}

    labels = {ns.name: ns.labels for ns in scenario.namespaces}
    namespaces = sorted({vm.namespace for vm in scenario.vms} | {objects.KUBEVIRT_NAMESPACE}
                        | set(labels))
    _parallel(lambda ns: kube.create_or_get(rest.NAMESPACES, {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, **({"labels": labels[ns]} if labels.get(ns) else {})}}),
        namespaces)
    _parallel(lambda sc: kube.create_or_get(rest.STORAGE_CLASSES, objects.storage_class(sc)),
              scenario.storage_classes)

    def make_node(spec):
        node = kube.create_or_get(rest.NODES, objects.node(
            spec, scenario.network.node_bandwidth))
        kube.patch(rest.NODES, spec.name, objects.node_status(spec, stamp), subresource="status")
        # The API server taints a new node not-ready (TaintNodesByCondition); the node
        # lifecycle controller lifts it once the kubelet reports Ready. No controller-manager
        # runs here, so the simulator does it.
        taints = [t for t in (node.get("spec") or {}).get("taints") or []
                  if t.get("key") != objects.NOT_READY_TAINT]
        if taints != ((node.get("spec") or {}).get("taints") or []):
            kube.patch(rest.NODES, spec.name, {"spec": {"taints": taints or None}})

    _parallel(make_node, scenario.nodes)
    log(f"created {len(scenario.nodes)} nodes, {len(scenario.storage_classes)} storage classes")

    suffixes = {vm.namespace + "/" + vm.name: pod_suffix(rng) for vm in scenario.vms}

    def make_vm(vm: VMSpec) -> SimVM:
        for vol in vm.volumes:
            bind_volume(kube, vm.namespace, vol.claim_name, vol.size,
                        classes[vol.storage_class], vm.node)
        vm_obj = kube.create_or_get(rest.VMS, objects.virtual_machine(vm))
        kube.patch(rest.VMS, vm.name, objects.vm_status(), namespace=vm.namespace,
                   subresource="status")
        vmi = kube.create_or_get(rest.VMIS, objects.virtual_machine_instance(
            vm, vm_obj["metadata"]["uid"]))
        uid = vmi["metadata"]["uid"]
        node = (vmi.get("status") or {}).get("nodeName") or vm.node
        pod_name = f"virt-launcher-{vm.name}-{suffixes[vm.namespace + '/' + vm.name]}"
        pod = kube.create_or_get(rest.PODS, objects.launcher_pod(vm, uid, pod_name, node))
        kube.patch(rest.PODS, pod_name, {"status": running_pod_status(stamp)},
                   namespace=vm.namespace, subresource="status")
        blocker = objects.not_migratable(vm, shared)
        kube.patch(rest.VMIS, vm.name, {"status": {
            "phase": "Running", "nodeName": node,
            "conditions": objects.vmi_conditions(blocker, stamp),
            "migrationMethod": "BlockMigration" if blocker and blocker[0] ==
            "DisksNotLiveMigratable" else "LiveMigration",
            "activePods": {pod["metadata"]["uid"]: node},
            "phaseTransitionTimestamps": [{"phase": "Running", "phaseTransitionTimestamp": stamp}],
        }}, namespace=vm.namespace)
        return SimVM(vm, node, uid, pod_name, vm.dirty_rate,
                     {v.name: v.claim_name for v in vm.volumes}, pod_uid=pod["metadata"]["uid"],
                     pod_selector=dict(pod["spec"].get("nodeSelector") or {}))

    for sim_vm in _parallel(make_vm, scenario.vms):
        world.vms[sim_vm.key] = sim_vm
    log(f"created {len(world.vms)} VMs with their VMIs and virt-launcher pods")
    return world


def bind_volume(kube: KubeClient, ns: str, claim: str, size: float, sc: StorageClassSpec,
                node: str) -> None:
    """A claim the VM has been running on: created, provisioned (on the VM's node for a
    node-local class, as the scheduler selected it at the VM's first start) and bound, in the
    shape the simulated PV controller and provisioner give every claim (sim/storage.py)."""
    pvc = kube.create_or_get(rest.PVCS, objects.persistent_volume_claim(ns, claim, size, sc))
    if (pvc.get("spec") or {}).get("volumeName"):
        return
    pv = kube.create_or_get(rest.PVS, objects.provisioned_pv(pvc, sc, node))
    kube.patch(rest.PVCS, claim, objects.claim_binding(pv["metadata"]["name"], sc, node), ns)
    kube.patch(rest.PVCS, claim, objects.claim_bound_status(pv), ns, subresource="status")
    kube.patch(rest.PVS, pv["metadata"]["name"], {"status": {"phase": "Bound"}},
               subresource="status")


def ensure_kubevirt(kube: KubeClient, scenario: Scenario) -> dt.datetime:
    """Create the KubeVirt CR (in its namespace) and report the scenario's release in its
    status, as virt-operator does; its creationTimestamp is the clock's epoch. A CR left by an
    earlier run keeps its epoch but gets this scenario's feature gates."""
    ns = objects.KUBEVIRT_NAMESPACE
    kube.create_or_get(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": ns}})
    kv = kube.create_or_get(rest.KUBEVIRTS, objects.kubevirt_cr(scenario.kubevirt))
    gates = list(scenario.kubevirt.feature_gates)
    config = (kv.get("spec") or {}).get("configuration") or {}
    if (config.get("developerConfiguration") or {}).get("featureGates") != gates:
        kube.patch(rest.KUBEVIRTS, kv["metadata"]["name"], {"spec": {"configuration": {
            "developerConfiguration": {"featureGates": gates}}}}, ns)
    kube.patch(rest.KUBEVIRTS, kv["metadata"]["name"], objects.kubevirt_status(scenario.kubevirt),
               ns, subresource="status")
    created = kv["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    return dt.datetime.fromisoformat(created)


def running_pod_status(stamp: str) -> JSON:
    return {"phase": "Running", "startTime": stamp, "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": stamp}]}
