"""Builders of the API objects KubeVirt (and the kubelet) would create, as plain dicts."""

from __future__ import annotations

from typing import Any

from virtshift.api.kubevirt import (
    CPU_MODEL_LABEL,
    CPU_VENDOR_LABEL,
    HOST_MODEL_LABEL,
    LAUNCHER_LABEL,
    MIGRATION_CPU_MODEL_LABEL,
    MIGRATION_JOB_LABEL,
    MIGRATION_TARGET_LABEL,
    NODE_NAME_LABEL,
    SCHEDULABLE_LABEL,
)
from virtshift.api.kubevirt import CREATED_BY_LABEL as CREATED_BY
from virtshift.domain.placement import launch_selector
from virtshift.domain.placement import launcher_requests as _requests
from virtshift.sim.scenario import (
    KubeVirtSettings,
    NodeSpec,
    StorageClassSpec,
    VMSpec,
    VolumeSpec,
)

__all__ = ["MIGRATION_JOB_LABEL", "MIGRATION_TARGET_LABEL", "NODE_NAME_LABEL"]

JSON = dict[str, Any]
SIM_DRIVER = "sim.virtshift.io"
KUBEVIRT_NAMESPACE = "kubevirt"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
DOMAIN_ANNOTATION = "kubevirt.io/domain"  # on launcher pods: the VMI's name
# The switch-over downtime the simulator modelled: the one field it writes that KubeVirt
# does not (real KubeVirt publishes no per-migration downtime).
DOWNTIME_ANNOTATION = "sim.virtshift.io/downtime-ms"


def quantity(n: float) -> str:
    """Bytes as the largest whole binary unit Kubernetes would print."""
    n = int(n)
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def cpu_quantity(cores: float) -> str:
    return str(int(cores)) if float(cores).is_integer() else f"{int(cores * 1000)}m"


def cpu_vendor(model: str) -> str:
    return "AMD" if model.startswith(("EPYC", "Opteron")) else "Intel"


def node(spec: NodeSpec, bandwidth: float | None = None) -> JSON:
    """A Node as virt-handler's node labeller and heartbeat label it (node_labeller.go
    prepareLabels): the node's CPU model is its host model, usable as a named model, and
    accepted from host-model guests of that model. ``bandwidth``: its migration NIC, stated
    as a cluster admin tells virtshift (the virtshift.io/migration-bandwidth annotation)."""
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/arch": "amd64",
        SCHEDULABLE_LABEL: "true",
        CPU_MODEL_LABEL + spec.cpu_model: "true",
        MIGRATION_CPU_MODEL_LABEL + spec.cpu_model: "true",
        HOST_MODEL_LABEL + spec.cpu_model: "true",
        CPU_VENDOR_LABEL + cpu_vendor(spec.cpu_model): "true",
        **spec.labels,
    }
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels, **({"annotations": {
            "virtshift.io/migration-bandwidth": quantity(bandwidth)}} if bandwidth else {})},
        "spec": {"unschedulable": True} if not spec.schedulable else {},
    }


def node_status(spec: NodeSpec, stamp: str, ready: bool = True) -> JSON:
    resources = {"cpu": cpu_quantity(spec.allocatable_cpu),
                 "memory": quantity(spec.allocatable_memory), "pods": "250"}
    return {"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True" if ready else "Unknown",
            "reason": "KubeletReady" if ready else "NodeStatusUnknown",
            "message": "simulated kubelet is posting ready status" if ready
            else "Kubelet stopped posting node status.",
            "lastHeartbeatTime": stamp, "lastTransitionTime": stamp,
        }],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                      {"type": "Hostname", "address": spec.name}],
        "nodeInfo": {"kubeletVersion": "v1.36.3-sim", "architecture": "amd64",
                     "operatingSystem": "linux", "machineID": "", "systemUUID": "", "bootID": "",
                     "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                     "kubeProxyVersion": ""},
    }}


def storage_class(spec: StorageClassSpec) -> JSON:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": spec.name, "annotations": {
            f"{SIM_DRIVER}/node-local": str(spec.node_local).lower(),
            f"{SIM_DRIVER}/copy-bandwidth": quantity(spec.copy_bandwidth),
            # What a cluster admin tells virtshift about a class (docs/storage-migration.md):
            # its copy bandwidth (for predictions) and that its volumes are node-local.
            "virtshift.io/copy-bandwidth": quantity(spec.copy_bandwidth),
            "virtshift.io/node-local": str(spec.node_local).lower()}},
        "provisioner": provisioner(spec),
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer" if spec.node_local else "Immediate",
        "allowVolumeExpansion": True,
    }


