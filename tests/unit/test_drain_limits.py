"""Limits the user set, held by the drain planner: maintenance windows end for the migrations
already queued in KubeVirt too (issue 20, item 4), and a policyRef that names no usable
policy stops the drain instead of letting it run under default rules (item 5)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from test_drain_planner import INSTANT, NOW, _gpu, created, entry, mig, node, snap, vmi
from test_storage_planner import claim, claims, dest, drain_snap, local, policy_snapshot
from test_storage_planner import vm as svm

from virtshift.api.migrationpolicy import MigrationPolicySpec, Window
from virtshift.api.nodedrain import NodeDrainStatus, NodeEntry
from virtshift.api.units import GiB
from virtshift.domain.drain import plan_drain, stamp
from virtshift.domain.eta import Estimator
from virtshift.domain.rules import PolicyRef, Rules, policy_ref_problem
from virtshift.domain.storage import plan_policy_storage
from virtshift.domain.views import KubeVirtLimits, VMInfo
from virtshift.domain.windows import StartGate, start_gate

TOMORROW = "2026-11-26T11:00:00Z"  # the next opening of the windows below


def ending_in(seconds: float) -> Window:
    """A daily window open since 11:00 (now is 12:00) that ends ``seconds`` from now."""
    return Window(schedule="0 11 * * *", duration=f"{3600 + seconds:g}s")


def under(window: Window, **kw) -> Rules:
    return Rules(policy="win", windows=(window,), **kw)


def draining() -> NodeDrainStatus:
    return NodeDrainStatus(start_time=stamp(NOW - dt.timedelta(minutes=5)),
                           nodes=[NodeEntry(name="n1", phase="Draining")])


# -- windows.start_gate -----------------------------------------------------------------------

@pytest.mark.parametrize(("windows", "lead", "expected"), [
    (None, 30, StartGate(True, None, None)),
    ([ending_in(600)], 30, StartGate(True, NOW + dt.timedelta(seconds=600),
                                     dt.datetime(2026, 11, 26, 11, tzinfo=dt.UTC))),
    # Within the lead of the end: open, but nothing begins; next: after that end.
    ([ending_in(20)], 30, StartGate(False, NOW + dt.timedelta(seconds=20),
                                    dt.datetime(2026, 11, 26, 11, tzinfo=dt.UTC))),
    ([ending_in(-1)], 30, StartGate(False, None,
                                    dt.datetime(2026, 11, 26, 11, tzinfo=dt.UTC))),
    # Two abutting windows are one: the lead counts from the end of the second.
    ([Window(schedule="0 11 * * *", duration="1h"), Window(schedule="0 12 * * *",
                                                             duration="10m")], 30,
     StartGate(True, NOW + dt.timedelta(minutes=10),
               dt.datetime(2026, 11, 26, 11, tzinfo=dt.UTC))),
])
def test_start_gate(windows, lead, expected) -> None:
    assert start_gate(windows, NOW, lead) == expected


# -- item 4: no migration starts after a window's end ------------------------------------------

@pytest.mark.parametrize(("ends_in", "withdrawn"), [
    (-1, True),  # the window has closed
    (5, True),  # open, but a migration taken from the queue now would start after the end
    (600, False),
])
def test_queued_migrations_are_withdrawn_when_their_window_closes(ends_in, withdrawn) -> None:
    """Ours still queued in KubeVirt when the VM's policy window closes -- or is too near its
    end for a start (a target start-up plus our margin, 10 + 1 s here) -- are withdrawn as a
    pause withdraws them; the one under way goes on; a VM under another policy keeps its
    queued migration."""
    window = ending_in(ends_in)
    rules = {"ns/a": under(window), "ns/b": under(window), "ns/c": Rules(policy="other")}
    ours = [mig("a", 1, "Running"), mig("b", 1, "Pending"), mig("c", 1, "Pending")]
    d = plan_drain(snap([vmi(x) for x in "abc"], rules=rules, migrations=ours,
                        status=draining()))
    assert [m.vmi for m in d.withdraw] == (["b"] if withdrawn else [])
    assert not d.cancel
    assert (entry(d, "a").phase, entry(d, "a").reason) == ("Migrating", "Running")
    assert entry(d, "c").phase == "Migrating"
    b = entry(d, "b")
    if withdrawn:
        assert (b.phase, b.reason) == ("Waiting", "OutsideWindow")
        assert "withdrawn from KubeVirt's queue" in b.message and TOMORROW in b.message
    else:
        assert b.phase == "Migrating"


def test_nothing_begins_within_the_lead_of_the_end() -> None:
    """A migration created, a quick migration's stop or a storage move begun 5 s before the
    end would start after it (target start-up 10 s): none is made."""
    window = ending_in(5)
    quick = under(window, non_migratable="Restart")
    gpu = _gpu("g")
    d = plan_drain(snap([vmi("a"), gpu], rules={"ns/a": under(window), "ns/g": quick},
                        vms={gpu.key: VMInfo("ns", "g")}))
    assert not d.create and not d.halt
    for name in "ag":
        e = entry(d, name)
        assert (e.phase, e.reason) == ("Waiting", "OutsideWindow") and TOMORROW in e.message


@pytest.mark.parametrize(("reaction", "ends_in", "rounds"), [
    (0.0, 100.0, 1),  # far from the end: the usual round queued ahead
    (0.0, 1.5, 1),  # one round still starts before the end
    (0.0, 0.5, 0),  # none would: only what starts now is created
    (2.5, 100.0, 3),  # a slow reaction queues more rounds ...
    (2.5, 7.6, 2),  # ... but none that would start after the end (margin: 2 x 2.5)
])
def test_the_queue_holds_no_more_than_can_start_before_the_window_ends(
        reaction: float, ends_in: float, rounds: int) -> None:
    """``reaction`` and ``ends_in`` in typical migrations (predicted): round r of KubeVirt's
    queue starts r typical migrations from now, and nothing starts within twice our
    reaction (and a target start-up, none here) of the end."""
    vms = [vmi(f"v{i:02}", memory=64 * GiB) for i in range(20)]  # ~13 s each
    typical = plan_drain(snap(vms, estimator=INSTANT)).status.vms[0].predicted_seconds
    assert typical
    rules = {v.key: under(ending_in(ends_in * typical)) for v in vms}
    d = plan_drain(snap(vms, limits=KubeVirtLimits(10, 2), estimator=INSTANT, rules=rules,
                        reaction_seconds=reaction * typical))
    assert len(d.create) == 2 + rounds * 2


@pytest.mark.parametrize(("ends_in", "due"), [
    (600, 600 - 1),  # the last start: end - (target start-up, none here, + margin 1 s)
    (-1, 23 * 3600),  # closed: the next opening, tomorrow 11:00
])
def test_a_pass_is_due_at_the_last_start_and_at_the_next_opening(ends_in, due) -> None:
    d = plan_drain(snap([vmi("a"), vmi("b"), vmi("c")], migrations=[mig("c", 1, "Pending")],
                        rules={f"ns/{x}": under(ending_in(ends_in)) for x in "abc"},
                        estimator=INSTANT))
    assert d.recheck_after == pytest.approx(due)


def test_the_drain_says_it_waits_for_the_next_window_and_an_event_says_it_closed() -> None:
    rules = {f"ns/{x}": under(ending_in(-1)) for x in "ab"}
    s = snap([vmi("a"), vmi("b")], rules=rules, migrations=[mig("b", 1, "Pending")],
             status=draining())
    d = plan_drain(s)
    ready = next(c for c in d.status.conditions if c.type == "Ready")
    assert ready.reason == "OutsideWindow" and "next window" in ready.message
    assert TOMORROW in ready.message
    events = [e for e in d.events if e[1] == "OutsideWindow"]
    assert len(events) == 1 and events[0][0] == "Normal"
    assert "2 VMs still to move (1 withdrawn" in events[0][2] and TOMORROW in events[0][2]
    # Once said, not again on every pass.
    again = plan_drain(dataclasses.replace(s, status=d.status, migrations=[]))
    assert not [e for e in again.events if e[1] == "OutsideWindow"]


def test_a_refused_write_in_the_same_pass_keeps_the_window_event() -> None:
    """The status corrected with a refused create (drain.settle) keeps the Events decided
    while planning: the window closing on a, said once, is not lost because b's create was
    refused in that pass."""
    from virtshift.domain.drain import settle
    from virtshift.domain.outcome import remember

    rules = {"ns/a": under(ending_in(-1)), "ns/b": Rules()}
    s = snap([vmi("a"), vmi("b")], rules=rules, status=draining())
    d = plan_drain(s)
    [made] = d.create
    settled = settle(s, d, remember({}, {f"create ns/{made.name}": "denied"}, {}, s.now))
    assert entry(settled, "b").reason == "CreateFailed"
    assert [e[1] for e in settled.events if e[1] == "OutsideWindow"] == ["OutsideWindow"]


# Default estimator (10 s target start-up), 10Gi NIC shared by 2: a 4Gi VM takes ~11 s, a
# 256Gi one ~61 s. A reaction of 5 s (margin 10 s) keeps the starts from being staggered.
SMALL, BIG = vmi("small"), vmi("big", memory=256 * GiB)
SLOW = 5.0


@pytest.mark.parametrize(("within", "ends_in", "big"), [
    ("Start", 40, "Migrating"),  # may start until the end, finishes after it
    ("Finish", 40, "Waiting"),  # would not end before the window does
    ("Finish", 120, "Migrating"),
])
def test_within_window_finish_admits_only_what_ends_in_the_window(within, ends_in,
                                                                   big) -> None:
    rules = {v.key: under(ending_in(ends_in), within_window=within) for v in (SMALL, BIG)}
    d = plan_drain(snap([SMALL, BIG], rules=rules, reaction_seconds=SLOW))
    assert entry(d, "small").phase == "Migrating"
    e = entry(d, "big")
    assert e.phase == big
    if big == "Waiting":
        assert e.reason == "OutsideWindow" and "would not finish" in e.message
        assert TOMORROW in e.message


def test_within_window_finish_withdraws_a_queued_migration_that_would_end_late() -> None:
    rules = {"ns/big": under(ending_in(40), within_window="Finish")}
    d = plan_drain(snap([BIG], rules=rules, migrations=[mig("big", 1, "Pending")],
                        status=draining(), reaction_seconds=SLOW))
    assert [m.vmi for m in d.withdraw] == ["big"]
    assert entry(d, "big").reason == "OutsideWindow"


def test_within_window_finish_keeps_what_it_admitted_on_the_ladders_prediction() -> None:
    """A migration admitted on its ladder step's prediction (auto-converge: 48 s) is judged on
    the same one once queued; judged on the plain prediction (never converging: 1361 s) it was
    withdrawn, made again the next pass, and so on while KubeVirt's queue held it."""
    hot = vmi("hot", memory=8 * GiB, dirty_rate=8 * GiB)
    rules = {"ns/hot": under(ending_in(600), within_window="Finish", max_downtime=0.3,
                             on_downtime_exceeded=("AutoConverge", "Abort"))}
    first = plan_drain(snap([hot], rules=rules, status=draining()))
    [made] = first.create
    assert made.mode == "AutoConverge"
    queued = mig("hot", 1, "Pending")
    again = plan_drain(snap([hot], rules=rules, migrations=[queued], status=first.status))
    assert again.withdraw == [] and again.create == []
    assert entry(again, "hot").phase == "Migrating"


