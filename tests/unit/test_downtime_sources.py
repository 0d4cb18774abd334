"""Observed downtimes come only from a configured source, and say which."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from virtshift.domain.views import DowntimeObservation
from virtshift.k8s.cluster import Cluster
from virtshift.k8s.downtime import AnnotationSource, PrometheusSource, from_flags

KEY = "example.com/downtime-ms"


def vmim(phase: str = "Succeeded", name: str = "m", **annotations: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "annotations": annotations},
            "spec": {"vmiName": "vm"},
            "status": {"phase": phase, "phaseTransitionTimestamps": [
                {"phase": "Pending", "phaseTransitionTimestamp": "2026-11-25T12:00:00Z"},
                {"phase": phase, "phaseTransitionTimestamp": "2026-11-25T12:01:00Z"}]}}


@pytest.mark.parametrize(("value", "expected"), [
    ("42", 42), ("41.6", 42), ("0", 0), ("-3", None), ("soon", None), (None, None)])
def test_annotation_source_reads_whole_milliseconds(value, expected) -> None:
    obj = vmim(**({KEY: value} if value is not None else {}))
    got = AnnotationSource(KEY).observe(obj)
    assert got == (DowntimeObservation(expected, f"annotation:{KEY}") if expected is not None
                   else None)


def cluster_with(source) -> Cluster:
    return Cluster(kube=None, downtime=source)  # type: ignore[arg-type]  # never started


def test_a_migration_has_a_downtime_only_from_the_source_and_only_once_succeeded() -> None:
    annotated = {KEY: "120"}
    assert cluster_with(None).migration_info(vmim(**annotated)).downtime is None
    observed = cluster_with(AnnotationSource(KEY))
    assert observed.migration_info(vmim(**annotated)).downtime == DowntimeObservation(
        120, f"annotation:{KEY}")
    assert observed.migration_info(vmim("Running", **annotated)).downtime is None
    assert observed.migration_info(vmim("Failed", **annotated)).downtime is None


METRICS = b"""# HELP migration_downtime_seconds Switch-over downtime.
# TYPE migration_downtime_seconds gauge
migration_downtime_seconds{namespace="ns",migration="m"} 0.125
migration_downtime_seconds{namespace="ns",migration="other"} 2
unrelated_seconds{namespace="ns",migration="m"} 9
"""


@pytest.fixture
def exporter() -> Iterator[dict[str, Any]]:
    served = {"body": METRICS}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *_a: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served["url"] = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        yield served
    finally:
        server.shutdown()


def test_prometheus_source_scrapes_seconds_and_remembers_them(exporter) -> None:
    source = PrometheusSource(exporter["url"], "migration_downtime_seconds")
    source.scrape()
    assert source.observe(vmim()) == DowntimeObservation(
        125, "prometheus:migration_downtime_seconds")
    assert source.observe(vmim(name="unknown")) is None
    exporter["body"] = b""  # the exporter forgets a finished migration; we do not
    source.scrape()
    assert source.observe(vmim()).ms == 125


def test_prometheus_source_with_another_label(exporter) -> None:
    exporter["body"] = b'd_seconds{namespace="ns",vmim="m"} 0.5\n'
    source = PrometheusSource(exporter["url"], "d_seconds", label="vmim")
    source.scrape()
    assert source.observe(vmim()) == DowntimeObservation(500, "prometheus:d_seconds")


def test_flags() -> None:
    assert from_flags(None) is None
    assert isinstance(from_flags(f"annotation={KEY}"), AnnotationSource)
    prom = from_flags("prometheus=http://prom:9090/federate", "d_seconds", "vmim")
    assert isinstance(prom, PrometheusSource) and (prom.metric, prom.label) == (
        "d_seconds", "vmim")
    for bad, metric in [("annotation", None), ("prometheus=http://x", None),
                        ("prometheus=ftp://x", "m"), ("statsd=x", None),
                        (f"annotation={KEY}", "m"), (None, "m")]:
        with pytest.raises(ValueError):
            from_flags(bad, metric)
