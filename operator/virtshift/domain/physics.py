"""Pre-copy live-migration physics: how long a memory transfer takes and whether it converges.

The model is the iterative pre-copy of QEMU as analysed by Liu et al. (HPDC 2011). Guest memory
M is sent at bandwidth B while the guest keeps dirtying pages at rate D, so with lambda = D/B
round 0 sends M in M/B seconds and round i sends M*lambda^i. At each round boundary QEMU switches
over (stop-and-copy) once the bytes still dirty can be sent within the downtime limit; the guest
is paused for remaining/B seconds. With lambda >= 1 the dirty set never shrinks, and the
migration only ends through auto-converge (vCPU throttling), post-copy, or KubeVirt aborting it.

Simplifications, kept deliberately so the operator's ETA and the simulator agree:

* Switch-over is decided at round boundaries only (QEMU also re-checks mid-pass). The downtime
  limit is QEMU's default (300 ms): KubeVirt's legacy convergence path never changes it.
* The dirty set is measured as "unsent bytes of this round + bytes dirtied since it began",
  capped at M (pages dirtied twice, or dirtied before being sent, are not de-duplicated). It is
  what post-copy still has to pull when it starts mid-round.
* libvirt's "data remaining", which KubeVirt's progress timeout watches, is the unsent part of
  the current round: the dirty bitmap is synced only when a round begins. KubeVirt counts any
  drop between two polls as progress (virt-launcher live-migration-source.go,
  processInflightMigration), so a transfer that is moving at all never trips the progress
  timeout, however little it converges; only a stalled one (no bandwidth) does.
* KubeVirt compares whole elapsed seconds with ``>`` (isMigrationProgressing,
  shouldTriggerTimeout), so a limit of N seconds acts at N + 1 seconds.
* At the completion timeout KubeVirt (shouldAssistMigrationToComplete) switches to post-copy
  when both allowWorkloadDisruption and allowPostCopy hold, pauses the guest (mode Paused, the
  limit doubled) when only allowWorkloadDisruption does, and aborts otherwise. Neither timeout
  applies in post-copy. The completion timeout is the only trigger of all three: with
  completionTimeoutPerGiB 0 (or none given) shouldTriggerTimeout is always false, so KubeVirt
  never switches to post-copy, never pauses and never aborts for it; a pre-copy that cannot
  converge then runs until the progress timeout (only if it stalls) or until it is deleted.
* Auto-converge engages when a round fails to shrink the dirty set (effective lambda >= 1):
  20% throttle, then +10% per further non-shrinking round, capped at 99%. QEMU's own trigger is
  "dirtied more than 50% of what was sent, twice", which throttles earlier and harder.
* Post-copy pauses the guest for POST_COPY_SWITCH_DOWNTIME (device state); that pause is
  reported as downtime but not added to the duration. Post-copy is never aborted.
* A prediction (``predict``, ``eta``: no end in sight) of a run that cannot end (nothing left to
  rescue it, no completion timeout) fails as "NotConverging" as soon as a round fails to shrink
  the dirty set. Stepped in finite steps (the simulator), the same run just goes on, round after
  round, as QEMU's does.
* ``ideal_post_copy`` (bounds only, never a prediction of KubeVirt): post-copy starts as soon as
  a round fails to shrink the dirty set, the earliest point the model could switch.

Everything here is pure: time is an input (``advance(dt, ...)``), never read from a clock.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import Enum, StrEnum

QEMU_DEFAULT_DOWNTIME = 0.3
AUTO_CONVERGE_INITIAL = 0.20
AUTO_CONVERGE_STEP = 0.10
AUTO_CONVERGE_MAX = 0.99
POST_COPY_SWITCH_DOWNTIME = 0.05
MAX_ROUNDS = 10_000
# KubeVirt truncates elapsed time to whole seconds and compares with ">": a limit of N seconds
# acts once N + 1 seconds have passed.
KUBEVIRT_TIMEOUT_GRACE = 1.0

PROGRESS_TIMEOUT = "ProgressTimeout"
COMPLETION_TIMEOUT = "CompletionTimeout"
NOT_CONVERGING = "NotConverging"

# Relative slack for "the dirty set shrank": accumulated floating-point noise (many small
# steps) must not turn an effective lambda of exactly 1 into a crawling convergence.
_TOLERANCE = 1e-9


def completion_limit(per_gib: float, data_bytes: float) -> int:
    """KubeVirt's acceptableCompletionTime in seconds: completionTimeoutPerGiB times the
    migration's data size (guest memory plus migrated volumes) in decimal GB rounded up, as
    virt-launcher's getVMIMigrationDataSize computes it (Quantity.ScaledValue(Giga)). 0 turns
    the completion timeout off."""
    return int(per_gib) * math.ceil(max(data_bytes, 0.0) / 1e9)


class Mode(StrEnum):
    PRE_COPY = "PreCopy"
    AUTO_CONVERGE = "AutoConverge"
    POST_COPY = "PostCopy"
    PAUSED = "Paused"  # KubeVirt paused the guest so the migration can complete


@dataclass(frozen=True)
class Transfer:
    """One migration's memory transfer at constant bandwidth and dirty rate (bytes, seconds)."""

    memory: float  # bytes of guest memory
    dirty_rate: float  # bytes/s the guest dirties while running
    bandwidth: float  # bytes/s available to this migration
    max_downtime: float = QEMU_DEFAULT_DOWNTIME
    auto_converge: bool = False
    post_copy: bool = False
    # KubeVirt's limit, seconds since the start; 0 or None: none (completionTimeoutPerGiB 0).
    completion_timeout: float | None = None
    progress_timeout: float | None = None  # seconds without a drop of data remaining
    workload_disruption: bool | None = None  # allowWorkloadDisruption; None follows post_copy
    ideal_post_copy: bool = False  # post-copy at the first non-shrinking round (bounds only)


