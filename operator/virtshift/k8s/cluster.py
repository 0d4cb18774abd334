"""The operator's view of the cluster: watch-fed caches, and snapshots built from them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.api.migrationpolicy import MigrationPolicySpec
from virtshift.api.nodedrain import NodeDrain, NodeDrainStatus
from virtshift.domain.drain import ATTEMPTS_ANNOTATION, DrainSnapshot, recorded_attempts
from virtshift.domain.eta import Estimator
from virtshift.domain.naming import label_value
from virtshift.domain.rules import (
    NamedPolicy,
    PolicyRef,
    Rules,
    governing_policy,
    rules_from,
    selector_matches,
)
from virtshift.domain.storage import (
    MOVED_BY_LABEL,
    SOURCE_CLAIM_LABEL,
    VM_LABEL,
    live_migrate_updates,
)
from virtshift.domain.storage import moved_by as storage_owner
from virtshift.domain.views import AbortRecord, KubeVirtMigrationConfig, MigrationInfo, PodInfo
from virtshift.k8s import fields, rest, views
from virtshift.k8s.downtime import DowntimeSource
from virtshift.k8s.informer import ByVersion, Informer, key_of
from virtshift.k8s.kubevirt_metrics import MetricsSource
from virtshift.k8s.rest import JSON, KubeClient


class ClusterClock:
    """The operator's "now". With a time scale (simulated clusters only) it runs that many
    times faster than the wall clock from the KubeVirt CR's creationTimestamp, as the simulator's
    clock does, so timestamps the cluster writes and the operator's "now" agree."""

    def __init__(self, scale: float = 1.0, epoch: dt.datetime | None = None) -> None:
        self.scale = scale
        self.epoch = epoch

    def now(self) -> dt.datetime:
        wall = time.time()
        if self.scale == 1.0 or self.epoch is None:
            return dt.datetime.fromtimestamp(wall, dt.UTC)
        return self.epoch + dt.timedelta(seconds=(wall - self.epoch.timestamp()) * self.scale)


def _annotated(claim: JSON, annotation: str) -> str:
    """namespace/<the object a destination claim's annotation names>."""
    meta = claim["metadata"]
    return f"{meta['namespace']}/{(meta.get('annotations') or {}).get(annotation)}"


def _launcher(pod: JSON) -> tuple[PodInfo, bool, tuple[float, float]]:
    """A launcher pod's view, whether it runs (not finished nor being deleted) and what it
    requests."""
    return views.pod_info(pod), views.pod_running(pod), views.pod_requests(pod)


class NotSynced(RuntimeError):
    """A cache has not loaded its first full list: deciding now would see a cluster with
    objects missing (a node with VMIs would look empty)."""