HOSTNAME_LABEL = "kubernetes.io/hostname"
SELECTED_NODE_ANNOTATION = "volume.kubernetes.io/selected-node"
PROVISIONER_ANNOTATIONS = ("volume.kubernetes.io/storage-provisioner",
                           "volume.beta.kubernetes.io/storage-provisioner")


def provisioner(sc: StorageClassSpec) -> str:
    return f"{SIM_DRIVER}/{sc.name}"


def persistent_volume_claim(ns: str, claim: str, size: float, sc: StorageClassSpec) -> JSON:
    """A claim as a user (or populate) creates it."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": ns},
            "spec": {"accessModes": [sc.access_mode], "storageClassName": sc.name,
                     "volumeMode": "Filesystem",
                     "resources": {"requests": {"storage": quantity(size)}}}}


def provisioned_pv(pvc: JSON, sc: StorageClassSpec, node: str | None) -> JSON:
    """The PV the CSI external-provisioner creates for a claim (provisionClaimOperation):
    named pvc-<claim uid>, the claim's access modes and request, the class's reclaim policy,
    a claimRef with the claim's uid; node affinity for the selected node of a node-local
    class."""
    meta, spec = pvc["metadata"], pvc.get("spec") or {}
    name = f"pvc-{meta['uid']}"
    pv: JSON = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name,
                     "annotations": {"pv.kubernetes.io/provisioned-by": provisioner(sc)}},
        "spec": {
            "capacity": {"storage": ((spec.get("resources") or {}).get("requests") or {}).get(
                "storage", "1Gi")},
            "accessModes": list(spec.get("accessModes") or [sc.access_mode]),
            "storageClassName": sc.name,
            "persistentVolumeReclaimPolicy": "Delete",
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": meta["namespace"], "name": meta["name"],
                         "uid": meta["uid"]},
            "csi": {"driver": SIM_DRIVER, "volumeHandle": name, "fsType": "ext4"},
        },
    }
    if sc.node_local and node:
        pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}}
    return pv


def claim_binding(pv_name: str, sc: StorageClassSpec, node: str | None) -> JSON:
    """What the PV controller (setClaimProvisioner, bindClaimToVolume) and, for a
    WaitForFirstConsumer class, the scheduler write on the claim."""
    annotations = {"pv.kubernetes.io/bind-completed": "yes",
                   "pv.kubernetes.io/bound-by-controller": "yes",
                   **dict.fromkeys(PROVISIONER_ANNOTATIONS, provisioner(sc))}
    if sc.node_local and node:
        annotations[SELECTED_NODE_ANNOTATION] = node
    return {"metadata": {"annotations": annotations}, "spec": {"volumeName": pv_name}}


def claim_bound_status(pv: JSON) -> JSON:
    """updateClaimStatus: phase Bound with the volume's access modes and capacity."""
    return {"status": {"phase": "Bound", "accessModes": pv["spec"]["accessModes"],
                       "capacity": pv["spec"]["capacity"]}}


def _domain(vm: VMSpec) -> JSON:
    return {
        "cpu": {"cores": vm.cpu, "model": vm.cpu_model},
        "memory": {"guest": quantity(vm.memory)},
        "resources": {"requests": {"memory": quantity(vm.memory)}},
        "devices": devices(vm),
    }


def devices(vm: VMSpec) -> JSON:
    """Disks as KubeVirt's schema has them: virtio disks (scsi when hotplugged), ``lun``
    disks, ``shareable``; a filesystem volume is a virtiofs filesystem, not a disk."""
    disks = []
    for v in vm.volumes:
        if v.filesystem:
            continue
        disk: JSON = {"name": v.name}
        if v.lun:
            disk["lun"] = {"bus": "scsi"}
        else:
            disk["disk"] = {"bus": "scsi" if v.hotplug else "virtio"}
        if v.shareable:
            disk["shareable"] = True
        disks.append(disk)
    out: JSON = {"disks": disks}
    filesystems = [{"name": v.name, "virtiofs": {}} for v in vm.volumes if v.filesystem]
    if filesystems:
        out["filesystems"] = filesystems
    return out


