"""Turn API objects (dicts) into the domain's views."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.api.units import parse_quantity
from virtshift.domain.naming import label_value
from virtshift.domain.storage import (
    ABANDONED_ANNOTATION,
    COMPLETED_ANNOTATION,
    COPY_BANDWIDTH_ANNOTATION,
    MOVED_BY_LABEL,
    NODE_LOCAL_ANNOTATION,
    OWNER_UID_ANNOTATION,
    SOURCE_CLAIM_LABEL,
    SOURCE_CLAIMS_ANNOTATION,
    SOURCE_UID_ANNOTATION,
    STARTED_ANNOTATION,
    VM_LABEL,
    VM_UID_ANNOTATION,
    ClaimInfo,
    ClassInfo,
    NewClaim,
)
from virtshift.domain.storage import VMStorage as StorageView
from virtshift.domain.storage import VolumeInfo as StorageVolume
from virtshift.domain.views import (
    AbortRecord,
    DowntimeObservation,
    KubeVirtLimits,
    KubeVirtMigrationConfig,
    MigrationInfo,
    NodeInfo,
    PodInfo,
    QuickMigrationRecord,
    VMIInfo,
    VMInfo,
)

JSON = dict[str, Any]
DRAIN_LABEL = "virtshift.io/drain"
ATTEMPT_LABEL = "virtshift.io/attempt"
POLICY_LABEL = "virtshift.io/policy"
SOURCE_LABEL = "virtshift.io/source-node"
MODE_LABEL = "virtshift.io/migration-mode"
DRAIN_UID_ANNOTATION = "virtshift.io/node-drain-uid"
DRAIN_NAME_ANNOTATION = "virtshift.io/node-drain"
QUICK_ANNOTATION = "virtshift.io/quick-migration"
# On a VMI: the migrations virtshift aborted (progressTimeout), newest last, at most
# MAX_ABORT_RECORDS; they outlive the VirtualMachineInstanceMigrations KubeVirt removes.
ABORTED_ANNOTATION = "virtshift.io/aborted-migrations"
MAX_ABORT_RECORDS = 10


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def node_info(obj: JSON) -> NodeInfo:
    meta, status = obj["metadata"], obj.get("status") or {}
    alloc = status.get("allocatable") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return NodeInfo(
        name=meta["name"], labels=meta.get("labels") or {},
        annotations=meta.get("annotations") or {}, ready=ready,
        unschedulable=bool((obj.get("spec") or {}).get("unschedulable")),
        cpu=parse_quantity(alloc.get("cpu", "0")), memory=parse_quantity(alloc.get("memory", "0")),
        taints=tuple((t.get("key", ""), t.get("effect", ""))
                     for t in (obj.get("spec") or {}).get("taints") or []),
    )


def _vmi_memory(spec: JSON) -> float:
    domain = spec.get("domain") or {}
    guest = (domain.get("memory") or {}).get("guest")
    if guest:
        return parse_quantity(guest)
    req = ((domain.get("resources") or {}).get("requests") or {}).get("memory")
    return parse_quantity(req) if req else 0.0


def _memory_request(spec: JSON) -> float | None:
    req = (((spec.get("domain") or {}).get("resources") or {}).get("requests") or {}).get("memory")
    return parse_quantity(req) if req else None


def vmi_info(obj: JSON, dirty_rate: float | None = None,
             pod_selector: dict[str, str] | None = None) -> VMIInfo:
    """``pod_selector``: the node selector of the VMI's current launcher pod, which carries
    the CPU requirements KubeVirt keeps across moves."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    cpu = (spec.get("domain") or {}).get("cpu") or {}
    cores = (cpu.get("cores") or 1) * (cpu.get("sockets") or 1) * (cpu.get("threads") or 1)
    live = next((c for c in status.get("conditions") or [] if c.get("type") == "LiveMigratable"),
                None)
    running = [t for t in status.get("phaseTransitionTimestamps") or []
               if t.get("phase") == "Running"]
    return VMIInfo(
        namespace=meta["namespace"], name=meta["name"], node=status.get("nodeName"),
        memory=_vmi_memory(spec), cpu=float(cores), cpu_model=cpu.get("model") or "host-model",
        labels=meta.get("labels") or {}, phase=status.get("phase") or "Pending",
        migratable=live is None or live.get("status") == "True",
        not_migratable_reason=(live or {}).get("reason") if live and
        live.get("status") != "True" else None,
        not_migratable_message=(live or {}).get("message") if live and
        live.get("status") != "True" else None,
        running_since=parse_time(running[-1]["phaseTransitionTimestamp"]) if running else None,
        dirty_rate=dirty_rate, memory_request=_memory_request(spec),
        node_selector=spec.get("nodeSelector") or {}, pod_selector=pod_selector or {},
        unschedulable=_unschedulable(status),
    )


