"""When the simulator's virt-controller starts a queued migration (sim.slots), after
pkg/virt-controller/watch/migration/migration.go handleTargetPodCreation: a VMIM refused by a
full limit is requeued after getRequeueDelayForPriority (1 s system-critical, 3 s
user-triggered, 5 s otherwise; 5 s for all without the priority queue), and nothing else wakes
it when a slot frees."""

from __future__ import annotations

import pytest

from virtshift.sim.slots import Slots, first_check, requeue_delay


@pytest.mark.parametrize(("priority", "queue", "seconds"), [
    (100, True, 1.0),   # system-critical (evacuations in 1.9)
    (50, True, 3.0),    # user-triggered
    (20, True, 5.0),    # system-maintenance: the default branch
    (0, True, 5.0),     # no spec.priority (virtshift's, anyone's but virt-controller's)
    (100, False, 5.0),  # without MigrationPriorityQueue (1.7/1.8 without the gate)
])
def test_requeue_delay(priority: int, queue: bool, seconds: float) -> None:
    assert requeue_delay(priority, queue) == seconds


@pytest.mark.parametrize(("due", "free_since", "delay", "at"), [
    (10.0, 4.0, 5.0, 10.0),    # the slot was free when it was checked: at once
    (10.0, 10.0, 5.0, 10.0),
    (10.0, 12.0, 5.0, 15.0),   # refused at 10, checked again at 15
    (10.0, 15.0, 5.0, 15.0),
    (10.0, 15.5, 5.0, 20.0),
    (10.0, 12.0, 1.0, 12.0),   # system-critical: within a second
    (10.0, 12.2, 1.0, 13.0),
])
def test_first_check_after_the_slot_freed(due: float, free_since: float, delay: float,
                                          at: float) -> None:
    assert first_check(due, free_since, delay) == at


def test_slots_remember_when_each_slot_freed() -> None:
    slots = Slots()
    # Two slots on n1 free since the start (nothing ran there): free since 0.
    assert slots.free_since("n1", free_in_cluster=5, free_on_node=2) == 0.0
    slots.freed("n1", 30.0)
    slots.freed("n1", 20.0)
    # Both of n1's slots freed during the run (the cluster has others never used): the
    # earlier one is taken first.
    assert slots.free_since("n1", free_in_cluster=5, free_on_node=2) == 20.0
    assert slots.free_since("n1", free_in_cluster=2, free_on_node=2) == 20.0
    slots.take("n1", free_in_cluster=2, free_on_node=2)
    assert slots.free_since("n1", free_in_cluster=1, free_on_node=1) == 30.0
    # One free slot on n1 but two entries: only the latest counts after trim.
    slots.freed("n1", 40.0)
    slots.trim(free_in_cluster=1, free_on={"n1": 1})
    assert slots.free_since("n1", free_in_cluster=1, free_on_node=1) == 40.0
    # Another node's slot: its own entries, and the cluster's.
    slots.freed("n2", 50.0)
    assert slots.free_since("n2", free_in_cluster=2, free_on_node=1) == 50.0
    slots.trim(free_in_cluster=0, free_on={"n1": 0, "n2": 0})
    assert slots.node == {} and slots.cluster == []
