"""Carry out a drain's decision against the API server. Every write is idempotent: a 409 on
creating a migration is success only when the existing VMIM is this NodeDrain's own (same UID
annotation) -- an earlier pass, or the run before a restart, made it; anyone else's is an
error, reported and never mistaken for ours."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from virtshift.domain.drain import (
    ATTEMPTS_ANNOTATION,
    CORDONED_BY,
    MAINTENANCE_COMPLETE,
    Decision,
    NewMigration,
    Stop,
    attempts_record,
    recorded_attempts,
)
from virtshift.domain.naming import label_value
from virtshift.domain.views import MigrationInfo, QuickMigrationRecord
from virtshift.k8s import rest, views
from virtshift.k8s import storage as kstorage
from virtshift.k8s.cluster import Cluster
from virtshift.k8s.events import EventRecorder
from virtshift.k8s.rest import JSON, TRANSPORT_ERRORS, ApiError

log = logging.getLogger(__name__)
MANAGER = "virtshift"


def migration_body(m: NewMigration, drain: JSON) -> JSON:
    labels = {views.DRAIN_LABEL: label_value(drain["metadata"]["name"]),
              views.ATTEMPT_LABEL: str(m.attempt),
              views.SOURCE_LABEL: label_value(m.source),
              "app.kubernetes.io/managed-by": MANAGER}
    if m.policy:
        labels[views.POLICY_LABEL] = label_value(m.policy)
    # No spec.priority: KubeVirt accepts it only from its own virt-controller
    # (migration-create-admitter.go), and before v1.9 only with MigrationPriorityQueue.
    spec: JSON = {"vmiName": m.vmi}
    if m.selector:
        spec["addedNodeSelector"] = dict(m.selector)
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "name": m.name, "namespace": m.namespace, "labels": labels,
            # Cluster-scoped owner, namespaced dependent: not allowed as an ownerReference,
            # so the link back is an annotation (and the label above for selection).
            "annotations": {views.DRAIN_NAME_ANNOTATION: drain["metadata"]["name"],
                            views.DRAIN_UID_ANNOTATION: drain["metadata"]["uid"]},
        },
        "spec": spec,
    }


_CLOCK_FIELDS = ("eta", "plannedSeconds")


def _same(old: JSON, new: JSON) -> bool:
    strip = lambda s: {k: v for k, v in s.items() if k not in _CLOCK_FIELDS}  # noqa: E731
    if strip(old) != strip(new):
        return False
    before, after = old.get("plannedSeconds"), new.get("plannedSeconds")
    if (before is None) != (after is None):
        return False
    if before is None or after is None:
        return True
    return abs(before - after) <= max(30.0, 0.1 * max(before, after))


def _message(exc: Exception) -> str:
    """What the API server said (its Status message), else the error itself."""
    return (exc.message if isinstance(exc, ApiError) else "") or str(exc)


class MigrationNameTaken(ApiError):
    """A VMIM of that name exists and is not this NodeDrain's: never treated as ours."""

    def __init__(self, namespace: str, name: str, owner: str | None) -> None:
        super().__init__(409, json.dumps({
            "reason": "AlreadyExists", "message": (
                f"VirtualMachineInstanceMigration {namespace}/{name} already exists and "
                + (f"belongs to NodeDrain UID {owner}" if owner else "was not made by virtshift")
                + "; not creating this migration")}))


@dataclass
class Applied:
    """What became of a decision: pods whose eviction was refused (with the reason), the
    steps that failed (each also reported as a Warning Event) with the API's message, and
    those not tried because an earlier one failed (with which). Steps are named
    "<verb> <namespace/name>" (or "<verb> <node>"), the same on every pass
    (domain.outcome)."""

    blocked: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [f"{what}: {message}" for what, message in self.failures.items()]


