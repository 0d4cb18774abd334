"""The NodeDrain planner, table-driven over hand-built cluster snapshots (no API server)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from virtshift.api.nodedrain import NodeDrainSpec, NodeDrainStatus, NodeEntry, VMEntry
from virtshift.api.units import GiB
from virtshift.domain.drain import CORDONED_BY, DrainSnapshot, finalize_drain, plan_drain, stamp
from virtshift.domain.eta import Estimator
from virtshift.domain.rules import Rules
from virtshift.domain.views import (
    DowntimeObservation,
    KubeVirtLimits,
    KubeVirtMigrationConfig,
    MigrationInfo,
    NodeInfo,
    PodInfo,
    QuickMigrationRecord,
    VMIInfo,
    VMInfo,
)

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
# As virt-handler labels a node (node_labeller.go prepareLabels, heartbeat.go).
SKYLAKE = {"cpu-model-migration.node.kubevirt.io/Skylake": "true",
           "cpu-model.node.kubevirt.io/Skylake": "true",
           "host-model-cpu.node.kubevirt.io/Skylake": "true",
           "kubevirt.io/schedulable": "true", "zone": "a"}


def node(name: str, **kw: Any) -> NodeInfo:
    return NodeInfo(name=name, labels=kw.pop("labels", SKYLAKE), cpu=64, memory=512 * GiB, **kw)


def vmi(name: str, node_name: str = "n1", **kw: Any) -> VMIInfo:
    """A VMI whose dirty rate the metrics source reports (0 unless given; None: unknown)."""
    return VMIInfo(namespace="ns", name=name, node=node_name, memory=kw.pop("memory", 4 * GiB),
                   dirty_rate=kw.pop("dirty_rate", 0.0), **kw)


def mig(vm: str, attempt: int, phase: str, **kw: Any) -> MigrationInfo:
    return MigrationInfo(namespace="ns", name=f"vs-d-{vm}-{attempt}", vmi=vm, phase=phase,
                         drain="d", attempt=attempt, source=kw.pop("source", "n1"), **kw)


def cordoned() -> list[NodeInfo]:
    """n1 as the pass after the drain cordoned it."""
    return [node("n1", unschedulable=True), node("n2"), node("n3")]


def snap(vmis: list[VMIInfo], **kw: Any) -> DrainSnapshot:
    spec = kw.pop("spec", {"nodeName": "n1"})
    nodes = kw.pop("nodes", [node("n1"), node("n2"), node("n3")])
    ours = kw.pop("migrations", [])
    return DrainSnapshot(
        name="d", generation=1, spec=NodeDrainSpec.model_validate(spec),
        status=kw.pop("status", NodeDrainStatus()), now=kw.pop("now", NOW),
        nodes={n.name: n for n in nodes}, vmis={v.key: v for v in vmis}, migrations=ours,
        cluster_unfinished=[m for m in ours if not m.final] + kw.pop("others", []), **kw)


def created(decision) -> list[str]:
    return [m.name for m in decision.create]


def entry(decision, name: str):
    return next(e for e in decision.status.vms if e.name == name)


# Target pods that start at once: no start-up to send one VM's memory during another's, so no
# start waits for a transfer (domain.stagger). For the tests of limits and placement.
INSTANT = Estimator(target_startup=0.0)


def test_cordons_and_starts_within_the_outbound_limit() -> None:
    d = plan_drain(snap([vmi("a"), vmi("b", memory=8 * GiB), vmi("c")], estimator=INSTANT))
    assert d.cordon == ["n1"]
    # Longest first; two may run per source node (KubeVirt's limit) and a round more waits in
    # KubeVirt's queue, so a slot never idles between our passes.
    assert created(d) == ["vs-d-b-1", "vs-d-a-1", "vs-d-c-1"]
    assert d.status.counts.migrating == 3 and d.status.counts.pending == 0
    assert d.status.progress == "0/3" and d.status.phase == "Draining"
    assert all(m.selector == {} and m.attempt == 1 for m in d.create)


def test_the_same_snapshot_gives_the_same_decision() -> None:
    s = snap([vmi(f"v{i}") for i in range(6)])
    assert plan_drain(s) == plan_drain(s)


@pytest.mark.parametrize(("others", "limits", "expected"), [
    (0, KubeVirtLimits(5, 2), 4),  # 2 per node running, 2 more queued
    (4, KubeVirtLimits(5, 2), 4),
    (9, KubeVirtLimits(5, 2), 1),  # cluster: 5 running, 5 queued
    (10, KubeVirtLimits(5, 2), 0),
    (0, KubeVirtLimits(1, 2), 2),
    (0, KubeVirtLimits(5, 3), 5),
])
def test_kubevirt_limits_count_every_unfinished_migration(others, limits, expected) -> None:
    """KubeVirt's limits bound the migrations it runs; virtshift keeps a round more waiting in
    KubeVirt's queue (before any reaction is measured), counting every unfinished migration
    (anyone's, queued or running)."""
    busy = [MigrationInfo(namespace="x", name=f"o{i}", vmi=f"o{i}", phase="Pending",
                          source=f"n{9 + i}") for i in range(others)]
    d = plan_drain(snap([vmi(f"v{i}") for i in range(5)], others=busy, limits=limits,
                        estimator=INSTANT))
    assert len(d.create) == expected


@pytest.mark.parametrize(("reaction", "rounds"), [
    (None, 1),  # not measured yet
    (0.5, 1),  # we answer within half a migration: one round queued covers it
    (1.0, 1),
    (2.5, 3),  # a slow answer (a busy API server, a fast simulated clock): more rounds
    (100.0, 4),  # never more than MAX_QUEUE_ROUNDS
])
def test_the_kubevirt_queue_covers_our_reaction(reaction: float | None, rounds: int) -> None:
    """Rounds of migrations wait in KubeVirt's queue (it starts each as a slot frees) so that
    no slot idles while we react; ``reaction``: our measured answer time, in typical
    migrations (predicted) of those still to start."""
    vms = [vmi(f"v{i:02}") for i in range(20)]
    typical = plan_drain(snap(vms, estimator=INSTANT)).status.vms[0].predicted_seconds
    assert typical
    d = plan_drain(snap(vms, limits=KubeVirtLimits(10, 2), estimator=INSTANT,
                        reaction_seconds=(reaction or 0.0) * typical))
    assert len(d.create) == 2 + rounds * 2


def test_an_in_flight_migration_on_the_node_counts_against_outbound() -> None:
    d = plan_drain(snap([vmi("a"), vmi("b"), vmi("c")], migrations=[mig("a", 1, "Running")],
                        estimator=INSTANT))
    assert sorted(created(d)) == ["vs-d-b-1", "vs-d-c-1"]  # 1 running + 1 + 1 queued
    d = plan_drain(snap([vmi(x) for x in "abcde"], migrations=[mig("a", 1, "Running")],
                        estimator=INSTANT))
    assert len(created(d)) == 3  # two per node, and a round of two queued
    assert entry(d, "a").phase == "Migrating" and entry(d, "a").reason == "Running"


def observed(ms: int, source: str = "annotation:example.com/downtime-ms"
             ) -> DowntimeObservation:
    return DowntimeObservation(ms, source)


def test_moved_vm_is_succeeded_with_its_observed_downtime_and_its_source() -> None:
    d = plan_drain(snap([vmi("a", node_name="n2")], nodes=cordoned(),
                        migrations=[mig("a", 1, "Succeeded", target="n2",
                                        downtime=observed(42))]))
    e = entry(d, "a")
    assert (e.phase, e.target_node, e.observed_downtime_ms, e.downtime_source) == (
        "Succeeded", "n2", 42, "annotation:example.com/downtime-ms")
    assert d.status.phase == "Drained" and d.status.completion_time == stamp(NOW)
    assert d.downtimes == [observed(42)]
    assert ("Normal", "Migrated", "ns/a moved to n2 (observed downtime 42 ms, "
            "annotation:example.com/downtime-ms)") in d.events


def test_without_an_observation_a_prediction_is_never_reported_as_observed() -> None:
    """Predicted 900 ms against a 300 ms maxDowntime (the ladder allowed it), nothing observed:
    the VM moved, its prediction is kept as one, and no breach is reported."""
    before = NodeDrainStatus(vms=[VMEntry(namespace="ns", name="a", phase="Migrating",
                                          predicted_downtime_ms=900)])
    d = plan_drain(snap([vmi("a", node_name="n2")], status=before,
                        rules={"ns/a": Rules(max_downtime=0.3)},
                        migrations=[mig("a", 1, "Succeeded", target="n2")]))
    e = entry(d, "a")
    assert (e.phase, e.reason, e.predicted_downtime_ms) == ("Succeeded", "Migrated", 900)
    assert e.observed_downtime_ms is None and e.downtime_source is None
    assert "DowntimeExceeded" not in {r for _k, r, _m in d.events}
    assert ("Normal", "Migrated", "ns/a moved to n2") in d.events
    assert d.downtimes == []
    wire = d.status.wire()["vms"][0]
    assert "observedDowntimeMs" not in wire and wire["predictedDowntimeMs"] == 900


def test_the_prediction_is_kept_while_migrating_and_after() -> None:
    first = plan_drain(snap([vmi("a")]))
    predicted = entry(first, "a").predicted_downtime_ms
    assert predicted is not None and entry(first, "a").phase == "Migrating"
    running = plan_drain(snap([vmi("a")], status=first.status,
                              migrations=[mig("a", 1, "Running")]))
    assert entry(running, "a").predicted_downtime_ms == predicted
    done = plan_drain(snap([vmi("a", node_name="n2")], status=running.status,
                           migrations=[mig("a", 1, "Succeeded", target="n2",
                                           downtime=observed(7))]))
    e = entry(done, "a")
    assert (e.predicted_downtime_ms, e.observed_downtime_ms) == (predicted, 7)


def test_the_prediction_survives_a_vmi_that_moved_before_its_migration_says_so() -> None:
    """Separate watches: the VMI's new node may arrive before the VMIM's Succeeded."""
    before = NodeDrainStatus(vms=[VMEntry(namespace="ns", name="a", phase="Migrating",
                                          predicted_downtime_ms=30)])
    d = plan_drain(snap([vmi("a", node_name="n2")], status=before,
                        migrations=[mig("a", 1, "Running")]))
    assert (entry(d, "a").reason, entry(d, "a").predicted_downtime_ms) == ("LeftNode", 30)


def test_an_observation_that_comes_a_pass_later_is_reported_once() -> None:
    """The migration succeeds first; its measured downtime arrives afterwards."""
    rules = {"ns/a": Rules(max_downtime=0.1)}
    moved = [vmi("a", node_name="n2")]
    first = plan_drain(snap(moved, rules=rules,
                            migrations=[mig("a", 1, "Succeeded", target="n2")]))
    assert entry(first, "a").reason == "Migrated" and first.downtimes == []
    later = plan_drain(snap(moved, rules=rules, status=first.status,
                            migrations=[mig("a", 1, "Succeeded", target="n2",
                                            downtime=observed(250))]))
    assert entry(later, "a").reason == "DowntimeExceeded"
    assert later.downtimes == [observed(250)]
    assert [r for _k, r, _m in later.events] == ["DowntimeExceeded"]
    again = plan_drain(snap(moved, rules=rules, status=later.status,
                            migrations=[mig("a", 1, "Succeeded", target="n2",
                                            downtime=observed(250))]))
    assert again.downtimes == [] and again.events == []


def test_never_drained_while_a_launcher_pod_of_a_vm_to_move_runs_there() -> None:
    """Issue 8: VMIs that say nothing (their status lost) must not make a node look empty;
    a source pod that lingers after its VM moved keeps the node Draining too."""
    lost = PodInfo("ns", "virt-launcher-x-abcde", "n1", "launcher", vmi="ns/x")
    d = plan_drain(snap([], launchers=[lost], nodes=cordoned()))
    assert d.status.phase == "Draining" and d.status.counts.total == 0
    drained = next(c for c in d.status.conditions if c.type == "Drained")
    assert drained.status == "False" and "ns/virt-launcher-x-abcde" in drained.message
    moved = snap([vmi("a", node_name="n2")], migrations=[mig("a", 1, "Succeeded", target="n2")],
                 launchers=[PodInfo("ns", "virt-launcher-a-old", "n1", "launcher", vmi="ns/a")],
                 nodes=cordoned())
    assert plan_drain(moved).status.phase == "Draining"
    assert plan_drain(dataclasses.replace(moved, launchers=())).status.phase == "Drained"


def test_an_empty_node_is_drained_only_once_it_is_cordoned() -> None:
    """A cordon the API server refused leaves the node open to new VMs: not drained."""
    d = plan_drain(snap([]))
    assert d.cordon == ["n1"] and d.status.phase == "Draining"
    assert plan_drain(snap([], nodes=cordoned())).status.phase == "Drained"


def test_a_skipped_vms_launcher_pod_does_not_hold_the_drain() -> None:
    pod = PodInfo("ns", "virt-launcher-gpu", "n1", "launcher", vmi="ns/gpu")
    d = plan_drain(snap([vmi("gpu", migratable=False, not_migratable_reason="HostDevice")],
                        rules={"ns/gpu": Rules(non_migratable="Skip")}, launchers=[pod],
                        nodes=cordoned()))
    assert entry(d, "gpu").phase == "Skipped" and d.status.phase == "Drained"


def test_a_skipped_vm_stays_reported_once_its_node_is_drained() -> None:
    """The VM is still on the node in maintenance: the drain keeps it in its status (and
    counts), on every later pass, not only on the pass that skipped it (issue 9: the policy's
    outcomes.skipped counts these entries)."""
    gpu = vmi("gpu", migratable=False, not_migratable_reason="HostDevice")
    pod = PodInfo("ns", "virt-launcher-gpu", "n1", "launcher", vmi="ns/gpu")
    s = snap([gpu], rules={"ns/gpu": Rules(non_migratable="Skip")}, launchers=[pod],
             nodes=cordoned())
    first = plan_drain(s)
    assert first.status.phase == "Drained" and first.status.nodes[0].phase == "Drained"
    later = plan_drain(dataclasses.replace(s, status=first.status,
                                           now=NOW + dt.timedelta(minutes=1)))
    assert later.status.phase == "Drained" and later.status.counts.skipped == 1
    assert entry(later, "gpu").phase == "Skipped" and not later.changes_cluster
    # Once the VM has gone (say, stopped by its owner) there is nothing left to report.
    gone = plan_drain(dataclasses.replace(s, status=later.status, vmis={}, launchers=()))
    assert gone.status.counts.total == 0 and gone.status.phase == "Drained"


@pytest.mark.parametrize(("action", "phase", "halts"), [
    ("Fail", "Failed", False), ("Skip", "Skipped", False), ("Restart", "Migrating", True),
])
def test_non_migratable_vms_follow_the_policy(action, phase, halts) -> None:
    gpu = vmi("gpu", migratable=False, not_migratable_reason="HostDeviceNotLiveMigratable",
              not_migratable_message="has a GPU")
    d = plan_drain(snap([gpu], vms={"ns/gpu": VMInfo("ns", "gpu")},
                        rules={"ns/gpu": Rules(non_migratable=action)}))
    e = entry(d, "gpu")
    assert e.phase == phase and e.reason == "HostDeviceNotLiveMigratable"
    assert bool(d.halt) is halts and not d.create


def test_failed_vms_stall_the_drain_with_their_names() -> None:
    gpu = vmi("gpu", migratable=False, not_migratable_reason="HostDeviceNotLiveMigratable")
    d = plan_drain(snap([gpu]))
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert stalled.status == "True" and stalled.reason == "MigrationFailed"
    assert "ns/gpu" in stalled.message and d.status.phase == "Stalled"


def test_quick_migration_done_reports_downtime() -> None:
    stopped = NOW - dt.timedelta(seconds=20)
    moved = vmi("gpu", node_name="n3", running_since=NOW - dt.timedelta(seconds=5))
    vm = VMInfo("ns", "gpu", quick=QuickMigrationRecord("d", "n1", stopped, started=True))
    d = plan_drain(snap([moved], vms={"ns/gpu": vm}))
    e = entry(d, "gpu")
    assert (e.phase, e.mode, e.observed_downtime_ms, e.downtime_source) == (
        "Succeeded", "QuickMigration", 15000, "restartTimestamps")
    assert d.downtimes == [DowntimeObservation(15000, "restartTimestamps")]


def test_quick_migration_starts_the_vm_once_its_vmi_is_gone() -> None:
    vm = VMInfo("ns", "gpu", run_strategy="Halted",
                quick=QuickMigrationRecord("d", "n1", NOW, started=False))
    d = plan_drain(snap([], vms={"ns/gpu": vm}))
    assert d.start == ["ns/gpu"] and entry(d, "gpu").phase == "Migrating"


@pytest.mark.parametrize(("ended_ago", "failures", "expect_phase", "expect_create"), [
    (10, 1, "Waiting", []),  # backoff 30s after the first failure
    (31, 1, "Migrating", ["vs-d-a-2"]),
    (50, 2, "Waiting", []),  # 60s after the second
    (61, 2, "Migrating", ["vs-d-a-3"]),
    (999, 3, "Failed", []),  # maxAttempts 3
])
def test_retries_back_off_exponentially_up_to_max_attempts(ended_ago, failures, expect_phase,
                                                           expect_create) -> None:
    ended = NOW - dt.timedelta(seconds=ended_ago)
    migs = [mig("a", i, "Failed", ended=ended, failure="target pod failed")
            for i in range(1, failures + 1)]
    d = plan_drain(snap([vmi("a")], migrations=migs))
    assert entry(d, "a").phase == expect_phase
    assert created(d) == expect_create


@pytest.mark.parametrize(("spec", "reason"), [
    ({"nodeName": "n1", "paused": True}, "Paused"),
    ({"nodeName": "n1", "deadline": "1m"}, "DeadlineExceeded"),
])
def test_paused_or_late_drains_start_nothing_and_withdraw_the_queued(spec, reason) -> None:
    """Nothing new starts, and ours still in KubeVirt's queue (not started) are withdrawn;
    one under way goes on."""
    status = NodeDrainStatus(start_time=stamp(NOW - dt.timedelta(minutes=5)),
                             nodes=[NodeEntry(name="n1", phase="Draining")])
    ours = [mig("a", 1, "Running"), mig("b", 1, "Pending"), mig("c", 2, "")]
    d = plan_drain(snap([vmi(x) for x in "abcd"], spec=spec, status=status, migrations=ours))
    assert [m.vmi for m in d.withdraw] == ["b", "c"] and not d.create and not d.cancel
    assert (entry(d, "a").phase, entry(d, "a").reason) == ("Migrating", "Running")
    for name in "bcd":
        assert (entry(d, name).phase, entry(d, name).reason) == ("Waiting", reason)
    for name in "bc":
        assert "withdrawn from KubeVirt's queue" in entry(d, name).message


def test_a_withdrawn_migration_is_no_failed_attempt() -> None:
    """Once withdrawn (gone, the VMI's count set back to before it), the VM starts the same
    attempt again when the drain resumes: no backoff, nothing counted against maxAttempts."""
    d = plan_drain(snap([vmi("b")], attempts={"ns/b": 0}, estimator=INSTANT))
    assert created(d) == ["vs-d-b-1"]
    earlier = [mig("b", 1, "Failed", ended=NOW - dt.timedelta(hours=1))]
    d = plan_drain(snap([vmi("b")], attempts={"ns/b": 1}, migrations=earlier,
                        estimator=INSTANT))
    assert [m.attempt for m in d.create] == [2]


def test_a_dry_run_withdraws_nothing() -> None:
    d = plan_drain(snap([vmi("b")], spec={"nodeName": "n1", "dryRun": True},
                        migrations=[mig("b", 1, "Pending")]))
    assert d.withdraw == [] and not d.changes_cluster


def test_deadline_is_reported_as_stalled() -> None:
    status = NodeDrainStatus(start_time=stamp(NOW - dt.timedelta(minutes=5)))
    d = plan_drain(snap([vmi("a")], spec={"nodeName": "n1", "deadline": "1m"}, status=status))
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "DeadlineExceeded")


