"""A virtshift MigrationPolicy, made real: rendered into KubeVirt MigrationPolicies, applied to
the VMIs it governs (by a label KubeVirt's policies select on), and reported in its status.

Pure: the API objects are plain dicts in and out, the clock is an argument.

How KubeVirt's matching is made to agree with ours
--------------------------------------------------
KubeVirt picks, for a VMI, the ``migrations.kubevirt.io`` MigrationPolicy whose selectors match
the most labels (VMI labels plus namespace labels). Our selection is richer (priority, set-based
selectors, a drain's policyRef), so we do not translate selectors: virtshift decides which of its
policies governs each VMI, labels the VMI ``virtshift.io/policy=<policy>``, and every rendered
KubeVirt policy selects on exactly that label:

* ``virtshift-<policy>`` selects ``{virtshift.io/policy: <policy>}``;
* ``virtshift-<policy>-autoconverge`` and ``-postcopy`` (only when the policy's
  ``onDowntimeExceeded`` ladder contains that step) select the same label plus
  ``virtshift.io/migration-mode: AutoConverge|PostCopy``. They match one label more, so KubeVirt
  prefers them for a VMI the drain has labelled with a mode before starting its migration.

KubeVirt's matching still sees every KubeVirt policy in the cluster: an administrator's own that
matches a VMI with more labels (or as many, with a name sorting first) wins, and its settings
replace ours. ``overridden`` finds those (KubeVirt's precedence in ``kubevirt_match``), and the
status reports them (condition KubeVirtPolicyOverridden).

A VMI with a virtshift migration in flight keeps the policy label that migration was started
under (a drain's policyRef may have chosen another policy than precedence would); it is brought
back in line once the migration has finished.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.common import Condition
from virtshift.api.migrationpolicy import (
    DowntimeAction,
    DowntimeSummary,
    MigrationPolicySpec,
    MigrationPolicyStatus,
    OutcomeCounters,
)
from virtshift.api.units import parse_duration
from virtshift.domain.conditions import get_condition, set_condition
from virtshift.domain.downtime import (
    DIRTY_RATE_UNKNOWN,
    DIRTY_RATES_KNOWN,
    DOWNTIME_EXCEEDED,
    NO_METRICS_SOURCE,
    NOT_CONVERGING,
    PREDICTIONS_AVAILABLE,
    rate_matters,
)
from virtshift.domain.kubevirt_match import KubeVirtPolicyView, Score, kubevirt_choice
from virtshift.domain.naming import kubevirt_policy_name, label_value
from virtshift.domain.rules import NamedPolicy, governing_policy
from virtshift.domain.views import MigrationInfo
from virtshift.domain.windows import INVALID_WINDOW, validate_windows, window_state

JSON = dict[str, Any]

# The same strings as virtshift.k8s.views (the domain may not import k8s; a unit test checks).
POLICY_LABEL = "virtshift.io/policy"
MODE_LABEL = "virtshift.io/migration-mode"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "virtshift"

API_VERSION = "virtshift.io/v1alpha1"
KIND = "MigrationPolicy"
KUBEVIRT_API_VERSION = "migrations.kubevirt.io/v1alpha1"

# KubeVirt's schema: maxDowntimeMs is an int64 in [1, 2000000].
MAX_DOWNTIME_MS_RANGE = (1, 2_000_000)

READY = "Ready"
RENDERED = "Rendered"
CONFLICT = "KubeVirtPolicyConflict"
INVALID_SPEC = "InvalidSpec"
# Present (True) only while a KubeVirt policy virtshift did not render wins over ours.
KUBEVIRT_POLICY_OVERRIDDEN = "KubeVirtPolicyOverridden"
FOREIGN_POLICY_WINS = "ForeignPolicyWins"
OVERRIDE_CLEARED = "KubeVirtPolicyOverrideCleared"  # the Event when it goes

VARIANTS = {
    DowntimeAction.AUTO_CONVERGE.value: ("autoconverge", "allowAutoConverge"),
    DowntimeAction.POST_COPY.value: ("postcopy", "allowPostCopy"),
}


# -- rendering ------------------------------------------------------------------------------------


def variant_name(policy: str, mode: str) -> str:
    """``virtshift-<policy>-autoconverge`` / ``-postcopy`` (shortened with a hash past 253)."""
    return kubevirt_policy_name(f"{policy}-{VARIANTS[mode][0]}")


def all_rendered_names(policy: str) -> list[str]:
    """Every name a policy may render to, whether or not it does now."""
    return [kubevirt_policy_name(policy)] + [variant_name(policy, m) for m in VARIANTS]


def max_downtime_ms(spec: MigrationPolicySpec) -> int | None:
    """maxDowntime in whole milliseconds, within the range KubeVirt's schema accepts."""
    if not spec.max_downtime:
        return None
    ms = round(parse_duration(spec.max_downtime) * 1000)
    lo, hi = MAX_DOWNTIME_MS_RANGE
    return min(max(ms, lo), hi)


