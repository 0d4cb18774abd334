"""KubeVirt's admission, through the real API server: the simulator serves virt-api's webhooks
and acts as KubeVirt's own ServiceAccounts, so a normal user (the admin kubeconfig) and
KubeVirt's virt-controller get KubeVirt's answers. Each test names the KubeVirt file and
function (read at v1.7.4, v1.8.4, v1.9.0) its rule comes from.

Two clusters: KubeVirt 1.9 (the default) for most rules, and 1.8 for the rules that differ.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import wait_for

from conftest import _serve_cluster
from virtshift.k8s import rest
from virtshift.k8s.rest import ApiError, KubeClient
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

CONTROLLER = "system:serviceaccount:kubevirt:kubevirt-controller"
PRIORITY_REFUSED = ('admission webhook "migration-create-validator.kubevirt.io" denied the '
                    "request: Migration priority queue, only virt-controller is allowed to set "
                    "priority field")
GATE_REFUSED = ('admission webhook "migration-create-validator.kubevirt.io" denied the request: '
                "MigrationPriorityQueue feature gate is not enabled in kubevirt resource")

SCENARIO = """
seed: 9
timeScale: 40
kubevirt: {version: "%s", parallelMigrationsPerCluster: 10, parallelOutboundMigrationsPerNode: 5}
network: {nodeBandwidth: 1Gi, targetPodStartup: 10s}
nodes:
  - generate: {count: 3, prefix: node-, start: 1, allocatable: {cpu: "64", memory: 1Ti}}
vms:
  - {name: small-1, namespace: prod, node: node-1, memory: 1Gi}
  - {name: small-2, namespace: prod, node: node-1, memory: 1Gi}
  - {name: big, namespace: prod, node: node-1, memory: 256Gi}
  - {name: evict-live, namespace: prod, node: node-2, memory: 1Gi}
  - {name: evict-dry, namespace: prod, node: node-2, memory: 1Gi}
  - {name: evict-target, namespace: prod, node: node-2, memory: 1Gi}
  - {name: evict-gpu, namespace: prod, node: node-2, memory: 1Gi, liveMigratable: false,
     notMigratableReason: HostDeviceNotLiveMigratable}
  - {name: evict-maybe, namespace: prod, node: node-2, memory: 1Gi, liveMigratable: false,
     evictionStrategy: LiveMigrateIfPossible}
  - {name: evict-ext, namespace: prod, node: node-2, memory: 1Gi, evictionStrategy: External}
  - {name: evict-none, namespace: prod, node: node-2, memory: 1Gi, evictionStrategy: None}
"""


def start(kube: KubeClient, version: str) -> runner.Simulator:
    return runner.start(kube, load_scenario(SCENARIO % version), log=lambda _m: None)


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    simulator = start(fresh_cluster.kube, "1.9")
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def kube(sim, fresh_cluster) -> KubeClient:
    return fresh_cluster.kube


@pytest.fixture(scope="module")
def cluster_18(control_plane_binaries, tmp_path_factory) -> Iterator[Any]:
    yield from _serve_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def sim_18(cluster_18) -> Iterator[runner.Simulator]:
    simulator = start(cluster_18.kube, "1.8")
    yield simulator
    simulator.stop()


def vmim(name: str, vmi: str, labels: dict[str, str] | None = None, **spec: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": "prod"}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": meta, "spec": {"vmiName": vmi, **spec}}


def refused(call: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call()
    return err.value


def phase(kube: KubeClient, name: str) -> str | None:
    obj = kube.get(rest.VMIMS, name, "prod")
    return obj and (obj.get("status") or {}).get("phase")


def final(kube: KubeClient, name: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (o := kube.get(rest.VMIMS, name, "prod")) and
                    (o.get("status") or {}).get("phase") in ("Succeeded", "Failed") and o,
                    timeout=timeout, what=f"{name} final")


def launcher(kube: KubeClient, vmi: str) -> dict:
    uid = kube.get(rest.VMIS, vmi, "prod")["metadata"]["uid"]
    [pod] = kube.items(rest.PODS, "prod",
                       label_selector=f"kubevirt.io=virt-launcher,kubevirt.io/created-by={uid}")
    return pod


def evict(kube: KubeClient, pod: str, dry_run: bool = False, **body: Any) -> dict:
    return kube.create(rest.PODS, {"apiVersion": "policy/v1", "kind": "Eviction",
                                   "metadata": {"name": pod, "namespace": "prod"}, **body},
                       namespace="prod", name=pod, subresource="eviction", dry_run=dry_run)


def evacuations(kube: KubeClient, vmi: str) -> list[dict]:
    return [m for m in kube.items(rest.VMIMS, "prod") if m["spec"]["vmiName"] == vmi
            and m["metadata"]["name"].startswith("kubevirt-evacuation-")]


# -- who the simulator is, and how KubeVirt's webhooks are registered ---------------------------


def test_the_simulator_acts_as_kubevirts_service_accounts(sim) -> None:
    """The simulator writes as virt-controller (pkg/virt-api/webhooks/serviceaccounts.go:
    KubeVirtServiceAccounts names the accounts KubeVirt's admitters trust)."""
    ids = sim.identities
    for client, user in ((ids.controller, CONTROLLER),
                         (ids.api, "system:serviceaccount:kubevirt:kubevirt-apiserver"),
                         (ids.handler, "system:serviceaccount:kubevirt:kubevirt-handler")):
        review = client.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                {"apiVersion": "authentication.k8s.io/v1",
                                 "kind": "SelfSubjectReview"})
        assert review["status"]["userInfo"]["username"] == user
    assert sim.kubevirt.kube is sim.identities.controller


