"""Issue 13, end to end: `virtshift plan` before a drain against the drain after, /metrics
scraped during the drain, the HTML report, JSON logs, and the Argo CD health checks on the
real status objects of the run (saved to tests/fixtures/argocd with
VIRTSHIFT_UPDATE_FIXTURES=1, where the unit test reads them)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from observe_env import POLICY, observe_env, plan_json, policy_body, scrape, virtshift
from operator_harness import drain_body, get_drain, phase_of, wait_for
from prometheus_client.parser import text_string_to_metric_families

from virtshift.devenv.argocd import health
from virtshift.k8s import rest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "argocd"
RESULTS: dict[str, Any] = {}
FIXTURE_OBJECTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    with observe_env(fresh_cluster, tmp_path_factory.mktemp("operator")) as e:
        wait_for(lambda: _ready(e["kube"].get(rest.POLICIES, POLICY)), timeout=60,
                 what="policy Ready")
        yield e


def _ready(obj: dict[str, Any] | None) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in ((obj or {}).get("status") or {}).get("conditions") or [])


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples(text)
               if n == name and all(lab.get(k) == x for k, x in labels.items()))


def label_values(text: str, name: str, label: str) -> set[str]:
    return {lab[label] for n, lab, _ in samples(text) if n == name and label in lab}


def keep(name: str, obj: dict[str, Any]) -> None:
    clean = {k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in obj}
    clean["metadata"] = {k: v for k, v in obj["metadata"].items()
                         if k in ("name", "generation", "deletionTimestamp")}
    FIXTURE_OBJECTS[name] = clean


def test_plan_before_the_drain_is_read_only(env) -> None:
    kube = env["kube"]
    before = {n["metadata"]["name"]: n["metadata"]["resourceVersion"]
              for n in kube.items(rest.NODES)}
    RESULTS["plan"] = plan = plan_json(env, "node-1")
    vms = plan["status"]["vms"]
    assert plan["status"]["plannedSeconds"] > 0
    assert all(v["candidates"] and v["predictedSeconds"] > 0 for v in vms
               if v["phase"] == "Pending")
    assert {v["reason"] for v in vms if v["phase"] == "Failed"} == {
        "HostDeviceNotLiveMigratable"}
    out = virtshift("plan", "node-1", "--kubeconfig", env["kubeconfig"],
                    "--metrics-source", env["sim_metrics"], "--time-scale", "10")
    assert out.returncode == 0, out.stderr
    assert "HostDeviceNotLiveMigratable" in out.stdout and "ETA" in out.stdout
    assert "prod/app-1" in out.stdout
    after = {n["metadata"]["name"]: n["metadata"]["resourceVersion"]
             for n in kube.items(rest.NODES)}
    assert after == before and not kube.items(rest.NODE_DRAINS)
    assert not kube.items(rest.VMIMS)


def test_drain_metrics_and_plan_against_reality(env) -> None:
    kube, url = env["kube"], env["metrics"]
    texts: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                texts.append(scrape(url))
            d = get_drain(kube, "drain-node-1")
            if d and (d.get("status") or {}).get("phase") == "Draining" and \
                    "nodedrain-progressing" not in FIXTURE_OBJECTS:
                keep("nodedrain-progressing", d)
            time.sleep(0.3)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        kube.create(rest.NODE_DRAINS, drain_body("drain-node-1", nodeName="node-1"))
        drain = wait_for(lambda: phase_of(kube, "drain-node-1") in ("Drained", "Stalled")
                         and get_drain(kube, "drain-node-1"), timeout=240, what="drain done")
        # the observed downtimes may come a pass later
        wait_for(lambda: all("observedDowntimeMs" in v for v in get_drain(
            kube, "drain-node-1")["status"]["vms"] if v["phase"] == "Succeeded"), timeout=30,
            what="observations")
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    drain = get_drain(kube, "drain-node-1")
    keep("nodedrain-stalled", drain)
    st = drain["status"]
    final = scrape(url)
    succeeded = st["counts"]["succeeded"]
    ours = kube.items(rest.VMIMS, label_selector="virtshift.io/drain=drain-node-1")

    # migrations started / succeeded, by policy (app VMs under gold, the web ones under none)
    assert value(final, "virtshift_migrations_started_total") == len(ours)
    assert value(final, "virtshift_migrations_succeeded_total") == succeeded
    assert label_values(final, "virtshift_migrations_succeeded_total", "policy") == {POLICY}
    # in flight by source and target, seen during the drain, never above KubeVirt's limits
    peaks = [value(t, "virtshift_migrations_in_flight") for t in texts]
    assert max(peaks) == 2, peaks  # parallelOutboundMigrationsPerNode
    assert any(label_values(t, "virtshift_migrations_in_flight", "source_node") == {"node-1"}
               for t in texts)
    assert value(final, "virtshift_migrations_in_flight") == 0
    # duration and downtime histograms
    assert value(final, "virtshift_migration_duration_seconds_count",
                 outcome="succeeded") == succeeded
    mean = value(final, "virtshift_migration_duration_seconds_sum") / succeeded
    assert 10 < mean < 600, mean
    assert value(final, "virtshift_migration_downtime_seconds_count", kind="observed") == \
        succeeded
    assert value(final, "virtshift_migration_downtime_seconds_count", kind="predicted") == \
        succeeded
    assert 0 < value(final, "virtshift_migration_downtime_seconds_sum", kind="observed") < \
        succeeded * 5
    # bytes moved = the drain's own bytesMoved
    assert value(final, "virtshift_migration_bytes_total", source_node="node-1") == \
        st["bytesMoved"]
    # per drain: progress ratio rose to 1, the ETA was a time in the cluster's near future
    ratios = [value(t, "virtshift_drain_progress_ratio", drain="drain-node-1") for t in texts]
    assert ratios == sorted(ratios) and ratios[-1] == 1.0 and any(0 < r < 1 for r in ratios)
    etas = [value(t, "virtshift_drain_eta_timestamp_seconds", drain="drain-node-1")
            for t in texts]
    assert any(e > 1.6e9 for e in etas)
    assert value(final, "virtshift_drain_vms", drain="drain-node-1", state="failed") == 2
    # reconciles, errors, API requests; the policy's window and work left
    assert value(final, "virtshift_reconciles_total", kind="NodeDrain") > 10
    assert "virtshift_reconcile_errors_total" in final
    assert value(final, "virtshift_reconcile_errors_total") == 0
    assert value(final, "virtshift_api_requests_total", verb="POST",
                 resource="virtualmachineinstancemigrations", code="201") == len(ours)
    assert value(final, "virtshift_api_requests_total", verb="WATCH") >= 5
    assert value(final, "virtshift_policy_window_open", policy=POLICY) == 1
    assert value(final, "virtshift_policy_vms_waiting", policy=POLICY) == 0
    # no VM names as labels
    vm_names = {v["name"] for v in st["vms"]}
    assert not any(set(lab.values()) & vm_names for _, lab, _ in samples(final))

    # `virtshift plan` before against the drain after: ETA within 25%, the same blockers
    plan = RESULTS["plan"]["status"]
    times = [parse(t["phaseTransitionTimestamp"]) for m in ours
             for t in m["status"]["phaseTransitionTimestamps"]]
    makespan = max(times) - min(times)
    planned = plan["plannedSeconds"]
    print(f"virtshift plan ETA {planned:.0f}s, real makespan {makespan:.0f}s "
          f"({(planned - makespan) / makespan:+.0%})")
    assert abs(planned - makespan) <= 0.25 * makespan, (planned, makespan)
    blockers = lambda vms: {(v["namespace"], v["name"], v["reason"])  # noqa: E731
                            for v in vms if v["phase"] == "Failed"}
    assert blockers(plan["vms"]) == blockers(st["vms"])
    RESULTS["makespan"] = makespan


def parse(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_failed_attempt_is_counted_by_reason_and_the_drain_is_healthy(env, tmp_path) -> None:
    kube, url = env["kube"], env["metrics"]
    kube.create(rest.NODE_DRAINS, drain_body("drain-node-2", nodeName="node-2"))
    wait_for(lambda: phase_of(kube, "drain-node-2") == "Drained", timeout=180,
             what="node-2 drained")
    drain = get_drain(kube, "drain-node-2")
    keep("nodedrain-healthy", drain)
    text = scrape(url)
    assert value(text, "virtshift_migrations_failed_total", policy="none") == 1
    assert label_values(text, "virtshift_migrations_failed_total", "reason") <= {
        "TargetNotReady", "Other", "Aborted"}
    assert value(text, "virtshift_migration_duration_seconds_count", outcome="failed") == 1
    # the report: one row per VM, a bar per attempt coloured by outcome
    out = virtshift("report", "drain-node-2", "--html", str(tmp_path / "r.html"),
                    "--kubeconfig", env["kubeconfig"])
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count('class="bar failed"') == 1
    assert page.count('class="bar succeeded"') == drain["status"]["counts"]["succeeded"]


def test_report_of_the_medium_drain(env, tmp_path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(RESULTS["plan"]))
    out = virtshift("report", "drain-node-1", "--html", str(tmp_path / "report.html"),
                    "--plan", str(plan), "--kubeconfig", env["kubeconfig"])
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "report.html").read_text()
    drain = get_drain(env["kube"], "drain-node-1")
    assert page.count('class="bar succeeded"') == drain["status"]["counts"]["succeeded"]
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page
    assert "Downtime: observed (30 moves; source annotation:sim.virtshift.io/downtime-ms)" \
        in page
    assert "a prediction, not a measurement" in page
    assert "blockers met: prod/gpu-1: HostDeviceNotLiveMigratable" in page
    assert re.search(r"ETA planned \S+; real makespan \S+ \([+-]\d+%\)", page)


def test_json_logs_name_drain_vm_and_migration(env) -> None:
    lines = [json.loads(x) for x in env["op"].logs().splitlines() if x.startswith("{")]
    created = [x for x in lines if x["message"].startswith("migration created")]
    assert created and all({"drain", "vm", "migration"} <= x.keys() for x in created)
    moved = [x for x in lines if x["message"].startswith("VM succeeded")]
    assert moved and all(x["drain"] == "drain-node-1" or x["drain"] == "drain-node-2"
                         for x in moved)
    assert all(x.get("vm") for x in moved)


def test_argo_cd_health_of_real_objects(env) -> None:
    kube = env["kube"]
    fresh = kube.create(rest.POLICIES, policy_body("fresh", vmSelector={"matchLabels": {
        "app": "none"}}))
    keep("migrationpolicy-progressing", fresh)
    kube.create(rest.POLICIES, policy_body("bad-window", vmSelector={"matchLabels": {
        "app": "none"}}, windows=[{"schedule": "0 2 * * *", "duration": "4h",
                                   "timeZone": "Mars/Olympus_Mons"}]))
    bad = wait_for(lambda: (p := kube.get(rest.POLICIES, "bad-window")) and any(
        c["type"] == "Ready" and c["status"] == "False"
        for c in (p.get("status") or {}).get("conditions") or []) and p, timeout=30,
        what="bad-window not Ready")
    keep("migrationpolicy-degraded", bad)
    keep("migrationpolicy-healthy", kube.get(rest.POLICIES, POLICY))
    expected = {"nodedrain-progressing": "Progressing", "nodedrain-stalled": "Degraded",
                "nodedrain-healthy": "Healthy", "migrationpolicy-progressing": "Progressing",
                "migrationpolicy-healthy": "Healthy", "migrationpolicy-degraded": "Degraded"}
    got = {k: health(FIXTURE_OBJECTS[k])["status"] for k in expected}
    assert got == expected
    if os.environ.get("VIRTSHIFT_UPDATE_FIXTURES"):
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for k, obj in FIXTURE_OBJECTS.items():
            (FIXTURES / f"{k}.json").write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
