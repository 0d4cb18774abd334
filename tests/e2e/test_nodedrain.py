"""NodeDrain end to end: the operator as a process, the simulator, a real API server.

Everything is checked the way a user would: the cluster's objects and the drain's status.
The tests share one medium scenario (10 nodes, 100 VMs) and run in file order. The operator
runs as the Helm chart installs it: authenticated as the chart's ServiceAccount (a token from
the TokenRequest API), with only the chart's RBAC, so every drain here also proves the
ClusterRole is enough (issue 11).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_harness import install_identity
from operator_harness import OperatorProcess, drain_body, get_drain, phase_of, wait_for

from virtshift.api.kubevirt import FINAL_PHASES, IN_FLIGHT_PHASES
from virtshift.domain.drain import MAX_QUEUE_ROUNDS
from virtshift.k8s import rest
from virtshift.k8s.views import ATTEMPT_LABEL, DRAIN_LABEL, parse_time
from virtshift.sim import runner
from virtshift.sim.objects import DOWNTIME_ANNOTATION
from virtshift.sim.scenario import load_scenario

MEDIUM = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "medium.yaml"
# The medium scenario, simulated at 10x rather than its 60x: every millisecond the operator and
# the simulator take to react costs 60 ms of cluster time at 60x, which would make the drain
# measure our test harness's latency rather than the migrations.
TIME_SCALE = 10
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(MEDIUM).model_copy(update={"time_scale": TIME_SCALE})
    identity = install_identity(fresh_cluster, tmp_path_factory.mktemp("identity"))
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(identity, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, sim.metrics.url,
                         downtime_source=runner.DOWNTIME_SOURCE).start()
    try:
        yield {"kube": fresh_cluster.kube, "sim": sim, "op": op, "scenario": scenario,
               "cluster": fresh_cluster}
    finally:
        op.stop()
        sim.stop()


def vmis_on(kube: rest.KubeClient, node: str) -> list[dict[str, Any]]:
    return [v for v in kube.items(rest.VMIS) if v["status"].get("nodeName") == node]


def migrations_of(kube: rest.KubeClient, drain: str) -> list[dict[str, Any]]:
    return kube.items(rest.VMIMS, label_selector=f"{DRAIN_LABEL}={drain}")


def resource_versions(kube: rest.KubeClient) -> dict[str, str]:
    out = {}
    for res in (rest.NODES, rest.VMIS, rest.VMS, rest.VMIMS, rest.PODS):
        for obj in kube.items(res):
            meta = obj["metadata"]
            out[f"{res.plural}/{meta.get('namespace')}/{meta['name']}"] = meta["resourceVersion"]
    return out


class Sampler:
    """Samples the cluster's migrations while a drain runs, for invariants over time."""

    def __init__(self, kube: rest.KubeClient) -> None:
        self.kube = kube
        self.samples: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.kube.items(rest.VMIMS))
            time.sleep(0.05)


def stamps_of(migration: dict[str, Any]) -> dict[str, Any]:
    return {t["phase"]: parse_time(t["phaseTransitionTimestamp"])
            for t in migration["status"].get("phaseTransitionTimestamps", [])}


def makespan_seconds(migrations: list[dict[str, Any]]) -> float:
    """From the first migration's creation to the last one's end, in the cluster's time."""
    starts, ends = [], []
    for m in migrations:
        stamps = stamps_of(m)
        starts.append(stamps["Pending"])
        ends.append(stamps.get("Succeeded") or stamps.get("Failed"))
    return (max(ends) - min(starts)).total_seconds()


def test_dry_run_plans_and_changes_nothing(env) -> None:
    kube = env["kube"]
    before = resource_versions(kube)
    kube.create(rest.NODE_DRAINS, drain_body("plan-node-1", nodeName="node-1", dryRun=True))
    drain = wait_for(lambda: phase_of(kube, "plan-node-1") == "Planned"
                     and get_drain(kube, "plan-node-1"), what="plan")
    status = drain["status"]
    assert status["counts"]["total"] == len(vmis_on(kube, "node-1"))
    queued = [v for v in status["vms"] if v["phase"] == "Pending"]
    assert queued and all(v["candidates"] and v["predictedSeconds"] > 0 for v in queued)
    assert {v["reason"] for v in status["vms"] if v["phase"] == "Failed"} == {
        "HostDeviceNotLiveMigratable"}
    assert status["plannedSeconds"] > 0 and status["eta"]
    time.sleep(1)  # a few reconciles: still nothing may change
    assert resource_versions(kube) == before
    RESULTS["planned"] = status["plannedSeconds"]
    kube.delete(rest.NODE_DRAINS, "plan-node-1")
    wait_for(lambda: get_drain(kube, "plan-node-1") is None, what="plan deleted")
    assert not kube.get(rest.NODES, "node-1").get("spec", {}).get("unschedulable")


