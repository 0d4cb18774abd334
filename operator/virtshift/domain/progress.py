"""progressTimeout (MigrationPolicy): virtshift aborts a migration whose transfer has stopped
making progress.

KubeVirt cannot do this per policy: its MigrationPolicy (migrations.kubevirt.io/v1alpha1, every
version) has no progressTimeout, and its own progress timeout is cluster-wide (the KubeVirt
CR's ``spec.configuration.migrations.progressTimeout``, 150 s by default; virt-launcher
live-migration-source.go ``isMigrationProgressing``). So virtshift holds the policy's value
itself, the way KubeVirt holds its own:

* Progress is what KubeVirt calls progress: libvirt's "data remaining" of the migration job
  dropping from one sample to the next. virtshift reads it from KubeVirt's metric
  ``kubevirt_vmi_migration_data_remaining_bytes{namespace, name}`` (virt-handler samples it
  every 5 s while a VMI migrates: pkg/monitoring/metrics/virt-handler/migrationdomainstats).
  A new pre-copy round makes data remaining jump up; that is not progress, and the next drop
  within the round is. A sample of 0 is progress.
* The clock starts when the transfer does (the VMIM's Running phase) and restarts after a gap
  in the samples longer than ``MAX_SAMPLE_GAP`` (nothing is known about the time in between).
* A migration is aborted once it has gone ``progressTimeout`` or longer without progress:
  unfinished and not being deleted, in phase Running, with at least one sample of its own
  transfer, and only while the metrics can be read (``observable``). Never in post-copy
  (``MigrationInfo.in_post_copy``, the mode the VMI reports while it runs: KubeVirt never aborts
  post-copy either, the guest already runs on the target): such a one is let finish, and said
  so (``Verdict.spared``).
* Aborting is deleting the VMIM (KubeVirt's only abort: ``abortRequested`` on the VMI, the
  source aborts the job). KubeVirt then removes the VMIM, so the abort is recorded on the VMI
  (``AbortRecord``) and counts as a failed attempt: a NodeDrain retries it after its backoff,
  up to maxAttempts.

Pure: samples and time are inputs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from virtshift.domain.views import AbortRecord, MigrationInfo

PROGRESS_TIMEOUT = "ProgressTimeout"
# The Event of a migration virtshift would have aborted but lets finish: it is in post-copy.
POST_COPY_NOT_ABORTED = "PostCopyNotAborted"
METRIC = "kubevirt_vmi_migration_data_remaining_bytes"
# Samples further apart than this (seconds) say nothing about the time between them.
MAX_SAMPLE_GAP = 60.0


@dataclass(frozen=True)
class Progress:
    """What the samples of one VMI's data remaining have shown so far."""

    sampled: dt.datetime  # the latest sample's time
    remaining: float  # its value, bytes
    progressed: dt.datetime  # when it last dropped (or the samples (re)started)


def observe(previous: Progress | None, at: dt.datetime, remaining: float,
            max_gap: float = MAX_SAMPLE_GAP) -> Progress:
    """Fold one sample in. The same or an older sample again changes nothing."""
    if previous is not None and at <= previous.sampled:
        return previous
    if previous is None or (at - previous.sampled).total_seconds() > max_gap:
        return Progress(sampled=at, remaining=remaining, progressed=at)
    dropped = remaining < previous.remaining or remaining <= 0
    return Progress(sampled=at, remaining=remaining,
                    progressed=at if dropped else previous.progressed)


@dataclass(frozen=True)
class Stalled:
    migration: MigrationInfo
    seconds: float  # without progress
    message: str


@dataclass(frozen=True)
class Verdict:
    abort: list[Stalled] = field(default_factory=list)
    # When a migration watched now would reach the limit if nothing changes (None: none).
    recheck_at: dt.datetime | None = None
    # Past the limit but in post-copy: not aborted, let finish.
    spared: list[Stalled] = field(default_factory=list)


def watched(m: MigrationInfo) -> bool:
    """A transfer in flight, past handoff, and not being deleted."""
    return m.unfinished and m.phase == "Running" and m.running_at is not None


def check(migrations: Sequence[MigrationInfo], progress: Mapping[str, Progress],
          now: dt.datetime, timeout: float | None, observable: bool = True) -> Verdict:
    """The migrations to abort for ``timeout`` (seconds; None: the policy sets none)."""
    if timeout is None or not observable:
        return Verdict()
    abort: list[Stalled] = []
    spared: list[Stalled] = []
    deadlines: list[dt.datetime] = []
    for m in migrations:
        p = progress.get(m.vmi_key)
        if not watched(m) or p is None or m.running_at is None or p.sampled < m.running_at:
            continue
        since = max(m.running_at, p.progressed)
        seconds = (now - since).total_seconds()
        if m.in_post_copy:
            if seconds >= timeout:
                spared.append(Stalled(m, seconds, (
                    f"{m.namespace}/{m.name} is in post-copy: not aborted for progressTimeout "
                    f"{timeout:g}s (KubeVirt never aborts post-copy: the guest already runs on "
                    "the target); letting it finish")))
        elif seconds >= timeout:
            abort.append(Stalled(m, seconds, (
                f"no progress for {seconds:.0f}s (progressTimeout {timeout:g}s): {METRIC} "
                f"of {m.vmi_key} last dropped at {since.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
                f", {p.remaining:.0f} bytes remaining")))
        else:
            deadlines.append(since + dt.timedelta(seconds=timeout))
    return Verdict(abort, min(deadlines) if deadlines else None, spared)


def record(stall: Stalled, now: dt.datetime, drain_uid: str | None = None) -> AbortRecord:
    """What is kept on the VMI about this abort."""
    m = stall.migration
    return AbortRecord(migration=m.name, namespace=m.namespace, vmi=m.vmi,
                       reason=PROGRESS_TIMEOUT, message=f"aborted by virtshift: {stall.message}",
                       at=now, policy=m.policy, drain=m.drain, drain_uid=drain_uid,
                       attempt=m.attempt)
