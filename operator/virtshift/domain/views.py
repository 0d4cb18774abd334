"""Narrow, immutable views of the cluster objects the domain reasons about.

The k8s layer builds them from API objects; the domain never sees a raw dict or a client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from virtshift.api.kubevirt import FINAL_PHASES
from virtshift.domain.placement import NodeView


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    unschedulable: bool = False
    cpu: float = 0.0  # allocatable cores
    memory: float = 0.0  # allocatable bytes
    taints: tuple[tuple[str, str], ...] = ()  # (key, effect)

    def view(self) -> NodeView:
        return NodeView(self.name, dict(self.labels), self.ready, not self.unschedulable,
                        self.cpu, self.memory, self.taints)


@dataclass(frozen=True)
class VMIInfo:
    namespace: str
    name: str
    node: str | None
    memory: float = 0.0  # guest memory
    cpu: float = 1.0  # vCPUs
    cpu_model: str = "host-model"
    memory_request: float | None = None  # spec.domain.resources.requests.memory
    node_selector: Mapping[str, str] = field(default_factory=dict)  # the VMI's own
    pod_selector: Mapping[str, str] = field(default_factory=dict)  # its launcher pod's
    labels: Mapping[str, str] = field(default_factory=dict)
    phase: str = "Running"
    migratable: bool = True
    not_migratable_reason: str | None = None
    not_migratable_message: str | None = None
    running_since: dt.datetime | None = None
    dirty_rate: float | None = None  # bytes/s, when a metrics source reports it
    # (reason, message) of a PodScheduled=False condition: the launcher pod of a VMI not
    # yet running cannot be scheduled (KubeVirt copies the pod's condition onto the VMI).
    unschedulable: tuple[str, str] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class QuickMigrationRecord:
    """What virtshift wrote on a VM while restarting it elsewhere (stop, move, start): by
    which drain (its UID: a drain created again under the same name is another), what the
    VM's run strategy was (``running``: it used the deprecated spec.running: true), the node
    selector the restart needs (``pin``) and what of it was added to the VM's template
    (``pinned``), so that all of it is taken back once the VM runs again."""

    drain: str
    source: str
    stopped_at: dt.datetime
    started: bool = False  # runStrategy set back to run
    policy: str | None = None  # the policy whose limits the stop counted against
    drain_uid: str | None = None  # None: written before records were keyed by UID
    started_at: dt.datetime | None = None
    run_strategy: str = "Always"
    running: bool = False
    pin: Mapping[str, str] = field(default_factory=dict)
    pinned: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VMInfo:
    namespace: str
    name: str
    run_strategy: str = "Always"
    quick: QuickMigrationRecord | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class DowntimeObservation:
    """A switch-over downtime that was measured, and by what: never a prediction (those are
    ``physics.Prediction``). ``source`` names it as the status shows it, e.g.
    ``annotation:<key>``, ``prometheus:<metric>`` or ``restartTimestamps``."""

    ms: int
    source: str


@dataclass(frozen=True)
class MigrationInfo:
    """A VirtualMachineInstanceMigration; ``drain``/``attempt`` are set on virtshift's own."""

    namespace: str
    name: str
    vmi: str
    phase: str = ""
    drain: str | None = None
    policy: str | None = None
    attempt: int = 0
    created: dt.datetime | None = None
    scheduling_at: dt.datetime | None = None  # KubeVirt gave it a slot (left its queue)
    running_at: dt.datetime | None = None
    ended: dt.datetime | None = None
    source: str | None = None
    target: str | None = None
    failure: str | None = None
    mode: str | None = None
    downtime: DowntimeObservation | None = None  # only from a configured observation source
    terminating: bool = False
    aborted: str | None = None  # why virtshift aborted it (e.g. ProgressTimeout), if it did

    @property
    def vmi_key(self) -> str:
        return f"{self.namespace}/{self.vmi}"

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def queued(self) -> bool:
        """Waiting in KubeVirt's queue: not yet given a target pod."""
        return self.phase in ("", "Pending") and not self.terminating

    @property
    def unfinished(self) -> bool:
        """Counts against KubeVirt's limits: queued (Pending) or in flight."""
        return not self.final and not self.terminating

    @property
    def in_post_copy(self) -> bool:
        """In post-copy now: the guest already runs on the target, so KubeVirt never aborts it
        (virt-launcher live-migration-source.go: no timeout applies in post-copy, and libvirt
        refuses AbortJob, so deleting the VMIM does not stop it either). virtshift never asks:
        no progressTimeout, cancelOnDelete or withdrawal deletes such a migration."""
        return self.mode == "PostCopy" and not self.final


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    kind: str  # "launcher", "daemonset", "mirror", "terminating" or "ordinary"
    vmi: str | None = None  # a launcher pod's VMI, namespace/name

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class KubeVirtLimits:
    per_cluster: int = 5
    outbound_per_node: int = 2
    # spec.configuration.vmRolloutStrategy is LiveUpdate (KubeVirt's default since 1.7):
    # a VM template's nodeSelector/affinity changes reach its running VMI without a restart.
    live_update: bool = True


@dataclass(frozen=True)
class KubeVirtMigrationConfig:
    """What the KubeVirt CR's ``spec.configuration.migrations`` says about the fields a
    MigrationPolicy may leave to KubeVirt, with KubeVirt's defaults filled in
    (pkg/virt-config/virt-config.go). KubeVirt starts every migration from these and applies
    the matching migrations.kubevirt.io policy over them field by field (migration.go
    handleTargetPodHandoff)."""

    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    allow_workload_disruption: bool | None = None  # None: follows allow_post_copy
    completion_timeout_per_gib: int = 150
    progress_timeout: int = 150  # KubeVirt's own; no MigrationPolicy can change it

    @property
    def workload_disruption(self) -> bool:
        """virt-config.go GetMigrationConfiguration: unset follows allowPostCopy."""
        if self.allow_workload_disruption is None:
            return self.allow_post_copy
        return self.allow_workload_disruption


@dataclass(frozen=True)
class AbortRecord:
    """A migration virtshift aborted (by deleting it), kept on its VMI: KubeVirt removes the
    VirtualMachineInstanceMigration once the abort is done, and the attempt must still count
    (maxAttempts, backoff) and be reported."""

    migration: str
    namespace: str
    vmi: str
    reason: str  # e.g. ProgressTimeout
    message: str
    at: dt.datetime
    policy: str | None = None  # the virtshift.io/policy label it carried
    drain: str | None = None  # the virtshift.io/drain label it carried
    drain_uid: str | None = None
    attempt: int = 0

    def as_migration(self) -> MigrationInfo:
        """The failed attempt this record stands for once the migration object is gone."""
        return MigrationInfo(
            namespace=self.namespace, name=self.migration, vmi=self.vmi, phase="Failed",
            drain=self.drain, policy=self.policy, attempt=self.attempt, ended=self.at,
            failure=self.message, aborted=self.reason)