def test_drain_moves_every_migratable_vm_within_every_limit(env) -> None:
    kube, scenario = env["kube"], env["scenario"]
    on_node = {f"{v['metadata']['namespace']}/{v['metadata']['name']}": v
               for v in vmis_on(kube, "node-1")}
    assert len(on_node) >= 30
    stuck = {k for k, v in on_node.items() if any(c["type"] == "LiveMigratable" and
                                                  c["status"] == "False"
                                                  for c in v["status"]["conditions"])}
    with Sampler(kube) as sampler:
        kube.create(rest.NODE_DRAINS, drain_body("drain-node-1", nodeName="node-1"))
        drain = wait_for(lambda: phase_of(kube, "drain-node-1") in ("Drained", "Stalled")
                         and get_drain(kube, "drain-node-1"), timeout=180, what="drain done")
    status = drain["status"]
    left = {f"{v['metadata']['namespace']}/{v['metadata']['name']}" for v in
            vmis_on(kube, "node-1")}
    assert left == stuck  # every migratable VM left; the others stayed
    assert status["counts"] == {"total": len(on_node), "pending": 0, "migrating": 0,
                                "succeeded": len(on_node) - len(stuck),
                                "failed": len(stuck), "skipped": 0}
    failed = {f"{v['namespace']}/{v['name']}": v["reason"] for v in status["vms"]
              if v["phase"] == "Failed"}
    assert failed == dict.fromkeys(stuck, "HostDeviceNotLiveMigratable")
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Cordoned"]["status"] == "True"
    assert (conds["Stalled"]["status"], conds["Stalled"]["reason"]) == ("True",
                                                                         "MigrationFailed")
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert kube.get(rest.NODES, "node-1")["spec"]["unschedulable"] is True

    limits = scenario.kubevirt
    for sample in sampler.samples:
        unfinished = [m for m in sample if m.get("status", {}).get("phase") not in FINAL_PHASES]
        per_vmi = Counter((m["metadata"]["namespace"], m["spec"]["vmiName"]) for m in unfinished)
        assert max(per_vmi.values(), default=0) <= 1, per_vmi
        # KubeVirt runs at most its limits; virtshift keeps a few rounds more in its queue
        # (domain.drain._queue_rounds: as many as its measured reaction needs).
        running = [m for m in unfinished if m.get("status", {}).get("phase") in IN_FLIGHT_PHASES]
        assert len(running) <= limits.parallel_migrations_per_cluster
        assert len(running) <= limits.parallel_outbound_migrations_per_node  # one source
        assert len(unfinished) <= (1 + MAX_QUEUE_ROUNDS) * \
            limits.parallel_outbound_migrations_per_node
    assert max(len([m for m in s if m.get("status", {}).get("phase") in IN_FLIGHT_PHASES])
               for s in sampler.samples) == limits.parallel_outbound_migrations_per_node
    ours = migrations_of(kube, "drain-node-1")
    # Only KubeVirt's own virt-controller may set spec.priority (migration-create-admitter.go:
    # hasRequestOriginatedFromVirtController); ours carry none, and KubeVirt's mutator labelled
    # and finalized them (migration-create-mutator.go).
    assert ours and all("priority" not in m["spec"] for m in ours)
    assert all(m["metadata"]["labels"]["kubevirt.io/vmi-name"] == m["spec"]["vmiName"]
               for m in ours)
    RESULTS["makespan"] = makespan_seconds(ours)
    # Staggered starts (domain.stagger): the first two leave node-1 one transfer apart, so the
    # second sends its memory after the first has sent its own, each at the full NIC.
    first, second = sorted((stamps_of(m) for m in ours), key=lambda t: t["Pending"])[:2]
    assert second["Running"] >= first["Succeeded"], (first, second)

    # Downtimes: each move's prediction, and what the configured source (the simulator's
    # annotation) observed, saying so; the two are different fields.
    def observed() -> dict[tuple[str, str], int] | None:
        vms = [v for v in get_drain(kube, "drain-node-1")["status"]["vms"]
               if v["phase"] == "Succeeded"]
        if not all("observedDowntimeMs" in v for v in vms):
            return None  # an observation may come a pass after its migration succeeded
        assert all(v["downtimeSource"] == f"annotation:{DOWNTIME_ANNOTATION}" for v in vms)
        assert all(v["predictedDowntimeMs"] >= 0 for v in vms)
        return {(v["namespace"], v["name"]): v["observedDowntimeMs"] for v in vms}

    seen = wait_for(observed, timeout=30, what="observed downtimes")
    assert seen == {(m["metadata"]["namespace"], m["spec"]["vmiName"]):
                    int(m["metadata"]["annotations"][DOWNTIME_ANNOTATION])
                    for m in migrations_of(kube, "drain-node-1")
                    if m["status"]["phase"] == "Succeeded"}


def test_dry_run_eta_is_within_a_quarter_of_the_real_makespan() -> None:
    if "planned" not in RESULTS or "makespan" not in RESULTS:
        pytest.fail("needs the dry-run and drain tests of this module to have run")
    planned, real = RESULTS["planned"], RESULTS["makespan"]
    print(f"dry-run plan {planned:.0f}s, real makespan {real:.0f}s "
          f"({(planned - real) / real:+.0%})")
    assert abs(planned - real) <= 0.25 * real, (planned, real)


