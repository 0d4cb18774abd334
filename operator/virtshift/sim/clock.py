"""Simulated time: ``time_scale`` simulated seconds pass per wall-clock second.

Anchored on an epoch both sides can read (the KubeVirt CR's creationTimestamp), so the
simulator's timestamps and an operator run with ``--time-scale`` agree on "now".
"""

from __future__ import annotations

import datetime as dt
import time


class SimClock:
    def __init__(self, time_scale: float, epoch: dt.datetime | None = None) -> None:
        self.time_scale = time_scale
        self.start = (epoch or dt.datetime.now(dt.UTC)).replace(microsecond=0)

    def now(self) -> float:
        """Simulated seconds since the epoch."""
        return (time.time() - self.start.timestamp()) * self.time_scale

    def at(self, sim_seconds: float) -> dt.datetime:
        return self.start + dt.timedelta(seconds=sim_seconds)

    def stamp(self, sim_seconds: float | None = None) -> str:
        """RFC 3339 (seconds precision, as Kubernetes writes) of a simulated instant."""
        when = self.at(self.now() if sim_seconds is None else sim_seconds)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
