"""Pre-flight checks for one VM: an ordered chain of predicates, first failure wins.

Each returns ``(reason, message)`` or None; the reason becomes the VM's (and, when it blocks the
whole drain, the condition's) reason verbatim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from virtshift.api.units import format_bytes
from virtshift.domain.placement import NodeView, choose_target, rank_targets, required_cpu_label
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
        return [n.view() for n in self.nodes.values() if n.name not in self.excluded]


def live_migratable(vmi: VMIInfo, ctx: Context) -> Finding | None:
    if vmi.migratable:
        return None
    reason = vmi.not_migratable_reason or NOT_LIVE_MIGRATABLE
    return reason, vmi.not_migratable_message or f"KubeVirt reports {vmi.key} cannot live-migrate"


def cpu_compatible(vmi: VMIInfo, ctx: Context) -> Finding | None:
    label = _cpu_label(vmi, ctx)
    if label is None:
        return None
    nodes = [n for n in ctx.candidates() if n.ready and n.schedulable
             and all(n.labels.get(k) == v for k, v in ctx.target_selector.items())]
    if any(n.labels.get(label) == "true" for n in nodes):
        return None
    model = label.rsplit("/", 1)[-1]
    return NO_COMPATIBLE_TARGET, (
        f"no ready, schedulable node offers CPU model {model} "
        f"({'host-model of ' + str(vmi.node) if vmi.cpu_model == 'host-model' else 'named'})"
        + (f" and matches targetNodeSelector {dict(ctx.target_selector)}"
           if ctx.target_selector else "")
    )


def capacity(vmi: VMIInfo, ctx: Context) -> Finding | None:
    target = choose_target(ctx.candidates(), vmi.node or "", vmi.cpu, vmi.memory,
                           dict(ctx.usage), _cpu_label(vmi, ctx), dict(ctx.target_selector))
    if target:
        return None
    return INSUFFICIENT_CAPACITY, (
        f"no compatible node has {vmi.cpu:g} CPU and {format_bytes(vmi.memory)} free"
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


def target_candidates(vmi: VMIInfo, ctx: Context, limit: int = 5) -> list[str]:
    return rank_targets(ctx.candidates(), vmi.node or "", vmi.cpu, vmi.memory, dict(ctx.usage),
                        _cpu_label(vmi, ctx), dict(ctx.target_selector))[:limit]


def _cpu_label(vmi: VMIInfo, ctx: Context) -> str | None:
    source = ctx.nodes.get(vmi.node or "")
    return required_cpu_label(vmi.cpu_model, dict(source.labels) if source else {})