def test_deleting_mid_drain_aborts_and_uncordons(env) -> None:
    """cancelOnDelete: the aborts first, the uncordon only once every aborted migration has
    ended; the drain says Terminating meanwhile (issue 9)."""
    kube = env["kube"]
    kube.create(rest.NODE_DRAINS, drain_body("drain-node-2", nodeName="node-2"))
    wait_for(lambda: any(m.get("status", {}).get("phase") in ("Scheduling", "Scheduled",
                                                              "PreparingTarget", "Running")
                         for m in migrations_of(kube, "drain-node-2")), what="in flight")
    assert kube.get(rest.NODES, "node-2")["spec"]["unschedulable"] is True
    kube.delete(rest.NODE_DRAINS, "drain-node-2")
    in_flight = {m["spec"]["vmiName"]: m["metadata"]["uid"]
                 for m in migrations_of(kube, "drain-node-2")
                 if m.get("status", {}).get("phase") not in FINAL_PHASES}
    phases, early = set(), []
    deadline = time.monotonic() + 60
    while (drain := get_drain(kube, "drain-node-2")) is not None:
        assert time.monotonic() < deadline, "drain not gone in 60s"
        phases.add((drain.get("status") or {}).get("phase"))
        # The node first, the migrations second: schedulable while one has not ended is wrong.
        schedulable = not kube.get(rest.NODES, "node-2")["spec"].get("unschedulable")
        unfinished = [m["metadata"]["name"] for m in migrations_of(kube, "drain-node-2")
                      if m.get("status", {}).get("phase") not in FINAL_PHASES]
        if schedulable and unfinished:
            early.append(unfinished)
        time.sleep(0.02)
    assert not early, f"uncordoned while aborted migrations had not ended: {early[:3]}"
    assert "Terminating" in phases, phases
    node = kube.get(rest.NODES, "node-2")
    assert not node["spec"].get("unschedulable")
    assert "virtshift.io/cordoned-by" not in (node["metadata"].get("annotations") or {})
    remaining = migrations_of(kube, "drain-node-2")
    assert all(m["status"]["phase"] in FINAL_PHASES for m in remaining)
    # KubeVirt (migration.go): cancelled before handoff, the VMI is untouched; after it, the
    # VMI shows abortRequested, and the migration either aborted or finished first.
    stayed = 0
    for name, uid in in_flight.items():
        vmi = next(v for v in kube.items(rest.VMIS) if v["metadata"]["name"] == name)
        state = vmi["status"].get("migrationState") or {}
        if state.get("migrationUid") == uid and state.get("failed"):
            assert state["abortRequested"] and state["abortStatus"] == "Succeeded", state
        if vmi["status"]["nodeName"] == "node-2":
            stayed += 1
    assert in_flight and stayed, "an in-flight migration was aborted in KubeVirt"