def test_webhooks_are_registered_as_kubevirt_registers_them(kube) -> None:
    """pkg/virt-operator/resource/generate/components/webhooks.go:
    NewVirtAPIValidatingWebhookConfiguration and NewVirtAPIMutatingWebhookConfiguration."""
    validating = kube.get(rest.WEBHOOKS, "virt-api-validator")
    mutating = kube.get(rest.MUTATING_WEBHOOKS, "virt-api-mutator")
    paths = {w["name"]: w["clientConfig"]["url"].split("/", 3)[3]
             for w in validating["webhooks"] + mutating["webhooks"]}
    assert paths == {
        "virt-launcher-eviction-interceptor.kubevirt.io": "pod-eviction-validate",
        "hotplug-pod-eviction-interceptor.kubevirt.io": "pod-eviction-validate",
        "virtualmachineinstances-update-validator.kubevirt.io":
            "virtualmachineinstances-validate-update",
        "virtualmachine-validator.kubevirt.io": "virtualmachines-validate",
        "migration-create-validator.kubevirt.io": "migration-validate-create",
        "migration-update-validator.kubevirt.io": "migration-validate-update",
        "migration-policy-validator.kubevirt.io": "migration-policy-validate-create",
        "migrations-mutator.kubevirt.io": "migration-mutate-create",
    }
    for hook in validating["webhooks"] + mutating["webhooks"]:
        assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 10)
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
    kv = kube.get(rest.KUBEVIRTS, "kubevirt", "kubevirt")
    assert kv["status"]["observedKubeVirtVersion"] == "v1.9.0"
    assert kv["spec"]["configuration"]["developerConfiguration"]["featureGates"] == []


# -- VMIM create: migration-create-admitter.go, migration-create-mutator.go ---------------------


def test_a_normal_user_may_not_set_priority(kube) -> None:
    """migration-create-admitter.go: (*MigrationCreateAdmitter).Admit with
    hasRequestOriginatedFromVirtController."""
    err = refused(lambda: kube.create(rest.VMIMS, vmim("prio-admin", "small-1",
                                                       priority="system-critical")))
    assert err.status == 422 and err.message == PRIORITY_REFUSED
    causes = json.loads(err.body)["details"]["causes"]
    assert causes == [{"reason": "FieldValueForbidden", "field": "spec.migrationPriority",
                       "message": PRIORITY_REFUSED.split("request: ")[1]}]
    assert kube.get(rest.VMIMS, "prio-admin", "prod") is None


def test_virt_controller_may_set_priority_on_1_9(sim, kube) -> None:
    """migration-create-admitter.go: the MigrationPriorityQueue gate check is gone in v1.9.0
    (the gate is GA); hasRequestOriginatedFromVirtController accepts kubevirt-controller."""
    created = sim.identities.controller.create(rest.VMIMS, vmim(
        "prio-controller", "small-1", priority="system-critical"))
    assert created["spec"]["priority"] == "system-critical"
    # migration-create-mutator.go: (*MigrationCreateMutator).Mutate labelled and finalized it.
    assert created["metadata"]["labels"] == {"kubevirt.io/vmi-name": "small-1"}
    assert created["metadata"]["finalizers"] == ["kubevirt.io/migrationJobFinalize"]
    assert final(kube, "prio-controller")["status"]["phase"] == "Succeeded"


