"""Pre-copy physics: closed forms, failure modes, and the stepper agreeing with predict()."""

from __future__ import annotations

import math

import pytest

from virtshift.api.units import GiB, MiB
from virtshift.domain.eta import Estimator
from virtshift.domain.physics import (
    AUTO_CONVERGE_MAX,
    MAX_ROUNDS,
    POST_COPY_SWITCH_DOWNTIME,
    QEMU_DEFAULT_DOWNTIME,
    Mode,
    PreCopyRun,
    Prediction,
    Transfer,
    completion_limit,
    predict,
)
from virtshift.domain.rules import rules_from
from virtshift.domain.views import KubeVirtMigrationConfig, VMIInfo

M = 8 * GiB
B = 1 * GiB  # so M/B = 8 s


def run_stepper(t: Transfer, dt: float, limit: float = 1e5) -> PreCopyRun:
    run = PreCopyRun(t.memory, t.dirty_rate, max_downtime=t.max_downtime,
                     auto_converge=t.auto_converge, post_copy=t.post_copy,
                     completion_timeout=t.completion_timeout,
                     progress_timeout=t.progress_timeout,
                     workload_disruption=t.workload_disruption,
                     ideal_post_copy=t.ideal_post_copy)
    while not run.done and run.elapsed < limit:
        run.advance(dt, t.bandwidth)
    return run


# -- plain pre-copy: the geometric series ---------------------------------------------------

@pytest.mark.parametrize("lam", [0.5, 0.8, 0.95])
def test_converging_precopy_matches_geometric_series(lam: float) -> None:
    p = predict(Transfer(memory=M, dirty_rate=lam * B, bandwidth=B))
    n = p.rounds
    assert p.converges and p.mode is Mode.PRE_COPY and p.failure_reason is None
    assert p.throttle == 0
    # n is the first pass (counting the stop-and-copy) small enough to fit in the downtime
    assert M * lam ** (n - 1) / B <= QEMU_DEFAULT_DOWNTIME < M * lam ** (n - 2) / B
    assert p.duration == pytest.approx(M / B * (1 - lam**n) / (1 - lam), rel=1e-9)
    assert p.bytes_sent == pytest.approx(M * (1 - lam**n) / (1 - lam), rel=1e-9)
    assert p.downtime == pytest.approx(M * lam ** (n - 1) / B, rel=1e-9)
    assert p.downtime <= QEMU_DEFAULT_DOWNTIME


def test_lambda_half_worked_example() -> None:
    # 8 + 4 + 2 + 1 + 0.5 s of pre-copy, then 0.25 GiB fits in 300 ms: stop-and-copy.
    p = predict(Transfer(memory=8 * GiB, dirty_rate=512 * MiB, bandwidth=1 * GiB))
    assert p.rounds == 6
    assert p.duration == pytest.approx(15.75)
    assert p.downtime == pytest.approx(0.25)


def test_larger_downtime_limit_switches_over_earlier() -> None:
    # 8 + 4 + 2 s of pre-copy, then 1 GiB fits in the 1 s limit
    p = predict(Transfer(memory=M, dirty_rate=B / 2, bandwidth=B, max_downtime=1.0))
    assert (p.rounds, p.duration, p.downtime) == (4, pytest.approx(15.0), pytest.approx(1.0))


def test_tiny_vm_goes_straight_to_stop_and_copy() -> None:
    p = predict(Transfer(memory=200 * MiB, dirty_rate=10 * GiB, bandwidth=B))
    assert p.converges and p.rounds == 1 and p.mode is Mode.PRE_COPY
    assert p.downtime == pytest.approx(p.duration) == pytest.approx(200 / 1024)


def test_idle_guest_needs_one_pass_and_no_downtime() -> None:
    p = predict(Transfer(memory=M, dirty_rate=0, bandwidth=B))
    assert p.converges and p.rounds == 2 and p.duration == pytest.approx(8) and p.downtime == 0


# -- lambda >= 1 without rescue: KubeVirt aborts --------------------------------------------