def test_a_vm_longer_than_any_window_stalls_the_drain_as_window_too_short() -> None:
    short = Window(schedule="0 12 * * *", duration="30s")  # open since 12:00, 30 s a day
    rules = {"ns/big": Rules(policy="win", windows=(short,), within_window="Finish")}
    d = plan_drain(snap([BIG], rules=rules))
    e = entry(d, "big")
    assert (e.phase, e.reason) == ("Waiting", "WindowTooShort") and not d.create
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "WindowTooShort")


def test_a_storage_move_with_a_node_drain_obeys_the_window_end() -> None:
    """A shared-nothing move (destination claims, then KubeVirt's migration) is not begun
    within the lead of the end, as a migration is not."""
    rules = {"ns/a": under(ending_in(5))}
    d = plan_drain(drain_snap([svm("a")], claims(local("a-root")), rules=rules))
    assert not d.claims and not d.volumes
    assert entry(d, "a").reason == "OutsideWindow"
    d = plan_drain(drain_snap([svm("a")], claims(local("a-root")),
                              rules={"ns/a": under(ending_in(600))}))
    assert d.claims and d.volumes


@pytest.mark.parametrize(("finish_within", "starts"), [
    (None, True), (100.0, True),
    (5.0, False),  # the copy of 10Gi at 1Gi/s would end after the window
])
def test_a_policys_storage_move_under_finish_starts_only_if_it_ends_in_time(
        finish_within, starts) -> None:
    d = plan_policy_storage(policy_snapshot([svm("a")], claims(claim("a-root")),
                                            finish_within=finish_within))
    assert bool(d.update) is starts
    if not starts:
        assert d.status.vms[0].reason == "OutsideWindow"
        assert "would not finish" in d.status.vms[0].message


