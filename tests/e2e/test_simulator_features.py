"""The KubeVirt simulator's less common features against the real API server, checked the way a
user would check them on the cluster objects: storage live migration, shared-nothing (node-local)
disks, CPU models, addedNodeSelector, injected faults, MigrationPolicy bandwidth and post-copy,
stopping/starting a VM through its runStrategy, and a VM template's node selector (placement,
an unschedulable start, live updates).

One scenario for the whole module; each test uses its own VMs, so the tests do not depend on
each other's outcome. The node failure is scheduled in simulated time, so its test runs first.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from operator_harness import wait_for as harness_wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

ZONE = "topology.kubernetes.io/zone"
CPU_MODEL = "cpu-model.node.kubevirt.io/"
HOST_MODEL = "host-model-cpu.node.kubevirt.io/"
NODE_FAILS_AT = 600.0  # simulated seconds (12 s of wall time), as in the nodeNotReady fault

SCENARIO = f"""
seed: 5
timeScale: 50
kubevirt: {{parallelMigrationsPerCluster: 10, parallelOutboundMigrationsPerNode: 4,
            progressTimeout: 60}}
network: {{nodeBandwidth: 1Gi, targetPodStartup: 10s}}
storageClasses:
  - {{name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 1Gi}}
  - {{name: ceph-ssd, accessMode: ReadWriteMany, copyBandwidth: 2Gi}}
  - {{name: local-lvm, nodeLocal: true, copyBandwidth: 1Gi}}
nodes:
  - {{name: sky-1, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: a}}}}
  - {{name: sky-2, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: a}}}}
  - {{name: sky-3, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: b}}}}
  - {{name: doomed-1, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: c}}}}
  - {{name: casc-1, cpuModel: Cascadelake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: a}}}}
  # A newer host on which the older named model is usable too (node labeller: cpu-model.*).
  - {{name: ice-1, cpuModel: Icelake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ZONE}: a, {CPU_MODEL}Cascadelake-Server: "true"}}}}
vms:
  # Fillers make the Skylake targets the most allocated, so the scheduler's "least allocated"
  # preference would pick a wrong node if the CPU model or a node selector were ignored.
  - {{name: filler-2, namespace: fill, node: sky-2, memory: 64Gi}}
  - {{name: filler-3, namespace: fill, node: sky-3, memory: 128Gi}}
  - {{name: filler-ice, namespace: fill, node: ice-1, memory: 64Gi}}
  # storage
  - {{name: stor-1, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi,
     volumes: [{{name: rootdisk, claimName: stor-1-root, size: 2Gi, storageClass: ceph-rbd}}]}}
  - {{name: local-1, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi,
     volumes: [{{name: rootdisk, claimName: local-1-root, size: 2Gi, storageClass: local-lvm}}]}}
  - {{name: local-2, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi,
     volumes: [{{name: rootdisk, claimName: local-2-root, size: 2Gi, storageClass: ceph-rbd}},
               {{name: data, claimName: local-2-data, size: 2Gi, storageClass: local-lvm}}]}}
  # CPU models and node selectors
  - {{name: hm-1, namespace: prod, node: sky-1, memory: 1Gi}}
  - {{name: named-1, namespace: prod, node: casc-1, memory: 1Gi, cpuModel: Cascadelake-Server}}
  - {{name: icy-1, namespace: prod, node: ice-1, memory: 1Gi, cpuModel: Icelake-Server}}
  - {{name: picky-1, namespace: prod, node: sky-1, memory: 1Gi}}
  # faults and policies
  - {{name: nnr-1, namespace: prod, node: doomed-1, memory: 16Gi, labels: {{migration: throttled}}}}
  - {{name: flaky-1, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi}}
  - {{name: spiky-1, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 10Mi}}
  - {{name: spiky-2, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 10Mi,
     labels: {{migration: postcopy}}}}
  - {{name: bw-slow, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi,
     labels: {{migration: throttled}}}}
  - {{name: bw-fast, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi}}
  - {{name: twice-1, namespace: prod, node: sky-1, memory: 1Gi, dirtyRate: 1Mi}}
  # run strategy (host-model on the only Cascade Lake node)
  - {{name: restart-1, namespace: prod, node: casc-1, memory: 1Gi}}
  - {{name: rs-manual, namespace: rs, node: sky-1, memory: 1Gi}}
  - {{name: rs-rerun, namespace: rs, node: sky-1, memory: 1Gi}}
  - {{name: rs-once, namespace: rs, node: sky-1, memory: 1Gi}}
  - {{name: pin-1, namespace: rs, node: sky-1, memory: 1Gi}}