def _unschedulable(status: JSON) -> tuple[str, str] | None:
    """The PodScheduled=False condition KubeVirt copies from a VMI's launcher pod while it
    cannot be scheduled (watch/vmi/lifecycle.go, Scheduling phase), as (reason, message)."""
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"
                 and c.get("status") == "False"), None)
    if cond is None:
        return None
    return cond.get("reason") or "Unschedulable", cond.get("message") or ""


def vm_info(obj: JSON) -> VMInfo:
    meta = obj["metadata"]
    return VMInfo(namespace=meta["namespace"], name=meta["name"],
                  run_strategy=run_strategy(obj.get("spec") or {}), quick=quick_info(obj))


def run_strategy(spec: JSON) -> str:
    """The VM's run strategy as KubeVirt resolves it (VirtualMachine.RunStrategy, types.go):
    the deprecated spec.running true is Always, false or neither is Halted."""
    if spec.get("running") is not None:
        return "Always" if spec["running"] else "Halted"
    return spec.get("runStrategy") or "Halted"


def quick_info(obj: JSON) -> QuickMigrationRecord | None:
    raw = (obj["metadata"].get("annotations") or {}).get(QUICK_ANNOTATION)
    if not raw:
        return None
    data = json.loads(raw)
    return QuickMigrationRecord(
        drain=data["drain"], source=data["source"],
        stopped_at=parse_time(data["stoppedAt"]) or dt.datetime.now(dt.UTC),
        started=bool(data.get("started")), policy=data.get("policy"),
        drain_uid=data.get("drainUid"), started_at=parse_time(data.get("startedAt")),
        run_strategy=data.get("runStrategy") or "Always", running=bool(data.get("running")),
        pin=data.get("pin") or {}, pinned=data.get("pinned") or {})


def quick_record(r: QuickMigrationRecord) -> str:
    """The annotation's JSON: ``policy`` is whose limits the stop counts against until the
    VM runs again; the rest, what to take back then (QuickMigrationRecord)."""
    record: dict[str, Any] = {"drain": r.drain, "source": r.source,
                              "stoppedAt": stamp_of(r.stopped_at), "started": r.started,
                              "runStrategy": r.run_strategy}
    optional = {"policy": r.policy, "drainUid": r.drain_uid, "running": r.running or None,
                "startedAt": stamp_of(r.started_at) if r.started_at else None,
                "pin": dict(r.pin) or None, "pinned": dict(r.pinned) or None}
    record.update({k: v for k, v in optional.items() if v is not None})
    return json.dumps(record, sort_keys=True)