def volume(v: VolumeSpec, claim: str) -> JSON:
    """A VM/VMI volume: a PVC, ``hotpluggable`` when hotplugged."""
    source: JSON = {"claimName": claim}
    if v.hotplug:
        source["hotpluggable"] = True
    return {"name": v.name, "persistentVolumeClaim": source}


def vmi_spec(vm: VMSpec, claims: dict[str, str] | None = None) -> JSON:
    claims = claims or {v.name: v.claim_name for v in vm.volumes}
    return {
        "domain": _domain(vm),
        "evictionStrategy": vm.eviction_strategy,
        "volumes": [volume(v, claims[v.name]) for v in vm.volumes],
    }


def virtual_machine(vm: VMSpec) -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": vm.name, "namespace": vm.namespace, "labels": dict(vm.labels)},
        "spec": {
            "runStrategy": "Always",
            "template": {"metadata": {"labels": {**vm.labels, "kubevirt.io/vm": vm.name}},
                         "spec": vmi_spec(vm)},
        },
    }


def vm_status(ready: bool = True, run_strategy: str = "Always") -> JSON:
    return {"status": {"created": ready, "ready": ready,
                       "printableStatus": "Running" if ready else "Stopped",
                       "runStrategy": run_strategy}}


def not_migratable(vm: VMSpec, shared: dict[str, bool],
                   migrated: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """KubeVirt's (reason, message) for a VMI that cannot live-migrate, or None
    (virt-handler vm.go calculateLiveMigrationCondition, checkVolumesForMigration).

    ``shared`` says per storage class whether its volumes are ReadWriteMany; ``migrated``
    names the volumes a volume migration is moving (status.migratedVolumes), which need not
    be shared."""
    if not vm.live_migratable:
        reason = vm.not_migratable_reason or "NotMigratable"
        return reason, f"VMI uses a feature that prevents live migration ({reason})"
    for vol in vm.volumes:
        if not shared[vol.storage_class] and vol.name not in migrated:
            return ("DisksNotLiveMigratable",
                    f"cannot migrate VMI: PVC {vol.claim_name} is not shared, live migration "
                    "requires that all PVCs must be shared (using ReadWriteMany access mode)")
    return None


def vmi_conditions(blocker: tuple[str, str] | None, stamp: str,
                   extra: list[JSON] | None = None) -> list[JSON]:
    live: JSON = {"type": "LiveMigratable", "status": "True", "lastProbeTime": None,
                  "lastTransitionTime": stamp}
    if blocker:
        live.update(status="False", reason=blocker[0], message=blocker[1])
    storage_migratable = blocker is None or blocker[0] == "DisksNotLiveMigratable"
    return [
        {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": stamp},
        live,
        {"type": "StorageLiveMigratable", "status": "True" if storage_migratable else "False",
         "lastProbeTime": None, "lastTransitionTime": stamp},
        *(extra or []),
    ]


def migrated_volumes_status(vm: VMSpec, claims: dict[str, str], wanted: dict[str, str],
                            shared: dict[str, bool], vmi: JSON, stamp: str) -> JSON:
    """The VMI status patch KubeVirt makes before a volume migration's VMIM exists: the VM
    controller records ``status.migratedVolumes`` (source and destination claims), and
    virt-handler's LiveMigratable condition then leaves those volumes out, so virt-api admits
    the migration when every non-shared disk moves (and refuses it otherwise)."""
    moved = {n: c for n, c in wanted.items() if claims.get(n) not in (None, c)}
    blocker = not_migratable(vm, shared, migrated=moved)
    fresh = next(c for c in vmi_conditions(blocker, stamp) if c["type"] == "LiveMigratable")
    conditions = [fresh if c.get("type") == "LiveMigratable" and
                  (c.get("status"), c.get("reason")) != (fresh["status"], fresh.get("reason"))
                  else c for c in (vmi.get("status") or {}).get("conditions") or []]
    return {"status": {"conditions": conditions, "migratedVolumes": [
        {"volumeName": name, "sourcePVCInfo": {"claimName": claims[name]},
         "destinationPVCInfo": {"claimName": claim}} for name, claim in sorted(moved.items())]}}


def virtual_machine_instance(vm: VMSpec, vm_uid: str) -> JSON:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {
            "name": vm.name, "namespace": vm.namespace,
            "labels": {**vm.labels, "kubevirt.io/vm": vm.name, NODE_NAME_LABEL: vm.node},
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                 "name": vm.name, "uid": vm_uid, "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": vmi_spec(vm),
    }


def launcher_requests(vm: VMSpec) -> tuple[float, float]:
    """(cores, bytes) a VM's launcher pod requests (domain.placement.launcher_requests)."""
    return _requests(vm.cpu, vm.memory)


def target_pod_anti_affinity(vmi_uid: str) -> JSON:
    """createTargetPod: never on a node that runs a pod of the same VMI."""
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {CREATED_BY: vmi_uid}},
        "topologyKey": "kubernetes.io/hostname"}]}}


