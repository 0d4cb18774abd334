"""The NodeDrain planner: from a snapshot of the cluster to what to do next and the new status.

Pure and level-triggered: everything it needs is in the snapshot (the cluster's VMIs, VMs,
migrations and nodes, plus the drain's previous status for the wave's memory), and the same
snapshot always gives the same decision. Migrations get deterministic names (drain incarnation,
VM, attempt), so a decision replayed after a crash creates nothing twice.

NodeDrain fields it implements: ``nodeName``, ``nodeSelector`` + ``maxUnavailable`` +
``releaseAfter`` (the wave; a node the wave drains later is never a migration target),
``targetNodeSelector``, ``evictPods``, ``nonMigratable`` (through the rules), ``policyRef``
(through the rules; one naming no usable policy stops the drain: ``_hold_for_policy``),
``cancelOnDelete`` (finalize_drain), and ``paused``, ``deadline`` and ``dryRun``, which are
gated in one place, ``_may_start`` (and ``paused`` or an unusable policyRef also freeze the
wave: ``_frozen``). Every move -- a live migration or a quick migration's stop -- passes the
same admission (``_admit``): windows and withinWindow (to their end, queued migrations
included: ``_Gate``, ``_withdraw_outside_windows``), the policy's and KubeVirt's limits, and
a target node with room for it. Attempts are counted so that
KubeVirt's garbage collection of finished migrations cannot reset them (``_attempts_made``).
The status is computed from the decision, then corrected with what its writes did
(``settle``, domain.outcome): a refused write is reported as refused, and one refused on
every pass for a while stalls the drain.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from virtshift.api.nodedrain import (
    MAX_VM_ENTRIES,
    DrainCounts,
    DrainPhase,
    NodeDrainSpec,
    NodeDrainStatus,
    NodeEntry,
    NodePhase,
    VMEntry,
    VMPhase,
)
from virtshift.api.units import parse_duration, parse_quantity
from virtshift.domain import downtime, outcome, preflight, stagger, storage, windows
from virtshift.domain.conditions import set_condition
from virtshift.domain.eta import Estimator, makespan
from virtshift.domain.naming import migration_name
from virtshift.domain.progress import POST_COPY_NOT_ABORTED
from virtshift.domain.rules import PolicyRef, Rules, policy_ref_problem, selector_matches
from virtshift.domain.views import (
    DowntimeObservation,
    KubeVirtLimits,
    MigrationInfo,
    NodeInfo,
    PodInfo,
    QuickMigrationRecord,
    VMIInfo,
    VMInfo,
)

CORDONED_BY = "virtshift.io/cordoned-by"
MAINTENANCE_COMPLETE = "virtshift.io/maintenance-complete"
BANDWIDTH_ANNOTATION = "virtshift.io/migration-bandwidth"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# On a VMI: "<NodeDrain UID>=<attempts>", the migration attempts that drain has made for it.
ATTEMPTS_ANNOTATION = "virtshift.io/migration-attempts"
# How long a deleted NodeDrain waits for the migrations it aborted to end before it uncordons
# anyway (wall-clock seconds since the deletion handler first ran): KubeVirt ends an aborted
# migration within seconds, so this only matters when KubeVirt itself is not working.
ABORT_WAIT_SECONDS = 300.0
# downtimeSource of a quick migration: the VM's stop (virtshift's record) to its new VMI's
# Running transition (KubeVirt's timestamp).
RESTART_TIMESTAMPS = "restartTimestamps"
# Cluster seconds a restarted VM's new VMI may wait for its launcher pod to be scheduled
# before the VM is reported Waiting with the scheduler's reason.
RESTART_SCHEDULE_SECONDS = 60.0
# A quick migration that needs a node selector on the VM's template (targetNodeSelector, the
# wave's later nodes) waits under vmRolloutStrategy Stage, where taking it back once the VM
# runs would leave RestartRequired (vm.go syncRestartRequired).
VM_ROLLOUT_STAGE = "VMRolloutStrategyStage"


@dataclass(frozen=True)
class DrainSnapshot:
    name: str
    generation: int
    spec: NodeDrainSpec
    status: NodeDrainStatus
    now: dt.datetime
    nodes: Mapping[str, NodeInfo]
    vmis: Mapping[str, VMIInfo]  # by namespace/name: on the drain's nodes, or ours elsewhere
    vms: Mapping[str, VMInfo] = field(default_factory=dict)
    migrations: Sequence[MigrationInfo] = ()  # this drain's own
    cluster_unfinished: Sequence[MigrationInfo] = ()  # every unfinished VMIM in the cluster
    limits: KubeVirtLimits = field(default_factory=KubeVirtLimits)
    rules: Mapping[str, Rules] = field(default_factory=dict)  # by VMI key
    conflict_with: str | None = None
    pods: Sequence[PodInfo] = ()
    launchers: Sequence[PodInfo] = ()  # running virt-launcher pods on the drain's nodes
    blocked_pods: Mapping[str, str] = field(default_factory=dict)
    usage: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    estimator: Estimator = field(default_factory=Estimator)
    uid: str = ""  # the NodeDrain's UID: part of its migrations' names
    # VMI key -> attempts this drain incarnation recorded on the VMI (its annotation), which
    # outlives KubeVirt's garbage collection of finished migrations.
    attempts: Mapping[str, int] = field(default_factory=dict)
    # Shared-nothing migration (domain.storage): every VM's volumes by VM key, the claims and
    # classes, and whether KubeVirt migrates a VM whose volumes changed.
    storage: Mapping[str, storage.VMStorage] = field(default_factory=dict)
    claims: Mapping[str, storage.ClaimInfo] = field(default_factory=dict)
    classes: Mapping[str, storage.ClassInfo] = field(default_factory=dict)
    updates_migrate: bool = True
    # Cluster seconds from a change (a slot freed) to our next write landing, as measured of
    # the operator's recent passes: what the migrations queued in KubeVirt must cover.
    reaction_seconds: float = 0.0
    # Whether the operator reads a metrics source (dirty rates): only says why a VMI's
    # dirty_rate is None.
    metrics_source: bool = False
    # What the cluster holds under spec.policyRef's name (None: no policyRef).
    policy_ref: PolicyRef | None = None

    @cached_property
    def policy_problem(self) -> tuple[str, str] | None:
        """(reason, message) when spec.policyRef names no usable policy: nothing starts."""
        return policy_ref_problem(self.policy_ref)

    @property
    def owner(self) -> str:
        """What this drain's destination claims say made them."""
        return storage.moved_by("drain", self.name)

    @property
    def owner_ref(self) -> storage.Owner:
        """This drain incarnation as the owner of its claims (name and UID)."""
        return storage.Owner("drain", self.name, self.uid)

    @cached_property
    def claim_holds(self) -> storage.Holds:
        """What refers to each claim (once per pass: sources_to_delete asks per VM)."""
        return storage.holds(list(self.storage.values()), self.claims)

    def rules_for(self, key: str) -> Rules:
        return self.rules.get(key, Rules())


@dataclass(frozen=True)
class NewMigration:
    namespace: str
    name: str
    vmi: str
    attempt: int
    source: str
    policy: str | None
    selector: Mapping[str, str]
    mode: str | None = None  # AutoConverge or PostCopy: the VMI is labelled for that policy


class Stop(NamedTuple):
    """A quick migration's first step: stop the VM (it starts again on another node).
    ``pin``: the node selector the VM's template gets while it starts again, so that it lands
    only where a live migration of this drain could (targetNodeSelector, and the target
    pinned by kubernetes.io/hostname while the wave has nodes still to drain)."""

    key: str  # the VM's namespace/name
    source: str
    policy: str | None = None
    pin: Mapping[str, str] | None = None


@dataclass
class Decision:
    status: NodeDrainStatus
    cordon: list[str] = field(default_factory=list)
    uncordon: list[str] = field(default_factory=list)
    # Draining nodes that carry MAINTENANCE_COMPLETE from an earlier maintenance: removed, so
    # that only one set after this drain releases the node.
    forget_maintenance: list[str] = field(default_factory=list)
    create: list[NewMigration] = field(default_factory=list)
    cancel: list[MigrationInfo] = field(default_factory=list)
    # Ours still in KubeVirt's queue when nothing may start: deleted, and not counted as
    # attempts (never started, so never failed).
    withdraw: list[MigrationInfo] = field(default_factory=list)
    halt: list[Stop] = field(default_factory=list)
    start: list[str] = field(default_factory=list)  # VM keys
    # Quick migrations done: the node selector they added and the run strategy they
    # replaced are taken back, and their record removed (VM keys).
    finish: list[str] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)  # pod keys
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    hold: str | None = None  # finalize_drain: why the finalizer must stay for now
    # Shared-nothing migration: destination claims, VM volume updates (moves, and reverts of
    # moves that failed or were cancelled), and claims to delete.
    claims: list[storage.NewClaim] = field(default_factory=list)
    volumes: list[storage.VolumeUpdate] = field(default_factory=list)
    revert: list[storage.VolumeUpdate] = field(default_factory=list)
    delete_claims: list[str] = field(default_factory=list)
    # Downtimes observed in this pass (each once, for the metrics): never predictions.
    downtimes: list[DowntimeObservation] = field(default_factory=list)
    # Cluster seconds after which a pass is due though nothing changes (a staggered start).
    recheck_after: float | None = None
    # What the status was computed from, so that ``settle`` can correct it with what the
    # writes did.
    draft: _Draft | None = field(default=None, repr=False, compare=False)

    @property
    def changes_cluster(self) -> bool:
        return bool(self.cordon or self.uncordon or self.forget_maintenance or self.create
                    or self.cancel or self.withdraw or self.halt or self.start or self.finish
                    or self.evict
                    or self.claims or self.volumes or self.revert or self.delete_claims)


def attempts_record(uid: str, attempts: int) -> str:
    return f"{uid}={attempts}"


def recorded_attempts(value: str | None, uid: str) -> int:
    """The attempts ``value`` (ATTEMPTS_ANNOTATION) records for the drain with this UID."""
    owner, _, count = (value or "").rpartition("=")
    return int(count) if owner == uid and count.isdigit() else 0


def stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- the wave ---------------------------------------------------------------------------------


def wave(s: DrainSnapshot) -> list[NodeEntry]:
    """The drain's nodes and their phases; at most maxUnavailable Draining or Drained at once.
    ``paused`` freezes the wave: no Waiting node starts draining."""
    if s.spec.node_name:
        names = [s.spec.node_name] if s.spec.node_name in s.nodes else []
    else:
        names = sorted(n.name for n in s.nodes.values()
                       if selector_matches(s.spec.node_selector, n.labels))
    previous = {e.name: e for e in s.status.nodes or []}
    entries = _release(s, [previous.get(n) or NodeEntry(name=n, phase=NodePhase.WAITING)
                            for n in names])
    if _frozen(s):
        return entries
    if s.spec.node_name:
        return [e if e.phase != NodePhase.WAITING else
                NodeEntry(name=e.name, phase=NodePhase.DRAINING, since=stamp(s.now))
                for e in entries]
    busy = sum(1 for e in entries if e.phase in (NodePhase.DRAINING, NodePhase.DRAINED))
    out = []
    for e in entries:
        if e.phase == NodePhase.WAITING and busy < s.spec.max_unavailable:
            e = NodeEntry(name=e.name, phase=NodePhase.DRAINING, since=stamp(s.now))
            busy += 1
        out.append(e)
    return out