def kubevirt_spec(spec: MigrationPolicySpec, max_downtime: bool = False) -> JSON:
    """The fields KubeVirt applies itself, only those the policy sets (selectors aside).

    allowAutoConverge and allowPostCopy are rendered only when the policy sets them (also to
    false): unset, KubeVirt's cluster-wide settings (the KubeVirt CR's
    spec.configuration.migrations) apply, and ``rules.rules_from`` predicts with those.
    allowWorkloadDisruption is never rendered: KubeVirt lets it follow allowPostCopy.
    maxDowntimeMs only when ``max_downtime``: KubeVirt v1.9 refuses the field without the
    MigrationStallDetection gate (and only then passes it to QEMU), earlier releases do not
    have it. Without it maxDowntime is enforced by prediction alone (``downtime.choose``)."""
    out: JSON = {}
    if spec.bandwidth_per_migration:
        out["bandwidthPerMigration"] = str(spec.bandwidth_per_migration)
    if spec.completion_timeout_per_gi_b is not None:
        out["completionTimeoutPerGiB"] = int(spec.completion_timeout_per_gi_b)
    if spec.allow_auto_converge is not None:
        out["allowAutoConverge"] = spec.allow_auto_converge
    if spec.allow_post_copy is not None:
        out["allowPostCopy"] = spec.allow_post_copy
    downtime = max_downtime_ms(spec)
    if downtime is not None and max_downtime:
        out["maxDowntimeMs"] = downtime
    return out


def owner_reference(name: str, uid: str) -> JSON:
    # No blockOwnerDeletion: it needs update rights on our finalizers subresource where the
    # OwnerReferencesPermissionEnforcement admission plugin runs, and nothing waits on it.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
            "controller": True}


def render(name: str, uid: str, spec: MigrationPolicySpec,
           max_downtime: bool = False) -> list[JSON]:
    """The KubeVirt MigrationPolicies one virtshift MigrationPolicy becomes: the base one, then
    a variant per convergence step of its onDowntimeExceeded ladder (AutoConverge, PostCopy).
    ``max_downtime``: whether KubeVirt takes maxDowntimeMs (see ``kubevirt_spec``)."""
    value = label_value(name)
    labels = {MANAGED_BY_LABEL: MANAGER, POLICY_LABEL: value}
    base = kubevirt_spec(spec, max_downtime)

    def body(obj_name: str, selector: dict[str, str], extra: JSON) -> JSON:
        return {
            "apiVersion": KUBEVIRT_API_VERSION, "kind": "MigrationPolicy",
            "metadata": {"name": obj_name, "labels": dict(labels),
                         "ownerReferences": [owner_reference(name, uid)]},
            "spec": {**base, **extra,
                     "selectors": {"virtualMachineInstanceSelector": selector}},
        }

    out = [body(kubevirt_policy_name(name), {POLICY_LABEL: value}, {})]
    ladder = set(spec.on_downtime_exceeded)
    for mode, (_suffix, flag) in VARIANTS.items():
        if mode in ladder:
            # The policy's own settings plus the one flag (its completionTimeoutPerGiB, or
            # KubeVirt's, decides when post-copy starts): what downtime.choose predicts.
            out.append(body(variant_name(name, mode), {POLICY_LABEL: value, MODE_LABEL: mode},
                            {flag: True}))
    return out


@dataclass(frozen=True)
class Conflict:
    """A KubeVirt MigrationPolicy of one of our names that is not ours to change."""

    name: str
    owner: str | None = None  # the virtshift policy label it carries, if another virtshift's

    def message(self) -> str:
        if self.owner:
            return (f"KubeVirt MigrationPolicy {self.name} belongs to virtshift MigrationPolicy "
                    f"{self.owner}; left unchanged")
        return (f"KubeVirt MigrationPolicy {self.name} exists and is not managed by virtshift; "
                f"left unchanged (delete or rename it so that virtshift can render this policy)")


