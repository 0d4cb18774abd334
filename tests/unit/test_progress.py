"""progressTimeout: virtshift's own abort of a migration whose transfer stopped making progress,
seen in KubeVirt's ``kubevirt_vmi_migration_data_remaining_bytes`` (table tests, no cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from virtshift.domain import progress as pr
from virtshift.domain.views import AbortRecord, MigrationInfo
from virtshift.k8s import kubevirt_metrics, views

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def samples(*points: tuple[float, float]) -> pr.Progress | None:
    """Feed (second, data remaining) samples through ``observe``."""
    state = None
    for second, remaining in points:
        state = pr.observe(state, at(second), remaining)
    return state


@pytest.mark.parametrize(("points", "progressed"), [
    pytest.param([(0, 100)], 0, id="the first sample starts the clock"),
    pytest.param([(0, 100), (5, 90), (10, 80)], 10, id="each drop is progress"),
    pytest.param([(0, 100), (5, 90), (10, 90), (15, 90)], 5, id="no drop, no progress"),
    pytest.param([(0, 100), (5, 20), (10, 95), (15, 96)], 5,
                 id="a new round (data remaining up) is not progress"),
    pytest.param([(0, 100), (5, 20), (10, 95), (15, 60)], 15,
                 id="any drop against the sample before counts, as KubeVirt counts it"),
    pytest.param([(0, 100), (5, 0), (10, 0)], 10, id="nothing remaining is progress"),
    pytest.param([(0, 100), (5, 100), (5 + pr.MAX_SAMPLE_GAP + 1, 100)],
                 5 + pr.MAX_SAMPLE_GAP + 1,
                 id="after a gap in the samples the clock starts again"),
    pytest.param([(0, 100), (10, 90), (10, 90), (5, 10)], 10,
                 id="the same or an older sample again changes nothing"),
])
def test_observe(points, progressed) -> None:
    state = samples(*points)
    assert state is not None and state.progressed == at(progressed)
    assert state.sampled == at(max(s for s, _ in points))


def mig(name: str = "vs-d-a-1", **kw: Any) -> MigrationInfo:
    fields: dict[str, Any] = {"namespace": "ns", "name": name, "vmi": "a", "phase": "Running",
                              "drain": "d", "policy": "gold", "attempt": 1,
                              "running_at": at(0), "mode": "PreCopy"}
    return MigrationInfo(**{**fields, **kw})


STALLED = samples((0, 100), (5, 80), (10, 80), (40, 80))  # last progress at 5s

CHECK_CASES = [
    pytest.param([mig()], {"ns/a": STALLED}, 60, 30, ["vs-d-a-1"], None,
                 id="55s without progress > 30s: abort"),
    pytest.param([mig()], {"ns/a": STALLED}, 35, 30, ["vs-d-a-1"], None,
                 id="30s without progress is 'for this long'"),
    pytest.param([mig()], {"ns/a": STALLED}, 20, 30, [], 35, id="not yet: check again then"),
    pytest.param([mig(running_at=at(20))], {"ns/a": STALLED}, 60, 30, ["vs-d-a-1"], None,
                 id="the clock starts no earlier than the transfer"),
    pytest.param([mig(running_at=at(50))], {"ns/a": STALLED}, 90, 30, [], None,
                 id="no sample of this transfer yet: nothing known, nothing done"),
    pytest.param([mig()], {}, 600, 30, [], None, id="no metric for the VMI"),
    pytest.param([mig(mode="PostCopy")], {"ns/a": STALLED}, 600, 30, [], None,
                 id="never in post-copy (the guest runs on the target)"),
    pytest.param([mig(phase="Scheduling", running_at=None)], {"ns/a": STALLED}, 600, 30, [],
                 None, id="before the transfer"),
    pytest.param([mig(phase="Failed")], {"ns/a": STALLED}, 600, 30, [], None, id="finished"),
    pytest.param([mig(terminating=True)], {"ns/a": STALLED}, 600, 30, [], None,
                 id="already being deleted"),
    pytest.param([mig()], {"ns/a": STALLED}, 600, None, [], None, id="no progressTimeout"),
    pytest.param([mig(), mig("vs-d-b-1", vmi="b")],
                 {"ns/a": STALLED, "ns/b": samples((0, 9), (50, 8))}, 60, 30, ["vs-d-a-1"],
                 80, id="one stalled, one moving"),
]


@pytest.mark.parametrize(("migrations", "progress", "now", "timeout", "aborted", "recheck"),
                         CHECK_CASES)
def test_check(migrations, progress, now, timeout, aborted, recheck) -> None:
    verdict = pr.check(migrations, progress, at(now), timeout)
    assert [s.migration.name for s in verdict.abort] == aborted
    assert verdict.recheck_at == (at(recheck) if recheck is not None else None)
    for stall in verdict.abort:
        assert stall.seconds >= timeout
        assert f"progressTimeout {timeout:g}s" in stall.message
        assert "kubevirt_vmi_migration_data_remaining_bytes" in stall.message


def test_nothing_is_aborted_while_the_metrics_cannot_be_read() -> None:
    verdict = pr.check([mig()], {"ns/a": STALLED}, at(600), 30, observable=False)
    assert verdict.abort == [] and verdict.recheck_at is None


def test_an_abort_is_recorded_and_counts_as_a_failed_attempt() -> None:
    stall = pr.check([mig()], {"ns/a": STALLED}, at(60), 30).abort[0]
    record = pr.record(stall, at(60), drain_uid="uid-d")
    assert (record.migration, record.namespace, record.vmi, record.attempt) == (
        "vs-d-a-1", "ns", "a", 1)
    assert (record.reason, record.policy, record.drain, record.drain_uid) == (
        "ProgressTimeout", "gold", "d", "uid-d")
    failed = record.as_migration()
    assert (failed.phase, failed.attempt, failed.ended, failed.aborted) == (
        "Failed", 1, at(60), "ProgressTimeout")
    assert failed.failure == record.message and failed.final


def test_abort_records_round_trip_through_the_vmi_annotation() -> None:
    older = [AbortRecord(migration=f"m{i}", namespace="ns", vmi="a", reason="ProgressTimeout",
                         message="x", at=at(i)) for i in range(12)]
    text = views.abort_records_annotation(older)
    vmi = {"metadata": {"namespace": "ns", "name": "a",
                        "annotations": {views.ABORTED_ANNOTATION: text}}}
    back = views.abort_records(vmi)
    assert [r.migration for r in back] == [f"m{i}" for i in range(12 - views.MAX_ABORT_RECORDS,
                                                                   12)]
    assert back[-1] == older[-1]
    assert views.abort_records({"metadata": {"annotations": {
        views.ABORTED_ANNOTATION: "not json"}}}) == []


METRICS = """\
# HELP kubevirt_vmi_dirty_rate_bytes_per_second Guest dirty-rate in bytes per second.
# TYPE kubevirt_vmi_dirty_rate_bytes_per_second gauge
kubevirt_vmi_dirty_rate_bytes_per_second{name="a",namespace="ns",node="n1"} 1024.0
# HELP kubevirt_vmi_migration_data_remaining_bytes The remaining guest OS data to be migrated.
# TYPE kubevirt_vmi_migration_data_remaining_bytes gauge
kubevirt_vmi_migration_data_remaining_bytes{name="a",namespace="ns",node="n1"} 5.0e+08
kubevirt_vmi_migration_data_remaining_bytes{name="b",namespace="ns",node="n2"} 9 1772452795000
kubevirt_vmi_migration_data_remaining_bytes{name="b",namespace="ns",node="n2"} 7 1772452800000
"""


def test_virt_handler_metrics_carry_dirty_rates_and_data_remaining() -> None:
    parsed = kubevirt_metrics.parse(METRICS)
    assert parsed.dirty_rates == {"ns/a": 1024.0}
    assert parsed.remaining["ns/a"] == [(5e8, None)]
    assert parsed.remaining["ns/b"] == [(9.0, at(-5)), (7.0, at(0))]
    source = kubevirt_metrics.MetricsSource("http://unused", now=lambda: at(30))
    source.take(METRICS)  # every sample virt-handler hands out counts, at its own time
    assert source.progress()["ns/b"] == pr.Progress(sampled=at(0), remaining=7.0,
                                                    progressed=at(0))
    assert source.progress()["ns/a"].sampled == at(30)  # no timestamp: the scrape's time


def test_the_source_tracks_progress_per_vmi() -> None:
    clock = {"now": at(0)}
    source = kubevirt_metrics.MetricsSource("http://unused", now=lambda: clock["now"])
    for second, value in ((0, 100), (5, 90), (10, 90)):
        clock["now"] = at(second)
        source.take(f'kubevirt_vmi_migration_data_remaining_bytes{{name="a",namespace="ns"}} '
                    f"{value}\n")
    assert source.progress()["ns/a"].progressed == at(5)
    assert source.observable()
    source.failed()
    assert not source.observable()


def test_the_simulated_virt_handler_reports_data_remaining_while_transferring() -> None:
    """migrationdomainstats: data remaining for a VMI whose migration is transferring (the
    source node's virt-handler), nothing before or after; parsed as the operator parses it."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from virtshift.domain.physics import PreCopyRun
    from virtshift.sim.metrics import _DirtyRates

    def flight(name: str, phase: str, run: PreCopyRun | None, disks: float = 0.0) -> Any:
        vm = SimpleNamespace(spec=SimpleNamespace(namespace="ns", name=name))
        return SimpleNamespace(phase=phase, run=run, vm=vm, source="n1", disk_bytes_left=disks)

    moving = PreCopyRun(memory=1000.0, dirty_rate=0.0)
    moving.advance(2.0, 100.0)  # 200 of 1000 bytes sent
    sim = SimpleNamespace(world=SimpleNamespace(vms={}), flights={
        "1": flight("a", "Running", moving), "2": flight("b", "Running", moving, disks=50.0),
        "3": flight("c", "Scheduling", None), "4": flight("d", "Succeeded", moving)})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DirtyRates(sim))
    parsed = kubevirt_metrics.parse(generate_latest(registry).decode())
    assert parsed.remaining == {"ns/a": [(800.0, None)], "ns/b": [(850.0, None)]}


