"""Carry out a drain's decision against the API server. Every write is idempotent: a 409 on
creating a migration is success only when the existing VMIM is this NodeDrain's own (same UID
annotation) -- an earlier pass, or the run before a restart, made it; anyone else's is an
error, reported and never mistaken for ours."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtshift.domain.drain import (
    ATTEMPTS_ANNOTATION,
    CORDONED_BY,
    MAINTENANCE_COMPLETE,
    Decision,
    NewMigration,
    Stop,
    attempts_record,
    recorded_attempts,
    stamp,
)
from virtshift.domain.naming import label_value
from virtshift.domain.views import MigrationInfo
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
    """What became of a decision: pods whose eviction was refused (with the reason), and the
    steps that failed (each also reported as a Warning Event)."""

    blocked: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


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
            *((f"stop {s.key}", lambda s=s: self.halt(s, name)) for s in d.halt),
            *((f"start {k}", lambda k=k: self.start(k)) for k in d.start),
            *((f"evict {k}", lambda k=k: self._evict_into(k, out.blocked)) for k in d.evict),
            *((f"delete claim {k}", lambda k=k: kstorage.delete_checked(self.cluster, k))
              for k in d.delete_claims),
            *last,
        ]
        cordoned = True
        no_claim: set[str] = set()  # VMs whose destination claim could not be made
        for what, step in steps:
            if not cordoned and what.startswith(("create ", "stop ", "evict ", "claim ",
                                                 "volumes ")):
                continue  # nothing leaves a node that has not been cordoned: next pass
            if what.startswith("volumes ") and what.split(" ", 1)[1] in no_claim:
                continue  # never point a VM at a claim that does not exist
            try:
                step()
            except (ApiError, *TRANSPORT_ERRORS) as exc:
                # A dropped connection is a failed step like a refused write: reported, and
                # the others still done; escaping here, it made kopf wait 60 s to end a
                # maintenance (test_proxy_fault[requests dropped unanswered]).
                cordoned = cordoned and not what.startswith("cordon ")
                if what.startswith("claim "):
                    ns = what.split(" ", 1)[1].split("/", 1)[0]
                    no_claim |= {f"{ns}/{c.vm}" for c in d.claims
                                 if f"claim {c.namespace}/{c.name}" == what}
                log.warning("NodeDrain %s: %s failed: %s", name, what, exc)
                self.event(drain, "Warning", "WriteFailed", f"{what}: {exc}")
                out.failed.append(f"{what}: {exc}")
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

    def halt(self, stop: Stop, drain: str) -> None:
        """Quick migration, step one: stop the VM, recording where it ran, when, and the
        policy whose limits it counts against until it runs again."""
        ns, name = stop.key.split("/", 1)
        record = views.quick_record(drain, stop.source, stamp(self.cluster.clock.now()),
                                    policy=stop.policy)
        patched = self.kube.patch(rest.VMS, name, {
            "metadata": {"annotations": {views.QUICK_ANNOTATION: record}},
            # KubeVirt refuses spec.running together with runStrategy.
            "spec": {"running": None, "runStrategy": "Halted"}}, ns)
        self.cluster.vms.put(patched)

    def start(self, key: str) -> None:
        """Quick migration, step two: the VMI is gone; run the VM again (elsewhere: the source
        node is cordoned)."""
        ns, name = key.split("/", 1)
        vm = self.kube.get(rest.VMS, name, ns)
        if vm is None:
            return
        raw = (vm["metadata"].get("annotations") or {}).get(views.QUICK_ANNOTATION)
        patch: dict[str, Any] = {"spec": {"runStrategy": "Always"}}
        if raw:
            info = views.vm_info(vm).quick
            assert info is not None
            patch["metadata"] = {"annotations": {views.QUICK_ANNOTATION: views.quick_record(
                info.drain, info.source, stamp(info.stopped_at), started=True,
                policy=info.policy)}}
        self.cluster.vms.put(self.kube.patch(rest.VMS, name, patch, ns))

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