def test_sigkill_at_three_points_never_duplicates_a_migration(env) -> None:
    kube, op = env["kube"], env["op"]
    total = len(vmis_on(kube, "node-3"))
    kube.create(rest.NODE_DRAINS, drain_body("drain-node-3", nodeName="node-3"))
    for done_at_least in (1, total // 2, total - 1):
        wait_for(lambda n=done_at_least: sum(
            m.get("status", {}).get("phase") == "Succeeded"
            for m in migrations_of(kube, "drain-node-3")) >= n, what=f"{done_at_least} done")
        op.kill()
        time.sleep(0.3)
        op.start()
    wait_for(lambda: phase_of(kube, "drain-node-3") == "Drained", timeout=180,
             what="drain after restarts")
    ours = migrations_of(kube, "drain-node-3")
    per_attempt = Counter((m["spec"]["vmiName"], m["metadata"]["labels"]["virtshift.io/attempt"])
                          for m in ours)
    assert max(per_attempt.values()) == 1
    succeeded = Counter(m["spec"]["vmiName"] for m in ours if m["status"]["phase"] == "Succeeded")
    assert len(succeeded) == total and max(succeeded.values()) == 1
    assert not vmis_on(kube, "node-3")
    assert op.starts == 4


def test_rolling_wave_never_exceeds_max_unavailable(env) -> None:
    kube = env["kube"]
    wave = ["node-5", "node-6", "node-7"]
    for n in wave:
        kube.patch(rest.NODES, n, {"metadata": {"labels": {"pool": "wave"}}})
    cordoned_by_us: list[set[str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            cordoned_by_us.append({
                n["metadata"]["name"] for n in kube.items(rest.NODES)
                if (n["metadata"].get("annotations") or {}).get("virtshift.io/cordoned-by")
                == "wave"})
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        kube.create(rest.NODE_DRAINS, drain_body(
            "wave", nodeSelector={"matchLabels": {"pool": "wave"}}, maxUnavailable=1,
            releaseAfter="30s"))
        drain = wait_for(lambda: (d := get_drain(kube, "wave")) and d.get("status", {}).get(
                         "phase") == "Drained" and all(n["phase"] == "Released"
                                                       for n in d["status"]["nodes"]) and d,
                         timeout=180, what="wave done and every node released")
    finally:
        stop.set()
        sampler.join()
    assert max(len(s) for s in cordoned_by_us) == 1
    assert {n for s in cordoned_by_us for n in s} == set(wave)  # each had its turn
    assert [n["phase"] for n in drain["status"]["nodes"]] == ["Released"] * 3
    assert drain["status"]["counts"]["failed"] == 0
    # Issue 9: never to a node the wave drains later (a released one is fine), so each VM
    # moved once.
    done = [m for m in migrations_of(kube, "wave") if m["status"]["phase"] == "Succeeded"]
    moves = Counter(m["spec"]["vmiName"] for m in done)
    assert moves and max(moves.values()) == 1, moves
    early = [(m["spec"]["vmiName"], source, target) for m in done
             if (target := m["status"]["migrationState"]["targetNode"]) in wave[wave.index(
                 source := m["metadata"]["labels"]["virtshift.io/source-node"]) + 1:]]
    assert not early, early


def test_a_drain_created_again_under_the_same_name_meets_no_leftover(env) -> None:
    """Issue 9: the first incarnation leaves finished migrations behind; the second, with the
    same name, must not stall on their names (409) nor take them for its own."""
    kube = env["kube"]
    first = kube.create(rest.NODE_DRAINS, drain_body(
        "again", nodeName="node-10", targetNodeSelector={"kubernetes.io/hostname": "node-9"}))
    wait_for(lambda: phase_of(kube, "again") == "Drained", timeout=120, what="first drained")
    moved = {m["spec"]["vmiName"] for m in migrations_of(kube, "again")}
    assert moved
    kube.delete(rest.NODE_DRAINS, "again")
    wait_for(lambda: get_drain(kube, "again") is None, timeout=60, what="first gone")
    # The same VMs again, now from node-9 back to node-10: the same (drain, VM, attempt).
    second = kube.create(rest.NODE_DRAINS, drain_body(
        "again", nodeName="node-9", targetNodeSelector={"kubernetes.io/hostname": "node-10"}))
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    wait_for(lambda: phase_of(kube, "again") == "Drained", timeout=120,
             what=lambda: f"second drained (status: {get_drain(kube, 'again').get('status')})")
    assert not vmis_on(kube, "node-9")
    mine = [m for m in migrations_of(kube, "again") if m["metadata"]["annotations"][
        "virtshift.io/node-drain-uid"] == second["metadata"]["uid"]]
    assert moved <= {m["spec"]["vmiName"] for m in mine}
    kube.delete(rest.NODE_DRAINS, "again")
    wait_for(lambda: get_drain(kube, "again") is None, timeout=60, what="second gone")


MAINTENANCE_DONE = "virtshift.io/maintenance-complete"


def test_maintenance_complete_releases_a_wave_node_and_no_vm_lands_on_a_later_one(env) -> None:
    """A wave without releaseAfter: each node is held until it is annotated
    virtshift.io/maintenance-complete=true after it drained (node-9 carries one from an earlier
    maintenance, which must not release it); VMs never move onto the node still to come, even
    when it is the emptiest (node-9, emptied by the test before)."""
    kube = env["kube"]
    wave = ["node-10", "node-9"]  # the wave's order: by name
    for n in wave:
        kube.patch(rest.NODES, n, {"metadata": {"labels": {"pool": "mc"}}})
    kube.patch(rest.NODES, "node-9", {"metadata": {"annotations": {MAINTENANCE_DONE: "true"}}})
    leaving = {v["metadata"]["name"] for v in vmis_on(kube, "node-10")}
    assert leaving
    kube.create(rest.NODE_DRAINS, drain_body(
        "mc", nodeSelector={"matchLabels": {"pool": "mc"}}, maxUnavailable=1))

    def node_phases() -> list[str]:
        return [n["phase"] for n in ((get_drain(kube, "mc") or {}).get("status") or {}).get(
            "nodes") or []]

    wait_for(lambda: node_phases() == ["Drained", "Waiting"], timeout=120, what="node-10 held")
    time.sleep(1)  # held: nothing moves on without the annotation
    assert node_phases() == ["Drained", "Waiting"]
    assert kube.get(rest.NODES, "node-10")["spec"]["unschedulable"] is True
    assert not kube.get(rest.NODES, "node-9")["spec"].get("unschedulable")
    assert not {v["metadata"]["name"] for v in vmis_on(kube, "node-9")} & leaving
    kube.patch(rest.NODES, "node-10", {"metadata": {"annotations": {MAINTENANCE_DONE: "true"}}})
    wait_for(lambda: node_phases() == ["Released", "Drained"], timeout=120,
             what="node-10 released, node-9 drained")
    time.sleep(1)  # node-9's old annotation was removed when its turn began: it is held
    assert node_phases() == ["Released", "Drained"]
    released = kube.get(rest.NODES, "node-10")
    assert not released["spec"].get("unschedulable")
    assert MAINTENANCE_DONE not in released["metadata"].get("annotations", {})  # consumed
    held = kube.get(rest.NODES, "node-9")
    assert held["spec"]["unschedulable"] is True
    assert MAINTENANCE_DONE not in held["metadata"].get("annotations", {})
    kube.patch(rest.NODES, "node-9", {"metadata": {"annotations": {MAINTENANCE_DONE: "true"}}})
    wait_for(lambda: phase_of(kube, "mc") == "Drained" and node_phases() == ["Released"] * 2,
             timeout=60, what="wave complete")
    assert not kube.get(rest.NODES, "node-9")["spec"].get("unschedulable")
    kube.delete(rest.NODE_DRAINS, "mc")  # maintenance over: the nodes are free for others
    wait_for(lambda: get_drain(kube, "mc") is None, timeout=60, what="mc gone")


VAP = rest.Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies",
                    namespaced=False)
VAP_BINDING = rest.Resource("admissionregistration.k8s.io", "v1",
                            "validatingadmissionpolicybindings", namespaced=False)


def test_a_failed_uncordon_keeps_the_drain_until_it_succeeds(env) -> None:
    """Issue 9: deleting a NodeDrain whose uncordon is refused keeps its finalizer, retries,
    and says so in an Event; the node is uncordoned once the API server lets it."""
    kube = env["kube"]
    for name in ("fenced", "fence-probe"):
        kube.create(rest.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name}, "spec": {"unschedulable": name == "fence-probe"}})
    kube.create(rest.NODE_DRAINS, drain_body("fenced", nodeName="fenced"))
    wait_for(lambda: phase_of(kube, "fenced") == "Drained", what="fenced drained")
    kube.create(VAP, {"apiVersion": "admissionregistration.k8s.io/v1",
                      "kind": "ValidatingAdmissionPolicy", "metadata": {"name": "stay-cordoned"},
                      "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [{
                          "apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
                          "resources": ["nodes"]}]},
                          "validations": [{"expression": (
                              "!(object.metadata.name in ['fenced', 'fence-probe']) || "
                              "(has(object.spec.unschedulable) && object.spec.unschedulable)"),
                              "message": "this node stays cordoned (test)"}]}})
    kube.create(VAP_BINDING, {"apiVersion": "admissionregistration.k8s.io/v1",
                              "kind": "ValidatingAdmissionPolicyBinding",
                              "metadata": {"name": "stay-cordoned"},
                              "spec": {"policyName": "stay-cordoned",
                                       "validationActions": ["Deny"]}})

    def refused() -> bool:
        try:
            kube.patch(rest.NODES, "fence-probe", {"spec": {"unschedulable": None}})
        except rest.ApiError:
            return True
        kube.patch(rest.NODES, "fence-probe", {"spec": {"unschedulable": True}})
        return False

    wait_for(refused, timeout=30, what="the admission policy in force")
    try:
        kube.delete(rest.NODE_DRAINS, "fenced")
        events = lambda: [e for e in kube.items(rest.EVENTS, "default")  # noqa: E731
                          if e["involvedObject"].get("name") == "fenced"
                          and e["reason"] == "CleanupFailed"]
        wait_for(events, timeout=30, what="a CleanupFailed event")
        assert "uncordon fenced" in events()[0]["message"]
        drain = get_drain(kube, "fenced")
        assert drain is not None and drain["status"]["phase"] == "Terminating"
        assert kube.get(rest.NODES, "fenced")["spec"]["unschedulable"] is True
    finally:
        kube.delete(VAP_BINDING, "stay-cordoned")
        kube.delete(VAP, "stay-cordoned")
    wait_for(lambda: get_drain(kube, "fenced") is None, timeout=60, what="drain gone at last")
    node = kube.get(rest.NODES, "fenced")
    assert not node["spec"].get("unschedulable")
    assert "virtshift.io/cordoned-by" not in (node["metadata"].get("annotations") or {})


