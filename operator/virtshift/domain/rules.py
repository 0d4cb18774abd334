"""Which MigrationPolicy governs a VM, and the rules that follow from it.

Precedence (also in the CRD's description): highest ``priority``; then the most specific
policy (more selector terms); then the name that sorts first. A drain's ``policyRef`` wins
over all of them; one that names no usable policy stops the drain (``policy_ref_problem``).

``rules_from`` maps the spec onto the rules the planner and the predictions use, keeping the
CRD's names: maxAttempts, backoff, nonMigratable, maxDowntime, bandwidthPerMigration,
nodeBandwidth, maxParallelMigrations, maxParallelOutboundPerNode, maxParallelInboundPerNode,
windows, withinWindow, onDowntimeExceeded, progressTimeout; and allowAutoConverge, allowPostCopy and
completionTimeoutPerGiB as KubeVirt will resolve them: the policy's value when it sets one,
else the KubeVirt CR's (``KubeVirtMigrationConfig``), with allowWorkloadDisruption following
the policy's allowPostCopy when the policy sets that (KubeVirt's GetMigrationConfByPolicy /
applyMigrationPolicySpec; our rendered policies never set allowWorkloadDisruption).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from virtshift.api.common import LabelSelector
from virtshift.api.migrationpolicy import MigrationPolicySpec, StorageMigration, Window
from virtshift.api.units import parse_duration, parse_quantity
from virtshift.domain.physics import QEMU_DEFAULT_DOWNTIME
from virtshift.domain.views import KubeVirtMigrationConfig
from virtshift.domain.windows import validate_windows


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics; an absent selector matches everything."""
    if selector is None:
        return True
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions or []:
        present = req.key in labels
        values = req.values or []
        if req.operator == "In" and (not present or labels[req.key] not in values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def selector_size(selector: LabelSelector | None) -> int:
    if selector is None:
        return 0
    return len(selector.match_labels or {}) + len(selector.match_expressions or [])


@dataclass(frozen=True)
class NamedPolicy:
    name: str
    spec: MigrationPolicySpec


# Why a NodeDrain's policyRef cannot govern it (its conditions' and Events' reasons).
POLICY_NOT_FOUND = "PolicyNotFound"
POLICY_INVALID = "PolicyInvalid"
POLICY_TERMINATING = "PolicyTerminating"


@dataclass(frozen=True)
class PolicyRef:
    """What the cluster holds under the name a NodeDrain's policyRef gives."""

    name: str
    found: bool = False
    terminating: bool = False  # deletionTimestamp set
    spec: MigrationPolicySpec | None = None  # None: missing, or rejected by the models
    rejected: str | None = None  # why the models reject its spec


def policy_ref_problem(ref: PolicyRef | None) -> tuple[str, str] | None:
    """(reason, message) when the policy a NodeDrain names cannot govern its VMs: missing,
    being deleted, or invalid -- a spec the models reject, or windows that cannot be read,
    which the policy's own Ready condition reports (InvalidSpec, InvalidWindow). The drain
    then starts nothing rather than move VMs under default rules (no windows, no limits, no
    ladder). None when there is no policyRef or it is usable."""
    if ref is None:
        return None
    waits = "; nothing new starts until it is usable (migrations under way go on)"
    if not ref.found:
        return POLICY_NOT_FOUND, f"policyRef: MigrationPolicy {ref.name} does not exist{waits}"
    if ref.terminating:
        return POLICY_TERMINATING, f"policyRef: MigrationPolicy {ref.name} is being deleted{waits}"
    problems = [ref.rejected or "its spec cannot be read"] if ref.spec is None else \
        validate_windows(ref.spec.windows)
    if problems:
        return POLICY_INVALID, (f"policyRef: MigrationPolicy {ref.name} is invalid: "
                                f"{'; '.join(problems)}{waits}")
    return None


def governing_policy(
    policies: Sequence[NamedPolicy], vm_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str], policy_ref: str | None = None,
) -> NamedPolicy | None:
    if policy_ref:
        return next((p for p in policies if p.name == policy_ref), None)
    matching = [
        p for p in policies
        if selector_matches(p.spec.namespace_selector, namespace_labels)
        and selector_matches(p.spec.vm_selector, vm_labels)
    ]
    if not matching:
        return None
    return min(matching, key=lambda p: (
        -p.spec.priority,
        -(selector_size(p.spec.namespace_selector) + selector_size(p.spec.vm_selector)),
        p.name,
    ))