faults:
  - {{kind: nodeNotReady, node: doomed-1, at: {int(NODE_FAILS_AT)}s}}
  - {{kind: failTargetPod, vm: prod/flaky-1, attempt: 1}}
  - {{kind: dirtyRateSpike, vm: prod/spiky-1, dirtyRate: 3Gi, at: 0s}}
  - {{kind: dirtyRateSpike, vm: prod/spiky-2, dirtyRate: 3Gi, at: 0s}}
"""

POLICIES = [
    {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
     "metadata": {"name": "throttled"},
     "spec": {"bandwidthPerMigration": "16Mi",
              "selectors": {"virtualMachineInstanceSelector": {"migration": "throttled"}}}},
    {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
     "metadata": {"name": "postcopy"},
     "spec": {"allowPostCopy": True, "completionTimeoutPerGiB": 20,
              "selectors": {"virtualMachineInstanceSelector": {"migration": "postcopy"}}}},
]


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    kube = fresh_cluster.kube
    for policy in POLICIES:  # before the simulator starts, so its cache has them from the start
        kube.create(rest.KUBEVIRT_POLICIES, policy)
    simulator = runner.start(kube, load_scenario(SCENARIO), log=lambda _m: None)
    yield simulator
    simulator.stop()


@pytest.fixture
def kube(sim, fresh_cluster) -> rest.KubeClient:
    return fresh_cluster.kube


# -- helpers --------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 20, every: float = 0.05) -> Any:
    return harness_wait_for(predicate, timeout, every)


def migrate(kube: rest.KubeClient, name: str, vmi: str, ns: str = "prod", **spec: Any) -> None:
    kube.create(rest.VMIMS, {"apiVersion": "kubevirt.io/v1",
                             "kind": "VirtualMachineInstanceMigration",
                             "metadata": {"name": name, "namespace": ns},
                             "spec": {"vmiName": vmi, **spec}})


def phase_of(kube: rest.KubeClient, name: str, ns: str = "prod") -> str | None:
    obj = kube.get(rest.VMIMS, name, ns)
    return obj and obj.get("status", {}).get("phase")


def final_vmim(kube: rest.KubeClient, name: str, ns: str = "prod",
               timeout: float = 20) -> dict[str, Any]:
    return wait_for(lambda: (o := kube.get(rest.VMIMS, name, ns)) and
                    o.get("status", {}).get("phase") in ("Succeeded", "Failed") and o, timeout)


def vmi(kube: rest.KubeClient, name: str, ns: str = "prod") -> dict[str, Any]:
    obj = kube.get(rest.VMIS, name, ns)
    assert obj is not None, f"VMI {ns}/{name} does not exist"
    return obj


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions") or []}


def launchers(kube: rest.KubeClient, vmi_obj: dict[str, Any]) -> list[dict[str, Any]]:
    uid = vmi_obj["metadata"]["uid"]
    return kube.items(rest.PODS, vmi_obj["metadata"]["namespace"],
                      label_selector=f"kubevirt.io=virt-launcher,kubevirt.io/created-by={uid}")


def seconds(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def phases(vmim: dict[str, Any]) -> list[str]:
    return [t["phase"] for t in vmim["status"]["phaseTransitionTimestamps"]]


def new_claim(kube: rest.KubeClient, name: str, storage_class: str, size: str = "2Gi",
              access_mode: str = "ReadWriteMany", ns: str = "prod") -> None:
    kube.create(rest.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"accessModes": [access_mode],
                                     "storageClassName": storage_class,
                                     "resources": {"requests": {"storage": size}}}})


def update_volumes(kube: rest.KubeClient, vm: str, claims: dict[str, str],
                   ns: str = "prod") -> None:
    """What a user does for a storage live migration: point the VM's volumes at new claims."""
    obj = kube.get(rest.VMS, vm, ns)
    assert obj is not None
    volumes = [{**v, "persistentVolumeClaim": {"claimName": claims[v["name"]]}}
               if v["name"] in claims else v for v in obj["spec"]["template"]["spec"]["volumes"]]
    kube.patch(rest.VMS, vm, {"spec": {"updateVolumesStrategy": "Migration",
                                       "template": {"spec": {"volumes": volumes}}}}, ns)