# -- item 5: a policyRef that names no usable policy --------------------------------------------

GOOD = MigrationPolicySpec()


@pytest.mark.parametrize(("ref", "reason"), [
    (None, None),
    (PolicyRef("p", found=True, spec=GOOD), None),
    (PolicyRef("p"), "PolicyNotFound"),
    (PolicyRef("p", found=True, terminating=True, spec=GOOD), "PolicyTerminating"),
    (PolicyRef("p", found=True, rejected="maxAttempts: too big"), "PolicyInvalid"),
    (PolicyRef("p", found=True, spec=MigrationPolicySpec(windows=[Window(
        schedule="0 0 31 2 *", duration="1h")])), "PolicyInvalid"),
])
def test_policy_ref_problem(ref, reason) -> None:
    problem = policy_ref_problem(ref)
    assert (problem[0] if problem else None) == reason
    if problem:
        assert "MigrationPolicy p" in problem[1]


@pytest.mark.parametrize("ref", [
    PolicyRef("p"), PolicyRef("p", found=True, terminating=True, spec=GOOD),
    PolicyRef("p", found=True, rejected="spec.windows: bad"),
])
def test_a_drain_under_an_unusable_policy_ref_starts_nothing_and_says_why(ref) -> None:
    """Nothing new starts -- no migration, no stop, queued ones withdrawn -- the one under
    way goes on (never aborted), every other VM waits with the reason, and the drain is
    Stalled with it (observedGeneration) and a Warning Event, once."""
    reason = policy_ref_problem(ref)[0]
    ours = [mig("a", 1, "Running"), mig("b", 1, "Pending")]
    s = snap([vmi("a"), vmi("b"), vmi("c"), vmi("g", migratable=False)], migrations=ours,
             spec={"nodeName": "n1", "policyRef": {"name": "p"}, "nonMigratable": "Restart"},
             status=draining(), policy_ref=ref,
             nodes=[node("n1", unschedulable=True), node("n2"), node("n3")])
    d = plan_drain(s)
    assert not d.create and not d.halt and not d.cancel
    assert [m.vmi for m in d.withdraw] == ["b"]
    assert entry(d, "a").phase == "Migrating"
    for name in "bcg":
        assert (entry(d, name).phase, entry(d, name).reason) == ("Waiting", reason)
    stalled = next(c for c in d.status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason, stalled.observed_generation) == ("True", reason, 1)
    assert d.status.phase == "Stalled"
    assert ("Warning", reason) in [(k, r) for k, r, _m in d.events]
    again = plan_drain(dataclasses.replace(s, status=d.status, migrations=[ours[0]]))
    assert reason not in [r for _k, r, _m in again.events]


