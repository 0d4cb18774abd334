"""The dashboard and the alerts use only metrics the operator exports; the Argo CD health
checks (Lua, run with lupa) judge real status objects from an end-to-end run
(tests/fixtures/argocd, written by tests/e2e/test_observe.py); structured log lines."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import virtshift.handlers.metrics
import virtshift.handlers.runtime
import virtshift.k8s.rest  # noqa: F401 - registers the API request metrics
from virtshift import logs
from virtshift.devenv.argocd import health

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "virtshift"
FIXTURES = REPO / "tests" / "fixtures" / "argocd"
# Collected at scrape time from the caches (handlers.metrics.InFlightCollector)
SCRAPE_TIME = {"virtshift_migrations_in_flight"}


def exported() -> set[str]:
    names = set(SCRAPE_TIME)
    for family in REGISTRY.collect():
        for s in family.samples:
            names.add(s.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
    return {n for n in names if n.startswith("virtshift_")}


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bvirtshift_[a-z_]+\b", text))


def test_exported_names_include_every_family() -> None:
    names = exported()
    # (a histogram is there once a label set exists; its family name counts)
    for name in ("virtshift_migrations_started_total", "virtshift_migrations_failed_total",
                 "virtshift_migration_duration_seconds", "virtshift_api_requests_total",
                 "virtshift_drain_progress_ratio", "virtshift_reconcile_errors_total"):
        assert name in names or name.removesuffix("_total") in names, name


def _base(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def test_dashboard_references_only_metrics_that_exist() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(referenced(e) for e in exprs))
    assert used, "the dashboard queries nothing"
    names = exported() | {n.removesuffix("_total") for n in exported()}
    missing = {u for u in used if u not in names and _base(u) not in names}
    assert not missing, f"the dashboard uses metrics nobody exports: {sorted(missing)}"


def test_alerts_reference_only_metrics_that_exist() -> None:
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    exprs = re.findall(r"expr: (.*)", text)
    used = set().union(*(referenced(e) for e in exprs))
    names = exported() | {n.removesuffix("_total") for n in exported()}
    assert {"virtshift_drain_progress_ratio", "virtshift_migrations_failed_total",
            "virtshift_policy_window_closes_in_seconds"} <= used
    assert not {u for u in used if u not in names and _base(u) not in names}


def test_a_reference_to_a_missing_metric_is_caught() -> None:
    names = exported()
    assert "virtshift_no_such_metric" not in names and _base("virtshift_no_such_metric") \
        not in names


EXPECTED = {"nodedrain-progressing": "Progressing", "nodedrain-stalled": "Degraded",
            "nodedrain-healthy": "Healthy", "migrationpolicy-progressing": "Progressing",
            "migrationpolicy-healthy": "Healthy", "migrationpolicy-degraded": "Degraded"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_argocd_health_of_objects_from_an_e2e_run(name: str) -> None:
    obj = json.loads((FIXTURES / f"{name}.json").read_text())
    got = health(obj)
    assert got["status"] == EXPECTED[name], got
    assert got["message"]


def test_argocd_health_of_a_paused_drain_and_a_deleted_one() -> None:
    obj = json.loads((FIXTURES / "nodedrain-progressing.json").read_text())
    obj["spec"]["paused"] = True
    for c in obj["status"]["conditions"]:
        if c["type"] == "Reconciling":
            c["status"] = "False"
    assert health(obj)["status"] == "Suspended"
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert health(obj)["status"] == "Progressing"
    obj = json.loads((FIXTURES / "nodedrain-healthy.json").read_text())
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    assert health(obj)["status"] == "Progressing"


def test_json_logs_carry_drain_vm_and_migration(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json")
    try:
        with logs.context(drain="d1"):
            logging.getLogger("t").info("migration created", extra={
                "vm": "ns/vm-1", "migration": "vs-d1-vm-1-1-abc"})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["drain"] == "d1" and line["vm"] == "ns/vm-1"
        assert line["migration"] == "vs-d1-vm-1-1-abc" and line["level"] == "info"
        logs.setup("text")
        logging.getLogger("t").info("hello", extra={"vm": "ns/vm-2"})
        assert capsys.readouterr().err.strip().endswith("hello vm=ns/vm-2")
    finally:
        logging.getLogger().handlers.clear()