def workload_update_vmims(kube: rest.KubeClient, vm: str, ns: str = "prod") -> list[dict]:
    return [o for o in kube.items(rest.VMIMS, ns) if o["spec"]["vmiName"] == vm
            and o["metadata"]["name"].startswith("kubevirt-workload-update-")]


def claim_names(vmi_obj: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in vmi_obj["spec"]["volumes"] if "persistentVolumeClaim" in v}


# -- node failure (first: the fault fires at a fixed simulated time) ------------------------------


def test_node_not_ready_stalls_and_aborts_migrations_through_it(sim, kube) -> None:
    """virt-launcher live-migration-source.go isMigrationProgressing: a transfer that stops
    moving (its node unreachable) is aborted once no data left for more than progressTimeout
    whole seconds (60 here); on 1.9 the reason is "Live migration has been aborted"."""
    assert sim.clock.now() < NODE_FAILS_AT - 60, "the module started too slowly for this test"
    # 16Gi at the throttled policy's 16Mi/s takes ~1000 simulated seconds: in flight at 600s.
    migrate(kube, "move-nnr-1", "nnr-1")
    wait_for(lambda: phase_of(kube, "move-nnr-1") == "Running")
    done = final_vmim(kube, "move-nnr-1",
                      timeout=(NODE_FAILS_AT + 61) / sim.clock.time_scale + 10)
    assert done["status"]["phase"] == "Failed"
    assert "Running" in phases(done)
    state = done["status"]["migrationState"]
    assert state["failed"] is True and state["completed"] is True
    assert state["failureReason"] == "Live migration has been aborted"
    assert state["abortStatus"] == "Succeeded"
    # No progress for more than 60 s counts from the last sample that moved, which may come up
    # to a tick before the node failed; the stamp has whole seconds: within 1 s of 660.
    assert seconds(state["endTimestamp"]) - sim.clock.start.timestamp() >= NODE_FAILS_AT + 59
    assert state["migrationPolicyName"] == "throttled"
    assert vmi(kube, "nnr-1")["status"]["nodeName"] == "doomed-1"
    node = kube.get(rest.NODES, "doomed-1")
    assert conditions(node)["Ready"]["status"] != "True"
    # The failed target pod is cleaned up; the source pod stays.
    pods = wait_for(lambda: (p := launchers(kube, vmi(kube, "nnr-1"))) and len(p) == 1 and p)
    assert pods[0]["spec"]["nodeName"] == "doomed-1"


# -- storage --------------------------------------------------------------------------------------


def test_storage_live_migration_to_a_new_claim(kube) -> None:
    before = vmi(kube, "stor-1")
    new_claim(kube, "stor-1-root-ssd", "ceph-ssd")
    update_volumes(kube, "stor-1", {"rootdisk": "stor-1-root-ssd"})
    created = wait_for(lambda: workload_update_vmims(kube, "stor-1"))
    assert len(created) == 1
    done = final_vmim(kube, created[0]["metadata"]["name"])
    assert done["status"]["phase"] == "Succeeded", done["status"]
    after = wait_for(lambda: (v := vmi(kube, "stor-1")) and
                     claim_names(v) == {"rootdisk": "stor-1-root-ssd"} and v)
    assert after["status"]["nodeName"] == done["status"]["migrationState"]["targetNode"]
    assert after["status"]["nodeName"] != before["status"]["nodeName"]
    pods = launchers(kube, after)
    assert [p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] for p in pods] == \
        ["stor-1-root-ssd"]
    vm = wait_for(lambda: (o := kube.get(rest.VMS, "stor-1", "prod")) and
                  o.get("status", {}).get("volumeUpdateState") and o)
    migrated = vm["status"]["volumeUpdateState"]["volumeMigrationState"]["migratedVolumes"]
    assert [(m["volumeName"], m["sourcePVCInfo"]["claimName"],
             m["destinationPVCInfo"]["claimName"]) for m in migrated] == \
        [("rootdisk", "stor-1-root", "stor-1-root-ssd")]
    assert conditions(after)["LiveMigratable"]["status"] == "True"
    time.sleep(0.5)  # no further migration: the VM's volumes are where it wants them
    assert len(workload_update_vmims(kube, "stor-1")) == 1


