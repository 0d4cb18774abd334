"""Predicted migration times and drain makespans, from the pre-copy model.

The convergence settings are the ones KubeVirt will use (``Rules``: the policy's
allowAutoConverge, allowPostCopy and completionTimeoutPerGiB, else the KubeVirt CR's, with
allowWorkloadDisruption resolved as KubeVirt resolves it).

A VMI whose dirty rate is unknown (``VMIInfo.dirty_rate`` None) is predicted as dirtying
nothing: a lower bound on its time, never a verdict on its downtime (``downtime.choose`` does
not take it as one; the NodeDrain's PredictionsAvailable condition says so)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from virtshift.api.units import GiB
from virtshift.domain.physics import (
    Prediction,
    Transfer,
    completion_limit,
    predict,
)
from virtshift.domain.rules import Rules
from virtshift.domain.views import VMIInfo


@dataclass(frozen=True)
class Estimator:
    """What the operator assumes where the cluster does not say.

    ``target_startup``: seconds from creating a VMIM to the memory transfer starting (target
    pod scheduling and start-up); ``node_bandwidth``: a node's migration bandwidth (bytes/s)
    when neither the node's ``virtshift.io/migration-bandwidth`` annotation nor the policy's
    ``nodeBandwidth`` names one.
    """

    target_startup: float = 10.0
    node_bandwidth: float = 10 * GiB

    def bandwidth(self, rules: Rules, node_bandwidth: float | None, concurrency: int) -> float:
        nic = node_bandwidth or rules.node_bandwidth or self.node_bandwidth
        share = nic / max(concurrency, 1)
        if rules.bandwidth_per_migration:
            share = min(share, rules.bandwidth_per_migration)
        return share

    def transfer(self, vmi: VMIInfo, rules: Rules, node_bandwidth: float | None,
                 concurrency: int) -> Prediction:
        stall_limit = rules.kubevirt_progress_timeout
        if rules.progress_timeout is not None:  # virtshift's own abort of a stalled transfer
            stall_limit = min(stall_limit, rules.progress_timeout)
        return predict(Transfer(
            memory=vmi.memory, dirty_rate=vmi.dirty_rate or 0.0,
            bandwidth=self.bandwidth(rules, node_bandwidth, concurrency),
            max_downtime=rules.switchover_downtime,
            # As KubeVirt resolves them: the policy's, else the KubeVirt CR's.
            auto_converge=rules.allow_auto_converge, post_copy=rules.allow_post_copy,
            workload_disruption=rules.allow_workload_disruption,
            # KubeVirt aborts, pauses the guest or switches to post-copy at this limit.
            completion_timeout=completion_limit(rules.completion_timeout_per_gib, vmi.memory),
            progress_timeout=stall_limit,
        ))

    def seconds(self, vmi: VMIInfo, rules: Rules, node_bandwidth: float | None,
                concurrency: int) -> float:
        p = self.transfer(vmi, rules, node_bandwidth, concurrency)
        return self.target_startup + (p.duration if math.isfinite(p.duration) else 0.0)


def makespan(durations: Iterable[float], slots: int) -> float:
    """Longest-first list scheduling on ``slots`` parallel lanes: when the last one finishes."""
    lanes = [0.0] * max(slots, 1)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(lanes, lanes[0] + d)
    return max(lanes)
