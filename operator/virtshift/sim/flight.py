"""One VirtualMachineInstanceMigration as virt-controller and virt-handler track it, and the
migration configuration KubeVirt resolves for it at handoff."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.units import parse_quantity
from virtshift.domain.physics import QEMU_DEFAULT_DOWNTIME, PreCopyRun
from virtshift.sim.populate import SimVM

JSON = dict[str, Any]

PENDING_PHASES = ("", "Pending")
IN_FLIGHT = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
HANDED_OFF = ("PreparingTarget", "TargetReady", "Running")
FINAL = ("Succeeded", "Failed")

# pkg/util/migrations/migrations.go: the migration queue's priorities.
QUEUE_PRIORITY = {"system-critical": 100, "user-triggered": 50, "system-maintenance": 20}
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
WORKLOAD_UPDATE_ANNOTATION = "kubevirt.io/workloadUpdateMigration"
VOLUME_UPDATE_LABEL = "kubevirt.io/volume-update-migration"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
FINALIZER = "kubevirt.io/migrationJobFinalize"
ABORT_REQUESTED_CONDITION = "migrationAbortRequested"


def best_policy(policies: Iterable[JSON], vmi_labels: dict[str, str] | None,
                ns_labels: dict[str, str]) -> JSON | None:
    """migrationpolicy.go matchPolicy/countMatchingLabels: every selector label must match;
    the most matching labels win, then the most VMI labels, then the first name. As coded
    there, a VMI without labels skips both selector checks."""
    best: tuple[tuple[int, int, str], JSON] | None = None
    for policy in policies:
        sel = (policy.get("spec") or {}).get("selectors")
        if sel is None:
            continue
        vmi_sel = sel.get("virtualMachineInstanceSelector") or {}
        ns_sel = sel.get("namespaceSelector") or {}
        vmi_score = ns_score = 0
        if vmi_labels:
            if any(vmi_labels.get(k) != v for k, v in vmi_sel.items()):
                continue
            if any(ns_labels.get(k) != v for k, v in ns_sel.items()):
                continue
            vmi_score, ns_score = len(vmi_sel), len(ns_sel)
        rank = (-(vmi_score + ns_score), -vmi_score, policy["metadata"]["name"])
        if best is None or rank < best[0]:
            best = (rank, policy)
    return best[1] if best else None


@dataclass
class Config:
    """The migration configuration in force for one migration: the KubeVirt CR's
    ``spec.configuration.migrations`` with the matching migrations.kubevirt.io policy applied,
    as migration.go handleTargetPodHandoff writes it into ``migrationState``."""

    bandwidth: float = 0.0  # bytes/s, 0 = unlimited
    completion_timeout_per_gib: int = 150
    progress_timeout: int = 150
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    allow_workload_disruption: bool | None = None  # None follows allowPostCopy
    policy: str | None = None
    wire_fields: JSON = field(default_factory=dict)  # the configuration as KubeVirt writes it

    @property
    def workload_disruption(self) -> bool:
        """virt-config.go GetMigrationConfiguration: unset follows allowPostCopy."""
        if self.allow_workload_disruption is None:
            return self.allow_post_copy
        return self.allow_workload_disruption

    @property
    def max_downtime(self) -> float:
        """KubeVirt's legacy convergence path never calls MigrateSetMaxDowntime: QEMU's
        default applies whatever maxDowntimeMs says (it acts only with stall detection)."""
        return QEMU_DEFAULT_DOWNTIME

    @classmethod
    def from_cluster(cls, migrations: JSON, version: str) -> Config:
        bandwidth = migrations.get("bandwidthPerMigration")
        cfg = cls(
            bandwidth=parse_quantity(bandwidth) if bandwidth not in (None, 0, "0") else 0.0,
            completion_timeout_per_gib=int(migrations.get("completionTimeoutPerGiB", 150)),
            progress_timeout=int(migrations.get("progressTimeout", 150)),
            allow_auto_converge=bool(migrations.get("allowAutoConverge", False)),
            allow_post_copy=bool(migrations.get("allowPostCopy", False)),
            allow_workload_disruption=migrations.get("allowWorkloadDisruption"),
        )
        # The whole cluster configuration with KubeVirt's defaults filled in.
        cfg.wire_fields = {
            "nodeDrainTaintKey": migrations.get("nodeDrainTaintKey", "kubevirt.io/drain"),
            "parallelMigrationsPerCluster": int(migrations.get("parallelMigrationsPerCluster",
                                                               5)),
            "parallelOutboundMigrationsPerNode": int(migrations.get(
                "parallelOutboundMigrationsPerNode", 2)),
            "bandwidthPerMigration": bandwidth if bandwidth not in (None, 0) else "0Mi",
            "completionTimeoutPerGiB": cfg.completion_timeout_per_gib,
            "progressTimeout": cfg.progress_timeout,
            "unsafeMigrationOverride": bool(migrations.get("unsafeMigrationOverride", False)),
            "allowAutoConverge": cfg.allow_auto_converge,
            "allowPostCopy": cfg.allow_post_copy,
            "allowWorkloadDisruption": cfg.workload_disruption,
        }
        if version == "1.9":
            cfg.wire_fields["maxDowntimeMs"] = int(migrations.get("maxDowntimeMs", 900))
        if version in ("1.8", "1.9"):
            cfg.wire_fields["utilityVolumesTimeout"] = int(migrations.get(
                "utilityVolumesTimeout", 150))
        return cfg

    def apply_policy(self, name: str, spec: JSON, version: str) -> None:
        """Overwrite field by field with what the policy sets (GetMigrationConfByPolicy in
        1.7/1.8, applyMigrationPolicySpec in 1.9). The policy's name is recorded whenever it
        matches on 1.9, and on 1.7/1.8 only when it changed something."""
        changed = False

        def take(key: str, attr: str, convert: Any) -> None:
            nonlocal changed
            if key in spec and spec[key] is not None:
                value = convert(spec[key])
                if getattr(self, attr) != value:
                    changed = True
                setattr(self, attr, value)
                self.wire_fields[key] = spec[key]

        if "allowPostCopy" in spec and spec.get("allowWorkloadDisruption") is None:
            # Disruption follows the policy's allowPostCopy when the policy leaves it unset.
            if self.workload_disruption != bool(spec["allowPostCopy"]):
                changed = True
            self.allow_workload_disruption = bool(spec["allowPostCopy"])
            self.wire_fields["allowWorkloadDisruption"] = self.allow_workload_disruption
        take("allowAutoConverge", "allow_auto_converge", bool)
        take("bandwidthPerMigration", "bandwidth", lambda v: parse_quantity(v) if v else 0.0)
        take("completionTimeoutPerGiB", "completion_timeout_per_gib", int)
        take("allowPostCopy", "allow_post_copy", bool)
        if spec.get("allowWorkloadDisruption") is not None:
            if self.workload_disruption != bool(spec["allowWorkloadDisruption"]):
                changed = True
            self.allow_workload_disruption = bool(spec["allowWorkloadDisruption"])
            self.wire_fields["allowWorkloadDisruption"] = self.allow_workload_disruption
        if version == "1.9" and spec.get("maxDowntimeMs") is not None:
            self.wire_fields["maxDowntimeMs"] = int(spec["maxDowntimeMs"])
        if version == "1.9" or changed:
            self.policy = name


@dataclass
class Flight:
    """A VMIM: what virt-controller and the source and target virt-handlers know of it."""

    key: str
    uid: str
    name: str
    vm: SimVM | None
    created: float  # simulated seconds
    created_stamp: str  # metadata.creationTimestamp (ordering for GC and backoff)
    priority: int  # queue priority from spec.priority
    selector: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    phase: str = ""
    phase_since: float = 0.0
    # Pending: when virt-controller next looks at it (sim.slots), and the VMIM's and VMI's
    # resourceVersions it last saw (an update wakes it at once).
    next_check: float | None = None
    wake_rank: float = 0.0  # its place among those re-enqueued together (random)
    seen_versions: tuple[str, str] = ("", "")
    transitions: list[JSON] = field(default_factory=list)
    conditions: list[JSON] = field(default_factory=list)
    source: str = ""
    source_pod: str = ""
    target: str | None = None
    target_pod: str | None = None
    target_pod_uid: str | None = None
    pod_future: Future[Any] | None = None  # the target pod's creation
    pod_selector: dict[str, str] = field(default_factory=dict)  # the target pod's
    pod_created_at: float | None = None
    pod_ready_at: float | None = None
    unschedulable: bool = False
    handed_off_at: float | None = None
    attempt: int = 0  # the VM's n-th migration (for faults that name an attempt)
    config: Config = field(default_factory=Config)
    run: PreCopyRun | None = None
    run_limit: int = 0  # acceptableCompletionTime, seconds
    disk_bytes_left: float = 0.0
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source, dest class)
    migrated_bytes: float = 0.0  # source sizes of the volumes this migration moves
    volume_update: dict[str, str] | None = None  # volume -> destination claim
    started_at: float | None = None
    ended_at: float | None = None
    progressed_to: float | None = None  # simulated time the transfer has been advanced to
    completed: bool = False
    failed: bool = False
    failure: str | None = None  # the VMI's failureReason (virt-handler's)
    event: str | None = None  # virt-controller's FailedMigration event on the VMIM
    event_sent: bool = False
    deleting: bool = False
    abort_requested: bool = False  # written on the VMI (only once Running)
    abort_status: str | None = None
    abort_due: float | None = None
    downtime_ms: int | None = None
    dirty: bool = True  # status needs writing
    final_written: bool = False  # the final phase is on the VMIM
    finalized: bool = False  # ... and then its finalizer was removed

    @property
    def done(self) -> bool:
        return self.phase in FINAL

    @property
    def handed_off(self) -> bool:
        return self.handed_off_at is not None

    @property
    def backoff_eligible(self) -> bool:
        """migration.go handleMigrationBackoff: evacuations and workload updates only."""
        return EVACUATION_ANNOTATION in self.annotations or \
            WORKLOAD_UPDATE_ANNOTATION in self.annotations
