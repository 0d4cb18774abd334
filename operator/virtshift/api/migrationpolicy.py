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
from virtshift.api.storage import StorageStatus

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


class WithinWindow(StrEnum):
    START = "Start"
    FINISH = "Finish"


WINDOW_END_DOC = (
    "No migration starts after a window's end: the migrations a NodeDrain has waiting in "
    "KubeVirt's queue are withdrawn shortly before it (a target pod's start-up plus twice the "
    "operator's time to act, so that none begins its transfer after the end; they do not "
    "count as attempts), and none is queued that could not start before it. Migrations in "
    "flight when a window closes are allowed to finish, and so is a storage move begun before "
    "(its VM already points at its destinations): KubeVirt's workload updater may create its "
    "migration after the end."
)


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


class SourceClaims(StrEnum):
    KEEP = "Keep"
    DELETE = "Delete"


class AccessMode(StrEnum):
    RWO = "ReadWriteOnce"
    RWX = "ReadWriteMany"
    RWOP = "ReadWriteOncePod"


class VolumeMode(StrEnum):
    FILESYSTEM = "Filesystem"
    BLOCK = "Block"


class StorageMigration(Model):
    target_storage_class: ResourceName = Field(
        description="The StorageClass the destination PersistentVolumeClaims are created in. "
        "Shared-nothing moves during a NodeDrain use it too; without this policy they keep "
        "each disk's own class (bound on the target node)."
    )
    mode: StorageMode = Field(
        StorageMode.ON_DRAIN,
        description="OnDrain moves disks only when a VM must leave a node whose disks are "
        "node-local (shared-nothing migration, during a NodeDrain); Always also moves the disks "
        "of every running VM this policy governs that are in another class, with no NodeDrain "
        "(e.g. to retire a storage array). Each move is KubeVirt's volume migration: "
        "destination claims named <claim>-vs-<hash>, labelled virtshift.io/source-claim, the "
        "VM's volumes repointed with updateVolumesStrategy: Migration.",
    )
    access_mode: AccessMode | None = Field(
        None, description="Access mode of the destination claims; unset: the source claim's."
    )
    volume_mode: VolumeMode | None = Field(
        None, description="Volume mode of the destination claims; unset: the source claim's."
    )
    source_claims: SourceClaims = Field(
        SourceClaims.KEEP, description="What happens to a source claim once its VM runs on the "
        "destination: Keep leaves it (delete it yourself once satisfied), Delete deletes it. "
        "Delete applies only to moves this policy (or a NodeDrain under it) made and began "
        "while it said Delete, and only once nothing else refers to the source; another "
        "owner's move, or one begun under Keep, keeps its source. A cancelled or failed move "
        "always keeps it: the VM is put back on it.",
    )
    max_parallel_copies: int | None = Field(
        None, ge=1, le=1000, description="Volume migrations into targetStorageClass at once, "
        "cluster-wide (all policies' moves into that class count), on top of the policy's "
        "other limits."
    )
    max_parallel_copies_per_source_class: int | None = Field(
        None, ge=1, le=1000, description="Volume migrations reading from one source "
        "StorageClass (a storage pool) at once, cluster-wide.",
    )
    copy_bandwidth: PositiveQuantity | None = Field(
        None, description="Aggregate copy bandwidth into targetStorageClass, per second; with "
        "bandwidthPerMigration (which KubeVirt applies to each migration, disks included) it "
        "bounds the parallel copies to copyBandwidth / bandwidthPerMigration.",
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
        "Rendered into KubeVirt's maxDowntimeMs; virtshift also predicts it before starting, "
        "from the VM's dirty rate (virtshift run --metrics-source). A VM whose dirty rate is "
        "unknown is treated as not predicted to fit (see onDowntimeExceeded), and the "
        "PredictionsAvailable condition says so.",
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
        None, ge=0, le=86400, alias="completionTimeoutPerGiB",
        description="Seconds allowed per GiB of the migration's data (guest memory plus any "
        "volumes it moves; KubeVirt counts decimal GB, rounded up) before KubeVirt acts on a "
        "migration that has not completed: it aborts it, switches it to post-copy "
        "(allowPostCopy), or pauses the guest (allowWorkloadDisruption without allowPostCopy, "
        "from the KubeVirt CR). Rendered into KubeVirt's MigrationPolicy when set (also into "
        "the variants of the onDowntimeExceeded ladder: it is when the PostCopy step switches "
        "to post-copy). 0: never -- KubeVirt then takes none of these actions on time "
        "(virt-launcher's shouldTriggerTimeout), so a migration that cannot converge runs "
        "until its progress timeout, and the PostCopy step bounds no pause. Unset: the "
        "KubeVirt CR's "
        "spec.configuration.migrations.completionTimeoutPerGiB applies (150 unless set there), "
        "and virtshift predicts with it.",
    )
    progress_timeout: PositiveDuration | None = Field(
        None, description="Abort a migration whose transfer makes no progress for this long. "
        "virtshift does it, not KubeVirt (KubeVirt's MigrationPolicy has no such field; its own "
        "cluster-wide one, the KubeVirt CR's spec.configuration.migrations.progressTimeout, "
        "150s by default, still applies, so a longer value here changes nothing): a migration "
        "labelled virtshift.io/policy=<this policy> (every "
        "migration a NodeDrain starts for the VMs it governs), in phase Running and not in "
        "post-copy, is deleted, which makes KubeVirt abort it, once KubeVirt's "
        "kubevirt_vmi_migration_data_remaining_bytes for its VMI has not dropped from one "
        "sample to the next for this long (counted from the transfer's start; a gap of over "
        "a minute between samples starts the count again). The abort is recorded on the VMI "
        "(annotation virtshift.io/aborted-migrations) and counts as a failed attempt: a "
        "NodeDrain retries "
        "it after the backoff, up to maxAttempts. Progress is read from the operator's "
        "--metrics-source (virt-handler's /metrics or a Prometheus carrying that metric); "
        "without it, or while it cannot be read, nothing is aborted. Unset: virtshift aborts "
        "nothing itself.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="How many times one VM's migration is tried before it is "
        "reported failed.",
    )
    backoff: Backoff = Field(
        default_factory=Backoff, description="Exponential backoff between attempts."
    )
    allow_auto_converge: bool | None = Field(
        None, description="Let KubeVirt throttle the guest's vCPUs so that memory copying "
        "converges (QEMU auto-converge). Rendered into KubeVirt's MigrationPolicy when set. "
        "Unset: the KubeVirt CR's spec.configuration.migrations.allowAutoConverge applies "
        "(false unless set there), and virtshift predicts with it.",
    )
    allow_post_copy: bool | None = Field(
        None, description="Whether KubeVirt switches a migration that has not completed by its "
        "completion timeout (completionTimeoutPerGiB) to post-copy. Rendered into KubeVirt's "
        "MigrationPolicy when set, where KubeVirt also takes it as allowWorkloadDisruption: "
        "true switches to post-copy at the timeout, false aborts the migration then (the guest "
        "is never paused). Unset: the KubeVirt CR's spec.configuration.migrations.allowPostCopy "
        "and allowWorkloadDisruption apply (false unless set there: abort at the timeout; "
        "allowWorkloadDisruption without allowPostCopy pauses the guest instead), and "
        "virtshift predicts with them.",
    )
    on_downtime_exceeded: list[DowntimeAction] = Field(
        default_factory=lambda: [DowntimeAction.ABORT], min_length=1, max_length=6,
        description="The ladder followed, before a migration starts, when the predicted "
        "switch-over downtime exceeds maxDowntime or the VM is predicted not to converge; a "
        "migration predicted to fit runs as it is. Tried in order, each step taken when it is "
        "predicted to fit: AutoConverge (migrate with allowAutoConverge: KubeVirt throttles the "
        "guest), PostCopy (migrate with allowPostCopy: KubeVirt switches to post-copy a "
        "migration that has not completed by its completion timeout, completionTimeoutPerGiB; "
        "lower that to switch sooner), QuickMigration (stop, move, start); then, as the last "
        "entry, Abort (do not migrate now, retry after the backoff), Fail (report the VM "
        "failed) or Allow (migrate anyway and record the breach). AutoConverge and PostCopy "
        "each render a KubeVirt MigrationPolicy of their own (virtshift-<name>-autoconverge, "
        "-postcopy): this policy's settings plus that one flag. A VM whose dirty rate is "
        "unknown (no --metrics-source, or it does not report the VM) cannot be predicted to "
        "fit: only steps whose outcome is acceptable whatever the rate are taken -- PostCopy "
        "when its pause is bounded within maxDowntime (QEMU's 300 ms switch-over limit, or "
        "maxDowntime itself where KubeVirt applies it), and Allow; AutoConverge, "
        "QuickMigration and Fail are passed over (nothing says the live migration would "
        "breach maxDowntime) and the VM waits (reason DirtyRateUnknown). Without "
        "maxDowntime and with the default ladder (Abort) the rate decides nothing: such a VM "
        "migrates as it is.",
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
        "time. " + WINDOW_END_DOC + " Quick migrations' stops and storage moves follow the "
        "windows too.",
    )
    within_window: WithinWindow = Field(
        WithinWindow.START, description="What of a move must fit inside a window. Start (the "
        "default): a migration may start until the window ends (see windows) and finishes "
        "after it if it must. Finish: a migration, a quick migration's stop and restart, or a "
        "storage move starts only when its predicted duration (the planner's prediction: "
        "target start-up plus the pre-copy model's transfer, plus the copy of any disks it "
        "moves) ends before the window closes; a longer one waits for the next window, and a "
        "VM predicted to need longer than the window is ever open is reported "
        "(WindowTooShort). Ignored without windows.",
    )
    storage: StorageMigration | None = Field(
        None, description="Live storage migration: where disks move and when."
    )