def _release(s: DrainSnapshot, nodes: list[NodeEntry]) -> list[NodeEntry]:
    """Drained -> Released after its maintenance (waves only, and not while paused: a paused
    wave releases nothing). Before the wave starts its next nodes, so that the pass which
    sees a node's maintenance end already starts (and cordons, and moves) the next one."""
    if s.spec.node_selector is None or _frozen(s) or s.spec.dry_run:
        return nodes
    out = []
    for e in nodes:
        if e.phase == NodePhase.DRAINED:
            node = s.nodes.get(e.name)
            held_since = parse_stamp(e.since) or s.now
            released = node is not None and node.annotations.get(MAINTENANCE_COMPLETE) == "true"
            if s.spec.release_after and (s.now - held_since).total_seconds() >= parse_duration(
                    s.spec.release_after):
                released = True
            if released:
                e = NodeEntry(name=e.name, phase=NodePhase.RELEASED, since=stamp(s.now))
        out.append(e)
    return out


def _recheck_at_release(s: DrainSnapshot, nodes: list[NodeEntry], decision: Decision) -> None:
    """A pass when a drained node's releaseAfter ends (at once for 0s), not a resync later."""
    if s.spec.node_selector is None or _frozen(s) or not s.spec.release_after:
        return
    hold = parse_duration(s.spec.release_after)
    for e in nodes:
        if e.phase != NodePhase.DRAINED:
            continue
        due = max(0.0, ((parse_stamp(e.since) or s.now) - s.now).total_seconds() + hold)
        if decision.recheck_after is None or due < decision.recheck_after:
            decision.recheck_after = due


def _advance_wave(s: DrainSnapshot, nodes: list[NodeEntry], node_done: Mapping[str, bool]
                  ) -> list[NodeEntry]:
    """Draining -> Drained when empty."""
    return [NodeEntry(name=e.name, phase=NodePhase.DRAINED, since=stamp(s.now))
            if e.phase == NodePhase.DRAINING and node_done.get(e.name) else e for e in nodes]


# -- per VM -----------------------------------------------------------------------------------


@dataclass
class _VM:
    key: str
    entry: VMEntry
    memory: float
    candidate_attempt: int = 0  # > 0: may start this attempt now
    seconds: float = 0.0  # predicted time still needed
    blocked_by: str | None = None
    stop: bool = False  # a quick migration that may stop the VM now (admission decides)
    targets: tuple[str, ...] = ()  # every node it can go to, best first
    requests: tuple[float, float] = (0.0, 0.0)  # (CPU, memory) of its pod on the target
    move: storage.Move | None = None  # shared-nothing: its disks' destinations, to create
    reserved: bool = False  # its slot was taken when its disks' move began

    @property
    def admissible(self) -> bool:
        return bool(self.candidate_attempt or self.stop or self.move)


@dataclass(frozen=True)
class _Places:
    """Where VMs may go. ``strict`` excludes the nodes in maintenance and those the wave will
    drain later; ``loose`` (only while the wave has nodes still to drain) excludes only the
    former, for when nothing else has room: then the node the wave drains last is chosen."""

    strict: preflight.Context
    loose: preflight.Context | None
    later: tuple[str, ...]  # Waiting nodes of the wave, in the order it drains them

    def order(self, targets: list[str]) -> tuple[str, ...]:
        """Nodes the wave never drains first (best first), then the later ones, last first."""
        now = [n for n in targets if n not in self.later]
        later = sorted((n for n in targets if n in self.later), key=self.later.index,
                       reverse=True)
        return tuple(now + later)


def _deadline_passed(s: DrainSnapshot) -> bool:
    started = parse_stamp(s.status.start_time)
    if not (s.spec.deadline and started):
        return False
    return (s.now - started).total_seconds() > parse_duration(s.spec.deadline)


def _node_bandwidth(s: DrainSnapshot, node: str | None) -> float | None:
    info = s.nodes.get(node or "")
    value = info.annotations.get(BANDWIDTH_ANNOTATION) if info else None
    return parse_quantity(value) if value else None


def _attempts_made(s: DrainSnapshot, key: str, migs: Sequence[MigrationInfo]) -> int:
    """Attempts this drain has made for the VM: the highest of its migrations' attempt labels
    and the count recorded on the VMI once a migration was created. KubeVirt deletes all but
    the 5 newest finished migrations of a VMI (garbage collection), so the migrations alone
    would forget attempts and let maxAttempts be exceeded. The drain's own status is no
    evidence: it says "Created" before the create has gone through, and a create the API
    server refused is no attempt."""
    return max([m.attempt for m in migs] + [s.attempts.get(key, 0)])


def _placement(vmi: VMIInfo, places: _Places, restart: bool = False
               ) -> tuple[preflight.Finding | None, tuple[str, ...]]:
    """(what blocks the move, the targets best first): a live migration's target pod, or
    (``restart``) the launcher pod of the VM started again."""
    check = preflight.restart_finding if restart else preflight.preflight
    candidates = preflight.restart_candidates if restart else preflight.target_candidates
    finding = check(vmi, places.strict)
    ctx = places.strict
    if finding and finding[0] in (preflight.NO_COMPATIBLE_TARGET,
                                  preflight.INSUFFICIENT_CAPACITY) and places.loose \
            and check(vmi, places.loose) is None:
        finding, ctx = None, places.loose
    if finding:
        return finding, ()
    return None, places.order(candidates(vmi, ctx))


def _evaluate(s: DrainSnapshot, key: str, active: set[str], places: _Places,
              decision: Decision) -> _VM | None:
    vmi = s.vmis.get(key)
    vm = s.vms.get(key)
    ns, name = key.split("/", 1)
    migs = sorted((m for m in s.migrations if m.vmi_key == key), key=lambda m: m.attempt)
    last = migs[-1] if migs else None
    rules = s.rules_for(key)
    quick = vm.quick if vm and _ours(s, vm.quick) else None
    memory = vmi.memory if vmi else 0.0
    made = _attempts_made(s, key, migs)
    st = s.storage.get(key)
    under_way = storage.owned_moving(st, s.claims, s.owner) if st else {}
    vols = [e for e in storage.volume_entries(st, s.claims) if (c := s.claims.get(
        f"{ns}/{e.destination_claim}")) and c.moved_by == s.owner] if st else []
    base = {"namespace": ns, "name": name, "attempts": made or None, "volumes": vols or None}
    # The prediction made before the migration started, kept beside what is observed.
    carried = {"predicted_downtime_ms": _predicted_before(s, ns, name)}

    def entry(phase: VMPhase, reason: str | None = None, message: str | None = None,
              **extra: object) -> VMEntry:
        return VMEntry(phase=phase, reason=reason, message=message, **base, **extra)

    if quick is not None:
        return _restarting(s, key, quick, vmi, memory, entry, decision)
    done = _quick_migrated_before(s, ns, name)
    if done is not None and (vmi is None or vmi.node not in active):
        return _VM(key, done, memory)  # its record is gone: the status remembers the move
    if vmi is None:
        return _VM(key, entry(VMPhase.SKIPPED, "VMIGone", "the VMI no longer exists"), 0.0)
    if vmi.node not in active:
        done = next((m for m in migs if m.phase == "Succeeded"), None)
        if vols and done is not None and st is not None:  # the copy's duration, now known
            base["volumes"] = [e for e in storage.volume_entries(st, s.claims, done.ended)
                               if e.destination_claim in {v.destination_claim for v in vols}]
        if done is None and not migs and not vols:
            return None  # on a node of the wave that is not being drained (yet)
        # maxDowntime breaches only from an observation: a prediction is acted on before
        # migrating (downtime.choose), never reported as what happened.
        observed = done.downtime if done else None
        if st is not None and vols and rules.storage and \
                rules.storage.source_claims == "Delete":
            decision.delete_claims += storage.sources_to_delete(s.owner_ref, st, s.claims,
                                                                s.claim_holds)
        breach = observed is not None and rules.max_downtime is not None and \
            observed.ms > rules.max_downtime * 1000
        return _VM(key, entry(
            VMPhase.SUCCEEDED, downtime.DOWNTIME_EXCEEDED if breach else
            "Migrated" if done else "LeftNode",
            f"now on {vmi.node}" + (f"; observed downtime {observed.ms} ms ({observed.source}) "
                                    f"exceeded maxDowntime {rules.max_downtime * 1000:.0f} ms"
                                    if breach and observed and rules.max_downtime else ""),
            source_node=(done.source if done else None),
            target_node=vmi.node, mode="SharedNothing" if vols else (done.mode and (
                "PostCopy" if done.mode == "PostCopy" else "LiveMigration")) if done else None,
            migration=done.name if done else None,
            observed_downtime_ms=observed.ms if observed else None,
            downtime_source=observed.source if observed else None,
            **carried), memory)
    predicted = s.estimator.seconds(vmi, rules, _node_bandwidth(s, vmi.node),
                                    _concurrency(s, rules))
    if last is not None and not last.final:
        elapsed = (s.now - (last.created or s.now)).total_seconds()
        return _VM(key, entry(VMPhase.MIGRATING, last.phase or "Pending",
                              f"migration {last.name} is {last.phase or 'Pending'}",
                              source_node=vmi.node, migration=last.name, **carried), memory,
                   seconds=max(predicted - elapsed, 0.0))
    if last is not None and last.phase == "Succeeded" and vmi.node == last.source:
        # The VMI's new node has not reached our cache yet (separate watches): never migrate
        # a VM again that has just moved.
        return _VM(key, entry(VMPhase.MIGRATING, "Completing", f"migration {last.name} "
                              "succeeded; waiting for the VMI to report its new node",
                              source_node=vmi.node, migration=last.name, **carried), memory)
    foreign = next((m for m in s.cluster_unfinished
                    if m.vmi_key == key and m.drain != s.name), None)
    if foreign is not None and under_way:
        return _VM(key, entry(VMPhase.MIGRATING, "Copying", f"KubeVirt's migration "
                              f"{foreign.name} moves it with its disks", source_node=vmi.node,
                              migration=foreign.name, mode="SharedNothing", **carried), memory,
                   seconds=predicted)
    if foreign is not None:
        return _VM(key, entry(VMPhase.WAITING, "MigrationInProgress",
                              f"another migration ({foreign.name}) of this VMI is in progress",
                              source_node=vmi.node), memory, seconds=predicted)
    if under_way and st is not None:
        problem = storage.stuck(st)
        if problem:
            decision.revert.append(_back(st, under_way))
            return _VM(key, entry(VMPhase.FAILED, problem[0], f"{problem[1]}; moving it back "
                                  "to its source volumes", source_node=vmi.node,
                                  mode="SharedNothing"), memory)
        if not st.migrating_volumes or not vmi.migratable:
            return _VM(key, entry(VMPhase.MIGRATING, "UpdatingVolumes", "waiting for KubeVirt "
                                  "to start the volume migration", source_node=vmi.node,
                                  mode="SharedNothing"), memory, seconds=predicted)
    requests = preflight.requests(vmi)
    live = preflight.live_migratable(vmi, places.strict)
    if live and live[0] == DISKS_NOT_LIVE_MIGRATABLE and st is not None and not under_way:
        planned, refused = _shared_nothing(s, vmi, st, rules, places, predicted, requests,
                                           entry(VMPhase.PENDING, source_node=vmi.node))
        if planned is not None:
            return planned
        live = refused or live
    if live:
        action = rules.non_migratable
        if action == "Skip":
            return _VM(key, entry(VMPhase.SKIPPED, live[0], live[1], source_node=vmi.node),
                       memory)
        if action == "Restart" and vm is None:
            return _VM(key, entry(VMPhase.FAILED, live[0], f"{live[1]}; no VirtualMachine to "
                                  "restart", source_node=vmi.node), memory)
        if action == "Restart":
            return _quick(s, vmi, places, memory, requests, entry(
                VMPhase.PENDING, live[0], f"{live[1]}; will restart it on another node",
                source_node=vmi.node, mode="QuickMigration"))
        return _VM(key, entry(VMPhase.FAILED, live[0], live[1], source_node=vmi.node),
                   memory)
    finding, targets = _placement(vmi, places)
    if finding:
        return _VM(key, entry(VMPhase.WAITING, finding[0], finding[1], source_node=vmi.node),
                   memory, seconds=predicted, blocked_by=finding[0])
    last_success = max((m.attempt for m in migs if m.phase == "Succeeded"), default=0)
    failures = made - last_success  # every attempt since the last success failed
    if failures > 0:
        known = last if last is not None and last.attempt == made else None
        what = f"last: {known.failure}" if known else "the last one is no longer in the cluster"
        if failures >= rules.max_attempts:
            if under_way and st is not None:
                decision.revert.append(_back(st, under_way))
            return _VM(key, entry(VMPhase.FAILED, "MigrationFailed",
                                  f"{failures} attempts failed; {what}",
                                  source_node=vmi.node, migration=known.name if known else None),
                       memory)
        if known is not None:
            retry_at = (known.ended or known.created or s.now) + dt.timedelta(
                seconds=rules.backoff(failures))
            if s.now < retry_at:
                return _VM(key, entry(VMPhase.WAITING, "Backoff",
                                      f"attempt {known.attempt} failed ({known.failure}); "
                                      f"retrying at {stamp(retry_at)}", source_node=vmi.node,
                                      migration=known.name), memory, seconds=predicted)
    attempt = made + 1
    choice, predicted = _chosen(s, vmi, rules, predicted)
    plan = {"source_node": vmi.node, "predicted_seconds": round(predicted, 1),
            # Unknown with the dirty rate: the rate decides the pause.
            "predicted_downtime_ms": None if vmi.dirty_rate is None else
            round(choice.predicted.downtime * 1000),
            "candidates": list(targets[:MAX_CANDIDATES]) or None}
    if choice.action == "QuickMigration":
        if vm is None:
            return _VM(key, entry(VMPhase.FAILED, choice.reason, f"{choice.message}; no "
                                  "VirtualMachine to restart", **plan), memory)
        return _quick(s, vmi, places, memory, requests, entry(
            VMPhase.PENDING, choice.reason, choice.message, mode="QuickMigration", **plan))
    if choice.action == "Fail":
        return _VM(key, entry(VMPhase.FAILED, choice.reason, choice.message, **plan), memory)
    if choice.action == "Abort":
        return _VM(key, entry(VMPhase.WAITING, choice.reason, choice.message, **plan), memory,
                   seconds=predicted, blocked_by=choice.reason)
    return _VM(key, entry(VMPhase.PENDING, "Queued", choice.message or
                          "waiting for a migration slot",
                          mode="SharedNothing" if under_way else choice.mode, **plan),
               memory, candidate_attempt=attempt, seconds=predicted, targets=targets,
               requests=requests, reserved=bool(under_way))