def test_node_local_disks_are_not_live_migratable(kube) -> None:
    """virt-handler vm.go checkVolumesForMigration: a PVC that is not ReadWriteMany makes the
    VMI not live-migratable (DisksNotLiveMigratable), though its storage can migrate."""
    obj = vmi(kube, "local-1")
    conds = conditions(obj)
    assert conds["LiveMigratable"]["status"] == "False"
    assert conds["LiveMigratable"]["reason"] == "DisksNotLiveMigratable"
    assert conds["LiveMigratable"]["message"] == (
        "cannot migrate VMI: PVC local-1-root is not shared, live migration requires that all "
        "PVCs must be shared (using ReadWriteMany access mode)")
    assert conds["StorageLiveMigratable"]["status"] == "True"
    assert obj["status"]["migrationMethod"] == "BlockMigration"
    claim = kube.get(rest.PVCS, "local-1-root", "prod")
    pv = kube.get(rest.PVS, claim["spec"]["volumeName"])
    assert pv["spec"]["accessModes"] == ["ReadWriteOnce"]
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["sky-1"]
    # virt-api refuses the migration (migration-create-admitter.go: isMigratable).
    with pytest.raises(rest.ApiError) as err:
        migrate(kube, "move-local-1", "local-1")
    assert err.value.status == 400
    assert "denied the request: Cannot migrate VMI, Reason: DisksNotLiveMigratable" in \
        err.value.message
    assert vmi(kube, "local-1")["status"]["nodeName"] == "sky-1"


def test_shared_nothing_volume_migration_moves_the_vm(kube) -> None:
    new_claim(kube, "local-1-root-b", "local-lvm", access_mode="ReadWriteOnce")
    update_volumes(kube, "local-1", {"rootdisk": "local-1-root-b"})
    created = wait_for(lambda: workload_update_vmims(kube, "local-1"))
    done = final_vmim(kube, created[0]["metadata"]["name"])
    assert done["status"]["phase"] == "Succeeded", done["status"]
    after = wait_for(lambda: (v := vmi(kube, "local-1")) and
                     claim_names(v) == {"rootdisk": "local-1-root-b"} and v)
    assert after["status"]["nodeName"] not in ("sky-1", None)
    # Still on a node-local disk: still not live-migratable without another volume migration.
    assert conditions(after)["LiveMigratable"]["reason"] == "DisksNotLiveMigratable"


def test_volume_migration_must_move_every_node_local_disk(kube) -> None:
    """volume-migration.go ValidateVolumesUpdateMigration: a volume update that leaves an RWO
    volume behind is refused with RestartRequired and KubeVirt's message, and no migration is
    created; moving the data disk too starts it (VMI migratedVolumes, VolumesChange)."""
    new_claim(kube, "local-2-root-b", "ceph-rbd")
    update_volumes(kube, "local-2", {"rootdisk": "local-2-root-b"})
    vm = wait_for(lambda: (o := kube.get(rest.VMS, "local-2", "prod")) and
                  "RestartRequired" in conditions(o) and o)
    assert conditions(vm)["RestartRequired"]["message"] == (
        "cannot migrate the VM. The volume data is RWO and not included in the migration "
        "volumes")
    time.sleep(0.5)  # 25 simulated seconds
    assert workload_update_vmims(kube, "local-2") == []
    assert claim_names(vmi(kube, "local-2")) == {"rootdisk": "local-2-root",
                                                 "data": "local-2-data"}

    new_claim(kube, "local-2-data-b", "ceph-rbd")
    update_volumes(kube, "local-2", {"rootdisk": "local-2-root-b", "data": "local-2-data-b"})
    during = wait_for(lambda: (v := vmi(kube, "local-2")) and v["status"].get(
        "migratedVolumes") and v)
    assert sorted(m["volumeName"] for m in during["status"]["migratedVolumes"]) == \
        ["data", "rootdisk"]
    assert conditions(during)["VolumesChange"]["status"] == "True"
    assert conditions(during)["VolumesChange"]["message"] == "migrate volumes"
    done = final_vmim(kube, wait_for(lambda: workload_update_vmims(
        kube, "local-2"))[0]["metadata"]["name"], timeout=30)
    assert done["status"]["phase"] == "Succeeded"
    assert done["metadata"]["labels"]["kubevirt.io/volume-update-migration"] == "local-2"
    after = wait_for(lambda: (v := vmi(kube, "local-2")) and not v["status"].get(
        "migratedVolumes") and v)
    assert after["status"]["nodeName"] != "sky-1"
    assert "VolumesChange" not in conditions(after)
    assert claim_names(after) == {"rootdisk": "local-2-root-b", "data": "local-2-data-b"}
    # Both disks are shared now: the VMI became live-migratable, and a plain migration works.
    wait_for(lambda: conditions(vmi(kube, "local-2"))["LiveMigratable"]["status"] == "True")
    migrate(kube, "move-local-2", "local-2")
    assert final_vmim(kube, "move-local-2")["status"]["phase"] == "Succeeded"


