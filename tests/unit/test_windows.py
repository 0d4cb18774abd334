"""Maintenance windows (virtshift.domain.windows), table-driven; every instant is exact UTC."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from virtshift.api.common import CRON_PATTERN
from virtshift.api.migrationpolicy import Window
from virtshift.domain.windows import (
    MAX_CHAIN,
    WindowError,
    WindowState,
    validate_windows,
    window_state,
)


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def win(schedule: str, duration: str, tz: str = "UTC") -> Window:
    return Window(schedule=schedule, duration=duration, time_zone=tz)


def state(open_: bool, closes_at: str | None, next_open: str | None) -> WindowState:
    return WindowState(
        open=open_,
        closes_at=at(closes_at) if closes_at else None,
        next_open=at(next_open) if next_open else None,
    )


DAILY = [win("0 9 * * *", "2h")]
MIDNIGHT = [win("0 22 * * *", "4h")]
WEEKEND = [win("0 8 * * SAT,SUN", "12h")]  # 2026-11-28 is a Saturday
TWO = [win("0 2 * * *", "1h"), win("0 14 * * *", "1h")]
OVERLAP = [win("0 8 * * *", "4h"), win("0 10 * * *", "4h")]
ABUT = [win("0 8 * * *", "2h"), win("0 10 * * *", "2h")]

# (windows, now, expected state)
CASES = {
    # one daily window
    "daily/inside": (DAILY, "2026-11-25T10:00",
                     state(True, "2026-11-25T11:00", "2026-11-26T09:00")),
    "daily/before": (DAILY, "2026-11-25T08:59", state(False, None, "2026-11-25T09:00")),
    "daily/at-opening": (DAILY, "2026-11-25T09:00", state(True, "2026-11-25T11:00",
                                                          "2026-11-26T09:00")),
    "daily/at-closing": (DAILY, "2026-11-25T11:00", state(False, None, "2026-11-26T09:00")),
    "daily/after": (DAILY, "2026-11-25T23:00", state(False, None, "2026-11-26T09:00")),
    # a window that spans midnight
    "midnight/before-midnight": (MIDNIGHT, "2026-11-25T23:30",
                                 state(True, "2026-11-26T02:00", "2026-11-26T22:00")),
    "midnight/after-midnight": (MIDNIGHT, "2026-11-26T01:59",
                                state(True, "2026-11-26T02:00", "2026-11-26T22:00")),
    "midnight/closed": (MIDNIGHT, "2026-11-26T02:00", state(False, None, "2026-11-26T22:00")),
    # weekends only
    "weekend/wednesday": (WEEKEND, "2026-11-25T12:00", state(False, None, "2026-11-28T08:00")),
    "weekend/saturday": (WEEKEND, "2026-11-28T09:00",
                         state(True, "2026-11-28T20:00", "2026-11-29T08:00")),
    "weekend/saturday-night": (WEEKEND, "2026-11-28T21:00", state(False, None, "2026-11-29T08:00")),
    "weekend/sunday": (WEEKEND, "2026-11-29T19:59",
                       state(True, "2026-11-29T20:00", "2026-12-05T08:00")),
    "weekend/monday": (WEEKEND, "2026-11-30T07:00", state(False, None, "2026-12-05T08:00")),
    # macro
    "@daily/open": ([win("@daily", "1h")], "2026-11-25T00:30",
                    state(True, "2026-11-25T01:00", "2026-11-26T00:00")),
    "@daily/closed": ([win("@daily", "1h")], "2026-11-25T01:00",
                      state(False, None, "2026-11-26T00:00")),
    # several windows
    "two/first": (TWO, "2026-11-25T02:30", state(True, "2026-11-25T03:00", "2026-11-25T14:00")),
    "two/between": (TWO, "2026-11-25T10:00", state(False, None, "2026-11-25T14:00")),
    "two/second": (TWO, "2026-11-25T14:30", state(True, "2026-11-25T15:00", "2026-11-26T02:00")),
    # overlapping and abutting windows merge into one open period
    "overlap/first-only": (OVERLAP, "2026-11-25T09:00",
                           state(True, "2026-11-25T14:00", "2026-11-25T10:00")),
    "overlap/both": (OVERLAP, "2026-11-25T11:00",
                     state(True, "2026-11-25T14:00", "2026-11-26T08:00")),
    "overlap/second-only": (OVERLAP, "2026-11-25T13:00",
                            state(True, "2026-11-25T14:00", "2026-11-26T08:00")),
    "abut/first": (ABUT, "2026-11-25T09:00", state(True, "2026-11-25T12:00", "2026-11-25T10:00")),
    # one window whose openings overlap each other (duration longer than the gap between them)
    "self-overlap/both-active": ([win("0 9,10 * * *", "3h")], "2026-11-25T11:00",
                                 state(True, "2026-11-25T13:00", "2026-11-26T09:00")),
    "self-overlap/second-active": ([win("0 9,10 * * *", "3h")], "2026-11-25T12:30",
                                   state(True, "2026-11-25T13:00", "2026-11-26T09:00")),
    # frequent short openings
    "quarter-hourly/open": ([win("*/15 * * * *", "10m")], "2026-11-25T10:20",
                            state(True, "2026-11-25T10:25", "2026-11-25T10:30")),
    "quarter-hourly/closed": ([win("*/15 * * * *", "10m")], "2026-11-25T10:27:30",
                              state(False, None, "2026-11-25T10:30")),
    # a weekend window in a time zone (CET = UTC+1 in November), Fri 22:00 to Mon 08:00
    "berlin-weekend/open": ([win("0 22 * * FRI", "58h", "Europe/Berlin")], "2026-11-29T12:00",
                            state(True, "2026-11-30T07:00", "2026-12-04T21:00")),
    "berlin-weekend/closed": ([win("0 22 * * FRI", "58h", "Europe/Berlin")], "2026-11-27T20:59",
                              state(False, None, "2026-11-27T21:00")),
    # --- DST, Europe/Berlin: 2026-03-29 01:00Z CET->CEST, 2026-10-25 01:00Z CEST->CET ---
    # 02:00 does not exist on the spring-forward day: the window opens at 03:00 CEST
    "berlin-spring/0200-before": ([win("0 2 * * *", "1h", "Europe/Berlin")], "2026-03-29T00:30",
                                  state(False, None, "2026-03-29T01:00")),
    "berlin-spring/0200-open": ([win("0 2 * * *", "1h", "Europe/Berlin")], "2026-03-29T01:00",
                                state(True, "2026-03-29T02:00", "2026-03-30T00:00")),
    "berlin-spring/0200-day-before": ([win("0 2 * * *", "1h", "Europe/Berlin")],
                                      "2026-03-28T00:00",
                                      state(False, None, "2026-03-28T01:00")),
    # every match inside the gap collapses into one opening at the change
    "berlin-spring/in-gap-once": ([win("*/30 2 * * *", "10m", "Europe/Berlin")],
                                  "2026-03-29T01:05",
                                  state(True, "2026-03-29T01:10", "2026-03-30T00:00")),
    # the duration is real time: 01:00 CET + 2h = 04:00 CEST
    "berlin-spring/real-duration": ([win("0 1 * * *", "2h", "Europe/Berlin")],
                                    "2026-03-29T01:59",
                                    state(True, "2026-03-29T02:00", "2026-03-29T23:00")),
    # 02:30 happens twice on the fall-back day: the window opens once, at 02:30 CEST
    "berlin-fall/0230-first-pass": ([win("30 2 * * *", "30m", "Europe/Berlin")],
                                    "2026-10-25T00:45",
                                    state(True, "2026-10-25T01:00", "2026-10-26T01:30")),
    "berlin-fall/0230-second-pass": ([win("30 2 * * *", "30m", "Europe/Berlin")],
                                     "2026-10-25T01:30",
                                     state(False, None, "2026-10-26T01:30")),
    # 01:30 is 23:30Z (CEST) on the fall-back day itself and 00:30Z (CET) the day after
    "berlin-fall/0130-on-the-day": ([win("30 1 * * *", "1h", "Europe/Berlin")],
                                    "2026-10-25T00:00",
                                    state(True, "2026-10-25T00:30", "2026-10-26T00:30")),
    "berlin-fall/0130-before": ([win("30 1 * * *", "1h", "Europe/Berlin")], "2026-10-24T22:00",
                                state(False, None, "2026-10-24T23:30")),
    "berlin-fall/0130-day-after": ([win("30 1 * * *", "1h", "Europe/Berlin")],
                                   "2026-10-25T12:00",
                                   state(False, None, "2026-10-26T00:30")),
    # hourly: the repeated hour opens once (02:00 CEST), the next opening is 03:00 CET
    "berlin-fall/hourly-repeated-hour": ([win("0 * * * *", "30m", "Europe/Berlin")],
                                         "2026-10-25T01:10",
                                         state(False, None, "2026-10-25T02:00")),
    # --- DST, America/New_York: 2026-03-08 07:00Z EST->EDT, 2026-11-01 06:00Z EDT->EST ---
    "ny-spring/0230-day-before": ([win("30 2 * * *", "1h", "America/New_York")],
                                  "2026-03-07T06:00",
                                  state(False, None, "2026-03-07T07:30")),
    "ny-spring/0230-in-gap": ([win("30 2 * * *", "1h", "America/New_York")], "2026-03-08T06:59",
                              state(False, None, "2026-03-08T07:00")),
    "ny-spring/0230-open": ([win("30 2 * * *", "1h", "America/New_York")], "2026-03-08T07:00",
                            state(True, "2026-03-08T08:00", "2026-03-09T06:30")),
    "ny-fall/0130-open": ([win("30 1 * * *", "1h", "America/New_York")], "2026-11-01T05:30",
                          state(True, "2026-11-01T06:30", "2026-11-02T06:30")),
    # 06:15Z is 01:15 EST, the second pass: still inside the opening of 01:30 EDT
    "ny-fall/0130-second-pass-open": ([win("30 1 * * *", "1h", "America/New_York")],
                                      "2026-11-01T06:15",
                                      state(True, "2026-11-01T06:30", "2026-11-02T06:30")),
    "ny-fall/0130-second-pass-closed": ([win("30 1 * * *", "1h", "America/New_York")],
                                        "2026-11-01T06:45",
                                        state(False, None, "2026-11-02T06:30")),
    # 01:45 already fired at 05:45Z (EDT): it does not fire again at 01:45 EST
    "ny-fall/0145-no-second-fire": ([win("45 1 * * *", "10m", "America/New_York")],
                                    "2026-11-01T06:15",
                                    state(False, None, "2026-11-02T06:45")),
}


@pytest.mark.parametrize(("windows", "now", "expected"), CASES.values(), ids=CASES.keys())
def test_window_state(windows: list[Window], now: str, expected: WindowState) -> None:
    got = window_state(windows, at(now))
    assert got == expected
    for value in (got.closes_at, got.next_open):
        assert value is None or value.tzinfo is dt.UTC


def test_now_in_any_time_zone_gives_the_same_answer() -> None:
    now = at("2026-11-25T10:00")
    berlin = now.astimezone(ZoneInfo("Europe/Berlin"))
    assert window_state(DAILY, berlin) == window_state(DAILY, now)


@pytest.mark.parametrize("windows", [None, []], ids=["none", "empty"])
def test_no_windows_means_always_open(windows: list[Window] | None) -> None:
    assert window_state(windows, at("2026-11-25T10:00")) == WindowState(True, None, None)
    assert validate_windows(windows) == []


def test_openings_that_never_stop_chaining_report_a_bounded_close() -> None:
    # every hour for 90 minutes: never closes; closes_at is where the look-ahead stopped
    got = window_state([win("0 * * * *", "90m")], at("2026-11-25T10:10"))
    assert got.open
    assert got.closes_at == at("2026-11-25T11:30") + dt.timedelta(hours=MAX_CHAIN)
    assert got.next_open == at("2026-11-25T11:00")


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window_state(DAILY, dt.datetime(2026, 11, 25, 10, 0))


def test_unknown_time_zone() -> None:
    windows = [win("0 2 * * *", "1h"), win("0 3 * * *", "1h", "Mars/Base")]
    message = "windows[1].timeZone: unknown time zone 'Mars/Base'"
    assert validate_windows(windows) == [message]
    with pytest.raises(WindowError) as raised:
        window_state(windows, at("2026-11-25T10:00"))
    assert str(raised.value) == message
    assert raised.value.problems == [message]


def test_every_problem_is_reported_with_its_field_path() -> None:
    windows = [
        win("0 9 * * *", "2h", "Europe/Berlin"),  # fine
        Window.model_construct(schedule="*/0 * * * *", duration="1h", time_zone="UTC"),
        win("0 0 31 2 *", "0s", "Europe"),
        Window.model_construct(schedule="0 0 * * sat", duration="soon", time_zone="UTC"),
    ]
    problems = validate_windows(windows)
    assert [p.split(":", 1)[0] for p in problems] == [
        "windows[1].schedule",
        "windows[2].schedule",
        "windows[2].duration",
        "windows[2].timeZone",
        "windows[3].schedule",
        "windows[3].duration",
    ]
    assert "never fires" in problems[1]
    assert "greater than zero" in problems[2]
    with pytest.raises(WindowError) as raised:
        window_state(windows, at("2026-11-25T10:00"))
    assert raised.value.problems == problems
    assert isinstance(raised.value, ValueError)


# Cron strings and whether the CRD pattern accepts them. The pattern may be stricter than
# croniter (lower-case names, croniter extensions), never more lenient.
CRON_TABLE = {
    "* * * * *": True,
    "0 2 * * *": True,
    "30 1 * * *": True,
    "0 8 * * SAT,SUN": True,
    "0 22 * * FRI": True,
    "*/15 * * * *": True,
    "0/15 8-18 * * MON-FRI": True,
    "0 9,10 * * *": True,
    "0 0 1-31/2 * *": True,
    "0 0 * JAN-MAR *": True,
    "0 0 * * 7": True,
    "0 0 * * 0-7": True,
    "00 08 01 01 *": True,
    "0  0 * * *": True,
    "59 23 31 12 SAT": True,
    "@daily": True,
    "@hourly": True,
    "@weekly": True,
    "@monthly": True,
    "@yearly": True,
    "@annually": True,
    "@midnight": True,
    "60 * * * *": False,
    "0 24 * * *": False,
    "0 0 0 * *": False,
    "0 0 32 * *": False,
    "0 0 * 13 *": False,
    "0 0 * * 8": False,
    "0 0 *": False,
    "0 0 * * * *": False,
    "@reboot": False,
    "@every 5m": False,
    "0 0 * * SATURDAY": False,
    "*/5-10 * * * *": False,
    "H * * * *": False,
    "0 0 * * 5L": False,
    "0 0 L * *": False,
    "0 0 * * 1#2": False,
    "0 0 ? * *": False,
    "0 0 * * sat": False,
    " 0 0 * * *": False,
    "": False,
    "*/0 * * * *": False,  # a step of zero: croniter refuses it, so does the CRD
    "0 0/0 * * *": False,
}
def _croniter_accepts(expr: str) -> bool:
    try:
        croniter(expr)
    except (ValueError, KeyError, IndexError):
        return False
    return True


@pytest.mark.parametrize(("expr", "accepted"), CRON_TABLE.items(), ids=repr)
def test_cron_pattern_agrees_with_croniter(expr: str, accepted: bool) -> None:
    by_pattern = bool(re.match(CRON_PATTERN, expr))
    assert by_pattern == accepted
    if by_pattern:
        assert _croniter_accepts(expr)
    if not _croniter_accepts(expr):
        assert not by_pattern