def test_a_second_migration_of_a_vmi_is_refused_while_one_is_in_flight(kube) -> None:
    """migration-create-admitter.go: ensureNoMigrationConflict (a live LIST by the label
    kubevirt.io/vmi-name that the mutator added)."""
    first = kube.create(rest.VMIMS, vmim("big-a", "big"))
    wait_for(lambda: phase(kube, "big-a") == "Running", timeout=30, what="big-a running")
    err = refused(lambda: kube.create(rest.VMIMS, vmim("big-b", "big")))
    assert err.status == 400
    assert err.message == (
        'admission webhook "migration-create-validator.kubevirt.io" denied the request: '
        f"in-flight migration detected. Active migration job ({first['metadata']['uid']}) is "
        "currently already in progress for VMI big.")
    kube.delete(rest.VMIMS, "big-a", "prod")  # abort; once it is gone, a new one is admitted
    wait_for(lambda: kube.get(rest.VMIMS, "big-a", "prod") is None, timeout=30,
             what="big-a aborted")
    kube.create(rest.VMIMS, vmim("big-c", "big"))
    kube.delete(rest.VMIMS, "big-c", "prod")
    wait_for(lambda: kube.get(rest.VMIMS, "big-c", "prod") is None, timeout=30,
             what="big-c aborted")


@pytest.mark.parametrize(("vmi", "code", "message"), [
    ("nope", 400, 'the VMI "prod/nope" does not exist'),
    ("evict-gpu", 400, "Cannot migrate VMI, Reason: HostDeviceNotLiveMigratable, Message: VMI "
     "uses a feature that prevents live migration (HostDeviceNotLiveMigratable)"),
    ("", 422, "vmiName is missing"),
])
def test_migrations_kubevirt_refuses(kube, vmi: str, code: int, message: str) -> None:
    """migration-create-admitter.go: ValidateVirtualMachineInstanceMigrationSpec, the live GET
    of the VMI, isMigratable."""
    err = refused(lambda: kube.create(rest.VMIMS, vmim(f"bad-{vmi or 'none'}", vmi)))
    assert err.status == code
    assert err.message == ('admission webhook "migration-create-validator.kubevirt.io" denied '
                           f"the request: {message}")


# -- VMIM update: migration-update-admitter.go ----------------------------------------------------


def test_an_in_flight_migration_keeps_its_spec_and_selector_label(kube) -> None:
    """migration-update-admitter.go: (*MigrationUpdateAdmitter).Admit and
    ensureSelectorLabelSafe."""
    kube.create(rest.VMIMS, vmim("big-upd", "big", labels={"team": "a"}))
    wait_for(lambda: phase(kube, "big-upd") == "Running", timeout=30, what="big-upd running")
    prefix = 'admission webhook "migration-update-validator.kubevirt.io" denied the request: '
    err = refused(lambda: kube.patch(rest.VMIMS, "big-upd", {"spec": {"addedNodeSelector": {
        "kubernetes.io/hostname": "node-3"}}}, "prod"))
    assert (err.status, err.message) == (422, prefix + "update of Migration object's spec is "
                                         "restricted")
    err = refused(lambda: kube.patch(rest.VMIMS, "big-upd", {"metadata": {"labels": {
        "kubevirt.io/vmi-name": None}}}, "prod"))
    assert (err.status, err.message) == (422, prefix + "selector label can't be modified on an "
                                         "in-flight migration")
    kube.patch(rest.VMIMS, "big-upd", {"metadata": {"labels": {"team": "b"}}}, "prod")  # fine
    kube.delete(rest.VMIMS, "big-upd", "prod")
    wait_for(lambda: kube.get(rest.VMIMS, "big-upd", "prod") is None, timeout=30,
             what="big-upd aborted")


# -- pods/eviction: pod-eviction-admitter.go ------------------------------------------------------

EVICTION = 'admission webhook "virt-launcher-eviction-interceptor.kubevirt.io" denied the request: '


