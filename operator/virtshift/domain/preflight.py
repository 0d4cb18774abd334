"""Pre-flight checks for one VM: an ordered chain of predicates, first failure wins.

Each returns ``(reason, message)`` or None; the reason becomes the VM's (and, when it blocks the
whole drain, the condition's) reason verbatim.

Two placements are checked: a live migration's target pod (``preflight``,
``target_candidates``: the node selector KubeVirt renders for it, domain.placement), and, for a
quick migration (nonMigratable ``Restart``, the downtime ladder's ``QuickMigration``), the
fresh launcher pod the VM gets when it starts again (``restart_finding``,
``restart_candidates``): only ``launch_selector`` and the VMI's own node selector, since a
new VMI starts from its VM's template (a host-model VM needs no CPU-model label then; a named
model needs ``cpu-model.node.kubevirt.io/<model>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from virtshift.api.units import format_bytes
from virtshift.domain.placement import (
    NodeView,
    choose_target,
    cpu_requirements,
    fits_selector,
    launch_selector,
    launcher_requests,
    migration_selector,
    rank_targets,
)
from virtshift.domain.views import NodeInfo, VMIInfo

Finding = tuple[str, str]

NOT_LIVE_MIGRATABLE = "NotLiveMigratable"  # only when KubeVirt gives no reason of its own
NO_COMPATIBLE_TARGET = "NoCompatibleTarget"
INSUFFICIENT_CAPACITY = "InsufficientCapacity"


@dataclass(frozen=True)
class Context:
    nodes: Mapping[str, NodeInfo]
    usage: Mapping[str, tuple[float, float]]  # node -> (cpu, memory) requested by running VMs
    target_selector: Mapping[str, str]
    excluded: frozenset[str]  # nodes being drained: never targets

    def candidates(self) -> list[NodeView]:
        return list(self._candidates)

    @cached_property
    def _candidates(self) -> tuple[NodeView, ...]:
        """Built once per pass: every VM's checks and ranking go over the same nodes."""
        return tuple(n.view() for n in self.nodes.values() if n.name not in self.excluded)


def live_migratable(vmi: VMIInfo, ctx: Context) -> Finding | None:
    if vmi.migratable:
        return None
    reason = vmi.not_migratable_reason or NOT_LIVE_MIGRATABLE
    return reason, vmi.not_migratable_message or f"KubeVirt reports {vmi.key} cannot live-migrate"


def cpu_compatible(vmi: VMIInfo, ctx: Context) -> Finding | None:
    """No target offers the CPU model (and vendor) KubeVirt will require of it."""
    needed = cpu_requirements(_selector(vmi, ctx))
    if not needed:
        return None
    placement = {**ctx.target_selector, **vmi.node_selector}
    nodes = [n for n in ctx.candidates() if n.ready and n.schedulable
             and fits_selector(n, placement)]
    if any(fits_selector(n, needed) for n in nodes):
        return None
    return NO_COMPATIBLE_TARGET, (
        "no ready, schedulable node offers the CPU KubeVirt requires of the target ("
        + ", ".join(sorted(needed)) + ")"
        + (f" and matches targetNodeSelector {dict(ctx.target_selector)}"
           if ctx.target_selector else "")
    )


def capacity(vmi: VMIInfo, ctx: Context) -> Finding | None:
    cpu, memory = requests(vmi)
    target = choose_target(ctx.candidates(), vmi.node or "", cpu, memory, dict(ctx.usage),
                           _selector(vmi, ctx))
    if target:
        return None
    return INSUFFICIENT_CAPACITY, (
        f"no compatible node has {cpu:g} CPU and {format_bytes(memory)} free for the target "
        "pod"
    )


CHECKS: Sequence[Callable[[VMIInfo, Context], Finding | None]] = (
    live_migratable, cpu_compatible, capacity,
)


def preflight(vmi: VMIInfo, ctx: Context) -> Finding | None:
    for check in CHECKS:
        finding = check(vmi, ctx)
        if finding:
            return finding
    return None


def target_candidates(vmi: VMIInfo, ctx: Context, limit: int | None = None) -> list[str]:
    """Every node the target pod fits on, best first (``limit``: only the first few)."""
    cpu, memory = requests(vmi)
    ranked = rank_targets(ctx.candidates(), vmi.node or "", cpu, memory, dict(ctx.usage),
                          _selector(vmi, ctx))
    return ranked if limit is None else ranked[:limit]


def restart_selector(vmi: VMIInfo, ctx: Context) -> dict[str, str]:
    """The node selector of the launcher pod a stopped VM gets when it starts again: its
    VMI's (from the VM's template) with the drain's targetNodeSelector, which the restart
    gets on the template as a migration gets it as addedNodeSelector
    (nodeselectorrenderer.go: the VMI's nodeSelector, then KubeVirt's labels)."""
    return {**ctx.target_selector, **vmi.node_selector, **launch_selector(vmi.cpu_model)}


def restart_candidates(vmi: VMIInfo, ctx: Context) -> list[str]:
    """Nodes (not the excluded ones) where the VM, stopped, could start again, best first."""
    cpu, memory = requests(vmi)
    return rank_targets(ctx.candidates(), "", cpu, memory, dict(ctx.usage),
                        restart_selector(vmi, ctx))


def restart_finding(vmi: VMIInfo, ctx: Context) -> Finding | None:
    """Why the VM, once stopped, could not start on any other node (None: it could)."""
    if restart_candidates(vmi, ctx):
        return None
    selector = restart_selector(vmi, ctx)
    nodes = [n for n in ctx.candidates() if n.ready and n.schedulable]
    if not any(fits_selector(n, selector) for n in nodes):
        return NO_COMPATIBLE_TARGET, (
            "no other ready, schedulable node could start it again (node selector "
            + ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) + ")")
    cpu, memory = requests(vmi)
    return INSUFFICIENT_CAPACITY, (
        f"no other node has {cpu:g} CPU and {format_bytes(memory)} free to start it again"
    )


def requests(vmi: VMIInfo) -> tuple[float, float]:
    """(CPU cores, memory bytes) the VMI's launcher pod requests."""
    return launcher_requests(vmi.cpu, vmi.memory_request or vmi.memory)


def _selector(vmi: VMIInfo, ctx: Context) -> dict[str, str]:
    """The target pod's node selector as KubeVirt renders it (domain.placement)."""
    source = ctx.nodes.get(vmi.node or "")
    return migration_selector(vmi.cpu_model, dict(source.labels) if source else {},
                              vmi.pod_selector, ctx.target_selector, vmi.node_selector)