class Actions:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kube = cluster.kube
        self.events = EventRecorder(cluster.kube, background=True)

    def apply(self, drain: JSON, d: Decision) -> Applied:
        """Do it all. One refused write (a webhook, a conflict) is reported and does not hold
        up the others."""
        name = drain["metadata"]["name"]
        out = Applied()
        uncordon = [(f"uncordon {n}", lambda n=n: self.uncordon(n, name)) for n in d.uncordon]
        # A wave handing over (a node released, the next cordoned) uncordons first, so that
        # no more than maxUnavailable are ever unschedulable; otherwise (ending maintenance)
        # last, after the aborts and restarts.
        first, last = (uncordon, []) if d.cordon else ([], uncordon)
        steps: list[tuple[str, Callable[[], object]]] = [
            *first,
            *((f"cordon {n}", lambda n=n: self.cordon(n, name)) for n in d.cordon),
            *((f"forget maintenance {n}", lambda n=n: self.forget_maintenance(n))
              for n in d.forget_maintenance),
            *((f"claim {c.namespace}/{c.name}", lambda c=c: kstorage.create_claim(
                self.cluster, c)) for c in d.claims),
            *((f"volumes {u.namespace}/{u.vm}", lambda u=u: kstorage.update_volumes(
                self.cluster, u)) for u in d.volumes),
            *((f"revert {u.namespace}/{u.vm}", lambda u=u: kstorage.update_volumes(
                self.cluster, u)) for u in d.revert),
            *((f"create {m.namespace}/{m.name}", lambda m=m: self.create_migration(m, drain))
              for m in d.create),
            *((f"cancel {m.namespace}/{m.name}",
               lambda m=m: self.kube.delete(rest.VMIMS, m.name, m.namespace)) for m in d.cancel),
            *((f"withdraw {m.namespace}/{m.name}",
               lambda m=m: self.withdraw(m, drain["metadata"]["uid"])) for m in d.withdraw),
            *((f"stop {s.key}", lambda s=s: self.halt(s, drain)) for s in d.halt),
            *((f"start {k}", lambda k=k: self.start(k)) for k in d.start),
            *((f"finish {k}", lambda k=k: self.finish(k)) for k in d.finish),
            *((f"evict {k}", lambda k=k: self._evict_into(k, out.blocked)) for k in d.evict),
            *((f"delete claim {k}", lambda k=k: kstorage.delete_checked(self.cluster, k))
              for k in d.delete_claims),
            *last,
        ]
        cordon_failed: str | None = None  # the first cordon that failed, and why
        no_claim: dict[str, str] = {}  # VMs whose destination claim could not be made
        for what, step in steps:
            if cordon_failed and what.startswith(("create ", "stop ", "evict ", "claim ",
                                                  "volumes ")):
                out.skipped[what] = cordon_failed
                continue  # nothing leaves a node that has not been cordoned: next pass
            if what.startswith("volumes ") and what.split(" ", 1)[1] in no_claim:
                out.skipped[what] = no_claim[what.split(" ", 1)[1]]
                continue  # never point a VM at a claim that does not exist
            try:
                step()
            except (ApiError, *TRANSPORT_ERRORS) as exc:
                # A dropped connection is a failed step like a refused write: reported, and
                # the others still done; escaping here, it made kopf wait 60 s to end a
                # maintenance (test_proxy_fault[requests dropped unanswered]).
                message = _message(exc)
                if what.startswith("cordon ") and not cordon_failed:
                    cordon_failed = f"{what} failed: {message}"
                if what.startswith("claim "):
                    ns = what.split(" ", 1)[1].split("/", 1)[0]
                    no_claim.update({f"{ns}/{c.vm}": f"{what} failed: {message}"
                                     for c in d.claims
                                     if f"claim {c.namespace}/{c.name}" == what})
                log.warning("NodeDrain %s: %s failed: %s", name, what, exc)
                self.event(drain, "Warning", "WriteFailed", f"{what}: {exc}")
                out.failures[what] = message
        return out

    def _evict_into(self, key: str, blocked: dict[str, str]) -> None:
        reason = self.evict(key)
        if reason:
            blocked[key] = reason

    def cordon(self, node: str, drain: str) -> None:
        """Cordon and claim in one patch, so we later uncordon only what we cordoned."""
        current = self.cluster.nodes.get(node) or self.kube.get(rest.NODES, node)
        if current is None or (current.get("spec") or {}).get("unschedulable"):
            return
        patched = self.kube.patch(rest.NODES, node, {
            "metadata": {"annotations": {CORDONED_BY: drain},
                         "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"unschedulable": True}})
        self.cluster.nodes.put(patched)

    def uncordon(self, node: str, drain: str) -> None:
        current = self.kube.get(rest.NODES, node)
        if current is None or (current["metadata"].get("annotations") or {}).get(
                CORDONED_BY) != drain:
            return
        # The maintenance it marked complete is over: the annotation goes with the cordon.
        patched = self.kube.patch(rest.NODES, node, {
            "metadata": {"annotations": {CORDONED_BY: None, MAINTENANCE_COMPLETE: None},
                         "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"unschedulable": None}})
        self.cluster.nodes.put(patched)

    def forget_maintenance(self, node: str) -> None:
        """Remove a maintenance-complete mark set before this maintenance began."""
        patched = self.kube.patch(rest.NODES, node, {
            "metadata": {"annotations": {MAINTENANCE_COMPLETE: None}}})
        self.cluster.nodes.put(patched)

    def mark_vmi(self, m: NewMigration, drain_uid: str) -> None:
        """The labels KubeVirt's MigrationPolicy matching will read (the governing policy, and
        the ladder's mode), so KubeVirt applies the right settings, and the attempt count,
        which outlives KubeVirt's garbage collection of finished migrations.

        Written just after the VMIM is created and in our cache: from then on the
        MigrationPolicy reconcile pins the VMI's policy label to the VMIM's (k8s.policies
        vmi_views), so it never reverts what we write here (written before, a reconcile in
        between could). KubeVirt reads the labels only at the target pod's handoff, after the
        target pod has been scheduled and started."""
        vmi = self.cluster.vmis.get(f"{m.namespace}/{m.vmi}") or {}
        meta = vmi.get("metadata") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        wanted = {views.POLICY_LABEL: label_value(m.policy) if m.policy else None,
                  views.MODE_LABEL: m.mode}
        record = attempts_record(drain_uid, m.attempt)
        if all(labels.get(k) == v for k, v in wanted.items()) and \
                annotations.get(ATTEMPTS_ANNOTATION) == record:
            return
        try:
            self.cluster.vmis.put(self.kube.patch(rest.VMIS, m.vmi, {"metadata": {
                "labels": wanted, "annotations": {ATTEMPTS_ANNOTATION: record}}}, m.namespace))
        except ApiError as exc:
            if not exc.not_found:
                raise

    def withdraw(self, m: MigrationInfo, drain_uid: str) -> None:
        """Take a migration of ours out of KubeVirt's queue. It never started, so it is no
        attempt: the VMI's attempt count goes back first (a crash in between leaves the
        migration, whose own attempt label still counts), then the migration is deleted --
        only as we saw it, still queued; one KubeVirt has started meanwhile goes on."""
        current = self.cluster.vmims.get(f"{m.namespace}/{m.name}")
        if current is None or not views.migration_info(current).queued:
            return
        vmi = self.cluster.vmis.get(m.vmi_key) or {}
        annotations = (vmi.get("metadata") or {}).get("annotations") or {}
        if vmi and recorded_attempts(annotations.get(ATTEMPTS_ANNOTATION), drain_uid) \
                == m.attempt:
            try:
                self.cluster.vmis.put(self.kube.patch(rest.VMIS, m.vmi, {"metadata": {
                    "annotations": {ATTEMPTS_ANNOTATION: attempts_record(
                        drain_uid, m.attempt - 1)}}}, m.namespace))
            except ApiError as exc:
                if not exc.not_found:
                    raise
        try:
            self.kube.delete(rest.VMIMS, m.name, m.namespace,
                             uid=current["metadata"]["uid"],
                             resource_version=current["metadata"]["resourceVersion"])
        except ApiError as exc:
            if not exc.conflict:
                raise
            log.info("migration %s/%s changed before its withdrawal; the next pass decides",
                     m.namespace, m.name)

    def create_migration(self, m: NewMigration, drain: JSON) -> None:
        uid = drain["metadata"]["uid"]
        try:
            created = self.kube.create(rest.VMIMS, migration_body(m, drain))
        except ApiError as exc:
            if not exc.conflict:
                raise
            # Ours only if it carries this NodeDrain's UID (made before a restart); a
            # leftover of another incarnation, or anyone else's, is surfaced, not assumed.
            created = self.kube.get(rest.VMIMS, m.name, m.namespace)
            if created is None:
                raise  # deleted meanwhile: the next pass creates it
            owner = (created["metadata"].get("annotations") or {}).get(
                views.DRAIN_UID_ANNOTATION)
            if owner != uid:
                raise MigrationNameTaken(m.namespace, m.name, owner) from exc
        self.cluster.vmims.put(created)
        self.mark_vmi(m, uid)

    def halt(self, stop: Stop, drain: JSON) -> None:
        """Quick migration, step one: stop the VM (runStrategy Halted), recording on it for
        this drain (by UID) where it ran, when, the policy whose limits it counts against
        until it runs again, its run strategy (or the deprecated spec.running: true) to give
        back, and the node selector its restart needs (``stop.pin``)."""
        ns, name = stop.key.split("/", 1)
        vm = self.kube.get(rest.VMS, name, ns)
        if vm is None:
            return
        spec = vm.get("spec") or {}
        record = QuickMigrationRecord(
            drain=drain["metadata"]["name"], drain_uid=drain["metadata"]["uid"],
            source=stop.source, stopped_at=self.cluster.clock.now(), policy=stop.policy,
            run_strategy=views.run_strategy(spec), running=spec.get("running") is True,
            pin=dict(stop.pin or {}))
        self.cluster.vms.put(self.kube.patch(rest.VMS, name, {
            "metadata": {"annotations": {views.QUICK_ANNOTATION: views.quick_record(record)}},
            # KubeVirt refuses spec.running together with runStrategy.
            "spec": {"running": None, "runStrategy": "Halted"}}, ns))

    def start(self, key: str) -> None:
        """Quick migration, step two: the VMI is gone; run the VM again, only where the drain
        allows (the source node is cordoned): the record's node selector goes on the VM's
        template -- what it lacks of it, recorded as ``pinned`` -- and the run strategy
        becomes Always (the deprecated spec.running: true where the VM had that), in one
        write. Always, whatever the VM had: KubeVirt's VM controller (vm.go syncRunStrategy)
        starts a VM with no VMI for Always and Once, for RerunOnFailure only on a start
        request or when its status still shows another strategy, and for Manual only on a
        start request (virt-api's start subresource); ``finish`` gives the VM its own back
        once its new VMI exists, which no strategy then stops."""
        ns, name = key.split("/", 1)
        vm = self.kube.get(rest.VMS, name, ns)
        info = views.quick_info(vm) if vm else None
        if vm is None or info is None:
            return
        template = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
        present = template.get("nodeSelector") or {}
        added = {k: v for k, v in info.pin.items() if k not in present}
        record = dataclasses.replace(info, started=True, started_at=self.cluster.clock.now(),
                                     pinned=added)
        spec: JSON = {"running": True, "runStrategy": None} if info.running else {
            "runStrategy": "Always"}
        if added:
            spec["template"] = {"spec": {"nodeSelector": added}}
        self.cluster.vms.put(self.kube.patch(rest.VMS, name, {
            "metadata": {"annotations": {views.QUICK_ANNOTATION: views.quick_record(record)}},
            "spec": spec}, ns))

    def finish(self, key: str) -> None:
        """Quick migration, done: take back the node selector ``start`` added to the VM's
        template (each key only while it still holds our value), give the VM back its run
        strategy (unless someone changed it since), and remove the record, in one write.

        Under KubeVirt's vmRolloutStrategy LiveUpdate (its default) the VM controller copies
        the template's new nodeSelector onto the running VMI (vm.go handleAffinityChangeRequest,
        VMNodeSelectorPatch) and nodeSelector/affinity changes are live-updatable
        (syncRestartRequired copies them before comparing), so no RestartRequired; nothing
        migrates the VMI for it (MigrationRequired comes only from the network evaluator and
        hotplug). A run strategy changed while a VMI exists stops nothing: Manual and Once
        act only without one, RerunOnFailure only when it fails or succeeds (syncRunStrategy)."""
        ns, name = key.split("/", 1)
        vm = self.kube.get(rest.VMS, name, ns)
        info = views.quick_info(vm) if vm else None
        if vm is None or info is None:
            return
        spec = vm.get("spec") or {}
        present = (((spec.get("template") or {}).get("spec") or {}).get("nodeSelector")) or {}
        ours = [k for k, v in info.pinned.items() if present.get(k) == v]
        patch: JSON = {}
        if ours:
            patch["template"] = {"spec": {"nodeSelector": None if set(ours) == set(present)
                                          else dict.fromkeys(ours)}}
        if not info.running and spec.get("runStrategy") == "Always" and \
                info.run_strategy != "Always":
            patch["runStrategy"] = info.run_strategy
        self.cluster.vms.put(self.kube.patch(rest.VMS, name, {
            "metadata": {"annotations": {views.QUICK_ANNOTATION: None},
                         "resourceVersion": vm["metadata"]["resourceVersion"]},
            **({"spec": patch} if patch else {})}, ns))

    def evict(self, key: str) -> str | None:
        ns, name = key.split("/", 1)
        try:
            self.kube.create(rest.PODS, {"apiVersion": "policy/v1", "kind": "Eviction",
                                         "metadata": {"name": name, "namespace": ns}},
                             namespace=ns, name=name, subresource="eviction")
        except ApiError as exc:
            if exc.not_found:
                return None
            if exc.status == 429:
                return exc.message
            raise
        return None

    def pods_on(self, nodes: list[str]) -> list[JSON]:
        pods: list[JSON] = []
        for node in nodes:
            pods.extend(self.kube.items(rest.PODS, field_selector=f"spec.nodeName={node}"))
        return pods

    def write_status(self, drain: JSON, status: JSON) -> JSON | None:
        """Patch status when it changed (the stored object, or None when nothing was written).

        Fields gone from the new status are sent as null, since a merge patch keeps what it
        does not mention. The clock-driven ETA alone is not a change worth a write until it
        moves by more than a tenth (or 30 seconds)."""
        old = drain.get("status") or {}
        if _same(old, status):
            return None
        patch = {**dict.fromkeys(old), **status}
        return self.kube.patch(rest.NODE_DRAINS, drain["metadata"]["name"], {"status": patch},
                               subresource="status")

    def event(self, drain: JSON, kind: str, reason: str, message: str) -> None:
        """Best effort; a repeat of the same event is counted on the Event already written
        (``k8s.events``), so a step failing on every pass does not make an Event per pass."""
        self.events.record(drain, kind, reason, message)
