"""Storage moves on KubeVirt's volume migration: live storage migration (a VM's disks to
another StorageClass, the VM stays up) and shared-nothing migration (a VM on node-local disks
leaves its node with them).

A move is: create destination claims (``<claim>-vs-<hash>``, labelled with their source), point
the VM's volumes at them with ``updateVolumesStrategy: Migration``, and let a migration copy the
disks (KubeVirt's VM controller puts the VMI in VolumesChange with ``migratedVolumes``). Its
state is read back from the cluster only: the VM points at a destination the VMI does not run on
yet (copying), both point at it (done), or neither (idle, or reverted). Cancelling points the VM
back at its sources, which KubeVirt takes as a cancellation (``VolumeMigrationCancel``).

What may be deleted (docs/storage-migration.md, "Ownership and deletion"): every destination
records its owner (kind, name and UID), its source and its VM (names and UIDs) and the
sourceClaims rule its move began under. A destination is deleted only by its owner (same UID),
or by the claims collector once that owner is gone, and only when nothing refers to it
(``holds``) and its data is provably on its source (``verdict``): its VM runs on the source or
on a later copy of it, or its VM's VMI ended without running on it (``outcome_marks``). A
source is deleted (``sourceClaims: Delete``) only by the owner of the finished move that copied
it, begun under Delete (``sources_to_delete``).

Pure: the k8s layer builds these views and carries out the decisions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from virtshift.api.migrationpolicy import SourceClaims, StorageMigration, StorageMode
from virtshift.api.storage import (
    MAX_STORAGE_ENTRIES,
    StorageCounts,
    StorageStatus,
    StorageVMEntry,
    StorageVMPhase,
    VolumeEntry,
    VolumePhase,
)
from virtshift.api.units import parse_quantity

SOURCE_CLAIM_LABEL = "virtshift.io/source-claim"
MOVED_BY_LABEL = "virtshift.io/moved-by"  # drain.<name> or policy.<name>
VM_LABEL = "virtshift.io/vm"
# On a destination claim: when its move began, by the operator's clock (which a simulated
# cluster runs faster than the API server's creationTimestamps).
STARTED_ANNOTATION = "virtshift.io/move-started"
# On a destination claim: the UID of the NodeDrain or MigrationPolicy that made it (its kind and
# name are in MOVED_BY_LABEL), and the UID of the claim it copies. Claims made before these
# existed have neither: their owner is matched by name, their source by name.
OWNER_UID_ANNOTATION = "virtshift.io/owner-uid"
SOURCE_UID_ANNOTATION = "virtshift.io/source-claim-uid"
VM_UID_ANNOTATION = "virtshift.io/vm-uid"  # the VM it was made for (a VM made again is another)
# On a destination claim, written once when virtshift sees it (outcome_marks): the VM ran on
# it (the move completed), or its VM's VMI ended without running on it (KubeVirt never
# completes that move then). They outlive the VM, which is what decides a claim whose VM is
# gone. An owner that makes the same destination again clears the second (k8s.storage).
COMPLETED_ANNOTATION = "virtshift.io/move-completed"
ABANDONED_ANNOTATION = "virtshift.io/move-abandoned"
# On a destination claim: the sourceClaims rule in force when its move began (Keep or Delete).
# A source is deleted only when both it and the rule in force now say Delete: a move begun
# under Keep keeps its source whatever policy governs the VM later.
SOURCE_CLAIMS_ANNOTATION = "virtshift.io/source-claims"
# On a StorageClass, set by the cluster's admin: its volumes are pinned to one node (besides
# what a PV's nodeAffinity says), and its sustained copy bandwidth (for predictions).
NODE_LOCAL_ANNOTATION = "virtshift.io/node-local"
COPY_BANDWIDTH_ANNOTATION = "virtshift.io/copy-bandwidth"
_SUFFIX = re.compile(r"-vs-[0-9a-f]{6}$")
DEFAULT_COPY_BANDWIDTH = 1024.0**3  # bytes/s, when neither the class nor the policy says

WORKLOAD_UPDATE_MISSING = "WorkloadUpdateMethodsMissing"
VOLUME_NOT_MIGRATABLE = "VolumeNotMigratable"
STORAGE_NOT_LIVE_MIGRATABLE = "StorageNotLiveMigratable"
MANUAL_RECOVERY = "ManualRecoveryRequired"
VOLUME_UPDATE_REFUSED = "VolumeUpdateRefused"

# Why a destination claim is deleted (verdict) ...
MOVE_SUPERSEDED = "MoveSuperseded"  # its VM runs on its source, or on another copy of it
MOVE_ABANDONED = "MoveAbandoned"  # its VM's VMI ended without running on it
# ... or kept.
CLAIM_IN_USE = "ClaimInUse"  # something refers to it
MOVE_COMPLETED = "MoveCompleted"  # its VM ran on it: it holds (or held) the VM's data
ONLY_COPY = "OnlyCopy"  # its source is gone: it may be the only copy
OUTCOME_UNKNOWN = "MoveOutcomeUnknown"  # the VM is gone and the move's outcome was never seen
# What refers to a claim (Holds), by kind.
REF_VM = "VirtualMachine"
REF_VMI = "VirtualMachineInstance"
REF_CLAIM = "PersistentVolumeClaim"  # a destination naming it as its source


@dataclass(frozen=True)
class ClaimInfo:
    namespace: str
    name: str
    storage_class: str | None = None
    size: float = 0.0  # requested bytes
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)
    volume_mode: str = "Filesystem"
    phase: str = "Bound"
    node: str | None = None  # the node its volume is pinned to (PV nodeAffinity)
    source_claim: str | None = None  # a destination of ours: the claim it copies
    moved_by: str | None = None
    vm: str | None = None  # a destination of ours: the VM it was made for
    uid: str = ""
    created: dt.datetime | None = None
    terminating: bool = False
    owner_uid: str = ""  # a destination of ours: its owner's UID ("": made before it was kept)
    source_uid: str = ""  # a destination of ours: its source's UID ("": likewise)
    completed: bool = False  # COMPLETED_ANNOTATION
    abandoned: bool = False  # ABANDONED_ANNOTATION
    source_claims: str | None = None  # SOURCE_CLAIMS_ANNOTATION (None: not recorded)
    vm_uid: str = ""  # VM_UID_ANNOTATION ("": not recorded)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Owner:
    """What makes destination claims: a NodeDrain (kind ``drain``) or a MigrationPolicy
    (``policy``), by name and UID."""

    kind: str
    name: str
    uid: str = ""

    @property
    def moved_by(self) -> str:
        return moved_by(self.kind, self.name)

    def made(self, claim: ClaimInfo) -> bool:
        """This owner made the claim: its name and, when the claim records one, its UID (a
        NodeDrain or MigrationPolicy created again under the same name is another owner)."""
        return claim.moved_by == self.moved_by and (
            not claim.owner_uid or claim.owner_uid == self.uid)


@dataclass(frozen=True)
class ClassInfo:
    name: str
    node_local: bool = False
    copy_bandwidth: float | None = None


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    claim: str | None  # what the VM's template points at (a PVC or a DataVolume's claim)
    running_claim: str | None  # what the VMI runs on (its source while migrating volumes)
    data_volume: bool = False
    vmi_claim: str | None = None  # what the VMI's spec names (the destination while migrating)
    refused: str | None = None  # why KubeVirt would not migrate this volume


@dataclass(frozen=True)
class VMStorage:
    namespace: str
    name: str
    volumes: tuple[VolumeInfo, ...] = ()
    running: bool = True  # a VMI runs
    migrating_volumes: bool = False  # the VMI's status.migratedVolumes is set
    volumes_change: bool | None = None  # the VMI's VolumesChange condition
    volumes_change_message: str | None = None
    storage_migratable: bool = True  # the VMI's StorageLiveMigratable condition
    storage_message: str | None = None
    restart_required: str | None = None  # the VM's RestartRequired condition message
    manual_recovery: str | None = None  # the VM's ManualRecoveryRequired condition
    vmi_ended: bool = False  # the VMI is being deleted or final: no move of it completes now
    uid: str = ""  # the VM's
    # Every claim the VM (volumes, dataVolumeTemplates) or its VMI (spec.volumes,
    # status.migratedVolumes) names, beyond ``volumes``: none of them is deleted.
    named: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NewClaim:
    namespace: str
    name: str
    storage_class: str
    size: float
    access_modes: tuple[str, ...]
    volume_mode: str
    source: str
    vm: str
    moved_by: str
    started: dt.datetime | None = None  # when the move began (the operator's clock)
    owner_uid: str = ""
    source_uid: str = ""
    source_claims: str = str(SourceClaims.KEEP)  # the rule in force when the move began
    vm_uid: str = ""


@dataclass(frozen=True)
class VolumeUpdate:
    """Point the VM's volumes at these claims (volume name -> claim), with
    updateVolumesStrategy: Migration."""

    namespace: str
    vm: str
    claims: Mapping[str, str]


@dataclass(frozen=True)
class Move:
    """One VM's storage move: what to create and how to repoint the VM."""

    claims: tuple[NewClaim, ...]
    update: VolumeUpdate
    entries: tuple[VolumeEntry, ...]
    target_classes: frozenset[str]
    source_classes: frozenset[str]


