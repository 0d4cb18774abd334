"""MigrationPolicy against the API server: read what the policy's reconcile needs from the
caches, and write its KubeVirt MigrationPolicies, its VMI labels and its status.

Every write is idempotent and conditional: owned KubeVirt policies are updated with their
resourceVersion and deleted with a UID precondition, foreign ones are never touched, labels
and status are written only when they differ.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence

from virtshift.api.migrationpolicy import MigrationPolicySpec
from virtshift.domain import policy as dpolicy
from virtshift.domain import progress as dprogress
from virtshift.domain.downtime import rate_matters
from virtshift.domain.kubevirt_match import KubeVirtPolicyView
from virtshift.domain.naming import label_value
from virtshift.domain.policy import Conflict, DrainVM, VMIPolicyView
from virtshift.domain.progress import Progress, Stalled
from virtshift.domain.rules import NamedPolicy, governing_policy
from virtshift.domain.views import MigrationInfo
from virtshift.k8s import rest, views
from virtshift.k8s.cluster import Cluster
from virtshift.k8s.informer import Informer, key_of
from virtshift.k8s.rest import JSON, ApiError

log = logging.getLogger(__name__)


class PolicyStore:
    """The caches and writes of MigrationPolicy reconciles. Owns a cache of KubeVirt's
    MigrationPolicies (all of them: a foreign one with one of our names must be seen)."""

    def __init__(self, cluster: Cluster, on_change: Callable[[], None] | None = None) -> None:
        self.cluster = cluster
        self.kube = cluster.kube
        self.kubevirt = Informer(self.kube, rest.KUBEVIRT_POLICIES,
                                 on_event=lambda _k, _o: on_change() if on_change else None)

    def start(self, timeout: float = 60) -> PolicyStore:
        self.kubevirt.start()
        self.kubevirt.wait_synced(timeout)
        return self

    def stop(self) -> None:
        self.kubevirt.stop()

    # -- gather ----------------------------------------------------------------------------------

    def policy(self, name: str) -> JSON | None:
        return self.cluster.policies.get(name)

    def vmi_views(self) -> list[VMIPolicyView]:
        # VMIs first, migrations second: a drain creates its VMIM before it labels the VMI
        # (k8s.actions), so any label read here that a drain wrote comes with its pin.
        vmis = self.cluster.vmis.values()
        pins: dict[str, str | None] = {}
        for obj in self.cluster.vmims.values():
            info = views.migration_info(obj)
            if info.drain and info.unfinished:  # virtshift's own, in flight
                pins[info.vmi_key] = info.policy
        out = []
        for vmi in vmis:
            meta = vmi["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            ns = self.cluster.namespaces.get(meta["namespace"]) or {}
            key = key_of(vmi)
            out.append(VMIPolicyView(
                key=key, labels=meta.get("labels") or {},
                namespace_labels=(ns.get("metadata") or {}).get("labels") or {},
                pinned=key in pins, pinned_label=pins.get(key)))
        return out

    def drain_vms(self, name: str, policies: list[NamedPolicy]) -> list[DrainVM]:
        """The VM entries of every NodeDrain's status that ``name`` governs in that drain:
        named by the drain's policyRef, else chosen by precedence from the VMI's labels (an
        entry whose VMI is gone counts only under a policyRef)."""
        out: list[DrainVM] = []
        for drain in self.cluster.drains.values():
            ref = ((drain.get("spec") or {}).get("policyRef") or {}).get("name")
            if ref and ref != name:
                continue
            for e in (drain.get("status") or {}).get("vms") or []:
                ns, vm = e.get("namespace"), e.get("name")
                if not ns or not vm:
                    continue
                if not ref:
                    vmi = self.cluster.vmis.get(f"{ns}/{vm}")
                    if vmi is None:
                        continue
                    namespace = self.cluster.namespaces.get(ns) or {}
                    chosen = governing_policy(
                        policies, vmi["metadata"].get("labels") or {},
                        (namespace.get("metadata") or {}).get("labels") or {})
                    if chosen is None or chosen.name != name:
                        continue
                out.append(DrainVM(drain=drain["metadata"]["name"], namespace=ns, name=vm,
                                   phase=e.get("phase", ""), mode=e.get("mode"),
                                   reason=e.get("reason")))
        return out

    def migrations_of(self, name: str) -> list[MigrationInfo]:
        """The VMIMs labelled with the policy, and those virtshift aborted (progressTimeout)
        that KubeVirt has removed since, from the records on their VMIs."""
        value = label_value(name)
        records = {(r.namespace, r.migration): r for v in self.cluster.vmis.values()
                   for r in views.abort_records(v) if r.policy == value}
        out = []
        for obj in self.cluster.vmims.values():
            if (obj["metadata"].get("labels") or {}).get(views.POLICY_LABEL) != value:
                continue
            info = self.cluster.migration_info(obj)
            record = records.pop((info.namespace, info.name), None)
            if record is not None:
                info = dataclasses.replace(info, aborted=record.reason)
            out.append(info)
        return out + [r.as_migration() for r in records.values()]

    def dirty_rates(self, spec: MigrationPolicySpec, governed: Sequence[str]
                    ) -> tuple[bool, list[str]]:
        """(whether there is a metrics source, the governed VMIs it has no dirty rate for),
        read only when the policy's maxDowntime or onDowntimeExceeded needs the rates (so
        such a policy keeps the source scraping, as a drain that plans does)."""
        source = self.cluster.metrics
        if not rate_matters(spec.max_downtime, spec.on_downtime_exceeded):
            return source is not None, []
        if source is None:
            return False, list(governed)
        return True, [k for k in governed if source.get(k) is None]

    # -- progressTimeout -----------------------------------------------------------------------

    def progress(self) -> tuple[dict[str, Progress], bool]:
        """What KubeVirt's data-remaining samples have shown per VMI, and whether they can be
        read now (no metrics source: nothing, never)."""
        source = self.cluster.metrics
        if source is None:
            return {}, False
        return source.progress(), source.observable()

    def abort(self, stall: Stalled, now: dt.datetime) -> bool:
        """Record the abort on the VMI, then delete the VMIM (KubeVirt aborts it). False when
        the VMIM is gone or is another object now."""
        m = stall.migration
        obj = self.cluster.vmims.get(f"{m.namespace}/{m.name}")
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return False
        meta = obj["metadata"]
        record = dprogress.record(stall, now, (meta.get("annotations") or {}).get(
            views.DRAIN_UID_ANNOTATION))
        vmi = self.cluster.vmis.get(m.vmi_key) or self.kube.get(rest.VMIS, m.vmi, m.namespace)
        if vmi is None:
            return False
        kept = [r for r in views.abort_records(vmi) if r.migration != m.name
                or r.namespace != m.namespace]
        patched = self.kube.patch(rest.VMIS, m.vmi, {"metadata": {"annotations": {
            views.ABORTED_ANNOTATION: views.abort_records_annotation([*kept, record])}}},
            m.namespace)
        self.cluster.vmis.put(patched)
        try:
            return self.kube.delete(rest.VMIMS, m.name, m.namespace, uid=meta.get("uid"))
        except ApiError as exc:
            if exc.conflict:  # the UID precondition failed: another object of that name now
                return False
            raise

    # -- KubeVirt MigrationPolicies ------------------------------------------------------------

    def apply_rendered(self, name: str, desired: list[JSON]) -> tuple[list[str], list[Conflict]]:
        """Create or update what ``name`` renders to and delete what it no longer does.
        Returns the names we own now, and the names held by someone else."""
        owned: list[str] = []
        conflicts: list[Conflict] = []
        for body in desired:
            conflict = self._apply_one(name, body)
            if conflict:
                conflicts.append(conflict)
            else:
                owned.append(body["metadata"]["name"])
        wanted = {b["metadata"]["name"] for b in desired}
        for obj in self._owned(name, live=False):
            if obj["metadata"]["name"] not in wanted:
                self._delete(obj)
        return owned, conflicts

    def kubevirt_views(self) -> list[KubeVirtPolicyView]:
        """Every KubeVirt MigrationPolicy in the cluster, as KubeVirt's matching reads it."""
        return [dpolicy.kubevirt_policy_view(o) for o in self.kubevirt.values()
                if not o["metadata"].get("deletionTimestamp")]

    def _apply_one(self, policy: str, body: JSON) -> Conflict | None:
        name = body["metadata"]["name"]
        existing = self.kubevirt.get(name)
        if existing is None:
            try:
                self.kubevirt.put(self.kube.create(rest.KUBEVIRT_POLICIES, body))
                return None
            except ApiError as exc:
                if not exc.conflict:
                    raise
            existing = self.kube.get(rest.KUBEVIRT_POLICIES, name)
            if existing is None:
                raise RuntimeError(f"KubeVirt MigrationPolicy {name} vanished while created")
        conflict = dpolicy.ownership(existing, policy)
        if conflict or dpolicy.up_to_date(existing, body):
            return conflict
        try:
            self.kubevirt.put(self.kube.replace(rest.KUBEVIRT_POLICIES,
                                                dpolicy.updated(existing, body)))
        except ApiError as exc:
            if not exc.conflict:  # 409: changed meanwhile; the next reconcile sees it
                raise
            fresh = self.kube.get(rest.KUBEVIRT_POLICIES, name)
            if fresh is not None:
                self.kubevirt.put(fresh)
        return None

    def _owned(self, policy: str, live: bool) -> list[JSON]:
        value = label_value(policy)
        if live:
            return self.kube.items(rest.KUBEVIRT_POLICIES, label_selector=(
                f"{dpolicy.MANAGED_BY_LABEL}={dpolicy.MANAGER},{views.POLICY_LABEL}={value}"))
        return [o for o in self.kubevirt.values()
                if dpolicy.ownership(o, policy) is None]

    def _delete(self, obj: JSON) -> None:
        meta = obj["metadata"]
        try:
            self.kube.delete(rest.KUBEVIRT_POLICIES, meta["name"], uid=meta.get("uid"))
        except ApiError as exc:
            if not exc.conflict:  # 409: the UID precondition failed, it is another object now
                raise
        self.kubevirt.forget(meta["name"])

    def delete_rendered(self, policy: str) -> int:
        """Delete every KubeVirt policy rendered from ``policy`` (read live, not cached)."""
        owned = self._owned(policy, live=True)
        for obj in owned:
            self._delete(obj)
        return len(owned)

    # -- VMI labels ------------------------------------------------------------------------------

    def relabel(self, changes: dict[str, str | None]) -> int:
        """Set (or with None remove) virtshift.io/policy on these VMIs; returns how many."""
        written = 0
        for key, value in sorted(changes.items()):
            ns, name = key.split("/", 1)
            try:
                patched = self.kube.patch(rest.VMIS, name,
                                          {"metadata": {"labels": {views.POLICY_LABEL: value}}},
                                          ns)
            except ApiError as exc:
                if exc.not_found:
                    continue
                raise
            self.cluster.vmis.put(patched)
            written += 1
        return written

    # -- status ----------------------------------------------------------------------------------

    def write_status(self, obj: JSON, status: JSON) -> bool:
        """Merge-patch the status subresource when it changed; True if written."""
        patch = dpolicy.merge_patch(obj.get("status") or {}, status)
        if patch is None:
            return False
        try:
            written = self.kube.patch(rest.POLICIES, obj["metadata"]["name"], {"status": patch},
                                      subresource="status")
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        self.cluster.policies.put(written)
        return True
