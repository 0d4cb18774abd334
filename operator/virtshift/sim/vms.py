"""The VM controller's run strategies (pkg/virt-controller/watch/vm/vm.go): ``Halted`` stops
the VM (its VMI and launcher pod go), anything else runs it -- a fresh VMI scheduled like any
launcher pod (``launch_selector``: a named CPU model must be usable on the node, host-model
starts anywhere), on the node holding its node-local disks if it has any. A VM with
``ManualRecoveryRequired`` is not started (startVMI). A VM is not stopped while a migration of
it is in flight (the simulator's simplification of KubeVirt's shutdown during migration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtshift.domain.placement import choose_target, launch_selector
from virtshift.k8s import rest
from virtshift.k8s.informer import key_of
from virtshift.k8s.rest import JSON
from virtshift.sim import objects
from virtshift.sim.populate import SimVM, pod_suffix

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

RETRY_START = 10.0  # simulated seconds before a Pending start is tried again


class VMController:
    def _vm_lifecycle(self: KubeVirtSim, now: float) -> None:
        for vm_obj in self.vms.values():
            vm = self.world.vms.get(key_of(vm_obj))
            if vm is None:
                continue
            strategy = (vm_obj.get("spec") or {}).get("runStrategy", "Always")
            if strategy == "Halted" and vm.running:
                if any(f.vm is vm and not f.done for f in self.flights.values()):
                    continue
                self._stop_vm(vm, now)
            elif strategy != "Halted" and not vm.running and vm.start_at is None:
                vm.start_at = now + self.scenario.network.target_pod_startup
            if not vm.running and vm.start_at is not None and now >= vm.start_at:
                if "ManualRecoveryRequired" in vm.vm_conditions:
                    vm.start_at = now + RETRY_START
                    continue
                self._start_vm(vm, now)

    def _stop_vm(self: KubeVirtSim, vm: SimVM, now: float) -> None:
        vm.running, vm.stopped_at, vm.start_at = False, now, None
        vm.migration_uid = None
        ns, name, pod = vm.spec.namespace, vm.spec.name, vm.pod_name

        def write() -> None:
            self.controller.delete(rest.VMIS, name, ns)
            self.kube.delete(rest.PODS, pod, ns, grace_seconds=0)
            self.write_vm_status(vm, run_strategy="Halted")

        self._submit(write)

    def _start_vm(self: KubeVirtSim, vm: SimVM, now: float) -> None:
        local = {sc.name for sc in self.scenario.storage_classes if sc.node_local}
        selector = launch_selector(vm.spec.cpu_model)
        if any(v.storage_class in local for v in vm.spec.volumes):
            selector["kubernetes.io/hostname"] = vm.node  # the PVs' node affinity
        cpu, memory = objects.launcher_requests(vm.spec)
        target = choose_target(self.node_views(), "", cpu, memory, self.usage(), selector)
        if target is None:
            vm.start_at = now + RETRY_START  # Pending pod: try again later
            return
        vm.node, vm.running, vm.start_at = target, True, None
        vm.pod_name = f"virt-launcher-{vm.spec.name}-{pod_suffix(self.rng)}"
        vm.pod_selector = dict(selector)
        vm.vmi_claims = None
        stamp = self.clock.stamp(now)

        def write() -> None:
            vm_obj = self.kube.get(rest.VMS, vm.spec.name, vm.spec.namespace) or {}
            spec = vm.spec.model_copy(update={"node": target})
            body = objects.virtual_machine_instance(spec, vm_obj["metadata"]["uid"])
            body["spec"]["volumes"] = [
                {"name": n, "persistentVolumeClaim": {"claimName": c}}
                for n, c in vm.claims.items()]
            vmi = self.controller.create_or_get(rest.VMIS, body)
            vm.vmi_uid = vmi["metadata"]["uid"]
            pod_body = objects.launcher_pod(vm.spec, vm.vmi_uid, vm.pod_name, target, vm.claims)
            pod_body["spec"]["nodeSelector"] = selector
            pod = self.kube.create(rest.PODS, pod_body)
            vm.pod_uid = pod["metadata"]["uid"]
            vm.conditions.clear()
            self.controller.patch(rest.VMIS, vm.spec.name, {
                "metadata": {"labels": {objects.NODE_NAME_LABEL: target}},
                "status": {"phase": "Running", "nodeName": target,
                           "conditions": self.vmi_conditions(vm),
                           "activePods": {vm.pod_uid: target},
                           "phaseTransitionTimestamps": [
                               {"phase": "Running", "phaseTransitionTimestamp": stamp}]}},
                vm.spec.namespace)
            self.write_vm_status(vm)

        self._submit(write)

    def write_vm_status(self: KubeVirtSim, vm: SimVM, run_strategy: str | None = None) -> None:
        """The VM's status: run state, the VMI's conditions it copies (syncConditions), its
        own (RestartRequired, ManualRecoveryRequired) and the volume update state."""
        vm_obj = self.vms.get(vm.key) or {}
        strategy = run_strategy or (vm_obj.get("spec") or {}).get("runStrategy", "Always")
        status: JSON = objects.vm_status(ready=vm.running, run_strategy=strategy)["status"]
        conditions = list(vm.vm_conditions.values())
        if vm.volume_change is not None and vm.volume_change.get("status") == "True":
            conditions.append({"type": "VolumesChange", "lastProbeTime": None,
                               "lastTransitionTime": self.clock.stamp(), **vm.volume_change})
        status["conditions"] = conditions or None
        status["volumeUpdateState"] = {"volumeMigrationState": {
            "migratedVolumes": vm.volume_migration_state}} \
            if vm.volume_migration_state is not None else None
        self._submit(lambda: self.kube.patch(rest.VMS, vm.spec.name, {"status": status},
                                             vm.spec.namespace, subresource="status"))
