"""Storage moves against the API server: views of claims, classes and VM volumes from the
caches, and the writes of domain.storage's decisions (destination claims, VM volume updates,
outcome marks, claim deletions). Every write is idempotent: a claim that exists with our labels
is ours, a VM already pointing where we want is left alone.

A claim is deleted only after a last check against everything that may refer to it, read right
before the delete (``guard``): every VM and VMI in the caches, every claim naming it as its
source, and the objects the caches do not hold -- CDI DataVolumes, CSI VolumeSnapshots,
KubeVirt VirtualMachineSnapshotContents and VirtualMachineExports in its namespace, where the
cluster serves those kinds. The delete is conditional on the claim's UID and resourceVersion as
checked."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from virtshift.domain import storage as dstorage
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
# Wall seconds a claim found held is not looked at again (nor deleted).
HELD_SECONDS = 30.0


@dataclass(frozen=True)
class ReferenceKind:
    """A kind outside the caches that may refer to a claim, and the claim names an object of it
    names (in its own namespace)."""

    group: str
    plural: str
    kind: str
    claims: Callable[[JSON], list[str]]


REFERENCE_KINDS = (
    ReferenceKind("cdi.kubevirt.io", "datavolumes", "DataVolume", views.data_volume_claims),
    ReferenceKind("snapshot.storage.k8s.io", "volumesnapshots", "VolumeSnapshot",
                  views.volume_snapshot_claims),
    ReferenceKind("snapshot.kubevirt.io", "virtualmachinesnapshotcontents",
                  "VirtualMachineSnapshotContent", views.vm_snapshot_content_claims),
    ReferenceKind("export.kubevirt.io", "virtualmachineexports", "VirtualMachineExport",
                  views.vm_export_claims),
)


class _Memo:
    """Claims found held, per API server, for HELD_SECONDS: the reads the guard makes are
    bounded (a discovery and a list per kind and namespace only when a claim there is about
    to be deleted, and no sooner than HELD_SECONDS again for a claim found held). Discovery
    answers are not kept: a kind installed since must count at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[tuple[str, str], tuple[float, str]] = {}  # (server, claim uid)


_memo = _Memo()


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
        if info.moved_by != c.moved_by or info.source_claim != c.source or (
                info.owner_uid and info.owner_uid != c.owner_uid):
            # Another owner's, or a predecessor's of the same name: it goes when its own
            # owner or the claims collector deletes it, and then this one is made.
            raise ClaimTaken(f"{c.namespace}/{c.name}") from exc
        if info.abandoned:
            # The same move made again: what was recorded of its last try no longer holds.
            created = cluster.kube.patch(rest.PVCS, c.name, {"metadata": {
                "resourceVersion": created["metadata"]["resourceVersion"],
                "annotations": {dstorage.ABANDONED_ANNOTATION: None}}}, c.namespace)
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


def delete_claim(cluster: Cluster, key: str, uid: str | None = None,
                 resource_version: str | None = None) -> None:
    ns, name = key.split("/", 1)
    try:
        cluster.kube.delete(rest.PVCS, name, ns, uid=uid, resource_version=resource_version)
    except ApiError as exc:
        if not exc.not_found:
            raise


def mark(cluster: Cluster, key: str, annotation: str, value: str) -> None:
    """Record an outcome on a claim (domain.storage.outcome_marks): set once, never changed.
    Conditional on the version the decision saw: a claim changed since (re-created as a
    destination, which clears an abandoned mark) is decided again on the next pass."""
    ns, name = key.split("/", 1)
    seen = cluster.pvcs.get(key)
    if seen is None:
        return
    meta: JSON = {"annotations": {annotation: value},
                  "resourceVersion": seen["metadata"]["resourceVersion"]}
    try:
        cluster.pvcs.put(cluster.kube.patch(rest.PVCS, name, {"metadata": meta}, ns))
    except ApiError as exc:
        if not (exc.not_found or exc.conflict):
            raise


def _served_version(cluster: Cluster, group: str) -> str | None:
    """The preferred version of an API group, or None when the cluster does not serve it."""
    try:
        found = cluster.kube.request("GET", f"/apis/{group}")
    except ApiError as exc:
        if exc.not_found:
            return None
        raise
    return (found.get("preferredVersion") or {}).get("version")


