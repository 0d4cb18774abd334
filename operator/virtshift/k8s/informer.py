"""List-then-watch caches of API objects, each kept current by a background thread."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from virtshift.k8s.fields import slim
from virtshift.k8s.rest import JSON, ApiError, KubeClient, Resource, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")
# Between a failed list or watch and the next try: 0.5 s doubling to 30 s (with jitter), or
# what a Retry-After asked; back to 0.5 s once a watch delivers again.
RELIST = RetryPolicy(base=0.5, cap=30.0)


def key_of(obj: JSON) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else meta["name"]


class Informer:
    """A dict of the objects of one resource, by "namespace/name" (or "name")."""

    def __init__(self, kube: KubeClient, res: Resource, label_selector: str | None = None,
                 on_event: Callable[[str, JSON], None] | None = None,
                 transform: Callable[[JSON], JSON] = slim) -> None:
        """``transform``: what the cache keeps of each object (k8s.fields)."""
        self.kube = kube
        self.transform = transform
        self.res = res
        self.label_selector = label_selector
        self.on_event = on_event
        self._objects: dict[str, JSON] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._started = False
        self._stop = threading.Event()
        self._failures = 0
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run, name=f"informer-{res.plural}",
                                        daemon=True)

    def start(self) -> Informer:
        if not self._thread.is_alive() and not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def synced(self) -> bool:
        """The first full list has been loaded (the cache holds every object)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float = 30) -> None:
        if not self._synced.wait(timeout):
            raise TimeoutError(f"{self.res.plural} cache not synced after {timeout}s")

    def get(self, key: str) -> JSON | None:
        with self._lock:
            return self._objects.get(key)

    def values(self) -> list[JSON]:
        with self._lock:
            return list(self._objects.values())

    def put(self, obj: JSON) -> None:
        """Record our own write at once, so the next read sees it before the watch does."""
        obj = self.transform(obj)
        with self._lock:
            current = self._objects.get(key_of(obj))
            if current is None or _rv(obj) >= _rv(current):
                self._objects[key_of(obj)] = obj

    def forget(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def _backoff(self, retry_after: float | None = None) -> None:
        """Wait before the next list or watch: longer after each failure in a row."""
        self._failures += 1
        delay = RELIST.backoff(min(self._failures, 16), self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._stop.wait(delay)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Trimmed page by page: a full list never sits in memory whole.
                items, rv = self.kube.list(self.res, label_selector=self.label_selector,
                                           transform=self.transform)
                with self._lock:
                    self._objects = {key_of(o): o for o in items}
                self._synced.set()
                while not self._stop.is_set():
                    for kind, obj in self.kube.watch(self.res, rv,
                                                     label_selector=self.label_selector):
                        self._failures = 0  # the watch delivers
                        if kind == "BOOKMARK":
                            rv = obj["metadata"]["resourceVersion"]
                            continue
                        if kind == "ERROR":
                            raise ApiError(obj.get("code", 500), str(obj))
                        rv = obj["metadata"]["resourceVersion"]
                        obj = self.transform(obj)
                        with self._lock:
                            if kind == "DELETED":
                                self._objects.pop(key_of(obj), None)
                            else:
                                current = self._objects.get(key_of(obj))
                                if current is None or _rv(obj) >= _rv(current):
                                    self._objects[key_of(obj)] = obj
                        if self.on_event:
                            self.on_event(kind, obj)
                        if self._stop.is_set():
                            return
            except ApiError as exc:
                if not exc.gone:  # 410: our resourceVersion is too old; relist at once
                    log.warning("watch of %s failed: %s", self.res.plural, exc)
                    self._backoff(exc.retry_after)
            except Exception as exc:  # connection dropped: relist
                if self._stop.is_set():
                    return
                log.debug("watch of %s restarting: %s", self.res.plural, exc)
                self._backoff()


def _rv(obj: JSON) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


class ByVersion(Generic[T]):
    """``fn`` of a cached object, computed once per object version (its resourceVersion): a
    pass over thousands of objects reads the figures it derived before instead of parsing
    every quantity again."""

    MAX_ENTRIES = 100_000  # past this (objects come and go), start over

    def __init__(self, fn: Callable[[JSON], T]) -> None:
        self.fn = fn
        self._memo: dict[str, tuple[str, T]] = {}

    def __call__(self, obj: JSON) -> T:
        rv = obj["metadata"].get("resourceVersion")
        if not rv:
            return self.fn(obj)
        key = key_of(obj)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == rv:
            return hit[1]
        value = self.fn(obj)
        if len(self._memo) >= self.MAX_ENTRIES:
            self._memo = {}
        self._memo[key] = (rv, value)
        return value
