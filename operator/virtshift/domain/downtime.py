"""Before a migration starts: will it converge within the policy's maxDowntime at the bandwidth
it will get? If not (the predicted pause exceeds maxDowntime, or the VM would not converge),
walk the policy's ladder (onDowntimeExceeded) to the first step that works. A migration
predicted to fit runs as it is: the ladder is never consulted then.

Each step is predicted with the settings KubeVirt will apply to it: the "-autoconverge" and
"-postcopy" KubeVirt policies (``policy.render``) are the policy's own plus one flag, so the
PostCopy step switches at the completion timeout the policy sets (completionTimeoutPerGiB, else
the KubeVirt CR's), as KubeVirt does (shouldTriggerTimeout / shouldAssistMigrationToComplete).

An unknown dirty rate (no metrics source, or one that does not report the VM) is not 0: where
maxDowntime or a ladder would act, nothing can predict that the VM fits, so it is treated as
not fitting and only the steps whose outcome is acceptable whatever the rate are taken
(``_unknown_rate``: PostCopy within maxDowntime, Allow); otherwise the VM waits. Without
maxDowntime and with the default ladder the rate decides nothing and the VM migrates as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from virtshift.domain.eta import Estimator
from virtshift.domain.physics import POST_COPY_SWITCH_DOWNTIME, Prediction
from virtshift.domain.rules import Rules
from virtshift.domain.views import VMIInfo

MIGRATE = "Migrate"
DOWNTIME_EXCEEDED = "DowntimeExceeded"
NOT_CONVERGING = "NotConverging"
# The VM's dirty rate is unknown where maxDowntime or onDowntimeExceeded needs it (VM reason);
# as a condition reason, with a metrics source that does not report some VMs.
DIRTY_RATE_UNKNOWN = "DirtyRateUnknown"
NO_METRICS_SOURCE = "NoMetricsSource"  # condition reason: no metrics source at all
# The condition on NodeDrains and MigrationPolicies saying whether the dirty rates are known.
PREDICTIONS_AVAILABLE = "PredictionsAvailable"
DIRTY_RATES_KNOWN = "DirtyRatesKnown"
DEFAULT_LADDER = ("Abort",)  # the CRD's default onDowntimeExceeded


@dataclass(frozen=True)
class Choice:
    action: str  # Migrate, AutoConverge, PostCopy, QuickMigration, Abort, Fail or Allow
    predicted: Prediction
    reason: str | None = None  # DowntimeExceeded or NotConverging when the plain run fails
    message: str = ""

    @property
    def migrates(self) -> bool:
        return self.action in (MIGRATE, "AutoConverge", "PostCopy", "Allow")

    @property
    def mode(self) -> str | None:
        """The KubeVirt migration mode the VMI must be labelled for, if any."""
        return self.action if self.action in ("AutoConverge", "PostCopy") else None


def rate_matters(max_downtime: object, ladder: tuple[str, ...] | list[str]) -> bool:
    """Whether a VM's dirty rate decides anything before it migrates: a maxDowntime to hold,
    or a ladder other than the default (the ladder also acts on a VM that would not
    converge)."""
    return bool(max_downtime) or tuple(ladder) != DEFAULT_LADDER


def unknown_rate_cause(metrics_source: bool) -> str:
    return "no metrics source" if not metrics_source else \
        "the metrics source does not report it"


def _fits(p: Prediction, limit: float | None) -> bool:
    return p.converges and (limit is None or p.downtime <= limit)


def _post_copy(rules: Rules) -> Rules:
    """The "-postcopy" KubeVirt policy: allowPostCopy (which KubeVirt also takes as
    allowWorkloadDisruption), the rest as rendered: KubeVirt switches to post-copy at the
    policy's completion timeout."""
    return dataclasses.replace(rules, allow_post_copy=True, allow_workload_disruption=True)


def _describe(p: Prediction, limit: float | None) -> str:
    if not p.converges:
        return f"pre-copy would not converge ({p.failure_reason})"
    return (f"predicted switch-over downtime {p.downtime * 1000:.0f} ms exceeds maxDowntime "
            f"{(limit or 0) * 1000:.0f} ms")


