"""The VM controller's run strategies and live updates (pkg/virt-controller/watch/vm/vm.go).

- ``syncRunStrategy``: the strategy as ``VirtualMachine.RunStrategy`` resolves it (the
  deprecated ``spec.running`` true is Always, false or neither Halted). ``Halted`` stops the VM
  (its VMI and launcher pod go). With no VMI, ``Always`` and ``Once`` start one;
  ``RerunOnFailure`` only when its status still shows another strategy (it was just switched:
  ``shouldStartRerunOnFailure``); ``Manual`` never by itself (only virt-api's start
  subresource starts it, which the simulator does not serve). A strategy changed while the VMI
  exists stops nothing. A VM with ``ManualRecoveryRequired`` is not started (startVMI). A VM is
  not stopped while a migration of it is in flight (the simulator's simplification of
  KubeVirt's shutdown during migration).
- ``startVMI``/``SetupVMIFromVM``: the new VMI's spec is the template's (nodeSelector and
  affinity included), and its launcher pod's node selector is the VMI's plus KubeVirt's
  (``launch_selector``: a named CPU model must be usable on the node, host-model starts
  anywhere; services/nodeselectorrenderer.go), its affinity the VMI's; on the node holding its
  node-local disks if it has any. The scheduler (``Kubelet``) binds it where it fits, or
  leaves it Pending with ``PodScheduled=False`` (Unschedulable), and the VMI stays
  ``Scheduling`` with that condition copied (watch/vmi/lifecycle.go) until it binds.
- ``handleAffinityChangeRequest`` (vmRolloutStrategy ``LiveUpdate``, KubeVirt's default): a
  template nodeSelector or affinity that differs from the running VMI's is copied onto the VMI
  (VMNodeSelectorPatch, VMIAffinityPatch), which restarts and migrates nothing. Under
  ``Stage`` the change is not live-updatable: the VM gets ``RestartRequired``
  (syncRestartRequired), gone when the template matches the VMI again or it restarts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtshift.domain.placement import launch_selector
from virtshift.k8s import rest
from virtshift.k8s.informer import key_of
from virtshift.k8s.rest import JSON
from virtshift.sim import objects
from virtshift.sim.populate import SimVM, pod_suffix

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

RETRY_START = 10.0  # simulated seconds before a Pending start is tried again
RESTART_REQUIRED_MESSAGE = "a non-live-updatable field was changed in the template spec"


def resolved_strategy(spec: JSON) -> str:
    """VirtualMachine.RunStrategy (staging/src/kubevirt.io/api/core/v1/types.go)."""
    if spec.get("running") is not None:
        return "Always" if spec["running"] else "Halted"
    return spec.get("runStrategy") or "Halted"


def template_placement(vm_obj: JSON) -> tuple[dict[str, str], JSON | None]:
    """The nodeSelector and affinity a VMI started now gets from its VM's template."""
    spec = ((vm_obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return dict(spec.get("nodeSelector") or {}), spec.get("affinity") or None


class VMController:
    def _vm_lifecycle(self: KubeVirtSim, now: float) -> None:
        for vm_obj in self.vms.values():
            vm = self.world.vms.get(key_of(vm_obj))
            if vm is None:
                continue
            strategy = resolved_strategy(vm_obj.get("spec") or {})
            if strategy == "Halted" and (vm.running or vm.scheduling):
                if any(f.vm is vm and not f.done for f in self.flights.values()):
                    continue
                self._stop_vm(vm, now)
            elif not (vm.running or vm.scheduling) and vm.start_at is None and \
                    self._starts(vm, strategy):
                vm.start_at = now + self.scenario.network.target_pod_startup
            if strategy != vm.status_strategy:
                self.write_vm_status(vm)  # the sync ends with the VM's status
            if not vm.running and vm.start_at is not None and now >= vm.start_at:
                if "ManualRecoveryRequired" in vm.vm_conditions:
                    vm.start_at = now + RETRY_START
                    continue
                self._start_vm(vm, vm_obj, now)
            elif vm.running and vm_obj["metadata"].get("resourceVersion") != vm.synced_version \
                    and self._live_update(vm, vm_obj):
                vm.synced_version = vm_obj["metadata"].get("resourceVersion")

    @staticmethod
    def _starts(vm: SimVM, strategy: str) -> bool:
        """syncRunStrategy with no VMI: whether this strategy starts one."""
        if strategy in ("Always", "Once"):
            return True
        return strategy == "RerunOnFailure" and vm.status_strategy != strategy

    def _stop_vm(self: KubeVirtSim, vm: SimVM, now: float) -> None:
        vm.running, vm.scheduling, vm.stopped_at, vm.start_at = False, False, now, None
        vm.migration_uid = None
        ns, name, pod = vm.spec.namespace, vm.spec.name, vm.pod_name

        def write() -> None:
            self.controller.delete(rest.VMIS, name, ns)
            self.kube.delete(rest.PODS, pod, ns, grace_seconds=0)
            self.write_vm_status(vm, run_strategy="Halted")

        self._submit(write)

    def _start_vm(self: KubeVirtSim, vm: SimVM, vm_obj: JSON, now: float) -> None:
        """startVMI, then the scheduler: a VMI Scheduling whose pod waits for a node (tried
        again every RETRY_START, as the scheduler retries), or bound and Running."""
        if not vm.scheduling:
            vm.vmi_node_selector, vm.vmi_affinity = template_placement(vm_obj)
        selector = {**launch_selector(vm.spec.cpu_model), **vm.vmi_node_selector}
        local = {sc.name for sc in self.scenario.storage_classes if sc.node_local}
        if any(v.storage_class in local for v in vm.spec.volumes):
            selector["kubernetes.io/hostname"] = vm.node  # the PVs' node affinity
        cpu, memory = objects.launcher_requests(vm.spec)
        if vm.scheduling and vm.pod_uid is None:
            vm.start_at = now + RETRY_START  # its pod is still being created
            return
        target, why = self.place_pod(cpu, memory, selector, vm.vmi_affinity)
        vm.start_at = None if target else now + RETRY_START
        if target is None and vm.scheduling:
            return  # still Pending
        stamp = self.clock.stamp(now)
        if target is None:
            vm.scheduling, vm.pod_uid = True, None
            vm.pod_name = f"virt-launcher-{vm.spec.name}-{pod_suffix(self.rng)}"
            self._submit(lambda: self._create_vmi(vm, vm_obj, None, selector, stamp, why))
            return
        fresh = not vm.scheduling
        if fresh:
            vm.pod_name = f"virt-launcher-{vm.spec.name}-{pod_suffix(self.rng)}"
        vm.node, vm.running, vm.scheduling, vm.synced_version = target, True, False, None
        if vm.vm_conditions.get("RestartRequired", {}).get("message") == \
                RESTART_REQUIRED_MESSAGE:
            vm.vm_conditions.pop("RestartRequired")  # startVMI: cleanupRestartRequired
        vm.pod_selector = dict(selector)
        vm.vmi_claims = None

        def write() -> None:
            if fresh:
                self._create_vmi(vm, vm_obj, target, selector, stamp, None)
            else:  # pods/binding, as the scheduler binds a pod that waited
                self.kube.create(rest.PODS, {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": vm.pod_name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": target}},
                    namespace=vm.spec.namespace, name=vm.pod_name, subresource="binding")
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

    def _create_vmi(self: KubeVirtSim, vm: SimVM, vm_obj: JSON, node: str | None,
                    selector: dict[str, str], stamp: str, unschedulable: str | None) -> None:
        """The VMI (SetupVMIFromVM) and its launcher pod: bound to ``node``, or Pending with
        the scheduler's PodScheduled=False, which the VMI, Scheduling, carries too."""
        spec = vm.spec.model_copy(update={"node": node or vm.node})
        body = objects.virtual_machine_instance(spec, (vm_obj.get("metadata") or {}).get(
            "uid", ""))
        body["spec"]["volumes"] = [{"name": n, "persistentVolumeClaim": {"claimName": c}}
                                   for n, c in vm.claims.items()]
        if vm.vmi_node_selector:
            body["spec"]["nodeSelector"] = dict(vm.vmi_node_selector)
        if vm.vmi_affinity:
            body["spec"]["affinity"] = vm.vmi_affinity
        if node is None:
            body["metadata"]["labels"].pop(objects.NODE_NAME_LABEL, None)
        vmi = self.controller.create_or_get(rest.VMIS, body)
        vm.vmi_uid = vmi["metadata"]["uid"]
        pod_body = objects.launcher_pod(vm.spec, vm.vmi_uid, vm.pod_name, node, vm.claims)
        pod_body["spec"]["nodeSelector"] = selector
        if vm.vmi_affinity:
            pod_body["spec"]["affinity"] = vm.vmi_affinity
        pod = self.kube.create(rest.PODS, pod_body)
        vm.pod_uid = pod["metadata"]["uid"]
        if node is not None:
            return
        scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": unschedulable, "lastTransitionTime": stamp}
        self.kube.patch(rest.PODS, vm.pod_name, {"status": {
            "phase": "Pending", "conditions": [scheduled]}}, vm.spec.namespace,
            subresource="status")
        self.controller.patch(rest.VMIS, vm.spec.name, {"status": {
            "phase": "Scheduling", "conditions": [{**scheduled, "lastProbeTime": None}],
            "phaseTransitionTimestamps": [
                {"phase": "Scheduling", "phaseTransitionTimestamp": stamp}]}},
            vm.spec.namespace)

    def _live_update(self: KubeVirtSim, vm: SimVM, vm_obj: JSON) -> bool:
        """handleAffinityChangeRequest (LiveUpdate) or RestartRequired (Stage); False when
        it must be tried again (a migration is in flight)."""
        selector, affinity = template_placement(vm_obj)
        differs = (selector, affinity) != (vm.vmi_node_selector, vm.vmi_affinity)
        stage = (self.kubevirt_spec().get("configuration") or {}).get(
            "vmRolloutStrategy") == "Stage"
        if stage:
            has = "RestartRequired" in vm.vm_conditions
            if differs and not has:
                vm.vm_conditions["RestartRequired"] = {
                    "type": "RestartRequired", "status": "True",
                    "message": RESTART_REQUIRED_MESSAGE,
                    "lastTransitionTime": self.clock.stamp(), "lastProbeTime": None}
                self.write_vm_status(vm)
            elif not differs and has and vm.vm_conditions["RestartRequired"].get(
                    "message") == RESTART_REQUIRED_MESSAGE:
                vm.vm_conditions.pop("RestartRequired")
                self.write_vm_status(vm)
            return True
        if not differs:
            return True
        if any(f.vm is vm and not f.done for f in self.flights.values()):
            return False  # "Node affinity should not be changed during VMI migration"
        gone = {k: None for k in vm.vmi_node_selector if k not in selector}
        vm.vmi_node_selector, vm.vmi_affinity = selector, affinity
        patch: dict[str, Any] = {"nodeSelector": {**gone, **selector} or None}
        self._submit(lambda: self.controller.patch(rest.VMIS, vm.spec.name, {
            "spec": {**patch, "affinity": None}}, vm.spec.namespace))
        if affinity:
            self._submit(lambda: self.controller.patch(rest.VMIS, vm.spec.name, {
                "spec": {"affinity": affinity}}, vm.spec.namespace))
        return True

    def write_vm_status(self: KubeVirtSim, vm: SimVM, run_strategy: str | None = None) -> None:
        """The VM's status: run state, the VMI's conditions it copies (syncConditions), its
        own (RestartRequired, ManualRecoveryRequired) and the volume update state."""
        vm_obj = self.vms.get(vm.key) or {}
        strategy = run_strategy or resolved_strategy(vm_obj.get("spec") or {})
        vm.status_strategy = strategy
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
