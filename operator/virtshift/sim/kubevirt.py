"""The simulated virt-controller and virt-handler: drive every VirtualMachineInstanceMigration.

A tick loop over in-memory state fed by watches. Each migration walks KubeVirt's phases
(Pending, Scheduling, Scheduled, PreparingTarget, TargetReady, Running, Succeeded/Failed) with
``phaseTransitionTimestamps``, the VMI's ``status.migrationState`` and, on success, its
``status.nodeName``. Queueing honours KubeVirt's own limits; memory transfer follows the pre-copy
model in ``virtshift.domain.physics`` with NIC bandwidth shared among concurrent migrations.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.units import GiB, parse_quantity
from virtshift.domain.physics import Mode, PreCopyRun
from virtshift.domain.placement import NodeView, choose_target, required_cpu_label
from virtshift.k8s import rest
from virtshift.k8s.informer import Informer, key_of
from virtshift.k8s.rest import JSON, ApiError, KubeClient
from virtshift.sim import objects
from virtshift.sim.clock import SimClock
from virtshift.sim.populate import SimVM, World, pod_suffix, running_pod_status

log = logging.getLogger(__name__)

FINALIZER = "kubevirt.io/migrationJobFinalize"
DOWNTIME_ANNOTATION = "sim.virtshift.io/downtime-ms"
PRIORITY_ORDER = {"system-critical": 0, "user-triggered": 1, "system-maintenance": 2}
IN_FLIGHT = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
FINAL = ("Succeeded", "Failed")
UNSCHEDULABLE_TIMEOUT = 300.0  # KubeVirt's unschedulable target pod timeout, seconds
VOLUME_RETRY_BASE, VOLUME_RETRY_MAX = 20.0, 300.0  # retry a failed volume migration after 20s,
# doubling up to 5 min (simulated seconds), instead of at once on every tick


@dataclass
class Config:
    """The migration configuration in force for one migration (KubeVirt CR + policy)."""

    bandwidth: float = 0.0  # bytes/s, 0 = unlimited
    completion_timeout_per_gib: float = 150
    progress_timeout: float = 150
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    max_downtime: float = 0.3
    policy: str | None = None

    def wire(self) -> JSON:
        out: JSON = {"allowAutoConverge": self.allow_auto_converge,
                     "allowPostCopy": self.allow_post_copy,
                     "completionTimeoutPerGiB": int(self.completion_timeout_per_gib),
                     "progressTimeout": int(self.progress_timeout)}
        if self.bandwidth:
            out["bandwidthPerMigration"] = objects.quantity(self.bandwidth)
        return out


@dataclass
class Flight:
    """One VMIM as virt-controller and virt-handler track it."""

    key: str
    uid: str
    name: str
    vm: SimVM
    created: float
    priority: int
    selector: dict[str, str]
    phase: str = "Pending"
    phase_since: float = 0.0
    transitions: list[JSON] = field(default_factory=list)
    source: str = ""
    target: str | None = None
    target_pod: str | None = None
    target_pod_uid: str | None = None
    attempt: int = 0
    config: Config = field(default_factory=Config)
    run: PreCopyRun | None = None
    disk_bytes_left: float = 0.0
    copy_bandwidth: float = 0.0
    new_claims: dict[str, str] | None = None
    new_classes: dict[str, str] = field(default_factory=dict)  # volume -> destination class
    old_claims: dict[str, str] = field(default_factory=dict)  # volume -> source claim
    started_at: float | None = None
    ended_at: float | None = None
    failure: str | None = None
    aborted: bool = False
    waited: bool = False  # no node fitted the target pod at first: scheduled when one did
    progressed_to: float | None = None  # simulated time the transfer has been advanced to
    downtime_ms: int | None = None
    dirty: bool = True  # status needs writing

    @property
    def done(self) -> bool:
        return self.phase in FINAL


class KubeVirtSim:
    def __init__(self, kube: KubeClient, world: World, clock: SimClock,
                 tick_seconds: float = 0.1) -> None:
        self.kube = kube
        self.world = world
        self.scenario = world.scenario
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.rng = random.Random(self.scenario.seed + 1)
        self.flights: dict[str, Flight] = {}  # by VMIM uid
        self.evacuations: dict[str, str] = {}  # VMI key -> node being evacuated
        self.not_ready: set[str] = set()
        self.volume_retry: dict[str, tuple[int, float]] = {}  # VM key -> (failures, not before)
        self.freed_at = 0.0  # when a running migration last ended (and freed a slot)
        self.faults_done: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(16)
        self._wake = threading.Event()
        self._pods_changed = True
        self.vmims = Informer(kube, rest.VMIMS, on_event=self._on_vmim)
        self.nodes = Informer(kube, rest.NODES)
        self.vms = Informer(kube, rest.VMS)
        self.pods = Informer(kube, rest.PODS, on_event=self._on_pod)
        self.policies = Informer(kube, rest.KUBEVIRT_POLICIES)
        self.namespaces = Informer(kube, rest.NAMESPACES)
        self._informers = [self.vmims, self.nodes, self.vms, self.pods, self.policies,
                           self.namespaces]
        self._handled_pods: set[str] = set()
        self.peak = Counter[str]()  # highest concurrent in-flight counts seen (for tests)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeVirtSim:
        for inf in self._informers:
            inf.start()
        for inf in self._informers:
            inf.wait_synced()
        self._thread = threading.Thread(target=self._loop, name="kubevirt-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for inf in self._informers:
            inf.stop()
        if hasattr(self, "_thread"):
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _on_vmim(self, kind: str, obj: JSON) -> None:
        # New and deleted migrations are acted on at once, as virt-controller would; our own
        # status writes echo back as MODIFIED and need no wake-up.
        if kind != "MODIFIED" or obj["metadata"].get("deletionTimestamp"):
            self._wake.set()

    def _on_pod(self, kind: str, obj: JSON) -> None:
        self._pods_changed = True

    def _loop(self) -> None:
        last = self.clock.now()
        while not self._stop.is_set():
            started = time.monotonic()
            now = self.clock.now()
            self._wake.clear()
            try:
                with self._lock:
                    self.tick(now, now - last)
            except Exception:
                log.exception("simulator tick failed")
            last = now
            # Short ticks while migrations run, so phases end close to when they are due.
            busy = any(not f.done for f in self.flights.values())
            period = min(self.tick_seconds, 0.02) if busy else self.tick_seconds
            self._wake.wait(max(0.0, period - (time.monotonic() - started)))

    # -- one tick ----------------------------------------------------------------------------

    def tick(self, now: float, dt: float) -> None:
        self._apply_faults(now)
        self._kubelet()
        self._vm_lifecycle(now)
        self._volume_updates(now)
        self._evacuate(now)
        self._sync_vmims(now)
        self._admit(now)
        for flight in list(self.flights.values()):
            if not flight.done:
                self._advance(flight, now)
        self._transfer(now, dt)
        self._write_all()

    # -- settings ----------------------------------------------------------------------------

    def _kubevirt_migrations(self) -> JSON:
        kv = self.kube.get(rest.KUBEVIRTS, "kubevirt", objects.KUBEVIRT_NAMESPACE) \
            if not hasattr(self, "_kv_cache") or time.monotonic() - self._kv_cache[0] > 2 \
            else self._kv_cache[1]
        self._kv_cache = (time.monotonic(), kv)
        return ((kv or {}).get("spec", {}).get("configuration", {}).get("migrations")) or {}

    def _limits(self) -> tuple[int, int]:
        m = self._kubevirt_migrations()
        return (int(m.get("parallelMigrationsPerCluster", 5)),
                int(m.get("parallelOutboundMigrationsPerNode", 2)))

    def _config_for(self, vm: SimVM) -> Config:
        m = self._kubevirt_migrations()
        cfg = Config(
            bandwidth=parse_quantity(m["bandwidthPerMigration"]) if m.get(
                "bandwidthPerMigration") else 0.0,
            completion_timeout_per_gib=float(m.get("completionTimeoutPerGiB", 150)),
            progress_timeout=float(m.get("progressTimeout", 150)),
            allow_auto_converge=bool(m.get("allowAutoConverge", False)),
            allow_post_copy=bool(m.get("allowPostCopy", False)),
            max_downtime=float(m.get("maxDowntimeMs", 300)) / 1000,
        )
        policy = self._matching_policy(vm)
        if policy:
            spec = policy.get("spec", {})
            cfg.policy = policy["metadata"]["name"]
            if spec.get("bandwidthPerMigration") not in (None, 0, "0"):
                cfg.bandwidth = parse_quantity(spec["bandwidthPerMigration"])
            if "completionTimeoutPerGiB" in spec:
                cfg.completion_timeout_per_gib = float(spec["completionTimeoutPerGiB"])
            if "allowAutoConverge" in spec:
                cfg.allow_auto_converge = bool(spec["allowAutoConverge"])
            if "allowPostCopy" in spec:
                cfg.allow_post_copy = bool(spec["allowPostCopy"])
            # KubeVirt hands maxDowntimeMs to QEMU only with stall detection (1.9+, gated).
            if "maxDowntimeMs" in spec and self.scenario.kubevirt.migration_stall_detection:
                cfg.max_downtime = float(spec["maxDowntimeMs"]) / 1000
        return cfg

    def _matching_policy(self, vm: SimVM) -> JSON | None:
        """KubeVirt's rule: the policy matching the most labels (VMI + namespace) wins."""
        vmi_labels = self._vmi_labels(vm)
        ns = self.namespaces.get(vm.spec.namespace) or {}
        ns_labels = ns.get("metadata", {}).get("labels") or {}
        best: tuple[int, str, JSON] | None = None
        for policy in self.policies.values():
            sel = policy.get("spec", {}).get("selectors") or {}
            vmi_sel = sel.get("virtualMachineInstanceSelector") or {}
            ns_sel = sel.get("namespaceSelector") or {}
            if any(vmi_labels.get(k) != v for k, v in vmi_sel.items()):
                continue
            if any(ns_labels.get(k) != v for k, v in ns_sel.items()):
                continue
            weight = len(vmi_sel) + len(ns_sel)
            name = policy["metadata"]["name"]
            if best is None or (-weight, name) < (-best[0], best[1]):
                best = (weight, name, policy)
        return best[2] if best else None

    def _vmi_labels(self, vm: SimVM) -> dict[str, str]:
        vmi = self.kube.get(rest.VMIS, vm.spec.name, vm.spec.namespace) or {}
        return vmi.get("metadata", {}).get("labels") or {}

    # -- nodes -------------------------------------------------------------------------------

    def _node_views(self) -> list[NodeView]:
        views = []
        for n in self.nodes.values():
            alloc = n.get("status", {}).get("allocatable") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in n.get("status", {}).get("conditions") or [])
            views.append(NodeView(
                name=n["metadata"]["name"], labels=n["metadata"].get("labels") or {},
                ready=ready and n["metadata"]["name"] not in self.not_ready,
                schedulable=not n.get("spec", {}).get("unschedulable", False),
                cpu=parse_quantity(alloc.get("cpu", "0")),
                memory=parse_quantity(alloc.get("memory", "0"))))
        return views

    def _usage(self) -> dict[str, tuple[float, float]]:
        used: dict[str, tuple[float, float]] = {}

        def add(node: str, vm: SimVM) -> None:
            c, m = used.get(node, (0.0, 0.0))
            used[node] = (c + vm.spec.cpu, m + vm.spec.memory)

        for vm in self.world.vms.values():
            if vm.running:
                add(vm.node, vm)
        for f in self.flights.values():
            if f.target and f.phase in IN_FLIGHT:
                add(f.target, f.vm)
        return used

    # -- faults ------------------------------------------------------------------------------

    def _apply_faults(self, now: float) -> None:
        for i, fault in enumerate(self.scenario.faults):
            if i in self.faults_done or fault.kind == "failTargetPod" or fault.at > now:
                continue
            self.faults_done.add(i)
            if fault.kind == "nodeNotReady" and fault.node:
                self.not_ready.add(fault.node)
                spec = next(n for n in self.scenario.nodes if n.name == fault.node)
                self._submit(lambda s=spec: self.kube.patch(
                    rest.NODES, s.name, objects.node_status(s, self.clock.stamp(), ready=False),
                    subresource="status"))
                log.info("fault: node %s is NotReady", fault.node)
            elif fault.kind == "dirtyRateSpike" and fault.vm:
                vm = self._vm_by_ref(fault.vm)
                if vm and fault.dirty_rate is not None:
                    vm.dirty_rate = fault.dirty_rate
                    for f in self.flights.values():
                        if f.vm is vm and f.run:
                            f.run.set_dirty_rate(vm.dirty_rate)

    def _vm_by_ref(self, ref: str) -> SimVM | None:
        if "/" in ref:
            return self.world.vms.get(ref)
        return next((v for v in self.world.vms.values() if v.spec.name == ref), None)

    def _fails_target_pod(self, flight: Flight) -> bool:
        return any(
            f.kind == "failTargetPod" and f.vm and self._vm_by_ref(f.vm) is flight.vm
            and (f.attempt is None or f.attempt == flight.attempt)
            for f in self.scenario.faults
        )

    # -- the kubelet's part -------------------------------------------------------------------

    def _kubelet(self) -> None:
        if not self._pods_changed:
            return
        self._pods_changed = False
        sim_nodes = {n.name for n in self.scenario.nodes}
        for pod in self.pods.values():
            meta = pod["metadata"]
            node = pod.get("spec", {}).get("nodeName")
            if node not in sim_nodes:
                continue
            uid = meta["uid"]
            if meta.get("deletionTimestamp"):
                if ("del", uid) not in self._handled_pods:
                    self._handled_pods.add(("del", uid))
                    self._submit(lambda p=pod: self.kube.delete(
                        rest.PODS, p["metadata"]["name"], p["metadata"]["namespace"],
                        grace_seconds=0, uid=p["metadata"]["uid"]))
            elif (pod.get("status") or {}).get("phase") in (None, "Pending") and \
                    ("run", uid) not in self._handled_pods:
                self._handled_pods.add(("run", uid))
                self._submit(lambda p=pod: self.kube.patch(
                    rest.PODS, p["metadata"]["name"], {"status": running_pod_status(
                        self.clock.stamp())}, p["metadata"]["namespace"], subresource="status"))

    # -- VM run strategy (stop and start: quick migration) -------------------------------------

    def _vm_lifecycle(self, now: float) -> None:
        for vm_obj in self.vms.values():
            vm = self.world.vms.get(key_of(vm_obj))
            if vm is None:
                continue
            strategy = vm_obj.get("spec", {}).get("runStrategy", "Always")
            if strategy == "Halted" and vm.running:
                if any(f.vm is vm and not f.done for f in self.flights.values()):
                    continue
                self._stop_vm(vm, now)
            elif strategy != "Halted" and not vm.running and vm.start_at is None:
                vm.start_at = now + self.scenario.network.target_pod_startup
            if not vm.running and vm.start_at is not None and now >= vm.start_at:
                self._start_vm(vm, now)

    def _stop_vm(self, vm: SimVM, now: float) -> None:
        vm.running, vm.stopped_at, vm.start_at = False, now, None
        ns, name, pod = vm.spec.namespace, vm.spec.name, vm.pod_name
        stamp = self.clock.stamp(now)

        def write() -> None:
            self.kube.delete(rest.VMIS, name, ns)
            self.kube.delete(rest.PODS, pod, ns, grace_seconds=0)
            self.kube.patch(rest.VMS, name, objects.vm_status(ready=False, run_strategy="Halted"),
                            ns, subresource="status")
            log.debug("stopped %s/%s at %s", ns, name, stamp)

        self._submit(write)

    def _start_vm(self, vm: SimVM, now: float) -> None:
        # A fresh start is not a migration: a host-model VM may start on any host model, a
        # named model needs a node offering it (cpu-model.node.kubevirt.io/<model>), and
        # node-local disks keep the VM on the node holding them.
        model = vm.spec.cpu_model
        cpu_label = None if model in ("host-model", "host-passthrough") else \
            objects.START_CPU_MODEL_LABEL + model
        local = {sc.name for sc in self.scenario.storage_classes if sc.node_local}
        pinned = {"kubernetes.io/hostname": vm.node} if any(
            v.storage_class in local for v in vm.spec.volumes) else {}
        target = choose_target(self._node_views(), "", vm.spec.cpu, vm.spec.memory,
                               self._usage(), cpu_label, pinned)
        if target is None:
            vm.start_at = now + 10  # Pending pod: try again later
            return
        vm.node, vm.running, vm.start_at = target, True, None
        vm.pod_name = f"virt-launcher-{vm.spec.name}-{pod_suffix(self.rng)}"
        stamp = self.clock.stamp(now)
        classes = {sc.name: sc.access_mode == "ReadWriteMany"
                   for sc in self.scenario.storage_classes}

        def write() -> None:
            spec = vm.spec.model_copy(update={"node": target}) if hasattr(
                vm.spec, "model_copy") else vm.spec
            vm_obj = self.kube.get(rest.VMS, vm.spec.name, vm.spec.namespace)
            body = objects.virtual_machine_instance(spec, vm_obj["metadata"]["uid"])
            body["spec"]["volumes"] = [
                {"name": n, "persistentVolumeClaim": {"claimName": c}}
                for n, c in vm.claims.items()]
            vmi = self.kube.create_or_get(rest.VMIS, body)
            vm.vmi_uid = vmi["metadata"]["uid"]
            pod = self.kube.create(rest.PODS, objects.launcher_pod(
                vm.spec, vm.vmi_uid, vm.pod_name, target, vm.claims))
            blocker = objects.not_migratable(vm.spec, classes)
            self.kube.patch(rest.VMIS, vm.spec.name, {
                "metadata": {"labels": {objects.NODE_NAME_LABEL: target}},
                "status": {"phase": "Running", "nodeName": target,
                           "conditions": objects.vmi_conditions(blocker, stamp),
                           "activePods": {pod["metadata"]["uid"]: target},
                           "phaseTransitionTimestamps": [
                               {"phase": "Running", "phaseTransitionTimestamp": stamp}]}},
                vm.spec.namespace)
            self.kube.patch(rest.VMS, vm.spec.name, objects.vm_status(), vm.spec.namespace,
                            subresource="status")

        self._submit(write)

    # -- volume migration (updateVolumesStrategy: Migration) -----------------------------------

    def _volume_updates(self, now: float) -> None:
        for vm_obj in self.vms.values():
            spec = vm_obj.get("spec", {})
            if spec.get("updateVolumesStrategy") != "Migration":
                continue
            vm = self.world.vms.get(key_of(vm_obj))
            if vm is None or not vm.running:
                continue
            wanted = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in spec.get("template", {}).get("spec", {}).get("volumes", [])
                      if v.get("persistentVolumeClaim")}
            if all(vm.claims.get(k) == c for k, c in wanted.items()):
                continue
            if any(f.vm is vm and not f.done for f in self.flights.values()):
                continue
            if now < self.volume_retry.get(vm.key, (0, 0.0))[1]:
                continue  # backing off after a failed volume migration
            name = f"kubevirt-workload-update-{pod_suffix(self.rng)}"
            body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                    "metadata": {"name": name, "namespace": vm.spec.namespace,
                                 "annotations": {"kubevirt.io/workloadUpdateMigration": ""}},
                    "spec": {"vmiName": vm.spec.name}}
            # virt-api admits the VMIM by the VMI's LiveMigratable, which leaves out the volumes
            # recorded as migrating; a refusal (a node-local disk left behind) backs off.
            shared = {sc.name: sc.access_mode == "ReadWriteMany"
                      for sc in self.scenario.storage_classes}
            vmi = self.kube.get(rest.VMIS, vm.spec.name, vm.spec.namespace) or {}
            self.kube.patch(rest.VMIS, vm.spec.name, objects.migrated_volumes_status(
                vm.spec, vm.claims, wanted, shared, vmi, self.clock.stamp(now)), vm.spec.namespace)
            try:
                created = self.kube.create(rest.VMIMS, body)
            except ApiError as exc:
                log.info("volume migration of %s refused: %s", vm.key, exc.message)
                failures = self.volume_retry.get(vm.key, (0, 0.0))[0] + 1
                self.volume_retry[vm.key] = (failures, now + min(
                    VOLUME_RETRY_MAX, VOLUME_RETRY_BASE * 2 ** (failures - 1)))
                continue
            self.vmims.put(created)
            flight = self._register(created, now)
            if flight:
                flight.new_claims = wanted
                flight.new_classes = self._claim_classes(vm, wanted)

    def _claim_classes(self, vm: SimVM, claims: dict[str, str]) -> dict[str, str]:
        """The scenario storage class of each new destination claim (the PVC's own class)."""
        known = {sc.name for sc in self.scenario.storage_classes}
        classes = {}
        for volume, claim in claims.items():
            if vm.claims.get(volume) == claim:
                continue
            try:
                pvc = self.kube.get(rest.PVCS, claim, vm.spec.namespace) or {}
            except ApiError:
                pvc = {}
            name = pvc.get("spec", {}).get("storageClassName")
            if name in known:
                classes[volume] = name
        return classes

    # -- evacuation (KubeVirt's answer to evicting a virt-launcher pod) ------------------------

    def request_evacuation(self, vmi_key: str, node: str) -> None:
        with self._lock:
            self.evacuations.setdefault(vmi_key, node)

    def _evacuate(self, now: float) -> None:
        cluster_limit, node_limit = self._limits()
        for vmi_key, node in list(self.evacuations.items()):
            vm = self.world.vms.get(vmi_key)
            if vm is None or not vm.running or vm.node != node:
                self.evacuations.pop(vmi_key, None)
                continue
            if any(f.vm is vm and not f.done for f in self.flights.values()):
                continue
            active = [f for f in self.flights.values() if f.phase in IN_FLIGHT or
                      f.phase == "Pending"]
            if len(active) >= cluster_limit or sum(
                    1 for f in active if f.source == node) >= node_limit:
                continue
            name = f"kubevirt-evacuation-{pod_suffix(self.rng)}"
            body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                    "metadata": {"name": name, "namespace": vm.spec.namespace,
                                 "annotations": {"kubevirt.io/evacuationMigration": node}},
                    "spec": {"vmiName": vm.spec.name}}
            if self.scenario.kubevirt.migration_priority_queue:  # before 1.9: only when gated
                body["spec"]["priority"] = "system-critical"
            try:
                created = self.kube.create(rest.VMIMS, body)
            except ApiError as exc:  # virt-api refused it (e.g. another migration in flight)
                log.info("evacuation of %s refused: %s", vmi_key, exc.message)
                continue
            self.vmims.put(created)
            self._register(created, now)

    # -- VMIM intake -------------------------------------------------------------------------

    def _sync_vmims(self, now: float) -> None:
        seen = set()
        for obj in self.vmims.values():
            uid = obj["metadata"]["uid"]
            seen.add(uid)
            flight = self.flights.get(uid)
            if flight is None:
                if (obj.get("status") or {}).get("phase") in FINAL:
                    continue
                flight = self._register(obj, now)
                if flight is None:
                    continue
            if obj["metadata"].get("deletionTimestamp"):
                self._abort(flight, now, obj)
        for uid, flight in list(self.flights.items()):
            if uid not in seen:
                if not flight.done:
                    self._abort(flight, now, None)
                elif not flight.dirty:
                    self.flights.pop(uid, None)

    def _register(self, obj: JSON, now: float) -> Flight | None:
        meta, spec = obj["metadata"], obj.get("spec", {})
        uid = meta["uid"]
        if uid in self.flights:
            return self.flights[uid]
        vm = self.world.vms.get(f"{meta['namespace']}/{spec.get('vmiName')}")
        flight = Flight(
            key=key_of(obj), uid=uid, name=meta["name"], vm=vm, created=now,  # type: ignore[arg-type]
            priority=PRIORITY_ORDER.get(spec.get("priority", ""), 1),
            selector=spec.get("addedNodeSelector") or {}, phase_since=now,
        )
        self.flights[uid] = flight
        self._set_phase(flight, "Pending", now)
        if FINALIZER not in (meta.get("finalizers") or []) and not meta.get("deletionTimestamp"):
            patch = {"metadata": {"finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                                  "labels": {"kubevirt.io/vmi-name": spec.get("vmiName", "")}}}
            self._submit(lambda: self._patch_vmim(flight, patch))
        if vm is None:
            self._fail(flight, now, f"VMI {meta['namespace']}/{spec.get('vmiName')} does not "
                       "exist")
        elif not vm.running:
            self._fail(flight, now, f"VMI {vm.key} is not running")
        else:
            flight.source = vm.node
            flight.config = self._config_for(vm)
        return flight

    def _admit(self, now: float) -> None:
        """Start Pending migrations within KubeVirt's cluster and per-node outbound limits."""
        cluster_limit, node_limit = self._limits()
        running = [f for f in self.flights.values() if f.phase in IN_FLIGHT]
        per_node = Counter(f.source for f in running)
        busy_vms = {id(f.vm) for f in running}
        pending = sorted((f for f in self.flights.values() if f.phase == "Pending"),
                         key=lambda f: (f.priority, f.created, f.name))
        for flight in pending:
            if len(running) >= cluster_limit:
                break
            flight.source = flight.vm.node  # it may have moved since the VMIM was created
            if per_node[flight.source] >= node_limit or id(flight.vm) in busy_vms:
                continue
            blocker = self._blocker(flight)
            if blocker:
                self._fail(flight, now, blocker)
                continue
            flight.vm.attempts += 1
            flight.attempt = flight.vm.attempts
            flight.config = self._config_for(flight.vm)  # policies as they are now
            # Admitted when its slot freed (or when it was created), not at this tick.
            self._set_phase(flight, "Scheduling", min(now, max(flight.phase_since,
                                                               self.freed_at)))
            running.append(flight)
            per_node[flight.source] += 1
            busy_vms.add(id(flight.vm))
        self.peak["cluster"] = max(self.peak["cluster"], len(running))
        for node, count in per_node.items():
            self.peak[f"outbound/{node}"] = max(self.peak[f"outbound/{node}"], count)

    def _blocker(self, flight: Flight) -> str | None:
        classes = {sc.name: sc.access_mode == "ReadWriteMany"
                   for sc in self.scenario.storage_classes}
        blocker = objects.not_migratable(flight.vm.spec, classes)
        if blocker is None:
            return None
        if blocker[0] == "DisksNotLiveMigratable" and flight.new_claims is not None:
            moved = {n for n, c in flight.new_claims.items() if flight.vm.claims.get(n) != c}
            pinned = {v.name for v in flight.vm.spec.volumes if not classes[v.storage_class]}
            if pinned <= moved:
                return None  # a volume migration moves the (non-shared) disks too
        return f"Cannot migrate VMI, Reason: {blocker[0]}, Message: {blocker[1]}"

    # -- the phases --------------------------------------------------------------------------

    def _advance(self, flight: Flight, now: float) -> None:
        """Take a migration through every phase that came due since the last tick, each at the
        simulated instant it was due, so a slow tick does not stretch simulated time."""
        for _ in range(len(IN_FLIGHT)):
            phase = flight.phase
            self._step(flight, now)
            if flight.phase == phase or flight.done:
                return

    def _step(self, flight: Flight, now: float) -> None:
        startup = self.scenario.network.target_pod_startup
        since = flight.phase_since
        elapsed = now - since
        for node in (flight.source, flight.target):
            if node and node in self.not_ready and flight.phase in IN_FLIGHT:
                self._fail(flight, now, f"node {node} is not ready")
                return
        if flight.phase == "Scheduling":
            if elapsed < 0.2 * startup:
                return
            views = self._node_views()
            source_labels = next((n.labels for n in views if n.name == flight.source), {})
            target = choose_target(
                views, flight.source, flight.vm.spec.cpu, flight.vm.spec.memory, self._usage(),
                required_cpu_label(flight.vm.spec.cpu_model, source_labels), flight.selector)
            if target is None:
                flight.waited = True
                if elapsed > UNSCHEDULABLE_TIMEOUT:
                    self._fail(flight, now, "target pod is unschedulable: no node fits the "
                               "VMI (capacity, CPU model or node selector)")
                return
            flight.target = target
            flight.target_pod = f"virt-launcher-{flight.vm.spec.name}-{pod_suffix(self.rng)}"
            self._set_phase(flight, "Scheduled", now if flight.waited else since + 0.2 * startup)
            self._create_target_pod(flight)
        elif flight.phase == "Scheduled" and elapsed >= 0.3 * startup:
            self._set_phase(flight, "PreparingTarget", since + 0.3 * startup)
        elif flight.phase == "PreparingTarget" and elapsed >= 0.5 * startup:
            if self._fails_target_pod(flight):
                self._fail(flight, since + 0.5 * startup, f"target pod {flight.target_pod} "
                           "failed while preparing the migration target")
                return
            self._set_phase(flight, "TargetReady", since + 0.5 * startup)
        elif flight.phase == "TargetReady":
            self._begin_transfer(flight, since)

    def _begin_transfer(self, flight: Flight, now: float) -> None:
        vm, cfg = flight.vm, flight.config
        flight.started_at = now
        flight.run = PreCopyRun(
            memory=vm.spec.memory, dirty_rate=vm.dirty_rate, max_downtime=cfg.max_downtime,
            auto_converge=cfg.allow_auto_converge, post_copy=cfg.allow_post_copy,
            completion_timeout=cfg.completion_timeout_per_gib * max(vm.spec.memory / GiB, 1.0),
            progress_timeout=cfg.progress_timeout,
        )
        if flight.new_claims is not None:
            classes = {sc.name: sc for sc in self.scenario.storage_classes}
            sizes = {v.name: v for v in vm.spec.volumes}
            moved = [n for n, c in flight.new_claims.items() if vm.claims.get(n) != c]
            flight.disk_bytes_left = sum(sizes[n].size for n in moved if n in sizes)
            flight.copy_bandwidth = min(
                (classes[sizes[n].storage_class].copy_bandwidth for n in moved if n in sizes),
                default=0.0)
        self._set_phase(flight, "Running", now)

    def _transfer(self, now: float, dt: float) -> None:
        """Advance every running transfer by dt, sharing each node's NIC among its migrations."""
        running = [f for f in self.flights.values() if f.phase == "Running" and f.run]
        if not running or dt <= 0:
            return
        users = Counter()
        for f in running:
            users[f.source] += 1
            users[f.target] += 1
        nic = self.scenario.network.node_bandwidth
        for f in running:
            # Each transfer runs from where it was last advanced to (or from its start, which
            # may lie inside this tick or before it), not for a whole dt.
            step = now - (f.progressed_to if f.progressed_to is not None else
                          f.started_at if f.started_at is not None else now - dt)
            f.progressed_to = now
            if step <= 0:
                continue
            share = min(nic / users[f.source], nic / users[f.target])
            if f.config.bandwidth:
                share = min(share, f.config.bandwidth)
            if f.disk_bytes_left > 0:
                rate = min(share, f.copy_bandwidth or share)
                f.disk_bytes_left = max(0.0, f.disk_bytes_left - rate * step)
                continue
            assert f.run is not None
            before = f.run.elapsed
            f.run.advance(step, share)
            end = now - step + (f.run.elapsed - before)  # the run stops at its exact end
            if f.run.failed:
                self._fail(f, end, _kubevirt_abort_reason(f))
            elif f.run.done:
                self._succeed(f, end)

    # -- outcomes ----------------------------------------------------------------------------

    def _succeed(self, flight: Flight, now: float) -> None:
        run = flight.run
        assert run is not None and flight.target
        flight.downtime_ms = round(run.downtime * 1000)
        flight.ended_at = now
        self.freed_at = max(self.freed_at, now)
        vm = flight.vm
        old_pod, vm.node, vm.pod_name = vm.pod_name, flight.target, flight.target_pod or ""
        if flight.new_claims is not None:
            flight.old_claims, vm.claims = dict(vm.claims), dict(flight.new_claims)
            # The VM's disks are the new claims now, in their own storage classes: that decides
            # whether it can live-migrate, and where a restart may run.
            vm.spec = vm.spec.model_copy(update={"volumes": [
                v.model_copy(update={"claim_name": vm.claims.get(v.name, v.claim_name),
                                     "storage_class": flight.new_classes.get(v.name,
                                                                             v.storage_class)})
                for v in vm.spec.volumes]})
            self.volume_retry.pop(vm.key, None)
        self._set_phase(flight, "Succeeded", now)
        self._submit(lambda: self.kube.delete(rest.PODS, old_pod, vm.spec.namespace,
                                              grace_seconds=0))
        self._submit(lambda: self._patch_vmim(flight, {"metadata": {"annotations": {
            DOWNTIME_ANNOTATION: str(flight.downtime_ms)}}}))

    def _fail(self, flight: Flight, now: float, reason: str) -> None:
        flight.failure = reason
        flight.ended_at = now
        if flight.phase in IN_FLIGHT:
            self.freed_at = max(self.freed_at, now)
        if flight.new_claims is not None and flight.vm is not None:
            failures = self.volume_retry.get(flight.vm.key, (0, 0.0))[0] + 1
            self.volume_retry[flight.vm.key] = (
                failures, now + min(VOLUME_RETRY_MAX, VOLUME_RETRY_BASE * 2 ** (failures - 1)))
        pod = flight.target_pod
        if pod:
            self._submit(lambda: self.kube.delete(rest.PODS, pod, flight.vm.spec.namespace,
                                                  grace_seconds=0))
        self._set_phase(flight, "Failed", now)

    def _abort(self, flight: Flight, now: float, obj: JSON | None) -> None:
        """The VMIM was deleted: abort the migration, then let the deletion finish."""
        if not flight.done:
            flight.aborted = True
            self._fail(flight, now, "Migration aborted: the VirtualMachineInstanceMigration "
                       "was deleted")
        if obj is not None and FINALIZER in (obj["metadata"].get("finalizers") or []):
            rest_finalizers = [f for f in obj["metadata"]["finalizers"] if f != FINALIZER]
            self._submit(lambda: self._patch_vmim(flight, {"metadata": {
                "finalizers": rest_finalizers or None,
                "resourceVersion": obj["metadata"]["resourceVersion"]}}))

    # -- writes ------------------------------------------------------------------------------

    def _set_phase(self, flight: Flight, phase: str, now: float) -> None:
        flight.phase = phase
        flight.phase_since = now
        flight.transitions.append({"phase": phase, "phaseTransitionTimestamp":
                                   self.clock.stamp(now)})
        flight.dirty = True

    def _create_target_pod(self, flight: Flight) -> None:
        vm, pod, target = flight.vm, flight.target_pod, flight.target
        claims = flight.new_claims or vm.claims

        def write() -> None:
            body = objects.launcher_pod(vm.spec, vm.vmi_uid, pod, target, claims)
            body["metadata"]["labels"]["kubevirt.io/migrationJobUID"] = flight.uid
            created = self.kube.create(rest.PODS, body)
            flight.target_pod_uid = created["metadata"]["uid"]

        self._submit(write)

    def _write_all(self) -> None:
        dirty = [f for f in self.flights.values() if f.dirty]
        for f in dirty:
            f.dirty = False
        futures = [self._pool.submit(self._write_flight, f) for f in dirty]
        for fut in futures:
            try:
                fut.result(timeout=30)
            except Exception as exc:  # logged; the next change writes the whole state again
                log.warning("status write failed: %s", exc)

    def _write_flight(self, f: Flight) -> None:
        state = self._migration_state(f)
        status = {"phase": f.phase, "phaseTransitionTimestamps": f.transitions,
                  "migrationState": state}
        ns, name = f.key.split("/", 1)
        # As in KubeVirt, the VMI (virt-handler) is updated before the VMIM (virt-controller).
        if f.vm is not None and f.source:
            self._write_vmi(f, state)
        try:
            self.kube.patch(rest.VMIMS, name, {"status": status}, ns, subresource="status")
        except ApiError as exc:
            if not exc.not_found:
                raise

    def _write_vmi(self, f: Flight, state: JSON) -> None:
        vmi_patch: JSON = {"status": {"migrationState": state}}
        if f.phase == "Succeeded":
            vmi_patch["status"].update(nodeName=f.target, activePods={
                f.target_pod_uid or "unknown": f.target}, evacuationNodeName=None)
            vmi_patch["metadata"] = {"labels": {objects.NODE_NAME_LABEL: f.target}}
            if f.new_claims is not None:
                vmi = self.kube.get(rest.VMIS, f.vm.spec.name, f.vm.spec.namespace)
                if vmi:
                    vmi_patch["spec"] = {"volumes": [
                        {**v, "persistentVolumeClaim": {"claimName": f.new_claims[v["name"]]}}
                        if v["name"] in f.new_claims else v
                        for v in vmi["spec"].get("volumes", [])]}
                    # The disks may now all be shared (or not): re-evaluate LiveMigratable.
                    shared = {sc.name: sc.access_mode == "ReadWriteMany"
                              for sc in self.scenario.storage_classes}
                    blocker = objects.not_migratable(f.vm.spec, shared)
                    fresh = {c["type"]: c for c in objects.vmi_conditions(
                        blocker, self.clock.stamp(f.ended_at))}
                    conds = vmi.get("status", {}).get("conditions") or []
                    vmi_patch["status"]["conditions"] = [
                        fresh[c["type"]] if c.get("type") == "LiveMigratable" and
                        c.get("status") != fresh["LiveMigratable"]["status"] else c
                        for c in conds]
                    vmi_patch["status"]["migrationMethod"] = "BlockMigration" if blocker and \
                        blocker[0] == "DisksNotLiveMigratable" else "LiveMigration"
                self._submit(lambda: self._finish_volume_update(f))
        try:
            self.kube.patch(rest.VMIS, f.vm.spec.name, vmi_patch, f.vm.spec.namespace)
        except ApiError as exc:
            if not exc.not_found:
                raise

    def _finish_volume_update(self, f: Flight) -> None:
        vm = f.vm
        migrated = [{"volumeName": n, "sourcePVCInfo": {"claimName": f.old_claims[n]},
                     "destinationPVCInfo": {"claimName": new}}
                    for n, new in (f.new_claims or {}).items()
                    if f.old_claims.get(n) not in (None, new)]
        self.kube.patch(rest.VMS, vm.spec.name, {"status": {"volumeUpdateState": {
            "volumeMigrationState": {"migratedVolumes": migrated}}}}, vm.spec.namespace,
            subresource="status")

    def _migration_state(self, f: Flight) -> JSON:
        state: JSON = {"migrationUid": f.uid, "sourceNode": f.source,
                       "sourcePod": f.vm.pod_name if f.vm and f.phase != "Succeeded" else None,
                       "completed": f.phase == "Succeeded", "failed": f.phase == "Failed"}
        if f.target:
            state.update(targetNode=f.target, targetPod=f.target_pod,
                         targetNodeAddress="127.0.0.1")
        if f.started_at is not None:
            state["startTimestamp"] = self.clock.stamp(f.started_at)
            state["mode"] = (Mode.POST_COPY.value if f.run and f.run.mode == Mode.POST_COPY
                             else "PreCopy")
        if f.ended_at is not None and f.done:
            state["endTimestamp"] = self.clock.stamp(f.ended_at)
        if f.failure:
            state["failureReason"] = f.failure
        if f.aborted:
            state.update(abortRequested=True, abortStatus="Succeeded")
        if f.config.policy:
            state["migrationPolicyName"] = f.config.policy
        if f.started_at is not None:
            state["migrationConfiguration"] = f.config.wire()
        return {k: v for k, v in state.items() if v is not None}

    def _patch_vmim(self, flight: Flight, patch: JSON) -> None:
        ns, name = flight.key.split("/", 1)
        try:
            self.kube.patch(rest.VMIMS, name, patch, ns)
        except ApiError as exc:
            if not (exc.not_found or exc.conflict):
                raise

    def _submit(self, fn: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception as exc:
                log.warning("simulator write failed: %s", exc)

        self._pool.submit(run)


def _kubevirt_abort_reason(f: Flight) -> str:
    """virt-handler's messages when it gives up on a migration."""
    run = f.run
    assert run is not None
    if run.failure_reason == "ProgressTimeout":
        return (f"Live migration stuck for {int(f.config.progress_timeout)} sec and has been "
                "aborted")
    limit = int(f.config.completion_timeout_per_gib * max(f.vm.spec.memory / GiB, 1.0))
    return f"Live migration is not completed after {limit} sec and has been aborted"
