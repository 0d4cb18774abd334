"""What became of a decision's writes, brought back into the NodeDrain's status.

The planner decides from intent ("create this migration"); the API server may refuse a write
(a webhook, RBAC, a name someone else holds) or it may not be tried at all (nothing leaves a
node whose cordon failed). The status must say what happened: ``corrected`` turns a VM's
entry into what its failed step left it as, ``refused_cordons`` says which nodes are not
cordoned, and a step that keeps failing pass after pass for WRITE_STALL_SECONDS makes the
drain Stalled (``persistent``) until it goes through.

Steps are named as k8s.actions names them: "<verb> <namespace/name>" ("<verb> <node>" for
a node), so the same step has the same name on every pass (deterministic names).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from virtshift.api.nodedrain import VMEntry, VMPhase

# Reasons (VM entries, the Cordoned and Stalled conditions).
CREATE_FAILED = "CreateFailed"
STOP_FAILED = "StopFailed"
START_FAILED = "StartFailed"
CORDON_FAILED = "CordonFailed"
WRITE_FAILED = "WriteFailed"

# Cluster seconds a step may fail on every pass before the drain is Stalled by it.
WRITE_STALL_SECONDS = 120.0

_REASONS = {"create": CREATE_FAILED, "stop": STOP_FAILED, "start": START_FAILED,
            "cordon": CORDON_FAILED}


@dataclass(frozen=True)
class StepFailure:
    """A step the API server refused (or, ``skipped``, one not tried because an earlier step
    failed), with the API's message and since when it has failed on every pass."""

    message: str
    since: dt.datetime
    skipped: bool = False


def verb(step: str) -> str:
    return step.split(" ", 1)[0]


def reason_of(step: str) -> str:
    return _REASONS.get(verb(step), WRITE_FAILED)


def remember(previous: Mapping[str, StepFailure], failed: Mapping[str, str],
             skipped: Mapping[str, str], now: dt.datetime) -> dict[str, StepFailure]:
    """This pass's failures, each dated from the first of an unbroken run of passes on which
    it failed (a step that went through, or was not decided, starts afresh)."""
    out = {step: StepFailure(message, previous[step].since if step in previous
                             and not previous[step].skipped else now)
           for step, message in failed.items()}
    out.update({step: StepFailure(message, now, skipped=True)
                for step, message in skipped.items() if step not in out})
    return out


def persistent(failures: Mapping[str, StepFailure], now: dt.datetime
               ) -> list[tuple[str, StepFailure]]:
    """Steps that have failed on every pass for WRITE_STALL_SECONDS, longest first."""
    old = [(step, f) for step, f in failures.items() if not f.skipped
           and (now - f.since).total_seconds() >= WRITE_STALL_SECONDS]
    return sorted(old, key=lambda it: (it[1].since, it[0]))


def stalled_by(failures: Mapping[str, StepFailure], now: dt.datetime
               ) -> tuple[str, str] | None:
    """(reason, message) of the Stalled condition when a write keeps failing."""
    old = persistent(failures, now)
    if not old:
        return None
    step, f = old[0]
    seconds = round((now - f.since).total_seconds())
    more = f" (and {len(old) - 1} more failing steps)" if len(old) > 1 else ""
    return reason_of(step), f"{step} has failed on every pass for {seconds}s: {f.message}{more}"


def refused_cordons(failures: Mapping[str, StepFailure]) -> dict[str, str]:
    """Node -> the API's message, for each node whose cordon failed in this pass."""
    return {step.split(" ", 1)[1]: f.message for step, f in failures.items()
            if verb(step) == "cordon" and not f.skipped}


def corrected(entry: VMEntry, step: str, failure: StepFailure) -> VMEntry:
    """The VM's entry as its failed (or skipped) step left it: never "Created" or
    "Migrating" for a migration that does not exist, nor stopped for a VM that runs."""
    what = verb(step)
    if failure.skipped:
        return entry.model_copy(update={
            "phase": VMPhase.WAITING, "reason": CORDON_FAILED if "cordon" in failure.message
            else WRITE_FAILED, "message": f"not started: {failure.message}",
            "migration": None, "attempts": _attempts_before(entry, what)})
    if what == "start":  # the VM is stopped: still mid-move, and it must start
        return entry.model_copy(update={"reason": START_FAILED, "message": (
            f"stopped; starting it again failed: {failure.message}")})
    doing = {"create": f"creating migration {step.split('/', 1)[-1]}",
             "stop": "stopping the VM (quick migration)"}.get(what, step)
    return entry.model_copy(update={
        "phase": VMPhase.WAITING, "reason": reason_of(step),
        "message": f"{doing} failed: {failure.message}", "migration": None,
        "attempts": _attempts_before(entry, what)})


def _attempts_before(entry: VMEntry, what: str) -> int | None:
    """A create the API server refused is no attempt."""
    if what != "create" or not entry.attempts:
        return entry.attempts
    return entry.attempts - 1 or None
