"""Guest dirty rates from KubeVirt's metrics: ``kubevirt_vmi_dirty_rate_bytes_per_second``,
scraped from a Prometheus text endpoint (virt-handler's /metrics, or a Prometheus federate URL
that selects the series). The planner needs them to predict convergence and downtime."""

from __future__ import annotations

import logging
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
METRIC = "kubevirt_vmi_dirty_rate_bytes_per_second"


def parse(text: str) -> dict[str, float]:
    """namespace/name -> bytes per second."""
    rates: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            ns, name = sample.labels.get("namespace"), sample.labels.get("name")
            if ns and name:
                rates[f"{ns}/{name}"] = float(sample.value)
    return rates


class DirtyRateSource:
    def __init__(self, url: str, interval: float = 5.0) -> None:
        self.url = url
        self.interval = interval
        self._rates: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dirty-rates", daemon=True)

    def start(self) -> DirtyRateSource:
        if not self._thread.is_alive():
            self.scrape()
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def get(self, key: str) -> float | None:
        return self._rates.get(key)

    def scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                self._rates = parse(resp.read().decode())
        except Exception as exc:  # keep the last good figures; the next scrape may work
            log.warning("cannot read dirty rates from %s: %s", self.url, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scrape()