def test_the_line_parser_reads_what_prometheus_client_reads() -> None:
    """parse() reads only the two series, by line; on a virt-handler text with other families,
    escaped label values, timestamps and special values it agrees with prometheus_client's
    own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = METRICS + """\
# TYPE kubevirt_vmi_memory_resident_bytes gauge
kubevirt_vmi_memory_resident_bytes{name="a",namespace="ns"} 7
kubevirt_vmi_dirty_rate_bytes_per_second_extra{name="z",namespace="ns"} 1
kubevirt_vmi_dirty_rate_bytes_per_second{name="c",namespace="ns",node="n\\"1"} +Inf
kubevirt_vmi_dirty_rate_bytes_per_second{namespace="ns2", name="d"} 3e3
kubevirt_vmi_dirty_rate_bytes_per_second{name="nons"} 5
"""
    expected = kubevirt_metrics.Parsed()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in (kubevirt_metrics.DIRTY_RATE, kubevirt_metrics.DATA_REMAINING) \
                    or "namespace" not in s.labels:
                continue
            key = f"{s.labels['namespace']}/{s.labels['name']}"
            if s.name == kubevirt_metrics.DIRTY_RATE:
                expected.dirty_rates[key] = s.value
            else:
                stamp = None if s.timestamp is None else dt.datetime.fromtimestamp(
                    float(s.timestamp), dt.UTC)
                expected.remaining.setdefault(key, []).append((s.value, stamp))
    parsed = kubevirt_metrics.parse(text)
    assert parsed == expected
    assert parsed.dirty_rates["ns2/d"] == 3000.0 and "ns/z" not in parsed.dirty_rates


def test_the_source_scrapes_only_while_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle operator (no drain planning, no policy holding progressTimeout) does not parse
    every VMI's series every few seconds; the first read after a quiet spell scrapes at once."""
    import http.server
    import threading
    import time

    hits: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(time.monotonic())
            body = METRICS.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(kubevirt_metrics, "IDLE_AFTER", 0.5)
    source = kubevirt_metrics.MetricsSource(f"http://127.0.0.1:{server.server_port}/metrics",
                                            interval=0.05)
    try:
        source.start()
        assert source.get("ns/a") == 1024.0  # the first scrape is made at start
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # read: it keeps scraping
            source.get("ns/a")
            time.sleep(0.05)
        assert len(hits) >= 5
        time.sleep(1.5)  # unread past IDLE_AFTER: it stops
        quiet = len(hits)
        time.sleep(1.0)
        assert len(hits) == quiet and source.idle()
        source.progress()  # read again: a scrape follows at once, not after an interval
        deadline = time.monotonic() + 2.0
        while len(hits) == quiet and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(hits) > quiet and not source.idle()
    finally:
        source.stop()
        server.shutdown()
