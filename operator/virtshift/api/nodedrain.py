"""NodeDrain (nodedrains.virtshift.io): a node, or a rolling wave of nodes, in maintenance."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from virtshift.api.common import (
    Condition,
    Duration,
    LabelSelector,
    Model,
    ObjectName,
    PositiveDuration,
    ResourceName,
    cel,
    validations,
)
from virtshift.api.migrationpolicy import NON_MIGRATABLE_DOC, NonMigratableAction
from virtshift.api.storage import VolumeEntry

MAX_VM_ENTRIES = 100


class DrainPhase(StrEnum):
    PENDING = "Pending"
    PLANNED = "Planned"  # dryRun: the plan is in status, nothing moves
    DRAINING = "Draining"
    PAUSED = "Paused"
    DRAINED = "Drained"
    STALLED = "Stalled"
    CONFLICT = "Conflict"
    TERMINATING = "Terminating"


class VMPhase(StrEnum):
    PENDING = "Pending"
    MIGRATING = "Migrating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    WAITING = "Waiting"  # backoff between attempts, or a limit or window holds it


class NodeDrainSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.nodeName) != has(self.nodeSelector)",
                "exactly one of spec.nodeName or spec.nodeSelector must be set",
            ),
            cel(
                "!has(oldSelf.nodeName) || !has(self.nodeName)"
                " || self.nodeName == oldSelf.nodeName",
                "spec.nodeName is immutable: delete this NodeDrain and create another",
                ".nodeName",
            ),
        )
    )
    node_name: ResourceName | None = Field(
        None, description="The node to put in maintenance. Exactly one of nodeName and "
        "nodeSelector is set.",
    )
    node_selector: LabelSelector | None = Field(
        None, description="Nodes to drain in a rolling wave, maxUnavailable at a time, in name "
        "order; each is cordoned only when its turn comes. While the wave has nodes still to "
        "drain, a VM never moves to one of them: each migration (and quick migration "
        "restart) is pinned (kubernetes.io/hostname) to a node outside the wave, or, when no "
        "such node has room, to the one the wave drains last.",
    )
    max_unavailable: int = Field(
        1, ge=1, le=1000, description="With nodeSelector: how many nodes are drained (cordoned) "
        "at once.",
    )
    release_after: Duration | None = Field(
        None, description="With nodeSelector: how long a drained node stays cordoned for its "
        "maintenance before it is uncordoned and the wave moves on; 0s moves on at once (a "
        "rolling evacuation with no maintenance). Absent: a drained node stays cordoned until "
        "it carries the annotation virtshift.io/maintenance-complete=true, set after it drained "
        "(one set earlier is removed when the node's turn starts).",
    )
    policy_ref: ObjectName | None = Field(
        None, description="A MigrationPolicy (migrationpolicies.virtshift.io) that governs every "
        "VM of this drain, overriding the policies' own selection. While it is missing, being "
        "deleted or invalid (its Ready condition says InvalidSpec or InvalidWindow) the drain "
        "waits -- Stalled with reason PolicyNotFound, PolicyTerminating or PolicyInvalid, and a "
        "Warning Event: nothing new starts (no migration, stop, storage move or eviction; "
        "migrations still queued in KubeVirt are withdrawn), no node is cordoned, released or "
        "uncordoned, and migrations under way go on -- and it resumes by itself once the "
        "policy is usable; it never runs under default rules instead.",
    )
    target_node_selector: dict[str, str] | None = Field(
        None, description="Labels the target node must carry; becomes the addedNodeSelector of "
        "every VirtualMachineInstanceMigration this drain creates, and, for a quick "
        "migration, part of the VM's template nodeSelector while it starts again (taken back "
        "once it runs).",
    )
    evict_pods: bool = Field(
        False, description="Also evict the node's ordinary pods through the Eviction API "
        "(DaemonSet and mirror pods are left alone; PodDisruptionBudgets are honoured).",
    )
    paused: bool = Field(
        False, description="Start nothing new: no migration, no quick-migration stop, no "
        "eviction, and no node is cordoned, released or uncordoned (a wave stays where it "
        "is; created paused, nothing is cordoned). Migrations in flight finish; nodes already "
        "cordoned stay cordoned.",
    )
    deadline: PositiveDuration | None = Field(
        None, description="How long the drain may take from its start, e.g. 2h. When it passes, "
        "the Stalled condition says so and no new migration starts; nothing is rolled back.",
    )
    dry_run: bool = Field(
        False, description="Plan only: status shows per VM the candidate targets, predicted "
        "duration and downtime, blockers, and the drain's ETA. Nothing in the cluster changes.",
    )
    non_migratable: NonMigratableAction | None = Field(
        None,
        description="Overrides the policy's nonMigratable for this drain. " + NON_MIGRATABLE_DOC,
    )
    cancel_on_delete: bool = Field(
        True, description="When this NodeDrain is deleted, abort its unfinished migrations (by "
        "deleting their VirtualMachineInstanceMigrations), except those in post-copy, which "
        "KubeVirt never aborts (the guest already runs on the target): they are let finish, "
        "and an Event (PostCopyNotAborted) says so. The nodes are uncordoned only once "
        "every such migration has ended (or after 5 minutes, with a warning Event, should "
        "KubeVirt never end one). Meanwhile the phase is Terminating and the NodeDrain stays, "
        "as it does while an uncordon or a VM restart keeps failing.",
    )


class DrainCounts(Model):
    total: int = Field(0, description="VMs on the drained nodes when they were planned.")
    pending: int = Field(0, description="VMs not started yet.")
    migrating: int = Field(0, description="VMs being moved now.")
    succeeded: int = Field(0, description="VMs moved off.")
    failed: int = Field(0, description="VMs that could not be moved.")
    skipped: int = Field(0, description="VMs left in place on purpose.")


class VMEntry(Model):
    namespace: str = Field(description="The VM's namespace.")
    name: str = Field(description="The VM's name.")
    phase: VMPhase = Field(description="Where this VM is in the drain.")
    reason: str | None = Field(None, description="Why, as a CamelCase word.")
    message: str | None = Field(None, description="Why, as a sentence.")
    source_node: str | None = Field(None, description="The node the VM leaves.")
    target_node: str | None = Field(None, description="The node the VM arrived at.")
    mode: str | None = Field(
        None, description="How it moved: LiveMigration, StorageMigration, SharedNothing, "
        "PostCopy or QuickMigration."
    )
    attempts: int | None = Field(
        None, description="Migration attempts made by this NodeDrain (also recorded on the "
        "VMI as virtshift.io/migration-attempts, so KubeVirt's garbage collection of finished "
        "migrations cannot reset it).")
    migration: str | None = Field(None, description="The current VirtualMachineInstanceMigration.")
    candidates: list[str] | None = Field(
        None, max_length=5, description="Possible target nodes, best first (plan): the first "
        "five; every one is tried."
    )
    predicted_seconds: float | None = Field(
        None, description="Predicted migration time (plan); a lower bound while the VM's dirty "
        "rate is unknown (condition PredictionsAvailable).")
    predicted_downtime_ms: int | None = Field(
        None, description="Predicted switch-over downtime in milliseconds: virtshift's pre-copy "
        "model of the pause, made before the migration starts (for the step of "
        "onDowntimeExceeded it chose) and kept once it runs. A prediction, never a "
        "measurement; maxDowntime is held against it before migrating. Absent while the VM's "
        "dirty rate is unknown.",
    )
    observed_downtime_ms: int | None = Field(
        None, description="Measured switch-over downtime in milliseconds, from downtimeSource. "
        "KubeVirt publishes no per-migration downtime, so a live migration has one only when "
        "the operator runs with a downtime source (virtshift run --downtime-source); absent "
        "otherwise. DowntimeExceeded is reported only from this field.",
    )
    downtime_source: str | None = Field(
        None, description="Where observedDowntimeMs came from: annotation:<key> (an annotation "
        "of the VirtualMachineInstanceMigration), prometheus:<metric>, or restartTimestamps (a "
        "quick migration: from the VM's stop to its new VMI's Running transition).",
    )
    volumes: list[VolumeEntry] | None = Field(
        None, max_length=32, description="Shared-nothing migration: the disks that move with "
        "the VM (node-local disks copied to claims on the target), per volume.")


class NodePhase(StrEnum):
    WAITING = "Waiting"
    DRAINING = "Draining"
    DRAINED = "Drained"  # empty, held cordoned for its maintenance
    RELEASED = "Released"  # maintenance over, uncordoned


class NodeEntry(Model):
    name: str = Field(description="A node of the wave.")
    phase: NodePhase = Field(description="Waiting, Draining, Drained (held for maintenance) or "
                             "Released (uncordoned).")
    since: str | None = Field(None, description="When the node entered this phase.",
                              json_schema_extra={"format": "date-time"})


class NodeDrainStatus(Model):
    observed_generation: int | None = Field(
        None, description="The metadata.generation this status was computed from."
    )
    conditions: list[Condition] | None = Field(
        None, max_length=16, description="Ready, Reconciling and Stalled (kstatus), plus "
        "Cordoned, Drained and PredictionsAvailable (False, reason NoMetricsSource or "
        "DirtyRateUnknown, while a VM still to move has no dirty rate: its predicted time, "
        "plannedSeconds and eta are then a lower bound, and where maxDowntime or "
        "onDowntimeExceeded applies it is treated as not predicted to fit).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    phase: DrainPhase | None = Field(
        None, description="A summary derived from the conditions: Pending, Planned (dryRun), "
        "Draining, Paused, Drained, Stalled, Conflict, or Terminating (deleted; aborting, "
        "restarting and uncordoning before the NodeDrain goes).")
    progress: str | None = Field(None, description="VMs done out of all, e.g. 12/40.")
    counts: DrainCounts | None = Field(None, description="VMs by state.")
    vms: list[VMEntry] | None = Field(
        None, max_length=MAX_VM_ENTRIES, description="Per-VM state, unfinished and failed first; "
        f"at most {MAX_VM_ENTRIES} entries (counts has the totals).",
    )
    nodes: list[NodeEntry] | None = Field(
        None, max_length=1000, description="The wave's nodes and where each stands."
    )
    blocking_pods: list[str] | None = Field(
        None, max_length=20, description="Pods whose eviction is refused (e.g. by a "
        "PodDisruptionBudget), as namespace/name: reason.",
    )
    pods_remaining: int | None = Field(None, description="Ordinary pods still to evict.")
    planned_seconds: float | None = Field(
        None, description="Predicted time from now until the drain completes, in seconds "
        "(dryRun: for the whole drain); a lower bound while PredictionsAvailable is False.",
    )
    bytes_to_move: int | None = Field(None, description="Guest memory (and disks) to transfer.")
    bytes_moved: int | None = Field(None, description="Transferred so far, by finished VMs.")
    start_time: str | None = Field(
        None, description="When the drain started.", json_schema_extra={"format": "date-time"}
    )
    eta: str | None = Field(
        None, description="When the drain is expected to finish (at the earliest while "
        "PredictionsAvailable is False).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        None, description="When the drain finished.", json_schema_extra={"format": "date-time"}
    )


class NodeDrain(Model):
    """NodeDrain puts a node (or a rolling wave of nodes) in maintenance: virtshift cordons it and
    moves its VMs away. The object existing means "in maintenance"; deleting it ends maintenance."""

    api_version: str = Field("virtshift.io/v1alpha1", description="virtshift.io/v1alpha1")
    kind: str = Field("NodeDrain", description="NodeDrain")
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: NodeDrainSpec = Field(description="What to drain and how.")
    status: NodeDrainStatus | None = Field(None, description="Observed state.")
