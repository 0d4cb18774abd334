"""The operator's Prometheus metrics about migrations, drains and policies.

Every label is bounded: policy names, node names, drain names (objects people create, a few
at a time), outcome and reason words from a fixed list; never a VM or migration name. Numbers
come from the cluster's objects (the VMIMs' phases and phaseTransitionTimestamps) and from the
planner's decision, never parsed out of messages.

* ``virtshift_migrations_started_total{policy}``, ``..._succeeded_total{policy}``,
  ``..._failed_total{policy, reason}``: virtshift's own VMIMs (label ``virtshift.io/drain``)
  seen created, succeeding and failing by this process (a restart counts from zero; migrations
  already finished when the caches loaded are not counted again).
* ``virtshift_migrations_queued{source_node}``: ours waiting in KubeVirt's queue.
* ``virtshift_migrations_in_flight{source_node, target_node}``: running migrations of
  virtshift now, read from the cache at every scrape (target "" while it is not scheduled).
* ``virtshift_migration_duration_seconds{policy, outcome}``: creation to end, cluster seconds.
* ``virtshift_migration_bytes_total{source_node}``: guest memory of VMs whose migration
  succeeded (what ``status.bytesMoved`` of a NodeDrain counts).
* the downtime histogram ``virtshift_migration_downtime_seconds{kind, source}`` (runtime):
  ``kind="observed"`` from ``--downtime-source`` only, ``kind="predicted"`` the planner's
  prediction for the same moves (``source="model"``).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from virtshift.domain.views import MigrationInfo
from virtshift.k8s import views
from virtshift.k8s.rest import JSON

if TYPE_CHECKING:
    from virtshift.k8s.cluster import Cluster

NO_POLICY = "none"
MIGRATIONS_STARTED = Counter("virtshift_migrations_started_total",
                             "Live migrations virtshift created (VMIMs), by policy", ["policy"])
MIGRATIONS_SUCCEEDED = Counter("virtshift_migrations_succeeded_total",
                               "virtshift's live migrations that succeeded, by policy",
                               ["policy"])
MIGRATIONS_FAILED = Counter("virtshift_migrations_failed_total",
                            "virtshift's live migrations that failed, by policy and reason "
                            "(Aborted, ProgressTimeout, CompletionTimeout, TargetNotReady, "
                            "Other)", ["policy", "reason"])
MIGRATION_DURATION = Histogram("virtshift_migration_duration_seconds",
                               "Live migrations from creation to end, cluster seconds",
                               ["policy", "outcome"],
                               buckets=(5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1200, 3600))
BYTES_MOVED = Counter("virtshift_migration_bytes_total",
                      "Guest memory of VMs moved by succeeded live migrations, by source node",
                      ["source_node"])
DRAIN_PROGRESS = Gauge("virtshift_drain_progress_ratio",
                       "VMs done (succeeded, failed or skipped) out of all, per NodeDrain",
                       ["drain"])
DRAIN_ETA = Gauge("virtshift_drain_eta_timestamp_seconds",
                  "When a NodeDrain is predicted to finish (Unix time, cluster clock)", ["drain"])
DRAIN_DEADLINE = Gauge("virtshift_drain_deadline_timestamp_seconds",
                       "When a NodeDrain's spec.deadline passes (Unix time, cluster clock)",
                       ["drain"])
RECONCILES = Counter("virtshift_reconciles_total", "Reconcile passes, by kind", ["kind"])
RECONCILE_ERRORS = Counter("virtshift_reconcile_errors_total",
                           "Reconcile passes that raised, by kind", ["kind"])
WINDOW_CLOSES_IN = Gauge("virtshift_policy_window_closes_in_seconds",
                         "Cluster seconds until a MigrationPolicy's open window closes "
                         "(absent while no window is open or the policy has no windows)",
                         ["policy"])
WINDOW_OPEN = Gauge("virtshift_policy_window_open",
                    "1 when a MigrationPolicy lets migrations start now", ["policy"])
POLICY_WORK_LEFT = Gauge("virtshift_policy_vms_waiting",
                         "VMs of NodeDrains governed by a MigrationPolicy not moved yet "
                         "(Pending, Waiting or Migrating)", ["policy"])

FAILURE_REASONS = ("Aborted", "ProgressTimeout", "CompletionTimeout", "TargetNotReady", "Other")


def failure_reason(info: MigrationInfo) -> str:
    """One of FAILURE_REASONS for a failed migration (bounded, for a label)."""
    if info.aborted:
        return info.aborted if info.aborted in FAILURE_REASONS else "Aborted"
    text = (info.failure or "").lower()
    if "stuck for" in text:
        return "ProgressTimeout"
    if "not completed after" in text:
        return "CompletionTimeout"
    if "abort" in text or "cancel" in text:
        return "Aborted"
    if "with no reason from kubevirt" in text:
        return "TargetNotReady"
    return "Other"


def _policy(info: MigrationInfo) -> str:
    return info.policy or NO_POLICY


class MigrationTracker:
    """Counts virtshift's migrations from the VMIM cache's events: each VMIM (by UID) is
    counted once as started and once as finished. Whatever the cache held when the tracker
    was made is remembered, not counted (make it once the caches have loaded)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        present = cluster.vmims.values()
        self.started: set[str] = {o["metadata"].get("uid", "") for o in present}
        self.finished: set[str] = {o["metadata"].get("uid", "") for o in present
                                   if (o.get("status") or {}).get("phase") in ("Succeeded",
                                                                                "Failed")}
        self.lock = threading.Lock()

    def __call__(self, kind: str, obj: JSON) -> None:
        if kind != "vmim":
            return
        labels = obj["metadata"].get("labels") or {}
        if views.DRAIN_LABEL not in labels:
            return
        uid = obj["metadata"].get("uid", "")
        info = views.migration_info(obj)
        with self.lock:
            new_start = uid not in self.started
            self.started.add(uid)
            new_end = info.final and uid not in self.finished
            if info.final:
                self.finished.add(uid)
        if new_start and not info.final:
            MIGRATIONS_STARTED.labels(_policy(info)).inc()
        if not new_end:
            return
        outcome = "succeeded" if info.phase == "Succeeded" else "failed"
        if info.created and info.ended:
            MIGRATION_DURATION.labels(_policy(info), outcome).observe(
                max(0.0, (info.ended - info.created).total_seconds()))
        if outcome == "succeeded":
            MIGRATIONS_SUCCEEDED.labels(_policy(info)).inc()
            vmi = self.cluster.vmis.get(info.vmi_key)
            if vmi is not None:
                BYTES_MOVED.labels(info.source or labels.get(views.SOURCE_LABEL, "")).inc(
                    views.vmi_info(vmi).memory)
        else:
            MIGRATIONS_FAILED.labels(_policy(info), failure_reason(info)).inc()


