"""Volume migration: the VM controller's volume updates and the workload updater.

- pkg/virt-controller/watch/vm/vm.go ``handleVolumeUpdateRequest`` with
  watch/volume-migration/volume-migration.go: a VM with ``updateVolumesStrategy: Migration``
  whose volumes point at other claims than its VMI's starts a volume migration -- the VMI's
  ``status.migratedVolumes`` and ``spec.volumes`` and the VM's
  ``status.volumeUpdateState.volumeMigrationState`` are written, and the VMI gets
  ``VolumesChange=True`` ("migrate volumes", vmi/storage.go). Refused as KubeVirt refuses it:
  a missing destination claim (1.9: VolumesChange=False "One of the destination volumes
  doesn't exist"), ``StorageLiveMigratable`` False or an RWO volume left behind (VM
  ``RestartRequired`` with KubeVirt's message).
- ``VolumeMigrationCancel``: reverting the VM's volumes to the source claims cancels it
  (VolumesChange=False, VolumesChangeCancellation); the workload updater deletes the
  unfinished migration.
- ``syncVolumeMigration``: the VMI gone or final mid-migration leaves the VM
  ``ManualRecoveryRequired`` until its volumes are reverted.
- pkg/virt-controller/watch/workload-updater/workload-updater.go: only with ``LiveMigrate``
  in the KubeVirt CR's ``workloadUpdateStrategy.workloadUpdateMethods``, a VMIM
  ``kubevirt-workload-update-*`` (label ``kubevirt.io/volume-update-migration``,
  ``priority: user-triggered`` with the priority queue) per VMI in VolumesChange, within
  ``parallelMigrationsPerCluster``, at its ``sync`` -- due ``defaultThrottleInterval`` (5 s)
  after the VMI or migration update that enqueued it -- and never for a VMI that has an
  unfinished migration of anyone's (``ListUnfinishedMigrations``). A failed one is retried
  (with the migration controller's backoff); nothing is reverted automatically.
- migration-target.go ``finalizeMigration``: on success the VMI drops VolumesChange and
  ``migratedVolumes``; the VM's volumeMigrationState stays until the next update.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from virtshift.k8s import rest
from virtshift.k8s.informer import key_of
from virtshift.k8s.rest import JSON, ApiError
from virtshift.sim import objects
from virtshift.sim.flight import (
    FINAL,
    IN_FLIGHT,
    VOLUME_UPDATE_LABEL,
    WORKLOAD_UPDATE_ANNOTATION,
    Flight,
)
from virtshift.sim.populate import SimVM

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

log = logging.getLogger(__name__)
WORKLOAD_UPDATE_THROTTLE = 5.0  # workload-updater.go defaultThrottleInterval
MANUAL_RECOVERY_REASON = "VMI was removed or was final during the volume migration"


def _template_claims(vm_obj: JSON) -> dict[str, str]:
    out = {}
    for v in ((vm_obj.get("spec") or {}).get("template") or {}).get("spec", {}).get(
            "volumes") or []:
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName") or \
            (v.get("dataVolume") or {}).get("name")
        if claim:
            out[v["name"]] = claim
    return out


class VolumeMigration:
    def _volume_updates(self: KubeVirtSim, now: float) -> None:
        for vm_obj in self.vms.values():
            vm = self.world.vms.get(key_of(vm_obj))
            if vm is None:
                continue
            spec = vm_obj.get("spec") or {}
            wanted = _template_claims(vm_obj)
            strategy = spec.get("updateVolumesStrategy")
            if not vm.running:
                self._manual_recovery(vm, wanted, strategy)
                continue
            if vm.migrated_volumes is not None:
                sources = {m["volumeName"]: m["sourcePVCInfo"]["claimName"]
                           for m in vm.migrated_volumes}
                if all(wanted.get(n) == c for n, c in sources.items()):
                    self._cancel_volume_migration(vm)
                continue
            if strategy != "Migration":
                continue
            changed = {n: c for n, c in wanted.items() if n in vm.claims and vm.claims[n] != c}
            if not changed or vm.refused_update == changed:
                continue
            refusal = self._refuse_volume_update(vm, changed)
            vm.refused_update = changed if refusal else None
            if refusal is None:
                self._start_volume_migration(vm, changed, now)

    def _refuse_volume_update(self: KubeVirtSim, vm: SimVM, changed: dict[str, str]
                              ) -> str | None:
        """ValidateVolumes (filesystems, shareable disks and LUNs refused with RestartRequired
        "invalid volumes to update with migration: ..."; hotplugged volumes allowed; from 1.9
        a missing destination claim) and ValidateVolumesUpdateMigration, with KubeVirt's
        messages."""
        ns = vm.spec.namespace
        invalid: dict[str, list[str]] = {}
        specs = {v.name: v for v in vm.spec.volumes}
        for name, claim in changed.items():  # the VM's volumes, in order
            v = specs.get(name)
            kind = None if v is None else "filesystems" if v.filesystem else \
                "shareable" if v.shareable else "luns" if v.lun else None
            if kind:
                invalid.setdefault(kind, []).append(name)
                continue
            if self.version == "1.9" and self.pvcs.get(f"{ns}/{claim}") is None:
                vm.volume_change = {"status": "False", "message": "One of the destination "
                                    f"volumes doesn't exist: the pvc {claim} doesn't exist"}
                self.touch_vmi(vm)
                return "missing"
        if invalid:  # invalidVols.errorMessage; vm.go handleValidationErrors
            return self._restart_required(vm, "invalid volumes to update with migration:" + "".join(
                f" {kind}: [{' '.join(invalid[kind])}]"
                for kind in ("filesystems", "shareable", "luns") if kind in invalid))
        blocker = self.blocker(vm)
        if blocker and blocker[0] != "DisksNotLiveMigratable":
            return self._restart_required(vm, "cannot migrate the volumes as the VMI isn't "
                                          f"migratable: {blocker[1]}")
        shared = self.shared_classes()
        for v in vm.spec.volumes:
            if v.name not in changed and not shared[v.storage_class]:
                return self._restart_required(vm, f"cannot migrate the VM. The volume {v.name} "
                                              "is RWO and not included in the migration "
                                              "volumes")
        return None

    def _restart_required(self: KubeVirtSim, vm: SimVM, message: str) -> str:
        vm.vm_conditions["RestartRequired"] = {
            "type": "RestartRequired", "status": "True", "message": message,
            "lastProbeTime": None, "lastTransitionTime": self.clock.stamp()}
        self.write_vm_status(vm)
        return message

    def _start_volume_migration(self: KubeVirtSim, vm: SimVM, changed: dict[str, str],
                                now: float) -> None:
        sizes = {v.name: v for v in vm.spec.volumes}
        classes = {sc.name: sc for sc in self.scenario.storage_classes}
        migrated = []
        for name, claim in sorted(changed.items()):
            size = objects.quantity(sizes[name].size)
            src_mode = classes[sizes[name].storage_class].access_mode
            pvc = self.pvcs.get(f"{vm.spec.namespace}/{claim}") or {}
            dst_class = (pvc.get("spec") or {}).get("storageClassName")
            if dst_class in classes:
                vm.volume_classes[name] = dst_class
            migrated.append({
                "volumeName": name,
                "sourcePVCInfo": {"claimName": vm.claims[name], "accessModes": [src_mode],
                                  "volumeMode": "Filesystem",
                                  "requests": {"storage": size}, "capacity": {"storage": size}},
                "destinationPVCInfo": {"claimName": claim}})
        vm.migrated_volumes = migrated
        vm.vmi_claims = {**vm.claims, **changed}
        vm.volume_change = {"status": "True", "message": "migrate volumes",
                            "lastTransitionTime": self.clock.stamp(now)}
        vm.volume_migration_state = migrated
        vm.vm_conditions.pop("RestartRequired", None)
        self.touch_vmi(vm)
        self.workload_update_enqueue(now)  # updateVmi: VolumesChange=True, not migrating
        self.write_vm_status(vm)

    def _cancel_volume_migration(self: KubeVirtSim, vm: SimVM) -> None:
        """VolumeMigrationCancel; the workload updater's shouldAbortMigration deletes the
        unfinished migration (before the target's domain is ready)."""
        vm.vmi_claims = dict(vm.claims)
        vm.migrated_volumes = None
        vm.volume_classes = {}
        vm.volume_change = {"status": "False", "reason": "VolumesChangeCancellation"}
        vm.volume_migration_state = None
        self.touch_vmi(vm)
        self.write_vm_status(vm)
        for f in list(self.flights.values()):
            if f.vm is vm and not f.done and WORKLOAD_UPDATE_ANNOTATION in f.annotations:
                ns, name = f.key.split("/", 1)
                self._submit(lambda n=name, s=ns: self.controller.delete(rest.VMIMS, n, s))

    def _manual_recovery(self: KubeVirtSim, vm: SimVM, wanted: dict[str, str],
                         strategy: str | None) -> None:
        if vm.volume_migration_state is None:
            return
        sources = {m["volumeName"]: m["sourcePVCInfo"]["claimName"]
                   for m in vm.volume_migration_state}
        reverted = all(wanted.get(n) == c for n, c in sources.items())
        needed = not reverted and strategy == "Migration"
        has = "ManualRecoveryRequired" in vm.vm_conditions
        if needed and not has:
            vm.vm_conditions["ManualRecoveryRequired"] = {
                "type": "ManualRecoveryRequired", "status": "True",
                "reason": MANUAL_RECOVERY_REASON, "lastProbeTime": None,
                "lastTransitionTime": self.clock.stamp()}
            self.write_vm_status(vm)
        elif not needed:
            vm.vm_conditions.pop("ManualRecoveryRequired", None)
            vm.volume_migration_state = None
            vm.migrated_volumes = None
            vm.volume_change = None
            vm.vmi_claims = None
            self.write_vm_status(vm)

    def finish_volume_update(self: KubeVirtSim, vm: SimVM, flight: Flight) -> None:
        """finalizeMigration/removeMigratedVolumes: the domain now runs on the new claims."""
        claims = dict(vm.vmi_claims or vm.claims)
        vm.claims = claims
        vm.spec = vm.spec.model_copy(update={"volumes": [
            v.model_copy(update={"claim_name": claims.get(v.name, v.claim_name),
                                 "storage_class": vm.volume_classes.get(v.name,
                                                                        v.storage_class)})
            for v in vm.spec.volumes]})
        vm.migrated_volumes = None
        vm.volume_change = None
        vm.volume_classes = {}
        vm.vmi_claims = claims  # written once more, then as is
        self.write_vm_status(vm)

    # -- the workload updater ------------------------------------------------------------------

    def workload_update_enqueue(self: KubeVirtSim, now: float) -> None:
        """``queue.AddAfter(key, defaultThrottleInterval)``: the delaying queue keeps the
        earliest time a key is due."""
        due = now + WORKLOAD_UPDATE_THROTTLE
        if self.workload_update_due is None or due < self.workload_update_due:
            self.workload_update_due = due

    def _unfinished_migration_vmis(self: KubeVirtSim) -> set[str]:
        """``ListUnfinishedMigrations``, looked up by namespace/vmiName: every VMIM not final,
        whoever created it (read from the informer, so one created since the last tick
        counts)."""
        out = set()
        for obj in self.vmims.values():
            flight = self.flights.get(obj["metadata"]["uid"])
            phase = flight.phase if flight else (obj.get("status") or {}).get("phase")
            if phase not in FINAL:
                out.add(f"{obj['metadata']['namespace']}/{(obj.get('spec') or {}).get('vmiName')}")
        return out

    def _workload_updates(self: KubeVirtSim, now: float) -> None:
        """One ``sync`` when the queue's key is due (5 s after the VMI or migration update
        that enqueued it); it enqueues itself at once again while work is left
        (``periodicReEnqueueIntervalSeconds`` is 30 as a time.Duration: 30 ns)."""
        if self._vmim_events:
            self._vmim_events = False
            self.workload_update_enqueue(now)
        if self.workload_update_due is None or now < self.workload_update_due:
            return
        self.workload_update_due = None
        methods = (self.kubevirt_spec().get("workloadUpdateStrategy") or {}).get(
            "workloadUpdateMethods") or []
        if "LiveMigrate" not in methods:
            return  # no automated workload update: nothing says so (as in KubeVirt)
        unfinished = self._unfinished_migration_vmis() | {
            f.vm.key for f in self.flights.values() if not f.done and f.vm}
        waiting = [vm for vm in self.world.vms.values()
                   if vm.running and vm.migrated_volumes is not None
                   and vm.volume_change and vm.volume_change.get("status") == "True"
                   and vm.key not in unfinished]
        if not waiting:
            return
        self.workload_update_due = now
        cluster_limit, _ = self.limits()
        running = sum(1 for f in self.flights.values() if f.phase in IN_FLIGHT)
        for vm in sorted(waiting, key=lambda v: v.key)[:max(cluster_limit - running, 0)]:
            self._create_workload_update(vm, now)

    def _create_workload_update(self: KubeVirtSim, vm: SimVM, now: float) -> None:
        spec: dict[str, Any] = {"vmiName": vm.spec.name}
        if self.priority_queue:
            spec["priority"] = "user-triggered"
        label = vm.spec.name if len(vm.spec.name) <= 63 else vm.vmi_uid
        body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"generateName": "kubevirt-workload-update-",
                             "namespace": vm.spec.namespace,
                             "annotations": {WORKLOAD_UPDATE_ANNOTATION: ""},
                             "labels": {VOLUME_UPDATE_LABEL: label}},
                "spec": spec}
        try:
            created = self.controller.create(rest.VMIMS, body)
        except ApiError as exc:
            log.warning("workload update migration of %s not created: %s", vm.key, exc)
            return
        self.vmims.put(created)
        self._register(created, now)  # made by this sync (the create's round trip is not time)
