"""Kubernetes' storage controllers, as far as KubeVirt's volume migrations need them.

No kube-controller-manager or CSI driver runs against the test API server, so the simulator
plays them for the scenario's storage classes (provisioner ``sim.virtshift.io/<class>``):

- kube-controller-manager's PV controller (pkg/controller/volume/persistentvolume/
  pv_controller.go): ``syncUnboundClaim`` -> ``provisionClaim`` (``setClaimProvisioner``:
  the ``volume.kubernetes.io/storage-provisioner`` annotations), then ``bind``:
  ``bindClaimToVolume`` sets the claim's ``spec.volumeName`` and the annotations
  ``pv.kubernetes.io/bind-completed`` and ``pv.kubernetes.io/bound-by-controller`` (the claim
  had no volumeName), ``updateClaimStatus`` copies the PV's access modes and capacity and sets
  phase Bound; the PV's phase becomes Bound. A claim whose class does not exist stays Pending
  with a Warning ``ProvisioningFailed`` Event ``storageclass.storage.k8s.io "<name>" not
  found``; a ``WaitForFirstConsumer`` claim stays Pending (Normal ``WaitForFirstConsumer``
  Event "waiting for first consumer to be created before binding") until the scheduler
  selects a node. ``reclaimVolume``: once its claim is gone, a ``Delete`` PV is Released and
  deleted.
- the CSI external-provisioner (sig-storage-lib-external-provisioner controller.go
  ``provisionClaimOperation``): the PV is named ``pvc-<claim uid>``, carries
  ``pv.kubernetes.io/provisioned-by``, the claim's access modes and requested size, the
  class's reclaim policy, a ``claimRef`` with the claim's uid, and -- for a node-local class --
  ``nodeAffinity`` on ``kubernetes.io/hostname`` of the selected node.
- the pvc-protection and pv-protection controllers (pkg/controller/volume/pvcprotection,
  pvprotection): the API server's StorageObjectInUseProtection admission adds the
  ``kubernetes.io/pvc-protection`` / ``kubernetes.io/pv-protection`` finalizers; a deleted
  claim keeps its finalizer while a pod that is not Succeeded/Failed uses it, and a deleted PV
  keeps its finalizer while Bound.
- the scheduler's VolumeBinding plugin (pkg/scheduler/framework/plugins/volumebinding):
  ``volume_constraints`` says which nodes a pod's claims allow (a missing claim or an unbound
  Immediate claim makes the pod unschedulable, a PV's node affinity pins it), and PreBind
  annotates an unbound WaitForFirstConsumer claim with ``volume.kubernetes.io/selected-node``
  so the provisioner binds it on the chosen node.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, ApiError
from virtshift.sim import objects
from virtshift.sim.scenario import StorageClassSpec

if TYPE_CHECKING:
    from virtshift.sim.kubevirt import KubeVirtSim

log = logging.getLogger(__name__)

PVC_PROTECTION = "kubernetes.io/pvc-protection"
PV_PROTECTION = "kubernetes.io/pv-protection"
UNBOUND_IMMEDIATE = "pod has unbound immediate PersistentVolumeClaims"
NODE_AFFINITY_CONFLICT = "node(s) didn't match PersistentVolume's node affinity"


def claims_of_pod(pod: JSON) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"]
            for v in (pod.get("spec") or {}).get("volumes") or []
            if (v.get("persistentVolumeClaim") or {}).get("claimName")}


def pv_nodes(pv: JSON) -> set[str] | None:
    """The hostnames a PV's required node affinity allows, or None (reachable anywhere)."""
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get(
        "nodeSelectorTerms") or []
    nodes: set[str] | None = None
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == objects.HOSTNAME_LABEL and expr.get("operator") == "In":
                nodes = (nodes or set()) | set(expr.get("values") or [])
    return nodes