def test_dry_run_plans_and_changes_nothing() -> None:
    d = plan_drain(snap([vmi("a"), vmi("b", memory=16 * GiB)],
                        spec={"nodeName": "n1", "dryRun": True}))
    assert not d.changes_cluster
    assert d.status.phase == "Planned" and d.status.planned_seconds > 0
    b = entry(d, "b")
    assert b.candidates == ["n2", "n3"] and b.predicted_seconds > entry(d, "a").predicted_seconds
    assert b.predicted_downtime_ms is not None


def test_conflict_touches_nothing() -> None:
    d = plan_drain(snap([vmi("a")], conflict_with="older"))
    assert not d.changes_cluster and d.status.phase == "Conflict"
    assert next(c for c in d.status.conditions if c.type == "Ready").reason == "Conflict"


def test_missing_node_waits_as_node_not_found() -> None:
    d = plan_drain(snap([], spec={"nodeName": "ghost"}))
    assert not d.changes_cluster and d.status.phase == "Pending"
    assert next(c for c in d.status.conditions if c.type == "Ready").reason == "NodeNotFound"


def test_no_node_with_the_cpu_model_blocks_with_the_model() -> None:
    nodes = [node("n1", labels={**SKYLAKE, "cpu-model-migration.node.kubevirt.io/Rome": "true"}),
             node("n2")]
    d = plan_drain(snap([vmi("a", cpu_model="Rome")], nodes=nodes))
    e = entry(d, "a")
    assert (e.phase, e.reason) == ("Waiting", "NoCompatibleTarget") and "Rome" in e.message
    assert not d.create


