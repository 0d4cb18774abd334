"""KubeVirt's virt-handler metrics, scraped from a Prometheus text endpoint (virt-handler's
/metrics, or a Prometheus federate URL that selects the series):

* ``kubevirt_vmi_dirty_rate_bytes_per_second``: the planner predicts convergence and downtime
  with each guest's dirty rate;
* ``kubevirt_vmi_migration_data_remaining_bytes``: a MigrationPolicy's progressTimeout watches
  it (``virtshift.domain.progress``); the source keeps, per VMI, what its samples have shown.

Samples are timed by their Prometheus timestamp when they carry one, else by the operator's
clock at the scrape. The source scrapes only while it is read (a drain planning with dirty rates,
a policy holding progressTimeout, maxDowntime or onDowntimeExceeded): an idle operator does not
parse every VMI's series every few seconds. The first read after a quiet spell wakes it at once.
A VMI it does not report has an unknown dirty rate (None), never 0 (``domain.downtime``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from virtshift.domain import progress as dprogress
from virtshift.domain.progress import Progress

log = logging.getLogger(__name__)
DIRTY_RATE = "kubevirt_vmi_dirty_rate_bytes_per_second"
DATA_REMAINING = dprogress.METRIC
# Scrapes that failed (or stopped) this many intervals ago make progress unobservable.
STALE_AFTER_INTERVALS = 3
# Forget a VMI's progress when nothing was reported for it for this long (cluster seconds).
FORGET_AFTER = 3600.0
# Stop scraping when nothing has read the figures for this long (wall seconds).
IDLE_AFTER = 30.0


@dataclass
class Parsed:
    dirty_rates: dict[str, float] = field(default_factory=dict)  # namespace/name -> bytes/s
    # namespace/name -> [(bytes, the sample's own time if it carries one)], in text order
    # (virt-handler hands out every sample it took since the last scrape).
    remaining: dict[str, list[tuple[float, dt.datetime | None]]] = field(default_factory=dict)


# One sample line of the text format: name{labels} value [timestamp in ms]. Label values are
# quoted with \\, \" and \n escaped.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?\s*$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_WANTED = (DIRTY_RATE, DATA_REMAINING)


def parse(text: str) -> Parsed:
    """The two series virtshift reads, from Prometheus text. Only their lines are parsed (a
    line-level regex, not prometheus_client's character-by-character parser: a virt-handler
    or federate endpoint lists every VMI, and this runs every few seconds)."""
    out = Parsed()
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        match = _SAMPLE.match(line)
        if match is None or match[1] not in _WANTED:
            continue
        labels = dict(_LABEL.findall(match[2] or ""))
        ns, name = labels.get("namespace"), labels.get("name")
        if not (ns and name):
            continue
        try:
            value = float(match[3])
        except ValueError:
            continue
        key = f"{ns}/{name}"
        if match[1] == DIRTY_RATE:
            out.dirty_rates[key] = value
        else:
            stamp = dt.datetime.fromtimestamp(int(match[4]) / 1000, dt.UTC) \
                if match[4] is not None else None
            out.remaining.setdefault(key, []).append((value, stamp))
    return out


class MetricsSource:
    def __init__(self, url: str, interval: float = 5.0,
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.url = url
        self.interval = interval  # wall seconds between scrapes
        self.now = now or (lambda: dt.datetime.now(dt.UTC))
        self._rates: dict[str, float] = {}
        self._progress: dict[str, Progress] = {}
        self._ok_at: float | None = None  # time.monotonic() of the last good scrape
        self._read_at = time.monotonic()  # of the last read: scrape while it is recent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubevirt-metrics", daemon=True)

    def start(self) -> MetricsSource:
        if not self._thread.is_alive():
            self.scrape()
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- what it knows -----------------------------------------------------------------------

    def _read(self) -> None:
        if self.idle():
            self._wake.set()  # back from a quiet spell: scrape now
        self._read_at = time.monotonic()

    def idle(self) -> bool:
        """Nothing has read the figures lately: scraping has paused."""
        return time.monotonic() - self._read_at > IDLE_AFTER

    def get(self, key: str) -> float | None:
        """The guest's dirty rate, bytes/s."""
        self._read()
        return self._rates.get(key)

    def progress(self) -> dict[str, Progress]:
        """Per VMI (namespace/name), what its data-remaining samples have shown."""
        self._read()
        with self._lock:
            return dict(self._progress)

    def observable(self) -> bool:
        """Whether the last scrape worked and is recent: otherwise silence means nothing."""
        ok = self._ok_at
        return ok is not None and \
            time.monotonic() - ok <= STALE_AFTER_INTERVALS * max(self.interval, 1.0)

    # -- scraping ----------------------------------------------------------------------------

    def take(self, text: str) -> None:
        """Fold in one scrape's text."""
        parsed = parse(text)
        now = self.now()
        with self._lock:
            self._rates = parsed.dirty_rates
            for key, samples in parsed.remaining.items():
                state = self._progress.get(key)
                for value, stamp in sorted(samples, key=lambda s: s[1] or now):
                    state = dprogress.observe(state, stamp or now, value)
                if state is not None:
                    self._progress[key] = state
            for key in [k for k, p in self._progress.items()
                        if (now - p.sampled).total_seconds() > FORGET_AFTER]:
                del self._progress[key]
            self._ok_at = time.monotonic()

    def failed(self) -> None:
        self._ok_at = None

    def scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                self.take(resp.read().decode())
        except Exception as exc:  # keep the last good figures; the next scrape may work
            log.warning("cannot read KubeVirt metrics from %s: %s", self.url, exc)
            self.failed()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._stop.is_set() and not self.idle():
                self.scrape()