def destination_name(source: ClaimInfo, target_class: str) -> str:
    """``<claim>-vs-<hash>``: deterministic (a repeated pass or a restart makes the same
    claim), and unique to this source claim (its UID) and class, so a claim moved again, or
    one of the same name after a delete, never meets an earlier destination."""
    stem = _SUFFIX.sub("", source.name)[:240].rstrip("-.")
    digest = hashlib.sha256(f"{source.namespace}/{source.name}/{source.uid}/{target_class}"
                            .encode()).hexdigest()[:6]
    return f"{stem}-vs-{digest}"


def moved_by(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def node_local(claim: ClaimInfo, classes: Mapping[str, ClassInfo]) -> bool:
    cls = classes.get(claim.storage_class or "")
    return claim.node is not None or bool(cls and cls.node_local)


def _claim(vm: VMStorage, claims: Mapping[str, ClaimInfo], name: str | None) -> ClaimInfo | None:
    return claims.get(f"{vm.namespace}/{name}") if name else None


def moving(vm: VMStorage, claims: Mapping[str, ClaimInfo]) -> dict[str, tuple[str, str]]:
    """volume -> (source, destination) of the moves under way: the VM points at a destination
    of ours that the VMI does not run on yet."""
    out = {}
    for v in vm.volumes:
        c = _claim(vm, claims, v.claim)
        if c is not None and c.source_claim and v.claim != v.running_claim:
            out[v.name] = (v.running_claim or c.source_claim, c.name)
    return out


def moved(vm: VMStorage, claims: Mapping[str, ClaimInfo]) -> dict[str, tuple[str, str]]:
    """volume -> (source, destination) of finished moves: VM and VMI both on our destination."""
    out = {}
    for v in vm.volumes:
        c = _claim(vm, claims, v.claim)
        if c is not None and c.source_claim and v.claim == v.running_claim:
            out[v.name] = (c.source_claim, c.name)
    return out


def revert(vm: VMStorage, claims: Mapping[str, ClaimInfo]) -> VolumeUpdate | None:
    """Point the VM back at the claims its VMI came from (KubeVirt cancels the volume
    migration: VolumeMigrationCancel), or None when nothing is under way."""
    under_way = moving(vm, claims)
    if not under_way:
        return None
    return VolumeUpdate(vm.namespace, vm.name,
                        {name: source for name, (source, _dst) in under_way.items()})


def shared(claim: ClaimInfo) -> bool:
    """KubeVirt live-migrates a claim's disk in place only with ReadWriteMany
    (storagetypes.HasSharedAccessMode); any other must be copied."""
    return "ReadWriteMany" in claim.access_modes


def owned_moving(vm: VMStorage, claims: Mapping[str, ClaimInfo], owner: str
                 ) -> dict[str, tuple[str, str]]:
    """The moves under way whose destinations ``owner`` made."""
    return {n: p for n, p in moving(vm, claims).items()
            if (c := claims.get(f"{vm.namespace}/{p[1]}")) and c.moved_by == owner}


@dataclass(frozen=True)
class Holds:
    """What refers to each claim, as the caches show it: a VM's template (volumes and
    dataVolumeTemplates), its VMI (spec.volumes, status.migratedVolumes), or another claim of
    ours that names it as its source (a later move's source belongs to that later move).
    k8s.storage adds what the caches do not hold (DataVolumes, snapshots) right before a
    deletion."""

    by: Mapping[str, tuple[tuple[str, str], ...]]  # claim key -> ((kind, namespace/name), ...)
    # Claim keys that hold a VM's data now -- its VMI runs on them (the domain's disks), or its
    # template names them (and no VMI runs) -- and, through the destinations' source
    # annotations, every claim that data was copied from.
    current: frozenset[str]


def holds(vms: Sequence[VMStorage], claims: Mapping[str, ClaimInfo]) -> Holds:
    by: dict[str, list[tuple[str, str]]] = {}
    current: set[str] = set()
    for vm in vms:
        in_template = {v.claim for v in vm.volumes if v.claim}
        current |= {f"{vm.namespace}/{c}" for v in vm.volumes
                    if (c := v.running_claim if v.running_claim else v.claim)}
        for c in in_template | vm.named:
            by.setdefault(f"{vm.namespace}/{c}", []).append((REF_VM, vm.key))
        for c in {x for v in vm.volumes for x in (v.running_claim, v.vmi_claim) if x}:
            by.setdefault(f"{vm.namespace}/{c}", []).append((REF_VMI, vm.key))
    for c in claims.values():
        if c.source_claim and not c.terminating:
            by.setdefault(f"{c.namespace}/{c.source_claim}", []).append((REF_CLAIM, c.key))
    return Holds({k: tuple(v) for k, v in by.items()}, _with_ancestors(current, claims))


def _with_ancestors(keys: set[str], claims: Mapping[str, ClaimInfo]) -> frozenset[str]:
    """``keys`` and the claims they were copied from, transitively."""
    out, todo = set(keys), list(keys)
    while todo:
        c = claims.get(todo.pop())
        if c is not None and c.source_claim:
            source = f"{c.namespace}/{c.source_claim}"
            if source not in out:
                out.add(source)
                todo.append(source)
    return frozenset(out)


def finished_copies(vms: Sequence[VMStorage], claims: Mapping[str, ClaimInfo]
                    ) -> frozenset[tuple[str, str]]:
    """(source key, destination key) of every finished move: the one hold on a source that
    sourceClaims Delete may remove it under."""
    return frozenset((f"{vm.namespace}/{src}", f"{vm.namespace}/{dst}") for vm in vms
                     for src, dst in moved(vm, claims).values())


def describe(refs: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{kind} {key}" for kind, key in refs)


class Verdict(NamedTuple):
    delete: bool
    reason: str
    message: str


def verdict(c: ClaimInfo, claims: Mapping[str, ClaimInfo], h: Holds) -> Verdict:
    """Whether a destination claim of ours may be deleted, by whoever may delete it: only
    when nothing refers to it and its data is provably on its source, which still exists --
    its VM runs on the source (a cancelled, failed or never-started move), or on a later copy
    of the source (another owner's move won), or its VMI ended before the move completed
    (KubeVirt then never completes it). Never once its VM ran on it, never when its source is
    gone (it may be the only copy), and never when its VM is gone, or runs on a third claim,
    without virtshift having seen how its move ended (it may hold the newest data)."""
    refs = h.by.get(c.key)
    if refs:
        return Verdict(False, CLAIM_IN_USE, f"{describe(refs)} refers to it")
    if c.completed:
        return Verdict(False, MOVE_COMPLETED, f"VM {c.vm} ran on it: it holds that VM's data")
    src = claims.get(f"{c.namespace}/{c.source_claim}")
    if src is None or src.terminating or (c.source_uid and src.uid != c.source_uid):
        return Verdict(False, ONLY_COPY, f"its source {c.source_claim} is gone: it may hold "
                       "the only copy of the data")
    if c.abandoned:
        return Verdict(True, MOVE_ABANDONED, f"VM {c.vm}'s VMI ended without running on it; "
                       f"the data is on {src.name} or on a later copy of it")
    if src.key in h.current:
        return Verdict(True, MOVE_SUPERSEDED, f"its VM runs on {src.name} or on a later copy "
                       "of it")
    return Verdict(False, OUTCOME_UNKNOWN, f"VM {c.vm} is gone (or points elsewhere) and "
                   f"virtshift never saw whether it ran on this claim or on {src.name}: "
                   "kept, as it may hold the newest copy; delete it by hand if it does not")


def deletable_destinations(owner: Owner, vms: Sequence[VMStorage],
                           claims: Mapping[str, ClaimInfo],
                           keep: frozenset[str] = frozenset()) -> list[str]:
    """Claim keys of ``owner``'s destinations (same UID) that ``verdict`` lets go: cancelled,
    failed or never-started moves, so none leaks. ``keep``: claims made in this pass."""
    h = holds(vms, claims)
    return sorted(k for k, c in claims.items()
                  if c.source_claim and owner.made(c) and not c.terminating
                  and k not in keep and verdict(c, claims, h).delete)


def outcome_marks(vms: Sequence[VMStorage], claims: Mapping[str, ClaimInfo]
                  ) -> list[tuple[str, str]]:
    """(claim key, annotation) of the outcomes seen now and not recorded yet: the VM and its
    VMI run on a destination (COMPLETED_ANNOTATION); or the VMI ended -- being deleted or
    final, or KubeVirt's ManualRecoveryRequired -- without running on a destination that the
    VM or the VMI points at, or that was made for this VM (ABANDONED_ANNOTATION). KubeVirt
    completes no migration of a VMI being deleted or final: virt-handler's
    migration-source.go and migration-target.go ``execute`` only clean up after such a VMI,
    and the VM controller records ManualRecoveryRequired (vm.go ``syncVolumeMigration``)
    when the VMI went away mid volume migration."""
    out = []
    for vm in vms:
        for _volume, (_src, dst) in moved(vm, claims).items():
            c = claims[f"{vm.namespace}/{dst}"]
            if not c.completed:
                out.append((c.key, COMPLETED_ANNOTATION))
        if vm.vmi_ended or vm.manual_recovery:
            out += [(c.key, ABANDONED_ANNOTATION) for c in _never_ran(vm, claims)]
    return sorted(set(out))


def _never_ran(vm: VMStorage, claims: Mapping[str, ClaimInfo]) -> list[ClaimInfo]:
    """The destinations, not known to have completed, that this VM's ended VMI does not run
    on: those the VM's template or the VMI's spec name (a move under way, or a revert
    KubeVirt had not taken yet), and those made for this VM (same UID: a VM made again under
    the name is another) that nothing points at any more (another owner's move won)."""
    runs = {v.running_claim for v in vm.volumes}
    pointed = {n for v in vm.volumes for n in (v.claim, v.vmi_claim) if n} - runs
    return [c for c in claims.values()
            if c.namespace == vm.namespace and c.source_claim and c.name not in runs
            and not (c.completed or c.abandoned)
            and (c.name in pointed or (vm.uid and c.vm_uid == vm.uid and c.vm == vm.name))]


@dataclass
class Collection:
    """The claims collector's pass: outcomes to record, and what to delete or report of the
    destinations whose owner is gone."""

    marks: list[tuple[str, str]] = field(default_factory=list)  # (claim key, annotation)
    delete: list[tuple[str, Verdict]] = field(default_factory=list)
    kept: list[tuple[str, Verdict]] = field(default_factory=list)  # OUTCOME_UNKNOWN: reported


def owner_exists(c: ClaimInfo, owners: Mapping[str, str]) -> bool:
    """``owners``: moved_by -> UID of every NodeDrain and MigrationPolicy that exists."""
    uid = owners.get(c.moved_by or "")
    return uid is not None and (not c.owner_uid or c.owner_uid == uid)


def collect(vms: Sequence[VMStorage], claims: Mapping[str, ClaimInfo],
            owners: Mapping[str, str]) -> Collection:
    """Cluster-wide, level-triggered: record the outcomes seen, and delete the destinations
    whose owner is gone (no NodeDrain or MigrationPolicy of that name and UID) once
    ``verdict`` lets them go. An owner that exists decides about its own."""
    out = Collection(marks=outcome_marks(vms, claims))
    seen = dict(claims)
    for key, annotation in out.marks:
        seen[key] = dataclasses.replace(seen[key], completed=seen[key].completed or
                                        annotation == COMPLETED_ANNOTATION,
                                        abandoned=seen[key].abandoned or
                                        annotation == ABANDONED_ANNOTATION)
    h = holds(vms, seen)
    for key, c in sorted(seen.items()):
        if not c.source_claim or not c.moved_by or c.terminating or owner_exists(c, owners):
            continue
        v = verdict(c, seen, h)
        if v.delete:
            out.delete.append((key, v))
        elif v.reason == OUTCOME_UNKNOWN:
            out.kept.append((key, v))
    return out


def live_migrate_updates(methods: Sequence[str]) -> bool:
    """Whether KubeVirt migrates a VMI whose volumes changed: only with LiveMigrate among the
    KubeVirt CR's workloadUpdateStrategy.workloadUpdateMethods (workload-updater.go); with
    Evict alone it would shut the VM down instead."""
    return "LiveMigrate" in methods


def refusal(vm: VMStorage, volumes: Sequence[VolumeInfo], updates_migrate: bool
            ) -> tuple[str, str] | None:
    """(reason, message) when KubeVirt would refuse moving these volumes of this VM: checked
    before anything is created or changed."""
    if not updates_migrate:
        return (WORKLOAD_UPDATE_MISSING, "KubeVirt's workloadUpdateStrategy."
                "workloadUpdateMethods lacks LiveMigrate: a volume update would not be "
                "migrated (with Evict, the VM would be shut down)")
    if not vm.storage_migratable:
        return (STORAGE_NOT_LIVE_MIGRATABLE, vm.storage_message or
                "the VMI's StorageLiveMigratable condition is False")
    for v in volumes:
        if v.refused:
            return VOLUME_NOT_MIGRATABLE, f"volume {v.name}: {v.refused}"
    return None


def copy_bandwidth(classes: Mapping[str, ClassInfo], target: str,
                   spec: StorageMigration | None, per_migration: float | None,
                   parallel: int) -> float:
    """Predicted bandwidth of one copy into ``target``."""
    cls = classes.get(target)
    total = (parse_quantity(spec.copy_bandwidth) if spec and spec.copy_bandwidth else None) or \
        (cls.copy_bandwidth if cls else None) or DEFAULT_COPY_BANDWIDTH
    share = total / max(parallel, 1)
    return min(share, per_migration) if per_migration else share


def plan_move(vm: VMStorage, volumes: Sequence[VolumeInfo], claims: Mapping[str, ClaimInfo],
              target_class: str | None, spec: StorageMigration | None, owner: Owner,
              bandwidth: Mapping[str, float], now: dt.datetime | None = None) -> Move:
    """Destination claims for ``volumes`` (in ``target_class``, or each in its own class) and
    the VM update that points at them. ``bandwidth``: predicted bytes/s per target class."""
    new, update, entries = [], {}, []
    targets, sources = set(), set()
    for v in volumes:
        src = _claim(vm, claims, v.running_claim or v.claim)
        if src is None:
            continue
        cls = target_class or src.storage_class or ""
        name = destination_name(src, cls)
        new.append(NewClaim(
            namespace=vm.namespace, name=name, storage_class=cls, size=src.size,
            access_modes=(str(spec.access_mode),) if spec and spec.access_mode
            else src.access_modes,
            volume_mode=str(spec.volume_mode) if spec and spec.volume_mode else src.volume_mode,
            source=src.name, vm=vm.name, moved_by=owner.moved_by, started=now,
            owner_uid=owner.uid, source_uid=src.uid, vm_uid=vm.uid,
            source_claims=str(spec.source_claims if spec else SourceClaims.KEEP)))
        update[v.name] = name
        targets.add(cls)
        sources.add(src.storage_class or "")
        rate = bandwidth.get(cls) or DEFAULT_COPY_BANDWIDTH
        entries.append(VolumeEntry(name=v.name, source_claim=src.name, destination_claim=name,
                                   storage_class=cls, size_bytes=int(src.size),
                                   phase=VolumePhase.PENDING,
                                   predicted_seconds=round(src.size / rate, 1)))
    return Move(tuple(new), VolumeUpdate(vm.namespace, vm.name, update), tuple(entries),
                frozenset(targets), frozenset(sources))


def volume_entries(vm: VMStorage, claims: Mapping[str, ClaimInfo],
                   ended: dt.datetime | None = None) -> list[VolumeEntry]:
    """What the cluster shows of this VM's moves: copying and completed volumes."""
    out = []
    for phase, pairs in ((VolumePhase.COPYING, moving(vm, claims)),
                         (VolumePhase.COMPLETED, moved(vm, claims))):
        for name, (source, dest) in sorted(pairs.items()):
            d = claims.get(f"{vm.namespace}/{dest}")
            src = claims.get(f"{vm.namespace}/{source}")
            start = d.created if d else None
            # Only a finished copy has a duration: a growing one would rewrite status each pass.
            until = ended if phase == VolumePhase.COMPLETED else None
            out.append(VolumeEntry(
                name=name, source_claim=source, destination_claim=dest,
                storage_class=d.storage_class if d else None,
                size_bytes=int(src.size if src else d.size if d else 0) or None, phase=phase,
                start_time=_stamp(start) if start else None,
                duration_seconds=round(max((until - start).total_seconds(), 0.0), 1)
                if start and until else None))
    return out


def _stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def in_flight(vms: Sequence[VMStorage], claims: Mapping[str, ClaimInfo]
              ) -> tuple[Counter[str], Counter[str]]:
    """Copies under way cluster-wide, by target class and by source class (one per VM and
    class), for every owner: the class limits are shared."""
    into, out_of = Counter[str](), Counter[str]()
    for vm in vms:
        targets, sources = set(), set()
        for source, dest in moving(vm, claims).values():
            d, s = claims.get(f"{vm.namespace}/{dest}"), claims.get(f"{vm.namespace}/{source}")
            targets.add(d.storage_class if d else "")
            sources.add(s.storage_class if s else "")
        into.update(targets)
        out_of.update(sources)
    return into, out_of


# -- a MigrationPolicy with storage.mode Always -------------------------------------------------


@dataclass(frozen=True)
class PolicyStorageSnapshot:
    policy: str
    spec: StorageMigration
    now: dt.datetime
    governed: Mapping[str, VMStorage]  # running VMs this policy governs, by key
    everyone: Sequence[VMStorage]  # every VM (cluster-wide class limits, leaks)
    claims: Mapping[str, ClaimInfo]
    classes: Mapping[str, ClassInfo]
    updates_migrate: bool  # KubeVirt's workloadUpdateMethods has LiveMigrate
    may_start: bool = True  # windows open, and their end far enough away for a start
    # withinWindow: Finish -- the seconds a move begun now has to end before the window
    # closes (None: no such bound).
    finish_within: float | None = None
    max_parallel: int | None = None  # the policy's maxParallelMigrations
    bandwidth_per_migration: float | None = None
    max_attempts: int = 3
    failed_attempts: Mapping[str, int] = field(default_factory=dict)  # failed copies per VM
    ended: Mapping[str, dt.datetime] = field(default_factory=dict)  # last copy's end per VM
    uid: str = ""  # the MigrationPolicy's UID: recorded on its claims, and what it may delete


@dataclass
class StorageDecision:
    create: list[NewClaim] = field(default_factory=list)
    update: list[VolumeUpdate] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # claim keys
    status: StorageStatus = field(default_factory=StorageStatus)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def changes_cluster(self) -> bool:
        return bool(self.create or self.update or self.delete)


def parallel_limit(spec: StorageMigration, max_parallel: int | None,
                   per_migration: float | None) -> int | None:
    """The tightest of maxParallelCopies, copyBandwidth / bandwidthPerMigration and the
    policy's maxParallelMigrations (None: unbounded here; KubeVirt's own limits still hold)."""
    caps = [c for c in (spec.max_parallel_copies, max_parallel) if c]
    if spec.copy_bandwidth and per_migration:
        caps.append(max(1, int(parse_quantity(spec.copy_bandwidth) // per_migration)))
    return min(caps) if caps else None


def _wanted(s: PolicyStorageSnapshot, vm: VMStorage) -> list[VolumeInfo]:
    """The volumes of this VM not in the target class yet."""
    out = []
    for v in vm.volumes:
        c = _claim(vm, s.claims, v.running_claim or v.claim)
        if c is None:
            continue
        if c.storage_class != s.spec.target_storage_class:
            out.append(v)
    return out


def plan_policy_storage(s: PolicyStorageSnapshot) -> StorageDecision:
    """storage.mode Always: move every governed VM's disks to the target class, within the
    limits; revert what fails for good; delete what leaks; report per VM and volume."""
    d = StorageDecision()
    owner = Owner("policy", s.policy, s.uid)
    if s.spec.mode != StorageMode.ALWAYS:
        d.delete = deletable_destinations(owner, s.everyone, s.claims)
        return d
    refs = holds(s.everyone, s.claims)
    into, out_of = in_flight(s.everyone, s.claims)
    mine = sum(1 for vm in s.governed.values() if moving(vm, s.claims))
    limit = parallel_limit(s.spec, s.max_parallel, s.bandwidth_per_migration)
    target = s.spec.target_storage_class
    rate = copy_bandwidth(s.classes, target, s.spec, s.bandwidth_per_migration, limit or 1)
    entries: list[StorageVMEntry] = []
    keep: set[str] = set()
    bytes_moved = 0
    pending: list[tuple[VMStorage, list[VolumeInfo]]] = []
    for key in sorted(s.governed):
        vm = s.governed[key]
        under_way, done = moving(vm, s.claims), moved(vm, s.claims)
        vols = volume_entries(vm, s.claims, s.ended.get(key))
        if under_way:
            problem = stuck(vm, s.failed_attempts.get(key, 0), s.max_attempts)
            if problem:
                back = revert(vm, s.claims)
                if back:
                    d.update.append(back)
                d.events.append(("Warning", problem[0], f"{key}: {problem[1]}; moving it back "
                                 "to its source volumes"))
                entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                              phase=StorageVMPhase.FAILED, reason=problem[0],
                                              message=problem[1], volumes=vols or None))
                continue
            entries.append(StorageVMEntry(
                namespace=vm.namespace, name=vm.name, phase=StorageVMPhase.COPYING,
                reason="Copying", message="KubeVirt copies "
                + ", ".join(f"{src} to {dst}" for src, dst in under_way.values()),
                volumes=vols or None))
            continue
        if vm.manual_recovery:
            entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                          phase=StorageVMPhase.FAILED, reason=MANUAL_RECOVERY,
                                          message=vm.manual_recovery, volumes=vols or None))
            continue
        wanted = _wanted(s, vm)
        if not wanted:
            if done:
                bytes_moved += sum(e.size_bytes or 0 for e in vols)
                if s.spec.source_claims == SourceClaims.DELETE:
                    d.delete += sources_to_delete(owner, vm, s.claims, refs)
                entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                              phase=StorageVMPhase.SUCCEEDED, reason="Moved",
                                              message=f"runs on {target}", volumes=vols))
            continue
        no = refusal(vm, wanted, s.updates_migrate)
        if no:
            entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                          phase=StorageVMPhase.REFUSED, reason=no[0],
                                          message=no[1]))
            continue
        pending.append((vm, wanted))
    for vm, wanted in pending:
        move = plan_move(vm, wanted, s.claims, target, s.spec, owner, {target: rate}, s.now)
        why = None
        seconds = sum(e.predicted_seconds or 0.0 for e in move.entries)
        if not s.may_start:
            why = "OutsideWindow", "the policy's windows are closed"
        elif s.finish_within is not None and seconds > s.finish_within:
            why = "OutsideWindow", (f"predicted {seconds:.0f}s, would not finish before the "
                                    "window closes (withinWindow: Finish)")
        elif limit is not None and mine >= limit:
            why = "Queued", f"{mine} copies of this policy under way (limit {limit})"
        elif s.spec.max_parallel_copies and into[target] >= s.spec.max_parallel_copies:
            why = "Queued", f"{into[target]} copies into {target} under way"
        elif s.spec.max_parallel_copies_per_source_class and any(
                out_of[c] >= s.spec.max_parallel_copies_per_source_class
                for c in move.source_classes):
            why = "Queued", "the source class's parallel copies are all in use"
        if why:
            entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                          phase=StorageVMPhase.PENDING, reason=why[0],
                                          message=why[1], volumes=list(move.entries)))
            continue
        mine += 1
        into.update(move.target_classes)
        out_of.update(move.source_classes)
        d.create.extend(move.claims)
        d.update.append(move.update)
        keep |= {f"{c.namespace}/{c.name}" for c in move.claims}
        entries.append(StorageVMEntry(namespace=vm.namespace, name=vm.name,
                                      phase=StorageVMPhase.COPYING, reason="Started",
                                      message=f"moving {len(move.claims)} volumes to {target}",
                                      volumes=list(move.entries)))
    d.delete += deletable_destinations(owner, s.everyone, s.claims, frozenset(keep))
    d.status = storage_status(entries, bytes_moved)
    return d