def test_target_node_selector_limits_candidates() -> None:
    nodes = [node("n1"), node("n2"), node("n3", labels={**SKYLAKE, "zone": "b"})]
    d = plan_drain(snap([vmi("a")], nodes=nodes,
                        spec={"nodeName": "n1", "targetNodeSelector": {"zone": "b"}}))
    assert d.create[0].selector == {"zone": "b"}


def test_rolling_wave_drains_max_unavailable_at_a_time() -> None:
    nodes = [node("n1", labels={**SKYLAKE, "pool": "x"}), node("n2", labels={**SKYLAKE,
             "pool": "x"}), node("n3", labels={**SKYLAKE, "pool": "x"}), node("n4")]
    spec = {"nodeSelector": {"matchLabels": {"pool": "x"}}, "maxUnavailable": 1,
            "releaseAfter": "1m"}
    d = plan_drain(snap([vmi("a", "n1"), vmi("b", "n2")], nodes=nodes, spec=spec))
    assert d.cordon == ["n1"] and [n.phase for n in d.status.nodes] == [
        "Draining", "Waiting", "Waiting"]
    assert d.status.counts.total == 2 and created(d) == ["vs-d-a-1"]
    # n1 emptied: it is Drained (held) while n2 waits for the slot.
    moved = vmi("a", "n4")
    status = d.status
    d2 = plan_drain(snap([moved, vmi("b", "n2")], nodes=[dataclasses.replace(
        nodes[0], unschedulable=True, annotations={CORDONED_BY: "d"}), *nodes[1:]], spec=spec,
        status=status, migrations=[mig("a", 1, "Succeeded", target="n4")]))
    assert [n.phase for n in d2.status.nodes] == ["Drained", "Waiting", "Waiting"]
    assert d2.recheck_after == 60  # a pass is due when its maintenance time ends
    # After its maintenance time it is released (uncordoned) and n2 begins.
    later = NOW + dt.timedelta(minutes=2)
    d3 = plan_drain(snap([moved, vmi("b", "n2")], nodes=[dataclasses.replace(
        nodes[0], unschedulable=True, annotations={CORDONED_BY: "d"}), *nodes[1:]], spec=spec,
        status=d2.status, now=later, migrations=[mig("a", 1, "Succeeded", target="n4")]))
    assert d3.uncordon == ["n1"]
    # The pass that releases n1 starts n2 at once: cordoned, and its VM's migration created.
    assert [n.phase for n in d3.status.nodes] == ["Released", "Draining", "Waiting"]
    assert d3.cordon == ["n2"] and created(d3) == ["vs-d-b-1"]


def test_release_after_zero_moves_on_the_next_pass() -> None:
    """releaseAfter 0s: a rolling evacuation with no maintenance. The pass that sees n1 empty
    asks for another at once, which releases n1 and starts n2."""
    spec = {**WAVE, "releaseAfter": "0s"}
    held = node("n1", labels={**SKYLAKE, "pool": "x"}, unschedulable=True,
                annotations={CORDONED_BY: "d"})
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Draining", since=stamp(NOW)),
                                    NodeEntry(name="n2", phase="Waiting")])
    moved = vmi("a", "n3")
    done = [mig("a", 1, "Succeeded", target="n3")]
    d = plan_drain(snap([moved, vmi("b", "n2")], nodes=[held, *_wave_nodes("n2", "n3")],
                        spec=spec, status=status, migrations=done))
    assert [n.phase for n in d.status.nodes] == ["Drained", "Waiting"]
    assert d.recheck_after == 0
    d = plan_drain(snap([moved, vmi("b", "n2")], nodes=[held, *_wave_nodes("n2", "n3")],
                        spec=spec, status=d.status, migrations=done))
    assert [n.phase for n in d.status.nodes] == ["Released", "Draining"]
    assert d.uncordon == ["n1"] and d.cordon == ["n2"] and created(d) == ["vs-d-b-1"]
    assert d.recheck_after is None


def test_a_maintenance_marked_complete_before_the_node_drained_is_forgotten() -> None:
    """An annotation left from an earlier maintenance must not release the node the moment it
    drains: removed while the node drains; one set once it is Drained releases it."""
    stale = {"virtshift.io/maintenance-complete": "true"}
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Draining", since=stamp(NOW)),
                                    NodeEntry(name="n2", phase="Waiting")])
    n1 = node("n1", labels={**SKYLAKE, "pool": "x"}, unschedulable=True,
              annotations={CORDONED_BY: "d", **stale})
    d = plan_drain(snap([vmi("a", "n1")], nodes=[n1, *_wave_nodes("n2", "n3")], spec=WAVE,
                        status=status))
    assert d.forget_maintenance == ["n1"]
    # The node about to start is cordoned and forgotten in the same pass.
    waiting = node("n2", labels={**SKYLAKE, "pool": "x"}, annotations=stale)
    d = plan_drain(snap([vmi("b", "n2")], nodes=[*_wave_nodes("n1", "n3"), waiting], spec=WAVE,
                        status=NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Released"),
                                                      NodeEntry(name="n2", phase="Waiting")])))
    assert d.cordon == ["n2"] and d.forget_maintenance == ["n2"]
    drained = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Drained", since=stamp(NOW)),
                                     NodeEntry(name="n2", phase="Waiting")])
    d = plan_drain(snap([vmi("a", "n3")], nodes=[n1, *_wave_nodes("n2", "n3")], spec=WAVE,
                        status=drained))
    assert d.forget_maintenance == [] and d.uncordon == ["n1"]
    dry = plan_drain(snap([vmi("a", "n1")], nodes=[n1, *_wave_nodes("n2", "n3")],
                          spec={**WAVE, "dryRun": True}, status=status))
    assert dry.forget_maintenance == []


def test_wave_moves_on_when_a_drained_node_is_released() -> None:
    spec = {"nodeSelector": {"matchLabels": {"zone": "a"}}, "maxUnavailable": 1}
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Released"),
                                    NodeEntry(name="n2", phase="Waiting"),
                                    NodeEntry(name="n3", phase="Waiting")])
    d = plan_drain(snap([vmi("b", "n2")], spec=spec, status=status))
    assert [n.phase for n in d.status.nodes] == ["Released", "Draining", "Waiting"]
    assert d.cordon == ["n2"]


def test_finalize_aborts_ours_uncordons_ours_and_restarts_stopped_vms() -> None:
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}),
             node("n2", unschedulable=True, annotations={CORDONED_BY: "someone-else"}),
             node("n3")]
    vm = VMInfo("ns", "gpu", run_strategy="Halted",
                quick=QuickMigrationRecord("d", "n1", NOW, started=False))
    s = snap([vmi("a")], nodes=nodes, vms={"ns/gpu": vm},
             migrations=[mig("a", 1, "Running"), mig("b", 1, "Succeeded")])
    d = finalize_drain(s)
    assert [m.name for m in d.cancel] == ["vs-d-a-1"]
    assert d.start == ["ns/gpu"]
    assert d.uncordon == [] and d.hold  # only once the aborted migration has ended
    s = dataclasses.replace(s, migrations=[mig("a", 1, "Failed"), mig("b", 1, "Succeeded")])
    assert finalize_drain(s).uncordon == ["n1"]


def test_condition_transition_time_moves_only_on_flip() -> None:
    first = plan_drain(snap([vmi("a"), vmi("b"), vmi("c")]))
    later = NOW + dt.timedelta(minutes=1)
    second = plan_drain(snap([vmi("a"), vmi("b"), vmi("c")], status=first.status, now=later,
                             migrations=[mig("a", 1, "Running"), mig("b", 1, "Running")]))
    before = {c.type: c.last_transition_time for c in first.status.conditions}
    after = {c.type: c.last_transition_time for c in second.status.conditions}
    assert before["Reconciling"] == after["Reconciling"] == stamp(NOW)
    assert all(c.observed_generation == 1 for c in second.status.conditions)


# -- MigrationPolicy rules in the planner -------------------------------------------------------

HOT = {"dirty_rate": 8 * GiB}  # dirties memory faster than any NIC here sends it: never converges


@pytest.mark.parametrize(("ladder", "phase", "mode", "creates", "halts"), [
    (("Abort",), "Waiting", None, False, False),
    (("PostCopy", "Abort"), "Migrating", "PostCopy", True, False),
    (("AutoConverge", "Abort"), "Migrating", "AutoConverge", True, False),
    (("QuickMigration",), "Migrating", "QuickMigration", False, True),
    (("Fail",), "Failed", None, False, False),
    (("Allow",), "Migrating", None, True, False),
])
def test_downtime_ladder(ladder, phase, mode, creates, halts) -> None:
    rules = Rules(max_downtime=0.3, on_downtime_exceeded=ladder)
    d = plan_drain(snap([vmi("hot", **HOT)], rules={"ns/hot": rules},
                        vms={"ns/hot": VMInfo("ns", "hot")}))
    e = entry(d, "hot")
    assert e.phase == phase
    assert bool(d.create) is creates and bool(d.halt) is halts
    if creates:
        assert d.create[0].mode == mode
    if phase in ("Waiting", "Failed"):
        assert e.reason == "NotConverging" and "would not converge" in e.message


def test_abort_ladder_stalls_with_the_reason_when_nothing_else_moves() -> None:
    d = plan_drain(snap([vmi("hot", **HOT)], rules={"ns/hot": Rules(max_downtime=0.3)}))
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "NotConverging")


def test_too_slow_to_converge_before_kubevirts_timeout() -> None:
    # lambda 0.98 converges in the model, but only after ~40s: beyond 1s per GiB.
    rules = Rules(max_downtime=0.3, completion_timeout_per_gib=1, on_downtime_exceeded=("Fail",))
    d = plan_drain(snap([vmi("warm", dirty_rate=4.9 * GiB)], rules={"ns/warm": rules},
                        limits=KubeVirtLimits(5, 2)))
    e = entry(d, "warm")
    assert (e.phase, e.reason) == ("Failed", "NotConverging")
    assert "CompletionTimeout" in e.message


def test_post_copy_pause_still_counts_against_max_downtime() -> None:
    rules = Rules(max_downtime=0.01, on_downtime_exceeded=("PostCopy", "Fail"))
    d = plan_drain(snap([vmi("hot", **HOT)], rules={"ns/hot": rules}))
    e = entry(d, "hot")
    assert (e.phase, e.reason) == ("Failed", "NotConverging")  # 50 ms post-copy pause > 10 ms


