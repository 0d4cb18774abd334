"""A lower bound on a drain's makespan under KubeVirt's limits. Pure: no cluster, no clock.

No schedule, virtshift's or KubeVirt's, can empty the nodes faster than this. For every VM i
let ``b_i = min(B, bandwidthPerMigration)`` (B: the node NIC, shared by all migrations in or out
of a node), ``T_i`` the pre-copy model's transfer time of i *alone* at ``b_i`` (the physics of
``virtshift.domain.physics``, the model the simulator follows: rounds of ``M*lambda^k`` at the
dirty rate, with post-copy / auto-converge as allowed, switching at the earliest point the
model allows) and ``X_i`` the bytes it sends then. Sharing a NIC only lowers the bandwidth, and
a lower bandwidth never shortens a transfer nor lowers its bytes, so ``T_i`` and ``X_i`` are
each a floor. With ``s`` the target pod start-up (VMIM creation to transfer start), ``k`` =
``parallelOutboundMigrationsPerNode`` and ``c`` = ``parallelMigrationsPerCluster`` (KubeVirt
counts a migration against both from Scheduling on, so a slot is held for at least
``s + T_i``), a group of nodes drained together, with ``V_n`` the VMs of node n:

    LB(group) = max( max_i (s + T_i),                      a VM cannot go faster alone
                     max_n  s + sum_{i in V_n} X_i / B,      node n's NIC
                     max_n  sum_{i in V_n} (s + T_i) / k,    node n's outbound slots
                     sum_{i in group} (s + T_i) / c )        the cluster's slots

A wave drained ``maxUnavailable`` nodes at a time (in name order, the next group starting only
when the previous is empty) is bounded by the sum of its groups' bounds. VMs that can never
finish (no convergence and no post-copy or auto-converge allowed) are left out and counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from virtshift.domain.physics import QEMU_DEFAULT_DOWNTIME, Transfer, predict

FORMULA = (
    "LB(group) = max( max_i (s + T_i), max_n s + sum_{i in V_n} X_i / B, "
    "max_n sum_{i in V_n} (s + T_i) / k, sum_{i in group} (s + T_i) / c ); "
    "LB(wave) = sum over its groups of maxUnavailable nodes"
)


@dataclass(frozen=True)
class BoundVM:
    name: str  # namespace/name
    node: str
    memory: float  # bytes
    dirty_rate: float  # bytes/s


@dataclass(frozen=True)
class Limits:
    node_bandwidth: float  # B, bytes/s per node NIC
    target_startup: float  # s, seconds
    per_node: int  # k, parallelOutboundMigrationsPerNode
    per_cluster: int  # c, parallelMigrationsPerCluster
    bandwidth_per_migration: float = 0.0  # 0: unlimited
    post_copy: bool = False
    auto_converge: bool = False
    max_downtime: float = QEMU_DEFAULT_DOWNTIME


@dataclass(frozen=True)
class VMFloor:
    name: str
    node: str
    seconds: float  # s + T_i; inf when it can never finish
    bytes: float  # X_i


@dataclass(frozen=True)
class GroupBound:
    nodes: tuple[str, ...]
    seconds: float
    binding: str  # which term gave the maximum
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Bound:
    seconds: float
    groups: tuple[GroupBound, ...]
    unfinishable: tuple[str, ...]  # VMs left out: they can never finish under these limits
    formula: str = FORMULA


def vm_floor(vm: BoundVM, limits: Limits) -> VMFloor:
    """``s + T_i`` and ``X_i`` of one VM migrating alone at its best bandwidth."""
    bw = limits.node_bandwidth
    if limits.bandwidth_per_migration:
        bw = min(bw, limits.bandwidth_per_migration)
    p = predict(Transfer(memory=vm.memory, dirty_rate=vm.dirty_rate, bandwidth=bw,
                         max_downtime=limits.max_downtime, auto_converge=limits.auto_converge,
                         post_copy=limits.post_copy, completion_timeout=None,
                         progress_timeout=None, ideal_post_copy=True))
    if not p.converges or not math.isfinite(p.duration):
        return VMFloor(vm.name, vm.node, math.inf, math.inf)
    return VMFloor(vm.name, vm.node, limits.target_startup + p.duration, p.bytes_sent)


def group_bound(floors: Sequence[VMFloor], limits: Limits,
                nodes: Iterable[str] = ()) -> GroupBound:
    names = tuple(sorted(set(nodes) | {f.node for f in floors}))
    if not floors:
        return GroupBound(names, 0.0, "empty", {})
    s, big_b = limits.target_startup, limits.node_bandwidth
    by_node: dict[str, list[VMFloor]] = defaultdict(list)
    for f in floors:
        by_node[f.node].append(f)
    terms = {
        "longest VM (s + T_i)": max(f.seconds for f in floors),
        "node NIC (s + sum X_i / B)": max(s + sum(f.bytes for f in fs) / big_b
                                          for fs in by_node.values()),
        "outbound slots (sum (s + T_i) / k)": max(sum(f.seconds for f in fs)
                                                  / max(limits.per_node, 1)
                                                  for fs in by_node.values()),
        "cluster slots (sum (s + T_i) / c)": sum(f.seconds for f in floors)
        / max(limits.per_cluster, 1),
    }
    binding = max(terms, key=lambda k: terms[k])
    return GroupBound(names, terms[binding], binding, terms)


def lower_bound(vms: Iterable[BoundVM], limits: Limits, groups: Sequence[Sequence[str]]
                ) -> Bound:
    """The bound for draining ``groups`` of nodes one group after the other (one group: all
    at once). VMs on nodes outside every group are ignored."""
    floors = [vm_floor(vm, limits) for vm in vms]
    unfinishable = tuple(sorted(f.name for f in floors if not math.isfinite(f.seconds)))
    out = []
    for group in groups:
        members = set(group)
        out.append(group_bound([f for f in floors if f.node in members
                                and math.isfinite(f.seconds)], limits, group))
    return Bound(sum(g.seconds for g in out), tuple(out), unfinishable)


def waves(nodes: Sequence[str], max_unavailable: int | None) -> list[list[str]]:
    """The groups a drain of ``nodes`` goes through: all at once (None), or ``max_unavailable``
    at a time in the order given."""
    if not max_unavailable:
        return [list(nodes)]
    return [list(nodes[i:i + max_unavailable]) for i in range(0, len(nodes), max_unavailable)]
