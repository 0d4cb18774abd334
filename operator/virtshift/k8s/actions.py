"""Carry out a drain's decision against the API server. Every write is idempotent: a 409 on
create means an earlier run (or a restart) already made it, and is success."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from virtshift.api.kubevirt import SYSTEM_MAINTENANCE
from virtshift.domain.drain import CORDONED_BY, Decision, NewMigration, stamp
from virtshift.domain.naming import label_value
from virtshift.k8s import rest, views
from virtshift.k8s.cluster import Cluster
from virtshift.k8s.rest import JSON, ApiError

log = logging.getLogger(__name__)
MANAGER = "virtshift"


def migration_body(m: NewMigration, drain: JSON) -> JSON:
    labels = {views.DRAIN_LABEL: label_value(drain["metadata"]["name"]),
              views.ATTEMPT_LABEL: str(m.attempt),
              views.SOURCE_LABEL: label_value(m.source),
              "app.kubernetes.io/managed-by": MANAGER}
    if m.policy:
        labels[views.POLICY_LABEL] = label_value(m.policy)
    spec: JSON = {"vmiName": m.vmi, "priority": SYSTEM_MAINTENANCE}
    if m.selector:
        spec["addedNodeSelector"] = dict(m.selector)
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "name": m.name, "namespace": m.namespace, "labels": labels,
            # Cluster-scoped owner, namespaced dependent: not allowed as an ownerReference,
            # so the link back is an annotation (and the label above for selection).
            "annotations": {"virtshift.io/node-drain": drain["metadata"]["name"],
                            "virtshift.io/node-drain-uid": drain["metadata"]["uid"]},
        },
        "spec": spec,
    }


class Actions:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kube = cluster.kube

    def apply(self, drain: JSON, d: Decision) -> dict[str, str]:
        """Do it all; returns pods whose eviction was refused, with the reason."""
        name = drain["metadata"]["name"]
        for node in d.cordon:
            self.cordon(node, name)
        for m in d.create:
            self.create_migration(m, drain)
        for m in d.cancel:
            self.kube.delete(rest.VMIMS, m.name, m.namespace)
        for key, source in d.halt:
            self.halt(key, source, name)
        for key in d.start:
            self.start(key)
        blocked = {}
        for key in d.evict:
            reason = self.evict(key)
            if reason:
                blocked[key] = reason
        for node in d.uncordon:
            self.uncordon(node, name)
        return blocked

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
        patched = self.kube.patch(rest.NODES, node, {
            "metadata": {"annotations": {CORDONED_BY: None},
                         "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"unschedulable": None}})
        self.cluster.nodes.put(patched)

    def label_vmi(self, m: NewMigration) -> None:
        """Before the VMIM: the labels KubeVirt's MigrationPolicy matching will read (the
        governing policy, and the ladder's mode), so KubeVirt applies the right settings."""
        vmi = self.cluster.vmis.get(f"{m.namespace}/{m.vmi}") or {}
        labels = (vmi.get("metadata") or {}).get("labels") or {}
        wanted = {views.POLICY_LABEL: label_value(m.policy) if m.policy else None,
                  views.MODE_LABEL: m.mode}
        if all(labels.get(k) == v for k, v in wanted.items()):
            return
        try:
            self.cluster.vmis.put(self.kube.patch(rest.VMIS, m.vmi,
                                                  {"metadata": {"labels": wanted}}, m.namespace))
        except ApiError as exc:
            if not exc.not_found:
                raise

    def create_migration(self, m: NewMigration, drain: JSON) -> None:
        self.label_vmi(m)
        try:
            created = self.kube.create(rest.VMIMS, migration_body(m, drain))
        except ApiError as exc:
            if not exc.conflict:
                raise
            return  # made before a restart: the deterministic name guarantees it is this one
        self.cluster.vmims.put(created)

    def halt(self, key: str, source: str, drain: str) -> None:
        """Quick migration, step one: stop the VM, recording where it ran and when."""
        ns, name = key.split("/", 1)
        record = views.quick_record(drain, source, stamp(self.cluster.clock.now()))
        patched = self.kube.patch(rest.VMS, name, {
            "metadata": {"annotations": {views.QUICK_ANNOTATION: record}},
            "spec": {"runStrategy": "Halted"}}, ns)
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
                info.drain, info.source, stamp(info.stopped_at), started=True)}}
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

    def write_status(self, drain: JSON, status: JSON) -> bool:
        """Patch status when it changed; True if written."""
        if (drain.get("status") or {}) == status:
            return False
        self.kube.patch(rest.NODE_DRAINS, drain["metadata"]["name"], {"status": status},
                        subresource="status")
        return True

    def event(self, drain: JSON, kind: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        meta = drain["metadata"]
        try:
            self.kube.create(rest.EVENTS, {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": "default"},
                "involvedObject": {"apiVersion": drain.get("apiVersion", "virtshift.io/v1alpha1"),
                                   "kind": drain.get("kind", "NodeDrain"), "name": meta["name"],
                                   "uid": meta["uid"]},
                "reason": reason, "message": message[:1024], "type": kind,
                "source": {"component": "virtshift"}, "firstTimestamp": now,
                "lastTimestamp": now, "count": 1, "reportingComponent": "virtshift",
                "reportingInstance": "virtshift",
            }, namespace="default")
        except ApiError as exc:  # events are best-effort
            log.debug("event not recorded: %s", exc)