@pytest.mark.parametrize(("applies", "action", "downtime"), [
    (True, "Migrate", (0.0, 0.1)),  # QEMU waits for a 100 ms stop-and-copy
    (False, "Abort", (0.1, 0.3)),  # QEMU switches over at its own 300 ms: too long a pause
])
def test_max_downtime_is_predicted_with_the_limit_qemu_really_gets(applies, action,
                                                                     downtime) -> None:
    """maxDowntime reaches QEMU only when KubeVirt takes maxDowntimeMs (v1.9 with
    MigrationStallDetection); otherwise virtshift holds it by prediction against QEMU's 300 ms
    switch-over, and walks the ladder when the pause would be longer."""
    from virtshift.domain.downtime import choose
    from virtshift.domain.eta import Estimator

    rules = Rules(max_downtime=0.1, kubevirt_applies_max_downtime=applies)
    assert rules.switchover_downtime == (0.1 if applies else 0.3)
    warm = vmi("warm", memory=4 * GiB, dirty_rate=0.5 * GiB)  # lambda 0.5 at 1 GiB/s
    choice = choose(warm, rules, Estimator(node_bandwidth=GiB), None, 1)
    assert choice.action == action
    assert choice.predicted.converges and downtime[0] < choice.predicted.downtime <= downtime[1]
    if not applies:
        assert choice.reason == "DowntimeExceeded"


def _window(schedule: str, duration: str):
    from virtshift.api.migrationpolicy import Window

    return Window(schedule=schedule, duration=duration)


@pytest.mark.parametrize(("window", "opens"), [
    (("0 11 * * *", "2h"), True),  # 11:00-13:00 UTC, now is 12:00
    (("0 22 * * *", "6h"), False),  # 22:00-04:00
])
def test_windows_gate_new_migrations(window, opens) -> None:
    rules = Rules(policy="bulk", windows=(_window(*window),))
    d = plan_drain(snap([vmi("a")], rules={"ns/a": rules}))
    assert bool(d.create) is opens
    if not opens:
        e = entry(d, "a")
        assert (e.phase, e.reason) == ("Waiting", "OutsideWindow")
        assert "2026-11-25T22:00:00Z" in e.message


def test_inbound_limit_pins_distinct_targets() -> None:
    rules = Rules(policy="p", max_inbound_per_node=1)
    vms = [vmi(f"v{i}") for i in range(3)]
    d = plan_drain(snap(vms, rules={v.key: rules for v in vms}, limits=KubeVirtLimits(5, 5),
                        estimator=INSTANT))
    targets = [m.selector["kubernetes.io/hostname"] for m in d.create]
    assert sorted(targets) == ["n2", "n3"]  # two nodes, one arrival each; the third waits


def test_node_bandwidth_bounds_outbound_concurrency() -> None:
    rules = Rules(policy="p", node_bandwidth=2 * GiB, bandwidth_per_migration=1 * GiB)
    vms = [vmi(f"v{i}") for i in range(4)]
    d = plan_drain(snap(vms, rules={v.key: rules for v in vms}, limits=KubeVirtLimits(5, 5)))
    assert len(d.create) == 2


def test_policy_parallel_limit_counts_migrations_of_that_policy() -> None:
    rules = Rules(policy="p", max_parallel=1)
    busy = [MigrationInfo(namespace="x", name="o", vmi="o", phase="Running", policy="p",
                          source="n9")]
    vms = [vmi(f"v{i}") for i in range(3)]
    d = plan_drain(snap(vms, rules={v.key: rules for v in vms}, others=busy))
    assert d.create == []


def test_downtime_breach_is_flagged_on_the_vm_and_as_an_event() -> None:
    d = plan_drain(snap([vmi("a", node_name="n2")], rules={"ns/a": Rules(max_downtime=0.1)},
                        migrations=[mig("a", 1, "Succeeded", target="n2",
                                        downtime=observed(250))]))
    e = entry(d, "a")
    assert (e.phase, e.reason) == ("Succeeded", "DowntimeExceeded")
    assert "observed downtime 250 ms (annotation:example.com/downtime-ms) exceeded " \
        "maxDowntime 100 ms" in e.message
    assert ("Warning", "DowntimeExceeded") in {(k, r) for k, r, _m in d.events}


def test_just_moved_vm_is_not_migrated_again_before_its_vmi_catches_up() -> None:
    # The VMIM says Succeeded, but the cached VMI still shows the source node.
    d = plan_drain(snap([vmi("a")], migrations=[mig("a", 1, "Succeeded", target="n2")]))
    assert not d.create and entry(d, "a").reason == "Completing"


def test_a_foreign_migration_of_the_vmi_is_waited_for() -> None:
    evacuation = MigrationInfo(namespace="ns", name="kubevirt-evacuation-x", vmi="a",
                               phase="Running", source="n1")
    d = plan_drain(snap([vmi("a")], others=[evacuation]))
    assert not d.create and entry(d, "a").reason == "MigrationInProgress"


def test_a_terminating_attempt_is_waited_for() -> None:
    d = plan_drain(snap([vmi("a")], migrations=[mig("a", 1, "Running", terminating=True)]))
    assert not d.create and entry(d, "a").phase == "Migrating"


def test_finalize_restarts_a_stopped_vm_even_while_its_vmi_shuts_down_or_in_conflict() -> None:
    vm = VMInfo("ns", "gpu", run_strategy="Halted",
                quick=QuickMigrationRecord("d", "n1", NOW, started=False))
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}), node("n2")]
    d = finalize_drain(snap([vmi("gpu")], nodes=nodes, vms={"ns/gpu": vm}, conflict_with="x"))
    assert d.start == ["ns/gpu"] and d.uncordon == ["n1"]


def test_vm_moved_onto_a_later_wave_node_moves_again_from_there() -> None:
    spec = {"nodeSelector": {"matchLabels": {"zone": "a"}}, "maxUnavailable": 1}
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Released"),
                                    NodeEntry(name="n2", phase="Waiting"),
                                    NodeEntry(name="n3", phase="Waiting")])
    earlier = mig("a", 1, "Succeeded", source="n1", target="n2")
    d = plan_drain(snap([vmi("a", "n2")], spec=spec, status=status, migrations=[earlier]))
    assert created(d) == ["vs-d-a-2"]


# -- the spec's fields, mapped by rules_from, as the planner applies them ----------------------


def _policy_rules(kubevirt: KubeVirtMigrationConfig | None = None, **fields: Any) -> Rules:
    from virtshift.api.migrationpolicy import MigrationPolicySpec
    from virtshift.domain.rules import NamedPolicy, rules_from

    spec = MigrationPolicySpec.model_validate(fields)
    return rules_from(NamedPolicy("p", spec), kubevirt=kubevirt or KubeVirtMigrationConfig())


@pytest.mark.parametrize(("outbound", "expected", "then"), [(None, 6, 6), (1, 1, 0),
                                                           (3, 3, 2)])
def test_max_parallel_outbound_per_node_bounds_each_source(outbound, expected, then) -> None:
    """maxParallelOutboundPerNode, below KubeVirt's parallelOutboundMigrationsPerNode (5 here):
    no more of the policy's migrations leave n1 at once, queued ones included. Without it, only
    KubeVirt's limits hold, and a round more is queued in KubeVirt."""
    fields = {"maxParallelOutboundPerNode": outbound} if outbound else {}
    rules = _policy_rules(**fields)
    vms = [vmi(f"v{i}") for i in range(6)]
    d = plan_drain(snap(vms, rules={v.key: rules for v in vms}, limits=KubeVirtLimits(4, 5),
                        estimator=INSTANT))
    assert len(d.create) == expected
    assert {m.source for m in d.create} == {"n1"}
    busy = [MigrationInfo(namespace="x", name="o", vmi="o", phase="Running", policy="p",
                          source="n1")]
    later = plan_drain(snap(vms, rules={v.key: rules for v in vms}, limits=KubeVirtLimits(4, 5),
                            others=busy, estimator=INSTANT))
    assert len(later.create) == then


@pytest.mark.parametrize(("fields", "failures", "phase"), [
    ({"maxAttempts": 1}, 1, "Failed"),
    ({"maxAttempts": 2}, 1, "Migrating"),
    ({"maxAttempts": 2}, 2, "Failed"),
])
def test_max_attempts_from_the_spec_bounds_retries(fields, failures, phase) -> None:
    ended = NOW - dt.timedelta(hours=1)
    migs = [mig("a", i, "Failed", ended=ended, failure="x") for i in range(1, failures + 1)]
    d = plan_drain(snap([vmi("a")], migrations=migs, rules={"ns/a": _policy_rules(**fields)}))
    assert entry(d, "a").phase == phase


@pytest.mark.parametrize(("failures", "ended_ago", "retries"), [
    (1, 9, False), (1, 11, True),  # initial 10s
    (2, 14, False), (2, 16, True),  # doubled to 20s, capped at max 15s
])
def test_backoff_from_the_spec_delays_the_retry(failures, ended_ago, retries) -> None:
    rules = _policy_rules(maxAttempts=5, backoff={"initial": "10s", "max": "15s"})
    ended = NOW - dt.timedelta(seconds=ended_ago)
    migs = [mig("a", i, "Failed", ended=ended, failure="x") for i in range(1, failures + 1)]
    d = plan_drain(snap([vmi("a")], migrations=migs, rules={"ns/a": rules}))
    assert created(d) == ([f"vs-d-a-{failures + 1}"] if retries else [])
    if not retries:
        assert entry(d, "a").reason == "Backoff"


@pytest.mark.parametrize(("kubevirt", "action"), [
    (KubeVirtMigrationConfig(), "Abort"),
    # KubeVirt's cluster-wide allowPostCopy: post-copy at the completion timeout (40s x 5 GB).
    (KubeVirtMigrationConfig(allow_post_copy=True, completion_timeout_per_gib=40), "Migrate"),
    # Disruption without post-copy: KubeVirt pauses the guest at the timeout, for seconds.
    (KubeVirtMigrationConfig(allow_workload_disruption=True), "Abort"),
    (KubeVirtMigrationConfig(allow_post_copy=True, allow_workload_disruption=False), "Abort"),
])
def test_unset_post_copy_is_predicted_with_kubevirts_setting(kubevirt, action) -> None:
    """Issue 9: a policy that leaves allowPostCopy unset migrates under the KubeVirt CR's; the
    prediction (and so the ladder) must assume what KubeVirt will do."""
    from virtshift.domain.downtime import choose
    from virtshift.domain.eta import Estimator

    rules = _policy_rules(kubevirt, maxDowntime="300ms")
    hot = vmi("hot", **HOT)
    choice = choose(hot, rules, Estimator(), None, 2)  # 5 GiB/s each: as the planner shares
    assert choice.action == action
    if action == "Migrate":
        assert choice.predicted.mode == "PostCopy" and choice.predicted.converges
    d = plan_drain(snap([hot], rules={"ns/hot": rules}))
    assert bool(d.create) is (action == "Migrate")