def stuck(vm: VMStorage, failures: int = 0, max_attempts: int = 0) -> tuple[str, str] | None:
    """Why a move under way must be reverted: KubeVirt refused the update, or the copy
    failed maxAttempts times."""
    if vm.volumes_change is False and vm.volumes_change_message:
        return VOLUME_UPDATE_REFUSED, vm.volumes_change_message
    if vm.restart_required:
        return VOLUME_UPDATE_REFUSED, vm.restart_required
    if vm.manual_recovery:
        return MANUAL_RECOVERY, vm.manual_recovery
    if max_attempts and failures >= max_attempts:
        return "CopyFailed", f"{failures} volume migrations failed"
    return None


def sources_to_delete(owner: Owner, vm: VMStorage, claims: Mapping[str, ClaimInfo],
                      h: Holds) -> list[str]:
    """sourceClaims: Delete (the caller's rule in force now). The sources of this VM's
    finished moves that ``owner`` made (same UID) and began under Delete too -- never those of
    another owner's move, nor of a move begun under Keep -- once nothing but the finished
    move's destination refers to them (no VM, no other claim copying it; k8s.storage checks
    everything again right before the delete)."""
    out = []
    for source, dest in moved(vm, claims).values():
        d = claims[f"{vm.namespace}/{dest}"]
        c = claims.get(f"{vm.namespace}/{source}")
        if c is None or c.terminating or not owner.made(d) or (
                d.source_uid and c.uid != d.source_uid) or \
                d.source_claims not in (None, SourceClaims.DELETE):
            continue
        if set(h.by.get(c.key, ())) <= {(REF_CLAIM, d.key)}:
            out.append(c.key)
    return out