class OutcomeCounters(Model):
    """Counted from the objects that exist now (KubeVirt keeps the five newest finished
    migrations of each VMI; a NodeDrain reports its VMs while it exists), so they can fall."""

    succeeded: int = Field(0, description="Migrations labelled with this policy that completed "
                           "(VirtualMachineInstanceMigrations that still exist).")
    failed: int = Field(0, description="Migrations labelled with this policy that failed for "
                        "good: a NodeDrain's last attempt (maxAttempts), or one nobody retries.")
    skipped: int = Field(0, description="VMs this policy governs that a NodeDrain left in place "
                         "because they cannot live-migrate (nonMigratable: Skip), over the "
                         "NodeDrains that exist.")
    quick_migrated: int = Field(0, description="VMs this policy governs that a NodeDrain moved "
                                "by stop, move, start (quick migration, completed), over the "
                                "NodeDrains that exist.")
    aborted: int = Field(0, description="Migrations held back or stopped: VMs this policy "
                         "governs that a NodeDrain is not migrating now because "
                         "onDowntimeExceeded ended in Abort (over the NodeDrains that exist), "
                         "plus migrations virtshift aborted for progressTimeout (recorded on "
                         "their VMIs, the last 10 per VMI).")
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
        None, description="Ready and the reasons it is not; PredictionsAvailable for a policy "
        "that sets maxDowntime or onDowntimeExceeded (False, reason NoMetricsSource or "
        "DirtyRateUnknown, while the dirty rates of the VMs it governs are unknown); "
        "KubeVirtPolicyOverridden (present only while true, reason ForeignPolicyWins): a "
        "KubeVirt MigrationPolicy (migrations.kubevirt.io) not rendered from this policy wins "
        "KubeVirt's matching (most matching VMI and namespace labels, then the first name) for "
        "VMs this policy governs, so KubeVirt applies its settings instead of this policy's; "
        "the message names it and the VMs.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    matched_v_ms: int | None = Field(None, alias="matchedVMs",
                                     description="VMs this policy governs now.")
    kubevirt_policy: str | None = Field(
        None, description="Name of the KubeVirt MigrationPolicy (migrations.kubevirt.io) "
        "rendered from this one."
    )
    in_flight: int | None = Field(None, description="Migrations under this policy in flight.")
    outcomes: OutcomeCounters | None = Field(
        None, description="What happened, counted from the objects that exist now: the "
        "migrations labelled with this policy and the NodeDrains' VM entries (each counter "
        "says which).")
    downtime: DowntimeSummary | None = Field(
        None, description="Observed (measured, never predicted) switch-over downtime of this "
        "policy's succeeded migrations.")
    window_open: bool | None = Field(None, description="Whether new migrations may start now.")
    storage: StorageStatus | None = Field(
        None, description="Live storage migration (spec.storage mode Always): the VMs whose "
        "disks move, per volume.")
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