class InFlightCollector(Collector):
    """virtshift_migrations_in_flight, computed from the VMIM cache at every scrape."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "virtshift_migrations_in_flight",
            "virtshift's live migrations KubeVirt is running (past its queue), by source and "
            "target node", labels=["source_node", "target_node"])
        waiting = GaugeMetricFamily(
            "virtshift_migrations_queued",
            "virtshift's live migrations waiting in KubeVirt's queue (Pending), by source node",
            labels=["source_node"])
        tally: Tally[tuple[str, str]] = Tally()
        queued: Tally[str] = Tally()
        for obj in self.cluster.vmims.values():
            labels = obj["metadata"].get("labels") or {}
            if views.DRAIN_LABEL not in labels:
                continue
            info = views.migration_info(obj)
            if info.final:
                continue
            source = info.source or labels.get(views.SOURCE_LABEL, "")
            if info.queued:
                queued[source] += 1
            else:
                tally[(source, info.target or "")] += 1
        for (source, target), n in sorted(tally.items()):
            family.add_metric([source, target], n)
        for source, n in sorted(queued.items()):
            waiting.add_metric([source], n)
        yield family
        yield waiting


_installed: list[Collector] = []


def install(cluster: Cluster) -> None:
    """Hook the tracker to the cluster's caches (once they have loaded) and register the
    in-flight collector (a new cluster replaces the old)."""
    for old in _installed:
        REGISTRY.unregister(old)
    _installed.clear()
    collector = InFlightCollector(cluster)
    REGISTRY.register(collector)
    _installed.append(collector)
    cluster.listeners.append(MigrationTracker(cluster))