@pytest.mark.parametrize("kubevirt", [
    KubeVirtMigrationConfig(),
    KubeVirtMigrationConfig(allow_post_copy=False, allow_workload_disruption=False),
    KubeVirtMigrationConfig(allow_auto_converge=False, completion_timeout_per_gib=1000),
])
def test_ladder_variants_work_whatever_kubevirt_says(kubevirt) -> None:
    """The -postcopy variant sets allowPostCopy (so KubeVirt's disruption follows it) and a
    1 s per GiB completion timeout; the -autoconverge variant sets allowAutoConverge."""
    for ladder, mode in ((["PostCopy", "Abort"], "PostCopy"),
                         (["AutoConverge", "Abort"], "AutoConverge")):
        rules = _policy_rules(kubevirt, maxDowntime="300ms", onDowntimeExceeded=ladder)
        d = plan_drain(snap([vmi("hot", **HOT)], rules={"ns/hot": rules}))
        assert [m.mode for m in d.create] == [mode], (ladder, entry(d, "hot"))
# -- issue 9: every promise kept, every failure path safe ---------------------------------------


def test_finalize_uncordons_only_once_the_aborted_migrations_are_final() -> None:
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}), node("n2")]
    running = snap([vmi("a")], nodes=nodes, migrations=[mig("a", 1, "Running")])
    d = finalize_drain(running)
    assert [m.name for m in d.cancel] == ["vs-d-a-1"] and d.uncordon == [] and d.hold
    aborting = snap([vmi("a")], nodes=nodes, migrations=[mig("a", 1, "Running",
                                                             terminating=True)])
    d = finalize_drain(aborting)
    assert d.cancel == [] and d.uncordon == [] and d.hold
    ended = snap([vmi("a")], nodes=nodes, migrations=[mig("a", 1, "Failed", terminating=True)])
    d = finalize_drain(ended)
    assert d.uncordon == ["n1"] and not d.hold


def test_finalize_never_leaves_the_node_cordoned_forever() -> None:
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}), node("n2")]
    stuck = snap([vmi("a")], nodes=nodes, migrations=[mig("a", 1, "Running", terminating=True)])
    d = finalize_drain(stuck, waited=3600)
    assert d.uncordon == ["n1"] and not d.hold
    assert any(kind == "Warning" and reason == "AbortTimeout" for kind, reason, _ in d.events)


def test_finalize_without_cancel_on_delete_uncordons_at_once() -> None:
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}), node("n2")]
    s = snap([vmi("a")], nodes=nodes, migrations=[mig("a", 1, "Running")],
             spec={"nodeName": "n1", "cancelOnDelete": False})
    d = finalize_drain(s)
    assert d.cancel == [] and d.uncordon == ["n1"] and not d.hold


def test_a_deleted_drain_reports_terminating() -> None:
    nodes = [node("n1", unschedulable=True, annotations={CORDONED_BY: "d"}), node("n2")]
    first = plan_drain(snap([vmi("a")], nodes=nodes))
    d = finalize_drain(snap([vmi("a")], nodes=nodes, status=first.status,
                            migrations=[mig("a", 1, "Running")]))
    assert d.status.phase == "Terminating"
    ready = next(c for c in d.status.conditions if c.type == "Ready")
    reconciling = next(c for c in d.status.conditions if c.type == "Reconciling")
    assert (ready.status, ready.reason) == ("False", "Terminating")
    assert (reconciling.status, reconciling.reason) == ("True", "Terminating")
    assert "abort" in reconciling.message
    assert ("Normal", "Terminating") in {(k, r) for k, r, _m in d.events}


def test_migration_names_carry_the_drain_incarnation() -> None:
    d = plan_drain(snap([vmi("a")], uid="5f0c3e1a-0000-4000-8000-000000000001"))
    other = plan_drain(snap([vmi("a")], uid="5f0c3e1a-0000-4000-8000-000000000002"))
    assert created(d)[0].startswith("vs-d-a-") and created(d) != created(other)
    assert created(d) == created(plan_drain(snap([vmi("a")],
                                            uid="5f0c3e1a-0000-4000-8000-000000000001")))


@pytest.mark.parametrize(("migs", "previous", "recorded"), [
    # attempts 1 and 2 were garbage-collected by KubeVirt (it keeps the 5 newest)
    ([3, 4, 5, 6, 7], None, 0),
    # every attempt collected: the VMI's annotation for this drain has the count
    ([], None, 7),
])
def test_max_attempts_is_a_hard_bound_past_kubevirts_garbage_collection(migs, previous,
                                                                        recorded) -> None:
    rules = Rules(max_attempts=7)
    ended = NOW - dt.timedelta(hours=1)
    status = NodeDrainStatus() if previous is None else NodeDrainStatus(vms=[VMEntry(
        namespace="ns", name="a", phase="Waiting", reason="Backoff", attempts=previous)])
    d = plan_drain(snap([vmi("a")], rules={"ns/a": rules}, status=status,
                        attempts={"ns/a": recorded} if recorded else {},
                        migrations=[mig("a", i, "Failed", ended=ended, failure="boom")
                                    for i in migs]))
    e = entry(d, "a")
    assert not d.create and (e.phase, e.attempts) == ("Failed", 7)


def test_a_create_the_api_server_refused_is_no_attempt() -> None:
    """The status says Created (attempt 1) before the create goes through; refused, it must
    not count, or every failing pass would burn an attempt (vs-d-a-1, -2, -3...)."""
    status = NodeDrainStatus(vms=[VMEntry(namespace="ns", name="a", phase="Migrating",
                                          reason="Created", attempts=1)])
    assert created(plan_drain(snap([vmi("a")], status=status)))[0].startswith("vs-d-a-1")


def test_the_next_attempt_follows_the_recorded_count_with_backoff() -> None:
    rules = Rules(max_attempts=9)
    ended = NOW - dt.timedelta(seconds=10)
    d = plan_drain(snap([vmi("a")], rules={"ns/a": rules},
                        migrations=[mig("a", i, "Failed", ended=ended) for i in range(3, 8)]))
    assert entry(d, "a").reason == "Backoff"  # 7 failures: 600s, not the 5th failure's 480s
    later = NOW + dt.timedelta(seconds=600)
    d = plan_drain(snap([vmi("a")], rules={"ns/a": rules}, now=later,
                        migrations=[mig("a", i, "Failed", ended=ended) for i in range(3, 8)]))
    assert created(d) == ["vs-d-a-8"] and entry(d, "a").attempts == 8


WAVE = {"nodeSelector": {"matchLabels": {"pool": "x"}}, "maxUnavailable": 1}


def _wave_nodes(*names: str, pool: tuple[str, ...] = ("n1", "n2")) -> list[NodeInfo]:
    return [node(n, labels={**SKYLAKE, **({"pool": "x"} if n in pool else {})}) for n in names]


def test_a_wave_never_targets_a_node_it_will_drain_later() -> None:
    d = plan_drain(snap([vmi("a", "n1")], nodes=_wave_nodes("n1", "n2", "n3"), spec=WAVE))
    assert [n.phase for n in d.status.nodes] == ["Draining", "Waiting"]
    assert entry(d, "a").candidates == ["n3"]
    assert d.create[0].selector == {"kubernetes.io/hostname": "n3"}


def test_a_wave_over_every_node_moves_vms_to_the_node_drained_last() -> None:
    nodes = _wave_nodes("n1", "n2", "n3", pool=("n1", "n2", "n3"))
    d = plan_drain(snap([vmi("a", "n1")], nodes=nodes, spec=WAVE))
    assert d.create[0].selector == {"kubernetes.io/hostname": "n3"}
    assert entry(d, "a").candidates == ["n3", "n2"]


@pytest.mark.parametrize(("arriving", "expected"), [
    # Two migrations into one node share its NIC (the simulator's handler.py, after QEMU's
    # transfer over the node's link): each pass sends its migrations to different nodes.
    ([], ["n3", "n4", "n5", "n3"]),
    # A migration already arriving on n3 (anyone's) counts as well.
    ([mig("x", 1, "Running", target="n3", source="n9")], ["n4", "n5", "n3", "n4"]),
])
def test_a_wave_spreads_its_pinned_targets(arriving: list[MigrationInfo],
                                           expected: list[str]) -> None:
    vms = [vmi(f"v{i}", "n1", memory=(8 - i) * GiB) for i in range(4)]
    d = plan_drain(snap(vms, nodes=_wave_nodes("n1", "n2", "n3", "n4", "n5"), spec=WAVE,
                        limits=KubeVirtLimits(10, 4), others=arriving, estimator=INSTANT))
    assert [m.selector["kubernetes.io/hostname"] for m in d.create] == expected


def test_a_wave_spreads_but_never_onto_a_node_it_drains_later() -> None:
    vms = [vmi(f"v{i}", "n1") for i in range(3)]
    d = plan_drain(snap(vms, nodes=_wave_nodes("n1", "n2", "n3"), spec=WAVE,
                        limits=KubeVirtLimits(10, 3)))
    assert {m.selector["kubernetes.io/hostname"] for m in d.create} == {"n3"}


def test_the_last_node_of_a_wave_is_not_pinned() -> None:
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Released"),
                                    NodeEntry(name="n2", phase="Draining")])
    d = plan_drain(snap([vmi("b", "n2")], nodes=_wave_nodes("n1", "n2", "n3"), spec=WAVE,
                        status=status))
    assert d.create[0].selector == {}


def test_a_paused_wave_is_frozen() -> None:
    spec = {**WAVE, "paused": True, "releaseAfter": "1m"}
    held = node("n1", labels={**SKYLAKE, "pool": "x"}, unschedulable=True,
                annotations={CORDONED_BY: "d", "virtshift.io/maintenance-complete": "true"})
    status = NodeDrainStatus(nodes=[
        NodeEntry(name="n1", phase="Drained", since=stamp(NOW - dt.timedelta(hours=1))),
        NodeEntry(name="n2", phase="Waiting")])
    d = plan_drain(snap([vmi("b", "n2")], nodes=[held, *_wave_nodes("n2", "n3")], spec=spec,
                        status=status))
    assert (d.cordon, d.uncordon, d.create) == ([], [], [])
    assert [n.phase for n in d.status.nodes] == ["Drained", "Waiting"]
    fresh = plan_drain(snap([vmi("a", "n1")], nodes=_wave_nodes("n1", "n2", "n3"), spec=spec))
    assert fresh.cordon == [] and [n.phase for n in fresh.status.nodes] == ["Waiting", "Waiting"]
    assert fresh.status.phase == "Paused"


