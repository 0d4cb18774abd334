"""Maintenance windows of a MigrationPolicy: is one open now, when does it close, when next open.

Pure: the clock is the ``now`` argument (timezone-aware), nothing is read from the cluster.

How a window is read
--------------------
A window *opens* at each fire time of its cron ``schedule`` read as wall-clock time in its
``timeZone``, and stays open for ``duration`` of real elapsed time (not wall-clock time), as
the half-open interval ``[opening, opening + duration)``. Several windows may overlap; the
policy is open when any of them is.

Daylight-saving changes (the schedule is matched against local wall-clock times, each local
time at most once, then each match is placed on the real time line):

* A local time that does not exist (skipped by a spring-forward change) opens the window at
  the first instant after the gap, i.e. the moment of the change. ``0 2 * * *`` in
  Europe/Berlin on 2026-03-29 opens at 03:00 CEST (01:00 UTC). Several matches inside one
  gap (``*/15 2 * * *``) and a match right at its end (``0 2,3 * * *``) become one opening.
* A local time that happens twice (repeated by a fall-back change) opens the window once, at
  its first occurrence, still on summer time. ``30 2 * * *`` in Europe/Berlin on 2026-10-25
  opens at 02:30 CEST (00:30 UTC) and not again at 02:30 CET; likewise an hourly schedule
  fires once in the repeated hour.
* Durations are real time, so a window that spans a change ends that long after it opened:
  ``0 1 * * *`` for 2h in Europe/Berlin on 2026-03-29 closes at 04:00 CEST (02:00 UTC).

What is reported
----------------
``closes_at`` is when the policy stops being open: the end of the current opening, extended
through every opening (of any window) that starts before or exactly when the open period
would end, so abutting or overlapping windows count as one. Every opening of one window lasts
as long as the others, so the most recent opening at or before an instant is the one that
ends last; looking back to it alone is enough, however often the schedule fires. The
extension is followed for at most ``MAX_CHAIN`` openings: a configuration that never closes
(``* * * * *`` for 5m) reports the end reached by then, a time until which the policy is
certainly open and at which the caller evaluates again.

``next_open`` is the earliest opening of any window strictly after ``now``, also when the
policy is open now. All datetimes returned are in UTC.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from virtshift.api.common import CRON_PATTERN
from virtshift.api.migrationpolicy import Window
from virtshift.api.units import parse_duration

MAX_CHAIN = 64
_MINUTE = dt.timedelta(minutes=1)
# Far more fire times than one local hour repeated by a fall-back change can hold.
_MAX_SKIPS = 10_000
_REFERENCE = dt.datetime(2000, 1, 1)


@dataclass(frozen=True)
class WindowState:
    open: bool  # True when no windows are configured, or now is inside one
    closes_at: dt.datetime | None  # end of the current open period (None if none or closed)
    next_open: dt.datetime | None  # the next opening strictly after now (None if no windows)


INVALID_WINDOW = "InvalidWindow"  # reason: a window that cannot be read


class WindowError(ValueError):
    """A window whose schedule, duration or time zone cannot be used.

    The message names the field (``windows[1].timeZone: unknown time zone 'Mars/Base'``);
    ``problems`` lists every problem found, one per entry.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class _Compiled:
    schedule: str
    tz: dt.tzinfo
    duration: dt.timedelta

    def _iter(self, start: dt.datetime) -> croniter:
        return croniter(self.schedule, start, ret_type=dt.datetime)

    def opening_at_or_before(self, t: dt.datetime) -> dt.datetime | None:
        """The latest opening at or before ``t`` (UTC), or None when there is none."""
        local = t.astimezone(self.tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold:  # the second pass of a repeated hour: its wall times all fired already
            wall += local.replace(fold=0).utcoffset() - local.utcoffset()
        it = self._iter(_floor_minute(wall) + _MINUTE)  # get_prev is strictly before its start
        for _ in range(_MAX_SKIPS):
            try:
                opening = _to_utc(it.get_prev(), self.tz)
            except CroniterBadDateError:
                return None
            if opening <= t:
                return opening
        raise AssertionError(f"no opening of {self.schedule!r} found at or before {t}")

    def opening_after(self, t: dt.datetime) -> dt.datetime | None:
        """The earliest opening strictly after ``t`` (UTC), or None when there is none."""
        wall = t.astimezone(self.tz).replace(tzinfo=None, fold=0)
        it = self._iter(_floor_minute(wall))  # get_next is strictly after its start
        for _ in range(_MAX_SKIPS):
            try:
                opening = _to_utc(it.get_next(), self.tz)
            except CroniterBadDateError:
                return None
            if opening > t:
                return opening
        raise AssertionError(f"no opening of {self.schedule!r} found after {t}")


def _floor_minute(t: dt.datetime) -> dt.datetime:
    return t.replace(second=0, microsecond=0)


def _to_utc(wall: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """A local wall-clock time on the real time line, by the rules in the module docstring."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(dt.UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first  # exists; when repeated, fold=0 is its first occurrence
    # In a gap: fold=0 reads it with the offset from before the change (an instant after the
    # change), fold=1 with the offset from after it (an instant before). Find the change.
    lo = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    hi = int(first.timestamp())
    lo, hi = min(lo, hi), max(lo, hi)
    after = _utc(hi).astimezone(tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _utc(mid).astimezone(tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return _utc(hi)


def _utc(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _time_zone(name: str) -> dt.tzinfo:
    if name == "UTC":
        return dt.UTC
    return ZoneInfo(name)


def _compile_one(index: int, window: Window) -> tuple[_Compiled | None, list[str]]:
    path = f"windows[{index}]"
    problems: list[str] = []
    schedule = window.schedule
    if not isinstance(schedule, str) or not re.match(CRON_PATTERN, schedule):
        problems.append(
            f"{path}.schedule: {schedule!r} is not a five-field cron expression "
            "(minute hour day-of-month month day-of-week) or a macro such as @daily"
        )
    else:
        try:
            croniter(schedule, _REFERENCE).get_next(dt.datetime)
        except CroniterBadDateError:
            problems.append(f"{path}.schedule: {schedule!r} never fires (no such date)")
        except CroniterError as e:
            problems.append(f"{path}.schedule: {schedule!r} is not a usable cron expression: {e}")
    duration = dt.timedelta(0)
    try:
        duration = dt.timedelta(seconds=parse_duration(window.duration))
    except (ValueError, TypeError) as e:
        problems.append(f"{path}.duration: {e}")
    else:
        if duration <= dt.timedelta(0):
            problems.append(f"{path}.duration: must be greater than zero, got {window.duration!r}")
    tz: dt.tzinfo = dt.UTC
    try:
        tz = _time_zone(window.time_zone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        problems.append(f"{path}.timeZone: unknown time zone {window.time_zone!r}")
    if problems:
        return None, problems
    return _Compiled(schedule=schedule, tz=tz, duration=duration), []


def validate_windows(windows: Sequence[Window] | None) -> list[str]:
    """Every problem with ``windows``, each prefixed with its field path; empty when fine."""
    problems: list[str] = []
    for index, window in enumerate(windows or ()):
        problems += _compile_one(index, window)[1]
    return problems


def _compile(windows: Sequence[Window]) -> list[_Compiled]:
    compiled: list[_Compiled] = []
    problems: list[str] = []
    for index, window in enumerate(windows):
        one, found = _compile_one(index, window)
        problems += found
        if one is not None:
            compiled.append(one)
    if problems:
        raise WindowError(problems)
    return compiled


def window_state(windows: Sequence[Window] | None, now: dt.datetime) -> WindowState:
    """Whether new migrations may start at ``now``, when that ends, and when the next window
    opens. No windows means always open. Raises WindowError for an unusable window."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    if not windows:
        return WindowState(open=True, closes_at=None, next_open=None)
    compiled = _compile(windows)
    now = now.astimezone(dt.UTC)

    upcoming = [o for w in compiled if (o := w.opening_after(now)) is not None]
    next_open = min(upcoming, default=None)

    def end_of_latest_opening(w: _Compiled, t: dt.datetime) -> dt.datetime | None:
        opening = w.opening_at_or_before(t)
        return None if opening is None else opening + w.duration

    ends = [e for w in compiled if (e := end_of_latest_opening(w, now)) is not None and e > now]
    if not ends:
        return WindowState(open=False, closes_at=None, next_open=next_open)
    closes_at = max(ends)
    for _ in range(MAX_CHAIN):
        extended = max(
            (e for w in compiled if (e := end_of_latest_opening(w, closes_at)) is not None),
            default=closes_at,
        )
        if extended <= closes_at:
            break
        closes_at = extended
    return WindowState(open=True, closes_at=closes_at, next_open=next_open)


@dataclass(frozen=True)
class StartGate:
    """Whether a move may begin now so that it starts before the window's end."""

    may_start: bool
    closes_at: dt.datetime | None  # the end of the open period (None: no windows)
    next_open: dt.datetime | None  # when moves may begin again, when they may not now

    def closes_in(self, now: dt.datetime) -> float | None:
        """Seconds to the window's end (None: no end in sight)."""
        return None if self.closes_at is None else (self.closes_at - now).total_seconds()


def start_gate(windows: Sequence[Window] | None, now: dt.datetime, lead: float) -> StartGate:
    """Whether a move begun at ``now`` starts inside a window: the window is open and its end
    more than ``lead`` seconds away (``lead``: what passes between beginning a move and its
    start -- the caller's time to act, a target pod's start-up). Within ``lead`` of the end
    nothing begins, and ``next_open`` is the first opening after that end. No windows: always
    open. Raises WindowError for an unusable window."""
    state = window_state(windows, now)
    if not windows:
        return StartGate(True, None, None)
    if state.open and state.closes_at is not None:
        if (state.closes_at - now).total_seconds() > lead:
            return StartGate(True, state.closes_at, state.next_open)
        # The open period's last `lead` seconds: the next start is after its end.
        return StartGate(False, state.closes_at, window_state(windows, state.closes_at).next_open)
    return StartGate(False, None, state.next_open)
