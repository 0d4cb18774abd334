"""Where a migration target pod would be scheduled: the kube-scheduler's filters and scoring,
narrowed to what matters for VMs (readiness, cordons, capacity, CPU model, node selectors)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from virtshift.api.kubevirt import CPU_MODEL_LABEL, HOST_MODEL_LABEL


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: dict[str, str]
    ready: bool
    schedulable: bool
    cpu: float  # allocatable cores
    memory: float  # allocatable bytes


def required_cpu_label(cpu_model: str, source_labels: dict[str, str]) -> str | None:
    """The node label a target must carry for the VM's CPU model (what KubeVirt adds to the
    target pod's node selector): the source's host model for host-model VMs."""
    if cpu_model == "host-passthrough":
        return None
    if cpu_model == "host-model":
        hosts = [k for k in source_labels if k.startswith(HOST_MODEL_LABEL)]
        return hosts[0] if hosts else None
    return CPU_MODEL_LABEL + cpu_model


def rank_targets(
    nodes: Iterable[NodeView],
    source: str,
    cpu: float,
    memory: float,
    used: dict[str, tuple[float, float]],
    cpu_label: str | None,
    selector: dict[str, str],
) -> list[str]:
    """Feasible nodes for the target pod, least allocated (after placement) first."""
    scored: list[tuple[float, str]] = []
    for n in nodes:
        if n.name == source or not n.ready or not n.schedulable:
            continue
        if cpu_label and n.labels.get(cpu_label) != "true":
            continue
        if any(n.labels.get(k) != v for k, v in selector.items()):
            continue
        used_cpu, used_mem = used.get(n.name, (0.0, 0.0))
        if used_cpu + cpu > n.cpu or used_mem + memory > n.memory:
            continue
        scored.append((max((used_cpu + cpu) / n.cpu, (used_mem + memory) / n.memory), n.name))
    return [name for _score, name in sorted(scored)]


def choose_target(
    nodes: Iterable[NodeView],
    source: str,
    cpu: float,
    memory: float,
    used: dict[str, tuple[float, float]],
    cpu_label: str | None,
    selector: dict[str, str],
) -> str | None:
    """The node the scheduler would pick, or None when the target pod would stay Pending."""
    ranked = rank_targets(nodes, source, cpu, memory, used, cpu_label, selector)
    return ranked[0] if ranked else None
