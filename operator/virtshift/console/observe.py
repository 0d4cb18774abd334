"""Read-only views of a cluster for people at a terminal: the plan (the operator's own planner
on a snapshot of the live cluster), and what drains, policies and migrations are doing.

Nothing here writes to the API server: the plan's snapshot comes from list+watch caches
(``k8s.cluster.Cluster``) and is handed to ``domain.drain.plan_drain`` with ``dryRun``.
Everything reported comes from the cluster's objects (NodeDrain and MigrationPolicy status,
VMIMs and their phaseTransitionTimestamps, VMIs), never from the operator's process.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from virtshift.api.nodedrain import NodeDrainStatus
from virtshift.domain.drain import plan_drain
from virtshift.domain.eta import Estimator
from virtshift.domain.naming import label_value
from virtshift.k8s import rest, views
from virtshift.k8s.cluster import Cluster, ClusterClock
from virtshift.k8s.informer import key_of
from virtshift.k8s.kubevirt_metrics import MetricsSource
from virtshift.k8s.rest import JSON, KubeClient

PLAN_NAME = "virtshift-plan"  # the in-memory dry-run NodeDrain's name (never created)
FINAL = ("Succeeded", "Failed")


def clock_for(kube: KubeClient, time_scale: float) -> ClusterClock:
    """The cluster's clock: with a time scale (simulated clusters), anchored as the operator's
    is, on the KubeVirt CR's creationTimestamp."""
    if time_scale == 1.0:
        return ClusterClock()
    kvs = kube.items(rest.KUBEVIRTS)
    epoch = views.parse_time(kvs[0]["metadata"]["creationTimestamp"]) if kvs else None
    return ClusterClock(time_scale, epoch)


@dataclass
class Plan:
    status: NodeDrainStatus
    now: dt.datetime
    spec: JSON

    def wire(self) -> JSON:
        return {"spec": self.spec, "now": self.now.isoformat(), "status": self.status.wire()}


def make_plan(kube: KubeClient, node: str | None = None, selector: str | None = None,
              policy: str | None = None, estimator: Estimator | None = None,
              metrics_source: str | None = None, time_scale: float = 1.0) -> Plan:
    """What a NodeDrain with this spec and ``dryRun: true`` would plan now."""
    spec: JSON = {"dryRun": True}
    if node:
        spec["nodeName"] = node
    else:
        spec["nodeSelector"] = {"matchLabels": _parse_selector(selector or "")}
    if policy:
        spec["policyRef"] = {"name": policy}
    cluster = Cluster(kube, clock_for(kube, time_scale), estimator or Estimator())
    cluster.start()
    try:
        if metrics_source:
            source = MetricsSource(metrics_source, interval=5.0, now=cluster.clock.now)
            source.scrape()
            cluster.metrics = source
        drain = {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
                 "metadata": {"name": PLAN_NAME, "uid": "", "generation": 1}, "spec": spec}
        snapshot = cluster.snapshot(drain)
        decision = plan_drain(snapshot)
        assert not decision.changes_cluster, "a dry run never changes the cluster"
        return Plan(decision.status, snapshot.now, spec)
    finally:
        cluster.stop()


def _parse_selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--selector takes key=value[,key=value], not {part!r}")
        out[key.strip()] = value.strip().lstrip("=")
    if not out:
        raise ValueError("--selector is empty")
    return out


# -- what is happening ----------------------------------------------------------------------


@dataclass
class Attempt:
    """One VMIM, from its phaseTransitionTimestamps."""

    name: str
    attempt: int
    phase: str
    start: dt.datetime | None
    end: dt.datetime | None
    source: str | None
    target: str | None
    failure: str | None
    aborted: bool
    observed_downtime_ms: int | None = None

    @property
    def outcome(self) -> str:
        if self.phase == "Succeeded":
            return "succeeded"
        if self.phase == "Failed":
            return "aborted" if self.aborted else "failed"
        return "in-flight"


@dataclass
class VMHistory:
    namespace: str
    name: str
    attempts: list[Attempt] = field(default_factory=list)
    entry: JSON = field(default_factory=dict)  # the drain's status.vms entry, if any
    memory: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def attempt_of(obj: JSON) -> Attempt:
    meta, status = obj["metadata"], obj.get("status") or {}
    stamps = {t["phase"]: views.parse_time(t["phaseTransitionTimestamp"])
              for t in status.get("phaseTransitionTimestamps") or []}
    state = status.get("migrationState") or {}
    phase = status.get("phase") or "Pending"
    info = views.migration_info(obj)
    aborted = bool(state.get("abortRequested")) or any(
        c.get("type") == "migrationAbortRequested" for c in status.get("conditions") or [])
    return Attempt(
        name=meta["name"], attempt=info.attempt, phase=phase,
        start=stamps.get("Pending") or views.parse_time(meta.get("creationTimestamp")),
        end=stamps.get(phase) if phase in FINAL else None,
        source=info.source or (meta.get("labels") or {}).get(views.SOURCE_LABEL),
        target=info.target, failure=info.failure, aborted=aborted)


