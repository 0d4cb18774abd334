"""Conditions by the Kubernetes API conventions: lastTransitionTime moves only on a flip."""

from __future__ import annotations

from collections.abc import Sequence

from virtshift.api.common import Condition


def set_condition(
    existing: Sequence[Condition], type_: str, status: bool | str, reason: str, message: str,
    generation: int, now: str,
) -> list[Condition]:
    value = status if isinstance(status, str) else ("True" if status else "False")
    out: list[Condition] = []
    found = False
    for cond in existing:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        since = cond.last_transition_time if cond.status == value else now
        out.append(Condition(type=type_, status=value, reason=reason, message=message,
                             observed_generation=generation, last_transition_time=since))
    if not found:
        out.append(Condition(type=type_, status=value, reason=reason, message=message,
                             observed_generation=generation, last_transition_time=now))
    return out


def get_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or () if c.type == type_), None)

