"""The kube-scheduler and the kubelets, as far as KubeVirt's pods need them.

The scheduler binds a migration target pod to the least allocated node that passes its filters
(ready, not cordoned, no untolerated NoSchedule/NoExecute taint, node selector as KubeVirt
renders it, anti-affinity to the source, CPU and memory requests as KubeVirt computes them:
``virtshift.domain.placement``), and only where its claims can be reached (``storage``
``volume_constraints``: a node-local PV pins the pod to its node, an unbound
WaitForFirstConsumer claim is provisioned on the chosen node, a missing or unbound Immediate
claim leaves the pod unschedulable). An unschedulable pod gets ``PodScheduled=False``
(Unschedulable). The pod's required node affinity (``nodeSelectorTerms``: any term, each with
all its ``matchExpressions`` and ``matchFields``; In, NotIn, Exists, DoesNotExist, Gt, Lt) is a
filter like its node selector (scheduler plugin NodeAffinity), and an unschedulable pod's
message counts the nodes each filter turned away, as kube-scheduler's FitError does
(``place_pod``). Kubelets run bound pods and finish deleting terminating ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from virtshift.domain.placement import (
    NodeView,
    choose_target,
    fits_selector,
    migration_selector,
    tolerated,
)
from virtshift.k8s import rest
from virtshift.sim import objects
from virtshift.sim.flight import Flight
from virtshift.sim.populate import SimVM, running_pod_status
from virtshift.sim.storage import NODE_AFFINITY_CONFLICT

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

READY_AFTER_BIND = 0.3  # of targetPodStartup: image pull, container start, readiness


class Kubelet:
    def target_selector(self: KubeVirtSim, vm: SimVM, source: str,
                        added: dict[str, str]) -> dict[str, str]:
        """createTargetPod's node selector for a migration of ``vm`` from ``source``."""
        node = self.nodes.get(source) or {}
        return migration_selector(vm.spec.cpu_model, (node.get("metadata") or {}).get(
            "labels") or {}, vm.pod_selector, added, vm.vmi_node_selector)

    def place_pod(self: KubeVirtSim, cpu: float, memory: float, selector: Mapping[str, str],
                  affinity: Mapping[str, Any] | None) -> tuple[str | None, str]:
        """Where the scheduler binds a new launcher pod (None: it stays Pending), and, when
        nowhere, its message: "0/N nodes are available: ..." by filter."""
        views = self.node_views()
        allowed = [n for n in views if node_affinity_matches(n, affinity)]
        target = choose_target(allowed, "", cpu, memory, self.usage(), selector)
        if target is not None:
            return target, ""
        used = self.usage()
        why: Counter[str] = Counter()
        for n in views:
            c, m = used.get(n.name, (0.0, 0.0))
            if not n.ready or not n.schedulable:
                why["node(s) were unschedulable"] += 1
            elif not tolerated(n):
                why["node(s) had untolerated taint(s)"] += 1
            elif not fits_selector(n, selector) or not node_affinity_matches(n, affinity):
                why["node(s) didn't match Pod's node affinity/selector"] += 1
            elif c + cpu > n.cpu:
                why["Insufficient cpu"] += 1
            elif m + memory > n.memory:
                why["Insufficient memory"] += 1
        return None, (f"0/{len(views)} nodes are available: "
                      + ", ".join(f"{v} {k}" for k, v in sorted(why.items())) + ".")

    def schedule_target_pod(self: KubeVirtSim, flight: Flight, at: float) -> bool:
        """Bind the target pod (pods/binding), or mark it unschedulable; True when bound."""
        vm = flight.vm
        assert vm is not None
        cpu, memory = objects.launcher_requests(vm.spec)
        ns, pod = vm.spec.namespace, flight.target_pod
        claims = sorted(set((vm.vmi_claims or vm.claims).values()))
        allowed, delayed, refusal = self.volume_constraints(ns, claims)
        views = self.node_views()
        if allowed is not None:
            views = [n for n in views if n.name in allowed]
        views = [n for n in views if node_affinity_matches(n, vm.vmi_affinity)]
        target = None if refusal else choose_target(
            views, flight.source, cpu, memory, self.usage(), flight.pod_selector)
        if target is None:
            if not flight.unschedulable:
                flight.unschedulable = True
                stamp = self.clock.stamp(at)
                total = len(self.scenario.nodes)
                why = refusal or (f"{total - len(views)} {NODE_AFFINITY_CONFLICT}; no other "
                                  "node fits the target pod" if allowed is not None else
                                  "no node fits the target pod (capacity, CPU model, node "
                                  "selector or taints)")
                self.after_pod_created(flight, lambda: self.kube.patch(
                    rest.PODS, pod, {"status": {"phase": "Pending", "conditions": [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": f"0/{total} nodes are available: {why}.",
                        "lastTransitionTime": stamp}]}}, ns, subresource="status"))
            return False
        for pvc in delayed:  # VolumeBinding PreBind: the provisioner binds on this node
            sc = self.storage_class_spec(pvc["spec"].get("storageClassName"))
            assert sc is not None
            self.provision(pvc, sc, target)
        flight.target = target
        flight.pod_ready_at = at + READY_AFTER_BIND * self.scenario.network.target_pod_startup
        self.after_pod_created(flight, lambda: self.kube.create(rest.PODS, {
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
            "target": {"apiVersion": "v1", "kind": "Node", "name": target}},
            namespace=ns, name=pod, subresource="binding"))
        return True

    def after_pod_created(self: KubeVirtSim, flight: Flight, fn) -> None:  # type: ignore[no-untyped-def]
        """Run a write about the target pod once its creation has gone through."""
        created = flight.pod_future

        def run() -> None:
            if created is not None:
                created.result(timeout=30)
            fn()

        self._submit(run)

    def _kubelet(self: KubeVirtSim) -> None:
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


def node_affinity_matches(node: NodeView, affinity: Mapping[str, Any] | None) -> bool:
    """requiredDuringSchedulingIgnoredDuringExecution of a pod's node affinity
    (k8s.io/component-helpers/scheduling/corev1/nodeaffinity): no terms, or any term whose
    requirements all hold."""
    required = ((affinity or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(_term_matches(node, term) for term in terms)


def _term_matches(node: NodeView, term: Mapping[str, Any]) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches no node
    return all(_requirement(node.labels, r) for r in expressions) and \
        all(_requirement({"metadata.name": node.name}, r) for r in fields)


def _requirement(labels: Mapping[str, str], r: Mapping[str, Any]) -> bool:
    key, op, values = r.get("key", ""), r.get("operator"), r.get("values") or []
    value = labels.get(key)
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and value is not None and values:
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False