_ORDER = {StorageVMPhase.FAILED: 0, StorageVMPhase.COPYING: 1, StorageVMPhase.REFUSED: 2,
          StorageVMPhase.PENDING: 3, StorageVMPhase.SUCCEEDED: 4}


def storage_status(entries: Sequence[StorageVMEntry], bytes_moved: int) -> StorageStatus:
    phases = Counter(e.phase for e in entries)
    return StorageStatus(
        counts=StorageCounts(pending=phases[StorageVMPhase.PENDING],
                             copying=phases[StorageVMPhase.COPYING],
                             succeeded=phases[StorageVMPhase.SUCCEEDED],
                             failed=phases[StorageVMPhase.FAILED],
                             refused=phases[StorageVMPhase.REFUSED]),
        bytes_moved=bytes_moved or None,
        vms=sorted(entries, key=lambda e: (_ORDER[e.phase], e.namespace, e.name))[
            :MAX_STORAGE_ENTRIES] or None)


def cancel_policy_storage(policy: str, everyone: Sequence[VMStorage],
                          claims: Mapping[str, ClaimInfo], uid: str = "") -> StorageDecision:
    """The policy is going: every move of its still under way goes back to its source
    volumes, and its destinations ``verdict`` lets go are deleted. Done when nothing is left;
    what is kept (a finished move's claim) stays."""
    return cancel_moves(Owner("policy", policy, uid), everyone, claims)