def ownership(existing: JSON, policy: str) -> Conflict | None:
    """None when ``existing`` (a KubeVirt MigrationPolicy) is ours to update or delete: managed
    by virtshift and rendered from this policy (a stale copy of a deleted policy of the same name
    is adopted). Otherwise the conflict to report."""
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGER:
        return Conflict(meta.get("name", ""))
    if labels.get(POLICY_LABEL) != label_value(policy):
        return Conflict(meta.get("name", ""), labels.get(POLICY_LABEL) or "(unknown)")
    return None


def up_to_date(existing: JSON, desired: JSON) -> bool:
    """Whether an owned KubeVirt policy already says what we render (extra labels, annotations
    and non-controller owners others added are kept and do not count)."""
    meta, want = existing.get("metadata") or {}, desired["metadata"]
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in want["labels"].items()):
        return False
    if (existing.get("spec") or {}) != desired["spec"]:
        return False
    ours = want["ownerReferences"][0]
    controllers = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    return [{k: r.get(k) for k in ours} for r in controllers] == [ours]


def updated(existing: JSON, desired: JSON) -> JSON:
    """The object to PUT: desired spec, labels and controller reference over what is there."""
    meta, want = dict(existing.get("metadata") or {}), desired["metadata"]
    meta.pop("managedFields", None)
    meta["labels"] = {**(meta.get("labels") or {}), **want["labels"]}
    uid = want["ownerReferences"][0]["uid"]
    others = [r for r in meta.get("ownerReferences") or []
              if not r.get("controller") and r.get("uid") != uid]
    meta["ownerReferences"] = [*others, *want["ownerReferences"]]
    return {"apiVersion": desired["apiVersion"], "kind": desired["kind"], "metadata": meta,
            "spec": desired["spec"]}


# -- which VMIs carry which policy label ----------------------------------------------------------


@dataclass(frozen=True)
class VMIPolicyView:
    """What labelling needs to know of one VMI."""

    key: str  # namespace/name
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    # A virtshift migration is in flight: the policy label it was started under (None: none).
    pinned: bool = False
    pinned_label: str | None = None

    @property
    def current(self) -> str | None:
        return self.labels.get(POLICY_LABEL)


def desired_label(vmi: VMIPolicyView, policies: Sequence[NamedPolicy]) -> str | None:
    """The policy label a VMI should carry: the one of its in-flight migration, while that names
    a policy that still exists; else the governing policy's (see rules.governing_policy)."""
    if vmi.pinned and (vmi.pinned_label is None
                       or vmi.pinned_label in {label_value(p.name) for p in policies}):
        return vmi.pinned_label
    chosen = governing_policy(policies, vmi.labels, vmi.namespace_labels)
    return label_value(chosen.name) if chosen else None


def governed(policy: str, policies: Sequence[NamedPolicy],
             vmis: Sequence[VMIPolicyView]) -> list[str]:
    """Keys of the VMIs ``policy`` governs now."""
    value = label_value(policy)
    return [v.key for v in vmis if desired_label(v, policies) == value]


def label_changes(policy: str, policies: Sequence[NamedPolicy],
                  vmis: Sequence[VMIPolicyView]) -> dict[str, str | None]:
    """The label writes one policy's reconcile makes, VMI key -> new value (None: remove).

    It brings in line the VMIs it governs and the VMIs carrying its label, and VMIs whose label
    names no existing policy (left over from a policy deleted mid-way). Every policy computes
    the same desired label for a VMI, so two reconciles never undo each other. Called with
    ``policies`` not holding ``policy``, it yields the clean-up after its deletion."""
    value = label_value(policy)
    known = {label_value(p.name) for p in policies}
    changes: dict[str, str | None] = {}
    for vmi in vmis:
        want, have = desired_label(vmi, policies), vmi.current
        if want == have:
            continue
        if value in (want, have) or (have is not None and have not in known):
            changes[vmi.key] = want
    return changes


# -- KubeVirt's own choice: a KubeVirt policy we did not render that wins over ours --------------


@dataclass(frozen=True)
class Override:
    """A KubeVirt MigrationPolicy this policy does not own that KubeVirt would apply, instead of
    ours, to migrations of VMIs this policy governs (kubevirt_match.kubevirt_choice)."""

    kubevirt_policy: str
    vmis: tuple[str, ...]  # namespace/name, sorted
    score: Score  # how it matches (the first of those VMIs)
    ours: Score | None  # how ours matches that VMI then

    def describe(self) -> str:
        why = (f"it matches {self.score.total} labels ({self.score.vmi} of the VMI, "
               f"{self.score.namespace} of its namespace)")
        if self.ours is not None:
            why += (f", ours {self.ours.total}" + (
                " and its name sorts first" if self.ours == self.score else ""))
        return (f"KubeVirt MigrationPolicy {self.kubevirt_policy} wins KubeVirt's matching for "
                f"{len(self.vmis)} VMIs ({', '.join(self.vmis[:10])}): {why}")


