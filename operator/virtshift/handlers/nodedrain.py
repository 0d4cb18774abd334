"""kopf handlers for NodeDrain: a daemon per drain that reconciles on every relevant change,
and a deletion handler that ends maintenance."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

import kopf

from virtshift import logs
from virtshift.api.nodedrain import NodeDrain, NodeDrainStatus, NodePhase, VMPhase
from virtshift.api.units import parse_duration
from virtshift.domain import outcome
from virtshift.domain.drain import (
    Decision,
    NewMigration,
    finalize_drain,
    parse_stamp,
    plan_drain,
    settle,
)
from virtshift.handlers import metrics, runtime
from virtshift.handlers import runtime as runtime_module
from virtshift.handlers.runtime import (
    DOWNTIME,
    DRAIN_REMAINING,
    DRAIN_VMS,
    MIGRATIONS_CREATED,
    MODEL,
    OBSERVED,
    OUTCOMES,
    PREDICTED,
)
from virtshift.k8s.rest import JSON, TRANSPORT_ERRORS, ApiError

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "virtshift.io", "v1alpha1", "nodedrains"


def reconcile(name: str, stopped: kopf.DaemonStopped | None = None) -> float | None:
    """One pass; the cluster seconds after which the next is due though nothing changes."""
    rt = runtime.get()
    if not rt.cluster.synced():
        # Never decide on a partial view: a node whose VMIs are not in the cache yet would
        # look empty, and be reported Drained.
        log.info("NodeDrain %s: waiting for caches (%s)", name,
                 ", ".join(rt.cluster.unsynced()))
        return None
    drain = rt.drain(name)
    if drain is None or drain["metadata"].get("deletionTimestamp"):
        return None
    model = NodeDrain.model_validate(drain)
    pods = []
    if model.spec.evict_pods and not model.spec.dry_run:
        nodes = [model.spec.node_name] if model.spec.node_name else [
            n.name for n in (model.status.nodes if model.status else None) or []
            if n.phase == NodePhase.DRAINING]
        pods = rt.actions.pods_on([n for n in nodes if n])
    with rt.cluster.admission:
        # kopf stops the daemon and runs the delete handler in parallel; under this lock the
        # delete handler either sees everything we did, or we do nothing.
        if stopped:
            return None
        snapshot = dataclasses.replace(rt.cluster.snapshot(drain, rt.blocked_pods[name], pods),
                                       reaction_seconds=rt.reaction(name))
        decision = plan_drain(snapshot)
        applied = rt.actions.apply(drain, decision)
        rt.blocked_pods[name] = applied.blocked
        # The status says what the writes did, not what was meant (outcome).
        rt.failures[name] = outcome.remember(rt.failures[name], applied.failures,
                                             applied.skipped, snapshot.now)
        decision = settle(snapshot, decision, rt.failures[name])
    rt.declare(name, frozenset(n.name for n in decision.status.nodes or []),
               frozenset(snapshot.vmis) | frozenset(
                   f"{e.namespace}/{e.name}" for e in decision.status.vms or []))
    stored = rt.actions.write_status(drain, decision.status.wire())
    if stored:
        rt.remember(stored)
    for kind, reason, message in decision.events:
        rt.actions.event(drain, kind, reason, message)
        _count(reason)
    created = [m for m in decision.create
               if f"create {m.namespace}/{m.name}" not in rt.failures[name]]
    _log_changes(model.status or NodeDrainStatus(), decision, created)
    MIGRATIONS_CREATED.labels(name).inc(len(created))
    _drain_metrics(rt, name, model, decision)
    return decision.recheck_after


def _log_changes(before: NodeDrainStatus, decision: Decision,
                 created: list[NewMigration]) -> None:
    """One line per migration created and per VM whose phase changed, with the drain (from
    the context), the VM and the migration as fields."""
    for m in created:
        log.info("migration created (attempt %d, from %s)", m.attempt, m.source,
                 extra={"vm": f"{m.namespace}/{m.vmi}", "migration": m.name,
                        "policy": m.policy, "node": m.source})
    old = {(v.namespace, v.name): v for v in before.vms or []}
    for v in decision.status.vms or []:
        prev = old.get((v.namespace, v.name))
        if prev is not None and prev.phase == v.phase:
            continue
        log.info("VM %s%s%s", str(v.phase).lower(), f" ({v.reason})" if v.reason else "",
                 f" -> {v.target_node}" if v.target_node else "",
                 extra={"vm": f"{v.namespace}/{v.name}", "migration": v.migration,
                        "node": v.source_node})


def _drain_metrics(rt: runtime.Runtime, name: str, model: NodeDrain, decision: Decision) -> None:
    """Per-drain gauges, and each finished move's predicted downtime once."""
    status = decision.status
    counts = status.counts
    if counts:
        for state, value in counts.wire().items():
            DRAIN_VMS.labels(name, state).set(value)
        done = counts.succeeded + counts.failed + counts.skipped
        metrics.DRAIN_PROGRESS.labels(name).set(done / counts.total if counts.total else 1.0)
    DRAIN_REMAINING.labels(name).set(status.planned_seconds or 0)
    if eta := parse_stamp(status.eta or status.completion_time):
        metrics.DRAIN_ETA.labels(name).set(eta.timestamp())
    started = parse_stamp(status.start_time)
    if model.spec.deadline and started:
        metrics.DRAIN_DEADLINE.labels(name).set(
            started.timestamp() + parse_duration(model.spec.deadline))
    # Each finished move once (by VM): its observation, when the downtime source
    # has one (it may come a pass after the move), and its prediction.
    seen = rt.predictions_counted[name]
    for v in status.vms or []:
        if v.phase != VMPhase.SUCCEEDED:
            continue
        move = f"{v.namespace}/{v.name}"  # a VM leaves once per drain
        if v.observed_downtime_ms is not None and (OBSERVED, move) not in seen:
            seen.add((OBSERVED, move))
            DOWNTIME.labels(OBSERVED, v.downtime_source or "").observe(
                v.observed_downtime_ms / 1000)
        if v.predicted_downtime_ms is not None and (PREDICTED, move) not in seen:
            seen.add((PREDICTED, move))
            DOWNTIME.labels(PREDICTED, MODEL).observe(v.predicted_downtime_ms / 1000)