# -- CPU models and node selectors ----------------------------------------------------------------


def test_host_model_vm_lands_only_on_the_same_host_model(kube) -> None:
    migrate(kube, "move-hm-1", "hm-1")
    done = final_vmim(kube, "move-hm-1")
    assert done["status"]["phase"] == "Succeeded"
    target = done["status"]["migrationState"]["targetNode"]
    # casc-1 is the least allocated node, but it has another host model.
    assert target in ("sky-2", "sky-3")
    assert kube.get(rest.NODES, target)["metadata"]["labels"][HOST_MODEL + "Skylake-Server"] == \
        "true"


def test_named_model_vm_lands_only_where_that_model_is_offered(kube) -> None:
    migrate(kube, "move-named-1", "named-1")
    done = final_vmim(kube, "move-named-1")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["migrationState"]["targetNode"] == "ice-1"  # not an emptier sky-*
    assert vmi(kube, "named-1")["status"]["nodeName"] == "ice-1"


def test_no_node_with_the_model_leaves_the_target_pod_unschedulable(sim, kube) -> None:
    """migration.go createTargetPod: the target pod needs cpu-model.node.kubevirt.io/<model>;
    with no such node it stays Pending (Unschedulable) and the VMIM Scheduling, until
    handlePendingPodTimeout deletes it after 300 s and the VMIM fails."""
    migrate(kube, "move-icy-1", "icy-1")
    wait_for(lambda: phase_of(kube, "move-icy-1") == "Scheduling")
    source = vmi(kube, "icy-1")
    target = wait_for(lambda: next((p for p in launchers(kube, source)
                                    if "kubevirt.io/migrationJobUID" in p["metadata"]["labels"]
                                    and conditions(p).get("PodScheduled")), None))
    assert target["spec"]["nodeSelector"][CPU_MODEL + "Icelake-Server"] == "true"
    assert conditions(target)["PodScheduled"]["reason"] == "Unschedulable"
    assert not target["spec"].get("nodeName")
    assert "targetNode" not in kube.get(rest.VMIMS, "move-icy-1", "prod")["status"].get(
        "migrationState", {})
    done = final_vmim(kube, "move-icy-1", timeout=310 / sim.clock.time_scale + 10)
    assert done["status"]["phase"] == "Failed"
    assert phases(done) == ["Pending", "Scheduling", "Failed"]
    assert wait_for(lambda: kube.get(rest.PODS, target["metadata"]["name"], "prod") is None)
    assert vmi(kube, "icy-1")["status"]["nodeName"] == "ice-1"


def test_added_node_selector_is_honoured(kube) -> None:
    # Without the selector the least allocated Skylake node (sky-2, zone a) would be chosen.
    migrate(kube, "move-picky-1", "picky-1", addedNodeSelector={ZONE: "b"})
    done = final_vmim(kube, "move-picky-1")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["migrationState"]["targetNode"] == "sky-3"
    migrate(kube, "move-picky-1-nowhere", "picky-1", addedNodeSelector={ZONE: "nowhere"})
    wait_for(lambda: phase_of(kube, "move-picky-1-nowhere") == "Scheduling")
    time.sleep(1)  # 50 simulated seconds
    assert phase_of(kube, "move-picky-1-nowhere") == "Scheduling"
    kube.delete(rest.VMIMS, "move-picky-1-nowhere", "prod")
    assert vmi(kube, "picky-1")["status"]["nodeName"] == "sky-3"


