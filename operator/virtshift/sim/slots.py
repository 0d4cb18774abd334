"""When virt-controller starts a queued migration (pkg/virt-controller/watch/migration/
migration.go, ``handleTargetPodCreation``).

A Pending VMIM that meets a full limit (``parallelMigrationsPerCluster``,
``parallelOutboundMigrationsPerNode``) is put back on the work queue *after a delay*
(``getRequeueDelayForPriority``: 1 s for system-critical, 3 s for user-triggered, 5 s
otherwise; 5 s for every VMIM without the priority queue). When a migration ends,
``reEnqueueHighestPriorityPendingMigrations`` (v1.7+) puts back at once as many Pending VMIMs
as ``parallelMigrationsPerCluster``, the highest priority first and, among equals, in the
informer's order (a Go map's: any); the first of them that fits takes the slot. A VMIM left
out waits for its own next check, or an event of its own (the VMIM or its VMI updated,
``updateMigration``, ``updateVMI``). A new VMIM is checked as soon as it is added.

``Slots`` remembers when slots freed, so that a tick that comes late (the simulator's own
lag, which a fast clock multiplies) still admits each migration at the check KubeVirt would
have made.
"""

from __future__ import annotations

import math
from collections import defaultdict

# getRequeueDelayForPriority (v1.7+, with the priority queue), by queue priority.
REQUEUE_BY_PRIORITY = ((100, 1.0), (50, 3.0))
REQUEUE_DEFAULT = 5.0  # the lowest priority, and every VMIM without the priority queue


def requeue_delay(priority: int, priority_queue: bool) -> float:
    if priority_queue:
        for floor, seconds in REQUEUE_BY_PRIORITY:
            if priority >= floor:
                return seconds
    return REQUEUE_DEFAULT


def first_check(due: float, free_since: float, delay: float) -> float:
    """The first check at or after ``free_since`` of a VMIM checked at ``due``, ``due +
    delay``, ``due + 2 delay``..."""
    if free_since <= due:
        return due
    return due + math.ceil((free_since - due) / delay - 1e-9) * delay


class Slots:
    """When each free slot freed: per source node, and in the cluster. A slot that never
    held a migration has been free since the start (0)."""

    def __init__(self) -> None:
        self.node: dict[str, list[float]] = defaultdict(list)
        self.cluster: list[float] = []
        self.events: list[float] = []  # migrations ended since the last admission

    def freed(self, node: str, at: float) -> None:
        self.node[node].append(at)
        self.cluster.append(at)
        self.events.append(at)

    def ended(self) -> list[float]:
        """When migrations ended since the last call, in order (each re-enqueues)."""
        out, self.events = sorted(self.events), []
        return out

    def trim(self, free_in_cluster: int, free_on: dict[str, int]) -> None:
        """Keep no more entries than slots are free (the latest: a slot taken since by a
        migration admitted without waiting has no entry to give back)."""
        self.cluster = sorted(self.cluster)[-free_in_cluster:] if free_in_cluster > 0 else []
        for node in list(self.node):
            free = free_on.get(node, 0)
            self.node[node] = sorted(self.node[node])[-free:] if free > 0 else []
            if not self.node[node]:
                del self.node[node]

    @staticmethod
    def _since(entries: list[float], free: int) -> float:
        return 0.0 if free > len(entries) else min(entries)

    def free_since(self, node: str, free_in_cluster: int, free_on_node: int) -> float:
        """Since when a slot on ``node`` (and in the cluster) has been free."""
        return max(self._since(self.node.get(node, []), free_on_node),
                   self._since(self.cluster, free_in_cluster))

    def take(self, node: str, free_in_cluster: int, free_on_node: int) -> None:
        entries = self.node.get(node, [])
        if free_on_node <= len(entries) and entries:
            entries.remove(min(entries))
        if free_in_cluster <= len(self.cluster) and self.cluster:
            self.cluster.remove(min(self.cluster))