def launcher_pod(vm: VMSpec, vmi_uid: str, name: str, node_name: str | None,
                 claims: dict[str, str] | None = None) -> JSON:
    claims = claims or {v.name: v.claim_name for v in vm.volumes}
    cpu, memory = launcher_requests(vm)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": vm.namespace,
            "annotations": {DOMAIN_ANNOTATION: vm.name},
            "labels": {LAUNCHER_LABEL: "virt-launcher", CREATED_BY: vmi_uid,
                       "vm.kubevirt.io/name": vm.name, **vm.labels},
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                                 "kind": "VirtualMachineInstance", "name": vm.name,
                                 "uid": vmi_uid, "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {
            **({"nodeName": node_name} if node_name else {}),
            "nodeSelector": launch_selector(vm.cpu_model),
            "containers": [{
                "name": "compute", "image": "quay.io/kubevirt/virt-launcher:sim",
                "resources": {"requests": {"cpu": cpu_quantity(cpu),
                                           "memory": quantity(memory)}},
            }],
            "volumes": [{"name": v.name, "persistentVolumeClaim": {"claimName": claims[v.name]}}
                        for v in vm.volumes],
            "terminationGracePeriodSeconds": 30,
        },
    }


def kubevirt_cr(settings: KubeVirtSettings) -> JSON:
    migrations: JSON = {
        "parallelMigrationsPerCluster": settings.parallel_migrations_per_cluster,
        "parallelOutboundMigrationsPerNode": settings.parallel_outbound_migrations_per_node,
        "completionTimeoutPerGiB": int(settings.completion_timeout_per_gib),
        "progressTimeout": int(settings.progress_timeout),
        "allowAutoConverge": settings.allow_auto_converge,
        "allowPostCopy": settings.allow_post_copy,
    }
    if settings.bandwidth_per_migration:
        migrations["bandwidthPerMigration"] = quantity(settings.bandwidth_per_migration)
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
        "metadata": {"name": "kubevirt", "namespace": KUBEVIRT_NAMESPACE},
        "spec": {"configuration": {
            "migrations": migrations,
            "developerConfiguration": {"featureGates": list(settings.feature_gates)}},
            "workloadUpdateStrategy": {
                "workloadUpdateMethods": list(settings.workload_update_methods)}},
    }


def kubevirt_status(settings: KubeVirtSettings) -> JSON:
    """What virt-operator reports once a release is deployed (pkg/virt-operator/util:
    SetObservedDeploymentConfig, SetTargetDeploymentConfig, UpdateConditionsCreated and
    UpdateConditionsAvailable)."""
    release, registry = settings.release, "quay.io/kubevirt"
    ready = "All components are ready."
    return {"status": {
        "phase": "Deployed",
        "observedKubeVirtVersion": release, "targetKubeVirtVersion": release,
        "operatorVersion": release,
        "observedKubeVirtRegistry": registry, "targetKubeVirtRegistry": registry,
        "defaultArchitecture": "amd64",
        "conditions": [
            {"type": "Available", "status": "True", "reason": "AllComponentsReady",
             "message": ready},
            {"type": "Progressing", "status": "False", "reason": "AllComponentsReady",
             "message": ready},
            {"type": "Degraded", "status": "False", "reason": "AllComponentsReady",
             "message": ready},
            {"type": "Created", "status": "True", "reason": "AllResourcesCreated",
             "message": "All resources were created."},
        ],
    }}
