"""Kubernetes Events, aggregated as client-go's event recorder aggregates them.

The same event (involved object, type, reason, message) seen again within ``window`` seconds of
its last occurrence does not make a new Event: the existing one gets ``count`` + 1 and a new
``lastTimestamp`` (client-go's EventCorrelator: ``eventLogger.eventObserve`` and the recorder's
PATCH of count and lastTimestamp). Writes of one repeated event are also spaced at least
``min_interval`` apart: repeats in between are counted and go out with the next write, so a
step that fails on every reconcile costs one small PATCH every ``min_interval`` rather than one
Event per pass (a count held back is written by the next ``record`` call of any event once its
interval has passed).

With ``background``, the writes go out from a thread of their own, in order, so a reconcile
never waits for its Events (the next decision is not held up by a report of the last one).

Event names are ``<object name>.<nanoseconds, hex>`` as client-go makes them, fixed before the
first try, so a create the client repeats after a broken connection finds its own Event (409)
instead of making a second one.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, ApiError, KubeClient

log = logging.getLogger(__name__)
MAX_MESSAGE = 1024
CACHE_SIZE = 4096  # client-go's maxLruCacheEntries


@dataclass
class _Seen:
    obj: JSON
    kind: str
    reason: str
    message: str
    name: str
    namespace: str
    count: int  # occurrences so far
    written_count: int  # the count the stored Event shows
    first: float  # wall-clock seconds
    last: float
    written_at: float  # monotonic seconds of the last write


def _stamp(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventRecorder:
    def __init__(self, kube: KubeClient, component: str = "virtshift", window: float = 600.0,
                 min_interval: float = 10.0, wall: Callable[[], float] = time.time,
                 background: bool = False) -> None:
        self.kube = kube
        self.component = component
        self.instance = component  # reportingInstance: which replica wrote it
        self.window = window
        self.min_interval = min_interval
        self._wall = wall
        self._seen: OrderedDict[tuple[str, str, str, str], _Seen] = OrderedDict()
        self._held: set[tuple[str, str, str, str]] = set()  # counts not written yet
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[_Seen, int, float, float]] | None = None
        if background:
            self._queue = queue.Queue()
            threading.Thread(target=self._drain_queue, name="event-writer", daemon=True).start()

    def _drain_queue(self) -> None:
        assert self._queue is not None
        while True:
            self._write(*self._queue.get())
            self._queue.task_done()

    def flush(self) -> None:
        """Wait until every Event recorded so far has been written (or given up on)."""
        if self._queue is not None:
            self._queue.join()

    def record(self, obj: JSON, kind: str, reason: str, message: str) -> None:
        """Best effort: an Event that cannot be written is logged and dropped."""
        meta = obj["metadata"]
        message = message[:MAX_MESSAGE]
        key = (meta.get("uid") or meta["name"], kind, reason, message)
        now, mono = self._wall(), time.monotonic()
        with self._lock:
            due = [self._seen[k] for k in self._held
                   if k != key and k in self._seen
                   and mono - self._seen[k].written_at >= self.min_interval]
            for other in due:
                other.written_at = mono
            self._held.difference_update(self._key(o) for o in due)
            seen = self._seen.get(key)
            if seen is not None and now - seen.last > self.window:
                seen = None  # long quiet: a new Event
            if seen is not None:
                seen.count += 1
                seen.last = now
                self._seen.move_to_end(key)
                if mono - seen.written_at < self.min_interval:
                    self._held.add(key)  # counted; goes out with a later write
                    seen = None
                else:
                    seen.written_at = mono
                    self._held.discard(key)
            else:
                seen = _Seen(obj=obj, kind=kind, reason=reason, message=message,
                             name=f"{meta['name']}.{time.time_ns():x}",
                             namespace=meta.get("namespace") or "default", count=1,
                             written_count=0, first=now, last=now, written_at=mono)
                self._seen[key] = seen
                self._held.discard(key)
                while len(self._seen) > CACHE_SIZE:
                    self._held.discard(self._key(self._seen.popitem(last=False)[1]))
            writes = [*due, *([seen] if seen is not None else [])]
            snapshots = [(w, w.count, w.first, w.last) for w in writes]
        for w, count, first, last in snapshots:
            if self._queue is not None:
                self._queue.put((w, count, first, last))
            else:
                self._write(w, count, first, last)

    @staticmethod
    def _key(seen: _Seen) -> tuple[str, str, str, str]:
        meta = seen.obj["metadata"]
        return (meta.get("uid") or meta["name"], seen.kind, seen.reason, seen.message)

    def _write(self, seen: _Seen, count: int, first: float, last: float) -> None:
        try:
            if seen.written_count and self._bump(seen, count, last):
                return
            self._create(seen, count, first, last)
        except Exception as exc:  # best effort: an API error, or the connection after retries
            log.debug("event %s not recorded: %s", seen.reason, exc)

    def _bump(self, seen: _Seen, count: int, last: float) -> bool:
        """Patch count and lastTimestamp; False when the Event is gone (its TTL ran out)."""
        try:
            self.kube.patch(rest.EVENTS, seen.name, {
                "count": count, "lastTimestamp": _stamp(last)}, seen.namespace)
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        seen.written_count = count
        return True

    def _create(self, seen: _Seen, count: int, first: float, last: float) -> None:
        obj, meta = seen.obj, seen.obj["metadata"]
        involved = {"apiVersion": obj.get("apiVersion", "virtshift.io/v1alpha1"),
                    "kind": obj.get("kind", "NodeDrain"), "name": meta["name"]}
        if meta.get("uid"):
            involved["uid"] = meta["uid"]
        if meta.get("namespace"):
            involved["namespace"] = meta["namespace"]
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": seen.name, "namespace": seen.namespace},
            "involvedObject": involved, "reason": seen.reason, "message": seen.message,
            "type": seen.kind,
            "source": {"component": self.component}, "firstTimestamp": _stamp(first),
            "lastTimestamp": _stamp(last), "count": count,
            "reportingComponent": self.component, "reportingInstance": self.instance,
        }
        try:
            self.kube.create(rest.EVENTS, body, namespace=seen.namespace)
        except ApiError as exc:
            if not exc.conflict:
                raise
            # Our own earlier try went through before the connection broke and the client
            # repeated the create: it is ours; make it show the count.
            self.kube.patch(rest.EVENTS, seen.name, {
                "count": count, "lastTimestamp": _stamp(last)}, seen.namespace)
        seen.written_count = count