@pytest.mark.parametrize(
    ("completion", "progress", "reason", "duration"),
    [
        (None, None, "NotConverging", 8.0),  # detected after the first non-shrinking round
        (None, 150.0, "NotConverging", 8.0),  # the progress timeout cannot end a moving one
        # KubeVirt compares whole seconds with ">": a 100 s limit acts at 101 s.
        (100.0, None, "CompletionTimeout", 101.0),
        (100.0, 150.0, "CompletionTimeout", 101.0),
        (100.0, 50.0, "CompletionTimeout", 101.0),  # data remaining drops between polls
    ],
)
def test_non_converging_precopy_fails_with_reason(
    completion: float | None, progress: float | None, reason: str, duration: float
) -> None:
    """virt-launcher live-migration-source.go: processInflightMigration resets the progress
    timer whenever data remaining drops between two polls; shouldTriggerTimeout aborts."""
    p = predict(Transfer(memory=M, dirty_rate=1.5 * B, bandwidth=B,
                         completion_timeout=completion, progress_timeout=progress))
    assert not p.converges and p.failure_reason == reason
    assert p.duration == pytest.approx(duration)
    assert p.downtime == 0 and p.mode is Mode.PRE_COPY and p.throttle == 0
    assert p.bytes_sent == pytest.approx(duration * B)


def test_progress_timeout_does_not_fire_while_the_dirty_set_shrinks() -> None:
    # lambda 0.95 takes ~156 s; data remaining keeps dropping, so a 10 s timeout is fine.
    p = predict(Transfer(memory=M, dirty_rate=0.95 * B, bandwidth=B, progress_timeout=10))
    assert p.converges and p.duration > 100


def test_a_stalled_transfer_trips_the_progress_timeout() -> None:
    """isMigrationProgressing: no drop of data remaining for more than progressTimeout whole
    seconds aborts, wherever the stall begins."""
    run = PreCopyRun(M, 1.5 * B, completion_timeout=1000, progress_timeout=150)
    run.advance(20, B)
    run.advance(1000, 0)  # the network stalls
    assert run.failure_reason == "ProgressTimeout" and run.elapsed == pytest.approx(171)


@pytest.mark.parametrize(("memory", "per_gib", "limit"), [
    (8 * GiB, 150, 1350),  # 8 GiB is 8.59 GB: 9 decimal GB
    (1 * GiB, 150, 300),  # 1.07 GB rounds up to 2
    (10**9, 150, 150),
    (512 * MiB, 150, 150),
    (8 * GiB, 0, 0),  # off
])
def test_completion_limit_is_kubevirts_decimal_gb_rounded_up(memory: float, per_gib: int,
                                                             limit: int) -> None:
    """virt-launcher manager.go getVMIMigrationDataSize: ScaledValue(resource.Giga)."""
    assert completion_limit(per_gib, memory) == limit


def test_slow_convergence_is_bounded_by_the_round_cap() -> None:
    p = predict(Transfer(memory=M, dirty_rate=0.99999 * B, bandwidth=B))
    assert not p.converges and p.failure_reason == "NotConverging" and p.rounds == MAX_ROUNDS


# -- auto-converge ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("lam", "throttle"),
    [
        (1.0, 0.2),  # 1.0 * 0.8 < 1 after the first step
        (2.0, 0.6),  # 1.6, 1.4, 1.2, 1.0 (no shrink either), then 0.8
        (5.0, 0.9),
        (50.0, 0.99),  # the cap: 50 * 0.01 = 0.5
    ],
)
def test_auto_converge_throttles_until_it_converges(lam: float, throttle: float) -> None:
    p = predict(Transfer(memory=M, dirty_rate=lam * B, bandwidth=B, auto_converge=True))
    assert p.converges and p.mode is Mode.AUTO_CONVERGE and p.failure_reason is None
    assert p.throttle == pytest.approx(throttle)
    assert 0 < p.downtime <= QEMU_DEFAULT_DOWNTIME


def test_auto_converge_cannot_tame_more_than_its_cap() -> None:
    slow = Transfer(memory=M, dirty_rate=200 * B, bandwidth=B, auto_converge=True)
    p = predict(slow)
    assert not p.converges and p.failure_reason == "NotConverging"
    assert p.throttle == AUTO_CONVERGE_MAX and p.mode is Mode.AUTO_CONVERGE
    timed = predict(Transfer(**{**slow.__dict__, "completion_timeout": 500.0}))
    assert timed.failure_reason == "CompletionTimeout" and timed.duration == pytest.approx(501)