def test_evicting_a_live_migrate_vm_marks_it_and_kubevirt_evacuates_it(kube) -> None:
    """pod-eviction-admitter.go: admitLauncherPod and markVMI (JSON patch of
    /status/evacuationNodeName); the eviction is refused with 429 either way."""
    pod = launcher(kube, "evict-live")["metadata"]["name"]
    err = refused(lambda: evict(kube, pod))
    assert (err.status, err.message) == (429, EVICTION + 'Eviction triggered evacuation of VMI '
                                         '"prod/evict-live"')
    assert kube.get(rest.VMIS, "evict-live", "prod")["status"]["evacuationNodeName"] == "node-2"
    again = refused(lambda: evict(kube, pod))
    assert (again.status, again.message) == (
        429, EVICTION + 'Evacuation in progress: Eviction triggered evacuation of VMI '
        '"prod/evict-live"')
    [migration] = wait_for(lambda: evacuations(kube, "evict-live"), timeout=30,
                           what="evacuation VMIM")
    # Only virt-controller may set a priority: the simulator created it as kubevirt-controller.
    assert migration["spec"]["priority"] == "system-critical"
    assert final(kube, migration["metadata"]["name"])["status"]["phase"] == "Succeeded"
    vmi = kube.get(rest.VMIS, "evict-live", "prod")
    assert vmi["status"]["nodeName"] != "node-2" and not vmi["status"].get("evacuationNodeName")


def test_a_dry_run_eviction_answers_the_same_and_marks_nothing(kube) -> None:
    """pod-eviction-admitter.go: isDryRun (request dryRun or deleteOptions.dryRun: [All])."""
    pod = launcher(kube, "evict-dry")["metadata"]["name"]
    for call in (lambda: evict(kube, pod, dry_run=True),
                 lambda: evict(kube, pod, deleteOptions={"dryRun": ["All"]})):
        err = refused(call)
        assert (err.status, err.message) == (
            429, EVICTION + 'Eviction triggered evacuation of VMI "prod/evict-dry"')
    time.sleep(0.5)
    assert not kube.get(rest.VMIS, "evict-dry", "prod")["status"].get("evacuationNodeName")
    assert evacuations(kube, "evict-dry") == []


def test_a_migration_target_pod_is_not_evicted(kube) -> None:
    """pod-eviction-admitter.go: admitLauncherPod tells a target pod by its node only."""
    source = launcher(kube, "evict-target")
    target = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "virt-launcher-evict-target-target", "namespace": "prod",
        "labels": {"kubevirt.io": "virt-launcher"},
        "annotations": {"kubevirt.io/domain": "evict-target"}},
        "spec": {"nodeName": "node-3", "containers": source["spec"]["containers"]}}
    kube.create(rest.PODS, target)
    err = refused(lambda: evict(kube, target["metadata"]["name"]))
    assert (err.status, err.message) == (429, EVICTION + "Eviction request for target Pod")
    assert not kube.get(rest.VMIS, "evict-target", "prod")["status"].get("evacuationNodeName")


def test_a_non_migratable_live_migrate_vm_blocks_its_eviction(kube) -> None:
    """pod-eviction-admitter.go: admitLauncherPod, EvictionStrategyLiveMigrate with
    !vmi.IsMigratable()."""
    err = refused(lambda: evict(kube, launcher(kube, "evict-gpu")["metadata"]["name"]))
    assert (err.status, err.message) == (
        429, EVICTION + "VMI evict-gpu is configured with an eviction strategy but is not "
        "live-migratable")
    assert not kube.get(rest.VMIS, "evict-gpu", "prod")["status"].get("evacuationNodeName")


def test_external_strategy_marks_but_kubevirt_does_not_migrate(kube) -> None:
    """pod-eviction-admitter.go: EvictionStrategyExternal always marks;
    pkg/util/migrations/migrations.go: VMIMigratableOnEviction leaves it to someone else."""
    err = refused(lambda: evict(kube, launcher(kube, "evict-ext")["metadata"]["name"]))
    assert (err.status, err.message) == (
        429, EVICTION + 'Eviction triggered evacuation of VMI "prod/evict-ext"')
    assert kube.get(rest.VMIS, "evict-ext", "prod")["status"]["evacuationNodeName"] == "node-2"
    time.sleep(0.5)  # 20 simulated seconds
    assert evacuations(kube, "evict-ext") == []