def test_a_drain_under_a_missing_policy_does_not_begin() -> None:
    """Not yet begun: its node is not cordoned (as if paused) until the policy exists."""
    s = snap([vmi("a")], spec={"nodeName": "n1", "policyRef": {"name": "p"}},
             policy_ref=PolicyRef("p"))
    d = plan_drain(s)
    assert not d.cordon and not d.create
    assert d.status.nodes[0].phase == "Waiting"
    d = plan_drain(dataclasses.replace(s, policy_ref=PolicyRef("p", found=True, spec=GOOD),
                                       estimator=Estimator(target_startup=0.0)))
    assert d.cordon == ["n1"] and created(d) == ["vs-d-a-1"]


def test_a_wave_under_a_missing_policy_releases_nothing() -> None:
    spec = {"nodeSelector": {"matchLabels": {"zone": "a"}}, "maxUnavailable": 1,
            "releaseAfter": "1m", "policyRef": {"name": "p"}}
    status = NodeDrainStatus(start_time=stamp(NOW - dt.timedelta(hours=1)), nodes=[
        NodeEntry(name="n1", phase="Drained", since=stamp(NOW - dt.timedelta(minutes=5))),
        NodeEntry(name="n2", phase="Waiting"), NodeEntry(name="n3", phase="Waiting")])
    d = plan_drain(snap([vmi("x", "n2")], spec=spec, status=status, policy_ref=PolicyRef("p"),
                        nodes=[node("n1", unschedulable=True, annotations={
                            "virtshift.io/cordoned-by": "d"}), node("n2"), node("n3")]))
    assert not d.uncordon and not d.cordon and not d.create
    assert [n.phase for n in d.status.nodes] == ["Drained", "Waiting", "Waiting"]


