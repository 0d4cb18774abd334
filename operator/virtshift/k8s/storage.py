"""Storage moves against the API server: views of claims, classes and VM volumes from the
caches, and the writes of domain.storage's decisions (destination claims, VM volume updates,
claim deletions). Every write is idempotent: a claim that exists with our labels is ours, a VM
already pointing where we want is left alone."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from virtshift.domain.storage import (
    ClaimInfo,
    NewClaim,
    VMStorage,
    VolumeUpdate,
)
from virtshift.k8s import rest, views
from virtshift.k8s.cluster import Cluster
from virtshift.k8s.rest import JSON, ApiError

log = logging.getLogger(__name__)
VOLUME_UPDATE_LABEL = "kubevirt.io/volume-update-migration"


class ClaimTaken(ApiError):
    """A claim of the destination's name exists and is not this move's."""

    def __init__(self, key: str) -> None:
        super().__init__(409, '{"reason": "AlreadyExists", "message": "PersistentVolumeClaim '
                         f'{key} exists and is not a destination virtshift made; not using it"}}')


def volume_update_migrations(cluster: Cluster) -> dict[str, list[JSON]]:
    """KubeVirt's volume-update migrations (workload updater) by VMI key."""
    out: dict[str, list[JSON]] = {}
    for m in cluster.vmims.values():
        if VOLUME_UPDATE_LABEL in (m["metadata"].get("labels") or {}):
            key = f"{m['metadata']['namespace']}/{(m.get('spec') or {}).get('vmiName')}"
            out.setdefault(key, []).append(m)
    return out


def create_claim(cluster: Cluster, c: NewClaim) -> None:
    body = views.destination_claim(c)
    try:
        created = cluster.kube.create(rest.PVCS, body)
    except ApiError as exc:
        if not exc.conflict:
            raise
        created = cluster.kube.get(rest.PVCS, c.name, c.namespace)
        if created is None:
            raise  # deleted meanwhile: the next pass creates it
        info = views.claim_info(created, None)
        if info.moved_by != c.moved_by or info.source_claim != c.source:
            raise ClaimTaken(f"{c.namespace}/{c.name}") from exc
    cluster.pvcs.put(created)


def update_volumes(cluster: Cluster, u: VolumeUpdate) -> None:
    """Point the VM's template volumes at ``u.claims`` with updateVolumesStrategy: Migration.
    A DataVolume volume becomes a claim volume and its dataVolumeTemplate goes, so the VM
    controller never re-creates the old DataVolume. Conditional on the VM's resourceVersion."""
    vm = cluster.kube.get(rest.VMS, u.vm, u.namespace)
    if vm is None:
        return
    spec = vm.get("spec") or {}
    template = (spec.get("template") or {}).get("spec") or {}
    volumes, dropped, changed = [], set(), False
    for v in template.get("volumes") or []:
        want = u.claims.get(v.get("name"))
        claim, dv = views._claim_of(v)
        if want is None or (claim == want and not dv):
            volumes.append(v)
            continue
        if dv and claim:
            dropped.add(claim)
        volumes.append({k: val for k, val in v.items()
                        if k not in ("dataVolume", "persistentVolumeClaim")}
                       | {"persistentVolumeClaim": {"claimName": want}})
        changed = True
    if not changed and spec.get("updateVolumesStrategy") == "Migration":
        cluster.vms.put(vm)
        return
    patch: dict[str, Any] = {
        "metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]},
        "spec": {"updateVolumesStrategy": "Migration",
                 "template": {"spec": {"volumes": volumes}}}}
    if dropped:
        patch["spec"]["dataVolumeTemplates"] = [
            t for t in spec.get("dataVolumeTemplates") or []
            if (t.get("metadata") or {}).get("name") not in dropped]
    cluster.vms.put(cluster.kube.patch(rest.VMS, u.vm, patch, u.namespace))


def delete_claim(cluster: Cluster, key: str) -> None:
    ns, name = key.split("/", 1)
    try:
        cluster.kube.delete(rest.PVCS, name, ns)
    except ApiError as exc:
        if not exc.not_found:
            raise


def apply(cluster: Cluster, create: list[NewClaim], update: list[VolumeUpdate],
          delete: list[str], failed: list[str]) -> None:
    """Claims first, then the VM updates that point at them (a VM's update only when all its
    claims exist), then deletions. A failed step is logged and added to ``failed``."""
    broken: set[tuple[str, str]] = set()
    for c in create:
        try:
            create_claim(cluster, c)
        except ApiError as exc:
            broken.add((c.namespace, c.vm))
            failed.append(f"create claim {c.namespace}/{c.name}: {exc}")
    for u in update:
        if (u.namespace, u.vm) in broken:
            continue
        try:
            update_volumes(cluster, u)
        except ApiError as exc:
            failed.append(f"update volumes of {u.namespace}/{u.vm}: {exc}")
    for key in delete:
        try:
            delete_claim(cluster, key)
        except ApiError as exc:
            failed.append(f"delete claim {key}: {exc}")
    for line in failed:
        log.warning("storage: %s", line)


def by_key(items: Mapping[str, VMStorage], keys: set[str]) -> dict[str, VMStorage]:
    return {k: v for k, v in items.items() if k in keys}


def copy_history(cluster: Cluster, vms: Mapping[str, VMStorage],
                 claims_by_key: Mapping[str, ClaimInfo]
                 ) -> tuple[dict[str, int], dict[str, Any]]:
    """Per VM: KubeVirt's volume-update migrations that failed since its current move began
    (its newest destination claim's creation), and when the last one that succeeded ended."""
    failed: dict[str, int] = {}
    ended: dict[str, Any] = {}
    for key, migs in volume_update_migrations(cluster).items():
        vm = vms.get(key)
        if vm is None:
            continue
        starts = [c.created for v in vm.volumes
                  if (c := claims_by_key.get(f"{vm.namespace}/{v.claim}")) and c.source_claim
                  and c.created]
        since = max(starts) if starts else None
        for m in migs:
            info = views.migration_info(m)
            if info.phase == "Failed" and since and info.created and info.created >= since:
                failed[key] = failed.get(key, 0) + 1
            if info.phase == "Succeeded" and info.ended and (
                    key not in ended or info.ended > ended[key]):
                ended[key] = info.ended
    return failed, ended