def test_maintenance_complete_annotation_releases_a_drained_node() -> None:
    status = NodeDrainStatus(nodes=[NodeEntry(name="n1", phase="Drained", since=stamp(NOW)),
                                    NodeEntry(name="n2", phase="Waiting")])
    cordoned = {"unschedulable": True, "annotations": {CORDONED_BY: "d"}}
    held = node("n1", labels={**SKYLAKE, "pool": "x"}, **cordoned)
    d = plan_drain(snap([vmi("b", "n2")], nodes=[held, *_wave_nodes("n2", "n3")], spec=WAVE,
                        status=status))
    assert d.uncordon == [] and [n.phase for n in d.status.nodes] == ["Drained", "Waiting"]
    done = node("n1", labels={**SKYLAKE, "pool": "x"}, unschedulable=True, annotations={
        CORDONED_BY: "d", "virtshift.io/maintenance-complete": "true"})
    d = plan_drain(snap([vmi("b", "n2")], nodes=[done, *_wave_nodes("n2", "n3")], spec=WAVE,
                        status=status))
    assert d.uncordon == ["n1"]
    assert [n.phase for n in d.status.nodes] == ["Released", "Draining"]
    assert d.cordon == ["n2"] and created(d) == ["vs-d-b-1"]
    # A node someone else cordoned is released from the wave but never uncordoned by us.
    theirs = dataclasses.replace(done, annotations={"virtshift.io/maintenance-complete": "true"})
    d = plan_drain(snap([vmi("b", "n2")], nodes=[theirs, *_wave_nodes("n2", "n3")], spec=WAVE,
                        status=status))
    assert d.uncordon == [] and d.status.nodes[0].phase == "Released"


def test_the_inbound_limit_tries_every_candidate() -> None:
    rules = Rules(policy="p", max_inbound_per_node=1)
    nodes = [node(f"n{i}") for i in range(1, 9)]
    # n2..n6 (the five best candidates) each already receive one migration of policy p.
    busy = [MigrationInfo(namespace="x", name=f"o{i}", vmi=f"o{i}", phase="Running", policy="p",
                          source="elsewhere", target=f"n{i}") for i in range(2, 7)]
    d = plan_drain(snap([vmi("a")], nodes=nodes, rules={"ns/a": rules}, others=busy,
                        limits=KubeVirtLimits(50, 5)))
    assert [m.selector["kubernetes.io/hostname"] for m in d.create] == ["n7"]
    assert len(entry(d, "a").candidates) <= 5  # status shows the best five


def _gpu(name: str, node_name: str = "n1", **kw: Any) -> VMIInfo:
    return vmi(name, node_name, migratable=False, **kw,
               not_migratable_reason="HostDeviceNotLiveMigratable", not_migratable_message="GPU")


def _restart_snap(count: int, rules: Rules, **kw: Any) -> DrainSnapshot:
    gpus = [_gpu(f"g{i}") for i in range(count)]
    return snap(gpus, vms={g.key: VMInfo("ns", g.name) for g in gpus},
                rules={g.key: rules for g in gpus}, **kw)


RESTART = Rules(policy="p", non_migratable="Restart", max_parallel=1)
CLOSED = (_window("0 22 * * *", "6h"),)  # 22:00-04:00; now is 12:00


@pytest.mark.parametrize(("case", "rules", "extra", "stops"), [
    ("maxParallelMigrations 1", RESTART, {"limits": KubeVirtLimits(50, 50)}, 1),
    ("outbound limit of KubeVirt", dataclasses.replace(RESTART, max_parallel=None), {}, 2),
    ("closed window", dataclasses.replace(RESTART, windows=CLOSED), {}, 0),
    ("paused", RESTART, {"spec": {"nodeName": "n1", "paused": True}}, 0),
    ("dryRun", RESTART, {"spec": {"nodeName": "n1", "dryRun": True}}, 0),
    ("deadline passed", RESTART, {"spec": {"nodeName": "n1", "deadline": "1m"}, "status":
                                  NodeDrainStatus(start_time=stamp(NOW - dt.timedelta(hours=1)))},
     0),
    ("no other node", RESTART, {"nodes": [node("n1")]}, 0),
    ("no node with room", RESTART, {"usage": {"n2": (64.0, 512.0 * GiB),
                                              "n3": (64.0, 512.0 * GiB)}}, 0),
])
def test_quick_migration_stops_pass_the_same_admission_as_migrations(case, rules, extra,
                                                                     stops) -> None:
    """Issue 9: ten Restart VMs, one slot: one stop. A stop is never made outside a window,
    paused, in a dry run, after the deadline, or when no node could run the VM again."""
    d = plan_drain(_restart_snap(10, rules, **extra))
    assert len(d.halt) == stops, case
    assert d.status.counts.migrating == stops


def test_ladder_quick_migration_counts_against_the_policy_limit() -> None:
    rules = Rules(policy="p", max_downtime=0.3, on_downtime_exceeded=("QuickMigration",),
                  max_parallel=1)
    hot = [vmi(f"hot{i}", **HOT) for i in range(4)]
    d = plan_drain(snap(hot, rules={v.key: rules for v in hot},
                        vms={v.key: VMInfo("ns", v.name) for v in hot},
                        limits=KubeVirtLimits(50, 50)))
    assert len(d.halt) == 1
    assert sorted(e.phase for e in d.status.vms) == ["Migrating", "Pending", "Pending", "Pending"]


def test_an_unfinished_quick_migration_holds_its_slot() -> None:
    # Stopped and started again: its new VMI is not running yet.
    stopped = VMInfo("ns", "g0", run_strategy="Always",
                     quick=QuickMigrationRecord("d", "n1", NOW, started=True, policy="p"))
    s = _restart_snap(3, RESTART, limits=KubeVirtLimits(50, 50))
    d = plan_drain(dataclasses.replace(s, vmis={k: v for k, v in s.vmis.items() if k != "ns/g0"},
                                       vms={**s.vms, "ns/g0": stopped}))
    assert d.halt == [] and entry(d, "g0").phase == "Migrating"


def test_a_named_model_restart_needs_a_node_offering_the_model() -> None:
    rome = dataclasses.replace(_gpu("g"), cpu_model="EPYC-Rome")
    rules = Rules(non_migratable="Restart")
    s = snap([rome], vms={"ns/g": VMInfo("ns", "g")}, rules={"ns/g": rules})
    assert plan_drain(s).halt == []
    nodes = [node("n1"), node("n2", labels={**SKYLAKE, "cpu-model.node.kubevirt.io/EPYC-Rome":
                                            "true"})]
    assert [h[0] for h in plan_drain(dataclasses.replace(s, nodes={
        n.name: n for n in nodes})).halt] == ["ns/g"]


@pytest.mark.parametrize(("case", "fields", "vm", "action", "mode"), [
    # Fits: the ladder is not consulted, whatever it holds (issue 20 item 7: it used to switch
    # to post-copy at once when KubeVirt would have done so only at its completion timeout).
    ("converges in pre-copy", {"maxDowntime": "300ms"}, {"dirty_rate": 0.0}, "Migrate", None),
    ("KubeVirt's own post-copy meets maxDowntime", {"allowPostCopy": True,
                                                     "maxDowntime": "300ms"}, HOT,
     "Migrate", None),
    ("KubeVirt's own post-copy, no maxDowntime", {"allowPostCopy": True}, HOT, "Migrate",
     None),
    # Does not fit: the PostCopy step, predicted as KubeVirt will run it.
    ("would not converge", {"maxDowntime": "300ms"}, HOT, "PostCopy", "PostCopy"),
])
def test_the_ladder_acts_only_when_the_plain_migration_would_not_fit(case, fields, vm, action,
                                                                      mode) -> None:
    """onDowntimeExceeded is "the ladder followed when the predicted switch-over downtime
    exceeds maxDowntime" (or the VM would not converge): a migration predicted to fit runs
    as it is, under the policy's own settings."""
    from virtshift.domain.downtime import choose

    rules = _policy_rules(onDowntimeExceeded=["PostCopy", "Abort"], **fields)
    v = vmi("v", **vm)
    choice = choose(v, rules, Estimator(), None, 2)
    assert (choice.action, choice.mode) == (action, mode), case
    d = plan_drain(snap([v], rules={"ns/v": rules}))
    assert [m.mode for m in d.create] == [mode], case


@pytest.mark.parametrize(("per_gib", "kubevirt_per_gib", "switch_at"), [
    (20, 150, 20 * 5 + 1),  # the policy's completionTimeoutPerGiB, 4 GiB = 5 GB rounded up
    (None, 60, 60 * 5 + 1),  # unset: the KubeVirt CR's, as KubeVirt resolves it
])
def test_the_post_copy_step_switches_at_the_completion_timeout_kubevirt_uses(
        per_gib, kubevirt_per_gib, switch_at) -> None:
    """The -postcopy KubeVirt policy is the policy plus allowPostCopy: KubeVirt switches at the
    completion timeout the user set (or its own), never at a hidden 1 s per GiB; the
    prediction, and the drain's predicted time for the VM, switch there too."""
    from virtshift.domain.downtime import choose

    fields = {"maxDowntime": "300ms", "onDowntimeExceeded": ["PostCopy", "Abort"]}
    if per_gib is not None:
        fields["completionTimeoutPerGiB"] = per_gib
    rules = _policy_rules(KubeVirtMigrationConfig(completion_timeout_per_gib=kubevirt_per_gib),
                          **fields)
    hot = vmi("hot", **HOT)
    choice = choose(hot, rules, Estimator(), None, 2)
    assert (choice.action, choice.predicted.mode) == ("PostCopy", "PostCopy")
    # Post-copy then pulls the 4 GiB at 5 GiB/s (a 10 GiB/s NIC shared by two) in < 1 s.
    assert switch_at < choice.predicted.duration < switch_at + 1
    d = plan_drain(snap([hot], rules={"ns/hot": rules}))
    e = entry(d, "hot")
    assert e.predicted_seconds == round(Estimator().target_startup + choice.predicted.duration,
                                        1)


# -- an unknown dirty rate (issue 20 item 8) ----------------------------------------------------

UNKNOWN = {"dirty_rate": None}  # no metrics source, or one that does not report this VM