# -- faults and MigrationPolicies -----------------------------------------------------------------


def test_failed_target_pod_fails_the_first_attempt_only(kube) -> None:
    migrate(kube, "move-flaky-1-a", "flaky-1")
    first = final_vmim(kube, "move-flaky-1-a")
    assert first["status"]["phase"] == "Failed"
    assert "Running" not in phases(first) and "PreparingTarget" in phases(first)
    # handleMarkMigrationFailedOnVMI: the reason reaches the VMI from 1.9 on.
    state = first["status"]["migrationState"]
    assert state["failureReason"] == "Target pod is down"
    assert state["failed"] is True and state["completed"] is True
    assert vmi(kube, "flaky-1")["status"]["nodeName"] == "sky-1"
    migrate(kube, "move-flaky-1-b", "flaky-1")
    second = final_vmim(kube, "move-flaky-1-b")
    assert second["status"]["phase"] == "Succeeded"
    assert vmi(kube, "flaky-1")["status"]["nodeName"] != "sky-1"


def test_dirty_rate_spike_runs_until_the_completion_budget(kube) -> None:
    """live-migration-source.go: a transfer that keeps moving never trips the progress timeout
    (60 s here); it is aborted by the completion timeout, completionTimeoutPerGiB (150) x 2
    (1 GiB is 1.07 GB, rounded up), acting at 301 s."""
    migrate(kube, "move-spiky-1", "spiky-1")
    done = final_vmim(kube, "move-spiky-1", timeout=30)
    assert done["status"]["phase"] == "Failed"
    state = done["status"]["migrationState"]
    assert state["failureReason"] == "Live migration has been aborted"
    assert 300 < seconds(state["endTimestamp"]) - seconds(state["startTimestamp"]) <= 303
    assert state["mode"] == "PreCopy"
    assert vmi(kube, "spiky-1")["status"]["nodeName"] == "sky-1"


def test_post_copy_policy_rescues_the_same_spike(kube) -> None:
    migrate(kube, "move-spiky-2", "spiky-2")
    done = final_vmim(kube, "move-spiky-2")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    state = vmi(kube, "spiky-2")["status"]["migrationState"]
    assert state["mode"] == "PostCopy"
    assert state["migrationPolicyName"] == "postcopy"
    assert state["migrationConfiguration"]["allowPostCopy"] is True
    assert vmi(kube, "spiky-2")["status"]["nodeName"] != "sky-1"


def test_policy_bandwidth_slows_a_migration(kube) -> None:
    migrate(kube, "move-bw-slow", "bw-slow")
    migrate(kube, "move-bw-fast", "bw-fast")
    slow = final_vmim(kube, "move-bw-slow")
    fast = final_vmim(kube, "move-bw-fast")
    assert slow["status"]["phase"] == fast["status"]["phase"] == "Succeeded"

    def duration(obj: dict[str, Any]) -> float:
        state = obj["status"]["migrationState"]
        return seconds(state["endTimestamp"]) - seconds(state["startTimestamp"])

    # 1Gi at 16Mi/s is 64 simulated seconds; unlimited, the NIC moves it in a few seconds.
    assert duration(slow) >= 60 > 3 * duration(fast)
    assert slow["status"]["migrationState"]["migrationConfiguration"][
        "bandwidthPerMigration"] == "16Mi"
    # No policy: the cluster's configuration, unlimited (KubeVirt's default "0Mi").
    assert fast["status"]["migrationState"]["migrationConfiguration"][
        "bandwidthPerMigration"] == "0Mi"
    assert "migrationPolicyName" not in fast["status"]["migrationState"]