def cancel_moves(owner: Owner, everyone: Sequence[VMStorage], claims: Mapping[str, ClaimInfo]
                 ) -> StorageDecision:
    """Every move of ``owner`` still under way goes back to its source volumes; its
    destinations ``verdict`` lets go are deleted."""
    d = StorageDecision()
    for vm in everyone:
        under_way = {n: p for n, p in moving(vm, claims).items()
                     if owner.made(claims[f"{vm.namespace}/{p[1]}"])}
        if under_way:
            d.update.append(VolumeUpdate(vm.namespace, vm.name,
                                         {n: src for n, (src, _d) in under_way.items()}))
    d.delete = deletable_destinations(owner, everyone, claims)
    return d


def cancel_pending(policy: str, everyone: Sequence[VMStorage],
                   claims: Mapping[str, ClaimInfo], uid: str = "") -> int:
    """Destinations of this policy a VM or VMI still points at without having finished: the
    policy's deletion waits for them to be released."""
    return pending_cancel(Owner("policy", policy, uid), everyone, claims)


def pending_cancel(owner: Owner, everyone: Sequence[VMStorage],
                   claims: Mapping[str, ClaimInfo]) -> int:
    """Destinations of ``owner`` a VM or VMI still points at without having finished."""
    return sum(1 for vm in everyone for _n, (_s, dst) in moving(vm, claims).items()
               if owner.made(claims[f"{vm.namespace}/{dst}"])) + \
        sum(1 for vm in everyone for v in vm.volumes
            for held in {v.running_claim, v.vmi_claim} - {v.claim}
            if held and (c := claims.get(f"{vm.namespace}/{held}")) and c.source_claim
            and owner.made(c))