def test_second_drain_for_a_node_reports_conflict_and_touches_nothing(env) -> None:
    kube = env["kube"]
    kube.create(rest.NODE_DRAINS, drain_body("first-node-4", nodeName="node-4"))
    wait_for(lambda: phase_of(kube, "first-node-4") in ("Draining", "Drained"))
    kube.create(rest.NODE_DRAINS, drain_body("second-node-4", nodeName="node-4"))
    drain = wait_for(lambda: phase_of(kube, "second-node-4") == "Conflict"
                     and get_drain(kube, "second-node-4"), what="conflict")
    ready = next(c for c in drain["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Conflict" and "first-node-4" in ready["message"]
    assert migrations_of(kube, "second-node-4") == []
    wait_for(lambda: phase_of(kube, "first-node-4") == "Drained", timeout=120)
    kube.delete(rest.NODE_DRAINS, "second-node-4")
    wait_for(lambda: get_drain(kube, "second-node-4") is None)
    assert kube.get(rest.NODES, "node-4")["spec"]["unschedulable"] is True  # first still holds


def test_missing_node_is_reported_and_awaited(env) -> None:
    kube, op = env["kube"], env["op"]
    kube.create(rest.NODE_DRAINS, drain_body("ghost", nodeName="node-ghost"))
    drain = wait_for(lambda: phase_of(kube, "ghost") == "Pending" and get_drain(kube, "ghost"))
    ready = next(c for c in drain["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NodeNotFound"
    time.sleep(1)
    assert op.proc is not None and op.proc.poll() is None  # no crash loop
    rv = get_drain(kube, "ghost")["metadata"]["resourceVersion"]
    time.sleep(1)
    assert get_drain(kube, "ghost")["metadata"]["resourceVersion"] == rv  # no status churn
    kube.create(rest.NODES, {"apiVersion": "v1", "kind": "Node",
                             "metadata": {"name": "node-ghost"}})
    wait_for(lambda: phase_of(kube, "ghost") == "Drained", what="drained once it exists")


def test_evict_pods_honours_pod_disruption_budgets(env) -> None:
    kube = env["kube"]
    kube.create_or_get(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": "apps"}})

    def pod(name: str, **meta: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "apps", **meta},
                "spec": {"nodeName": "node-8", "containers": [{"name": "c", "image": "app"}]}}

    kube.create(rest.PODS, pod("guarded", labels={"app": "guarded"}))
    kube.create(rest.PODS, pod("agent", ownerReferences=[{
        "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "controller": True,
        "uid": "00000000-0000-0000-0000-000000000001"}]))
    kube.create(rest.PDBS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                            "metadata": {"name": "guarded", "namespace": "apps"},
                            "spec": {"minAvailable": 1,
                                     "selector": {"matchLabels": {"app": "guarded"}}}})
    kube.create(rest.NODE_DRAINS, drain_body("drain-node-8", nodeName="node-8", evictPods=True))
    drain = wait_for(lambda: (d := get_drain(kube, "drain-node-8")) and
                     d.get("status", {}).get("blockingPods") and
                     d["status"]["counts"]["pending"] == d["status"]["counts"]["migrating"] == 0
                     and d, timeout=120, what="VMs gone, pod blocked")
    assert drain["status"]["phase"] != "Drained"
    assert drain["status"]["podsRemaining"] == 1
    assert drain["status"]["blockingPods"][0].startswith("apps/guarded: ")
    kube.delete(rest.PDBS, "guarded", "apps")
    wait_for(lambda: phase_of(kube, "drain-node-8") == "Drained", timeout=60, what="drained")
    assert kube.get(rest.PODS, "guarded", "apps") is None
    assert kube.get(rest.PODS, "agent", "apps") is not None  # DaemonSet pods stay


def free_node(kube: rest.KubeClient) -> str:
    """The node with the most VMs that no NodeDrain covers (the rolling wave's released nodes
    are still its own, and it covers those still to come)."""
    covered = {n["name"] for d in kube.items(rest.NODE_DRAINS)
               for n in (d.get("status") or {}).get("nodes") or []}
    return max((f"node-{i}" for i in range(2, 11)
                if not kube.get(rest.NODES, f"node-{i}")["spec"].get("unschedulable")
                and f"node-{i}" not in covered),
               key=lambda n: len(vmis_on(kube, n)))


def test_without_a_downtime_source_no_downtime_is_reported_as_observed(env) -> None:
    """KubeVirt publishes no per-migration downtime: an operator run without
    --downtime-source reports predictions only, even where the simulator annotated one."""
    kube, op = env["kube"], env["op"]
    op.stop()
    op.extra = [a for a in op.extra if a not in ("--downtime-source", runner.DOWNTIME_SOURCE)]
    op.start()
    node = free_node(kube)
    assert vmis_on(kube, node)
    kube.create(rest.NODE_DRAINS, drain_body("unobserved-node-9", nodeName=node))
    drain = wait_for(lambda: phase_of(kube, "unobserved-node-9") in ("Drained", "Stalled")
                     and get_drain(kube, "unobserved-node-9"), timeout=180,
                     what=lambda: f"drained: {get_drain(kube, 'unobserved-node-9')}")
    time.sleep(1.5)  # a few more passes: still nothing observed
    drain = get_drain(kube, "unobserved-node-9")
    moved = [v for v in drain["status"]["vms"] if v["phase"] == "Succeeded"]
    assert moved
    assert all("observedDowntimeMs" not in v and "downtimeSource" not in v for v in moved)
    assert all(v["predictedDowntimeMs"] >= 0 for v in moved if v.get("mode") !=
               "QuickMigration")
    ours = [m for m in migrations_of(kube, "unobserved-node-9")
            if m["status"]["phase"] == "Succeeded"]
    assert ours and all(DOWNTIME_ANNOTATION in m["metadata"]["annotations"] for m in ours)
    events = kube.items(rest.EVENTS, "default",
                        field_selector="involvedObject.name=unobserved-node-9")
    assert not [e for e in events if e["reason"] == "DowntimeExceeded"
                or "observed downtime" in e["message"]]


def test_pausing_withdraws_what_kubevirt_has_not_started(env) -> None:
    """paused: our migrations still queued in KubeVirt are withdrawn and only those under way
    go on; resumed, every VM leaves on its first attempt (a withdrawal is no failed one)."""
    kube = env["kube"]

    def ours() -> list[dict[str, Any]]:
        return migrations_of(kube, "paused-drain")

    def queued(m: dict[str, Any]) -> bool:
        return (m.get("status") or {}).get("phase", "") in ("", "Pending")

    node = free_node(kube)
    on_node = {v["metadata"]["name"] for v in vmis_on(kube, node)}
    assert len(on_node) >= 5
    kube.create(rest.NODE_DRAINS, drain_body("paused-drain", nodeName=node))
    wait_for(lambda: sum(not queued(m) for m in ours()) >= 2 and any(map(queued, ours())),
             timeout=60, every=0.02, what="two migrations under way and one queued")
    waiting = {m["metadata"]["uid"] for m in ours() if queued(m)}
    kube.patch(rest.NODE_DRAINS, "paused-drain", {"spec": {"paused": True}})
    # Deleted before KubeVirt gave them a slot (both slots were busy for seconds yet).
    wait_for(lambda: not waiting & {m["metadata"]["uid"] for m in ours()}, timeout=30,
             what="the queued migrations withdrawn")
    under_way = {m["metadata"]["name"] for m in ours()}
    time.sleep(3)  # 30 s of cluster time: slots free up, and nothing takes them
    assert {m["metadata"]["name"] for m in ours()} <= under_way
    status = get_drain(kube, "paused-drain")["status"]
    assert any(v["phase"] == "Waiting" and v["reason"] == "Paused" for v in status["vms"]), \
        status["vms"]
    assert {v["metadata"]["name"] for v in vmis_on(kube, node)} & on_node

    kube.patch(rest.NODE_DRAINS, "paused-drain", {"spec": {"paused": False}})
    wait_for(lambda: phase_of(kube, "paused-drain") == "Drained", timeout=120, what="drained")
    assert not vmis_on(kube, node)
    succeeded = [m for m in ours() if m["status"]["phase"] == "Succeeded"]
    assert sorted(m["spec"]["vmiName"] for m in succeeded) == sorted(on_node)
    assert {m["metadata"]["labels"][ATTEMPT_LABEL] for m in succeeded} == {"1"}
    kube.delete(rest.NODE_DRAINS, "paused-drain")
    wait_for(lambda: get_drain(kube, "paused-drain") is None, timeout=60, what="drain gone")


def _refuse(kube: rest.KubeClient, name: str, resource: str, group: str, operations: list[str],
            expression: str) -> None:
    """A ValidatingAdmissionPolicy (and its binding) that denies what ``expression`` does
    not allow, with the message "refused (test)"."""
    kube.create(VAP, {"apiVersion": "admissionregistration.k8s.io/v1",
                      "kind": "ValidatingAdmissionPolicy", "metadata": {"name": name},
                      "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [{
                          "apiGroups": [group], "apiVersions": ["*"], "operations": operations,
                          "resources": [resource]}]},
                          "validations": [{"expression": expression,
                                           "message": "refused (test)"}]}})
    kube.create(VAP_BINDING, {"apiVersion": "admissionregistration.k8s.io/v1",
                              "kind": "ValidatingAdmissionPolicyBinding",
                              "metadata": {"name": name},
                              "spec": {"policyName": name, "validationActions": ["Deny"]}})


