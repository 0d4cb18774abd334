"""Live storage migration at scale: 20 running VMs move their disks off the legacy array
(examples/scenarios/storage.yaml) under a policy allowing four copies at a time. Measured from
the cluster's own objects: KubeVirt's migrations' phase timestamps (cluster time)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import OperatorProcess, wait_for
from test_storage_migration import claims_of_vm, claims_of_vmi, pvc_size

from virtshift.api.units import parse_quantity
from virtshift.k8s import rest
from virtshift.k8s.views import parse_time
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "storage.yaml"
TIME_SCALE = 30  # the other storage tests run at 60x
PARALLEL = 4


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO).model_copy(update={"time_scale": TIME_SCALE})
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale).start()
    try:
        yield {"kube": fresh_cluster.kube, "scenario": scenario}
    finally:
        op.stop()
        sim.stop()


def interval(m: dict[str, Any], start: str) -> tuple[dt.datetime, dt.datetime]:
    stamps = {t["phase"]: parse_time(t["phaseTransitionTimestamp"])
              for t in m["status"]["phaseTransitionTimestamps"]}
    return stamps[start], stamps["Succeeded"]


def union_seconds(spans: list[tuple[dt.datetime, dt.datetime]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


def peak_overlap(spans: list[tuple[dt.datetime, dt.datetime]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_twenty_vms_move_within_the_copy_limit_at_the_class_bandwidth(env) -> None:
    kube, scenario = env["kube"], env["scenario"]
    before = {(v["metadata"]["namespace"], v["metadata"]["name"]): claims_of_vm(v)
              for v in kube.items(rest.VMS)}
    sizes = {(c["metadata"]["namespace"], c["metadata"]["name"]): pvc_size(c)
             for c in kube.items(rest.PVCS)}
    assert len(before) == 20
    kube.create(rest.POLICIES, {
        "apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "off-legacy"},
        "spec": {"storage": {"targetStorageClass": "ceph-rbd", "mode": "Always",
                             "maxParallelCopies": PARALLEL}}})

    def on_ceph() -> bool:
        pvcs = {(c["metadata"]["namespace"], c["metadata"]["name"]): c
                for c in kube.items(rest.PVCS)}
        vmis = {(v["metadata"]["namespace"], v["metadata"]["name"]): v
                for v in kube.items(rest.VMIS)}
        return all(not vmis[k]["status"].get("migratedVolumes") and all(
            pvcs[(k[0], c)]["spec"]["storageClassName"] == "ceph-rbd"
            for c in claims_of_vmi(vmis[k]).values()) for k in before)
    def succeeded() -> list[dict[str, Any]]:
        return [m for m in kube.items(rest.VMIMS)
                if (m.get("status") or {}).get("phase") == "Succeeded"]

    wait_for(on_ceph, 600, what=lambda: "every disk on ceph-rbd: " + str(
        (kube.get(rest.POLICIES, "off-legacy") or {}).get("status", {}).get("storage", {}).get(
            "counts")))
    # KubeVirt writes the VMI (virt-handler) before the VMIM (virt-controller): the last
    # migrations may show Succeeded a moment after their VMIs run on the new claims.
    wait_for(lambda: len(succeeded()) >= len(before), 30, what="every VMIM Succeeded")
    migrations = succeeded()
    assert {(m["metadata"]["namespace"], m["spec"]["vmiName"]) for m in migrations} == set(
        before)
    # Never more than four copies at once: from creation to the end of each migration.
    assert peak_overlap([interval(m, "Pending") for m in migrations]) <= PARALLEL
    # The legacy array is the bottleneck: every copy reads from it, and its bandwidth is
    # shared by the copies under way. The time anything was copying is within 20% of
    # total bytes / its bandwidth.
    total = sum(sizes[(ns, c)] for (ns, _n), vols in before.items() for c in vols.values())
    legacy = next(c for c in scenario.storage_classes if c.name == "legacy-array")
    bound = total / legacy.copy_bandwidth
    copying = union_seconds([interval(m, "Running") for m in migrations])
    print(f"\nstorage copy: {copying:.0f} s copying, bound {bound:.0f} s, "
          f"ratio {copying / bound:.3f}")
    assert bound <= copying <= 1.2 * bound, (copying, bound)
    # Sizes preserved, the VMs running on the new claims.
    pvcs = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in kube.items(rest.PVCS)}
    for (ns, name), vols in before.items():
        vm = kube.get(rest.VMS, name, ns)
        for volume, claim in claims_of_vm(vm).items():
            assert parse_quantity(pvcs[(ns, claim)]["spec"]["resources"]["requests"][
                "storage"]) >= sizes[(ns, vols[volume])]
