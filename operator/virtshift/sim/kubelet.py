"""The kube-scheduler and the kubelets, as far as KubeVirt's pods need them.

The scheduler binds a migration target pod to the least allocated node that passes its filters
(ready, not cordoned, no untolerated NoSchedule/NoExecute taint, node selector as KubeVirt
renders it, anti-affinity to the source, CPU and memory requests as KubeVirt computes them:
``virtshift.domain.placement``), and only where its claims can be reached (``storage``
``volume_constraints``: a node-local PV pins the pod to its node, an unbound
WaitForFirstConsumer claim is provisioned on the chosen node, a missing or unbound Immediate
claim leaves the pod unschedulable). An unschedulable pod gets ``PodScheduled=False``
(Unschedulable). Kubelets run bound pods and finish deleting terminating ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtshift.domain.placement import choose_target, migration_selector
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
            "labels") or {}, vm.pod_selector, added)

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