@pytest.mark.parametrize(("case", "rules", "phase", "reason", "mode", "creates", "halts"), [
    # maxDowntime set: no prediction can say the pause fits. The first step whose outcome is
    # acceptable whatever the dirty rate is taken; otherwise the VM waits and says why.
    ("maxDowntime, Abort", Rules(max_downtime=0.3), "Waiting", "DirtyRateUnknown", None,
     False, False),
    ("auto-converge depends on the rate", Rules(max_downtime=0.3, on_downtime_exceeded=(
        "AutoConverge", "Abort")), "Waiting", "DirtyRateUnknown", None, False, False),
    ("post-copy: pause at most QEMU's 300 ms", Rules(max_downtime=0.3, on_downtime_exceeded=(
        "AutoConverge", "PostCopy", "Abort")), "Migrating", "Created", "PostCopy", True, False),
    ("post-copy cannot promise 100 ms", Rules(max_downtime=0.1, on_downtime_exceeded=(
        "PostCopy", "Abort")), "Waiting", "DirtyRateUnknown", None, False, False),
    ("post-copy, KubeVirt holds 100 ms", Rules(
        max_downtime=0.1, kubevirt_applies_max_downtime=True,
        on_downtime_exceeded=("PostCopy", "Abort")), "Migrating", "Created", "PostCopy", True,
     False),
    ("post-copy, KubeVirt never times out", Rules(
        max_downtime=0.3, completion_timeout_per_gib=0,
        on_downtime_exceeded=("PostCopy", "Abort")), "Waiting", "DirtyRateUnknown", None, False,
     False),
    # Stopping the VM (a certain outage) or failing it is the answer to a breach nothing
    # predicts: passed over, the VM waits.
    ("quick migration", Rules(max_downtime=0.3, on_downtime_exceeded=("QuickMigration",)),
     "Waiting", "DirtyRateUnknown", None, False, False),
    ("fail", Rules(max_downtime=0.3, on_downtime_exceeded=("Fail",)), "Waiting",
     "DirtyRateUnknown", None, False, False),
    ("quick migration, then allow", Rules(max_downtime=0.3, on_downtime_exceeded=(
        "QuickMigration", "Allow")), "Migrating", "Created", None, True, False),
    ("allow", Rules(max_downtime=0.3, on_downtime_exceeded=("Allow",)), "Migrating", "Created",
     None, True, False),
    # A ladder without maxDowntime acts on convergence, which the rate decides too.
    ("ladder, no maxDowntime", Rules(on_downtime_exceeded=("AutoConverge", "Abort")),
     "Waiting", "DirtyRateUnknown", None, False, False),
    ("post-copy, no maxDowntime", Rules(on_downtime_exceeded=("PostCopy", "Abort")),
     "Migrating", "Created", "PostCopy", True, False),
    # Neither: a plain migration, as before.
    ("no maxDowntime, no ladder", Rules(), "Migrating", "Created", None, True, False),
])
def test_an_unknown_dirty_rate_is_not_taken_as_zero(case, rules, phase, reason, mode, creates,
                                                     halts) -> None:
    """Without a dirty rate nothing predicts the pause or convergence: where maxDowntime or
    onDowntimeExceeded would act, the VM is treated as not predicted to fit (today: rate 0,
    every VM fits, and maxDowntime silently does nothing)."""
    d = plan_drain(snap([vmi("v", **UNKNOWN)], rules={"ns/v": rules},
                        vms={"ns/v": VMInfo("ns", "v")}))
    e = entry(d, "v")
    assert (e.phase, e.reason) == (phase, reason), (case, e.message)
    assert [m.mode for m in d.create] == ([mode] if creates else []), case
    assert bool(d.halt) is halts, case
    assert e.predicted_downtime_ms is None, case  # never a number the rate would decide
    if reason == "DirtyRateUnknown":
        assert "dirty rate unknown (no metrics source)" in e.message, case


def test_an_unknown_rate_abort_stalls_the_drain_saying_why() -> None:
    d = plan_drain(snap([vmi("v", **UNKNOWN)], rules={"ns/v": Rules(max_downtime=0.3)}))
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "DirtyRateUnknown")
    assert "not migrating until its dirty rate is known" in entry(d, "v").message


def _predictions(d):
    return next(c for c in d.status.conditions if c.type == "PredictionsAvailable")


@pytest.mark.parametrize(("case", "rates", "source", "status", "reason", "names"), [
    ("no metrics source", (None, None), False, "False", "NoMetricsSource", ["ns/a", "ns/b"]),
    ("source lacks one VM", (1e6, None), True, "False", "DirtyRateUnknown", ["ns/b"]),
    ("every rate known", (1e6, 0.0), True, "True", "DirtyRatesKnown", []),
])
def test_the_drain_says_whether_its_predictions_know_the_dirty_rates(case, rates, source,
                                                                     status, reason,
                                                                     names) -> None:
    """plannedSeconds and eta are a lower bound while a VM's dirty rate is unknown (taken as
    0): the PredictionsAvailable condition says so, naming the VMs, and an Event marks the
    change."""
    vms = [vmi("a", dirty_rate=rates[0]), vmi("b", dirty_rate=rates[1])]
    held = {"nodeName": "n1", "paused": True}  # still to start: what the rates decide
    d = plan_drain(snap(vms, metrics_source=source, spec=held))
    cond = _predictions(d)
    assert (cond.status, cond.reason) == (status, reason), (case, cond.message)
    assert all(n in cond.message for n in names), cond.message
    if status == "False":
        assert "lower bound" in cond.message
        assert ("Warning", reason) in {(k, r) for k, r, _m in d.events}
        again = plan_drain(snap(vms, metrics_source=source, status=d.status, spec=held))
        assert reason not in {r for _k, r, _m in again.events}  # once, on the transition
        known = plan_drain(snap([vmi("a"), vmi("b")], metrics_source=True, status=d.status,
                                spec=held))
        assert (_predictions(known).status, _predictions(known).reason) == (
            "True", "DirtyRatesKnown")
        assert ("Normal", "DirtyRatesKnown") in {(k, r) for k, r, _m in known.events}


def test_migrations_under_way_and_restarts_need_no_dirty_rate() -> None:
    """KubeVirt publishes no dirty rate for a migrating VMI, and a quick migration's restart
    does not depend on one: neither turns PredictionsAvailable False (it flapped False and
    True, with an Event each way, around every quick migration)."""
    gpu = _gpu("g0", dirty_rate=None)
    moving = vmi("m", dirty_rate=None)
    d = plan_drain(snap([gpu, moving], vms={gpu.key: VMInfo("ns", "g0")},
                        rules={gpu.key: RESTART}, migrations=[mig("m", 1, "Running")],
                        metrics_source=True, nodes=cordoned()))
    assert entry(d, "g0").mode == "QuickMigration" and entry(d, "m").phase == "Migrating"
    assert (_predictions(d).status, _predictions(d).reason) == ("True", "DirtyRatesKnown")


def test_the_drain_counts_the_vms_decided_without_a_rate() -> None:
    rules = {"ns/a": Rules(max_downtime=0.3)}
    d = plan_drain(snap([vmi("a", **UNKNOWN), vmi("b", **UNKNOWN)], rules=rules))
    assert "1 under maxDowntime or onDowntimeExceeded treated as not predicted to fit: ns/a" \
        in _predictions(d).message



def _conditions(decision) -> dict[str, Any]:
    return {c.type: c for c in decision.status.conditions}


@pytest.mark.parametrize(("spec", "skipped", "ready", "drained"), [
    ({"nodeName": "n1"}, ["gpu"],
     "n1 is empty but for 1 skipped VM still running there: ns/gpu on n1; it stays cordoned "
     "until this NodeDrain is deleted",
     "every VM has left but for 1 skipped VM still running there: ns/gpu on n1"),
    ({"nodeName": "n1"}, ["gpu", "fpga"],
     "n1 is empty but for 2 skipped VMs still running there: ns/fpga on n1, ns/gpu on n1; it "
     "stays cordoned until this NodeDrain is deleted",
     "every VM has left but for 2 skipped VMs still running there: ns/fpga on n1, ns/gpu on n1"),
    ({"nodeName": "n1"}, [], "the nodes are empty and stay cordoned until this NodeDrain is "
     "deleted", "every VM has left"),
    ({"nodeSelector": {"matchLabels": {"zone": "a"}}, "maxUnavailable": 3}, ["gpu"],
     "the wave is complete; 1 skipped VM still runs on its nodes: ns/gpu on n1",
     "every VM has left but for 1 skipped VM still running there: ns/gpu on n1"),
])
def test_ready_says_which_skipped_vms_still_run_on_the_drained_nodes(spec, skipped, ready,
                                                                      drained) -> None:
    """Issue 20 item 14: a drain with skipped VMs is Drained, but its nodes are not empty:
    Ready and Drained name the skipped VMs that still run there, and where."""
    vms = [vmi(n, migratable=False, not_migratable_reason="HostDevice") for n in skipped]
    pods = [PodInfo("ns", f"virt-launcher-{n}", "n1", "launcher", vmi=f"ns/{n}")
            for n in skipped]
    nodes = [node(n, unschedulable=True) for n in ("n1", "n2", "n3")] \
        if "nodeSelector" in spec else cordoned()
    d = plan_drain(snap(vms, spec=spec, rules={v.key: Rules(non_migratable="Skip")
                                               for v in vms}, launchers=pods, nodes=nodes))
    conds = _conditions(d)
    assert d.status.phase == "Drained"
    assert (conds["Ready"].status, conds["Ready"].message) == ("True", ready)
    assert conds["Drained"].message == drained


# -- issue 20 item 12: the status says what the writes did ------------------------------------

def _settled(s: DrainSnapshot, failed: dict[str, str], skipped: dict[str, str] | None = None,
             previous: dict[str, Any] | None = None):
    from virtshift.domain.drain import settle
    from virtshift.domain.outcome import remember

    failures = remember(previous or {}, failed, skipped or {}, s.now)
    return settle(s, plan_drain(s), failures), failures


def test_a_refused_create_is_reported_as_refused_not_created() -> None:
    s = snap([vmi("a"), vmi("b")], nodes=cordoned(), estimator=INSTANT)
    planned = plan_drain(s)
    refused = next(m for m in planned.create if m.vmi == "a")
    d, _ = _settled(s, {f"create ns/{refused.name}": "admission webhook denied: no"})
    a = entry(d, "a")
    assert (a.phase, a.reason, a.migration, a.attempts) == ("Waiting", "CreateFailed", None,
                                                            None)
    assert a.message == f"creating migration {refused.name} failed: admission webhook denied: no"
    assert entry(d, "b").phase == "Migrating"  # its create went through
    assert (d.status.counts.migrating, d.status.counts.pending) == (1, 1)
    assert d.status.phase == "Draining"  # not yet: a failure must persist to stall the drain
    assert not [e for e in d.events if e[1] == "Migrating" and "ns/a" in e[2]]


