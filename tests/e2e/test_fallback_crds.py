"""The KubeVirt stand-in CRDs (``minimal_kubevirt_crds``) carry the simulator and a drain.

A fresh clone without ``../shared/kubevirt-crds`` runs on the stand-ins, while CI (which has
the real ones) would never notice if they broke: this module installs them explicitly
(``kubevirt_crds(fallback=True)``, what ``KUBEVIRT_CRDS_DIR=none`` selects) and runs the
medium scenario on them. Issue 8: the stand-ins gave VirtualMachineInstance a status
subresource, so the simulator's VMI status writes (merge patches on the main resource, as
virt-handler makes them) were silently dropped and a drain moved 0 of 0 VMs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from operator_harness import OperatorProcess, drain_body, get_drain, phase_of, wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

MEDIUM = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "medium.yaml"


@pytest.fixture(scope="module")
def env(fallback_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(MEDIUM)
    sim = runner.start(fallback_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fallback_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, sim.metrics.url).start()
    try:
        yield {"kube": fallback_cluster.kube, "cluster": fallback_cluster, "op": op,
               "scenario": scenario}
    finally:
        op.stop()
        sim.stop()


def test_the_cluster_runs_the_stand_ins(env) -> None:
    """Guards the test itself: the real CRDs would pass it without proving anything."""
    ext = client.ApiextensionsV1Api(env["cluster"].api)
    vmi = ext.read_custom_resource_definition("virtualmachineinstances.kubevirt.io")
    version = vmi.spec.versions[0]
    assert version.schema.open_apiv3_schema.x_kubernetes_preserve_unknown_fields is True
    assert version.subresources is None or version.subresources.status is None
    vm = ext.read_custom_resource_definition("virtualmachines.kubevirt.io")
    assert vm.spec.versions[0].subresources.status is not None


def test_simulator_vmi_status_writes_persist(env) -> None:
    kube, scenario = env["kube"], env["scenario"]
    vmis = {(v["metadata"]["namespace"], v["metadata"]["name"]): v for v in kube.items(rest.VMIS)}
    assert len(vmis) == len(scenario.vms)
    for vm in scenario.vms:
        status = vmis[vm.namespace, vm.name].get("status") or {}
        assert status.get("phase") == "Running", (vm.name, status)
        assert status.get("nodeName") == vm.node, (vm.name, status)
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        assert conds.get("LiveMigratable") == ("True" if vm.live_migratable else "False"), \
            (vm.name, conds)
    # VMs have a status subresource in KubeVirt: the simulator writes it there.
    vm_status = kube.get(rest.VMS, "app-1", "prod")["status"]
    assert vm_status["printableStatus"] == "Running"
    # KubeVirt's printer columns, as kubectl shows them.
    table = env["cluster"].kubectl("get", "vmi", "app-1", "-n", "prod", "-o", "wide").stdout
    header, row = (line.split() for line in table.splitlines())
    assert header == ["NAME", "AGE", "PHASE", "NODENAME", "LIVE-MIGRATABLE"]
    assert (row[0], *row[2:]) == ("app-1", "Running", "node-1", "True")


def test_operator_drain_moves_the_vms(env) -> None:
    kube, scenario = env["kube"], env["scenario"]
    on_node = [vm for vm in scenario.vms if vm.node == "node-1"]
    migratable = {(vm.namespace, vm.name) for vm in on_node if vm.live_migratable}
    assert migratable
    kube.create(rest.NODE_DRAINS, drain_body("fallback-node-1", nodeName="node-1"))
    drain = wait_for(lambda: phase_of(kube, "fallback-node-1") in ("Drained", "Stalled")
                     and get_drain(kube, "fallback-node-1"), timeout=45, what="drain done",
                     every=0.25)
    counts = drain["status"]["counts"]
    assert counts["total"] == len(on_node), counts
    assert counts["succeeded"] == len(migratable), counts
    assert counts["failed"] == len(on_node) - len(migratable), counts
    for ns, name in migratable:
        status = kube.get(rest.VMIS, name, ns)["status"]
        assert status["nodeName"] != "node-1", (name, status.get("nodeName"))
        assert status["migrationState"]["completed"] is True
        assert status["migrationState"]["sourceNode"] == "node-1"