def external_references(cluster: Cluster, namespaces: set[str]
                        ) -> dict[str, list[tuple[str, str]]]:
    """claim key -> (kind, namespace/name) of the objects outside the caches that refer to
    it, in these namespaces. Raises ApiError when one cannot be read (then nothing there may
    be deleted)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for ref in REFERENCE_KINDS:
        version = _served_version(cluster, ref.group)
        if version is None:
            continue
        res = rest.Resource(ref.group, version, ref.plural)
        for ns in sorted(namespaces):
            try:
                items, _rv = cluster.kube.list(res, namespace=ns)
            except ApiError as exc:
                if exc.not_found:  # removed since discovery
                    break
                raise
            for obj in items:
                for claim in ref.claims(obj):
                    out.setdefault(f"{ns}/{claim}", []).append(
                        (ref.kind, f"{ns}/{obj['metadata']['name']}"))
    return out


def guard(cluster: Cluster, keys: list[str], failed: list[str]
          ) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """Of the claims about to be deleted: those nothing refers to -- but the destination of a
    finished move that copied it -- with their UID and resourceVersion (to delete exactly
    what was checked), and those held, with what holds them. ``failed``: why some could not
    be checked (they are kept)."""
    pvcs = {k: c for k in keys if (c := cluster.pvcs.get(k)) is not None
            and not c["metadata"].get("deletionTimestamp")}
    held: dict[str, str] = {}
    now = time.monotonic()
    with _memo.lock:
        for k, c in pvcs.items():
            hit = _memo.held.get((cluster.kube.server, c["metadata"].get("uid", "")))
            if hit is not None and now - hit[0] < HELD_SECONDS:
                held[k] = hit[1]
    todo = {k: c for k, c in pvcs.items() if k not in held}
    if not todo:
        return [], held
    seen = cluster.storage_views()
    vms, claims = list(seen["storage"].values()), seen["claims"]
    refs = dstorage.holds(vms, claims).by
    copied = dstorage.finished_copies(vms, claims)
    try:
        outside = external_references(cluster, {k.split("/", 1)[0] for k in todo})
    except ApiError as exc:
        failed.append(f"cannot check what refers to {', '.join(sorted(todo))}: {exc}")
        return [], held
    free = []
    for k, c in sorted(todo.items()):
        meta = c["metadata"]
        by = [r for r in refs.get(k, ())
              if not (r[0] == dstorage.REF_CLAIM and (k, r[1]) in copied)] + outside.get(k, [])
        if by:
            held[k] = dstorage.describe(by)
            log.info("storage: not deleting claim %s: %s refers to it", k, held[k])
            with _memo.lock:
                _memo.held = {key: hit for key, hit in _memo.held.items()
                              if now - hit[0] < HELD_SECONDS}
                _memo.held[(cluster.kube.server, meta.get("uid", ""))] = (now, held[k])
        else:
            free.append((k, meta.get("uid", ""), meta.get("resourceVersion", "")))
    return free, held


def apply(cluster: Cluster, create: list[NewClaim], update: list[VolumeUpdate],
          delete: list[str], failed: list[str]) -> dict[str, str]:
    """Claims first, then the VM updates that point at them (a VM's update only when all its
    claims exist), then deletions, each after ``guard``. A failed step is logged and added to
    ``failed``. Returns the claims not deleted because something refers to them."""
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
    _deleted, held = delete_claims(cluster, delete, failed) if delete else ([], {})
    for line in failed:
        log.warning("storage: %s", line)
    return held


def delete_claims(cluster: Cluster, keys: list[str], failed: list[str]
                  ) -> tuple[list[str], dict[str, str]]:
    """Delete these claims, each only if ``guard`` finds nothing referring to it; returns
    those deleted, and those kept for that with what holds them."""
    free, held = guard(cluster, keys, failed)
    deleted = []
    for key, uid, version in free:
        try:
            delete_claim(cluster, key, uid, version)
            deleted.append(key)
        except ApiError as exc:
            if not exc.conflict:  # changed since it was checked: decided again next pass
                failed.append(f"delete claim {key}: {exc}")
    return deleted, held


class NotChecked(ApiError):
    """What refers to a claim could not be read, or its delete failed: it is kept."""

    def __init__(self, problem: str) -> None:
        super().__init__(503, problem)


def delete_checked(cluster: Cluster, key: str) -> None:
    """One claim, as ``delete_claims`` deletes it; a failure is raised."""
    failed: list[str] = []
    delete_claims(cluster, [key], failed)
    if failed:
        raise NotChecked("; ".join(failed))


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
