"""MigrationPolicy (migrationpolicies.virtshift.io): which VMs, and the rules they move under."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from virtshift.api.common import (
    Condition,
    Cron,
    LabelSelector,
    Model,
    PositiveDuration,
    PositiveQuantity,
    ResourceName,
    TimeZone,
    cel,
    validations,
)

SELECTION_PRECEDENCE = (
    "When several policies match one VM, the one with the highest priority wins; on a tie, the "
    "most specific (the one with more selector terms in namespaceSelector and vmSelector "
    "together); on a further tie, the name that sorts first. A NodeDrain's policyRef overrides "
    "this choice for the VMs of that drain."
)


class NonMigratableAction(StrEnum):
    FAIL = "Fail"
    SKIP = "Skip"
    RESTART = "Restart"


NON_MIGRATABLE_DOC = (
    "What to do with a VM that cannot live-migrate (its LiveMigratable condition is False): "
    "Fail reports it as failed and leaves it running where it is, which blocks the drain from "
    "completing; Skip leaves it where it is and reports it as skipped; Restart performs a quick "
    "migration (stop, start on another node) and records the downtime."
)


class DowntimeAction(StrEnum):
    AUTO_CONVERGE = "AutoConverge"
    POST_COPY = "PostCopy"
    QUICK_MIGRATION = "QuickMigration"
    ABORT = "Abort"
    FAIL = "Fail"
    ALLOW = "Allow"


FINAL_DOWNTIME_ACTIONS = ("Abort", "Fail", "Allow")


class StorageMode(StrEnum):
    ON_DRAIN = "OnDrain"
    ALWAYS = "Always"


class Backoff(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "duration(self.initial) <= duration(self.max)",
                "initial must not be longer than max",
                ".initial",
            )
        )
    )
    initial: PositiveDuration = Field(
        "30s", description="Wait before the first retry; doubles with each further attempt."
    )
    max: PositiveDuration = Field("10m", description="The longest wait between two attempts.")


class Window(Model):
    schedule: Cron = Field(
        description="When the window opens, as a five-field cron expression (minute hour "
        "day-of-month month day-of-week) or a macro such as @daily."
    )
    duration: PositiveDuration = Field(
        description="How long the window stays open after each opening, e.g. 4h."
    )
    time_zone: TimeZone = Field(
        "UTC", description="The IANA time zone the schedule is read in, e.g. Europe/Berlin. "
        "Daylight-saving changes are followed."
    )


class StorageMigration(Model):
    target_storage_class: ResourceName = Field(
        description="The StorageClass new volumes are created in when disks are moved (live "
        "storage migration)."
    )
    mode: StorageMode = Field(
        StorageMode.ON_DRAIN,
        description="OnDrain moves disks only when a VM must leave a node whose disks are "
        "node-local (shared-nothing migration); Always moves the disks of every matching VM, "
        "e.g. to retire a storage array.",
    )


class MigrationPolicySpec(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.maxParallelOutboundPerNode) || !has(self.maxParallelMigrations)"
                " || self.maxParallelOutboundPerNode <= self.maxParallelMigrations",
                "maxParallelOutboundPerNode must not exceed maxParallelMigrations",
                ".maxParallelOutboundPerNode",
            ),
            cel(
                "!has(self.bandwidthPerMigration) || !has(self.nodeBandwidth) || "
                "!quantity(self.bandwidthPerMigration).isGreaterThan(quantity(self.nodeBandwidth))",
                "bandwidthPerMigration must not exceed nodeBandwidth",
                ".bandwidthPerMigration",
            ),
        )
    )

    priority: int = Field(
        0, ge=-1000, le=1000,
        description="Precedence among matching policies; higher wins. " + SELECTION_PRECEDENCE,
    )
    namespace_selector: LabelSelector | None = Field(
        None, description="Namespaces whose VMs this policy governs; absent means all namespaces."
    )
    vm_selector: LabelSelector | None = Field(
        None, description="VMs (by the VirtualMachineInstance's labels) this policy governs; "
        "absent means every VM in the selected namespaces.",
    )
    max_downtime: PositiveDuration | None = Field(
        None, description="The longest switch-over pause a migration may cause, e.g. 300ms. "
        "Rendered into KubeVirt's maxDowntimeMs; virtshift also predicts it before starting.",
    )
    bandwidth_per_migration: PositiveQuantity | None = Field(
        None, description="Bandwidth cap of one migration, per second (e.g. 1Gi).",
    )
    node_bandwidth: PositiveQuantity | None = Field(
        None, description="Aggregate outbound migration bandwidth per source node, per second; "
        "with bandwidthPerMigration it bounds how many migrations leave one node at once.",
    )
    max_parallel_migrations: int | None = Field(
        None, ge=1, le=1000, description="Migrations of this policy's VMs in flight at once, "
        "cluster-wide.",
    )
    max_parallel_outbound_per_node: int | None = Field(
        None, ge=1, le=100, description="Migrations of this policy's VMs leaving one node at once.",
    )
    max_parallel_inbound_per_node: int | None = Field(
        None, ge=1, le=100, description="Migrations of this policy's VMs arriving at one node at "
        "once.",
    )
    completion_timeout_per_gi_b: int | None = Field(
        None, ge=1, le=86400, alias="completionTimeoutPerGiB",
        description="Seconds allowed per GiB of guest memory before KubeVirt aborts a migration.",
    )
    progress_timeout: PositiveDuration | None = Field(
        None, description="Abort a migration whose transfer makes no progress for this long.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="How many times one VM's migration is tried before it is "
        "reported failed.",
    )
    backoff: Backoff = Field(
        default_factory=Backoff, description="Exponential backoff between attempts."
    )
    allow_auto_converge: bool = Field(
        False, description="Let KubeVirt throttle the guest's vCPUs so memory copying converges."
    )
    allow_post_copy: bool = Field(
        False, description="Let KubeVirt switch to post-copy when pre-copy does not converge."
    )
    on_downtime_exceeded: list[DowntimeAction] = Field(
        default_factory=lambda: [DowntimeAction.ABORT], min_length=1, max_length=6,
        description="The ladder followed when the predicted switch-over downtime exceeds "
        "maxDowntime, tried in order: AutoConverge (throttle the guest), PostCopy (switch to "
        "post-copy), QuickMigration (stop, move, start); then, as the last entry, Abort (do not "
        "migrate now, retry after the backoff), Fail (report the VM failed) or Allow (migrate "
        "anyway and record the breach).",
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            **validations(
                cel(
                    "self.all(a, !(a in ['Abort', 'Fail', 'Allow']) || a == self[size(self) - 1])",
                    "Abort, Fail and Allow end the ladder: only the last entry may be one of them",
                )
            ),
        },
    )
    non_migratable: NonMigratableAction = Field(
        NonMigratableAction.FAIL, description=NON_MIGRATABLE_DOC
    )
    windows: list[Window] | None = Field(
        None, max_length=16, description="When new migrations may start; absent means any "
        "time. Migrations in flight when a window closes are allowed to finish.",
    )
    storage: StorageMigration | None = Field(
        None, description="Live storage migration: where disks move and when."
    )


class OutcomeCounters(Model):
    succeeded: int = Field(0, description="Migrations that completed.")
    failed: int = Field(0, description="Migrations that failed after every attempt.")
    skipped: int = Field(0, description="VMs left in place by the policy.")
    quick_migrated: int = Field(0, description="VMs moved by stop, move, start.")
    aborted: int = Field(0, description="Migrations not started or aborted for downtime.")
    downtime_breaches: int = Field(0, description="Migrations whose observed downtime "
                                   "exceeded maxDowntime (see downtime.source; predictions "
                                   "are never counted).")


class DowntimeSummary(Model):
    samples: int = Field(0, description="Migrations whose downtime was observed. KubeVirt "
                         "publishes no per-migration downtime: without an observation source "
                         "(virtshift run --downtime-source) this stays 0.")
    source: str | None = Field(None, description="Where the observations come from, e.g. "
                               "annotation:<key> or prometheus:<metric>.")
    p50_ms: int | None = Field(None, description="Median switch-over downtime, milliseconds.")
    p99_ms: int | None = Field(None, description="99th percentile downtime, milliseconds.")
    max_ms: int | None = Field(None, description="Longest downtime, milliseconds.")


class MigrationPolicyStatus(Model):
    observed_generation: int | None = Field(
        None, description="The metadata.generation this status was computed from."
    )
    conditions: list[Condition] | None = Field(
        None, description="Ready and the reasons it is not.", max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    matched_v_ms: int | None = Field(None, alias="matchedVMs",
                                     description="VMs this policy governs now.")
    kubevirt_policy: str | None = Field(
        None, description="Name of the KubeVirt MigrationPolicy (migrations.kubevirt.io) "
        "rendered from this one."
    )
    in_flight: int | None = Field(None, description="Migrations under this policy in flight.")
    outcomes: OutcomeCounters | None = Field(None, description="What happened so far.")
    downtime: DowntimeSummary | None = Field(
        None, description="Observed (measured, never predicted) switch-over downtime of this "
        "policy's succeeded migrations.")
    window_open: bool | None = Field(None, description="Whether new migrations may start now.")
    next_window: str | None = Field(
        None, description="When the next window opens (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class MigrationPolicy(Model):
    """MigrationPolicy selects VMs and sets the rules they migrate under. Also known by its full
    name migrationpolicies.virtshift.io (KubeVirt has a MigrationPolicy kind of its own)."""

    api_version: str = Field("virtshift.io/v1alpha1", description="virtshift.io/v1alpha1")
    kind: str = Field("MigrationPolicy", description="MigrationPolicy")
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: MigrationPolicySpec = Field(description="Which VMs, and the rules they move under.")
    status: MigrationPolicyStatus | None = Field(None, description="Observed state.")