class Cluster:
    """Caches of nodes, VMIs, VMs, VMIMs, policies and KubeVirt's settings."""

    def __init__(self, kube: KubeClient, clock: ClusterClock | None = None,
                 estimator: Estimator | None = None,
                 metrics: MetricsSource | None = None,
                 downtime: DowntimeSource | None = None) -> None:
        self.kube = kube
        self.metrics = metrics  # KubeVirt's virt-handler metrics, when a source is given
        self.downtime = downtime  # observed downtimes; None: nothing is observed
        self.clock = clock or ClusterClock()
        self.estimator = estimator or Estimator()
        self.listeners: list[Callable[[str, JSON], None]] = []
        self.nodes = Informer(kube, rest.NODES, on_event=self._notify("node"))
        self.vmis = Informer(kube, rest.VMIS, on_event=self._notify("vmi"))
        self.vms = Informer(kube, rest.VMS, on_event=self._notify("vm"))
        self.vmims = Informer(kube, rest.VMIMS, on_event=self._notify("vmim"))
        # virt-launcher pods: where VMs really run, and the CPU requirements KubeVirt keeps
        # in their node selectors across moves.
        self.launchers = Informer(kube, rest.PODS, label_selector="kubevirt.io=virt-launcher",
                                  on_event=self._notify("pod"), transform=fields.launcher)
        self.kubevirts = Informer(kube, rest.KUBEVIRTS, on_event=self._notify("kubevirt"))
        self.policies = Informer(kube, rest.POLICIES, on_event=self._notify("policy"))
        self.namespaces = Informer(kube, rest.NAMESPACES)
        self.drains = Informer(kube, rest.NODE_DRAINS)
        # Storage moves (k8s.storage): claims, the volumes behind them, their classes.
        self.pvcs = Informer(kube, rest.PVCS, on_event=self._notify("pvc"))
        self.pvs = Informer(kube, rest.PVS, transform=fields.persistent_volume)
        self.storage_classes = Informer(kube, rest.STORAGE_CLASSES)
        self._all = [self.nodes, self.vmis, self.vms, self.vmims, self.launchers,
                     self.kubevirts, self.policies, self.namespaces, self.drains,
                     self.pvcs, self.pvs, self.storage_classes]
        self.admission = threading.Lock()  # one drain at a time decides what to start
        self._launcher = ByVersion(_launcher)
        self._node = ByVersion(views.node_info)

    def _notify(self, kind: str) -> Callable[[str, JSON], None]:
        def fire(_event: str, obj: JSON) -> None:
            for listener in list(self.listeners):
                listener(kind, obj)
        return fire

    def start(self, timeout: float = 60) -> Cluster:
        if self.metrics:
            self.metrics.start()
        if self.downtime:
            self.downtime.start()
        for inf in self._all:
            inf.start()
        for inf in self._all:
            inf.wait_synced(timeout)
        return self

    def synced(self) -> bool:
        """Every cache holds its first full list."""
        return all(inf.synced for inf in self._all)

    def unsynced(self) -> list[str]:
        return [inf.res.plural for inf in self._all if not inf.synced]

    def stop(self) -> None:
        if self.metrics:
            self.metrics.stop()
        if self.downtime:
            self.downtime.stop()
        for inf in self._all:
            inf.stop()

    # -- pieces of a snapshot ----------------------------------------------------------------

    def kubevirt(self) -> JSON | None:
        items = self.kubevirts.values()
        return items[0] if items else None

    def named_policies(self) -> list[NamedPolicy]:
        out = []
        for obj in self.policies.values():
            if obj["metadata"].get("deletionTimestamp"):
                continue
            try:
                out.append(NamedPolicy(obj["metadata"]["name"],
                                       MigrationPolicySpec.model_validate(obj.get("spec") or {})))
            except ValueError:
                continue  # the policy's own handler reports it
        return out

    def policy_ref(self, name: str) -> PolicyRef:
        """What a NodeDrain's policyRef finds: the policy, whether it is being deleted, and
        whether our models take its spec (domain.rules.policy_ref_problem judges)."""
        obj = self.policies.get(name)
        if obj is None:
            return PolicyRef(name)
        terminating = bool(obj["metadata"].get("deletionTimestamp"))
        try:
            spec = MigrationPolicySpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            rejected = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors()[:5])
            return PolicyRef(name, found=True, terminating=terminating, rejected=rejected)
        return PolicyRef(name, found=True, terminating=terminating, spec=spec)

    def kubevirt_applies_max_downtime(self) -> bool:
        return views.kubevirt_applies_max_downtime(self.kubevirt())

    def kubevirt_migration_config(self) -> KubeVirtMigrationConfig:
        return views.kubevirt_migration_config(self.kubevirt())

    def rules_for(self, vmi: JSON, policies: list[NamedPolicy], policy_ref: str | None,
                  non_migratable: str | None, applies_max_downtime: bool = False,
                  kubevirt: KubeVirtMigrationConfig | None = None) -> Rules:
        ns = self.namespaces.get(vmi["metadata"]["namespace"]) or {}
        policy = governing_policy(policies, vmi["metadata"].get("labels") or {},
                                  ns.get("metadata", {}).get("labels") or {}, policy_ref)
        return rules_from(policy, non_migratable, applies_max_downtime, kubevirt)

    def usage(self) -> dict[str, tuple[float, float]]:
        """What launcher pods request per node, as the scheduler counts it."""
        used: dict[str, tuple[float, float]] = {}
        for pod in self.launchers.values():
            info, running, (cpu, mem) = self._launcher(pod)
            if not info.node or not running:
                continue
            c, m = used.get(info.node, (0.0, 0.0))
            used[info.node] = (c + cpu, m + mem)
        return used

    def _launcher_selectors(self) -> dict[str, dict[str, str]]:
        """VMI key -> node selector of its launcher pod on the VMI's node."""
        out: dict[str, dict[str, str]] = {}
        for pod in self.launchers.values():
            info, running, _requests = self._launcher(pod)
            if info.vmi and running:
                vmi = self.vmis.get(info.vmi) or {}
                if (vmi.get("status") or {}).get("nodeName") == info.node:
                    out[info.vmi] = (pod.get("spec") or {}).get("nodeSelector") or {}
        return out

    def conflict_for(self, drain: JSON, node_names: set[str]) -> str | None:
        """An older NodeDrain that already covers one of these nodes, if any."""
        me = drain["metadata"]
        mine = (me.get("creationTimestamp", ""), me["name"])
        for other in self.drains.values():
            meta = other["metadata"]
            if meta["name"] == me["name"] or meta.get("deletionTimestamp"):
                continue
            if (meta.get("creationTimestamp", ""), meta["name"]) >= mine:
                continue
            if (other.get("status") or {}).get("phase") == "Conflict":
                continue
            if node_names & self._nodes_of(other):
                return meta["name"]
        return None

    def _nodes_of(self, drain: JSON) -> set[str]:
        model = NodeDrain.model_validate(drain)
        if model.spec.node_name:
            return {model.spec.node_name}
        return {n["metadata"]["name"] for n in self.nodes.values()
                if selector_matches(model.spec.node_selector, n["metadata"].get("labels") or {})}

    def _dirty_rate(self, key: str) -> float | None:
        return self.metrics.get(key) if self.metrics else None

    def migration_info(self, obj: JSON) -> MigrationInfo:
        """A VMIM's view with its downtime, when the observation source has one, and its mode
        from its VMI while it runs."""
        observed = None
        if self.downtime and (obj.get("status") or {}).get("phase") == "Succeeded":
            observed = self.downtime.observe(obj)
        vmi_key = f"{obj['metadata']['namespace']}/{(obj.get('spec') or {}).get('vmiName')}"
        return views.migration_info(obj, downtime=observed, vmi=self.vmis.get(vmi_key))

    def _migration(self, obj: JSON,
                   aborted: Mapping[tuple[str, str], AbortRecord] | None = None) -> MigrationInfo:
        """A VMIM's view; a queued one has no source yet, so take its VMI's node. One virtshift
        aborted says why (``aborted``: its records, by namespace and name)."""
        info = self.migration_info(obj)
        record = (aborted or {}).get((info.namespace, info.name))
        if record is not None:
            info = dataclasses.replace(info, aborted=record.reason,
                                       failure=record.message if info.final else info.failure)
        if info.source:
            return info
        source = (obj["metadata"].get("labels") or {}).get(views.SOURCE_LABEL)
        if not source:
            vmi = self.vmis.get(info.vmi_key) or {}
            source = (vmi.get("status") or {}).get("nodeName")
        return dataclasses.replace(info, source=source)

    def snapshot(self, drain: JSON, blocked_pods: dict[str, str] | None = None,
                 pods: list[JSON] | None = None) -> DrainSnapshot:
        """Raises NotSynced until every cache has loaded: no decision on a partial view."""
        if not self.synced():
            raise NotSynced("caches not synced yet: " + ", ".join(self.unsynced()))
        model = NodeDrain.model_validate(drain)
        spec = model.spec
        name = drain["metadata"]["name"]
        nodes = {n["metadata"]["name"]: self._node(n) for n in self.nodes.values()}
        drain_nodes = self._nodes_of(drain)
        # This drain's own: by label (hashed past 63 characters) and by UID, so a NodeDrain
        # deleted and created again under the same name starts with a clean history.
        uid = drain["metadata"].get("uid")
        ours = [m for m in self.vmims.values()
                if (m["metadata"].get("labels") or {}).get(views.DRAIN_LABEL) == label_value(name)
                and (m["metadata"].get("annotations") or {}).get(views.DRAIN_UID_ANNOTATION,
                                                                 uid) == uid]
        # Attempts virtshift aborted (progressTimeout) and KubeVirt has since removed: they
        # still count (maxAttempts, backoff); records are kept on the VMIs.
        present = {(m["metadata"]["namespace"], m["metadata"]["name"]) for m in ours}
        records = {(r.namespace, r.migration): r for v in self.vmis.values()
                   for r in views.abort_records(v)
                   if r.drain == label_value(name) and r.drain_uid in (uid, None)}
        gone = [r.as_migration() for k, r in records.items() if k not in present]
        our_vmis = {f"{m['metadata']['namespace']}/{m['spec'].get('vmiName')}" for m in ours}
        our_vmis |= {m.vmi_key for m in gone}
        # VMs whose disks this drain moved (shared-nothing): reported to the end, however
        # they left (KubeVirt's workload updater may have made their migration).
        owner = storage_owner("drain", name)
        our_vmis |= {f"{c['metadata']['namespace']}/{a.get(VM_LABEL)}" for c in self.pvcs.values()
                     if (a := c["metadata"].get("annotations") or {}).get(MOVED_BY_LABEL) == owner}
        quick_keys = {key_of(v) for v in self.vms.values()
                      if views.QUICK_ANNOTATION in (v["metadata"].get("annotations") or {})}
        vmi_objs = {key_of(v): v for v in self.vmis.values()
                    if (v.get("status") or {}).get("nodeName") in drain_nodes
                    or key_of(v) in our_vmis or key_of(v) in quick_keys}
        policies = self.named_policies()
        selectors = self._launcher_selectors()
        policy_ref = spec.policy_ref.name if spec.policy_ref else None
        applies = self.kubevirt_applies_max_downtime()
        kubevirt = self.kubevirt_migration_config()
        rules = {k: self.rules_for(v, policies, policy_ref, spec.non_migratable, applies,
                                   kubevirt)
                 for k, v in vmi_objs.items()}
        return DrainSnapshot(
            name=name, generation=drain["metadata"].get("generation", 1), spec=spec,
            status=model.status or NodeDrainStatus(), now=self.clock.now(), nodes=nodes,
            vmis={k: views.vmi_info(v, self._dirty_rate(k), selectors.get(k))
                  for k, v in vmi_objs.items()},
            vms={k: views.vm_info(vm) for k in set(vmi_objs) | quick_keys
                 if (vm := self.vms.get(k)) is not None},
            migrations=[self._migration(m, records) for m in ours] + gone,
            cluster_unfinished=[i for m in self.vmims.values()
                                if (m.get("status") or {}).get("phase") not in FINAL_PHASES
                                and not (i := self._migration(m)).final],
            limits=views.kubevirt_limits(self.kubevirt()), rules=rules,
            conflict_with=self.conflict_for(drain, drain_nodes),
            pods=[views.pod_info(p) for p in pods or []],
            launchers=[info for p in self.launchers.values()
                       if (view := self._launcher(p))[1] and (info := view[0]).node
                       in drain_nodes],
            blocked_pods=blocked_pods or {}, usage=self.usage(), estimator=self.estimator,
            uid=uid or "",
            attempts={k: n for k, v in vmi_objs.items() if (n := recorded_attempts(
                (v["metadata"].get("annotations") or {}).get(ATTEMPTS_ANNOTATION), uid or ""))},
            **self.storage_views(set(vmi_objs)),
            metrics_source=self.metrics is not None,
            policy_ref=self.policy_ref(policy_ref) if policy_ref else None,
        )

    def storage_views(self, keys: set[str] | None = None) -> dict[str, Any]:
        """The snapshot's storage fields (domain.storage): VMs' volumes, the claims (with the
        node a local volume is pinned to), the classes, and whether KubeVirt migrates a VM
        whose volumes changed. ``keys``: only these VMs, plus every VM a storage move of
        anyone's is under way for (the class limits count them all), and only the claims
        they name; None: everything."""
        moved = [c for c in self.pvcs.values()
                 if MOVED_BY_LABEL in (c["metadata"].get("annotations") or {})]
        vms = self.vms.values() if keys is None else [
            vm for k in keys | {_annotated(c, VM_LABEL) for c in moved}
            if (vm := self.vms.get(k)) is not None]
        storage = {key_of(vm): views.vm_storage(vm, self.vmis.get(key_of(vm))) for vm in vms}
        if keys is None:
            pvcs = self.pvcs.values()
        else:
            named = {f"{st.namespace}/{c}" for st in storage.values() for v in st.volumes
                     for c in (v.claim, v.running_claim, v.vmi_claim) if c}
            named |= {key_of(c) for c in moved}
            named |= {_annotated(c, SOURCE_CLAIM_LABEL) for c in moved}
            pvcs = [c for k in named if (c := self.pvcs.get(k)) is not None]
        pvs = {p["metadata"]["name"]: p for p in self.pvs.values()}
        return {
            "storage": storage,
            "claims": {key_of(c): views.claim_info(c, pvs.get((c.get("spec") or {}).get(
                "volumeName", ""))) for c in pvcs},
            "classes": {c["metadata"]["name"]: views.class_info(c)
                        for c in self.storage_classes.values()},
            "updates_migrate": live_migrate_updates(views.workload_update_methods(
                self.kubevirt())),
        }