@dataclass(frozen=True)
class Prediction:
    """The outcome of a transfer.

    ``duration`` is inf only when the run can never end (no bandwidth and no timeout).
    ``rounds`` counts memory passes begun, the stop-and-copy pass included, so for plain
    pre-copy ``duration == M/B * (1 - lambda**rounds) / (1 - lambda)``.
    """

    converges: bool
    mode: Mode  # how it finished (or would have had to)
    duration: float  # seconds from start of memory transfer to completion (or to abort)
    downtime: float  # seconds the guest was paused (0 when not converging)
    bytes_sent: float
    rounds: int
    throttle: float  # final auto-converge throttle, 0..0.99
    failure_reason: str | None  # None when converges


class _Phase(Enum):
    PRE_COPY = "pre-copy"  # guest running, rounds of dirty pages being sent
    STOP_AND_COPY = "stop-and-copy"  # guest paused, last dirty bytes being sent
    POST_COPY = "post-copy"  # guest running on the target, pulling what it still lacks
    DONE = "done"


def _non_negative(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")


class PreCopyRun:
    """Stateful stepper for the simulator: bandwidth may change between steps (shared NICs),
    dirty rate too. Events inside a step (round ends, timeouts, completion) happen at their
    exact time, so the result does not depend on the step size."""

    def __init__(
        self,
        memory: float,
        dirty_rate: float,
        max_downtime: float = QEMU_DEFAULT_DOWNTIME,
        auto_converge: bool = False,
        post_copy: bool = False,
        completion_timeout: float | None = None,
        progress_timeout: float | None = None,
        workload_disruption: bool | None = None,
        ideal_post_copy: bool = False,
    ) -> None:
        for name, value in (("memory", memory), ("dirty_rate", dirty_rate),
                            ("max_downtime", max_downtime),
                            ("completion_timeout", completion_timeout),
                            ("progress_timeout", progress_timeout)):
            _non_negative(name, value)
        self._memory = float(memory)
        self._dirty_rate = float(dirty_rate)
        self._max_downtime = float(max_downtime)
        self._auto_converge = auto_converge
        self._post_copy = post_copy
        # KubeVirt: allowWorkloadDisruption follows allowPostCopy unless set.
        self._disruption = post_copy if workload_disruption is None else workload_disruption
        # 0 turns a KubeVirt timeout off (shouldTriggerTimeout: acceptableCompletionTime == 0;
        # isMigrationProgressing: progressTimeout == 0).
        self._completion_timeout = completion_timeout or None
        self._progress_timeout = progress_timeout or None
        self._ideal_post_copy = ideal_post_copy

        self._phase = _Phase.PRE_COPY
        self._rounds = 0  # 0 = not started yet (no bandwidth so far): all of memory is dirty
        self._round_size = self._memory  # bytes this round must send
        self._round_sent = 0.0
        self._round_dirtied = 0.0  # bytes dirtied since this round began (the next round)
        self._tail = 0.0  # bytes left in stop-and-copy / post-copy
        self._elapsed = 0.0
        self._downtime = 0.0
        self._bytes_sent = 0.0
        self._throttle = 0.0
        self._switched_to_post_copy = False
        self._paused = False  # KubeVirt paused the guest at the completion timeout
        self._failure_reason: str | None = None
        self._last_progress = 0.0  # when data remaining last dropped

    # -- read-only state ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def failed(self) -> bool:
        return self._failure_reason is not None

    @property
    def failure_reason(self) -> str | None:
        return self._failure_reason

    @property
    def mode(self) -> Mode:
        if self._switched_to_post_copy:
            return Mode.POST_COPY
        if self._paused:
            return Mode.PAUSED
        return Mode.AUTO_CONVERGE if self._throttle > 0 else Mode.PRE_COPY

    @property
    def elapsed(self) -> float:
        return self._elapsed

    @property
    def downtime(self) -> float:
        return 0.0 if self.failed else self._downtime

    @property
    def bytes_sent(self) -> float:
        return self._bytes_sent

    @property
    def remaining(self) -> float:
        """libvirt's data remaining: unsent bytes of the current round (or of stop-and-copy /
        post-copy)."""
        if self._phase is _Phase.PRE_COPY or (self.failed and not self._switched_to_post_copy
                                              and not self._paused):
            return self._round_size - self._round_sent
        return self._tail

    @property
    def pending(self) -> float:
        """The dirty set: what the target still lacks."""
        if self._phase is _Phase.PRE_COPY or (self.failed and not self._switched_to_post_copy
                                              and not self._paused):
            return min(self._memory, self._round_size - self._round_sent + self._round_dirtied)
        return self._tail

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def last_progress(self) -> float:
        """Elapsed seconds at which data remaining last dropped."""
        return self._last_progress

    @property
    def throttle(self) -> float:
        return self._throttle

    # -- inputs ---------------------------------------------------------------------------

    def set_dirty_rate(self, rate: float) -> None:
        _non_negative("dirty_rate", rate)
        self._dirty_rate = float(rate)

    def advance(self, dt: float, bandwidth: float) -> None:
        """Move time forward ``dt`` seconds at ``bandwidth`` bytes/s (<= 0: no progress, but
        the time still counts toward the timeouts). Stops early at completion or abort.
        ``dt`` inf predicts: a run that can never end fails as NotConverging."""
        _non_negative("dt", dt)
        bw = max(float(bandwidth), 0.0)
        left = float(dt)
        to_the_end = math.isinf(left)
        while self._phase is not _Phase.DONE:
            if self._phase is _Phase.PRE_COPY and self._rounds == 0 and bw > 0:
                self._begin_round(self._memory, bw)
                continue
            h, event = self._next_event(bw)
            if event is None or h > left:
                if math.isfinite(left):
                    self._flow(left, bw)
                return  # with left == inf: nothing can ever happen at this bandwidth
            self._flow(h, bw)
            left -= h
            self._handle(event, bw, to_the_end)

    def advance_copying(self, dt: float) -> float:
        """Let up to ``dt`` seconds pass while a volume migration copies disks ahead of memory:
        data remaining drops (progress), no memory is sent, and the completion timeout runs
        (aborting: libvirt cannot switch a block copy to post-copy). Returns the seconds used."""
        _non_negative("dt", dt)
        if self.done:
            return 0.0
        used = dt
        if self._completion_timeout is not None:
            used = min(dt, max(0.0, self._completion_timeout + KUBEVIRT_TIMEOUT_GRACE
                               - self._elapsed))
        self._elapsed += used
        self._last_progress = self._elapsed
        if used < dt:
            self._fail(COMPLETION_TIMEOUT)
        return used

    def eta(self, bandwidth: float) -> float:
        """Predicted seconds until the run ends (completes or is aborted) if ``bandwidth`` and
        the current dirty rate hold from now on; inf if it can never end."""
        if self.done:
            return 0.0
        future = copy.copy(self)  # all state is immutable scalars: a shallow copy is a fork
        future.advance(math.inf, bandwidth)
        if not future.done or future.failure_reason == NOT_CONVERGING:
            return math.inf
        return future._elapsed - self._elapsed

    def prediction(self) -> Prediction:
        """This run's outcome so far, as a Prediction (final once ``done``)."""
        if not self.done:
            return Prediction(converges=False, mode=self.mode, duration=math.inf, downtime=0.0,
                              bytes_sent=self._bytes_sent, rounds=self._rounds,
                              throttle=self._throttle, failure_reason=NOT_CONVERGING)
        return Prediction(converges=not self.failed, mode=self.mode, duration=self._elapsed,
                          downtime=self.downtime, bytes_sent=self._bytes_sent,
                          rounds=self._rounds, throttle=self._throttle,
                          failure_reason=self._failure_reason)

    # -- mechanics ------------------------------------------------------------------------

    @property
    def _effective_dirty_rate(self) -> float:
        return 0.0 if self._paused else self._dirty_rate * (1.0 - self._throttle)

    def _timeouts(self, bw: float) -> list[tuple[float, str]]:
        """KubeVirt's timeouts still ahead, as (seconds from now, which). None in post-copy."""
        out: list[tuple[float, str]] = []
        if self._progress_timeout is not None and bw <= 0:
            # Only a stalled transfer stops data remaining from dropping.
            at = self._last_progress + self._progress_timeout + KUBEVIRT_TIMEOUT_GRACE
            out.append((max(0.0, at - self._elapsed), PROGRESS_TIMEOUT))
        if self._completion_timeout is not None:
            limit = self._completion_timeout * (2 if self._paused else 1)
            at = limit + KUBEVIRT_TIMEOUT_GRACE
            out.append((max(0.0, at - self._elapsed), COMPLETION_TIMEOUT))
        return out

    def _next_event(self, bw: float) -> tuple[float, str | None]:
        """Seconds until the next thing that changes the phase, and what it is."""
        if self._phase is _Phase.POST_COPY:
            return (self._tail / bw, "drained") if bw > 0 else (math.inf, None)
        # Candidates in tie-break order: a round ending on the deadline may still converge.
        candidates: list[tuple[float, str]] = []
        if self._phase is _Phase.STOP_AND_COPY:
            if bw > 0:
                candidates.append((self._tail / bw, "drained"))
            if self._paused:  # the guest was paused by KubeVirt: its timeouts still run
                candidates += self._timeouts(bw)
        else:
            if bw > 0 and self._rounds > 0:
                candidates.append(((self._round_size - self._round_sent) / bw, "round"))
            candidates += self._timeouts(bw)
        if not candidates:
            return math.inf, None
        best = min(h for h, _ in candidates)
        return best, next(e for h, e in candidates if h == best)

    def _flow(self, h: float, bw: float) -> None:
        """Let h seconds pass with no event inside them."""
        if h <= 0:
            return
        self._elapsed += h
        moved = bw * h
        if bw > 0 and self._phase is not _Phase.POST_COPY:
            self._last_progress = self._elapsed  # data remaining keeps dropping
        if self._phase is _Phase.PRE_COPY:
            if self._rounds > 0:
                moved = min(moved, self._round_size - self._round_sent)
                self._round_sent += moved
                self._bytes_sent += moved
            self._round_dirtied = min(self._memory,
                                      self._round_dirtied + self._effective_dirty_rate * h)
        else:
            moved = min(moved, self._tail)
            self._tail -= moved
            self._bytes_sent += moved
            if self._phase is _Phase.STOP_AND_COPY:
                self._downtime += h

    def _handle(self, event: str, bw: float, to_the_end: bool) -> None:
        if event == "drained":
            self._tail = 0.0
            self._phase = _Phase.DONE
        elif event == "round":
            self._bytes_sent += self._round_size - self._round_sent
            self._round_sent = self._round_size
            self._end_round(bw, to_the_end)
        elif event == PROGRESS_TIMEOUT:
            self._fail(PROGRESS_TIMEOUT)
        elif event == COMPLETION_TIMEOUT:
            if self._disruption and self._post_copy and not self._paused:
                self._start_post_copy(self.pending)
            elif self._disruption and not self._paused:
                self._pause()
            else:
                self._fail(COMPLETION_TIMEOUT)

    def _end_round(self, bw: float, to_the_end: bool) -> None:
        """A pass finished: what it left dirty is the next pass, unless something gives way."""
        previous = self._round_size
        nxt = min(self._memory, self._round_dirtied)
        if nxt / bw <= self._max_downtime:
            self._begin_round(nxt, bw)  # becomes the stop-and-copy
            return
        if nxt >= previous * (1 - _TOLERANCE):  # the round did not shrink the dirty set
            if self._post_copy and self._disruption and self._ideal_post_copy:
                self._start_post_copy(nxt)
                return
            if self._auto_converge and self._throttle < AUTO_CONVERGE_MAX:
                raised = AUTO_CONVERGE_INITIAL if self._throttle == 0 else \
                    self._throttle + AUTO_CONVERGE_STEP
                # round(): 0.2 + 3 * 0.1 must be exactly 0.5, or lambda 2 crawls at 0.99999...
                self._throttle = min(AUTO_CONVERGE_MAX, round(raised, 9))
            elif self._completion_timeout is None and to_the_end:
                # Nothing left that could end it (no completion timeout: no post-copy, pause
                # or abort either): the progress timeout never fires while data is moving.
                self._fail(NOT_CONVERGING)
                return
        if to_the_end and self._rounds >= MAX_ROUNDS:
            self._fail(NOT_CONVERGING)  # safety bound: converging too slowly to matter
            return
        self._begin_round(nxt, bw)

    def _begin_round(self, size: float, bw: float) -> None:
        self._rounds += 1
        if size / bw <= self._max_downtime:
            self._phase = _Phase.STOP_AND_COPY
            self._tail = size
            if size == 0:
                self._phase = _Phase.DONE
            return
        self._round_size = size
        self._round_sent = 0.0
        self._round_dirtied = 0.0

    def _start_post_copy(self, size: float) -> None:
        self._switched_to_post_copy = True
        self._downtime = POST_COPY_SWITCH_DOWNTIME
        self._tail = size
        self._phase = _Phase.POST_COPY if size > 0 else _Phase.DONE

    def _pause(self) -> None:
        """KubeVirt suspends the guest (mode Paused): nothing is dirtied any more, and what the
        target still lacks goes across while the guest stays paused (all of it downtime)."""
        self._paused = True
        self._tail = self.pending
        self._phase = _Phase.STOP_AND_COPY if self._tail > 0 else _Phase.DONE

    def _fail(self, reason: str) -> None:
        self._failure_reason = reason
        self._phase = _Phase.DONE


def predict(t: Transfer) -> Prediction:
    """The outcome of a transfer at constant bandwidth and dirty rate.

    Iterates round by round (O(rounds), bounded by MAX_ROUNDS) with the same mechanics as
    PreCopyRun, so the operator's prediction and the simulator cannot disagree.
    """
    run = PreCopyRun(t.memory, t.dirty_rate, max_downtime=t.max_downtime,
                     auto_converge=t.auto_converge, post_copy=t.post_copy,
                     completion_timeout=t.completion_timeout,
                     progress_timeout=t.progress_timeout,
                     workload_disruption=t.workload_disruption,
                     ideal_post_copy=t.ideal_post_copy)
    run.advance(math.inf, t.bandwidth)
    return run.prediction()
