"""The operator process's shared parts: caches, actions, wake-ups, metrics."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from virtshift.domain.eta import Estimator
from virtshift.domain.outcome import StepFailure
from virtshift.k8s.actions import Actions
from virtshift.k8s.cluster import Cluster, ClusterClock
from virtshift.k8s.downtime import DowntimeSource
from virtshift.k8s.kubevirt_metrics import MetricsSource
from virtshift.k8s.rest import JSON, KubeClient
from virtshift.k8s.views import DRAIN_NAME_ANNOTATION, parse_time

METRICS_INTERVAL = 5.0  # cluster seconds between scrapes of the metrics source
REACTIONS = 20  # a drain's recent answers to events, of which reaction() takes the slowest
# Wall seconds planned for an answer at the least: a drain's first answers, or those of a
# quiet spell, come faster than its passes under load (0.08 to 0.3 s on the benchmark
# machine: 2 cores, with the API server and the simulator), and planning on them would queue
# too little and stagger starts whose wait then ends late.
TYPICAL_ANSWER_SECONDS = 0.2
DRAIN_VMS = Gauge("virtshift_drain_vms", "VMs of a NodeDrain by state", ["drain", "state"])
DRAIN_REMAINING = Gauge("virtshift_drain_remaining_seconds",
                        "Predicted seconds until a NodeDrain completes", ["drain"])
MIGRATIONS_CREATED = Counter("virtshift_migrations_created_total",
                             "VirtualMachineInstanceMigrations created", ["drain"])
OUTCOMES = Counter("virtshift_migration_outcomes_total", "Finished VM moves by outcome",
                   ["outcome"])
DOWNTIME = Histogram("virtshift_migration_downtime_seconds",
                     "Downtime of finished moves: kind=observed (measured; source is where: "
                     "--downtime-source, or restartTimestamps for quick migrations) or "
                     "kind=predicted (the planner's pre-copy prediction, source=model)",
                     ["kind", "source"],
                     buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
OBSERVED, PREDICTED, MODEL = "observed", "predicted", "model"


@dataclass
class Settings:
    kubeconfig: str | None = None
    time_scale: float = 1.0
    estimator: Estimator = field(default_factory=Estimator)
    resync_seconds: float = 2.0  # wall seconds between reconciles without any event
    # Prometheus text URL with KubeVirt's virt-handler metrics (dirty rates, data remaining).
    metrics_source: str | None = None
    downtime_source: DowntimeSource | None = None  # observed downtimes; None: none observed
    identity: str = "virtshift"  # this replica: the Events' reportingInstance


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        kube = KubeClient.from_kubeconfig(settings.kubeconfig)
        self.cluster = Cluster(kube, ClusterClock(settings.time_scale), settings.estimator,
                               downtime=settings.downtime_source)
        if settings.metrics_source:
            # virt-handler samples every 5 s (of cluster time): scrape as often, in wall time.
            cluster = self.cluster
            self.cluster.metrics = MetricsSource(
                settings.metrics_source, interval=max(0.1, METRICS_INTERVAL / settings.time_scale),
                now=lambda: cluster.clock.now())
        self.actions = Actions(self.cluster)
        self.actions.events.instance = settings.identity
        self.blocked_pods: dict[str, dict[str, str]] = defaultdict(dict)
        # drain -> the steps its last pass could not write, dated (domain.outcome.remember).
        self.failures: dict[str, dict[str, StepFailure]] = defaultdict(dict)
        self._wake: dict[str, threading.Event] = defaultdict(threading.Event)
        # drain -> (its nodes, the VM keys it follows), from its last pass (declare).
        self._interest: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        # drain -> when the first event its next pass answers arrived (monotonic), and the
        # wall seconds its recent passes took to answer one (reaction).
        self._woken_at: dict[str, float] = {}
        self._answers: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=REACTIONS))
        self._lock = threading.Lock()
        # drain -> (kind, VM move) whose downtime the histogram already has
        self.predictions_counted: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._metrics_installed = False

    def start(self) -> None:
        """Idempotent: kopf retries a failed start-up handler."""
        if self._on_change not in self.cluster.listeners:
            self.cluster.listeners.append(self._on_change)
        self.cluster.start()
        if not self._metrics_installed:  # after the caches loaded: what was there is not new
            from virtshift.handlers import metrics

            metrics.install(self.cluster)
            self._metrics_installed = True
        if self.settings.time_scale != 1.0:
            kv = self.cluster.kubevirt()
            epoch = parse_time(kv["metadata"]["creationTimestamp"]) if kv else None
            self.cluster.clock = ClusterClock(self.settings.time_scale, epoch)

    def stop(self) -> None:
        self.cluster.stop()

    def wake_event(self, drain: str) -> threading.Event:
        with self._lock:
            return self._wake[drain]

    def _woken(self, drain: str) -> None:
        with self._lock:
            self._woken_at.setdefault(drain, time.monotonic())
        self.wake_event(drain).set()

    def answering(self, drain: str) -> float | None:
        """A pass begins: when the earliest event it answers arrived (None: a resync)."""
        with self._lock:
            return self._woken_at.pop(drain, None)

    def answered(self, drain: str, since: float | None) -> None:
        """The pass's writes have landed: how long after its event."""
        if since is not None:
            with self._lock:
                self._answers[drain].append(time.monotonic() - since)

    def reaction(self, drain: str) -> float:
        """Cluster seconds the drain takes to answer an event, the slowest of its recent
        passes (a typical answer at the least): what the migrations queued in KubeVirt must
        cover (a slot idles whenever an answer comes later than the queue lasts)."""
        with self._lock:
            answers = self._answers.get(drain) or ()
            slowest = max(answers, default=0.0)
        return max(slowest, TYPICAL_ANSWER_SECONDS) * self.settings.time_scale

    def declare(self, drain: str, nodes: frozenset[str], keys: frozenset[str]) -> None:
        """What a drain's last pass looked at: the events about other nodes and VMs need not
        wake it (its resync still comes)."""
        with self._lock:
            self._interest[drain] = (nodes, keys)

    def _on_change(self, kind: str, obj: JSON) -> None:
        """Wake the drains an event concerns: VMIs, VMs and pods by their node and key, a
        node by its name, one of our migrations its own drain (and every drain when it ends,
        since it frees a slot); anything else every drain."""
        meta = obj["metadata"]
        if kind == "vmim":
            drain = (meta.get("annotations") or {}).get(DRAIN_NAME_ANNOTATION)
            ended = (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if drain and not ended:
                self._woken(drain)
                return
        routed = _route(kind, obj)
        with self._lock:
            woken = [name for name in self._wake
                     if routed is None or (seen := self._interest.get(name)) is None
                     or routed[0] in seen[0] or routed[1] in seen[1]]
        for name in woken:
            self._woken(name)

    def drain(self, name: str) -> JSON | None:
        return self.cluster.drains.get(name)

    def remember(self, obj: JSON) -> None:
        self.cluster.drains.put(obj)

    def forget(self, name: str) -> None:
        with self._lock:
            self._wake.pop(name, None)
            self._interest.pop(name, None)
            self._woken_at.pop(name, None)
            self._answers.pop(name, None)
        self.blocked_pods.pop(name, None)
        self.failures.pop(name, None)
        for state in ("total", "pending", "migrating", "succeeded", "failed", "skipped"):
            with contextlib.suppress(KeyError):  # never reported for this drain
                DRAIN_VMS.remove(name, state)
        self.predictions_counted.pop(name, None)
        from virtshift.handlers import metrics

        for gauge in (DRAIN_REMAINING, metrics.DRAIN_PROGRESS, metrics.DRAIN_ETA,
                      metrics.DRAIN_DEADLINE):
            with contextlib.suppress(KeyError):
                gauge.remove(name)


def _route(kind: str, obj: JSON) -> tuple[str, str] | None:
    """(node, VM key) an event is about, or None when it may concern any drain."""
    meta = obj["metadata"]
    key = f"{meta.get('namespace')}/{meta['name']}"
    if kind == "vmi":
        return (obj.get("status") or {}).get("nodeName") or "", key
    if kind == "vm":
        return "", key
    if kind == "pod":
        labels = meta.get("labels") or {}
        vm = labels.get("vm.kubevirt.io/name") or (meta.get("annotations") or {}).get(
            "kubevirt.io/domain") or ""
        return (obj.get("spec") or {}).get("nodeName") or "", f"{meta.get('namespace')}/{vm}"
    if kind == "node":
        return meta["name"], ""
    if kind == "vmim":
        return "", f"{meta.get('namespace')}/{(obj.get('spec') or {}).get('vmiName')}"
    return None


_runtime: Runtime | None = None


def configure(settings: Settings) -> Runtime:
    global _runtime
    _runtime = Runtime(settings)
    return _runtime


def get() -> Runtime:
    if _runtime is None:
        raise RuntimeError("virtshift runtime not configured (virtshift run sets it up)")
    return _runtime