def kubevirt_policy_view(obj: JSON) -> KubeVirtPolicyView:
    """What KubeVirt's matching reads of a migrations.kubevirt.io MigrationPolicy."""
    selectors = (obj.get("spec") or {}).get("selectors")
    return KubeVirtPolicyView(
        name=(obj.get("metadata") or {}).get("name", ""), has_selectors=selectors is not None,
        vmi_selector=(selectors or {}).get("virtualMachineInstanceSelector"),
        namespace_selector=(selectors or {}).get("namespaceSelector"))


def _labellings(vmi: VMIPolicyView, value: str, modes: Sequence[str]
                ) -> list[dict[str, str]]:
    """The labels KubeVirt sees when a VMI this policy governs migrates: ours, and, for each
    convergence step of the ladder, ours plus that mode (a drain labels it so first)."""
    base = {k: v for k, v in vmi.labels.items() if k != MODE_LABEL}
    base[POLICY_LABEL] = value
    return [base] + [{**base, MODE_LABEL: m} for m in modes]


def overridden(name: str, spec: MigrationPolicySpec, policies: Sequence[NamedPolicy],
               vmis: Sequence[VMIPolicyView], kubevirt: Sequence[KubeVirtPolicyView],
               owned: Sequence[str]) -> list[Override]:
    """The KubeVirt MigrationPolicies not rendered for this policy (``owned``: the names we own
    now) that KubeVirt would pick for a VMI this policy governs, by KubeVirt's precedence
    (kubevirt_match): they silently replace this policy's settings there."""
    value = label_value(name)
    mine = set(governed(name, policies, vmis))
    modes = [m for m in VARIANTS if m in spec.on_downtime_exceeded]
    owned_names = set(owned)
    ours = [p for p in kubevirt if p.name in owned_names]
    found: dict[str, tuple[list[str], Score, Score | None]] = {}
    for vmi in sorted((v for v in vmis if v.key in mine), key=lambda v: v.key):
        for labels in _labellings(vmi, value, modes):
            choice = kubevirt_choice(kubevirt, labels, vmi.namespace_labels)
            if choice is None or choice[0].name in owned_names:
                continue
            winner, won = choice
            best_of_ours = kubevirt_choice(ours, labels, vmi.namespace_labels)
            keys = found.setdefault(winner.name, (
                [], won, best_of_ours[1] if best_of_ours else None))[0]
            if vmi.key not in keys:
                keys.append(vmi.key)
    return [Override(n, tuple(keys), won, best)
            for n, (keys, won, best) in sorted(found.items())]


# -- status ---------------------------------------------------------------------------------------


