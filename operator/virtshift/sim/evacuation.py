"""virt-controller's evacuation controller (pkg/virt-controller/watch/drain/evacuation/
evacuation.go).

- Which VMIs (``vmisToMigrate``): every VMI on a node tainted with ``nodeDrainTaintKey``
  (default ``kubevirt.io/drain``) with effect NoSchedule, and every VMI whose
  ``status.evacuationNodeName`` (set by the pod-eviction webhook) is still its node; running,
  not migrating, with no unfinished VMIM, live-migratable, and whose eviction strategy migrates
  (LiveMigrate; LiveMigrateIfPossible only when migratable).
- How (``GenerateNewMigration``): a VMIM ``kubevirt-evacuation-*`` annotated
  ``kubevirt.io/evacuationMigration: <node>``. With MigrationPriorityQueue on (always in 1.9)
  one for every candidate at once, ``priority: system-critical`` (``system-maintenance`` for
  the descheduler), and the migration controller's queue enforces the limits; with it off
  (1.7/1.8 default) no priority, and only as many as ``min(parallelMigrationsPerCluster -
  running, parallelOutboundMigrationsPerNode - running from the node)``.
- The backoff after failures is the migration controller's (``handleMigrationBackoff``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from virtshift.k8s import rest
from virtshift.k8s.rest import ApiError
from virtshift.sim.flight import EVACUATION_ANNOTATION, IN_FLIGHT
from virtshift.sim.populate import SimVM

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

log = logging.getLogger(__name__)
DESCHEDULER = "descheduler"
EVICTION_SOURCE_ANNOTATION = "kubevirt.io/eviction-source"
RESYNC_WALL_SECONDS = 1.0


class EvacuationController:
    _evacuation_due: float = 0.0

    def _evacuate(self: KubeVirtSim, now: float) -> None:
        wall = time.monotonic()
        if wall < self._evacuation_due and not self._wake.is_set():
            return
        self._evacuation_due = wall + RESYNC_WALL_SECONDS
        taint = self.kubevirt_migrations().get("nodeDrainTaintKey") or "kubevirt.io/drain"
        tainted = {n["metadata"]["name"] for n in self.nodes.values()
                   if any(t.get("key") == taint and t.get("effect") == "NoSchedule"
                          for t in (n.get("spec") or {}).get("taints") or [])}
        unfinished = {f.vm.key for f in self.flights.values() if not f.done and f.vm}
        by_node: dict[str, list[SimVM]] = defaultdict(list)
        for vm in sorted(self.world.vms.values(), key=lambda v: v.key):
            if not vm.running or vm.key in unfinished:
                continue
            vmi = self.vmis.get(vm.key) or {}
            marked = (vmi.get("status") or {}).get("evacuationNodeName")
            if vm.node not in tainted and marked != vm.node:
                continue
            if not self._migrates_on_eviction(vm):
                continue
            by_node[vm.node].append(vm)
        if not by_node:
            return
        cluster_limit, node_limit = self.limits()
        running = [f for f in self.flights.values() if f.phase in IN_FLIGHT]
        from_node = Counter(f.source for f in running)
        for node, vms in sorted(by_node.items()):
            if self.priority_queue:
                chosen = vms
            else:
                free = min(cluster_limit - len(running), node_limit - from_node[node])
                chosen = vms[:max(free, 0)]
            for vm in chosen:
                self._create_evacuation(vm, node)

    def _migrates_on_eviction(self: KubeVirtSim, vm: SimVM) -> bool:
        """VMIMigratableOnEviction, and a LiveMigratable=True condition."""
        strategy = vm.spec.eviction_strategy
        migratable = self.blocker(vm) is None
        if strategy == "LiveMigrate":
            return migratable
        return strategy == "LiveMigrateIfPossible" and migratable

    def _create_evacuation(self: KubeVirtSim, vm: SimVM, node: str) -> None:
        spec = {"vmiName": vm.spec.name}
        if self.priority_queue:
            vmi = self.vmis.get(vm.key) or {}
            source = (vmi.get("metadata", {}).get("annotations") or {}).get(
                EVICTION_SOURCE_ANNOTATION)
            spec["priority"] = "system-maintenance" if source == DESCHEDULER \
                else "system-critical"
        body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"generateName": "kubevirt-evacuation-",
                             "namespace": vm.spec.namespace,
                             "annotations": {EVACUATION_ANNOTATION: node}},
                "spec": spec}
        try:
            created = self.controller.create(rest.VMIMS, body)
        except ApiError as exc:  # e.g. admission refused it: tried again on the next pass
            log.warning("evacuation migration of %s not created: %s", vm.key, exc)
            return
        self.vmims.put(created)
        self._register(created, self.clock.now())