def test_auto_converge_stays_off_when_precopy_converges() -> None:
    p = predict(Transfer(memory=M, dirty_rate=B / 2, bandwidth=B, auto_converge=True))
    assert p.mode is Mode.PRE_COPY and p.throttle == 0 and p.duration == pytest.approx(15.75)


# -- post-copy -------------------------------------------------------------------------------

def test_ideal_post_copy_switches_at_the_first_non_shrinking_round() -> None:
    """The bench's lower bound only: KubeVirt itself switches at its completion timeout."""
    p = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True,
                         ideal_post_copy=True))
    assert p.converges and p.mode is Mode.POST_COPY and p.failure_reason is None
    assert p.downtime == POST_COPY_SWITCH_DOWNTIME
    # one full pre-copy pass (8 s), then all of M is dirty again and is pulled (8 s)
    assert p.rounds == 1 and p.duration == pytest.approx(16)
    assert p.bytes_sent == pytest.approx(2 * M)


def test_post_copy_switches_only_after_the_completion_timeout() -> None:
    p = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True,
                         completion_timeout=30))
    assert p.converges and p.mode is Mode.POST_COPY and p.downtime == POST_COPY_SWITCH_DOWNTIME
    # at 31 s the dirty set is all of M (capped), pulled in 8 s
    assert p.duration == pytest.approx(39) and p.rounds == 4


def test_post_copy_needs_workload_disruption() -> None:
    """shouldAssistMigrationToComplete: allowPostCopy alone does not switch when
    allowWorkloadDisruption is false; the completion timeout aborts."""
    p = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True,
                         completion_timeout=30, workload_disruption=False))
    assert p.failure_reason == "CompletionTimeout" and p.duration == pytest.approx(31)


def test_workload_disruption_without_post_copy_pauses_the_guest() -> None:
    """live-migration-source.go: at the completion timeout the guest is suspended (mode
    Paused) and the limit doubles; everything still to send is downtime."""
    p = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, completion_timeout=30,
                         workload_disruption=True))
    assert p.converges and p.mode is Mode.PAUSED
    assert p.downtime == pytest.approx(8) and p.duration == pytest.approx(39)
    slow = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B / 100,
                            completion_timeout=30, workload_disruption=True))
    assert slow.failure_reason == "CompletionTimeout" and slow.duration == pytest.approx(61)


def test_post_copy_is_not_needed_when_precopy_converges() -> None:
    p = predict(Transfer(memory=M, dirty_rate=B / 2, bandwidth=B, post_copy=True))
    assert p.mode is Mode.PRE_COPY and p.downtime == pytest.approx(0.25)


def test_a_moving_transfer_reaches_the_post_copy_switch() -> None:
    # The progress timeout (150 s) never fires while data moves: post-copy starts at 301 s.
    p = predict(Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True,
                         completion_timeout=300, progress_timeout=150))
    assert p.converges and p.mode is Mode.POST_COPY and p.duration == pytest.approx(309)


def test_auto_converge_and_post_copy_together() -> None:
    # Auto-converge gets until the completion timeout, then post-copy takes over.
    both = Transfer(memory=M, dirty_rate=100 * B, bandwidth=B, auto_converge=True,
                    post_copy=True, completion_timeout=20)
    p = predict(both)
    assert p.converges and p.mode is Mode.POST_COPY and p.throttle == pytest.approx(0.3)
    tamed = predict(Transfer(**{**both.__dict__, "dirty_rate": 2 * B, "completion_timeout": 1e4}))
    assert tamed.converges and tamed.mode is Mode.AUTO_CONVERGE


# -- no bandwidth ----------------------------------------------------------------------------

def test_no_bandwidth_never_finishes_without_a_timeout() -> None:
    p = predict(Transfer(memory=M, dirty_rate=B, bandwidth=0))
    assert not p.converges and math.isinf(p.duration) and p.failure_reason == "NotConverging"
    p = predict(Transfer(memory=M, dirty_rate=B, bandwidth=0, progress_timeout=150))
    assert p.failure_reason == "ProgressTimeout" and p.duration == 151 and p.bytes_sent == 0