def drain_migrations(kube: KubeClient, drain: JSON) -> list[JSON]:
    """The VMIMs of this NodeDrain (its label, and its UID where they carry it)."""
    name, uid = drain["metadata"]["name"], drain["metadata"].get("uid")
    return [m for m in kube.items(rest.VMIMS,
                                  label_selector=f"{views.DRAIN_LABEL}={label_value(name)}")
            if (m["metadata"].get("annotations") or {}).get(views.DRAIN_UID_ANNOTATION,
                                                            uid) == uid]


def histories(kube: KubeClient, drain: JSON) -> list[VMHistory]:
    """Per VM of the drain: its status entry and every migration attempt, oldest first."""
    vmis = {key_of(v): v for v in kube.items(rest.VMIS)}
    out: dict[str, VMHistory] = {}
    for e in (drain.get("status") or {}).get("vms") or []:
        h = out.setdefault(f"{e['namespace']}/{e['name']}", VMHistory(e["namespace"], e["name"]))
        h.entry = e
    for m in drain_migrations(kube, drain):
        ns, vmi = m["metadata"]["namespace"], (m.get("spec") or {}).get("vmiName", "")
        h = out.setdefault(f"{ns}/{vmi}", VMHistory(ns, vmi))
        h.attempts.append(attempt_of(m))
    for h in out.values():
        h.attempts.sort(key=lambda a: (a.start or dt.datetime.min.replace(tzinfo=dt.UTC),
                                       a.attempt))
        if h.entry.get("observedDowntimeMs") is not None and h.attempts and \
                h.attempts[-1].phase == "Succeeded":
            h.attempts[-1].observed_downtime_ms = h.entry["observedDowntimeMs"]
        vmi = vmis.get(h.key)
        if vmi is not None:
            h.memory = views.vmi_info(vmi).memory
    return sorted(out.values(), key=lambda h: (
        min((a.start for a in h.attempts if a.start), default=dt.datetime.max.replace(
            tzinfo=dt.UTC)), h.key))


@dataclass
class Transfer:
    """Data remaining of a migrating VMI, from virt-handler's metrics, and its drain rate."""

    remaining: float
    rate: float | None


class TransferWatch:
    """kubevirt_vmi_migration_data_remaining_bytes per VMI, sampled on every refresh."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.last: dict[str, tuple[float, float]] = {}  # key -> (remaining, cluster seconds)
        self.now: dict[str, Transfer] = {}

    def sample(self, time_scale: float = 1.0) -> dict[str, Transfer]:
        if not self.url:
            return {}
        import urllib.request

        from virtshift.k8s.kubevirt_metrics import parse

        try:
            with urllib.request.urlopen(self.url, timeout=3) as resp:
                parsed = parse(resp.read().decode())
        except OSError:
            return self.now
        t = time.monotonic()
        out = {}
        for key, samples in parsed.remaining.items():
            value, stamp = samples[-1]
            # virt-handler's own sample time (cluster seconds) when it gives one: a refresh
            # that sees the same sample again, or a new pre-copy round (more remaining), keeps
            # the last rate rather than showing none.
            at = stamp.timestamp() if stamp is not None else t * time_scale
            prev = self.last.get(key)
            rate = self.now[key].rate if key in self.now else None
            if prev and at > prev[1] and value < prev[0]:
                rate = (prev[0] - value) / (at - prev[1])
            out[key] = Transfer(value, rate)
            if prev is None or at > prev[1]:
                self.last[key] = (value, at)
        self.now = out
        return out


def in_flight(kube: KubeClient) -> list[tuple[JSON, Attempt]]:
    """Every unfinished VMIM in the cluster (virtshift's or not), oldest first."""
    out = [(m, attempt_of(m)) for m in kube.items(rest.VMIMS)
           if (m.get("status") or {}).get("phase") not in FINAL]
    return sorted(out, key=lambda p: (p[1].start or dt.datetime.min.replace(tzinfo=dt.UTC)))


def drain_done(drain: JSON) -> bool:
    return (drain.get("status") or {}).get("phase") in ("Drained", "Stalled", "Planned",
                                                        "Conflict")


def counts(drain: JSON) -> dict[str, int]:
    return (drain.get("status") or {}).get("counts") or {}


def progress(drain: JSON) -> tuple[int, int]:
    """(VMs done, VMs in all)."""
    c = counts(drain)
    return (c.get("succeeded", 0) + c.get("failed", 0) + c.get("skipped", 0), c.get("total", 0))


def waiting(drain: JSON) -> list[JSON]:
    """VM entries that wait (Pending or Waiting) with the reason."""
    return [v for v in (drain.get("status") or {}).get("vms") or []
            if v.get("phase") in ("Pending", "Waiting")]