@pytest.mark.parametrize(("failing_for", "phase", "reason"), [
    (0, "Draining", "Progressing"),
    (119, "Draining", "Progressing"),
    (120, "Stalled", "CreateFailed"),
])
def test_a_create_refused_on_every_pass_stalls_the_drain(failing_for, phase, reason) -> None:
    from virtshift.domain.outcome import StepFailure

    s = snap([vmi("a")], nodes=cordoned(), estimator=INSTANT)
    step = f"create ns/{plan_drain(s).create[0].name}"
    since = NOW - dt.timedelta(seconds=failing_for)
    d, failures = _settled(s, {step: "denied"}, previous={step: StepFailure("denied", since)})
    assert failures[step].since == since  # dated from the first pass it failed on
    stalled = _conditions(d)["Stalled"]
    assert (d.status.phase, stalled.reason) == (phase, reason)
    if phase == "Stalled":
        assert stalled.message == f"{step} has failed on every pass for 120s: denied"
        assert _conditions(d)["Ready"].reason == "CreateFailed"
        assert ("Warning", "Stalled", stalled.message) in d.events
    # The pass whose create goes through recovers by itself.
    ok, none = _settled(dataclasses.replace(s, status=d.status), {}, previous=failures)
    assert none == {} and ok.status.phase == "Draining"
    assert _conditions(ok)["Stalled"].status == "False" and entry(ok, "a").reason == "Created"


def test_a_refused_cordon_is_not_cordoned_and_nothing_leaves_the_node() -> None:
    s = snap([vmi("a")], estimator=INSTANT)
    planned = plan_drain(s)
    assert planned.cordon == ["n1"]
    why = "cordon n1 failed: forbidden"
    d, _ = _settled(s, {"cordon n1": "forbidden"},
                    skipped={f"create ns/{planned.create[0].name}": why})
    cordoned_ = _conditions(d)["Cordoned"]
    assert (cordoned_.status, cordoned_.reason, cordoned_.message) == (
        "False", "CordonFailed", "cordoning n1 failed: forbidden")
    a = entry(d, "a")
    assert (a.phase, a.reason, a.message, a.migration) == ("Waiting", "CordonFailed",
                                                           f"not started: {why}", None)


def test_a_failed_quick_migration_stop_leaves_the_vm_waiting() -> None:
    s = _restart_snap(1, RESTART, limits=KubeVirtLimits(50, 50), nodes=cordoned())
    assert plan_drain(s).halt
    d, _ = _settled(s, {"stop ns/g0": "conflict"})
    g = entry(d, "g0")
    assert (g.phase, g.reason) == ("Waiting", "StopFailed")
    assert g.message == "stopping the VM (quick migration) failed: conflict"


# -- issue 20 items 6 and 13: quick migrations land where a migration could, and end cleanly --

ZONE_B = {**SKYLAKE, "zone": "b"}


def _quick(drain: str = "d", uid: str | None = "uid-d", **kw: Any) -> QuickMigrationRecord:
    return QuickMigrationRecord(drain, kw.pop("source", "n1"), kw.pop("stopped_at", NOW),
                                drain_uid=uid, **kw)


def test_a_restart_lands_only_on_nodes_matching_target_node_selector() -> None:
    """Item 6: targetNodeSelector holds for a quick migration as for a live one: the VM is
    stopped only when a matching node has room, and its template gets the selector, so
    KubeVirt starts it only there."""
    nodes = [node("n1"), node("n2"), node("n3", labels=ZONE_B)]
    s = _restart_snap(1, RESTART, nodes=nodes, spec={"nodeName": "n1",
                                                      "targetNodeSelector": {"zone": "b"}})
    d = plan_drain(s)
    assert [(h.key, dict(h.pin or {})) for h in d.halt] == [("ns/g0", {"zone": "b"})]
    # No node matching it has room: the VM is not stopped.
    full = plan_drain(dataclasses.replace(s, usage={"n3": (64.0, 512.0 * GiB)}))
    assert full.halt == [] and entry(full, "g0").phase == "Waiting"


def test_a_restart_pin_is_not_carried_into_the_live_migrations_after_it() -> None:
    """A stop admitted first in a pass must not pin the live migrations after it: with
    targetNodeSelector and no wave, a live migration's selector is the targetNodeSelector
    alone (the merge had them share one local)."""
    nodes = [node("n1"), node("n2", labels=ZONE_B), node("n3", labels=ZONE_B)]
    # An empty VM is predicted the stop's time (a target pod's start-up): it ties, and the
    # stop (ns/g0) comes first; a slow reaction turns staggered starts off.
    gpu, web = _gpu("g0"), vmi("web", memory=0)
    rules = {gpu.key: dataclasses.replace(RESTART, max_parallel=None), web.key: Rules()}
    d = plan_drain(snap([gpu, web], vms={gpu.key: VMInfo("ns", "g0")}, rules=rules,
                        nodes=nodes, limits=KubeVirtLimits(50, 50), reaction_seconds=60.0,
                        spec={"nodeName": "n1", "targetNodeSelector": {"zone": "b"}}))
    assert [h.key for h in d.halt] == ["ns/g0"]
    assert [dict(m.selector) for m in d.create] == [{"zone": "b"}]


def test_a_restart_never_lands_on_a_node_the_wave_drains_later() -> None:
    """Item 6: a wave pins the restart (kubernetes.io/hostname) to a node outside it, as it
    pins live migrations; n2 is emptier but drains later."""
    wave = {"nodeSelector": {"matchLabels": {"zone": "a"}}, "maxUnavailable": 1}
    nodes = [node("n1"), node("n2"), node("n3", labels=ZONE_B)]
    s = _restart_snap(1, RESTART, nodes=nodes, spec=wave, usage={"n3": (32.0, 256.0 * GiB)})
    [stop] = plan_drain(s).halt
    assert dict(stop.pin or {}) == {"kubernetes.io/hostname": "n3"}


def test_a_pinned_restart_waits_under_the_stage_rollout_strategy() -> None:
    """Item 6: the node selector added for the restart is taken back once the VM runs; under
    vmRolloutStrategy Stage that would leave RestartRequired (vm.go syncRestartRequired), so
    a restart that needs one waits, saying why. Unpinned restarts go on."""
    nodes = [node("n1"), node("n2"), node("n3", labels=ZONE_B)]
    stage = KubeVirtLimits(live_update=False)
    s = _restart_snap(1, RESTART, nodes=nodes, limits=stage,
                      spec={"nodeName": "n1", "targetNodeSelector": {"zone": "b"}})
    d = plan_drain(s)
    g = entry(d, "g0")
    assert d.halt == [] and (g.phase, g.reason) == ("Waiting", "VMRolloutStrategyStage")
    plain = plan_drain(dataclasses.replace(s, spec=NodeDrainSpec(nodeName="n1")))
    assert [h.key for h in plain.halt] == ["ns/g0"] and not plain.halt[0].pin


def test_a_quick_migration_record_of_another_drain_with_the_same_name_is_not_ours() -> None:
    """Item 13: records are keyed by the drain's UID. A VM back on the node an earlier drain
    of the same name moved it from is no restart of this drain's (it was Restarting
    forever)."""
    back = vmi("gpu", node_name="n2", running_since=NOW)
    old = VMInfo("ns", "gpu", quick=_quick(uid="uid-old", source="n2", started=True,
                                           stopped_at=NOW - dt.timedelta(hours=1)))
    nodes = [node("n1"), node("n2"), node("n3", unschedulable=True)]
    d = plan_drain(snap([back], vms={"ns/gpu": old}, uid="uid-new", nodes=nodes,
                        spec={"nodeName": "n3"}))
    assert d.status.vms is None and d.status.phase == "Drained"
    ours = plan_drain(snap([back], vms={"ns/gpu": old}, uid="uid-old", nodes=nodes,
                           spec={"nodeName": "n3"}))
    assert entry(ours, "gpu").reason == "Restarting"  # what the name-keyed record gave


def test_a_finished_quick_migration_is_wound_up_and_stays_reported() -> None:
    """Item 13: once the drain has reported the move, the VM's record goes (with the node
    selector it added and the run strategy it replaced: ``finish``), and the drain keeps
    reporting the move from its status."""
    moved = vmi("gpu", node_name="n3", running_since=NOW - dt.timedelta(seconds=5))
    rec = VMInfo("ns", "gpu", quick=_quick(started=True, stopped_at=NOW - dt.timedelta(
        seconds=20), started_at=NOW - dt.timedelta(seconds=15), run_strategy="Manual"))
    s = snap([moved], vms={"ns/gpu": rec}, uid="uid-d", nodes=cordoned())
    first = plan_drain(s)
    assert entry(first, "gpu").phase == "Succeeded" and first.finish == []
    second = plan_drain(dataclasses.replace(s, status=first.status))
    assert second.finish == ["ns/gpu"] and entry(second, "gpu") == entry(first, "gpu")
    # The record gone (and the VMI no longer in the drain's view): still reported.
    after = plan_drain(dataclasses.replace(s, status=second.status, vms={}, vmis={}))
    assert entry(after, "gpu") == entry(first, "gpu") and after.finish == []
    assert after.status.phase == "Drained" and after.status.counts.succeeded == 1


@pytest.mark.parametrize(("pending_for", "phase", "reason", "drain_phase"), [
    (10, "Migrating", "Restarting", "Draining"),
    (61, "Waiting", "Unschedulable", "Stalled"),
])
def test_a_restart_that_cannot_be_scheduled_is_reported_with_the_schedulers_reason(
        pending_for, phase, reason, drain_phase) -> None:
    """Item 13: the new VMI stays Scheduling (its launcher pod Unschedulable, KubeVirt copies
    the PodScheduled condition onto the VMI): after RESTART_SCHEDULE_SECONDS the VM is
    Waiting with the scheduler's reason and message, and the drain Stalled."""
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    pending = vmi("gpu", node_name=None, phase="Scheduling",
                  unschedulable=("Unschedulable", message))
    rec = VMInfo("ns", "gpu", quick=_quick(started=True, started_at=NOW - dt.timedelta(
        seconds=pending_for), stopped_at=NOW - dt.timedelta(seconds=pending_for + 5)))
    d = plan_drain(snap([pending], vms={"ns/gpu": rec}, uid="uid-d", nodes=cordoned()))
    g = entry(d, "gpu")
    assert (g.phase, g.reason, d.status.phase) == (phase, reason, drain_phase)
    if phase == "Waiting":
        assert message in g.message
        stalled = _conditions(d)["Stalled"]
        assert stalled.reason == "Unschedulable" and "ns/gpu" in stalled.message


def test_ending_maintenance_starts_stopped_vms_and_winds_up_started_ones() -> None:
    """Item 13: finalizing restarts what is still stopped and removes the records of the
    restarts that have their VMI again (so no record outlives its drain)."""
    stopped = VMInfo("ns", "a", run_strategy="Halted", quick=_quick(started=False))
    running = VMInfo("ns", "b", quick=_quick(started=True, started_at=NOW))
    other = VMInfo("ns", "c", quick=_quick(uid="uid-other", started=False))
    s = snap([vmi("b", node_name="n3")], vms={"ns/a": stopped, "ns/b": running,
                                               "ns/c": other}, uid="uid-d")
    d = finalize_drain(s)
    assert d.start == ["ns/a"] and d.finish == ["ns/b"]
    assert d.hold and "restarting 1 VMs" in d.hold