DISKS_NOT_LIVE_MIGRATABLE = "DisksNotLiveMigratable"


def _chosen(s: DrainSnapshot, vmi: VMIInfo, rules: Rules, plain_seconds: float
            ) -> tuple[downtime.Choice, float]:
    """The ladder's choice for the VM's next migration, and its predicted seconds: the step's
    own KubeVirt policy (e.g. post-copy at the completion timeout) decides how long it takes;
    otherwise ``plain_seconds``. One place, for admission and for withinWindow: Finish."""
    choice = downtime.choose(vmi, rules, s.estimator, _node_bandwidth(s, vmi.node),
                             _concurrency(s, rules), s.metrics_source)
    if choice.mode is not None and math.isfinite(choice.predicted.duration):
        return choice, s.estimator.target_startup + choice.predicted.duration
    return choice, plain_seconds


def _ours(s: DrainSnapshot, q: QuickMigrationRecord | None) -> bool:
    """A quick migration of this drain: by UID (a drain created again under the same name
    is another); a record from before UIDs were recorded, by name."""
    if q is None:
        return False
    return q.drain_uid == s.uid if q.drain_uid else q.drain == s.name


def _restarting(s: DrainSnapshot, key: str, quick: QuickMigrationRecord, vmi: VMIInfo | None,
                memory: float, entry: Callable[..., VMEntry], decision: Decision) -> _VM:
    """A VM this drain stopped: started again once its VMI is gone; done once its new VMI
    runs on another node -- and wound up (``finish``) once the status has said so, so that
    its record never outlives the move; reported Waiting with the scheduler's reason when
    its launcher pod cannot be scheduled for RESTART_SCHEDULE_SECONDS."""
    moved = vmi is not None and vmi.phase == "Running" and vmi.node != quick.source
    if moved and vmi is not None:
        up = vmi.running_since or s.now
        paused_ms = max(0, round((up - quick.stopped_at).total_seconds() * 1000))
        done = entry(VMPhase.SUCCEEDED, "QuickMigrated", f"restarted on {vmi.node}",
                     source_node=quick.source, target_node=vmi.node, mode="QuickMigration",
                     observed_downtime_ms=paused_ms, downtime_source=RESTART_TIMESTAMPS)
        ns, name = key.split("/", 1)
        if _quick_migrated_before(s, ns, name) is not None:
            decision.finish.append(key)
        return _VM(key, done, memory)
    if vmi is None and not quick.started:
        decision.start.append(key)
    waited = (s.now - (quick.started_at or s.now)).total_seconds()
    if quick.started and vmi is not None and vmi.unschedulable and \
            waited >= RESTART_SCHEDULE_SECONDS:
        reason, why = vmi.unschedulable
        return _VM(key, entry(VMPhase.WAITING, reason, f"started again {round(waited)}s ago, "
                              f"but its virt-launcher pod cannot be scheduled: {why}",
                              source_node=quick.source, mode="QuickMigration"), memory,
                   seconds=s.estimator.target_startup, blocked_by=reason)
    return _VM(key, entry(VMPhase.MIGRATING, "Restarting", "stopped; starting on another "
                          "node (quick migration)", source_node=quick.source,
                          mode="QuickMigration"), memory,
               seconds=s.estimator.target_startup)


def _quick_migrated_before(s: DrainSnapshot, ns: str, name: str) -> VMEntry | None:
    """The VM's entry in the previous status, when it said the quick migration was done."""
    return next((e for e in s.status.vms or [] if e.namespace == ns and e.name == name
                 and e.phase == VMPhase.SUCCEEDED and e.mode == "QuickMigration"), None)


def _back(st: storage.VMStorage, under_way: Mapping[str, tuple[str, str]]
          ) -> storage.VolumeUpdate:
    return storage.VolumeUpdate(st.namespace, st.name,
                                {n: src for n, (src, _dst) in under_way.items()})


def _shared_nothing(s: DrainSnapshot, vmi: VMIInfo, st: storage.VMStorage, rules: Rules,
                    places: _Places, predicted: float, requests: tuple[float, float],
                    pending: VMEntry) -> tuple[_VM | None, preflight.Finding | None]:
    """A VM on disks that cannot follow it (not ReadWriteMany: node-local ones) moves with
    them: copies of its unshared claims in the policy's storage.targetStorageClass (else each
    claim's own class, bound on the target node), then a live migration. (None, refusal) when
    KubeVirt would refuse it; nothing is touched then."""
    wanted = [v for v in st.volumes if (c := s.claims.get(
        f"{st.namespace}/{v.running_claim or v.claim}")) and not storage.shared(c)]
    if not wanted:
        return None, None
    refused = storage.refusal(st, wanted, s.updates_migrate)
    if refused:
        return None, refused
    target_class = rules.storage.target_storage_class if rules.storage else None
    sources = {c.storage_class or "" for v in wanted
               if (c := s.claims.get(f"{st.namespace}/{v.running_claim or v.claim}"))}
    rates = {cls: storage.copy_bandwidth(s.classes, cls, rules.storage,
                                         rules.bandwidth_per_migration, 1)
             for cls in ({target_class} if target_class else sources)}
    move = storage.plan_move(st, wanted, s.claims, target_class, rules.storage, s.owner_ref, rates,
                             s.now)
    copy = sum(e.predicted_seconds or 0.0 for e in move.entries)
    entry = pending.model_copy(update={"volumes": list(move.entries), "mode": "SharedNothing"})
    finding, targets = _placement(dataclasses.replace(vmi, migratable=True), places)
    if finding:
        return _VM(vmi.key, entry.model_copy(update={
            "phase": VMPhase.WAITING, "reason": finding[0], "message": finding[1]}),
            vmi.memory, seconds=predicted + copy, blocked_by=finding[0]), None
    return _VM(vmi.key, entry.model_copy(update={
        "reason": "Queued", "message": "will move with its disks ("
        + ", ".join(f"{e.source_claim} to {e.destination_claim}" for e in move.entries)
        + "); waiting for a migration slot", "predicted_seconds": round(predicted + copy, 1),
        "candidates": list(targets[:MAX_CANDIDATES]) or None}),
        vmi.memory, seconds=predicted + copy, targets=targets, requests=requests,
        move=move), None


MAX_CANDIDATES = 5  # shown in status (all of them are tried)


def _quick(s: DrainSnapshot, vmi: VMIInfo, places: _Places, memory: float,
           requests: tuple[float, float], pending: VMEntry) -> _VM:
    """A quick migration waiting for admission -- or, when no node could start the VM again,
    waiting for one: a VM is never stopped without somewhere to restart it."""
    finding, targets = _placement(vmi, places, restart=True)
    if not finding and not s.limits.live_update and (s.spec.target_node_selector
                                                     or places.later):
        finding = (VM_ROLLOUT_STAGE, "its restart needs a node selector on the VM's template "
                   "(targetNodeSelector, or the wave's nodes still to drain), which KubeVirt's "
                   "vmRolloutStrategy Stage would leave RestartRequired once taken back; set "
                   "vmRolloutStrategy LiveUpdate (KubeVirt's default)")
    if finding:
        return _VM(vmi.key, pending.model_copy(update={
            "phase": VMPhase.WAITING, "reason": finding[0],
            "message": f"quick migration held: {finding[1]}"}), memory,
            seconds=s.estimator.target_startup, blocked_by=finding[0])
    return _VM(vmi.key, pending, memory, seconds=s.estimator.target_startup, stop=True,
               targets=targets, requests=requests)


def _predicted_before(s: DrainSnapshot, ns: str, name: str) -> int | None:
    """The predicted downtime the previous status showed for this VM."""
    return next((e.predicted_downtime_ms for e in s.status.vms or []
                 if e.namespace == ns and e.name == name), None)