def test_an_unusable_policy_ref_reverts_only_what_kubevirt_refused() -> None:
    """Under default rules a disk move whose migration failed 3 times (the default
    maxAttempts) would be put back; the drain's policy may allow more, so nothing is undone
    on the word of rules that are not the drain's. A volume update KubeVirt refused still
    goes back."""
    def dest_of(name: str):
        return dest(f"{name}-root-vs-000001", f"{name}-root", cls="local", owner="drain.d",
                    vm=name)
    moving = svm("a", "a-root-vs-000001", "a-root", migrating_volumes=True,
                 volumes_change=True)
    refused = svm("b", "b-root-vs-000001", "b-root", volumes_change=False,
                  volumes_change_message="One of the destination volumes doesn't exist")
    cs = claims(local("a-root"), dest_of("a"), local("b-root"), dest_of("b"))
    failed = [mig("a", i, "Failed", ended=NOW - dt.timedelta(hours=1)) for i in (1, 2, 3)]
    spec = {"nodeName": "n1", "policyRef": {"name": "p"}}
    s = drain_snap([moving, refused], cs, vmis=[vmi("a"), vmi("b")], migrations=failed,
                   spec=spec, status=draining(), policy_ref=PolicyRef("p", found=True,
                                                                      spec=GOOD))
    d = plan_drain(s)
    assert sorted(u.vm for u in d.revert) == ["a", "b"]  # a usable policy of 3 attempts
    d = plan_drain(dataclasses.replace(s, policy_ref=PolicyRef("p")))
    assert [u.vm for u in d.revert] == ["b"]
    assert (entry(d, "a").phase, entry(d, "a").reason) == ("Waiting", "PolicyNotFound")
    assert (entry(d, "b").phase, entry(d, "b").reason) == ("Failed", "VolumeUpdateRefused")