@dataclass(frozen=True)
class Rules:
    """The effective rules one VM migrates under (defaults when no policy governs it)."""

    policy: str | None = None
    max_attempts: int = 3
    backoff_initial: float = 30.0
    backoff_max: float = 600.0
    non_migratable: str = "Fail"
    max_downtime: float | None = None
    bandwidth_per_migration: float | None = None
    node_bandwidth: float | None = None
    # As KubeVirt resolves them for this VM's migrations (the policy's, else the KubeVirt CR's).
    allow_post_copy: bool = False
    allow_auto_converge: bool = False
    allow_workload_disruption: bool = False
    on_downtime_exceeded: tuple[str, ...] = ("Abort",)
    max_parallel: int | None = None
    max_outbound_per_node: int | None = None
    max_inbound_per_node: int | None = None
    windows: tuple[Window, ...] = ()
    within_window: str = "Start"  # Finish: admit only what is predicted to end in the window
    completion_timeout_per_gib: float = 150.0  # KubeVirt's default
    # The policy's progressTimeout: virtshift's own abort of a stalled transfer (None: none).
    progress_timeout: float | None = None
    # KubeVirt's own, cluster-wide (the KubeVirt CR's progressTimeout): no policy changes it.
    kubevirt_progress_timeout: float = 150.0
    # Whether KubeVirt hands maxDowntime (rendered as maxDowntimeMs) on to QEMU: only v1.9+
    # with the MigrationStallDetection gate. Otherwise maxDowntime is virtshift's own limit,
    # held by prediction (the ladder), while QEMU switches over at its default 300 ms.
    kubevirt_applies_max_downtime: bool = False
    storage: StorageMigration | None = None  # the policy's spec.storage

    @property
    def switchover_downtime(self) -> float:
        """The pause QEMU accepts when it decides to switch over (what the physics model
        converges to): maxDowntime when KubeVirt passes it on, else QEMU's default."""
        if self.kubevirt_applies_max_downtime and self.max_downtime:
            return self.max_downtime
        return QEMU_DEFAULT_DOWNTIME

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after the n-th failed attempt: doubling, capped."""
        if failed_attempts <= 0:
            return 0.0
        return min(self.backoff_initial * 2 ** (failed_attempts - 1), self.backoff_max)


def rules_from(policy: NamedPolicy | None, non_migratable_override: str | None = None,
               kubevirt_applies_max_downtime: bool = False,
               kubevirt: KubeVirtMigrationConfig | None = None) -> Rules:
    """The rules of a VM governed by ``policy`` (None: by none). ``kubevirt``: the KubeVirt
    CR's migration configuration, which applies wherever the policy leaves a field unset."""
    kv = kubevirt or KubeVirtMigrationConfig()
    inherited = {
        "allow_auto_converge": kv.allow_auto_converge,
        "allow_post_copy": kv.allow_post_copy,
        "allow_workload_disruption": kv.workload_disruption,
        "completion_timeout_per_gib": float(kv.completion_timeout_per_gib),
        "kubevirt_progress_timeout": float(kv.progress_timeout),
        "kubevirt_applies_max_downtime": kubevirt_applies_max_downtime,
    }
    if policy is None:
        base = Rules(**inherited)
    else:
        s = policy.spec
        if s.allow_auto_converge is not None:
            inherited["allow_auto_converge"] = s.allow_auto_converge
        if s.allow_post_copy is not None:
            # KubeVirt: a policy's allowPostCopy also sets allowWorkloadDisruption when the
            # policy leaves that unset (ours always does).
            inherited["allow_post_copy"] = s.allow_post_copy
            inherited["allow_workload_disruption"] = s.allow_post_copy
        if s.completion_timeout_per_gi_b is not None:
            inherited["completion_timeout_per_gib"] = float(s.completion_timeout_per_gi_b)
        base = Rules(
            policy=policy.name,
            max_attempts=s.max_attempts,
            backoff_initial=parse_duration(s.backoff.initial),
            backoff_max=parse_duration(s.backoff.max),
            non_migratable=s.non_migratable,
            max_downtime=parse_duration(s.max_downtime) if s.max_downtime else None,
            bandwidth_per_migration=parse_quantity(s.bandwidth_per_migration)
            if s.bandwidth_per_migration else None,
            node_bandwidth=parse_quantity(s.node_bandwidth) if s.node_bandwidth else None,
            on_downtime_exceeded=tuple(s.on_downtime_exceeded),
            max_parallel=s.max_parallel_migrations,
            max_outbound_per_node=s.max_parallel_outbound_per_node,
            max_inbound_per_node=s.max_parallel_inbound_per_node,
            windows=tuple(s.windows or ()),
            within_window=str(s.within_window),
            progress_timeout=parse_duration(s.progress_timeout) if s.progress_timeout else None,
            storage=s.storage,
            **inherited,
        )
    if non_migratable_override:
        return dataclasses.replace(base, non_migratable=non_migratable_override)
    return base
