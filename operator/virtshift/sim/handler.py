"""The source and target virt-handlers and virt-launcher's migration monitor.

- migration-target.go: the target reports its address (PreparingTarget -> TargetReady); on
  success ``ackMigrationCompletion``/``finalizeMigration`` move the VMI (``nodeName``,
  ``completed``, ``endTimestamp``, evacuation mark cleared, volume-update state cleared).
- migration-source.go ``migrateVMI``/``setMigrationProgressStatus``: the transfer starts
  (``startTimestamp``, mode PreCopy), failures are copied to the VMI (``failed``,
  ``failureReason``, ``endTimestamp``; 1.9 also sets ``completed`` and writes ``abortStatus``
  only on failure), the mode as soon as it changes (virt-launcher's updateVMIMigrationMode
  updates the domain, whose event makes virt-handler write the VMI), and an
  ``abortRequested`` VMI is aborted (abortStatus Aborting, then Succeeded) -- unless the
  migration is in post-copy by then: libvirt refuses to abort it, the abort fails and the
  migration completes (``abort_refused``).
- virt-launcher live-migration-source.go: the transfer itself follows the pre-copy model of
  ``virtshift.domain.physics`` (progress and completion timeouts, post-copy and paused mode at
  the completion timeout) with each node's NIC shared among its migrations and each storage
  class's copy bandwidth shared among the volume copies reading from or writing to it; the
  completion budget is completionTimeoutPerGiB x (memory + migrated volumes) in decimal GB
  rounded up.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from virtshift.api.units import parse_quantity
from virtshift.domain.physics import (
    COMPLETION_TIMEOUT,
    PROGRESS_TIMEOUT,
    Mode,
    PreCopyRun,
    completion_limit,
)
from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, ApiError
from virtshift.sim import objects
from virtshift.sim.flight import Flight
from virtshift.sim.populate import SimVM

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

ABORT_LATENCY = 0.5  # simulated seconds from abortRequested to libvirt's AbortJob returning
TARGET_POD_DOWN = "Target pod is down"
MIGRATION_STATE_KEYS = (
    "migrationUid", "sourceNode", "sourcePod", "targetNode", "targetPod", "targetNodeAddress",
    "targetDirectMigrationNodePorts", "startTimestamp", "endTimestamp", "mode", "completed",
    "failed", "failureReason", "abortRequested", "abortStatus", "migrationPolicyName",
    "migrationConfiguration", "targetNodeDomainReadyTimestamp")


def failure_reason(version: str, why: str, f: Flight) -> str:
    """The failureReason KubeVirt writes (live-migration-source.go; 1.9 aborts asynchronously
    and rewrites libvirt's "canceled by client" to one message)."""
    if version == "1.9":
        return "Live migration has been aborted"
    run = f.run
    if why == PROGRESS_TIMEOUT:
        stuck = int(run.elapsed - run.last_progress) if run else f.config.progress_timeout + 1
        return f"Live migration stuck for {stuck} seconds and has been aborted"
    if why == COMPLETION_TIMEOUT:
        return (f"Live migration is not completed after {f.run_limit} seconds and has been "
                "aborted")
    return "Live migration aborted "  # sic: the trailing space is KubeVirt's


def abort_refused(run: PreCopyRun) -> bool:
    """Whether libvirt refuses to abort this transfer now: once in post-copy the guest runs on
    the target and QEMU cannot go back. virt-launcher live-migration-source.go
    asyncMigrationAbort calls dom.AbortJob(), which libvirt answers with "cannot abort
    migration in post-copy mode" (src/qemu/qemu_driver.c qemuDomainAbortJob); KubeVirt then
    sets the abort status Failed (MigrationAbortFailed) and the migration carries on to its
    end. virt-handler (migration-source.go handleMigrationAbort) asks again on later syncs
    while abortRequested stays set; each ask is refused the same way."""
    return run.mode is Mode.POST_COPY and not run.done


class Handler:
    def begin_transfer(self: KubeVirtSim, flight: Flight, now: float) -> None:
        vm, cfg = flight.vm, flight.config
        assert vm is not None
        flight.started_at = now
        if vm.migrated_volumes:  # the VMI is in a volume update: its disks move as well
            flight.volume_update = dict(vm.vmi_claims or vm.claims)
            moved = [n for n, c in (flight.volume_update or {}).items()
                     if vm.claims.get(n) != c]
            sizes = {v.name: v for v in vm.spec.volumes}
            flight.migrated_bytes = sum(sizes[n].size for n in moved if n in sizes)
            flight.disk_bytes_left = flight.migrated_bytes
            flight.copies = [(sizes[n].storage_class,
                              vm.volume_classes.get(n, sizes[n].storage_class))
                             for n in moved if n in sizes]
        flight.run_limit = completion_limit(cfg.completion_timeout_per_gib,
                                            vm.spec.memory + flight.migrated_bytes)
        flight.run = PreCopyRun(
            memory=vm.spec.memory, dirty_rate=vm.dirty_rate, max_downtime=cfg.max_downtime,
            auto_converge=cfg.allow_auto_converge, post_copy=cfg.allow_post_copy,
            completion_timeout=flight.run_limit, progress_timeout=cfg.progress_timeout,
            workload_disruption=cfg.workload_disruption,
        )
        self.touch_vmi(vm)
        self.set_phase(flight, "Running", now)
        smaller = self._smaller_destination(vm, flight)
        if smaller:
            self._fail_transfer(flight, now, smaller)
            return
        blocker = self.blocker(vm)
        if blocker and not (blocker[0] == "DisksNotLiveMigratable" and flight.volume_update):
            # Admission refuses such a VMIM; one that got past it (the VMI changed after)
            # fails in libvirt ("Live migration failed %v", live-migration-source.go).
            self._fail_transfer(flight, now, f"Live migration failed {blocker[1]}")

    def _smaller_destination(self: KubeVirtSim, vm: SimVM, flight: Flight) -> str | None:
        """QEMU refuses to mirror a disk into a smaller one; live-migration-source.go reports
        it as "Volume migration cannot be performed because the destination volume is smaller
        than the source volume: %v" ("smaller then" before 1.9)."""
        sizes = {v.name: v.size for v in vm.spec.volumes}
        for name, claim in sorted((flight.volume_update or {}).items()):
            if vm.claims.get(name) == claim or name not in sizes:
                continue
            pvc = self.pvcs.get(f"{vm.spec.namespace}/{claim}") or {}
            status, spec = pvc.get("status") or {}, pvc.get("spec") or {}
            size = (status.get("capacity") or {}).get("storage") or \
                ((spec.get("resources") or {}).get("requests") or {}).get("storage")
            if size is None or parse_quantity(size) >= sizes[name]:
                continue
            word = "than" if self.version == "1.9" else "then"
            libvirt = (f"virError(Code=1, Domain=10, Message='internal error: unable to "
                       f"execute QEMU command 'blockdev-add': The size {int(parse_quantity(size))}"
                       " has to be smaller or equal to the actual size of the containing file "
                       f"({int(sizes[name])})')")
            return ("Volume migration cannot be performed because the destination volume is "
                    f"smaller {word} the source volume: {libvirt}")
        return None

    def request_abort(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """markMigrationAbortInVmiStatus (once Running) and handleMigrationAbort: libvirt
        aborts the job shortly after, unless the migration completes first or is in post-copy
        by then (``abort_refused``)."""
        flight.abort_requested = True
        flight.abort_status = "Aborting"
        flight.abort_due = now + ABORT_LATENCY
        assert flight.vm is not None
        self.touch_vmi(flight.vm)

    def _transfer(self: KubeVirtSim, now: float, dt: float) -> None:
        """Advance every running transfer, sharing each node's NIC among its migrations: first
        the disks a volume migration moves (at the storage class's copy bandwidth), then
        memory. A NotReady node stalls the transfers through it."""
        running = [f for f in self.flights.values() if f.phase == "Running" and f.run]
        if not running or dt <= 0:
            return
        users = Counter[str]()
        for f in running:
            users[f.source] += 1
            users[f.target or ""] += 1
        nic = self.scenario.network.node_bandwidth
        copy_rates = self._copy_rates(running)
        for f in running:
            run = f.run
            assert run is not None
            start = f.progressed_to if f.progressed_to is not None else \
                f.started_at if f.started_at is not None else now - dt
            until = min(now, f.abort_due) if f.abort_due is not None else now
            f.progressed_to = max(start, until)
            share = min(nic / users[f.source], nic / users[f.target or ""])
            if f.config.bandwidth:
                share = min(share, f.config.bandwidth)
            if f.source in self.not_ready or f.target in self.not_ready:
                share = 0.0
            mode = run.mode
            t, left = start, until - start
            if left > 0 and f.disk_bytes_left > 0:
                rate = min(share, copy_rates.get(f.uid, share))
                if rate > 0:
                    used = run.advance_copying(min(left, f.disk_bytes_left / rate))
                    f.disk_bytes_left = max(0.0, f.disk_bytes_left - rate * used)
                    t, left = t + used, left - used
            if left > 0 and not run.done:
                before = run.elapsed
                run.advance(left, share if f.disk_bytes_left <= 1e-6 else 0.0)
                t += run.elapsed - before
            if run.failed:
                self._fail_transfer(f, t, failure_reason(self.version, run.failure_reason or "",
                                                         f), abort_status="Succeeded")
            elif run.done:
                self._succeed(f, t)
            elif f.abort_due is not None and now >= f.abort_due:
                self._abort_job(f, run)
            if run.mode is not mode and not f.done and f.vm is not None:
                self.touch_vmi(f.vm)  # setMigrationProgressStatus: the new mode on the VMI

    def _abort_job(self: KubeVirtSim, f: Flight, run: PreCopyRun) -> None:
        """libvirt's AbortJob, due now: the transfer fails as aborted, or, refused in
        post-copy, goes on from abort_due at the next tick (``progressed_to``) with abort
        status Failed."""
        assert f.abort_due is not None
        if abort_refused(run):
            f.abort_due, f.abort_status = None, "Failed"
            if f.vm is not None:
                self.touch_vmi(f.vm)
            return
        self._fail_transfer(f, f.abort_due, failure_reason(self.version, "abort", f),
                            abort_status="Succeeded")

    def _copy_rates(self: KubeVirtSim, running: list[Flight]) -> dict[str, float]:
        """Each storage class's copyBandwidth is shared by every volume copy reading from or
        writing to it at the moment; a migration copies its volumes at the smallest share it
        gets on any class it touches (its disks move together, as QEMU mirrors them)."""
        bandwidth = {sc.name: sc.copy_bandwidth for sc in self.scenario.storage_classes}
        users = Counter[str]()
        copying = [f for f in running if f.disk_bytes_left > 0]
        for f in copying:
            for src, dst in f.copies:
                users[src] += 1
                if dst != src:
                    users[dst] += 1
        rates = {}
        for f in copying:
            mine = Counter[str]()
            for src, dst in f.copies:
                mine[src] += 1
                if dst != src:
                    mine[dst] += 1
            shares = [bandwidth[c] * n / users[c] for c, n in mine.items() if c in bandwidth]
            if shares:
                rates[f.uid] = min(shares)
        return rates

    # -- outcomes ----------------------------------------------------------------------------

    def _succeed(self: KubeVirtSim, flight: Flight, now: float) -> None:
        run = flight.run
        vm = flight.vm
        assert run is not None and flight.target and vm is not None
        flight.downtime_ms = round(run.downtime * 1000)
        flight.ended_at = now
        flight.completed = True
        self.slots.freed(flight.source, now)
        old_pod, vm.node, vm.pod_name = vm.pod_name, flight.target, flight.target_pod or ""
        vm.pod_uid = flight.target_pod_uid
        vm.pod_selector = dict(flight.pod_selector)
        vm.target_node_label = None
        vm.clear_evacuation = True
        if flight.volume_update is not None:
            self.finish_volume_update(vm, flight)
        self.touch_vmi(vm)
        self.set_phase(flight, "Succeeded", now)
        self._submit(lambda: self.kube.delete(rest.PODS, old_pod, vm.spec.namespace,
                                              grace_seconds=0))
        self._submit(lambda: self.patch_vmim(flight, {"metadata": {"annotations": {
            objects.DOWNTIME_ANNOTATION: str(flight.downtime_ms)}}}))

    def _fail_transfer(self: KubeVirtSim, flight: Flight, now: float, reason: str,
                       abort_status: str | None = None) -> None:
        """The source reports the failure on the VMI; the controller then fails the VMIM
        ("source node reported migration failed") and the target pod goes."""
        flight.failed = True
        flight.failure = reason
        if abort_status:
            flight.abort_status = abort_status
        flight.ended_at = now
        self.slots.freed(flight.source, now)
        self._delete_target_pod(flight)
        if flight.vm is not None:
            self.touch_vmi(flight.vm)
        self.set_phase(flight, "Failed", now)

    def mark_failed_on_vmi(self: KubeVirtSim, flight: Flight, now: float) -> None:
        """handleMarkMigrationFailedOnVMI: failed and completed, with timestamps; the reason
        "Target pod is down" reaches the VMI only from 1.9 (earlier it is set after the patch
        is sent)."""
        flight.failed = flight.completed = True
        flight.ended_at = now
        if self.version == "1.7" or flight.started_at is None:
            flight.started_at = now
        if self.version == "1.9":
            flight.failure = TARGET_POD_DOWN
        if flight.vm is not None:
            self.touch_vmi(flight.vm)

    # -- what the VMI says ---------------------------------------------------------------------

    def vmi_migration_state(self: KubeVirtSim, f: Flight) -> JSON:
        """The VMI's ``status.migrationState`` for a migration that was handed off."""
        state: JSON = {"migrationUid": f.uid, "sourceNode": f.source, "sourcePod": f.source_pod,
                       "targetNode": f.target, "targetPod": f.target_pod,
                       "migrationConfiguration": f.config.wire_fields}
        if f.config.policy:
            state["migrationPolicyName"] = f.config.policy
        if f.phase in ("TargetReady", "Running") or f.started_at is not None or f.done:
            state.update(targetNodeAddress="127.0.0.1",
                         targetDirectMigrationNodePorts={"49152": 0, "49153": 49153})
        if f.started_at is not None:
            state["startTimestamp"] = self.clock.stamp(f.started_at)
            mode = f.run.mode if f.run else Mode.PRE_COPY
            state["mode"] = "PreCopy" if mode is Mode.AUTO_CONVERGE else str(mode)
        if f.abort_requested:
            state["abortRequested"] = True
        if f.abort_status and (self.version != "1.9" or f.failed):
            state["abortStatus"] = f.abort_status
        if f.completed and not f.failed:
            state.update(completed=True, endTimestamp=self.clock.stamp(f.ended_at),
                         targetNodeDomainReadyTimestamp=self.clock.stamp(f.ended_at))
        elif f.failed:
            state.update(failed=True, endTimestamp=self.clock.stamp(f.ended_at))
            if self.version == "1.9" or f.completed:
                state["completed"] = True
            if f.failure:
                state["failureReason"] = f.failure
        return state

    def write_vmi(self: KubeVirtSim, vm: SimVM) -> None:
        """One merge patch of the VMI (which has no status subresource) with what virt-handler
        and virt-controller know of it now (not of a VMI still Scheduling: VMController
        writes that one)."""
        if vm.scheduling:
            return
        status: JSON = {}
        meta: JSON = {"labels": {objects.NODE_NAME_LABEL: vm.node,
                                 objects.MIGRATION_TARGET_LABEL: vm.target_node_label}}
        owner = self.flights.get(vm.migration_uid or "")
        if owner is not None and owner.handed_off:
            state = dict.fromkeys(MIGRATION_STATE_KEYS)  # replaced, not merged
            state.update(self.vmi_migration_state(owner))
            status["migrationState"] = state
        status["nodeName"] = vm.node
        if vm.pod_uid:
            status["activePods"] = {vm.pod_uid: vm.node}
        if vm.clear_evacuation:
            status["evacuationNodeName"] = None
            vm.clear_evacuation = False
        status["conditions"] = self.vmi_conditions(vm)
        status["migrationMethod"] = "BlockMigration" if vm.migrated_volumes or any(
            not self.shared_classes()[v.storage_class] for v in vm.spec.volumes) \
            else "LiveMigration"
        status["migratedVolumes"] = vm.migrated_volumes
        patch: JSON = {"metadata": meta, "status": status}
        if vm.vmi_claims is not None:
            specs = {v.name: v for v in vm.spec.volumes}
            patch["spec"] = {"volumes": [
                objects.volume(specs[n], c) if n in specs else
                {"name": n, "persistentVolumeClaim": {"claimName": c}}
                for n, c in vm.vmi_claims.items()]}
        try:
            self.controller.patch(rest.VMIS, vm.spec.name, patch, vm.spec.namespace)
        except ApiError as exc:
            if not exc.not_found:
                raise

    # -- conditions --------------------------------------------------------------------------

    def shared_classes(self: KubeVirtSim) -> dict[str, bool]:
        return {sc.name: sc.access_mode == "ReadWriteMany"
                for sc in self.scenario.storage_classes}

    def blocker(self: KubeVirtSim, vm: SimVM) -> tuple[str, str] | None:
        """Why the VMI cannot live-migrate now (LiveMigratable False), or None."""
        migrated = frozenset(v["volumeName"] for v in vm.migrated_volumes or [])
        return objects.not_migratable(vm.spec, self.shared_classes(), migrated)

    def vmi_conditions(self: KubeVirtSim, vm: SimVM) -> list[JSON]:
        """The VMI's conditions; a condition's lastTransitionTime moves only when it flips."""
        stamp = self.clock.stamp()
        fresh = objects.vmi_conditions(self.blocker(vm), stamp)
        if vm.volume_change is not None:
            fresh.append({"type": "VolumesChange", "lastProbeTime": None,
                          "lastTransitionTime": stamp, **vm.volume_change})
        out = []
        for cond in fresh:
            old = vm.conditions.get(cond["type"])
            if old is not None and old.get("status") == cond.get("status"):
                cond["lastTransitionTime"] = old["lastTransitionTime"]
            vm.conditions[cond["type"]] = cond
            out.append(cond)
        for gone in set(vm.conditions) - {c["type"] for c in out}:
            vm.conditions.pop(gone)
        return out