def test_stepper_time_without_bandwidth_counts_toward_timeouts() -> None:
    run = PreCopyRun(M, B / 2, completion_timeout=20)
    run.advance(15, 0)
    assert (run.elapsed, run.bytes_sent, run.done) == (15, 0, False)
    run.advance(10, B)  # 6 s of sending, then the completion timeout (acting at 21 s)
    assert run.done and run.failure_reason == "CompletionTimeout" and run.elapsed == 21
    assert run.bytes_sent == pytest.approx(6 * B)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        PreCopyRun(-1, 0)
    with pytest.raises(ValueError):
        PreCopyRun(M, 0).advance(-1, B)
    with pytest.raises(ValueError):
        PreCopyRun(M, 0).set_dirty_rate(math.nan)


# -- the stepper -----------------------------------------------------------------------------

AGREEMENT_CASES = [
    Transfer(memory=M, dirty_rate=B / 2, bandwidth=B),
    Transfer(memory=M, dirty_rate=0.95 * B, bandwidth=B),
    Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, auto_converge=True),
    Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True, ideal_post_copy=True),
    Transfer(memory=M, dirty_rate=2 * B, bandwidth=B, post_copy=True, completion_timeout=30),
    Transfer(memory=M, dirty_rate=1.5 * B, bandwidth=B, progress_timeout=150,
             completion_timeout=400),
    Transfer(memory=M, dirty_rate=1.5 * B, bandwidth=B, completion_timeout=100),
    Transfer(memory=200 * MiB, dirty_rate=B, bandwidth=B),
]


@pytest.mark.parametrize("dt", [0.01, 0.5, 5.0])
@pytest.mark.parametrize("t", AGREEMENT_CASES, ids=lambda t: f"lam{t.dirty_rate / t.bandwidth:g}")
def test_stepper_agrees_with_predict(t: Transfer, dt: float) -> None:
    p = predict(t)
    run = run_stepper(t, dt)
    assert run.done
    got = run.prediction()
    assert (got.converges, got.mode, got.failure_reason) == (
        p.converges, p.mode, p.failure_reason)
    assert got.rounds == p.rounds
    assert got.duration == pytest.approx(p.duration, rel=0.01)
    assert got.downtime == pytest.approx(p.downtime, rel=0.01)
    assert got.bytes_sent == pytest.approx(p.bytes_sent, rel=0.01)
    assert got.throttle == pytest.approx(p.throttle)


def test_stepper_with_bandwidth_halved_midway_takes_longer() -> None:
    t = Transfer(memory=M, dirty_rate=B / 4, bandwidth=B)
    p = predict(t)
    run = PreCopyRun(t.memory, t.dirty_rate)
    while not run.done:
        run.advance(0.1, B if run.elapsed < p.duration / 2 else B / 2)
    assert not run.failed
    assert run.elapsed > p.duration * 1.05
    assert run.downtime <= QEMU_DEFAULT_DOWNTIME


def test_stepper_dirty_rate_increase_slows_it_down() -> None:
    run = PreCopyRun(M, B / 4)
    run.advance(5, B)
    before = run.eta(B)
    run.set_dirty_rate(B / 2)
    assert run.eta(B) > before


def test_eta_tracks_the_remaining_time() -> None:
    t = Transfer(memory=M, dirty_rate=B / 2, bandwidth=B)
    run = PreCopyRun(t.memory, t.dirty_rate)
    assert run.eta(B) == pytest.approx(15.75)
    run.advance(10, B)
    assert run.eta(B) == pytest.approx(5.75)
    assert run.eta(B / 2) > 5.75
    assert math.isinf(run.eta(0))
    assert run.elapsed == 10 and not run.done  # eta() does not move the run
    run.advance(100, B)
    assert run.done and run.eta(B) == 0 and run.elapsed == pytest.approx(15.75)


def test_stepper_state_mid_round() -> None:
    run = PreCopyRun(M, B / 2)
    run.advance(3, B)
    assert run.rounds == 1 and run.mode is Mode.PRE_COPY
    assert run.remaining == pytest.approx(5 * GiB)
    assert run.pending == pytest.approx(6.5 * GiB)  # 5 unsent + 1.5 dirtied meanwhile
    assert run.bytes_sent == pytest.approx(3 * GiB)


def test_prediction_is_a_frozen_dataclass() -> None:
    p = predict(Transfer(memory=M, dirty_rate=0, bandwidth=B))
    assert isinstance(p, Prediction)
    with pytest.raises(AttributeError):
        p.duration = 0  # type: ignore[misc]