def test_one_migration_per_vmi_and_the_next_starts_from_where_the_vm_is_now(kube) -> None:
    migrate(kube, "move-twice-1-a", "twice-1")
    # One unfinished migration per VMI (migration-create-admitter.go: ensureNoMigrationConflict).
    with pytest.raises(rest.ApiError) as err:
        migrate(kube, "move-twice-1-b", "twice-1")
    uid = kube.get(rest.VMIMS, "move-twice-1-a", "prod")["metadata"]["uid"]
    assert err.value.status == 400 and err.value.message.endswith(
        f"in-flight migration detected. Active migration job ({uid}) is currently already in "
        "progress for VMI twice-1.")
    first = final_vmim(kube, "move-twice-1-a")
    migrate(kube, "move-twice-1-b", "twice-1")
    second = final_vmim(kube, "move-twice-1-b")
    assert first["status"]["phase"] == second["status"]["phase"] == "Succeeded"
    a, b = first["status"]["migrationState"], second["status"]["migrationState"]
    assert a["sourceNode"] == "sky-1"
    assert b["sourceNode"] == a["targetNode"] != b["targetNode"]
    assert vmi(kube, "twice-1")["status"]["nodeName"] == b["targetNode"]


# -- run strategy ---------------------------------------------------------------------------------


def test_halting_and_starting_a_vm_restarts_it_elsewhere(kube) -> None:
    old = vmi(kube, "restart-1")
    assert old["status"]["nodeName"] == "casc-1"
    old_pod = launchers(kube, old)[0]["metadata"]["name"]
    kube.patch(rest.NODES, "casc-1", {"spec": {"unschedulable": True}})
    kube.patch(rest.VMS, "restart-1", {"spec": {"runStrategy": "Halted"}}, "prod")
    wait_for(lambda: kube.get(rest.VMIS, "restart-1", "prod") is None)
    wait_for(lambda: kube.get(rest.PODS, old_pod, "prod") is None)
    vm = wait_for(lambda: (o := kube.get(rest.VMS, "restart-1", "prod")) and
                  o["status"].get("printableStatus") == "Stopped" and o)
    assert vm["status"]["ready"] is False

    kube.patch(rest.VMS, "restart-1", {"spec": {"runStrategy": "Always"}}, "prod")
    new = wait_for(lambda: (v := kube.get(rest.VMIS, "restart-1", "prod")) and
                   v.get("status", {}).get("phase") == "Running" and v)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    node = new["status"]["nodeName"]
    assert node and node != "casc-1"
    assert kube.get(rest.NODES, node).get("spec", {}).get("unschedulable") is not True
    pods = wait_for(lambda: launchers(kube, new))
    assert [p["spec"]["nodeName"] for p in pods] == [node]
    vm = wait_for(lambda: (o := kube.get(rest.VMS, "restart-1", "prod")) and
                  o["status"].get("ready") is True and o)
    assert vm["status"]["printableStatus"] == "Running"


def _running_vmi(kube: rest.KubeClient, name: str) -> dict[str, Any] | None:
    v = kube.get(rest.VMIS, name, "rs")
    return v if v and (v.get("status") or {}).get("phase") == "Running" else None


def _vm_conditions(kube: rest.KubeClient, name: str) -> set[str]:
    vm = kube.get(rest.VMS, name, "rs")
    return {c["type"] for c in (vm.get("status") or {}).get("conditions") or []}


def test_each_run_strategy_starts_a_stopped_vm_as_kubevirt_does(kube) -> None:
    """vm.go syncRunStrategy: with no VMI, Always and Once start one, RerunOnFailure starts
    one when it has just been switched to (its status still shows Halted), Manual never by
    itself; a strategy changed while the VMI runs stops nothing."""
    names = {"rs-manual": "Manual", "rs-rerun": "RerunOnFailure", "rs-once": "Once"}
    for name in names:
        kube.patch(rest.VMS, name, {"spec": {"runStrategy": "Halted"}}, "rs")
    for name in names:
        wait_for(lambda n=name: kube.get(rest.VMIS, n, "rs") is None)
        wait_for(lambda n=name: (kube.get(rest.VMS, n, "rs").get("status") or {}).get(
            "runStrategy") == "Halted")
    for name, strategy in names.items():
        kube.patch(rest.VMS, name, {"spec": {"runStrategy": strategy}}, "rs")
    wait_for(lambda: _running_vmi(kube, "rs-rerun") and _running_vmi(kube, "rs-once"))
    time.sleep(1)  # 50 s of cluster time
    assert kube.get(rest.VMIS, "rs-manual", "rs") is None
    assert (kube.get(rest.VMS, "rs-manual", "rs")["status"] or {}).get(
        "runStrategy") == "Manual"
    kube.patch(rest.VMS, "rs-manual", {"spec": {"runStrategy": "Always"}}, "rs")
    started = wait_for(lambda: _running_vmi(kube, "rs-manual"))
    for name in names:
        kube.patch(rest.VMS, name, {"spec": {"runStrategy": "Manual"}}, "rs")
    time.sleep(1)
    assert kube.get(rest.VMIS, "rs-manual", "rs")["metadata"]["uid"] == \
        started["metadata"]["uid"]
    assert all(_running_vmi(kube, n) for n in names)


