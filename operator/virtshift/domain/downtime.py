"""Before a migration starts: will it converge within the policy's maxDowntime at the bandwidth
it will get? If not (the predicted pause exceeds maxDowntime, or the VM would not converge),
walk the policy's ladder (onDowntimeExceeded) to the first step that works. A migration
predicted to fit runs as it is: the ladder is never consulted then.

Each step is predicted with the settings KubeVirt will apply to it: the "-autoconverge" and
"-postcopy" KubeVirt policies (``policy.render``) are the policy's own plus one flag, so the
PostCopy step switches at the completion timeout the policy sets (completionTimeoutPerGiB, else
the KubeVirt CR's), as KubeVirt does (shouldTriggerTimeout / shouldAssistMigrationToComplete).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from virtshift.domain.eta import Estimator
from virtshift.domain.physics import Prediction
from virtshift.domain.rules import Rules
from virtshift.domain.views import VMIInfo

MIGRATE = "Migrate"
DOWNTIME_EXCEEDED = "DowntimeExceeded"
NOT_CONVERGING = "NotConverging"


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


def choose(vmi: VMIInfo, rules: Rules, estimator: Estimator, node_bandwidth: float | None,
           concurrency: int) -> Choice:
    limit = rules.max_downtime

    def predict(r: Rules) -> Prediction:
        return estimator.transfer(vmi, r, node_bandwidth, concurrency)

    plain = predict(rules)
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