# -- completionTimeoutPerGiB 0: no completion timeout at all ---------------------------------
# virt-launcher live-migration-source.go shouldTriggerTimeout returns false when
# acceptableCompletionTime (completionTimeoutPerGiB x data size) is 0: no post-copy switch, no
# pause (shouldAssistMigrationToComplete) and no abort for it. Only the progress timeout
# (isMigrationProgressing: data remaining not dropping) can still end a pre-copy.

HOT = 2 * B  # lambda 2: never converges by itself


@pytest.mark.parametrize(("completion", "rescue", "converges", "mode", "reason", "duration"), [
    # KubeVirt never switches to post-copy without a completion timeout: it never ends.
    (0, {"post_copy": True}, False, Mode.PRE_COPY, "NotConverging", 8.0),
    (None, {"post_copy": True}, False, Mode.PRE_COPY, "NotConverging", 8.0),
    # ... nor pauses the guest (allowWorkloadDisruption without allowPostCopy) ...
    (0, {"workload_disruption": True}, False, Mode.PRE_COPY, "NotConverging", 8.0),
    # ... nor aborts it: not a CompletionTimeout.
    (0, {}, False, Mode.PRE_COPY, "NotConverging", 8.0),
    # Auto-converge needs no timeout: it still tames lambda 2 (throttle 60%).
    (0, {"auto_converge": True, "post_copy": True}, True, Mode.AUTO_CONVERGE, None, None),
    # With a timeout the same transfer switches at it (30 s, acting at 31 s) and completes.
    (30, {"post_copy": True}, True, Mode.POST_COPY, None, 39.0),
])
def test_no_completion_timeout_never_switches_pauses_or_aborts(completion, rescue, converges,
                                                               mode, reason, duration) -> None:
    p = predict(Transfer(memory=M, dirty_rate=HOT, bandwidth=B, completion_timeout=completion,
                         progress_timeout=150, **rescue))
    assert (p.converges, p.mode, p.failure_reason) == (converges, mode, reason)
    if duration is not None:
        assert p.duration == pytest.approx(duration)


def test_no_completion_timeout_leaves_a_stalled_transfer_to_the_progress_timeout() -> None:
    """isMigrationProgressing still aborts a transfer whose data remaining stops dropping."""
    p = predict(Transfer(memory=M, dirty_rate=HOT, bandwidth=0, post_copy=True,
                         completion_timeout=0, progress_timeout=150))
    assert (p.failure_reason, p.duration) == ("ProgressTimeout", 151)


@pytest.mark.parametrize("rescue", [{"post_copy": True}, {"workload_disruption": True}, {}])
def test_without_a_completion_timeout_a_non_converging_transfer_runs_on(rescue) -> None:
    """What KubeVirt does with it: nothing. Pre-copy rounds go on for as long as the transfer
    moves (data remaining drops within each round, so the progress timeout never fires) until
    someone deletes the migration."""
    run = PreCopyRun(M, HOT, completion_timeout=0, progress_timeout=150, **rescue)
    for _ in range(2000):  # 2000 s, in steps as the simulator takes them
        run.advance(1.0, B)
    assert not run.done and not run.failed
    assert run.mode is Mode.PRE_COPY and run.rounds >= 200
    assert run.elapsed - run.last_progress < 1.0  # still making "progress"
    assert math.isinf(run.eta(B))


def test_kubevirt_cr_completion_timeout_0_is_predicted_as_never() -> None:
    """The operator's prediction for a VM under the KubeVirt CR's completionTimeoutPerGiB 0
    with allowPostCopy: KubeVirt will never switch it, so it is predicted not to converge."""
    vmi = VMIInfo(namespace="ns", name="hot", node="n1", memory=M, dirty_rate=HOT)
    for per_gib, mode, converges in ((0, Mode.PRE_COPY, False), (5, Mode.POST_COPY, True)):
        rules = rules_from(None, kubevirt=KubeVirtMigrationConfig(
            allow_post_copy=True, completion_timeout_per_gib=per_gib))
        p = Estimator(node_bandwidth=B).transfer(vmi, rules, None, 1)
        assert (p.converges, p.mode) == (converges, mode), per_gib
