"""The claims collector: one loop for the whole cluster, in the replica that acts. It records on
each destination claim how its storage move ended (domain.storage.outcome_marks), and deletes
the destination claims whose owner -- the NodeDrain or MigrationPolicy of the name and UID the
claim records -- no longer exists, once domain.storage.verdict lets them go (nothing refers to
them, and their data is provably on their source). An owner that exists decides about its own
claims; so a NodeDrain whose deletion stopped waiting for its reverts, or a MigrationPolicy
deleted meanwhile, leaves nothing behind.

It runs on every change of a claim, VM, VMI or policy (at most once a MIN_INTERVAL_SECONDS),
and every RESYNC_SECONDS anyway (NodeDrains going away are seen then)."""

from __future__ import annotations

import logging
import threading
import time

from virtshift.domain import storage as dstorage
from virtshift.handlers import runtime
from virtshift.k8s import storage as kstorage
from virtshift.k8s.rest import JSON, TRANSPORT_ERRORS, ApiError

log = logging.getLogger(__name__)
RESYNC_SECONDS = 10.0  # wall seconds between passes without any event
MIN_INTERVAL_SECONDS = 1.0  # wall seconds between passes woken by events
WATCHED = ("pvc", "vm", "vmi", "policy")
DELETED_REASON = "DestinationDeleted"


class Collector:
    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.cluster = rt.cluster
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reported: set[str] = set()  # UIDs of claims reported kept (once each)
        self._thread = threading.Thread(target=self._run, name="claims-collector",
                                        daemon=True)

    def start(self) -> Collector:
        self.cluster.listeners.append(self._on_change)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._on_change in self.cluster.listeners:
            self.cluster.listeners.remove(self._on_change)

    def _on_change(self, kind: str, _obj: JSON) -> None:
        if kind in WATCHED:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            started = time.monotonic()
            try:
                if self.cluster.synced():
                    self.collect()
            except (ApiError, *TRANSPORT_ERRORS) as exc:
                log.warning("claims collector: %s; retrying", exc)
            except Exception:
                log.exception("claims collector failed; retrying")
            self._stop.wait(max(0.0, MIN_INTERVAL_SECONDS - (time.monotonic() - started)))
            self._wake.wait(RESYNC_SECONDS)

    def owners(self) -> dict[str, str]:
        """moved_by -> UID of every NodeDrain and MigrationPolicy that exists."""
        out = {dstorage.moved_by("drain", d["metadata"]["name"]): d["metadata"].get("uid", "")
               for d in self.cluster.drains.values()}
        out |= {dstorage.moved_by("policy", p["metadata"]["name"]): p["metadata"].get("uid", "")
                for p in self.cluster.policies.values()}
        return out

    def decide(self) -> dstorage.Collection:
        if not any(dstorage.MOVED_BY_LABEL in (c["metadata"].get("annotations") or {})
                   for c in self.cluster.pvcs.values()):
            return dstorage.Collection()  # no claim of ours: nothing to look at
        seen = self.cluster.storage_views()
        return dstorage.collect(list(seen["storage"].values()), seen["claims"], self.owners())

    def collect(self) -> dstorage.Collection:
        """One pass: decided without the drains' lock, and when there is something to write,
        decided again and written under it (a drain's pass creates a claim and points its VM
        at it under that lock: the collector never sees one half done)."""
        if not self._worth_writing(self.decide()):
            return dstorage.Collection()
        with self.cluster.admission:
            found = self.decide()
            self._write(found)
        return found

    def _worth_writing(self, found: dstorage.Collection) -> bool:
        return bool(found.marks or found.delete) or any(
            self._uid(k) not in self._reported for k, _v in found.kept)

    def _uid(self, key: str) -> str:
        return ((self.cluster.pvcs.get(key) or {}).get("metadata") or {}).get("uid", "")

    def _write(self, found: dstorage.Collection) -> None:
        stamp = self.cluster.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        for key, annotation in found.marks:
            kstorage.mark(self.cluster, key, annotation, stamp)
            log.info("claim %s: %s", key, annotation)
        failed: list[str] = []
        objs = {k: obj for k, _v in found.delete if (obj := self.cluster.pvcs.get(k))}
        deleted, _held = kstorage.delete_claims(self.cluster, list(objs), failed)
        why = dict(found.delete)
        for key in deleted:
            owner = (objs[key]["metadata"].get("annotations") or {}).get(
                dstorage.MOVED_BY_LABEL)
            log.info("deleted claim %s (%s): %s", key, why[key].reason, why[key].message)
            self._event(objs[key], "Normal", DELETED_REASON,
                        f"{why[key].reason}: {why[key].message}; its owner {owner} is gone")
        for line in failed:
            log.warning("claims collector: %s", line)
        for key, v in found.kept:
            obj = self.cluster.pvcs.get(key)
            if obj is None or self._uid(key) in self._reported:
                continue
            self._reported.add(self._uid(key))
            log.warning("keeping claim %s: %s", key, v.message)
            self._event(obj, "Warning", v.reason, v.message)

    def _event(self, pvc: JSON, kind: str, reason: str, message: str) -> None:
        self.rt.actions.event({**pvc, "apiVersion": "v1", "kind": "PersistentVolumeClaim"},
                              kind, reason, message)


_collector: Collector | None = None


def start(rt: runtime.Runtime) -> None:
    """Idempotent: kopf retries a failed start-up handler."""
    global _collector
    if _collector is None:
        _collector = Collector(rt).start()


def stop() -> None:
    global _collector
    if _collector is not None:
        _collector.stop()
        _collector = None