def test_a_started_vm_follows_its_templates_node_selector(kube) -> None:
    """startVMI (SetupVMIFromVM): the VMI gets the template's nodeSelector and its launcher
    pod that and KubeVirt's; where no node matches, the pod stays Pending (PodScheduled False,
    Unschedulable, the scheduler's counts) and the VMI Scheduling with the condition copied,
    until a node matches. vmRolloutStrategy LiveUpdate (the default): a template change
    reaches the running VMI, no restart, no migration; Stage: RestartRequired instead."""
    kube.patch(rest.VMS, "pin-1", {"spec": {"runStrategy": "Halted"}}, "rs")
    wait_for(lambda: kube.get(rest.VMIS, "pin-1", "rs") is None)
    kube.patch(rest.VMS, "pin-1", {"spec": {"runStrategy": "Always", "template": {"spec": {
        "nodeSelector": {"pin": "yes"}}}}}, "rs")
    pending = wait_for(lambda: (v := kube.get(rest.VMIS, "pin-1", "rs")) and
                       (v.get("status") or {}).get("phase") == "Scheduling" and v)
    assert pending["spec"]["nodeSelector"] == {"pin": "yes"}
    cond = next(c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (cond["status"], cond["reason"]) == ("False", "Unschedulable")
    assert "didn't match Pod's node affinity/selector" in cond["message"], cond
    assert cond["message"].startswith("0/")
    [pod] = launchers(kube, pending)
    assert not pod["spec"].get("nodeName") and pod["spec"]["nodeSelector"]["pin"] == "yes"
    kube.patch(rest.NODES, "sky-3", {"metadata": {"labels": {"pin": "yes"}}})
    running = wait_for(lambda: _running_vmi(kube, "pin-1"))
    assert running["status"]["nodeName"] == "sky-3"
    assert running["metadata"]["uid"] == pending["metadata"]["uid"]
    assert [p["spec"]["nodeName"] for p in launchers(kube, running)] == ["sky-3"]

    kube.patch(rest.VMS, "pin-1", {"spec": {"template": {"spec": {"nodeSelector": None}}}},
               "rs")
    wait_for(lambda: not kube.get(rest.VMIS, "pin-1", "rs")["spec"].get("nodeSelector"))
    time.sleep(0.5)
    assert "RestartRequired" not in _vm_conditions(kube, "pin-1")
    assert kube.get(rest.VMIS, "pin-1", "rs")["metadata"]["uid"] == running["metadata"]["uid"]
    assert kube.items(rest.VMIMS, "rs") == []

    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {
        "vmRolloutStrategy": "Stage"}}}, "kubevirt")
    try:
        time.sleep(0.5)  # the simulator's cache has the CR
        kube.patch(rest.VMS, "pin-1", {"spec": {"template": {"spec": {
            "nodeSelector": {"pin": "yes"}}}}}, "rs")
        wait_for(lambda: "RestartRequired" in _vm_conditions(kube, "pin-1"))
        assert not kube.get(rest.VMIS, "pin-1", "rs")["spec"].get("nodeSelector")
        kube.patch(rest.VMS, "pin-1", {"spec": {"template": {"spec": {"nodeSelector": None}}}},
                   "rs")
        wait_for(lambda: "RestartRequired" not in _vm_conditions(kube, "pin-1"))
    finally:
        kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {
            "vmRolloutStrategy": None}}}, "kubevirt")
        kube.patch(rest.NODES, "sky-3", {"metadata": {"labels": {"pin": None}}})
