"""Where KubeVirt lets a migration target run: the node selector and requests it renders, and the
scheduler's filters. Each case names the KubeVirt function it follows."""

from __future__ import annotations

import pytest

from virtshift.api.units import GiB, MiB
from virtshift.domain.placement import (
    NodeView,
    choose_target,
    cpu_requirements,
    launcher_requests,
    migration_selector,
    rank_targets,
)

SKY = {"host-model-cpu.node.kubevirt.io/Skylake-Server": "true",
       "host-model-required-features.node.kubevirt.io/ssbd": "true",
       "cpu-model-migration.node.kubevirt.io/Skylake-Server": "true",
       "cpu-model.node.kubevirt.io/Skylake-Server": "true",
       "cpu-feature.node.kubevirt.io/ssbd": "true",
       "cpu-vendor.node.kubevirt.io/Intel": "true", "kubevirt.io/schedulable": "true"}


@pytest.mark.parametrize(("model", "source_pod", "added", "expected"), [
    # prepareNodeSelectorForHostCpuModel, first move: the source node's host model and its
    # required features; every model also keeps the source's CPU vendor (createTargetPod).
    ("host-model", {}, {}, {
        "kubevirt.io/schedulable": "true",
        "cpu-model-migration.node.kubevirt.io/Skylake-Server": "true",
        "cpu-feature.node.kubevirt.io/ssbd": "true",
        "cpu-vendor.node.kubevirt.io/Intel": "true"}),
    # Moved before: the source pod's keys are kept, the current node is not read again.
    ("host-model", {"cpu-model-migration.node.kubevirt.io/Haswell-noTSX": "true"}, {}, {
        "kubevirt.io/schedulable": "true",
        "cpu-model-migration.node.kubevirt.io/Haswell-noTSX": "true",
        "cpu-vendor.node.kubevirt.io/Intel": "true"}),
    # nodeselectorrenderer.go Render: a named model must be usable (cpu-model.*).
    ("Cascadelake-Server", {}, {}, {
        "kubevirt.io/schedulable": "true",
        "cpu-model.node.kubevirt.io/Cascadelake-Server": "true",
        "cpu-vendor.node.kubevirt.io/Intel": "true"}),
    ("host-passthrough", {}, {}, {"kubevirt.io/schedulable": "true",
                                  "cpu-vendor.node.kubevirt.io/Intel": "true"}),
    # addedNodeSelector is merged first: it restricts, it cannot override KubeVirt's keys.
    ("host-passthrough", {}, {"zone": "b", "kubevirt.io/schedulable": "false"}, {
        "zone": "b", "kubevirt.io/schedulable": "true",
        "cpu-vendor.node.kubevirt.io/Intel": "true"}),
])
def test_migration_selector_follows_create_target_pod(model, source_pod, added, expected):
    assert migration_selector(model, SKY, source_pod, added) == expected


def test_cpu_requirements_name_only_the_cpu_keys() -> None:
    selector = migration_selector("host-model", SKY, {}, {"zone": "a"})
    assert cpu_requirements(selector) == {
        "cpu-model-migration.node.kubevirt.io/Skylake-Server": "true",
        "cpu-feature.node.kubevirt.io/ssbd": "true", "cpu-vendor.node.kubevirt.io/Intel": "true"}


@pytest.mark.parametrize(("vcpus", "memory", "cpu", "overhead"), [
    # renderresources.go WithoutDedicatedCPU (ratio 10) and the KVM memory overhead:
    # requests/512 + 260 Mi + 8 Mi per vCPU.
    (2, 16 * GiB, 0.2, 16 * GiB / 512 + 260 * MiB + 16 * MiB),
    (1, 1 * GiB, 0.1, 2 * MiB + 260 * MiB + 8 * MiB),
])
def test_launcher_requests(vcpus: int, memory: float, cpu: float, overhead: float) -> None:
    got_cpu, got_memory = launcher_requests(vcpus, memory)
    assert got_cpu == pytest.approx(cpu)
    assert got_memory == pytest.approx(memory + overhead)


def node(name: str, labels: dict[str, str] | None = None, **kw) -> NodeView:
    return NodeView(name, labels if labels is not None else SKY, kw.pop("ready", True),
                    kw.pop("schedulable", True), kw.pop("cpu", 64.0),
                    kw.pop("memory", 256 * GiB), **kw)


SELECTOR = migration_selector("host-model", SKY, {}, {})


@pytest.mark.parametrize(("nodes", "expected"), [
    ([node("a"), node("b")], ["a", "b"]),  # the source (src) is never a target
    ([node("a", ready=False), node("b")], ["b"]),
    ([node("a", schedulable=False), node("b")], ["b"]),  # cordoned
    # KubeVirt adds no tolerations: NoSchedule and NoExecute taints keep the pod out.
    ([node("a", taints=(("kubevirt.io/drain", "NoSchedule"),)), node("b")], ["b"]),
    ([node("a", taints=(("x", "PreferNoSchedule"),)), node("b")], ["a", "b"]),
    ([node("a", {**SKY, "cpu-vendor.node.kubevirt.io/Intel": "false"}), node("b")], ["b"]),
    ([node("a", {k: v for k, v in SKY.items() if "ssbd" not in k}), node("b")], ["b"]),
    ([node("a", memory=10 * GiB), node("b")], ["b"]),
])
def test_rank_targets_filters_like_the_scheduler(nodes, expected) -> None:
    cpu, memory = launcher_requests(2, 16 * GiB)
    assert rank_targets([node("src"), *nodes], "src", cpu, memory, {}, SELECTOR) == expected


def test_least_allocated_after_placement_first() -> None:
    cpu, memory = launcher_requests(2, 16 * GiB)
    used = {"a": (1.0, 200 * GiB), "b": (1.0, 20 * GiB)}
    assert choose_target([node("a"), node("b")], "src", cpu, memory, used, SELECTOR) == "b"