class StorageControllers:
    # -- the PV controller, the provisioner and the protection controllers ------------------

    def storage_class_spec(self: KubeVirtSim, name: str | None) -> StorageClassSpec | None:
        return next((sc for sc in self.scenario.storage_classes if sc.name == name), None)

    def _storage(self: KubeVirtSim, now: float) -> None:
        in_use = self._claims_in_use()
        live_claims = set()
        for pvc in self.pvcs.values():
            meta, spec = pvc["metadata"], pvc.get("spec") or {}
            key = f"{meta['namespace']}/{meta['name']}"
            live_claims.add(meta["uid"])
            if meta.get("deletionTimestamp"):
                if PVC_PROTECTION in (meta.get("finalizers") or []) and key not in in_use and \
                        ("unprotect", meta["uid"]) not in self._storage_done:
                    self._storage_done.add(("unprotect", meta["uid"]))
                    self._submit(lambda p=pvc: self._remove_finalizer(rest.PVCS, p,
                                                                      PVC_PROTECTION))
                continue
            if spec.get("volumeName") or ("bind", meta["uid"]) in self._storage_done:
                continue
            sc = self.storage_class_spec(spec.get("storageClassName"))
            if sc is None:
                name = spec.get("storageClassName")
                message = (f'storageclass.storage.k8s.io "{name}" not found' if name else
                           "no persistent volumes available for this claim and no storage "
                           "class is set")
                self._claim_event(pvc, "Warning", "ProvisioningFailed" if name else
                                  "FailedBinding", message)
                continue
            node = (meta.get("annotations") or {}).get(objects.SELECTED_NODE_ANNOTATION)
            if sc.node_local and not node:
                self._claim_event(pvc, "Normal", "WaitForFirstConsumer",
                                  "waiting for first consumer to be created before binding")
                continue
            self.provision(pvc, sc, node)
        for pv in self.pvs.values():
            self._reclaim(pv, live_claims)

    def _claims_in_use(self: KubeVirtSim) -> set[str]:
        """pvcprotection ``podUsesPVC``: claims of pods that are not Succeeded or Failed,
        target pods still being created included."""
        used = set()
        for pod in self.pods.values():
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            ns = pod["metadata"]["namespace"]
            used |= {f"{ns}/{c}" for c in claims_of_pod(pod)}
        for f in self.flights.values():
            if f.vm is not None and f.target_pod and not f.done:
                ns = f.vm.spec.namespace
                used |= {f"{ns}/{c}" for c in (f.vm.vmi_claims or f.vm.claims).values()}
        for vm in self.world.vms.values():
            if vm.running:
                used |= {f"{vm.spec.namespace}/{c}" for c in vm.claims.values()}
        return used

    def provision(self: KubeVirtSim, pvc: JSON, sc: StorageClassSpec, node: str | None,
                  wait: bool = False) -> None:
        """provisionClaimOperation and bind, once per claim."""
        meta = pvc["metadata"]
        if ("bind", meta["uid"]) in self._storage_done:
            return
        self._storage_done.add(("bind", meta["uid"]))
        ns, name = meta["namespace"], meta["name"]

        def run() -> None:
            pv = objects.provisioned_pv(pvc, sc, node)
            try:
                created = self.kube.create(rest.PVS, pv)
            except ApiError as exc:
                if not exc.conflict:
                    raise
                created = self.kube.get(rest.PVS, pv["metadata"]["name"]) or pv
            bound = self.kube.patch(rest.PVCS, name, objects.claim_binding(
                created["metadata"]["name"], sc, node), ns)
            bound = self.kube.patch(rest.PVCS, name, objects.claim_bound_status(created), ns,
                                    subresource="status")
            self.pvcs.put(bound)
            pv_bound = self.kube.patch(rest.PVS, created["metadata"]["name"],
                                       {"status": {"phase": "Bound"}}, subresource="status")
            self.pvs.put(pv_bound)

        if wait:
            self._pool.submit(run).result(timeout=30)
        else:
            self._submit(run)

    def _reclaim(self: KubeVirtSim, pv: JSON, live_claims: set[str]) -> None:
        """reclaimVolume (Delete) and the pv-protection controller."""
        meta, spec = pv["metadata"], pv.get("spec") or {}
        ref = spec.get("claimRef") or {}
        if meta.get("deletionTimestamp"):
            if PV_PROTECTION in (meta.get("finalizers") or []) and \
                    (pv.get("status") or {}).get("phase") != "Bound" and \
                    ("unprotect", meta["uid"]) not in self._storage_done:
                self._storage_done.add(("unprotect", meta["uid"]))
                self._submit(lambda: self._remove_finalizer(rest.PVS, pv, PV_PROTECTION))
            return
        if not ref.get("uid") or ref["uid"] in live_claims or \
                spec.get("persistentVolumeReclaimPolicy") != "Delete" or \
                ("reclaim", meta["uid"]) in self._storage_done:
            return
        self._storage_done.add(("reclaim", meta["uid"]))

        def run() -> None:
            self.kube.patch(rest.PVS, meta["name"], {"status": {"phase": "Released"}},
                            subresource="status")
            self.kube.delete(rest.PVS, meta["name"])

        self._submit(run)

    def _remove_finalizer(self: KubeVirtSim, res: rest.Resource, obj: JSON,
                          finalizer: str) -> None:
        meta = obj["metadata"]
        current = self.kube.get(res, meta["name"], meta.get("namespace"))
        if current is None:
            return
        left = [f for f in current["metadata"].get("finalizers") or [] if f != finalizer]
        self.kube.patch(res, meta["name"], {"metadata": {
            "finalizers": left or None,
            "resourceVersion": current["metadata"]["resourceVersion"]}}, meta.get("namespace"))

    def _claim_event(self: KubeVirtSim, pvc: JSON, kind: str, reason: str,
                     message: str) -> None:
        meta = pvc["metadata"]
        if ("event", meta["uid"], reason) in self._storage_done:
            return
        self._storage_done.add(("event", meta["uid"], reason))
        stamp = self.clock.stamp()
        self._submit(lambda: self.kube.create(rest.EVENTS, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta["uid"]},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "persistentvolume-controller"}},
            namespace=meta["namespace"]))

    # -- the scheduler's VolumeBinding plugin ------------------------------------------------

    def volume_constraints(self: KubeVirtSim, namespace: str, claims: list[str]
                           ) -> tuple[set[str] | None, list[JSON], str | None]:
        """(nodes the claims allow or None for any, unbound WaitForFirstConsumer claims to
        bind on the chosen node, why the pod cannot be scheduled at all)."""
        allowed: set[str] | None = None
        delayed: list[JSON] = []
        for claim in claims:
            pvc = self.pvcs.get(f"{namespace}/{claim}")
            if pvc is None:
                return None, [], f'persistentvolumeclaim "{claim}" not found'
            if pvc["metadata"].get("deletionTimestamp"):
                return None, [], f'persistentvolumeclaim "{claim}" is being deleted'
            volume = (pvc.get("spec") or {}).get("volumeName")
            if volume:
                pv = self.pvs.get(volume)
                if pv is None:
                    return None, [], "pvc(s) bound to non-existent pv(s)"
                nodes = pv_nodes(pv)
                if nodes is not None:
                    allowed = nodes if allowed is None else allowed & nodes
                continue
            sc = self.storage_class_spec((pvc.get("spec") or {}).get("storageClassName"))
            if sc is None or not sc.node_local:
                return None, [], UNBOUND_IMMEDIATE
            delayed.append(pvc)
        return allowed, delayed, None
