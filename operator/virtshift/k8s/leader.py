"""Leader election on a ``coordination.k8s.io/v1`` Lease: one replica acts, the others wait.

The rules are client-go's ``tools/leaderelection`` (``tryAcquireOrRenew``), which
controller-runtime and kube-controller-manager use:

- a candidate takes the Lease when it has no holder, or when the holder's record has not
  changed for ``lease_duration`` seconds *of the candidate's own clock*, counted from when the
  candidate first saw that record (so clock skew between machines does not matter);
- every write is a PUT carrying the ``resourceVersion`` read, so of two candidates only one
  wins (the other gets 409 and keeps waiting);
- the leader renews every ``retry_period``; when it has not renewed for ``renew_deadline``
  (shorter than ``lease_duration``) it must stop acting at once, before anyone else may take
  over: ``keep_renewing`` calls ``on_lost``, which for ``virtshift run`` ends the process;
- a leader that stops cleanly releases the Lease (no holder, duration 1 s), so a standby
  takes over without waiting for it to expire.

With the defaults (15 s / 10 s / 2 s) a standby takes over at most ~17 s after the leader
dies.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, ApiError, KubeClient, RetryPolicy

log = logging.getLogger(__name__)

LEASES = rest.Resource("coordination.k8s.io", "v1", "leases")
# One quick retry at most: a renew that takes longer than a retry period is late anyway.
_RENEW_RETRY = RetryPolicy(attempts=2, base=0.2, cap=0.5, budget=1.0)


def _micro_time(now: dt.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Observed:
    record: tuple[str, str, str]  # holder, renewTime, resourceVersion
    at: float  # our monotonic clock when we first saw this record


class LeaderElector:
    def __init__(self, kube: KubeClient, namespace: str, name: str, identity: str,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self._observed: _Observed | None = None
        self._last_renew = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one step ---------------------------------------------------------------------------

    def _spec(self, acquire_time: str, transitions: int) -> JSON:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": acquire_time,
                "renewTime": _micro_time(dt.datetime.now(dt.UTC)),
                "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards."""
        path = LEASES.path(self.namespace, self.name)
        now = _micro_time(dt.datetime.now(dt.UTC))
        try:
            lease = self.kube.request("GET", path, retry=_RENEW_RETRY)
        except ApiError as exc:
            if not exc.not_found:
                log.warning("leader election: cannot read Lease %s/%s: %s", self.namespace,
                            self.name, exc)
                return False
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, 0)}
            try:
                self.kube.request("POST", LEASES.path(self.namespace), body, retry=_RENEW_RETRY)
            except ApiError as exc2:
                if not exc2.conflict:
                    log.warning("leader election: cannot create Lease: %s", exc2)
                return False
            self._last_renew = self.clock()
            return True
        except Exception as exc:  # connection refused, timeouts: not leader this time
            log.warning("leader election: %s", exc)
            return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime") or "", lease["metadata"]["resourceVersion"])
        if self._observed is None or self._observed.record != record:
            self._observed = _Observed(record, self.clock())
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and \
                self.clock() < self._observed.at + duration:
            return False  # someone else holds it, and has renewed recently enough
        mine = holder == self.identity
        lease["spec"] = self._spec(spec.get("acquireTime") if mine and spec.get("acquireTime")
                                   else now,
                                   int(spec.get("leaseTransitions") or 0) + (0 if mine else 1))
        try:
            self.kube.request("PUT", path, lease, retry=_RENEW_RETRY)
        except ApiError as exc:
            if not exc.conflict:
                log.warning("leader election: cannot update Lease: %s", exc)
            return False
        except Exception as exc:
            log.warning("leader election: %s", exc)
            return False
        if not mine:
            log.info("leader election: %s took Lease %s/%s from %r", self.identity,
                     self.namespace, self.name, holder or None)
        self._last_renew = self.clock()
        return True

    # -- loops ------------------------------------------------------------------------------

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until we lead (True), or ``stop`` is set (False)."""
        log.info("leader election: %s waiting for Lease %s/%s", self.identity, self.namespace,
                 self.name)
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("leader election: %s is the leader", self.identity)
                return True
            stop.wait(self.retry_period)
        return False

    def keep_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew in a background thread; ``on_lost`` once ``renew_deadline`` passes without a
        renewal (the caller must then stop acting immediately)."""

        def loop() -> None:
            while not self._stop.wait(self.retry_period):
                if self.try_acquire_or_renew():
                    continue
                if self.clock() - self._last_renew >= self.renew_deadline:
                    log.error("leader election: %s lost Lease %s/%s (not renewed for %.0fs)",
                              self.identity, self.namespace, self.name, self.renew_deadline)
                    on_lost()
                    return

        self._thread = threading.Thread(target=loop, name="lease-renewer", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and give the Lease up, so a standby need not wait for it to expire."""
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        path = LEASES.path(self.namespace, self.name)
        try:
            lease = self.kube.request("GET", path, retry=_RENEW_RETRY)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": _micro_time(dt.datetime.now(dt.UTC))}
            self.kube.request("PUT", path, lease, retry=_RENEW_RETRY)
            log.info("leader election: %s released Lease %s/%s", self.identity,
                     self.namespace, self.name)
        except Exception as exc:  # it expires by itself
            log.warning("leader election: could not release the Lease: %s", exc)