def nearest_rank(sorted_values: Sequence[int], percent: float) -> int | None:
    """The nearest-rank percentile of ascending values: the smallest value with at least
    ``percent`` % of the values at or below it."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class DrainVM:
    """A VM entry of a NodeDrain's status (``status.vms``), for a VM this policy governs in
    that drain (the drain's policyRef, else the precedence of ``rules.governing_policy``)."""

    drain: str
    namespace: str
    name: str
    phase: str
    mode: str | None = None
    reason: str | None = None


# A drain's reason for a VM it skipped because its VMI had gone (not the policy's doing).
VMI_GONE = "VMIGone"


def outcomes(spec: MigrationPolicySpec, migrations: Sequence[MigrationInfo],
             drain_vms: Sequence[DrainVM] = ()) -> tuple[OutcomeCounters, DowntimeSummary]:
    """Counters over what exists now, the way each outcome shows in the cluster:

    * succeeded, failed for good (the final attempt of a virtshift drain, or a migration
      nobody retries), downtime breaches: the VirtualMachineInstanceMigrations labelled with
      the policy, and the records of those virtshift aborted (``progress``), which outlive
      them;
    * skipped (nonMigratable: Skip), quickMigrated (a finished stop, move, start) and aborted
      (held back because onDowntimeExceeded ended in Abort): the NodeDrains' VM entries;
      aborted also counts the migrations virtshift aborted for progressTimeout."""
    limit = max_downtime_ms(spec)
    succeeded = [m for m in migrations if m.phase == "Succeeded"]
    failed = [m for m in migrations if m.phase == "Failed"
              and (m.drain is None or m.attempt == 0 or m.attempt >= spec.max_attempts)]
    observed = [m.downtime for m in succeeded if m.downtime is not None]  # never predictions
    downtimes = sorted(o.ms for o in observed)
    breaches = sum(1 for d in downtimes if limit is not None and d > limit)
    skipped = sum(1 for v in drain_vms if v.phase == "Skipped" and v.reason != VMI_GONE)
    quick = sum(1 for v in drain_vms if v.phase == "Succeeded" and v.mode == "QuickMigration")
    held = sum(1 for v in drain_vms if v.phase == "Waiting"
               and v.reason in (DOWNTIME_EXCEEDED, NOT_CONVERGING, DIRTY_RATE_UNKNOWN))
    held += len({(m.namespace, m.name) for m in migrations if m.aborted})
    counters = OutcomeCounters(succeeded=len(succeeded), failed=len(failed), skipped=skipped,
                               quick_migrated=quick, aborted=held,
                               downtime_breaches=breaches)
    summary = DowntimeSummary(samples=len(downtimes), p50_ms=nearest_rank(downtimes, 50),
                              p99_ms=nearest_rank(downtimes, 99),
                              max_ms=downtimes[-1] if downtimes else None,
                              source=", ".join(sorted({o.source for o in observed})) or None)
    return counters, summary


def stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PolicySnapshot:
    name: str
    generation: int
    spec: MigrationPolicySpec
    status: MigrationPolicyStatus
    now: dt.datetime
    matched: int = 0
    migrations: Sequence[MigrationInfo] = ()  # the VMIMs labelled with this policy
    conflicts: Sequence[Conflict] = ()
    rendered: Sequence[str] = ()  # names of the KubeVirt policies we own now
    drain_vms: Sequence[DrainVM] = ()  # the NodeDrains' entries of VMs this policy governs
    metrics_source: bool = False  # whether the operator reads dirty rates from one
    unknown_rates: Sequence[str] = ()  # governed VMIs (namespace/name) without a dirty rate
    overrides: Sequence[Override] = ()  # KubeVirt policies winning over ours (overridden)


@dataclass(frozen=True)
class PolicyDecision:
    status: MigrationPolicyStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def _ready(s: PolicySnapshot, window_problems: Sequence[str]) -> tuple[bool, str, str]:
    if s.conflicts:
        message = "; ".join(c.message() for c in s.conflicts)
        if window_problems:
            message += "; invalid windows: " + "; ".join(window_problems)
        return False, CONFLICT, message
    if window_problems:
        return False, INVALID_WINDOW, "; ".join(window_problems)
    return True, RENDERED, "rendered as KubeVirt MigrationPolicy " + ", ".join(s.rendered)


def _predictions(s: PolicySnapshot) -> tuple[bool, str, str] | None:
    """PredictionsAvailable, for a policy whose maxDowntime or onDowntimeExceeded needs the
    governed VMs' dirty rates (None: it needs none). Without one, downtime.choose treats a VM
    as not predicted to fit."""
    if not rate_matters(s.spec.max_downtime, s.spec.on_downtime_exceeded):
        return None
    rule = ("only the steps of onDowntimeExceeded whose outcome is acceptable whatever the "
            "dirty rate are taken (PostCopy within maxDowntime, Allow); otherwise the VM waits "
            "(AutoConverge, QuickMigration and Fail are passed over)")
    if not s.metrics_source:
        return False, NO_METRICS_SOURCE, (
            "no metrics source (virtshift run --metrics-source): the dirty rates of the "
            f"{s.matched} VMs this policy governs are unknown, so maxDowntime and "
            f"onDowntimeExceeded cannot be predicted; before migrating one, {rule}")
    if s.unknown_rates:
        return False, DIRTY_RATE_UNKNOWN, (
            f"the metrics source reports no dirty rate for {len(s.unknown_rates)} of the "
            f"{s.matched} VMs this policy governs ({', '.join(sorted(s.unknown_rates)[:10])});"
            f" before migrating one of them, {rule}")
    return True, DIRTY_RATES_KNOWN, ("the metrics source reports the dirty rate of every VM "
                                     "this policy governs")


def _predictions_condition(s: PolicySnapshot, conditions: list[Condition]
                           ) -> tuple[list[Condition], list[tuple[str, str, str]]]:
    """The conditions with PredictionsAvailable set (or removed, when the policy needs no
    dirty rates), and the Event of a change: Warning when it turns False, Normal when True
    again."""
    verdict = _predictions(s)
    before = get_condition(conditions, PREDICTIONS_AVAILABLE)
    if verdict is None:
        return [c for c in conditions if c.type != PREDICTIONS_AVAILABLE], []
    ok, reason, message = verdict
    out = set_condition(conditions, PREDICTIONS_AVAILABLE, ok, reason, message, s.generation,
                        stamp(s.now))
    if before is not None and before.reason == reason:
        return out, []
    if not ok:
        return out, [("Warning", reason, message)]
    return out, [("Normal", reason, message)] if before is not None else []


def _override_condition(s: PolicySnapshot, conditions: list[Condition]
                        ) -> tuple[list[Condition], list[tuple[str, str, str]]]:
    """KubeVirtPolicyOverridden, present (True) only while a KubeVirt policy we did not render
    wins for VMIs we govern (an abnormal condition, so absent when all is well, as kstatus
    recommends); a Warning Event when it appears, a Normal one when it goes."""
    before = get_condition(conditions, KUBEVIRT_POLICY_OVERRIDDEN)
    if not s.overrides:
        rest = [c for c in conditions if c.type != KUBEVIRT_POLICY_OVERRIDDEN]
        return rest, [] if before is None else [
            ("Normal", OVERRIDE_CLEARED, "no KubeVirt MigrationPolicy overrides this one any "
             "more")]
    names = ", ".join(o.kubevirt_policy for o in s.overrides)
    message = (f"KubeVirt applies another MigrationPolicy than virtshift's to VMIs of the "
               f"{s.matched} this policy governs, and its settings replace this policy's "
               f"there: {'; '.join(o.describe() for o in s.overrides)} (KubeVirt picks the "
               "policy matching the most labels, then the name that sorts first; delete "
               f"{names} or narrow its selectors)")
    out = set_condition(conditions, KUBEVIRT_POLICY_OVERRIDDEN, True, FOREIGN_POLICY_WINS,
                        message, s.generation, stamp(s.now))
    return out, [] if before is not None else [
        ("Warning", KUBEVIRT_POLICY_OVERRIDDEN, message)]


def derive_status(s: PolicySnapshot) -> PolicyDecision:
    """The policy's status, and the Events worth recording for the change (each only on the
    transition into its reason, so a reconcile loop does not repeat them)."""
    problems = validate_windows(s.spec.windows)
    ok, reason, message = _ready(s, problems)
    before = get_condition(s.status.conditions, READY)
    conditions = set_condition(s.status.conditions or [], READY, ok, reason, message,
                               s.generation, stamp(s.now))
    conditions, predictions = _predictions_condition(s, conditions)
    conditions, overrides = _override_condition(s, conditions)
    counters, downtime = outcomes(s.spec, s.migrations, s.drain_vms)
    window_open = next_window = None
    if not problems:
        state = window_state(s.spec.windows, s.now)
        window_open = state.open
        next_window = stamp(state.next_open) if state.next_open else None
    base = kubevirt_policy_name(s.name)
    status = MigrationPolicyStatus(
        observed_generation=s.generation, conditions=conditions, matched_v_ms=s.matched,
        kubevirt_policy=base if base in s.rendered else None,
        in_flight=sum(1 for m in s.migrations if m.unfinished),
        outcomes=counters, downtime=downtime, window_open=window_open, next_window=next_window,
    )
    events: list[tuple[str, str, str]] = []
    if before is None or before.reason != reason or before.status != ("True" if ok else "False"):
        events.append(("Normal" if ok else "Warning", reason, message))
    events += predictions + overrides
    return PolicyDecision(status, events)


def invalid_spec(status: MigrationPolicyStatus, generation: int, message: str,
                 now: dt.datetime) -> PolicyDecision:
    """A spec our models reject (the CRD schema lets very little through): report, change
    nothing."""
    before = get_condition(status.conditions, READY)
    conditions = set_condition(status.conditions or [], READY, False, INVALID_SPEC, message,
                               generation, stamp(now))
    new = status.model_copy(update={"observed_generation": generation,
                                    "conditions": conditions})
    events = [] if before and before.reason == INVALID_SPEC else [
        ("Warning", INVALID_SPEC, message)]
    return PolicyDecision(new, events)


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch turning ``old`` into ``new`` (None: nothing to change)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: JSON = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            sub = merge_patch(old[key], value)
            patch[key] = value if sub is None else sub
    return patch or None
