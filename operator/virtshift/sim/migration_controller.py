"""virt-controller's migration controller (pkg/virt-controller/watch/migration/migration.go).

What it does, by function in KubeVirt's file:

- ``execute``/``processMigrationPhase``: a new VMIM goes Pending when the VMI's migration state
  is free (``canMigrateVMI``), else Failed; a VMIM whose VMI is gone is deleted.
- ``handleTargetPodCreation``: Pending VMIMs, in queue-priority order when MigrationPriorityQueue
  is on, get a target pod while fewer than ``parallelMigrationsPerCluster`` run in the cluster
  and ``parallelOutboundMigrationsPerNode`` leave the VMI's node (Pending -> Scheduling).
- ``handleMigrationBackoff``: evacuation and workload-update VMIMs wait 20 s after a failed one,
  doubling per further failure since the last success.
- ``createTargetPod``: a VMIM whose VMI uses a claim that does not exist gets no target pod
  (RenderMigrationManifest: "didn't find PVC") and stays Pending.
- ``handlePendingPodTimeout``: an unschedulable target pod is deleted after 300 s.
- ``handleTargetPodHandoff``: once the target pod is ready (Scheduled) the VMI's
  ``status.migrationState`` is replaced (migrationUid, source/target node and pod, policy,
  configuration) and the VMIM becomes PreparingTarget.
- ``updateStatus``: the failure branches (target pod down or removed, source reported failure,
  cancelled before handoff) and, once final, the VMI's state copied onto the VMIM and the
  finalizer removed.
- ``garbageCollectFinalizedMigrations``: the 5 newest finished VMIMs per VMI are kept.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

from virtshift.k8s import rest
from virtshift.k8s.informer import key_of
from virtshift.k8s.rest import JSON, ApiError
from virtshift.sim import objects
from virtshift.sim.flight import (
    ABORT_REQUESTED_CONDITION,
    FINAL,
    FINALIZER,
    IN_FLIGHT,
    QUEUE_PRIORITY,
    VMI_NAME_LABEL,
    Flight,
)
from virtshift.sim.populate import pod_suffix
from virtshift.sim.slots import first_check, requeue_delay

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

log = logging.getLogger(__name__)

UNSCHEDULABLE_TIMEOUT = 300.0  # defaultUnschedulablePendingTimeoutSeconds
BACKOFF_INITIAL = 20.0  # handleMigrationBackoff: 20 s, doubling per failure
GC_KEEP = 5  # defaultFinalizedMigrationGarbageCollectionBuffer
# Fractions of the scenario's targetPodStartup: the pod is bound, runs, and the target
# virt-handler reports its address (TargetReady) at targetPodStartup after admission.
BIND_AT, READY_AT, TARGET_READY_AT, TARGET_POD_FAILS_AT = 0.2, 0.5, 1.0, 0.75


class MigrationController:
    # -- intake ------------------------------------------------------------------------------

    def _sync_vmims(self: KubeVirtSim, now: float) -> None:
        seen = set()
        for obj in self.vmims.values():
            uid = obj["metadata"]["uid"]
            seen.add(uid)
            flight = self.flights.get(uid)
            if flight is None:
                if (obj.get("status") or {}).get("phase") in FINAL:
                    continue  # finished before we (re)started
                flight = self._register(obj, now)
                if flight is None:
                    continue
            if obj["metadata"].get("deletionTimestamp") and not flight.deleting:
                flight.deleting = True
                flight.dirty = True
        for uid, flight in list(self.flights.items()):
            if uid not in seen and (flight.finalized or not flight.done):
                self.flights.pop(uid, None)

    def _register(self: KubeVirtSim, obj: JSON, now: float) -> Flight | None:
        meta, spec = obj["metadata"], obj.get("spec", {})
        vm = self.world.vms.get(f"{meta['namespace']}/{spec.get('vmiName')}")
        if vm is None or not vm.running:
            # execute(): "Deleting migration for deleted vmi" -- and nothing else: the
            # finalizer stays, as in KubeVirt.
            if not meta.get("deletionTimestamp"):
                self._submit(lambda: self.kube.delete(rest.VMIMS, meta["name"],
                                                      meta["namespace"]))
            return None
        flight = Flight(
            key=key_of(obj), uid=meta["uid"], name=meta["name"], vm=vm, created=now,
            created_stamp=meta.get("creationTimestamp", ""),
            priority=QUEUE_PRIORITY.get(spec.get("priority") or "", 0),
            selector=spec.get("addedNodeSelector") or {},
            annotations=dict(meta.get("annotations") or {}),
            labels=dict(meta.get("labels") or {}), phase_since=now,
        )
        self.flights[flight.uid] = flight
        missing = {}
        if FINALIZER not in (meta.get("finalizers") or []) and not meta.get("deletionTimestamp"):
            missing["finalizers"] = [*(meta.get("finalizers") or []), FINALIZER]
        if VMI_NAME_LABEL not in (meta.get("labels") or {}):
            missing["labels"] = {VMI_NAME_LABEL: spec.get("vmiName", "")}
        if missing:  # the mutating webhook normally did this (ensureSelectorLabelPresent)
            self._submit(lambda: self.patch_vmim(flight, {"metadata": missing}))
        owner = self.flights.get(vm.migration_uid or "")
        if owner is None or owner is flight or owner.done:  # canMigrateVMI
            self.set_phase(flight, "Pending", now)
        else:
            flight.event = ("VMI is not eligible for migration because another migration "
                            "job is in progress.")
            self.set_phase(flight, "Failed", now)
        return flight

    # -- queue and limits ----------------------------------------------------------------------

    def _admit(self: KubeVirtSim, now: float) -> None:
        """handleTargetPodCreation for every Pending VMIM whose check is due (sim.slots):
        each queued migration starts at its first check after a slot freed -- at once for
        those a migration's end re-enqueued -- the earliest first, then by queue priority."""
        cluster_limit, node_limit = self.limits()
        running = [f for f in self.flights.values() if f.phase in IN_FLIGHT]
        outbound = Counter(f.source for f in running)
        busy = {f.vm.key for f in running if f.vm is not None}
        self.slots.trim(cluster_limit - len(running),
                        {n: node_limit - c for n, c in outbound.items()} | {
                            n: node_limit for n in self.slots.node if n not in outbound})
        pending = [f for f in self.flights.values() if f.phase == "Pending"]
        if self.priority_queue:
            pending.sort(key=lambda f: (-f.priority, f.created_stamp, f.created, f.name))
        else:
            pending.sort(key=lambda f: (f.created_stamp, f.created, f.name))
        waiting = []
        for flight in pending:
            vm = flight.vm
            assert vm is not None
            if flight.deleting:
                self._cancel_before_handoff(flight, now)
                continue
            if not vm.running or self._in_backoff(flight, now) or self._missing_claim(vm):
                continue
            self._wake_on_update(flight, now)
            waiting.append(flight)
        self._wake_on_end(waiting, cluster_limit)
        while waiting:
            best: tuple[tuple[float, int, float, int], Flight] | None = None
            for i, flight in enumerate(waiting):
                vm = flight.vm
                assert vm is not None
                if vm.key in busy or len(running) >= cluster_limit or \
                        outbound[vm.node] >= node_limit:
                    continue
                at = first_check(
                    flight.next_check if flight.next_check is not None else flight.phase_since,
                    self.slots.free_since(vm.node, cluster_limit - len(running),
                                          node_limit - outbound[vm.node]),
                    requeue_delay(flight.priority, self.priority_queue))
                rank = (at, -flight.priority, flight.wake_rank, i)
                if at <= now and (best is None or rank < best[0]):
                    best = (rank, flight)
            if best is None:
                break
            (at, *_), flight = best
            waiting.remove(flight)
            vm = flight.vm
            assert vm is not None
            self.slots.take(vm.node, cluster_limit - len(running), node_limit - outbound[vm.node])
            vm.attempts += 1
            flight.attempt = vm.attempts
            flight.source, flight.source_pod = vm.node, vm.pod_name
            self._create_target_pod(flight, at)
            self.set_phase(flight, "Scheduling", at)
            running.append(flight)
            outbound[vm.node] += 1
            busy.add(vm.key)
        for flight in waiting:  # refused at each due check: requeued after the delay
            due = flight.next_check if flight.next_check is not None else flight.phase_since
            if due <= now:
                delay = requeue_delay(flight.priority, self.priority_queue)
                flight.next_check = due + (math.floor((now - due) / delay) + 1) * delay
        self.peak["cluster"] = max(self.peak["cluster"], len(running))
        for node, count in outbound.items():
            self.peak[f"outbound/{node}"] = max(self.peak[f"outbound/{node}"], count)

    def _wake_on_end(self: KubeVirtSim, waiting: list[Flight], cluster_limit: int) -> None:
        """reEnqueueHighestPriorityPendingMigrations: each migration that ended puts back at
        once parallelMigrationsPerCluster Pending VMIMs, highest priority first, equals in any
        order (the informer's)."""
        for ended in self.slots.ended():
            pending = [f for f in waiting if f.phase_since <= ended]
            self.rng.shuffle(pending)
            pending.sort(key=lambda f: -f.priority)
            for rank, flight in enumerate(pending[:cluster_limit]):
                if flight.next_check is None or flight.next_check > ended:
                    flight.next_check = ended
                    flight.wake_rank = rank

    def _wake_on_update(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """updateMigration / updateVMI: a change to the VMIM or its VMI (a new
        resourceVersion) puts the VMIM on the queue at once."""
        vm = flight.vm
        assert vm is not None
        versions = (((self.vmims.get(flight.key) or {}).get("metadata") or {}).get(
            "resourceVersion", ""), ((self.vmis.get(vm.key) or {}).get("metadata") or {}).get(
            "resourceVersion", ""))
        if flight.seen_versions != versions:
            if flight.seen_versions != ("", ""):
                flight.next_check = min(now, flight.next_check if flight.next_check is not None
                                        else now)
            flight.seen_versions = versions

    def _missing_claim(self: KubeVirtSim, vm) -> str | None:  # type: ignore[no-untyped-def]
        """createTargetPod -> RenderMigrationManifest fails ("didn't find PVC %v") for a claim
        that does not exist: no target pod, the VMIM stays Pending and is retried."""
        for claim in sorted(set((vm.vmi_claims or vm.claims).values())):
            if self.pvcs.get(f"{vm.spec.namespace}/{claim}") is None:
                return claim
        return None

    def _in_backoff(self: KubeVirtSim, flight: Flight, now: float) -> bool:
        """handleMigrationBackoff: only the newest backoff-eligible VMIM of a VMI waits, 20 s
        per failed predecessor, doubling, counted back to the last success."""
        if not flight.backoff_eligible or flight.vm is None:
            return False
        older = sorted((f for f in self.flights.values() if f.vm is flight.vm and
                        f.backoff_eligible and f is not flight and f.created_stamp <=
                        flight.created_stamp), key=lambda f: (f.created_stamp, f.created),
                       reverse=True)
        backoff = 0.0
        for f in older:
            if f.phase == "Succeeded":
                break
            if f.deleting:
                continue
            if f.phase == "Failed":
                backoff = BACKOFF_INITIAL if backoff == 0 else backoff * 2
        if not older or backoff == 0 or older[0].phase != "Failed" or older[0].ended_at is None:
            return False
        return now < older[0].ended_at + backoff

    # -- the phases ----------------------------------------------------------------------------

    def _advance(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """Take a migration through every phase that came due since the last tick, each at the
        simulated instant it was due, so a slow tick does not stretch simulated time."""
        for _ in range(len(IN_FLIGHT) + 1):
            phase = flight.phase
            self._step(flight, now)
            if flight.phase == phase or flight.done:
                return

    def _step(self: KubeVirtSim, flight: Flight, now: float) -> None:
        startup = self.scenario.network.target_pod_startup
        if flight.phase in ("Scheduling", "Scheduled") and flight.deleting:
            self._cancel_before_handoff(flight, now)
            return
        if flight.deleting and flight.handed_off and not any(
                c["type"] == ABORT_REQUESTED_CONDITION for c in flight.conditions):
            flight.conditions.append(self._abort_condition(now))
            flight.dirty = True
        down = next((n for n in (flight.target, flight.source) if n in self.not_ready), None)
        if flight.phase in ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady") \
                and down and flight.target:
            self._target_pod_down(flight, now)
            return
        if flight.phase == "Scheduling":
            assert flight.pod_created_at is not None
            if flight.target is None:
                if now < flight.pod_created_at + BIND_AT * startup:
                    return
                # Bound when it was due, or now if it had to wait for room.
                due = flight.pod_created_at + BIND_AT * startup
                if not self.schedule_target_pod(flight, now if flight.unschedulable else due):
                    if now - flight.pod_created_at >= UNSCHEDULABLE_TIMEOUT:
                        # deleteTimedOutTargetPod; the VMIM then fails in updateStatus.
                        self._delete_target_pod(flight)
                        flight.event = "Migration target pod was removed during active " \
                                       "migration."
                        self._fail(flight, flight.pod_created_at + UNSCHEDULABLE_TIMEOUT)
                    return
            assert flight.pod_ready_at is not None
            if now >= flight.pod_ready_at:
                self.set_phase(flight, "Scheduled", flight.pod_ready_at)
        elif flight.phase == "Scheduled" and not flight.dirty:
            # The next reconcile, once Scheduled is written (sync, case Scheduled).
            self._handoff(flight, flight.phase_since)
        elif flight.phase == "PreparingTarget":
            since = flight.handed_off_at or flight.phase_since
            fails_at = since + (TARGET_POD_FAILS_AT - READY_AT) * startup
            if self.fails_target_pod(flight) and now >= fails_at:
                self._target_pod_down(flight, fails_at)
                return
            ready_at = since + (TARGET_READY_AT - READY_AT) * startup
            if now >= ready_at:
                self.set_phase(flight, "TargetReady", ready_at)  # targetNodeAddress is set
        elif flight.phase == "TargetReady":
            self.begin_transfer(flight, flight.phase_since)
        elif flight.phase == "Running" and flight.deleting and not flight.abort_requested:
            self.request_abort(flight, now)

    def _create_target_pod(self: KubeVirtSim, flight: Flight, at: float) -> None:
        vm = flight.vm
        assert vm is not None
        flight.pod_created_at = at
        flight.target_pod = f"virt-launcher-{vm.spec.name}-{pod_suffix(self.rng)}"
        flight.pod_selector = self.target_selector(vm, flight.source, flight.selector)
        body = objects.launcher_pod(vm.spec, vm.vmi_uid, flight.target_pod, None,
                                    dict(vm.vmi_claims or vm.claims))
        body["metadata"]["labels"][objects.MIGRATION_JOB_LABEL] = flight.uid
        body["metadata"]["annotations"]["kubevirt.io/migrationJobName"] = flight.name
        body["spec"]["nodeSelector"] = flight.pod_selector
        body["spec"]["affinity"] = objects.target_pod_anti_affinity(vm.vmi_uid)

        def create() -> None:
            created = self.kube.create(rest.PODS, body)
            flight.target_pod_uid = created["metadata"]["uid"]

        flight.pod_future = self._pool.submit(create)

    def _handoff(self: KubeVirtSim, flight: Flight, at: float) -> None:
        """handleTargetPodHandoff: the VMI's migration state is replaced by this migration's."""
        vm = flight.vm
        assert vm is not None
        flight.handed_off_at = at
        flight.config = self.config_for(vm)
        vm.migration_uid = flight.uid
        vm.target_node_label = flight.target
        self.touch_vmi(vm)
        self.set_phase(flight, "PreparingTarget", at)

    # -- failures, abort, finalization -------------------------------------------------------

    def _cancel_before_handoff(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """updateStatus: "Migration failed due to being canceled" -- the target pod goes, the
        VMI is not touched."""
        self._delete_target_pod(flight)
        if not any(c["type"] == ABORT_REQUESTED_CONDITION for c in flight.conditions):
            flight.conditions.append(self._abort_condition(now))
        flight.event = "Migration failed due to being canceled"
        self._fail(flight, now)

    def _abort_condition(self: KubeVirtSim, now: float) -> JSON:
        stamp = self.clock.stamp(now)
        return {"type": ABORT_REQUESTED_CONDITION, "status": "True", "lastProbeTime": stamp,
                "lastTransitionTime": stamp}

    def _target_pod_down(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """The target pod died: before handoff the VMIM just fails; after it,
        handleMarkMigrationFailedOnVMI marks the VMI's migration failed first."""
        self._delete_target_pod(flight)
        if flight.handed_off:
            self.mark_failed_on_vmi(flight, now)
        flight.event = "Migration failed because target pod shutdown during migration"
        self._fail(flight, now)

    def _delete_target_pod(self: KubeVirtSim, flight: Flight) -> None:
        pod, vm = flight.target_pod, flight.vm
        if pod and vm is not None:
            self.after_pod_created(flight, lambda: self.kube.delete(
                rest.PODS, pod, vm.spec.namespace, grace_seconds=0))

    def _fail(self: KubeVirtSim, flight: Flight, now: float) -> None:
        flight.ended_at = now
        if flight.phase in IN_FLIGHT:
            self.slots.freed(flight.source, now)
        self.set_phase(flight, "Failed", now)

    def write_vmim(self: KubeVirtSim, f: Flight) -> None:
        """updateStatus: phase, timestamps, conditions; ``migrationState`` holds only the source
        pod until the VMIM is final, then the VMI's state (if it is still this migration's).
        Once final the finalizer goes, and older finished VMIMs of the VMI are collected."""
        state: JSON = {"sourcePod": f.source_pod} if f.source_pod else {}
        vm = f.vm
        if f.done and f.handed_off and vm is not None and vm.migration_uid == f.uid:
            state = self.vmi_migration_state(f)
        status: JSON = {"phase": f.phase, "phaseTransitionTimestamps": f.transitions,
                        "migrationState": state or None,
                        "conditions": f.conditions or None}
        self.patch_vmim(f, {"status": status}, subresource="status")
        if f.done and f.event and not f.event_sent:
            f.event_sent = True
            self._record_event(f, "Warning", "FailedMigration", f.event)
        if f.done and not f.finalized and f.final_written:
            # A later reconcile than the one that made it final (updateStatus, IsFinal).
            f.finalized = True
            obj = self.vmims.get(f.key) or {}
            finalizers = [x for x in (obj.get("metadata") or {}).get("finalizers") or []
                          if x != FINALIZER]
            self.patch_vmim(f, {"metadata": {"finalizers": finalizers or None}})
            if vm is not None:
                self._collect_garbage(vm.spec.namespace, vm.spec.name)
        elif f.done:
            f.final_written = True
            f.dirty = True

    def _record_event(self: KubeVirtSim, f: Flight, kind: str, reason: str,
                      message: str) -> None:
        """An Event on the VMIM, as virt-controller's recorder writes them."""
        ns, name = f.key.split("/", 1)
        stamp = self.clock.stamp()
        self.kube.create(rest.EVENTS, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": ns},
            "involvedObject": {"apiVersion": "kubevirt.io/v1",
                               "kind": "VirtualMachineInstanceMigration", "name": name,
                               "namespace": ns, "uid": f.uid},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "virtualmachine-controller"}}, namespace=ns)

    def _collect_garbage(self: KubeVirtSim, namespace: str, vmi: str) -> None:
        """garbageCollectFinalizedMigrations: keep the 5 newest finished VMIMs of a VMI."""
        final = []
        for obj in self.vmims.values():
            meta = obj["metadata"]
            if meta["namespace"] != namespace or obj.get("spec", {}).get("vmiName") != vmi \
                    or meta.get("deletionTimestamp"):
                continue
            flight = self.flights.get(meta["uid"])
            phase = flight.phase if flight else (obj.get("status") or {}).get("phase")
            if phase in FINAL:
                final.append((meta.get("creationTimestamp", ""), meta["name"]))
        final.sort()
        for _stamp, name in final[:-GC_KEEP]:
            try:
                self.kube.delete(rest.VMIMS, name, namespace)
            except ApiError as exc:
                if not exc.not_found:
                    raise