def _count(reason: str) -> None:
    if reason == "Migrated":
        OUTCOMES.labels("succeeded").inc()
    elif reason == "MigrationFailed":
        OUTCOMES.labels("failed").inc()
    elif reason == "DowntimeExceeded":
        OUTCOMES.labels("downtime_breach").inc()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10, cancellation_backoff=1.0)
def drain_daemon(stopped: kopf.DaemonStopped, name: str, **_: Any) -> None:
    """Reconcile whenever a migration, VMI, VM or node changes, and every few seconds anyway."""
    rt = runtime.get()
    wake = rt.wake_event(name)
    while not stopped:
        wake.clear()
        metrics.RECONCILES.labels("NodeDrain").inc()
        since = rt.answering(name)
        wait = rt.settings.resync_seconds
        try:
            with logs.context(drain=name):
                recheck = reconcile(name, stopped)
            rt.answered(name, since)
            if recheck is not None:
                wait = min(wait, recheck / rt.settings.time_scale)
        except (ApiError, *TRANSPORT_ERRORS) as exc:
            # The API server failing (after the client's retries) is expected under faults: one
            # line, not a traceback on every pass.
            metrics.RECONCILE_ERRORS.labels("NodeDrain").inc()
            log.warning("reconciling NodeDrain %s failed (%s); retrying", name, exc,
                        extra={"drain": name})
            stopped.wait(1.0)
        except Exception:
            metrics.RECONCILE_ERRORS.labels("NodeDrain").inc()
            log.exception("reconciling NodeDrain %s failed; retrying", name,
                          extra={"drain": name})
            stopped.wait(1.0)
        wake.wait(wait)


RETRY_SECONDS = 5.0  # between attempts to end maintenance after a write failed


# backoff: kopf waits 60 s by default after an exception other than TemporaryError (an API
# error while reading or writing status); ending maintenance should not.
@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=RETRY_SECONDS)
def drain_deleted(name: str, body: kopf.Body, runtime: dt.timedelta | None = None,
                  **_: Any) -> None:
    """End maintenance: abort our unfinished migrations, restart what a quick migration
    stopped, and uncordon what we cordoned once the aborts have ended; the status says
    Terminating meanwhile. The finalizer stays (kopf.TemporaryError) until all of it is done:
    while an abort is still under way, and after any failed write (an uncordon, a VM start),
    which an Event reports before the next try.

    ``runtime``: kopf's time since this handler first ran (kept across operator restarts)."""
    rt = runtime_module.get()  # (the module: ``runtime`` is kopf's argument here)
    if not rt.cluster.synced():
        raise kopf.TemporaryError("waiting for the caches to sync", delay=1)
    drain: JSON = rt.drain(name) or dict(body)
    waited = runtime.total_seconds() if runtime else 0.0
    with rt.cluster.admission:
        snapshot = rt.cluster.snapshot(drain)
        decision = finalize_drain(snapshot, waited)
        applied = rt.actions.apply(drain, decision)
    stored = rt.actions.write_status(drain, decision.status.wire())
    if stored:
        rt.remember(stored)
    for kind, reason, message in decision.events:
        rt.actions.event(drain, kind, reason, message)
    if decision.cancel:
        rt.actions.event(drain, "Normal", "Cancelled",
                         f"aborting {len(decision.cancel)} unfinished migrations")
    if applied.failed:
        message = (f"maintenance not ended yet, retrying in {RETRY_SECONDS:g}s; failed: "
                   + "; ".join(applied.failed[:5]))
        rt.actions.event(drain, "Warning", "CleanupFailed", message)
        raise kopf.TemporaryError(message, delay=RETRY_SECONDS)
    if decision.hold:
        raise kopf.TemporaryError(decision.hold, delay=1)
    rt.forget(name)
