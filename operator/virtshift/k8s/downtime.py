"""Where observed switch-over downtimes come from: a source configured on ``virtshift run``.

KubeVirt publishes no per-migration downtime (neither on the VMIM nor in virt-handler's
metrics), so virtshift knows a migration's real downtime only when something in the cluster
measures it and says so. Without a source nothing is reported as observed; predictions (from
the pre-copy model) stay predictions. Sources:

* ``annotation=<key>``: an annotation on the VirtualMachineInstanceMigration holding whole
  milliseconds, written by whatever measures it (a hook reading libvirt's completed-job
  statistics, ``virDomainGetJobStats`` ``downtime``, or a simulator).
* ``prometheus=<url>`` with a metric name: a Prometheus text endpoint (an exporter's
  /metrics, or a federate URL) with a gauge in seconds labelled ``namespace`` and the
  migration's name (label ``migration`` unless told otherwise).

Only a Succeeded migration is asked: a downtime is what a completed switch-over cost.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections import OrderedDict
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from virtshift.domain.views import DowntimeObservation
from virtshift.k8s.rest import JSON

log = logging.getLogger(__name__)
MAX_REMEMBERED = 20_000  # migrations whose scraped downtime is kept after its series goes


class DowntimeSource(Protocol):
    name: str  # as the status shows it in downtimeSource

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def observe(self, vmim: JSON) -> DowntimeObservation | None: ...


class AnnotationSource:
    """Whole milliseconds in an annotation of the VMIM."""

    def __init__(self, key: str) -> None:
        if not key or "=" in key or " " in key:
            raise ValueError(f"not an annotation key: {key!r}")
        self.key = key
        self.name = f"annotation:{key}"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def observe(self, vmim: JSON) -> DowntimeObservation | None:
        raw = ((vmim.get("metadata") or {}).get("annotations") or {}).get(self.key)
        try:
            ms = round(float(raw)) if raw is not None else None
        except ValueError:
            log.debug("annotation %s=%r is not a number of milliseconds", self.key, raw)
            return None
        return DowntimeObservation(ms, self.name) if ms is not None and ms >= 0 else None


def parse_metric(text: str, metric: str, label: str) -> dict[str, float]:
    """namespace/migration -> seconds, from Prometheus text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != metric:
                continue
            ns, name = sample.labels.get("namespace"), sample.labels.get(label)
            if ns and name and sample.value >= 0:
                out[f"{ns}/{name}"] = float(sample.value)
    return out


class PrometheusSource:
    """A gauge in seconds per migration, scraped every ``interval`` seconds. A value once seen
    is remembered (an exporter may drop the series of a finished migration)."""

    def __init__(self, url: str, metric: str, label: str = "migration",
                 interval: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
        if not metric:
            raise ValueError("a Prometheus downtime source needs a metric name")
        self.url, self.metric, self.label, self.interval = url, metric, label, interval
        self.name = f"prometheus:{metric}"
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="downtime-source", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self.scrape()
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                values = parse_metric(resp.read().decode(), self.metric, self.label)
        except Exception as exc:  # keep what we have; the next scrape may work
            log.warning("cannot read downtimes from %s: %s", self.url, exc)
            return
        with self._lock:
            for key, seconds in values.items():
                self._seen[key] = seconds
                self._seen.move_to_end(key)
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scrape()

    def observe(self, vmim: JSON) -> DowntimeObservation | None:
        meta = vmim.get("metadata") or {}
        with self._lock:
            seconds = self._seen.get(f"{meta.get('namespace')}/{meta.get('name')}")
        return DowntimeObservation(round(seconds * 1000), self.name) if seconds is not None \
            else None


def from_flags(source: str | None, metric: str | None = None,
               label: str = "migration") -> DowntimeSource | None:
    """``--downtime-source`` (``annotation=<key>`` or ``prometheus=<url>``) with
    ``--downtime-metric`` / ``--downtime-metric-label`` for Prometheus; None: no source."""
    if not source:
        if metric:
            raise ValueError("--downtime-metric needs --downtime-source prometheus=<url>")
        return None
    kind, sep, value = source.partition("=")
    if not sep or not value:
        raise ValueError(f"--downtime-source {source!r}: expected annotation=<key> or "
                         "prometheus=<url>")
    if kind == "annotation":
        if metric:
            raise ValueError("--downtime-metric applies only to a prometheus source")
        return AnnotationSource(value)
    if kind == "prometheus":
        if not metric:
            raise ValueError("--downtime-source prometheus=<url> needs --downtime-metric")
        return PrometheusSource(value, metric, label)
    raise ValueError(f"--downtime-source {source!r}: unknown kind {kind!r} (annotation or "
                     "prometheus)")