def _allow(kube: rest.KubeClient, name: str) -> None:
    kube.delete(VAP_BINDING, name)
    kube.delete(VAP, name)


def _events_of(kube: rest.KubeClient, drain: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.items(rest.EVENTS, "default",
                                  field_selector=f"involvedObject.name={drain}")
            if e["reason"] == reason]


def _condition(drain: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((drain or {}).get("status") or {}).get("conditions") or []
                 if c["type"] == type_), {})


def test_a_refused_migration_is_reported_and_stalls_the_drain_until_it_goes_through(env) -> None:
    """Issue 20 item 12: the API server refuses the migration of one VM (an admission
    policy), on every pass. The status says what happened -- that VM Waiting, CreateFailed,
    with the API's message, never Created/Migrating -- with a WriteFailed Event; once the
    refusal has lasted WRITE_STALL_SECONDS of cluster time the drain is Stalled with that
    reason, and it recovers by itself when the create goes through."""
    kube = env["kube"]
    node = free_node(kube)
    on_node = sorted((v["metadata"]["namespace"], v["metadata"]["name"])
                     for v in vmis_on(kube, node))
    assert on_node
    ns, victim = on_node[0]
    _refuse(kube, "refuse-migration", "virtualmachineinstancemigrations", "kubevirt.io",
            ["CREATE"], f"object.spec.vmiName != '{victim}' && "
            "object.spec.vmiName != 'vap-probe'")

    def refused() -> bool:
        try:
            kube.create(rest.VMIMS, {"apiVersion": "kubevirt.io/v1",
                                     "kind": "VirtualMachineInstanceMigration",
                                     "metadata": {"name": "vap-probe", "namespace": ns},
                                     "spec": {"vmiName": "vap-probe"}})
        except rest.ApiError as exc:
            return "refused (test)" in str(exc)
        kube.delete(rest.VMIMS, "vap-probe", ns)
        return False

    wait_for(refused, timeout=30, what="the admission policy in force")
    try:
        kube.create(rest.NODE_DRAINS, drain_body("refused", nodeName=node))

        def victim_entry() -> dict[str, Any]:
            vms = ((get_drain(kube, "refused") or {}).get("status") or {}).get("vms") or []
            return next((v for v in vms if (v["namespace"], v["name"]) == (ns, victim)), {})

        seen: list[dict[str, Any]] = []

        def refused_in_status() -> bool:
            e = victim_entry()
            if e and e not in seen:
                seen.append(e)
            return e.get("reason") == "CreateFailed"

        wait_for(refused_in_status, timeout=60,
                 what=lambda: f"the refusal in the status (entries seen: {seen})")
        e = victim_entry()
        assert e["phase"] == "Waiting" and "refused (test)" in e["message"], e
        assert not [m for m in migrations_of(kube, "refused") if m["spec"]["vmiName"] == victim]
        # Never reported as what it was not: no entry of the victim said Created/Migrating.
        assert not [s for s in seen if s["phase"] == "Migrating" or s.get("reason") == "Created"]
        wait_for(lambda: _events_of(kube, "refused", "WriteFailed"), timeout=30,
                 what="a WriteFailed event")
        assert "refused (test)" in _events_of(kube, "refused", "WriteFailed")[0]["message"]
        drain = wait_for(lambda: phase_of(kube, "refused") == "Stalled"
                         and get_drain(kube, "refused"), timeout=90,
                         what=lambda: f"Stalled ({get_drain(kube, 'refused')['status']})")
        stalled = _condition(drain, "Stalled")
        assert stalled["reason"] == "CreateFailed" and victim in stalled["message"], stalled
        assert "refused (test)" in stalled["message"]
        assert _events_of(kube, "refused", "Stalled")
    finally:
        _allow(kube, "refuse-migration")
    wait_for(lambda: phase_of(kube, "refused") == "Drained", timeout=120,
             what=lambda: f"drained once allowed ({get_drain(kube, 'refused')['status']})")
    assert not vmis_on(kube, node)
    assert _condition(get_drain(kube, "refused"), "Stalled")["status"] == "False"
    kube.delete(rest.NODE_DRAINS, "refused")
    wait_for(lambda: get_drain(kube, "refused") is None, timeout=60, what="drain gone")


