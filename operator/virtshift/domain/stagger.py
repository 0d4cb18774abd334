"""Staggered starts: one memory transfer at a time through a source node's NIC.

Two migrations that leave a node together spend their target start-up side by side, then
send their memory at the same time, each at half the NIC; both take longer, and since they
end together the next two collide again, round after round. Started a transfer's length
apart instead, each sends at the full NIC while the other's target pod starts, and KubeVirt's
queue (longest first) keeps them apart from then on. So a migration that would start at once
(a free slot) waits until its transfer would begin after those already under way end.

A wait is never longer than the target start-up time: beyond it, predictions (a dirty rate
that changed, a transfer that stalled) are too weak to hold a slot on."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from virtshift.domain.eta import Estimator
from virtshift.domain.rules import Rules
from virtshift.domain.views import MigrationInfo, VMIInfo

# phaseTransitionTimestamps have whole seconds: a migration may have started up to one
# second after its stamp says.
STAMP_RESOLUTION = 1.0


@dataclass(frozen=True)
class Transfer:
    """When a migration's memory transfer is predicted to run (cluster time)."""

    start: dt.datetime
    seconds: float

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.seconds)


def alone(estimator: Estimator, vmi: VMIInfo, rules: Rules, nic: float | None) -> float | None:
    """Seconds the VM's transfer takes with the NIC to itself; None when it never ends."""
    seconds = estimator.transfer(vmi, rules, nic, 1).duration
    return seconds if math.isfinite(seconds) else None


def shares_nic(estimator: Estimator, rules: Rules, nic: float | None, concurrency: int) -> bool:
    """Whether ``concurrency`` transfers from one node slow each other down: not when
    bandwidthPerMigration caps them all within the NIC."""
    full = nic or rules.node_bandwidth or estimator.node_bandwidth
    return not rules.bandwidth_per_migration or \
        rules.bandwidth_per_migration * max(concurrency, 2) > full


def under_way(migrations: Iterable[MigrationInfo], source: str, slots: int, now: dt.datetime,
              estimator: Estimator, seconds_of: Callable[[MigrationInfo], float | None]
              ) -> list[Transfer]:
    """The transfers from ``source`` that KubeVirt has started or is starting: those holding
    one of its ``slots`` (Scheduling on), and the oldest queued ones that a free slot takes at
    once. Each runs from its Running stamp, else start-up after it took its slot."""
    mine = [m for m in migrations if m.source == source and m.unfinished]
    taking = [m for m in mine if not m.queued]
    queued = sorted((m for m in mine if m.queued), key=lambda m: m.created or now)
    out = []
    for m in taking + queued[:max(slots - len(taking), 0)]:
        seconds = seconds_of(m)
        if seconds is None:
            continue
        taken = m.scheduling_at or m.created or now
        start = m.running_at or taken + dt.timedelta(seconds=estimator.target_startup)
        out.append(Transfer(start, seconds + STAMP_RESOLUTION))
    return out


def wait(now: dt.datetime, seconds: float, others: list[Transfer], startup: float) -> float:
    """Seconds to wait before starting a migration whose transfer (``seconds`` long) begins
    ``startup`` after it starts, so that it overlaps none of ``others``; 0 when it need not
    wait or would wait longer than ``startup``."""
    begin = now + dt.timedelta(seconds=startup)
    delay = 0.0
    for t in sorted(others, key=lambda t: t.start):
        start = begin + dt.timedelta(seconds=delay)
        if start < t.end and t.start < start + dt.timedelta(seconds=seconds):
            delay = (t.end - begin).total_seconds()
    return delay if 0 < delay <= startup else 0.0