def _post_copy_bound(rules: Rules) -> float | None:
    """The longest pause the PostCopy step can cause whatever the dirty rate: a pre-copy that
    completes switches over within QEMU's limit (rules.switchover_downtime); one that does not
    is switched to post-copy at the completion timeout (a short pause). None when KubeVirt
    never times out (completionTimeoutPerGiB 0): then nothing bounds it."""
    if rules.completion_timeout_per_gib <= 0:
        return None
    return max(rules.switchover_downtime, POST_COPY_SWITCH_DOWNTIME)


def _unknown_rate(rules: Rules, plain: Prediction, predict: Callable[[Rules], Prediction],
                  why: str) -> Choice:
    """The ladder for a VM whose dirty rate is unknown: a step is taken only when its outcome
    is acceptable whatever the rate -- PostCopy when its pause is bounded within maxDowntime,
    and Allow (the user accepts a breach). AutoConverge depends on the rate; QuickMigration and
    Fail are the user's answer to a live migration that would breach maxDowntime, which nothing
    says it would: stopping the VM (a certain outage) or failing it on no evidence is not
    conservative. Those are passed over, and the VM waits until its rate is known."""
    limit = rules.max_downtime
    reason = DIRTY_RATE_UNKNOWN
    for step in rules.on_downtime_exceeded:
        if step == "PostCopy":
            bound = _post_copy_bound(rules)
            if bound is not None and (limit is None or bound <= limit):
                return Choice(step, predict(_post_copy(rules)), reason, (
                    f"{why}; migrating with post-copy allowed: the pause is at most "
                    f"{bound * 1000:.0f} ms whatever the rate"))
        elif step == "Allow":
            return Choice(step, plain, reason, f"{why}; allowed by the policy: migrating "
                          "without a downtime prediction")
    return Choice("Abort", plain, reason, f"{why}; not migrating until its dirty rate is known "
                  "(nor stopping or failing it)")


def choose(vmi: VMIInfo, rules: Rules, estimator: Estimator, node_bandwidth: float | None,
           concurrency: int, metrics_source: bool = True) -> Choice:
    """``metrics_source``: whether the operator has one (only says why a rate is unknown)."""
    limit = rules.max_downtime

    def predict(r: Rules) -> Prediction:
        return estimator.transfer(vmi, r, node_bandwidth, concurrency)

    plain = predict(rules)
    if vmi.dirty_rate is None and rate_matters(limit, rules.on_downtime_exceeded):
        limits = f"maxDowntime {limit * 1000:.0f} ms" if limit else "onDowntimeExceeded"
        return _unknown_rate(rules, plain, predict, (
            f"dirty rate unknown ({unknown_rate_cause(metrics_source)}): no prediction can "
            f"hold {limits}"))
    if _fits(plain, limit):
        return Choice(MIGRATE, plain)
    reason = DOWNTIME_EXCEEDED if plain.converges else NOT_CONVERGING
    why = _describe(plain, limit)
    for step in rules.on_downtime_exceeded:
        if step == "AutoConverge":
            # The "-autoconverge" KubeVirt policy: allowAutoConverge, the rest as rendered.
            p = predict(dataclasses.replace(rules, allow_auto_converge=True))
            if _fits(p, limit):
                return Choice(step, p, reason, f"{why}; migrating with auto-converge "
                              f"(predicted {p.downtime * 1000:.0f} ms)")
        elif step == "PostCopy":
            p = predict(_post_copy(rules))
            if _fits(p, limit):
                return Choice(step, p, reason, f"{why}; migrating in post-copy mode "
                              f"(predicted {p.downtime * 1000:.0f} ms)")
        elif step == "QuickMigration":
            return Choice(step, plain, reason, f"{why}; quick migration instead (stop, move, "
                          "start)")
        elif step == "Allow":
            return Choice(step, plain, reason, f"{why}; allowed by the policy, the breach is "
                          "recorded")
        elif step == "Fail":
            return Choice(step, plain, reason, why)
        elif step == "Abort":
            break
    return Choice("Abort", plain, reason, f"{why}; not migrating now, will retry")