@pytest.mark.parametrize("vmi", ["evict-maybe", "evict-none"])
def test_these_launcher_pods_are_simply_evicted(kube, vmi: str) -> None:
    """pod-eviction-admitter.go: LiveMigrateIfPossible of a non-migratable VMI, and None, let
    the eviction through."""
    pod = launcher(kube, vmi)["metadata"]["name"]
    evict(kube, pod)
    wait_for(lambda: (p := kube.get(rest.PODS, pod, "prod")) is None or
             p["metadata"].get("deletionTimestamp"), timeout=10, what=f"{pod} evicted")
    assert not kube.get(rest.VMIS, vmi, "prod")["status"].get("evacuationNodeName")


# -- VMs, VMIs, MigrationPolicies ---------------------------------------------------------------


def test_vm_run_strategy_and_data_volume_templates(kube) -> None:
    """vms-admitter.go: (*VMsAdmitter).Admit, validateRunStrategy; pkg/storage/admitters/
    data-volume-template.go: ValidateDataVolumeTemplate."""
    prefix = 'admission webhook "virtualmachine-validator.kubevirt.io" denied the request: '
    err = refused(lambda: kube.patch(rest.VMS, "small-2", {"spec": {"running": True}}, "prod"))
    assert (err.status, err.message) == (
        422, prefix + "Running and RunStrategy are mutually exclusive. Note that Running is "
        "deprecated, please use RunStrategy instead")
    err = refused(lambda: kube.patch(rest.VMS, "small-2", {"spec": {"runStrategy": None}},
                                     "prod"))
    assert (err.status, err.message) == (422, prefix + "RunStrategy must be specified")
    err = refused(lambda: kube.patch(rest.VMS, "small-2", {"spec": {"dataVolumeTemplates": [{
        "metadata": {"name": "small-2-old"},
        "spec": {"storage": {"resources": {"requests": {"storage": "1Gi"}}},
                 "source": {"blank": {}}}}]}}, "prod"))
    assert (err.status, err.message) == (
        422, prefix + "DataVolumeTemplate entry spec.dataVolumeTemplate[0] must be referenced "
        "in the VMI template's 'volumes' list")
    vm = kube.get(rest.VMS, "small-2", "prod")
    copy = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "never", "namespace": "prod"},
            "spec": {**vm["spec"], "runStrategy": "Sometimes"}}
    err = refused(lambda: kube.create(rest.VMS, copy))
    assert (err.status, err.message) == (422, prefix + "Invalid RunStrategy (Sometimes)")
    kube.patch(rest.VMS, "small-2", {"spec": {"runStrategy": "Always"}}, "prod")  # admitted


def test_only_kubevirt_changes_a_vmi_spec_or_its_reserved_labels(sim, kube) -> None:
    """vmi-update-admitter.go: (*VMIUpdateAdmitter).Admit and admitVMILabelsUpdate: the
    operator's labels (virtshift.io/policy) pass, KubeVirt's own do not."""
    prefix = ('admission webhook "virtualmachineinstances-update-validator.kubevirt.io" denied '
              "the request: ")
    kube.patch(rest.VMIS, "small-2", {"metadata": {"labels": {"virtshift.io/policy": "gold"}}},
               "prod")
    err = refused(lambda: kube.patch(rest.VMIS, "small-2", {"metadata": {"labels": {
        "kubevirt.io/nodeName": "node-3"}}}, "prod"))
    assert (err.status, err.message) == (
        422, prefix + "modification of the following reserved kubevirt.io/ labels on a VMI "
        "object is prohibited")
    err = refused(lambda: kube.patch(rest.VMIS, "small-2", {"spec": {
        "evictionStrategy": "None"}}, "prod"))
    assert (err.status, err.message) == (422, prefix + "update of VMI object is restricted")
    sim.identities.controller.patch(rest.VMIS, "small-2", {"metadata": {"labels": {
        "kubevirt.io/nodeName": "node-1"}}}, "prod")  # KubeVirt's own account may


