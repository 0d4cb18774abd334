"""The simulated KubeVirt control plane: virt-controller and virt-handler, against a real API
server.

One tick loop over in-memory state fed by watches. The parts mirror KubeVirt's components, one
module each, so each can be read next to its KubeVirt counterpart:

=============================  ==============================================================
``migration_controller``       pkg/virt-controller/watch/migration/migration.go (queue,
                               limits, target pod, handoff, abort, GC, backoff)
``handler``                    pkg/virt-handler/migration-{source,target}.go and virt-launcher's
                               live-migration-source.go (transfer, timeouts, abort, completion)
``evacuation``                 pkg/virt-controller/watch/drain/evacuation/evacuation.go
``volumes``                    the VM controller's volume updates (watch/vm/vm.go,
                               watch/volume-migration) and the workload updater
``vms``                        the VM controller's run strategies (start, stop)
``kubelet``                    the kube-scheduler and kubelets (pods)
``storage``                    Kubernetes' PV controller, CSI provisioner, pvc/pv-protection
                               and the scheduler's volume binding
=============================  ==============================================================

``kubevirt.version`` in the scenario (1.7, 1.8, 1.9) picks the behaviour where versions differ.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from virtshift.api.units import parse_quantity
from virtshift.domain.placement import NodeView
from virtshift.k8s import rest
from virtshift.k8s.informer import Informer
from virtshift.k8s.rest import JSON, ApiError, KubeClient
from virtshift.sim import objects
from virtshift.sim.clock import SimClock
from virtshift.sim.evacuation import EvacuationController
from virtshift.sim.flight import FINAL, IN_FLIGHT, Config, Flight, best_policy
from virtshift.sim.handler import Handler
from virtshift.sim.kubelet import Kubelet
from virtshift.sim.migration_controller import MigrationController
from virtshift.sim.populate import SimVM, World
from virtshift.sim.slots import Slots
from virtshift.sim.storage import StorageControllers
from virtshift.sim.vms import VMController
from virtshift.sim.volumes import VolumeMigration

log = logging.getLogger(__name__)

__all__ = ["FINAL", "IN_FLIGHT", "KubeVirtSim"]


class KubeVirtSim(MigrationController, Handler, EvacuationController, VolumeMigration,
                  VMController, Kubelet, StorageControllers):
    def __init__(self, kube: KubeClient, world: World, clock: SimClock,
                 tick_seconds: float = 0.1, controller: KubeClient | None = None) -> None:
        self.kube = kube
        # virt-controller's own identity (kubevirt-controller service account) where it
        # matters to admission, e.g. VMIMs with spec.priority.
        self.controller = controller or kube
        self.world = world
        self.scenario = world.scenario
        self.version: str = getattr(self.scenario.kubevirt, "version", "1.9")
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.rng = random.Random(self.scenario.seed + 1)
        self.flights: dict[str, Flight] = {}  # by VMIM uid
        self.not_ready: set[str] = set()
        self.slots = Slots()  # when running migrations ended (and freed their slots)
        self.faults_done: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(16)
        self._wake = threading.Event()
        self._pods_changed = True
        self._vmi_dirty: set[str] = set()
        self.vmims = Informer(kube, rest.VMIMS, on_event=self._on_vmim)
        self.nodes = Informer(kube, rest.NODES)
        self.vms = Informer(kube, rest.VMS)
        self.vmis = Informer(kube, rest.VMIS, on_event=self._on_vmi)
        self.pods = Informer(kube, rest.PODS, on_event=self._on_pod)
        self.policies = Informer(kube, rest.KUBEVIRT_POLICIES)
        self.namespaces = Informer(kube, rest.NAMESPACES)
        self.pvcs = Informer(kube, rest.PVCS, on_event=self._on_storage)
        self.pvs = Informer(kube, rest.PVS, on_event=self._on_storage)
        # addKubeVirt/updateKubeVirt enqueue the workload updater too (workload-updater.go).
        self.kubevirts = Informer(kube, rest.KUBEVIRTS, on_event=self._on_kubevirt)
        self._informers = [self.vmims, self.nodes, self.vms, self.vmis, self.pods,
                           self.policies, self.namespaces, self.pvcs, self.pvs, self.kubevirts]
        self._handled_pods: set[tuple[str, str]] = set()
        self._storage_done: set[tuple[str, ...]] = set()  # storage writes made once
        self.workload_update_due: float | None = None  # the workload updater's queue
        self._vmim_events = False
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

    def _on_kubevirt(self, _kind: str, _obj: JSON) -> None:
        self._vmim_events = True  # enqueueKubeVirt: the same queue key, after the throttle

    def _on_vmim(self, kind: str, obj: JSON) -> None:
        self._vmim_events = True  # addMigration/updateMigration/deleteMigration enqueue
        # New and deleted migrations are acted on at once, as virt-controller would; our own
        # status writes echo back as MODIFIED and need no wake-up.
        if kind != "MODIFIED" or obj["metadata"].get("deletionTimestamp"):
            self._wake.set()

    def _on_vmi(self, kind: str, obj: JSON) -> None:
        if (obj.get("status") or {}).get("evacuationNodeName"):
            self._wake.set()

    def _on_pod(self, kind: str, obj: JSON) -> None:
        self._pods_changed = True
        if kind == "DELETED":
            self._wake.set()  # a claim it held may be released

    def _on_storage(self, kind: str, obj: JSON) -> None:
        if kind != "MODIFIED" or obj["metadata"].get("deletionTimestamp"):
            self._wake.set()

    def request_evacuation(self, vmi_key: str, node: str) -> None:
        """The eviction webhook marked a VMI; the evacuation controller reads the mark from
        the VMI itself, this only wakes the loop."""
        self._wake.set()

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
            if self.workload_update_due is not None:  # wake when the updater's sync is due
                period = min(period, max(0.0, (self.workload_update_due - self.clock.now())
                                         / self.scenario.time_scale))
            self._wake.wait(max(0.0, period - (time.monotonic() - started)))

    # -- one tick ----------------------------------------------------------------------------

    def tick(self, now: float, dt: float) -> None:
        self._apply_faults(now)
        self._kubelet()
        self._storage(now)
        self._vm_lifecycle(now)
        self._volume_updates(now)
        self._workload_updates(now)
        self._evacuate(now)
        self._sync_vmims(now)
        self._admit(now)
        for flight in list(self.flights.values()):
            if not flight.done:
                self._advance(flight, now)
        self._transfer(now, dt)
        self._write_all()

    # -- settings ----------------------------------------------------------------------------

    def kubevirt_spec(self) -> JSON:
        kv = self.kubevirts.get(f"{objects.KUBEVIRT_NAMESPACE}/kubevirt") or {}
        return kv.get("spec") or {}

    def kubevirt_migrations(self) -> JSON:
        return (self.kubevirt_spec().get("configuration") or {}).get("migrations") or {}

    def feature_gate(self, name: str) -> bool:
        config = self.kubevirt_spec().get("configuration") or {}
        return name in ((config.get("developerConfiguration") or {}).get("featureGates") or [])

    @property
    def priority_queue(self) -> bool:
        """MigrationPriorityQueue: GA (always on) in 1.9; Alpha/Beta and off unless listed
        before (pkg/virt-config/featuregate)."""
        return self.version == "1.9" or self.feature_gate("MigrationPriorityQueue")

    def limits(self) -> tuple[int, int]:
        m = self.kubevirt_migrations()
        return (int(m.get("parallelMigrationsPerCluster", 5)),
                int(m.get("parallelOutboundMigrationsPerNode", 2)))

    def config_for(self, vm: SimVM) -> Config:
        """migration.go handleTargetPodHandoff: the cluster configuration, with the best
        matching migrations.kubevirt.io policy applied (migrationpolicy.go matchPolicy)."""
        cfg = Config.from_cluster(self.kubevirt_migrations(), self.version)
        policy = self._matching_policy(vm)
        if policy:
            cfg.apply_policy(policy["metadata"]["name"], policy.get("spec") or {}, self.version)
        return cfg

    def _matching_policy(self, vm: SimVM) -> JSON | None:
        vmi = self.vmis.get(vm.key) or {}
        ns = self.namespaces.get(vm.spec.namespace) or {}
        return best_policy(self.policies.values(), vmi.get("metadata", {}).get("labels"),
                           ns.get("metadata", {}).get("labels") or {})

    # -- nodes -------------------------------------------------------------------------------

    def node_views(self) -> list[NodeView]:
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
                memory=parse_quantity(alloc.get("memory", "0")),
                taints=tuple((t.get("key", ""), t.get("effect", ""))
                             for t in n.get("spec", {}).get("taints") or [])))
        return views

    def usage(self) -> dict[str, tuple[float, float]]:
        """What the scheduler counts as requested on each node: launcher pods, target pods
        of migrations in flight included."""
        used: dict[str, tuple[float, float]] = {}

        def add(node: str, vm: SimVM) -> None:
            cpu, mem = objects.launcher_requests(vm.spec)
            c, m = used.get(node, (0.0, 0.0))
            used[node] = (c + cpu, m + mem)

        for vm in self.world.vms.values():
            if vm.running:
                add(vm.node, vm)
        for f in self.flights.values():
            if f.target and f.phase in IN_FLIGHT and f.vm is not None:
                add(f.target, f.vm)
        return used

    # -- faults ------------------------------------------------------------------------------

    def node_not_ready(self, node: str) -> None:
        """The scenario's nodeNotReady fault, injected now (for tests that need it at a
        particular moment of a migration rather than at a scenario time)."""
        with self._lock:
            self._node_not_ready(node)
        self._wake.set()

    def _node_not_ready(self, node: str) -> None:
        """The node stops: transfers through it stall (handler), its status turns NotReady."""
        self.not_ready.add(node)
        spec = next(n for n in self.scenario.nodes if n.name == node)
        self._submit(lambda s=spec: self.kube.patch(
            rest.NODES, s.name, objects.node_status(s, self.clock.stamp(), ready=False),
            subresource="status"))
        # What the node lifecycle controller would add.
        self._submit(lambda s=spec: self.kube.patch(rest.NODES, s.name, {"spec": {
            "taints": [{"key": objects.NOT_READY_TAINT, "effect": "NoSchedule"}]}}))
        log.info("fault: node %s is NotReady", node)

    def _apply_faults(self, now: float) -> None:
        for i, fault in enumerate(self.scenario.faults):
            if i in self.faults_done or fault.kind == "failTargetPod" or fault.at > now:
                continue
            self.faults_done.add(i)
            if fault.kind == "nodeNotReady" and fault.node:
                self._node_not_ready(fault.node)
            elif fault.kind == "dirtyRateSpike" and fault.vm:
                vm = self.vm_by_ref(fault.vm)
                if vm and fault.dirty_rate is not None:
                    vm.dirty_rate = fault.dirty_rate
                    for f in self.flights.values():
                        if f.vm is vm and f.run:
                            f.run.set_dirty_rate(vm.dirty_rate)

    def vm_by_ref(self, ref: str) -> SimVM | None:
        if "/" in ref:
            return self.world.vms.get(ref)
        return next((v for v in self.world.vms.values() if v.spec.name == ref), None)

    def fails_target_pod(self, flight: Flight) -> bool:
        return any(
            f.kind == "failTargetPod" and f.vm and self.vm_by_ref(f.vm) is flight.vm
            and (f.attempt is None or f.attempt == flight.attempt)
            for f in self.scenario.faults
        )

    # -- writes ------------------------------------------------------------------------------

    def set_phase(self, flight: Flight, phase: str, now: float) -> None:
        """SetVMIMigrationPhaseTransitionTimestamp: one entry per phase reached."""
        flight.phase = phase
        flight.phase_since = now
        if not any(t["phase"] == phase for t in flight.transitions):
            flight.transitions.append({"phase": phase,
                                       "phaseTransitionTimestamp": self.clock.stamp(now)})
        flight.dirty = True
        if phase in FINAL and flight.vm is not None:
            self.touch_vmi(flight.vm)

    def touch_vmi(self, vm: SimVM) -> None:
        self._vmi_dirty.add(vm.key)

    def _write_all(self) -> None:
        vmis = [self.world.vms[k] for k in self._vmi_dirty if k in self.world.vms]
        self._vmi_dirty.clear()
        dirty = [f for f in self.flights.values() if f.dirty]
        for f in dirty:
            f.dirty = False
        # As in KubeVirt, the VMI (virt-handler) is written before the VMIM (virt-controller).
        # A failed write is requeued (KubeVirt's controllers re-add the key to their rate-limited
        # work queue on any error): without that, a write lost while the API server restarts
        # would leave the object behind the simulator's state for good.
        for vm in self._join([(vm, self._pool.submit(self.write_vmi, vm)) for vm in vmis]):
            self._vmi_dirty.add(vm.key)
        for f in self._join([(f, self._pool.submit(self.write_vmim, f)) for f in dirty]):
            f.dirty = True

    @staticmethod
    def _join(futures: list[tuple[Any, Any]]) -> list[Any]:
        """Wait for the writes; the items whose write failed (logged), to write again."""
        failed = []
        for item, fut in futures:
            try:
                fut.result(timeout=30)
            except Exception as exc:
                log.warning("status write failed (retried at the next tick): %s", exc)
                failed.append(item)
        return failed

    def patch_vmim(self, flight: Flight, patch: JSON, subresource: str | None = None) -> None:
        ns, name = flight.key.split("/", 1)
        try:
            self.kube.patch(rest.VMIMS, name, patch, ns, subresource=subresource)
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