def stamp_of(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def migration_info(obj: JSON, ended_seen: dt.datetime | None = None,
                   downtime: DowntimeObservation | None = None,
                   vmi: JSON | None = None) -> MigrationInfo:
    """``downtime``: what the configured observation source (``k8s.downtime``) measured;
    KubeVirt's own VMIM carries none. ``vmi``: the VMI it migrates, whose migrationState says
    the mode while the migration runs (``migration_mode``)."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    labels = meta.get("labels") or {}
    state = status.get("migrationState") or {}
    transitions = {t["phase"]: t["phaseTransitionTimestamp"]
                   for t in status.get("phaseTransitionTimestamps") or []}
    phase = status.get("phase") or ""
    ended = parse_time(transitions.get(phase)) if phase in ("Succeeded", "Failed") else None
    return MigrationInfo(
        namespace=meta["namespace"], name=meta["name"], vmi=spec.get("vmiName", ""),
        phase=phase, drain=labels.get(DRAIN_LABEL), policy=labels.get(POLICY_LABEL),
        attempt=int(labels.get(ATTEMPT_LABEL, 0) or 0),
        created=parse_time(transitions.get("Pending")) or parse_time(
            meta.get("creationTimestamp")),
        scheduling_at=parse_time(transitions.get("Scheduling")),
        running_at=parse_time(transitions.get("Running")),
        ended=ended or ended_seen, source=state.get("sourceNode"),
        # Until KubeVirt schedules it, a pinned migration's target is its node selector's host.
        target=state.get("targetNode") or (spec.get("addedNodeSelector") or {}).get(
            "kubernetes.io/hostname"),
        failure=state.get("failureReason") or _unexplained_failure(status),
        mode=migration_mode(obj, vmi),
        downtime=downtime,
        terminating=bool(meta.get("deletionTimestamp")),
    )


def migration_mode(obj: JSON, vmi: JSON | None) -> str | None:
    """The migration's mode (PreCopy, PostCopy, Paused). KubeVirt writes it on the VMI's
    ``status.migrationState`` while the migration runs (virt-handler migration-source.go
    setMigrationProgressStatus) and copies that state onto the VMIM only once the VMIM is
    final (virt-controller migration.go updateStatus): until then the VMI's says it, when it
    is this migration's (``migrationUid``)."""
    status = obj.get("status") or {}
    own = (status.get("migrationState") or {}).get("mode")
    if own or status.get("phase") in FINAL_PHASES:
        return own
    state = ((vmi or {}).get("status") or {}).get("migrationState") or {}
    uid = obj["metadata"].get("uid")
    return state.get("mode") if uid and state.get("migrationUid") == uid else None


def abort_records(vmi: JSON) -> list[AbortRecord]:
    """The migrations virtshift aborted, as recorded on the VMI (oldest first)."""
    raw = ((vmi.get("metadata") or {}).get("annotations") or {}).get(ABORTED_ANNOTATION)
    if not raw:
        return []
    try:
        data = json.loads(raw)
        return [AbortRecord(
            migration=r["migration"], namespace=r["namespace"], vmi=r["vmi"],
            reason=r["reason"], message=r.get("message", ""),
            at=parse_time(r["at"]) or dt.datetime.min.replace(tzinfo=dt.UTC),
            policy=r.get("policy"), drain=r.get("drain"), drain_uid=r.get("drainUid"),
            attempt=int(r.get("attempt", 0))) for r in data]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []  # not ours to repair; the next abort rewrites it


def abort_records_annotation(records: list[AbortRecord]) -> str:
    """The annotation value for these records: the newest MAX_ABORT_RECORDS."""
    def wire(r: AbortRecord) -> JSON:
        out: JSON = {"migration": r.migration, "namespace": r.namespace, "vmi": r.vmi,
                     "reason": r.reason, "message": r.message,
                     "at": r.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "attempt": r.attempt}
        for key, value in (("policy", r.policy), ("drain", r.drain), ("drainUid", r.drain_uid)):
            if value is not None:
                out[key] = value
        return out
    return json.dumps([wire(r) for r in records[-MAX_ABORT_RECORDS:]], sort_keys=True)


def _unexplained_failure(status: JSON) -> str | None:
    """KubeVirt writes no failureReason for a migration that failed before its target was
    handed off (migration.go updateStatus): say what the VMIM itself shows."""
    if status.get("phase") != "Failed":
        return None
    if any(c.get("type") == "migrationAbortRequested" for c in status.get("conditions") or []):
        return "cancelled before the target was ready"
    reached = [t["phase"] for t in status.get("phaseTransitionTimestamps") or []
               if t.get("phase") != "Failed"]
    return (f"failed in phase {reached[-1] if reached else 'Pending'} with no reason from "
            "KubeVirt (target pod unschedulable, removed or failed)")


def pod_info(obj: JSON) -> PodInfo:
    meta = obj["metadata"]
    labels = meta.get("labels") or {}
    owners = meta.get("ownerReferences") or []
    if labels.get("kubevirt.io") == "virt-launcher":
        kind = "launcher"
    elif any(o.get("kind") == "DaemonSet" for o in owners):
        kind = "daemonset"
    elif "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
        kind = "mirror"
    elif meta.get("deletionTimestamp") or (obj.get("status") or {}).get("phase") in (
            "Succeeded", "Failed"):
        kind = "terminating"
    else:
        kind = "ordinary"
    vmi = (meta.get("annotations") or {}).get("kubevirt.io/domain") or labels.get(
        "vm.kubevirt.io/name")
    return PodInfo(namespace=meta["namespace"], name=meta["name"],
                   node=(obj.get("spec") or {}).get("nodeName", ""), kind=kind,
                   vmi=f"{meta['namespace']}/{vmi}" if kind == "launcher" and vmi else None)


def pod_requests(obj: JSON) -> tuple[float, float]:
    """(cores, bytes) the pod's containers request."""
    cpu = mem = 0.0
    for c in (obj.get("spec") or {}).get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu += parse_quantity(req.get("cpu", "0"))
        mem += parse_quantity(req.get("memory", "0"))
    return cpu, mem


def pod_running(obj: JSON) -> bool:
    """Not finished and not being deleted: its VM may still run in it."""
    return not obj["metadata"].get("deletionTimestamp") and (obj.get("status") or {}).get(
        "phase") not in ("Succeeded", "Failed")


def _kubevirt_migrations(kv: JSON | None) -> JSON:
    return (((kv or {}).get("spec") or {}).get("configuration") or {}).get("migrations") or {}


def kubevirt_migration_config(kv: JSON | None) -> KubeVirtMigrationConfig:
    """The KubeVirt CR's migration settings a MigrationPolicy may leave to KubeVirt, with
    KubeVirt's defaults (virt-config.go; allowWorkloadDisruption unset follows allowPostCopy)."""
    migrations = _kubevirt_migrations(kv)
    disruption = migrations.get("allowWorkloadDisruption")
    return KubeVirtMigrationConfig(
        allow_auto_converge=bool(migrations.get("allowAutoConverge", False)),
        allow_post_copy=bool(migrations.get("allowPostCopy", False)),
        allow_workload_disruption=None if disruption is None else bool(disruption),
        completion_timeout_per_gib=int(migrations.get("completionTimeoutPerGiB", 150)),
        progress_timeout=int(migrations.get("progressTimeout", 150)),
    )


def kubevirt_limits(kv: JSON | None) -> KubeVirtLimits:
    """``live_update``: spec.configuration.vmRolloutStrategy, LiveUpdate unless Stage
    (virt-config.go DefaultVMRolloutStrategy: LiveUpdate in 1.7, 1.8 and 1.9)."""
    migrations = _kubevirt_migrations(kv)
    config = ((kv or {}).get("spec") or {}).get("configuration") or {}
    return KubeVirtLimits(
        per_cluster=int(migrations.get("parallelMigrationsPerCluster", 5)),
        outbound_per_node=int(migrations.get("parallelOutboundMigrationsPerNode", 2)),
        live_update=config.get("vmRolloutStrategy", "LiveUpdate") != "Stage",
    )


MIGRATION_STALL_DETECTION = "MigrationStallDetection"


def kubevirt_applies_max_downtime(kv: JSON | None) -> bool:
    """Whether KubeVirt takes a MigrationPolicy's maxDowntimeMs (and hands it on to QEMU):
    v1.9 or later (``status.observedKubeVirtVersion``; trusted when unreported) with the
    MigrationStallDetection feature gate in ``developerConfiguration.featureGates``. virt-api
    refuses the field otherwise (migrationpolicy-admitter.go), and before v1.9 it does not
    exist; QEMU's default 300 ms downtime limit applies then."""
    kv = kv or {}
    config = (kv.get("spec") or {}).get("configuration") or {}
    if MIGRATION_STALL_DETECTION not in ((config.get("developerConfiguration") or {}).get(
            "featureGates") or []):
        return False
    observed = ((kv.get("status") or {}).get("observedKubeVirtVersion") or "").lstrip("v")
    try:
        major, minor = (int(part) for part in observed.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (1, 9)


# -- storage (domain.storage) ---------------------------------------------------------------


def _claim_of(volume: JSON) -> tuple[str | None, bool]:
    """(claim name, whether it is a DataVolume) of a VM/VMI volume."""
    if volume.get("persistentVolumeClaim"):
        return volume["persistentVolumeClaim"].get("claimName"), False
    if volume.get("dataVolume"):
        return volume["dataVolume"].get("name"), True
    return None, False


def _volume_refusal(volume: JSON, disks: dict[str, JSON], filesystems: set[str],
                    hotplugged: set[str]) -> str | None:
    """Why KubeVirt would not migrate this volume (volume-migration.go
    ValidateVolumesUpdateMigration, and what is no claim at all)."""
    name = volume.get("name", "")
    claim, _ = _claim_of(volume)
    if claim is None:
        return "not a PersistentVolumeClaim or DataVolume"
    disk = disks.get(name) or {}
    if disk.get("shareable"):
        return "a shareable disk cannot be migrated"
    if "lun" in disk:
        return "a LUN disk cannot be migrated"
    if name in filesystems:
        return "a filesystem (virtiofs) volume cannot be migrated"
    if name in hotplugged:
        return "a hotplugged volume cannot be migrated"
    return None


def vm_storage(vm: JSON, vmi: JSON | None) -> StorageView:
    """A VM's volumes as its template has them and as its VMI runs them: a volume the VMI is
    migrating (status.migratedVolumes) still runs on its source claim."""
    meta = vm["metadata"]
    template = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
    vmi = vmi or {}
    vmi_spec, vmi_status = vmi.get("spec") or {}, vmi.get("status") or {}
    in_spec = {v.get("name"): _claim_of(v)[0] for v in vmi_spec.get("volumes") or []}
    running = dict(in_spec)
    migrating = {m.get("volumeName"): (m.get("sourcePVCInfo") or {}).get("claimName")
                 for m in vmi_status.get("migratedVolumes") or []}
    running.update({k: v for k, v in migrating.items() if v})
    devices = (template.get("domain") or {}).get("devices") or {}
    disks = {d.get("name"): d for d in devices.get("disks") or []}
    filesystems = {f.get("name") for f in devices.get("filesystems") or []}
    hotplugged = {s.get("name") for s in vmi_status.get("volumeStatus") or []
                  if s.get("hotplugVolume") is not None}
    volumes = []
    for v in template.get("volumes") or []:
        claim, dv = _claim_of(v)
        volumes.append(StorageVolume(
            name=v.get("name", ""), claim=claim,
            running_claim=running.get(v.get("name")) if vmi else None, data_volume=dv,
            vmi_claim=in_spec.get(v.get("name")) if vmi else None,
            refused=_volume_refusal(v, disks, filesystems, hotplugged)))
    vmi_conditions = {c.get("type"): c for c in vmi_status.get("conditions") or []}
    vm_conditions = {c.get("type"): c for c in (vm.get("status") or {}).get("conditions") or []}
    named = {_claim_of(v)[0] for v in vmi_spec.get("volumes") or []}
    named |= {(m.get(side) or {}).get("claimName") for m in vmi_status.get("migratedVolumes")
              or [] for side in ("sourcePVCInfo", "destinationPVCInfo")}
    named |= {(t.get("metadata") or {}).get("name")
              for t in (vm.get("spec") or {}).get("dataVolumeTemplates") or []}
    change = vmi_conditions.get("VolumesChange")
    storage = vmi_conditions.get("StorageLiveMigratable")
    restart = vm_conditions.get("RestartRequired")
    recovery = vm_conditions.get("ManualRecoveryRequired")
    return StorageView(
        namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""),
        volumes=tuple(volumes),
        running=bool(vmi) and vmi_status.get("phase") == "Running",
        migrating_volumes=bool(vmi_status.get("migratedVolumes")),
        volumes_change=None if change is None else change.get("status") == "True",
        volumes_change_message=(change or {}).get("message"),
        storage_migratable=storage is None or storage.get("status") == "True",
        storage_message=(storage or {}).get("message"),
        restart_required=(restart or {}).get("message") if restart and restart.get(
            "status") == "True" else None,
        manual_recovery=((recovery or {}).get("reason") or "ManualRecoveryRequired")
        if recovery and recovery.get("status") == "True" else None,
        vmi_ended=bool(vmi) and (bool(vmi.get("metadata", {}).get("deletionTimestamp"))
                                 or vmi_status.get("phase") in ("Succeeded", "Failed")),
        named=frozenset(c for c in named if c),
    )


def _pinned_node(pv: JSON | None) -> str | None:
    """The node a PV's required nodeAffinity pins it to (local volumes), if one."""
    terms = ((((pv or {}).get("spec") or {}).get("nodeAffinity") or {}).get("required")
             or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == "kubernetes.io/hostname" and expr.get("operator") == "In" \
                    and len(expr.get("values") or []) == 1:
                return expr["values"][0]
    return None


def claim_info(pvc: JSON, pv: JSON | None) -> ClaimInfo:
    meta, spec, status = pvc["metadata"], pvc.get("spec") or {}, pvc.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    request = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    return ClaimInfo(
        namespace=meta["namespace"], name=meta["name"],
        storage_class=spec.get("storageClassName"),
        size=parse_quantity(request) if request else 0.0,
        access_modes=tuple(spec.get("accessModes") or ("ReadWriteOnce",)),
        volume_mode=spec.get("volumeMode") or "Filesystem",
        phase=status.get("phase") or "Pending", node=_pinned_node(pv),
        source_claim=annotations.get(SOURCE_CLAIM_LABEL) or labels.get(SOURCE_CLAIM_LABEL),
        moved_by=annotations.get(MOVED_BY_LABEL) or labels.get(MOVED_BY_LABEL),
        vm=annotations.get(VM_LABEL) or labels.get(VM_LABEL),
        uid=meta.get("uid", ""), created=parse_time(annotations.get(STARTED_ANNOTATION)
                                                    or meta.get("creationTimestamp")),
        terminating=bool(meta.get("deletionTimestamp")),
        owner_uid=annotations.get(OWNER_UID_ANNOTATION) or labels.get(OWNER_UID_ANNOTATION)
        or "", source_uid=annotations.get(SOURCE_UID_ANNOTATION) or "",
        completed=COMPLETED_ANNOTATION in annotations,
        abandoned=ABANDONED_ANNOTATION in annotations,
        source_claims=annotations.get(SOURCE_CLAIMS_ANNOTATION),
        vm_uid=annotations.get(VM_UID_ANNOTATION) or "")


# What else may refer to a claim (k8s.storage checks them right before deleting one): the claim
# names each object names, in its own namespace.


def data_volume_claims(dv: JSON) -> list[str]:
    """A CDI DataVolume owns the claim of its own name, and a clone reads its
    spec.source.pvc."""
    source = ((dv.get("spec") or {}).get("source") or {}).get("pvc") or {}
    same_ns = source.get("namespace") in (None, dv["metadata"].get("namespace"))
    return [dv["metadata"]["name"], *([source["name"]] if source.get("name") and same_ns
                                      else [])]


def volume_snapshot_claims(snapshot: JSON) -> list[str]:
    """A CSI VolumeSnapshot of a claim (spec.source.persistentVolumeClaimName)."""
    name = ((snapshot.get("spec") or {}).get("source") or {}).get("persistentVolumeClaimName")
    return [name] if name else []


def vm_snapshot_content_claims(content: JSON) -> list[str]:
    """A KubeVirt VirtualMachineSnapshotContent: the claims it backs up
    (spec.volumeBackups[].persistentVolumeClaim)."""
    return [n for b in (content.get("spec") or {}).get("volumeBackups") or []
            if (n := ((b.get("persistentVolumeClaim") or {}).get("metadata") or {}).get("name"))]


def vm_export_claims(export: JSON) -> list[str]:
    """A KubeVirt VirtualMachineExport of a claim (spec.source, kind PersistentVolumeClaim)."""
    source = (export.get("spec") or {}).get("source") or {}
    return [source["name"]] if source.get("kind") == "PersistentVolumeClaim" and \
        source.get("name") else []


def class_info(sc: JSON) -> ClassInfo:
    annotations = sc["metadata"].get("annotations") or {}
    bandwidth = annotations.get(COPY_BANDWIDTH_ANNOTATION)
    return ClassInfo(name=sc["metadata"]["name"],
                     node_local=annotations.get(NODE_LOCAL_ANNOTATION) == "true",
                     copy_bandwidth=parse_quantity(bandwidth) if bandwidth else None)


def destination_claim(c: NewClaim) -> JSON:
    """A destination claim: at least the source's size, labelled with its source and owner
    (kind and name in moved-by, and the owner's UID; the source's UID and the sourceClaims
    rule its move began under too)."""
    uids = {k: v for k, v in ((OWNER_UID_ANNOTATION, c.owner_uid),
                              (SOURCE_UID_ANNOTATION, c.source_uid),
                              (SOURCE_CLAIMS_ANNOTATION, c.source_claims),
                              (VM_UID_ANNOTATION, c.vm_uid)) if v}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
        "name": c.name, "namespace": c.namespace,
        "labels": {SOURCE_CLAIM_LABEL: label_value(c.source), MOVED_BY_LABEL: label_value(
            c.moved_by), VM_LABEL: label_value(c.vm),
            **({OWNER_UID_ANNOTATION: c.owner_uid} if c.owner_uid else {}),
            "app.kubernetes.io/managed-by": "virtshift"},
        # Label values stop at 63 characters; the full names are kept here.
        "annotations": {SOURCE_CLAIM_LABEL: c.source, MOVED_BY_LABEL: c.moved_by,
                        VM_LABEL: c.vm, **uids, **({STARTED_ANNOTATION: c.started.astimezone(
                            dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")} if c.started else {})}},
        "spec": {"accessModes": list(c.access_modes), "volumeMode": c.volume_mode,
                 "storageClassName": c.storage_class,
                 "resources": {"requests": {"storage": quantity_text(c.size)}}}}


def quantity_text(value: float) -> str:
    """Bytes as a quantity, exactly (rounded up to whole bytes: never smaller)."""
    return str(int(-(-value // 1)))


def workload_update_methods(kv: JSON | None) -> list[str]:
    return list((((kv or {}).get("spec") or {}).get("workloadUpdateStrategy") or {}).get(
        "workloadUpdateMethods") or [])