def test_migration_policies(kube) -> None:
    """migrationpolicy-admitter.go: (*MigrationPolicyAdmitter).Admit (v1.9.0)."""
    prefix = 'admission webhook "migration-policy-validator.kubevirt.io" denied the request: '

    def policy(name: str, **spec: Any) -> dict:
        return {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
                "metadata": {"name": name}, "spec": {**spec, "selectors": {}}}

    err = refused(lambda: kube.create(rest.KUBEVIRT_POLICIES, policy("neg",
                                                                     bandwidthPerMigration="-1Mi")))
    assert (err.status, err.message) == (422, prefix + "must not be negative")
    assert json.loads(err.body)["details"]["causes"][0]["field"] == "spec.bandwidthPerMigration"
    err = refused(lambda: kube.create(rest.KUBEVIRT_POLICIES, policy("dt", maxDowntimeMs=300)))
    assert (err.status, err.message) == (
        422, prefix + "maxDowntimeMs cannot be modified without enabling the "
        "MigrationStallDetection feature gate")
    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationStallDetection"]}}}}, "kubevirt")
    wait_for(lambda: _created(kube, policy("dt", maxDowntimeMs=300)), timeout=10,
             what="admitted once the gate is on")
    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"developerConfiguration": {
        "featureGates": []}}}}, "kubevirt")
    kube.delete(rest.KUBEVIRT_POLICIES, "dt")


def _created(kube: KubeClient, body: dict) -> bool:
    try:
        kube.create(rest.KUBEVIRT_POLICIES, body)
    except ApiError as exc:
        if exc.status != 422:
            raise
        return False
    return True


# -- KubeVirt 1.8: the MigrationPriorityQueue gate -------------------------------------------------


def test_on_1_8_priority_needs_the_gate_even_for_virt_controller(sim_18, cluster_18) -> None:
    """migration-create-admitter.go (v1.8.4): MigrationPriorityQueueEnabled is checked before
    the user; the gate is Beta but must be listed."""
    kube, controller = cluster_18.kube, sim_18.identities.controller
    assert kube.get(rest.KUBEVIRTS, "kubevirt", "kubevirt")["status"][
        "observedKubeVirtVersion"] == "v1.8.4"
    for client in (kube, controller):
        err = refused(lambda c=client: c.create(rest.VMIMS, vmim("prio", "small-1",
                                                                 priority="system-critical")))
        assert (err.status, err.message) == (422, GATE_REFUSED)

    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"developerConfiguration": {
        "featureGates": ["MigrationPriorityQueue"]}}}}, "kubevirt")
    created = wait_for(lambda: _created_vmim(controller, vmim("prio", "small-1",
                                                               priority="system-critical")),
                       timeout=10, what="admitted once the gate is on")
    assert created["spec"]["priority"] == "system-critical"
    err = refused(lambda: kube.create(rest.VMIMS, vmim("prio-admin", "small-2",
                                                       priority="system-critical")))
    assert (err.status, err.message) == (422, PRIORITY_REFUSED)


def test_on_1_8_without_the_gate_evacuations_carry_no_priority(sim_18, cluster_18) -> None:
    """KubeVirt's evacuation controller (evacuation.go: GenerateNewMigration) sets a priority
    before v1.9 only with the gate, read live from the KubeVirt CR (the test above turned it
    on)."""
    kube = cluster_18.kube
    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"developerConfiguration": {
        "featureGates": []}}}}, "kubevirt")
    wait_for(lambda: not sim_18.kubevirt.priority_queue, timeout=10, what="gate off")
    err = refused(lambda: evict(kube, launcher(kube, "evict-live")["metadata"]["name"]))
    assert err.status == 429
    [migration] = wait_for(lambda: evacuations(kube, "evict-live"), timeout=30,
                           what="evacuation VMIM")
    assert "priority" not in migration["spec"]


def test_stopping_the_simulator_removes_the_webhooks(sim_18, cluster_18) -> None:
    kube = cluster_18.kube
    sim_18.stop()
    assert kube.get(rest.WEBHOOKS, "virt-api-validator") is None
    assert kube.get(rest.MUTATING_WEBHOOKS, "virt-api-mutator") is None
    # Nothing intercepts any more: a priority is stored as given.
    kube.create(rest.VMIMS, vmim("after", "small-2", priority="user-triggered"))


def _created_vmim(client: KubeClient, body: dict) -> dict | None:
    try:
        return client.create(rest.VMIMS, body)
    except ApiError as exc:
        if exc.status != 422:
            raise
        return None
