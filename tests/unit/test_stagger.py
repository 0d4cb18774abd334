"""Staggered starts (domain.stagger): a migration that would start at once waits until its
memory transfer would begin after those leaving the same node end; table-driven, no API."""

from __future__ import annotations

import datetime as dt

import pytest
from test_drain_planner import mig as drain_mig
from test_drain_planner import snap

from virtshift.api.units import GiB, MiB
from virtshift.domain import stagger
from virtshift.domain.drain import plan_drain
from virtshift.domain.eta import Estimator
from virtshift.domain.rules import Rules
from virtshift.domain.views import MigrationInfo, VMIInfo

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
STARTUP = 10.0


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def transfer(start: float, seconds: float) -> stagger.Transfer:
    return stagger.Transfer(at(start), seconds)


@pytest.mark.parametrize(("seconds", "others", "delay"), [
    (2.0, [], 0.0),  # nothing leaves the node
    (2.0, [transfer(10, 3)], 3.0),  # begins with ours: wait until it ends
    (2.0, [transfer(9, 3)], 2.0),  # already sending: the rest of it
    (2.0, [transfer(5, 3)], 0.0),  # over before ours begins
    (2.0, [transfer(11.5, 3)], 4.5),  # ours would end inside it
    (2.0, [transfer(12, 3)], 0.0),  # ours ends as it begins
    (1.0, [transfer(11.5, 3)], 0.0),  # ours fits before it
    (2.0, [transfer(10, 3), transfer(13.5, 2)], 5.5),  # past both, not between them
    (2.0, [transfer(10, 3), transfer(15, 2)], 3.0),  # between them
    (2.0, [transfer(10, 11)], 0.0),  # longer than a target start-up: not worth a slot
])
def test_a_start_waits_until_its_transfer_overlaps_none(seconds, others, delay) -> None:
    assert stagger.wait(NOW, seconds, others, STARTUP) == pytest.approx(delay)


def mig(name: str, phase: str, **kw) -> MigrationInfo:
    return MigrationInfo(namespace="ns", name=name, vmi=name, phase=phase,
                         source=kw.pop("source", "n1"), **kw)


def test_under_way_counts_the_slots_kubevirt_gives_and_the_queue_it_starts_at_once() -> None:
    """Running ones from their Running stamp; those with a slot from Scheduling + start-up;
    of the queued, only as many as there are free slots (KubeVirt starts the oldest)."""
    migrations = [
        mig("running", "Running", created=at(-20), scheduling_at=at(-20), running_at=at(-9)),
        mig("elsewhere", "Running", source="n2", created=at(-5), running_at=at(-1)),
        mig("queued-old", "Pending", created=at(-2)),
        mig("queued-new", "Pending", created=at(-1)),
        mig("done", "Succeeded", created=at(-40), running_at=at(-30)),
    ]
    got = stagger.under_way(migrations, "n1", 2, NOW, Estimator(target_startup=STARTUP),
                            lambda m: 4.0)
    assert [(t.start, t.seconds) for t in got] == [
        (at(-9), 4.0 + stagger.STAMP_RESOLUTION),
        (at(-2 + STARTUP), 4.0 + stagger.STAMP_RESOLUTION)]


@pytest.mark.parametrize(("per_migration", "shares"), [
    (None, True),  # no cap: two transfers split the NIC
    (2 * GiB, True),  # two at 2 GiB/s exceed a 3 GiB/s NIC
    (1 * GiB, False),  # two at 1 GiB/s fit
])
def test_only_transfers_that_would_share_the_nic_are_staggered(per_migration, shares) -> None:
    rules = Rules(bandwidth_per_migration=per_migration)
    assert stagger.shares_nic(Estimator(), rules, 3 * GiB, 2) is shares


def test_the_transfer_alone_is_at_the_full_nic() -> None:
    est = Estimator()
    quiet = VMIInfo(namespace="ns", name="q", node="n1", memory=8 * GiB, dirty_rate=0.0)
    assert stagger.alone(est, quiet, Rules(), 8 * GiB) == pytest.approx(1.0, rel=0.05)
    # One that cannot converge runs until KubeVirt's completion timeout: no start waits
    # for it (longer than a target start-up).
    hot = VMIInfo(namespace="ns", name="h", node="n1", memory=8 * GiB, dirty_rate=900 * MiB)
    seconds = stagger.alone(est, hot, Rules(), 512 * MiB)
    assert seconds is not None and seconds > 150 * 8
    assert stagger.wait(NOW, 1.0, [transfer(9, seconds)], STARTUP) == 0.0


# -- in the drain planner -----------------------------------------------------------------------

def _vms() -> list[VMIInfo]:
    """Three quiet VMs on n1, 2, 8 and 4 GiB: 0.2, 0.8 and 0.4 s each at a 10 GiB/s NIC."""
    return [VMIInfo(namespace="ns", name=n, node="n1", memory=m * GiB, dirty_rate=0.0)
            for n, m in (("small", 2), ("big", 8), ("mid", 4))]


def test_a_source_starts_its_shortest_migration_and_waits_out_its_transfer() -> None:
    d = plan_drain(snap(_vms()))
    assert [m.vmi for m in d.create] == ["small"]
    # Its transfer (0.2 s at the full NIC) plus the timestamps' resolution.
    assert d.recheck_after == pytest.approx(0.2 + stagger.STAMP_RESOLUTION, abs=0.01)
    waiting = {e.name: e for e in d.status.vms}["big"]
    assert waiting.phase == "Pending" and waiting.message.startswith("staggered")


def test_once_the_transfer_is_out_of_the_way_the_rest_start_longest_first() -> None:
    first = drain_mig("small", 1, "Scheduling", created=NOW, scheduling_at=NOW)
    early = plan_drain(snap(_vms(), migrations=[first], now=at(0.5)))
    assert early.create == [] and early.recheck_after == pytest.approx(0.7, abs=0.01)
    d = plan_drain(snap(_vms(), migrations=[first], now=at(1.2)))
    # The longest in the free slot, the next queued in KubeVirt behind it.
    assert [m.vmi for m in d.create] == ["big", "mid"] and d.recheck_after is None


@pytest.mark.parametrize(("kw", "why"), [
    ({"rules": {f"ns/{n}": Rules(bandwidth_per_migration=1 * GiB)
                for n in ("small", "big", "mid")}}, "capped within the NIC"),
    ({"reaction_seconds": 6.0}, "our answers come later than half a start-up"),
])
def test_no_stagger_where_it_cannot_help(kw, why) -> None:
    d = plan_drain(snap(_vms(), **kw))
    assert [m.vmi for m in d.create] == ["big", "mid", "small"], why
    assert d.recheck_after is None