def test_a_refused_cordon_is_not_reported_as_cordoned(env) -> None:
    """Issue 20 item 12: the cordon is refused on every pass: Cordoned is False with
    CordonFailed and the API's message, and the drain goes Stalled once it lasts; allowed,
    the node is cordoned and drained."""
    kube = env["kube"]
    for name in ("uncordonable", "uncordonable-probe"):
        kube.create(rest.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    _refuse(kube, "refuse-cordon", "nodes", "", ["UPDATE"],
            "!object.metadata.name.startsWith('uncordonable') || "
            "!has(object.spec.unschedulable) || !object.spec.unschedulable")

    def refused() -> bool:
        try:
            kube.patch(rest.NODES, "uncordonable-probe", {"spec": {"unschedulable": True}})
        except rest.ApiError as exc:
            return "refused (test)" in str(exc)
        kube.patch(rest.NODES, "uncordonable-probe", {"spec": {"unschedulable": None}})
        return False

    wait_for(refused, timeout=30, what="the admission policy in force")
    try:
        kube.create(rest.NODE_DRAINS, drain_body("refused-cordon", nodeName="uncordonable"))
        drain = wait_for(lambda: (d := get_drain(kube, "refused-cordon")) and _condition(
            d, "Cordoned").get("reason") == "CordonFailed" and d, timeout=60,
            what=lambda: f"CordonFailed ({get_drain(kube, 'refused-cordon')})")
        cordoned = _condition(drain, "Cordoned")
        assert cordoned["status"] == "False" and "refused (test)" in cordoned["message"]
        drain = wait_for(lambda: phase_of(kube, "refused-cordon") == "Stalled"
                         and get_drain(kube, "refused-cordon"), timeout=90, what="Stalled")
        assert _condition(drain, "Stalled")["reason"] == "CordonFailed"
        assert not kube.get(rest.NODES, "uncordonable")["spec"].get("unschedulable")
    finally:
        _allow(kube, "refuse-cordon")
    wait_for(lambda: phase_of(kube, "refused-cordon") == "Drained", timeout=60,
             what="drained once allowed")
    assert _condition(get_drain(kube, "refused-cordon"), "Cordoned")["status"] == "True"
    kube.delete(rest.NODE_DRAINS, "refused-cordon")
    wait_for(lambda: get_drain(kube, "refused-cordon") is None, timeout=60, what="gone")


def test_operator_logged_no_tracebacks(env) -> None:
    logs = env["op"].logs()
    assert "Traceback" not in logs, logs[-5000:]


def test_the_charts_service_account_was_never_refused(env) -> None:
    """No RBAC refusal in the operator's log (the API server's 403 says `User "..." cannot
    <verb> resource`): the chart's RBAC covered every request it made. (The admission policy
    a test above installs refuses an uncordon too, but with 422 and its own message.)"""
    logs = env["op"].logs()
    # Our client's "403 Forbidden: ...", kopf's APIForbiddenError; not a log line's time
    # whose milliseconds happen to be ",403".
    refused = [line for line in logs.splitlines()
               if re.search(r"system:serviceaccount:\S+ cannot |\b403 Forbidden|"
                            r"APIForbiddenError|[\"']code[\"']: 403\b", line)]
    assert not refused, refused[:10]