def _concurrency(s: DrainSnapshot, rules: Rules) -> int:
    """Migrations that will share the source node's bandwidth: the tightest outbound limit."""
    cap = s.limits.outbound_per_node
    if rules.max_outbound_per_node:
        cap = min(cap, rules.max_outbound_per_node)
    if rules.node_bandwidth and rules.bandwidth_per_migration:
        cap = min(cap, max(1, int(rules.node_bandwidth // rules.bandwidth_per_migration)))
    return max(1, min(cap, s.limits.per_cluster))


def _may_start(s: DrainSnapshot) -> bool:
    """The one gate of dryRun, paused, deadline and an unusable policyRef: nothing new starts
    (no migration, no stop, no storage move, no eviction) unless it is open."""
    return not (s.spec.dry_run or s.spec.paused or _deadline_passed(s) or s.policy_problem)


def _frozen(s: DrainSnapshot) -> bool:
    """The wave stands still (no node cordoned, released or uncordoned): paused, or -- until
    its policy is usable -- a policyRef naming none, so a drain that has not begun does not
    begin (nothing is cordoned) and one under way keeps its nodes as they are."""
    return s.spec.paused or s.policy_problem is not None


def _quick_in_flight(s: DrainSnapshot) -> list[tuple[str, str | None]]:
    """(source node, policy) of every quick migration, of any drain, that has stopped its VM
    and not yet seen it run again: each holds a slot as an unfinished migration does."""
    out = []
    for key, vm in s.vms.items():
        q = vm.quick
        if q is None:
            continue
        if q.started and vm.run_strategy == "Halted":
            continue  # we started it again; someone stopped it since
        vmi = s.vmis.get(key)
        if vmi is not None and vmi.phase == "Running" and (
                vmi.node != q.source or (vmi.running_since or q.stopped_at) > q.stopped_at):
            continue
        out.append((q.source, q.policy or (s.rules_for(key).policy if _ours(s, q)
                                           else None)))
    return out


class _Room:
    """What target pods already admitted in this pass will take, so that one pass never
    sends more to a node than it can hold."""

    def __init__(self, s: DrainSnapshot) -> None:
        self.nodes = s.nodes
        self.used = dict(s.usage)
        # Migrations queued in KubeVirt with a pinned target have no target pod yet: their
        # room is taken all the same.
        for m in s.cluster_unfinished:
            vmi = s.vmis.get(m.vmi_key)
            if m.queued and m.target and vmi is not None:
                self.take(m.target, preflight.requests(vmi))

    def fits(self, node: str, requests: tuple[float, float]) -> bool:
        info = self.nodes.get(node)
        cpu, memory = self.used.get(node, (0.0, 0.0))
        return info is not None and cpu + requests[0] <= info.cpu and \
            memory + requests[1] <= info.memory

    def take(self, node: str, requests: tuple[float, float]) -> None:
        cpu, memory = self.used.get(node, (0.0, 0.0))
        self.used[node] = (cpu + requests[0], memory + requests[1])


def _admit(s: DrainSnapshot, vms: list[_VM], decision: Decision, later: tuple[str, ...]
           ) -> None:
    """Start the queued moves, longest first, within every limit: a live migration gets its
    VMIM, a quick migration stops its VM. Both count against the same limits (KubeVirt's
    per-cluster and per-node ones, the policy's maxParallelMigrations and outbound limits),
    wait for the policy's windows, and need a target node with room. ``later``: the wave's
    nodes still to drain, so each migration's target is pinned (kubernetes.io/hostname) to a
    node outside them, as addedNodeSelector cannot exclude nodes. Among the targets with room
    the one with the fewest migrations arriving is taken (_spread): two migrations into one
    node share its NIC.

    Where only KubeVirt's own limits hold a live migration back, more rounds are created ahead,
    to wait in KubeVirt's queue (Pending): KubeVirt starts one the moment a slot frees (a
    migration's end re-enqueues parallelMigrationsPerCluster Pending ones, equals in any order:
    migration.go reEnqueueHighestPriorityPendingMigrations), instead of after our next pass
    (_kubevirt_queue, _queue_rounds), but never more than can start before the window ends
    (_Gate.rounds).
    Once nothing may start (paused, past the deadline, an unusable policyRef), those still
    queued are withdrawn; so are those whose VM's window no longer lets them start in time
    (_withdraw_outside_windows)."""
    if not _may_start(s):
        if s.spec.dry_run:
            return
        reason, message = _not_starting(s)
        queued = {m.vmi_key: m for m in s.migrations if m.queued}
        decision.withdraw.extend(queued.values())
        for v in vms:
            if v.key in queued:
                v.entry = v.entry.model_copy(update={
                    "phase": VMPhase.WAITING, "reason": reason, "message": "withdrawn from "
                    f"KubeVirt's queue (migration {queued[v.key].name} had not started)"
                    + (f"; {message}" if message else "")})
            elif v.admissible:
                v.entry = v.entry.model_copy(update={"phase": VMPhase.WAITING,
                                                     "reason": reason})
        return
    gates = _Gates(s)
    withdrawn = _withdraw_outside_windows(s, vms, decision, gates)
    unfinished = [m for m in s.cluster_unfinished
                  if m.unfinished and (m.namespace, m.name) not in withdrawn]
    stops = _quick_in_flight(s) + _storage_in_flight(s)
    into, out_of = storage.in_flight(list(s.storage.values()), s.claims)
    total = len(unfinished) + len(stops)
    per_node = Counter(m.source for m in unfinished if m.source)
    per_node.update(source for source, _policy in stops)
    per_policy = Counter(m_policy for m in unfinished if (m_policy := _policy_of(s, m)))
    per_policy.update(policy for _source, policy in stops if policy)
    inbound = Counter((_policy_of(s, m), m.target) for m in unfinished if m.target)
    arriving = Counter(m.target for m in unfinished if m.target)
    room = _Room(s)
    pin = bool(later)  # live migrations pinned off the wave's later nodes
    rounds = _queue_rounds(s, vms)
    typical = _typical_seconds(vms)
    held: set[str] = set()  # sources whose next start waits for a transfer to end (stagger)
    begun: dict[str, list[stagger.Transfer]] = {}  # transfers this pass starts, by source
    for v in _start_order(s, vms, per_node):
        rules = s.rules_for(v.key)
        source = v.entry.source_node or ""
        live = not v.stop and v.move is None
        if live and source in held:
            continue  # whatever we created now would start in the slot the held one waits for
        gate = gates.of(rules)
        if gate.closed:
            v.entry = v.entry.model_copy(update={
                "phase": VMPhase.WAITING, "reason": gate.closed[0], "message": gate.closed[1]})
            continue
        if gate.too_long(v.seconds):
            _wait_for_longer_window(v, gate)
            continue
        # A VM whose disks' move began holds its slot since (_storage_in_flight).
        queue = _kubevirt_queue(s, rules, v, gate.rounds(rounds, typical or v.seconds,
                                                         v.seconds))
        if not v.reserved and (
                total >= s.limits.per_cluster + queue[0]
                or per_node[source] >= _concurrency(s, rules) + queue[1] or (
                    rules.max_parallel and per_policy[rules.policy] >= rules.max_parallel)):
            continue
        if v.move and _copies_full(rules, v.move, into, out_of):
            v.entry = v.entry.model_copy(update={"message": "waiting for a copy slot "
                                                 "(storage.maxParallelCopies)"})
            continue
        starts_now = live and not v.reserved and total < s.limits.per_cluster and \
            per_node[source] < min(_concurrency(s, rules), s.limits.outbound_per_node)
        if starts_now and (delay := _stagger(s, v.key, rules, source, begun)):
            held.add(source)
            decision.recheck_after = min(decision.recheck_after or delay, delay)
            v.entry = v.entry.model_copy(update={"message": "staggered: waiting for the "
                                                 f"transfer leaving {source} to end"})
            continue
        limit = None if v.stop else rules.max_inbound_per_node  # a restart is no arrival
        target = _spread([n for n in v.targets if room.fits(n, v.requests) and (
            not limit or inbound[(rules.policy, n)] < limit)], arriving, later)
        if target is None:
            v.entry = v.entry.model_copy(update={"message": "waiting for room on a target "
                                                 "node" + (" within maxParallelInboundPerNode"
                                                           if rules.max_inbound_per_node
                                                           and not v.stop else "")})
            continue
        room.take(target, v.requests)
        if not v.stop:
            arriving[target] += 1
        if not v.reserved:
            total += 1
            per_node[source] += 1
            per_policy[rules.policy] += 1
        if v.move:
            # Shared-nothing, step one: the destination claims and the VM pointed at them;
            # the migration follows once KubeVirt has the VMI migrating its volumes.
            decision.claims.extend(v.move.claims)
            decision.volumes.append(v.move.update)
            into.update(v.move.target_classes)
            out_of.update(v.move.source_classes)
            v.entry = v.entry.model_copy(update={
                "phase": VMPhase.MIGRATING, "reason": "PreparingVolumes",
                "message": f"creating {len(v.move.claims)} destination claims"})
            continue
        if v.stop:
            # The restart lands where the migration would: the same selector and pin.
            restart_pin = dict(s.spec.target_node_selector or {})
            if later:
                restart_pin[HOSTNAME_LABEL] = target
            decision.halt.append(Stop(v.key, source, rules.policy, restart_pin or None))
            v.entry = v.entry.model_copy(update={"phase": VMPhase.MIGRATING})
            continue
        selector = dict(s.spec.target_node_selector or {})
        if rules.max_inbound_per_node or pin:
            # KubeVirt picks targets itself; to bound arrivals per node, or to keep the VM off
            # the nodes the wave drains later, we pin the target.
            selector[HOSTNAME_LABEL] = target
            inbound[(rules.policy, target)] += 1
        ns, name = v.key.split("/", 1)
        mig_name = migration_name(s.name, name, v.candidate_attempt, s.uid)
        decision.create.append(NewMigration(
            namespace=ns, name=mig_name, vmi=name, attempt=v.candidate_attempt, source=source,
            policy=rules.policy, selector=selector, mode=v.entry.mode))
        v.entry = v.entry.model_copy(update={
            "phase": VMPhase.MIGRATING, "reason": "Created", "migration": mig_name,
            "attempts": v.candidate_attempt, "message": f"created migration {mig_name}"})
    gates.recheck(decision)
    _window_events(s, vms, decision, gates)


def _start_order(s: DrainSnapshot, vms: list[_VM], per_node: Counter[str]) -> list[_VM]:
    """Longest first, except that a source with nothing leaving it yet whose starts are
    staggered begins with its shortest live migration: the next one waits only for that
    transfer (_stagger), and longest first keeps the later ones apart."""
    order = sorted((v for v in vms if v.admissible), key=lambda v: -v.seconds)
    first: dict[str, _VM] = {}
    for v in reversed(order):
        source = v.entry.source_node or ""
        if not v.stop and v.move is None and not per_node[source] and source not in first \
                and _staggers(s, s.rules_for(v.key), source):
            first[source] = v
    return list(first.values()) + [v for v in order if v not in first.values()]


def _staggers(s: DrainSnapshot, rules: Rules, source: str) -> bool:
    """Whether starts from ``source`` are staggered: its transfers share its NIC, and our
    answers come well within a target pod's start-up -- a wait would otherwise end that much
    later than meant, and hold back the queue behind it (as a clock that multiplies our
    latency does)."""
    return s.reaction_seconds < s.estimator.target_startup / 2 and stagger.shares_nic(
        s.estimator, rules, _node_bandwidth(s, source), _concurrency(s, rules))


def _stagger(s: DrainSnapshot, key: str, rules: Rules, source: str,
             begun: dict[str, list[stagger.Transfer]]) -> float:
    """Seconds the VM's migration should wait so that its transfer starts after those
    leaving ``source`` end (domain.stagger), including those this pass starts (``begun``,
    to which it is added when it need not wait); 0 to start it now."""
    vmi = s.vmis.get(key)
    if vmi is None or not _staggers(s, rules, source):
        return 0.0
    nic = _node_bandwidth(s, source)
    seconds = stagger.alone(s.estimator, vmi, rules, nic)
    if seconds is None:
        return 0.0

    def seconds_of(m: MigrationInfo) -> float | None:
        other = s.vmis.get(m.vmi_key)
        return None if other is None else stagger.alone(
            s.estimator, other, s.rules_for(m.vmi_key), nic)
    startup = s.estimator.target_startup
    others = stagger.under_way(s.cluster_unfinished, source, s.limits.outbound_per_node,
                               s.now, s.estimator, seconds_of) + begun.get(source, [])
    delay = stagger.wait(s.now, seconds, others, startup)
    if not delay:
        begun.setdefault(source, []).append(stagger.Transfer(
            s.now + dt.timedelta(seconds=startup), seconds + stagger.STAMP_RESOLUTION))
    return delay


def _spread(targets: list[str], arriving: Counter[str], later: tuple[str, ...]
            ) -> str | None:
    """Of the targets with room (best first), the first with the fewest migrations arriving;
    the wave's later nodes stay last, in their order."""
    if not targets:
        return None
    return min(enumerate(targets), key=lambda it: (it[1] in later, 0 if it[1] in later
                                                   else arriving[it[1]], it[0]))[1]


MAX_QUEUE_ROUNDS = 4  # rounds of migrations that may wait in KubeVirt's queue, at most


def _queue_rounds(s: DrainSnapshot, vms: list[_VM]) -> int:
    """How many rounds to keep waiting in KubeVirt's queue: the queue must last until our
    next migrations land, and R rounds last about R typical migrations (those still to
    start, predicted). One at least; more when our reaction is slower than a migration (a
    busy API server, a simulated clock that multiplies it)."""
    typical = _typical_seconds(vms)
    if s.reaction_seconds <= 0 or typical is None:
        return 1
    return max(1, min(MAX_QUEUE_ROUNDS, math.ceil(s.reaction_seconds / typical)))


def _typical_seconds(vms: list[_VM]) -> float | None:
    """The mean predicted time of the live migrations still to start: how long one round of
    KubeVirt's queue lasts."""
    waiting = [v.seconds for v in vms if v.candidate_attempt and not v.stop and v.move is None
               and v.seconds > 0]
    return sum(waiting) / len(waiting) if waiting else None


def _kubevirt_queue(s: DrainSnapshot, rules: Rules, v: _VM, rounds: int = 1
                    ) -> tuple[int, int]:
    """How many migrations beyond KubeVirt's running limits (cluster, per source node) may wait
    in KubeVirt's queue: ``rounds`` of each (_queue_rounds), when KubeVirt's limits are the only
    ones that apply (no outbound limit of the policy's, no bandwidth-derived one;
    maxParallelMigrations and inbound limits count queued migrations anyway). None for a stop
    or a storage move, which take effect at once."""
    if v.stop or v.move is not None:
        return 0, 0
    ours = _concurrency(s, rules)
    node = s.limits.outbound_per_node if ours >= min(s.limits.outbound_per_node,
                                                     s.limits.per_cluster) else 0
    return rounds * s.limits.per_cluster, rounds * node


def _copies_full(rules: Rules, move: storage.Move, into: Counter[str],
                 out_of: Counter[str]) -> bool:
    """The policy's storage.maxParallelCopies (into a class) or per source class is reached."""
    spec = rules.storage
    if spec is None:
        return False
    if spec.max_parallel_copies and any(into[c] >= spec.max_parallel_copies
                                        for c in move.target_classes):
        return True
    per_source = spec.max_parallel_copies_per_source_class
    return bool(per_source and any(out_of[c] >= per_source for c in move.source_classes))


def _storage_in_flight(s: DrainSnapshot) -> list[tuple[str, str | None]]:
    """(source node, policy) of every VM, of any drain or policy, whose volumes' move began
    and whose migration has not been created yet: each holds a slot meanwhile."""
    busy = {m.vmi_key for m in s.cluster_unfinished if m.unfinished}
    out = []
    for key, st in s.storage.items():
        if key in busy or not storage.moving(st, s.claims):
            continue
        vmi = s.vmis.get(key)
        out.append((vmi.node or "" if vmi else "",
                    s.rules_for(key).policy if key in s.rules else None))
    return out


# -- maintenance windows ------------------------------------------------------------------------

OUTSIDE_WINDOW = "OutsideWindow"
WINDOW_TOO_SHORT = "WindowTooShort"
INVALID_WINDOW = windows.INVALID_WINDOW  # named here too: the drain reports it
FINISH = "Finish"  # the policy's withinWindow: only what is predicted to end in the window
# The least of _window_margin, for a reaction not measured yet.
MIN_WINDOW_MARGIN = 1.0


def _window_margin(s: DrainSnapshot) -> float:
    """Cluster seconds, on top of a target pod's start-up, before a window's end from which
    we create no migration and withdraw those still queued: twice our time to act
    (``reaction_seconds``, the slowest of our recent passes from an event to its writes
    landing) -- once for the pass due at that moment (Decision.recheck_after), once for a pass
    already under way then, which may still create one. KubeVirt may start a queued migration
    whenever a slot frees, between our passes; what is still queued when our withdrawal lands
    could otherwise start late."""
    return max(2 * s.reaction_seconds, MIN_WINDOW_MARGIN)


@dataclass(frozen=True)
class _Gate:
    """What a VM's policy's windows allow now. Nothing may begin within ``lead`` seconds of
    the window's end: a migration begun then (created, or taken from KubeVirt's queue) would
    start its transfer after the end, a target pod's start-up later (``lead`` = that
    start-up plus _window_margin)."""

    policy: str | None
    closed: tuple[str, str] | None = None  # (reason, message): nothing of it begins now
    closes_at: dt.datetime | None = None  # the open window's end (None: none in sight)
    next_open: dt.datetime | None = None  # when moves may begin again after it
    now: dt.datetime | None = None
    lead: float = 0.0
    margin: float = 0.0
    finish: bool = False  # withinWindow: Finish
    next_length: float | None = None  # seconds the next window is open (Finish only)

    @property
    def closes_in(self) -> float | None:
        if self.closes_at is None or self.now is None:
            return None
        return (self.closes_at - self.now).total_seconds()

    @property
    def left(self) -> float | None:
        """Seconds during which a move may still begin (None: no end in sight)."""
        closes_in = self.closes_in
        return None if closes_in is None else closes_in - self.lead

    def too_long(self, seconds: float) -> bool:
        """withinWindow: Finish, and a move of ``seconds`` begun now would end after the
        window's end."""
        closes_in = self.closes_in
        return self.finish and closes_in is not None and seconds > closes_in - self.margin

    def rounds(self, rounds: int, typical: float, seconds: float) -> int:
        """Of ``rounds`` of KubeVirt's queue, those that start before the window's last start
        -- round r leaves the queue about r typical migrations from now -- and, under Finish,
        also end (a migration of ``seconds``) before the window's end."""
        left = self.left
        if left is None:
            return rounds
        closes_in = self.closes_in or 0.0
        room = closes_in - self.margin - seconds if self.finish else left
        return max(0, min(rounds, math.floor(room / typical))) if typical > 0 else 0

    def opens(self) -> str:
        return stamp(self.next_open) if self.next_open else "never"


class _Gates:
    """The windows' verdict per policy for this pass, and a pass when the first of them
    changes: at a window's last start (to withdraw what is still queued then) or its next
    opening (to start again)."""

    def __init__(self, s: DrainSnapshot) -> None:
        self.s = s
        self.seen: dict[str | None, _Gate] = {}

    def of(self, rules: Rules) -> _Gate:
        if rules.policy not in self.seen:
            self.seen[rules.policy] = _gate(self.s, rules)
        return self.seen[rules.policy]

    def recheck(self, decision: Decision) -> None:
        for gate in self.seen.values():
            left = gate.left
            if gate.closed is None and left is not None:
                due = max(left, 0.0)
            elif gate.closed is not None and gate.next_open is not None:
                due = max((gate.next_open - self.s.now).total_seconds(), 0.0)
            else:
                continue
            if decision.recheck_after is None or due < decision.recheck_after:
                decision.recheck_after = due


def _gate(s: DrainSnapshot, rules: Rules) -> _Gate:
    if not rules.windows:
        return _Gate(rules.policy)
    margin = _window_margin(s)
    lead = s.estimator.target_startup + margin
    try:
        state = windows.start_gate(rules.windows, s.now, lead)
    except windows.WindowError as exc:
        return _Gate(rules.policy, closed=(INVALID_WINDOW, f"policy {rules.policy}: {exc}"))
    gate = _Gate(rules.policy, closes_at=state.closes_at, next_open=state.next_open,
                 now=s.now, lead=lead, margin=margin, finish=rules.within_window == FINISH)
    if gate.finish and state.next_open is not None:
        after = windows.window_state(rules.windows, state.next_open).closes_at
        gate = dataclasses.replace(gate, next_length=(
            after - state.next_open).total_seconds() if after else None)
    if state.may_start:
        return gate
    if state.closes_at is not None:  # open, but its end is too near for a start
        why = (f"policy {rules.policy}'s window closes at {stamp(state.closes_at)}, too soon "
               f"for a migration to start (target start-up {s.estimator.target_startup:.0f}s "
               f"and {margin:.0f}s for virtshift to act); new migrations from {gate.opens()}")
    else:
        why = f"policy {rules.policy} allows new migrations from {gate.opens()}"
    return dataclasses.replace(gate, closed=(OUTSIDE_WINDOW, why))


def _wait_for_longer_window(v: _VM, gate: _Gate) -> None:
    """withinWindow: Finish, and the VM's move would not end before the window does: it waits
    for the next window -- or, predicted longer than that one is open, is reported and held
    (WindowTooShort), as no window will fit it."""
    closes = stamp(gate.closes_at) if gate.closes_at else "?"
    if gate.next_length is not None and v.seconds > gate.next_length - gate.margin:
        v.candidate_attempt, v.stop, v.move = 0, False, None
        v.blocked_by = WINDOW_TOO_SHORT
        v.entry = v.entry.model_copy(update={
            "phase": VMPhase.WAITING, "reason": WINDOW_TOO_SHORT, "message": (
                f"predicted {v.seconds:.0f}s, longer than policy {gate.policy}'s next window "
                f"is open ({gate.next_length:.0f}s from {gate.opens()}; withinWindow: Finish)")})
        return
    v.entry = v.entry.model_copy(update={
        "phase": VMPhase.WAITING, "reason": OUTSIDE_WINDOW, "message": (
            f"predicted {v.seconds:.0f}s, would not finish before policy {gate.policy}'s "
            f"window closes at {closes} (withinWindow: Finish); new migrations from "
            f"{gate.opens()}")})


def _withdraw_outside_windows(s: DrainSnapshot, vms: list[_VM], decision: Decision,
                              gates: _Gates) -> set[tuple[str, str]]:
    """Our migrations still in KubeVirt's queue whose VM's policy window no longer lets them
    start in time -- past its last start, or (withinWindow: Finish) too near its end for the
    predicted migration -- are withdrawn as pause withdraws them (not counted as attempts):
    KubeVirt would take them from its queue whenever a slot frees, after the window's end.
    Returns their (namespace, name)."""
    by_key = {v.key: v for v in vms}
    out: set[tuple[str, str]] = set()
    for m in s.migrations:
        if not m.queued:
            continue
        rules = s.rules_for(m.vmi_key)
        gate = gates.of(rules)
        why = gate.closed
        vmi = s.vmis.get(m.vmi_key)
        if why is None and gate.finish and vmi is not None:
            # As admission predicted it (the ladder's step included), or a migration admitted
            # on one prediction would be withdrawn on another, and made again, pass after pass.
            _choice, predicted = _chosen(s, vmi, rules, s.estimator.seconds(
                vmi, rules, _node_bandwidth(s, vmi.node), _concurrency(s, rules)))
            if gate.too_long(predicted):
                why = (OUTSIDE_WINDOW, f"predicted {predicted:.0f}s, would not finish before "
                       f"policy {rules.policy}'s window closes (withinWindow: Finish); new "
                       f"migrations from {gate.opens()}")
        if why is None:
            continue
        decision.withdraw.append(m)
        out.add((m.namespace, m.name))
        v = by_key.get(m.vmi_key)
        if v is not None:
            v.entry = v.entry.model_copy(update={
                "phase": VMPhase.WAITING, "reason": why[0], "message": "withdrawn from "
                f"KubeVirt's queue (migration {m.name} had not started); {why[1]}"})
    return out


def _window_events(s: DrainSnapshot, vms: list[_VM], decision: Decision,
                   gates: _Gates) -> None:
    """An Event when a policy's VMs begin to wait for its next window: the window closed on
    the drain with work left (or was closed when it began)."""
    before = {(e.namespace, e.name) for e in s.status.vms or []
              if e.reason == OUTSIDE_WINDOW}
    waiting: dict[str | None, list[_VM]] = {}
    for v in vms:
        if v.entry.reason == OUTSIDE_WINDOW:
            waiting.setdefault(s.rules_for(v.key).policy, []).append(v)
    for policy, group in sorted(waiting.items(), key=lambda it: it[0] or ""):
        if any((v.entry.namespace, v.entry.name) in before for v in group):
            continue
        gate = gates.of(s.rules_for(group[0].key))
        queued = sum(1 for v in group if (v.entry.message or "").startswith("withdrawn"))
        decision.events.append(("Normal", OUTSIDE_WINDOW, (
            f"policy {policy}'s window is closed with {len(group)} VMs still to move"
            + (f" ({queued} withdrawn from KubeVirt's queue before they started)"
               if queued else "")
            + f"; they wait for the next window, from {gate.opens()}")))


def _window_note(s: DrainSnapshot, vms: list[_VM]) -> str:
    """What the drain waits for when VMs wait for their policies' next windows (for the
    conditions' messages), '' when none does."""
    opens: dict[str | None, str] = {}
    count = 0
    for v in vms:
        if v.entry.reason == OUTSIDE_WINDOW and v.entry.phase == VMPhase.WAITING:
            rules = s.rules_for(v.key)
            if rules.policy not in opens:
                opens[rules.policy] = _gate(s, rules).opens()
            count += 1
    if not count:
        return ""
    return f"; {count} VMs wait for the next window (" + ", ".join(
        f"policy {p} opens {t}" for p, t in sorted(opens.items(), key=lambda it: it[0] or "")
    ) + ")"


# -- an unusable policyRef ----------------------------------------------------------------------


def _not_starting(s: DrainSnapshot) -> tuple[str, str | None]:
    """Why nothing starts (the VMs' reason, and a message when it says more)."""
    if s.spec.paused:
        return "Paused", None
    if _deadline_passed(s):
        return "DeadlineExceeded", None
    assert s.policy_problem is not None
    return s.policy_problem


# A failed VM's reasons that come from KubeVirt, whatever the policy says.
_KUBEVIRT_VERDICTS = (storage.VOLUME_UPDATE_REFUSED, storage.MANUAL_RECOVERY)


def _hold_for_policy(s: DrainSnapshot, vms: list[_VM], decision: Decision) -> None:
    """spec.policyRef names no usable policy: the VMs were judged under default rules, which
    are not the drain's. Every verdict of those rules waits (reported with the policy's
    problem) and nothing they decide is done -- no revert because of maxAttempts, no claim
    deleted -- except what KubeVirt itself forces (a volume update it refused goes back).
    Migrations under way, and VMs a quick migration stopped, go on. A Warning Event on the
    transition."""
    problem = s.policy_problem
    if problem is None:
        return
    reason, message = problem
    for v in vms:
        e = v.entry
        judged = e.phase in (VMPhase.PENDING, VMPhase.WAITING) or (
            e.phase == VMPhase.FAILED and e.reason not in _KUBEVIRT_VERDICTS) or (
            e.phase == VMPhase.SKIPPED and e.reason != "VMIGone")
        if not judged:
            continue
        v.candidate_attempt, v.stop, v.move, v.blocked_by = 0, False, None, None
        v.entry = e.model_copy(update={"phase": VMPhase.WAITING, "reason": reason,
                                       "message": message})
    decision.revert = [u for u in decision.revert
                       if (st := s.storage.get(f"{u.namespace}/{u.vm}")) and storage.stuck(st)]
    decision.delete_claims = []
    stalled = next((c for c in s.status.conditions or [] if c.type == "Stalled"), None)
    if stalled is None or stalled.reason != reason or stalled.status != "True":
        decision.events.append(("Warning", reason, message))


def _policy_of(s: DrainSnapshot, m: MigrationInfo) -> str | None:
    return m.policy or (s.rules_for(m.vmi_key).policy if m.drain == s.name else None)


_ORDER = {VMPhase.FAILED: 0, VMPhase.MIGRATING: 1, VMPhase.WAITING: 2, VMPhase.PENDING: 3,
          VMPhase.SKIPPED: 4, VMPhase.SUCCEEDED: 5}


# -- the whole drain ----------------------------------------------------------------------------


def plan_drain(s: DrainSnapshot) -> Decision:
    decision = Decision(status=NodeDrainStatus())
    now = stamp(s.now)
    if s.conflict_with:
        return _conflict(s, decision, now)
    nodes = wave(s)
    if not nodes:
        return _not_found(s, decision, now)
    active = {e.name for e in nodes if e.phase in (NodePhase.DRAINING, NodePhase.DRAINED)}
    draining = {e.name for e in nodes if e.phase == NodePhase.DRAINING}
    waiting = {e.name for e in nodes if e.phase == NodePhase.WAITING}

    frozen = s.spec.dry_run or _frozen(s)  # a paused wave cordons and releases nothing
    if not frozen:
        for n in sorted(draining):
            node = s.nodes.get(n)
            if node and not node.unschedulable:
                decision.cordon.append(n)
    if not s.spec.dry_run:
        decision.forget_maintenance = sorted(
            n for n in draining if n in s.nodes and MAINTENANCE_COMPLETE in s.nodes[n].annotations)
    # Never a target: the nodes in maintenance and, while the wave goes on, the nodes it will
    # drain later (unless nothing else has room: then the one it drains last).
    later = tuple(e.name for e in nodes if e.phase == NodePhase.WAITING)
    in_maintenance = active | set(decision.cordon)
    target_selector = dict(s.spec.target_node_selector or {})
    places = _Places(
        strict=preflight.Context(nodes=s.nodes, usage=s.usage, target_selector=target_selector,
                                 excluded=frozenset(in_maintenance | set(later))),
        loose=preflight.Context(nodes=s.nodes, usage=s.usage, target_selector=target_selector,
                                excluded=frozenset(in_maintenance)) if later else None,
        later=later)
    concurrency = max(1, min(s.limits.outbound_per_node, s.limits.per_cluster))

    scope = {k for k, v in s.vmis.items() if v.node in draining}
    scope |= {m.vmi_key for m in s.migrations}
    scope |= {k for k, vm in s.vms.items() if _ours(s, vm.quick)}
    # Quick migrations done, whose records are gone: the status remembers them.
    scope |= {f"{e.namespace}/{e.name}" for e in s.status.vms or []
              if e.phase == VMPhase.SUCCEEDED and e.mode == "QuickMigration"}
    scope |= {f"{c.namespace}/{c.vm}" for c in s.claims.values()
              if c.moved_by == s.owner and c.vm and f"{c.namespace}/{c.vm}" in s.vmis}
    # A VM skipped on a node that has drained since is still on it: keep reporting it.
    skipped_before = {f"{e.namespace}/{e.name}" for e in s.status.vms or []
                      if e.phase == VMPhase.SKIPPED}
    kept = {k for k in skipped_before if k in s.vmis and s.vmis[k].node in active}
    scope |= kept
    vms = [v for k in sorted(scope)
           if (v := _evaluate(s, k, active if k in kept else draining, places, decision))]
    _hold_for_policy(s, vms, decision)
    _admit(s, vms, decision, later)

    # Pods other than virt-launchers (evictPods).
    ordinary = [p for p in s.pods if p.node in draining and p.kind == "ordinary"]
    if s.spec.evict_pods and _may_start(s):
        decision.evict = [p.key for p in ordinary]
    pods_left = len(ordinary) if s.spec.evict_pods else 0

    unfinished_on = Counter(v.entry.source_node for v in vms
                            if v.entry.phase not in (VMPhase.SUCCEEDED, VMPhase.SKIPPED))
    pods_on = Counter(p.node for p in ordinary) if s.spec.evict_pods else Counter()
    # A node is empty only when no VM it had to move still runs there, whatever the VMIs
    # say: a launcher pod is where a VM runs (a source pod lingers until its VM has left).
    skipped = {v.key for v in vms if v.entry.phase == VMPhase.SKIPPED}
    launchers_on = Counter(p.node for p in s.launchers if p.vmi not in skipped)
    # ... and only once it is cordoned: an empty node that takes new VMs is not drained.
    node_done = {n: unfinished_on[n] == 0 and pods_on[n] == 0 and launchers_on[n] == 0
                 and n in s.nodes and s.nodes[n].unschedulable for n in draining}
    if not s.spec.dry_run:
        nodes = _advance_wave(s, nodes, node_done)
        _recheck_at_release(s, nodes, decision)
    for e in nodes:
        node = s.nodes.get(e.name)
        if e.phase == NodePhase.RELEASED and node and not frozen and \
                node.annotations.get(CORDONED_BY) == s.name:
            decision.uncordon.append(e.name)

    # Waiting nodes' VMs are the wave's pending work.
    pending_later = [v for k, v in s.vmis.items() if v.node in waiting and k not in scope]
    lingering = sorted(p.key for p in s.launchers if p.vmi not in skipped
                       and p.node in draining and unfinished_on[p.node] == 0)
    decision.draft = _Draft(nodes, vms, pending_later, pods_left, concurrency, now, lingering,
                            planned_events=tuple(decision.events))
    return _status(s, decision, decision.draft)


@dataclass(frozen=True)
class _Draft:
    """What a pass's status is computed from (``_status``)."""

    nodes: list[NodeEntry]
    vms: list[_VM]
    later: list[VMIInfo]
    pods_left: int
    concurrency: int
    now: str
    lingering: list[str]
    # The Events decided while planning (a window closing, an unusable policyRef): _status
    # adds only those of status changes, so settle keeps these.
    planned_events: tuple[tuple[str, str, str], ...] = ()


def settle(s: DrainSnapshot, decision: Decision,
           failures: Mapping[str, outcome.StepFailure]) -> Decision:
    """The decision's status corrected with what its writes did (``failures``: the steps
    that failed or were not tried in this pass, dated by outcome.remember): a VM whose
    migration the API server refused is Waiting with CreateFailed and the API's message, not
    Created; a node whose cordon failed is not Cordoned; and a step failing on every pass for
    outcome.WRITE_STALL_SECONDS makes the drain Stalled. No failures: the decision as it
    was; the next pass whose writes go through recovers by itself."""
    draft = decision.draft
    if draft is None or not failures:
        return decision
    steps = _step_vms(decision)
    vms = []
    for v in draft.vms:
        failed = [(step, f) for step, f in sorted(failures.items()) if steps.get(step) == v.key]
        for step, f in failed[:1]:
            v = dataclasses.replace(v, entry=outcome.corrected(v.entry, step, f))
        vms.append(v)
    redone = dataclasses.replace(decision, events=list(draft.planned_events), downtimes=[])
    return _status(s, redone, dataclasses.replace(draft, vms=vms), failures)


def _step_vms(d: Decision) -> dict[str, str]:
    """Step (as k8s.actions names it) -> the VM it moves."""
    out = {f"create {m.namespace}/{m.name}": f"{m.namespace}/{m.vmi}" for m in d.create}
    out.update({f"stop {h.key}": h.key for h in d.halt})
    out.update({f"start {k}": k for k in d.start})
    out.update({f"claim {c.namespace}/{c.name}": f"{c.namespace}/{c.vm}" for c in d.claims})
    out.update({f"volumes {u.namespace}/{u.vm}": f"{u.namespace}/{u.vm}" for u in d.volumes})
    return out


def _status(s: DrainSnapshot, decision: Decision, draft: _Draft,
            failures: Mapping[str, outcome.StepFailure] | None = None) -> Decision:
    nodes, vms, later, pods_left = draft.nodes, draft.vms, draft.later, draft.pods_left
    concurrency, now, lingering = draft.concurrency, draft.now, draft.lingering
    failures = failures or {}
    phases = Counter(v.entry.phase for v in vms)
    counts = DrainCounts(
        total=len(vms) + len(later),
        pending=phases[VMPhase.PENDING] + phases[VMPhase.WAITING] + len(later),
        migrating=phases[VMPhase.MIGRATING], succeeded=phases[VMPhase.SUCCEEDED],
        failed=phases[VMPhase.FAILED], skipped=phases[VMPhase.SKIPPED])
    # Of the finished, quick migrations first: once their records are gone (finish), the
    # status is all that remembers them, so they are the last entries MAX_VM_ENTRIES drops.
    entries = sorted((v.entry for v in vms), key=lambda e: (
        _ORDER[e.phase], e.mode != "QuickMigration", e.namespace, e.name))
    remaining = [v.seconds for v in vms if v.entry.phase in (
        VMPhase.PENDING, VMPhase.WAITING, VMPhase.MIGRATING)]
    remaining += [s.estimator.seconds(v, s.rules_for(v.key), _node_bandwidth(s, v.node),
                                      _concurrency(s, s.rules_for(v.key))) for v in later]
    slots = max(1, min(s.limits.per_cluster, concurrency * max(1, s.spec.max_unavailable)))
    left = makespan(remaining, slots)
    finished = counts.pending == counts.migrating == 0 and pods_left == 0 and not lingering
    drained = finished and counts.failed == 0 and all(
        e.phase in (NodePhase.DRAINED, NodePhase.RELEASED) for e in nodes) if not \
        s.spec.dry_run else False

    previous = s.status
    start_time = previous.start_time or (None if s.spec.dry_run else now)
    completion = (previous.completion_time or now) if drained else None
    st = NodeDrainStatus(
        observed_generation=s.generation, counts=counts,
        progress=f"{counts.succeeded + counts.skipped}/{counts.total}",
        vms=entries[:MAX_VM_ENTRIES] or None, nodes=nodes,
        bytes_to_move=int(sum(v.memory for v in vms if v.entry.phase != VMPhase.SKIPPED)
                          + sum(v.memory for v in later)),
        bytes_moved=int(sum(v.memory for v in vms if v.entry.phase == VMPhase.SUCCEEDED)),
        start_time=start_time, completion_time=completion,
        planned_seconds=round(left, 1),
        eta=stamp(s.now + dt.timedelta(seconds=left)) if not drained else completion,
        blocking_pods=[f"{k}: {r}" for k, r in sorted(s.blocked_pods.items())][:20] or None,
        pods_remaining=pods_left if s.spec.evict_pods else None,
    )
    refused = outcome.refused_cordons(failures)
    cordoned = all((s.nodes[e.name].unschedulable or (e.name in decision.cordon
                                                      and e.name not in refused))
                   for e in nodes if e.phase in (NodePhase.DRAINING, NodePhase.DRAINED)
                   and e.name in s.nodes)
    failed_names = [f"{e.namespace}/{e.name}" for e in entries if e.phase == VMPhase.FAILED]
    blocked = {v.blocked_by for v in vms if v.blocked_by and v.entry.phase == VMPhase.WAITING}
    conds = list(previous.conditions or [])

    def put(type_: str, status: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, status, reason, message, s.generation, now)

    windows_note = _window_note(s, vms)
    progress = f"{st.progress} VMs moved or skipped{windows_note}"
    if s.spec.dry_run:
        put("Cordoned", False, "DryRun", "dryRun: nothing is cordoned")
        put("Drained", False, "DryRun", "dryRun: nothing moves")
        put("Ready", True, "Planned", f"plan for {counts.total} VMs; predicted "
            f"{round(left)}s")
        put("Reconciling", False, "Planned", "dryRun")
        put("Stalled", False, "Planned", "dryRun")
        phase = DrainPhase.PLANNED
    else:
        if all(e.phase == NodePhase.WAITING for e in nodes):  # paused before it began
            put("Cordoned", False, "Waiting", "no node of this drain is in maintenance yet")
        elif refused:
            put("Cordoned", False, outcome.CORDON_FAILED, "; ".join(
                f"cordoning {n} failed: {msg}" for n, msg in sorted(refused.items())))
        else:
            put("Cordoned", cordoned, "Cordoned" if cordoned else "Cordoning",
                "nodes in maintenance are unschedulable" if cordoned else "cordoning")
        remaining = _skipped_remaining(entries)
        put("Drained", drained, "Drained" if drained else "Draining",
            ("every VM has left" + (f" but for {_vms(remaining)} still running there: "
                                    + _listing(remaining) if remaining else ""))
            if drained else progress + (
                f"; virt-launcher pods still running: {', '.join(lingering[:5])}"
                if lingering else ""))
        stalled_reason = _stalled_by(s, failures, drained, finished, failed_names, blocked,
                                     counts, vms, entries)
        if stalled_reason:
            put("Stalled", True, *stalled_reason)
        else:
            put("Stalled", False, "Progressing", progress)
        if drained:
            put("Reconciling", False, "Drained", progress)
            put("Ready", True, "Drained", _ready_message(s, remaining))
            phase = DrainPhase.DRAINED
        else:
            reason = "Paused" if s.spec.paused else OUTSIDE_WINDOW if windows_note and \
                counts.migrating == 0 else "Draining"
            put("Reconciling", not stalled_reason, reason, progress)
            put("Ready", False, stalled_reason[0] if stalled_reason else reason, progress)
            phase = (DrainPhase.STALLED if stalled_reason else
                     DrainPhase.PAUSED if s.spec.paused else DrainPhase.DRAINING)
    put(PREDICTIONS_AVAILABLE, *_predictions(s, vms, later))
    st.conditions = conds
    st.phase = phase
    decision.status = st
    decision.events.extend(_events(s, previous, st))
    decision.events.extend(_predictions_events(previous, st))
    decision.downtimes.extend(_observations(previous, st))
    return decision


def _stalled_by(s: DrainSnapshot, failures: Mapping[str, outcome.StepFailure], drained: bool,
                finished: bool, failed_names: list[str], blocked: set[str | None],
                counts: DrainCounts, vms: list[_VM], entries: list[VMEntry]
                ) -> tuple[str, str] | None:
    """(reason, message) of what stalls the drain, first match: a write refused on every pass
    for a while (nothing it holds up moves until it goes through), a policyRef naming no usable
    policy, VMs that failed for good, the deadline, or every VM left blocked."""
    if (refused := outcome.stalled_by(failures, s.now)) is not None:
        return refused
    if s.policy_problem and not drained:
        return s.policy_problem
    if failed_names and finished:
        return "MigrationFailed", "could not move: " + ", ".join(failed_names[:10])
    if _deadline_passed(s) and not drained:
        return "DeadlineExceeded", f"not drained within {s.spec.deadline}; no new migrations start"
    if blocked and counts.migrating == 0 and not any(v.admissible for v in vms) \
            and counts.pending:
        reason = sorted(b for b in blocked if b)[0]
        names = [f"{e.namespace}/{e.name}" for e in entries if e.reason == reason]
        return reason, f"{reason}: " + ", ".join(names[:10])
    return None


PREDICTIONS_AVAILABLE = downtime.PREDICTIONS_AVAILABLE
DIRTY_RATES_KNOWN = downtime.DIRTY_RATES_KNOWN


def _predictions(s: DrainSnapshot, vms: list[_VM], later: list[VMIInfo]
                 ) -> tuple[bool, str, str]:
    """PredictionsAvailable: whether every VM still to move has a dirty rate. Without one its
    predicted time (and so plannedSeconds and eta) takes it as dirtying nothing, a lower bound,
    and where maxDowntime or onDowntimeExceeded would act it is treated as not fitting
    (downtime.choose)."""
    # Still to start, and by a live migration: one under way is past deciding (and KubeVirt
    # publishes no dirty rate for a migrating VMI), a quick migration's restart needs none.
    to_move = [s.vmis[v.key] for v in vms if v.key in s.vmis and v.entry.phase in (
        VMPhase.PENDING, VMPhase.WAITING) and v.entry.mode != "QuickMigration"] + later
    unknown = sorted(v.key for v in to_move if v.dirty_rate is None)
    if not unknown:
        return True, DIRTY_RATES_KNOWN, ("every VM still to move has a dirty rate from the "
                                         "metrics source" if to_move else "no VM left to move")
    held = [k for k in unknown if downtime.rate_matters(
        s.rules_for(k).max_downtime, s.rules_for(k).on_downtime_exceeded)]
    cause = ("no metrics source (virtshift run --metrics-source)" if not s.metrics_source
             else "the metrics source reports no dirty rate for them")
    message = (f"{cause}: the dirty rates of {len(unknown)} VMs still to move are unknown "
               f"({', '.join(unknown[:10])}); their predicted times, plannedSeconds and eta "
               "take them as dirtying no memory, a lower bound")
    if held:
        message += (f"; {len(held)} under maxDowntime or onDowntimeExceeded treated as not "
                    f"predicted to fit: {', '.join(held[:10])}")
    reason = downtime.DIRTY_RATE_UNKNOWN if s.metrics_source else downtime.NO_METRICS_SOURCE
    return False, reason, message


def _predictions_events(old: NodeDrainStatus, new: NodeDrainStatus
                        ) -> list[tuple[str, str, str]]:
    """An Event when PredictionsAvailable turns False (or changes why), and when it is True
    again."""
    before = next((c for c in old.conditions or [] if c.type == PREDICTIONS_AVAILABLE), None)
    now = next((c for c in new.conditions or [] if c.type == PREDICTIONS_AVAILABLE), None)
    if now is None or (before is not None and before.reason == now.reason):
        return []
    if now.status == "False":
        return [("Warning", now.reason, now.message)]
    return [("Normal", now.reason, now.message)] if before is not None else []


def _skipped_remaining(entries: list[VMEntry]) -> list[VMEntry]:
    """Skipped VMs that still run on a node of the drain (one whose VMI has gone is not)."""
    return [e for e in entries if e.phase == VMPhase.SKIPPED and e.source_node]


def _vms(entries: list[VMEntry]) -> str:
    return f"{len(entries)} skipped VM" + ("s" if len(entries) != 1 else "")


def _listing(entries: list[VMEntry], limit: int = 10) -> str:
    shown = [f"{e.namespace}/{e.name} on {e.source_node}" for e in entries[:limit]]
    return ", ".join(shown) + (f" and {len(entries) - limit} more" if len(entries) > limit
                               else "")


def _ready_message(s: DrainSnapshot, remaining: list[VMEntry]) -> str:
    """What Ready says of a drained NodeDrain: never that a node is empty while skipped VMs
    still run on it."""
    if not s.spec.node_name:
        return "the wave is complete" + (
            f"; {_vms(remaining)} still run{'s' if len(remaining) == 1 else ''} on its "
            f"nodes: {_listing(remaining)}" if remaining else "")
    if not remaining:
        return "the nodes are empty and stay cordoned until this NodeDrain is deleted"
    return (f"{s.spec.node_name} is empty but for {_vms(remaining)} still running there: "
            f"{_listing(remaining)}; it stays cordoned until this NodeDrain is deleted")


def _newly_observed(prev: VMEntry | None, e: VMEntry) -> bool:
    """A downtime observation this VM's entry did not have before (it may come a pass or two
    after the migration succeeded)."""
    return e.observed_downtime_ms is not None and e.phase == VMPhase.SUCCEEDED and (
        prev is None or prev.observed_downtime_ms is None or prev.phase != e.phase)


def _observations(old: NodeDrainStatus, new: NodeDrainStatus) -> list[DowntimeObservation]:
    before = {(e.namespace, e.name): e for e in old.vms or []}
    return [DowntimeObservation(e.observed_downtime_ms, e.downtime_source or "")
            for e in new.vms or []
            if e.observed_downtime_ms is not None
            and _newly_observed(before.get((e.namespace, e.name)), e)]


def _events(s: DrainSnapshot, old: NodeDrainStatus, new: NodeDrainStatus
            ) -> list[tuple[str, str, str]]:
    events: list[tuple[str, str, str]] = []
    if old.phase != new.phase:
        kind = "Warning" if new.phase in (DrainPhase.STALLED, DrainPhase.CONFLICT) else "Normal"
        says = "Stalled" if new.phase == DrainPhase.STALLED else "Ready"
        cond = next((c for c in new.conditions or [] if c.type == says), None)
        events.append((kind, str(new.phase), cond.message if cond else str(new.phase)))
    before = {(e.namespace, e.name): e for e in old.vms or []}
    for e in new.vms or []:
        prev = before.get((e.namespace, e.name))
        if e.reason == downtime.DOWNTIME_EXCEEDED and _newly_observed(prev, e):
            events.append(("Warning", downtime.DOWNTIME_EXCEEDED, f"{e.namespace}/{e.name}: "
                           f"{e.message}"))
        if prev is not None and prev.phase == e.phase:
            continue
        if e.phase == VMPhase.SUCCEEDED:
            events.append(("Normal", "Migrated", f"{e.namespace}/{e.name} moved to "
                           f"{e.target_node}" + (f" (observed downtime {e.observed_downtime_ms}"
                                                 f" ms, {e.downtime_source})"
                                                 if e.observed_downtime_ms is not None else "")))
        elif e.phase == VMPhase.FAILED:
            events.append(("Warning", "MigrationFailed", f"{e.namespace}/{e.name}: {e.reason}: "
                           f"{e.message}"))
        elif e.phase == VMPhase.MIGRATING and (e.reason == "Created" or (
                e.mode == "QuickMigration" and (prev is None or prev.phase != e.phase))):
            events.append(("Normal", "Migrating", f"{e.namespace}/{e.name}: {e.message}"))
    for node in new.nodes or []:
        prev_node = next((n for n in old.nodes or [] if n.name == node.name), None)
        changed = prev_node is None or prev_node.phase != node.phase
        if changed and node.phase != NodePhase.WAITING:
            events.append(("Normal", f"Node{node.phase}", f"node {node.name} is "
                           f"{str(node.phase).lower()}"))
    return events


def _conflict(s: DrainSnapshot, decision: Decision, now: str) -> Decision:
    msg = f"NodeDrain {s.conflict_with} already drains this node; this one does nothing"
    conds = list(s.status.conditions or [])
    for type_, value, reason in (("Ready", False, "Conflict"), ("Stalled", True, "Conflict"),
                                 ("Reconciling", False, "Conflict")):
        conds = set_condition(conds, type_, value, reason, msg, s.generation, now)
    decision.status = NodeDrainStatus(observed_generation=s.generation, conditions=conds,
                                      phase=DrainPhase.CONFLICT)
    if s.status.phase != DrainPhase.CONFLICT:
        decision.events.append(("Warning", "Conflict", msg))
    return decision


def _not_found(s: DrainSnapshot, decision: Decision, now: str) -> Decision:
    what = (f"node {s.spec.node_name} does not exist" if s.spec.node_name
            else "no node matches nodeSelector")
    conds = list(s.status.conditions or [])
    for type_, value, reason in (("Ready", False, "NodeNotFound"),
                                 ("Reconciling", True, "NodeNotFound"),
                                 ("Stalled", False, "NodeNotFound")):
        conds = set_condition(conds, type_, value, reason, f"{what}; waiting for it",
                              s.generation, now)
    decision.status = NodeDrainStatus(observed_generation=s.generation, conditions=conds,
                                      phase=DrainPhase.PENDING, start_time=s.status.start_time)
    if s.status.phase != DrainPhase.PENDING:
        decision.events.append(("Warning", "NodeNotFound", what))
    return decision


# -- ending maintenance -------------------------------------------------------------------------


def _letting_finish(finishing: Sequence[MigrationInfo]) -> str:
    names = ", ".join(f"{m.namespace}/{m.name}" for m in finishing[:10])
    return (f"not aborting {len(finishing)} migrations in post-copy (KubeVirt never aborts "
            f"post-copy: the guest already runs on the target); letting them finish: {names}")


def _ending(aborted: int, post_copy: int) -> str:
    what = [f"{aborted} aborted migrations"] if aborted else []
    what += [f"{post_copy} migrations in post-copy"] if post_copy else []
    return " and ".join(what)


def _waiting_for(aborted: int, post_copy: int) -> str:
    return f"waiting for {_ending(aborted, post_copy)} to end"


def _end_restarts(s: DrainSnapshot, decision: Decision, waited: float) -> int:
    """Ending maintenance: start the VMs a quick migration of this drain stopped (safe while
    the old VMI is still shutting down), and wind up (``finish``) those started whose new
    VMI exists -- a Manual VM must have it before its run strategy is restored, or it would
    not start -- or, after ABORT_WAIT_SECONDS, all: no record outlives its drain. How many
    restarts are still to wind up (the finalizer waits for them)."""
    pending = 0
    for key, vm in sorted(s.vms.items()):
        q = vm.quick
        if q is None or not _ours(s, q):
            continue
        vmi = s.vmis.get(key)
        renewed = vmi is not None and not (vmi.running_since and
                                           vmi.running_since <= q.stopped_at)
        if not q.started:
            decision.start.append(key)
            pending += 1
        elif renewed or waited >= ABORT_WAIT_SECONDS:
            decision.finish.append(key)
        else:
            pending += 1
    return pending if waited < ABORT_WAIT_SECONDS else 0


def finalize_drain(s: DrainSnapshot, waited: float = 0.0) -> Decision:
    """What deleting the NodeDrain must do before its finalizer goes: abort unfinished
    migrations (cancelOnDelete; never one in post-copy, which is let finish), restart VMs a
    quick migration had stopped, and -- only once every aborted migration has ended, so that
    nothing lands on or leaves a node that is schedulable again mid-abort -- uncordon our
    nodes. ``waited``: wall-clock seconds since the deletion began; after ABORT_WAIT_SECONDS
    the nodes are uncordoned anyway (a warning says which migrations had not ended), so a
    KubeVirt that never ends an abort cannot keep a node cordoned forever. ``hold`` says why
    the finalizer must stay for now; the status says Terminating throughout."""
    # Everything touched here carries this drain's name, so a drain that turned Conflict
    # still undoes what it did before.
    decision = Decision(status=s.status)
    unfinished = [m for m in s.migrations if not m.final]
    finishing = [m for m in unfinished if m.in_post_copy]
    if s.spec.cancel_on_delete:
        decision.cancel = [m for m in unfinished if not m.terminating and not m.in_post_copy]
        if finishing:
            decision.events.append(("Normal", POST_COPY_NOT_ABORTED, _letting_finish(finishing)))
    restarting = _end_restarts(s, decision, waited)
    ours = sorted(n.name for n in s.nodes.values() if n.annotations.get(CORDONED_BY) == s.name)
    # Disks whose move has not finished go back to their sources (whatever cancelOnDelete
    # says: no VM is left pointing at a half-copied claim), and destinations nobody uses go.
    everyone = list(s.storage.values())
    undo = storage.cancel_moves(s.owner_ref, everyone, s.claims)
    decision.revert, decision.delete_claims = undo.update, undo.delete
    held = storage.pending_cancel(s.owner_ref, everyone, s.claims)
    aborting = s.spec.cancel_on_delete and bool(unfinished)
    # Destinations to delete hold nothing up: one that something outside the caches still
    # refers to (a snapshot, an export) is kept now and collected once the drain is gone
    # (handlers.claims).
    if (aborting or held) and waited < ABORT_WAIT_SECONDS:
        decision.hold = (_waiting_for(len(unfinished) - len(finishing), len(finishing))
                         if aborting else f"moving {held} volumes back to their sources")
        decision.hold += f" before uncordoning {', '.join(ours)}" if ours else ""
    else:
        decision.uncordon = ours
        if aborting:
            names = ", ".join(f"{m.namespace}/{m.name}" for m in unfinished[:10])
            decision.events.append(("Warning", "AbortTimeout", (
                f"uncordoning {', '.join(ours) or 'nothing'} although "
                f"{_ending(len(unfinished) - len(finishing), len(finishing))} "
                f"have not ended after {round(waited)}s: {names}")))
    if restarting:
        decision.hold = "; ".join(x for x in (decision.hold, f"restarting {restarting} VMs "
                                              "a quick migration stopped") if x)
    steps = [decision.hold or ""]
    if decision.revert:
        steps.append(f"putting {len(decision.revert)} VMs back on their source volumes")
    if decision.cancel:
        steps.append(f"aborting {len(decision.cancel)} unfinished migrations")
    if finishing and s.spec.cancel_on_delete:
        steps.append(f"letting {len(finishing)} migrations in post-copy finish")
    if decision.start:
        steps.append(f"starting {len(decision.start)} VMs a quick migration stopped")
    if decision.uncordon:
        steps.append(f"uncordoning {', '.join(decision.uncordon)}")
    message = "; ".join(x for x in steps if x) or "ending maintenance"
    now = stamp(s.now)
    conds = list(s.status.conditions or [])
    for type_, value in (("Ready", False), ("Reconciling", True), ("Stalled", False)):
        conds = set_condition(conds, type_, value, "Terminating", message, s.generation, now)
    decision.status = s.status.model_copy(update={"phase": DrainPhase.TERMINATING,
                                                  "conditions": conds})
    if s.status.phase != DrainPhase.TERMINATING:
        decision.events.append(("Normal", "Terminating", message))
    return decision
