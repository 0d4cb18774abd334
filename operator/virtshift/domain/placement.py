"""Where a migration target pod can run: what KubeVirt puts in its node selector and resource
requests, and the kube-scheduler's filters and scoring, narrowed to what matters for VMs.

- pkg/virt-controller/services/nodeselectorrenderer.go (Render): every launcher pod needs
  ``kubevirt.io/schedulable``; a named CPU model needs ``cpu-model.node.kubevirt.io/<model>``.
- pkg/virt-controller/watch/migration/migration.go (createTargetPod,
  prepareNodeSelectorForHostCpuModel): a host-model VMI's target needs
  ``cpu-model-migration.node.kubevirt.io/<host model of the source node>`` and a
  ``cpu-feature.node.kubevirt.io/<f>`` per host-model required feature of the source node --
  unless the source pod already carries such keys (it moved before): those are kept, so the
  requirement stays that of the node where the VMI first started. Every model gets the source
  node's ``cpu-vendor`` label. ``addedNodeSelector`` is merged first: it can only restrict.
  A required pod anti-affinity on the VMI keeps the target off the source node.
- pkg/virt-controller/services/renderresources.go (WithoutDedicatedCPU, WithMemoryOverhead):
  CPU request = vCPUs / cpuAllocationRatio (10); memory request = requested memory plus
  KubeVirt's overhead (requests/512 + 260 Mi + 8 Mi per vCPU for a plain amd64 VM).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from virtshift.api.kubevirt import (
    CPU_FEATURE_LABEL,
    CPU_MODEL_LABEL,
    CPU_VENDOR_LABEL,
    HOST_MODEL_FEATURE_LABEL,
    HOST_MODEL_LABEL,
    MIGRATION_CPU_MODEL_LABEL,
    SCHEDULABLE_LABEL,
)

MiB = 2**20
CPU_ALLOCATION_RATIO = 10
OVERHEAD_FIXED = 260 * MiB  # virt-launcher processes, IO thread and video
OVERHEAD_PER_VCPU = 8 * MiB
NO_SCHEDULE_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str]
    ready: bool
    schedulable: bool
    cpu: float  # allocatable cores
    memory: float  # allocatable bytes
    taints: tuple[tuple[str, str], ...] = ()  # (key, effect)


def launcher_requests(vcpus: float, memory_request: float,
                      cpu_allocation_ratio: float = CPU_ALLOCATION_RATIO) -> tuple[float, float]:
    """(CPU cores, memory bytes) a virt-launcher pod requests for a plain amd64 VM."""
    overhead = memory_request / 512 + OVERHEAD_FIXED + OVERHEAD_PER_VCPU * vcpus
    return vcpus / cpu_allocation_ratio, memory_request + overhead


def launch_selector(cpu_model: str) -> dict[str, str]:
    """The node selector of a VMI's launcher pod (the template every target pod starts from)."""
    selector = {SCHEDULABLE_LABEL: "true"}
    if cpu_model not in ("host-model", "host-passthrough", ""):
        selector[CPU_MODEL_LABEL + cpu_model] = "true"
    return selector


def host_model_selector(source_labels: Mapping[str, str],
                        source_pod_selector: Mapping[str, str]) -> dict[str, str]:
    """prepareNodeSelectorForHostCpuModel: kept from the source pod after the first move,
    else taken from the source node's host-model labels."""
    kept = {k: v for k, v in source_pod_selector.items()
            if CPU_FEATURE_LABEL in k or MIGRATION_CPU_MODEL_LABEL in k}
    if kept:
        return kept
    out = {}
    for key, value in source_labels.items():
        if key.startswith(HOST_MODEL_LABEL):
            out[MIGRATION_CPU_MODEL_LABEL + key[len(HOST_MODEL_LABEL):]] = value
        elif key.startswith(HOST_MODEL_FEATURE_LABEL):
            out[CPU_FEATURE_LABEL + key[len(HOST_MODEL_FEATURE_LABEL):]] = value
    return out


def migration_selector(cpu_model: str, source_labels: Mapping[str, str],
                       source_pod_selector: Mapping[str, str] | None = None,
                       added: Mapping[str, str] | None = None,
                       vmi_selector: Mapping[str, str] | None = None) -> dict[str, str]:
    """createTargetPod: the target pod's node selector."""
    selector = dict(added or {})
    selector.update(vmi_selector or {})
    selector.update(launch_selector(cpu_model))
    if cpu_model == "host-model":
        selector.update(host_model_selector(source_labels, source_pod_selector or {}))
    if not any(k.startswith(CPU_VENDOR_LABEL) for k in selector):
        vendor = next((k for k in sorted(source_labels) if k.startswith(CPU_VENDOR_LABEL)),
                      None)
        if vendor:
            selector[vendor] = "true"
    return selector


def cpu_requirements(selector: Mapping[str, str]) -> dict[str, str]:
    """The CPU part of a target pod's node selector (what a message should name)."""
    prefixes = (CPU_MODEL_LABEL, MIGRATION_CPU_MODEL_LABEL, CPU_FEATURE_LABEL, CPU_VENDOR_LABEL)
    return {k: v for k, v in selector.items() if k.startswith(prefixes)}


def fits_selector(node: NodeView, selector: Mapping[str, str]) -> bool:
    return all(node.labels.get(k) == v for k, v in selector.items())


def tolerated(node: NodeView, tolerations: Iterable[str] = ()) -> bool:
    """KubeVirt adds no tolerations to launcher pods: NoSchedule/NoExecute taints keep them
    out unless the VMI tolerates the key."""
    allowed = set(tolerations)
    return all(effect not in NO_SCHEDULE_EFFECTS or key in allowed
               for key, effect in node.taints)


def rank_targets(
    nodes: Iterable[NodeView],
    source: str,
    cpu: float,
    memory: float,
    used: Mapping[str, tuple[float, float]],
    selector: Mapping[str, str],
) -> list[str]:
    """Feasible nodes for the target pod, least allocated (after placement) first. ``cpu`` and
    ``memory`` are the pod's requests; ``used`` what pods already request per node."""
    scored: list[tuple[float, str]] = []
    for n in nodes:
        if n.name == source or not n.ready or not n.schedulable or not tolerated(n):
            continue
        if not fits_selector(n, selector):
            continue
        used_cpu, used_mem = used.get(n.name, (0.0, 0.0))
        if used_cpu + cpu > n.cpu or used_mem + memory > n.memory:
            continue
        scored.append((max((used_cpu + cpu) / n.cpu, (used_mem + memory) / n.memory), n.name))
    return [name for _score, name in sorted(scored)]


def choose_target(nodes: Iterable[NodeView], source: str, cpu: float, memory: float,
                  used: Mapping[str, tuple[float, float]], selector: Mapping[str, str],
                  ) -> str | None:
    """The node the scheduler would pick, or None when the target pod would stay Pending."""
    ranked = rank_targets(nodes, source, cpu, memory, used, selector)
    return ranked[0] if ranked else None
