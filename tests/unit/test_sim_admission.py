"""virt-api's admitters as the simulator decides them (virtshift.sim.admission), table-driven.

Each table names the KubeVirt file and function its rules come from; the messages, codes and
causes are KubeVirt's (read at v1.7.4, v1.8.4 and v1.9.0).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from virtshift.sim import admission as adm
from virtshift.sim.admission import ClusterConfig

JSON = dict[str, Any]
ADMIN = "virtshift-admin"
CONTROLLER = "system:serviceaccount:kubevirt:kubevirt-controller"
HANDLER = "system:serviceaccount:kubevirt:kubevirt-handler"
API = "system:serviceaccount:kubevirt:kubevirt-apiserver"
V19, V18, V17 = ClusterConfig("1.9"), ClusterConfig("1.8"), ClusterConfig("1.7")
PQ = "MigrationPriorityQueue"
GVR = {
    "vmim": {"group": "kubevirt.io", "version": "v1",
             "resource": "virtualmachineinstancemigrations"},
    "vm": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachines"},
    "vmi": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachineinstances"},
    "pod": {"group": "", "version": "v1", "resource": "pods"},
    "policy": {"group": "migrations.kubevirt.io", "version": "v1alpha1",
               "resource": "migrationpolicies"},
}
IN_FLIGHT = ('in-flight migration detected. Active migration job (uid-other) is currently '
             'already in progress for VMI db-1.')
PRIORITY_MESSAGE = ("Migration priority queue, only virt-controller is allowed to set priority "
                    "field")
GATE_MESSAGE = "MigrationPriorityQueue feature gate is not enabled in kubevirt resource"


def gated(config: ClusterConfig, *gates: str, **changes: Any) -> ClusterConfig:
    return ClusterConfig(**{**config.__dict__, "feature_gates": gates, **changes})


def review(kind: str, obj: JSON | None, old: JSON | None = None, user: str = ADMIN,
           operation: str = "CREATE", namespace: str = "prod", name: str = "",
           dry_run: bool = False) -> JSON:
    req: JSON = {"uid": "r-1", "resource": GVR[kind], "operation": operation,
                 "namespace": namespace, "name": name, "userInfo": {"username": user},
                 "object": obj, "dryRun": dry_run}
    if old is not None:
        req["oldObject"] = old
    return req


def vmi(name: str = "db-1", phase: str = "Running", node: str = "node-1",
        live: str | None = "True", reason: str = "", message: str = "",
        strategy: str | None = "LiveMigrate", evacuation: str | None = None,
        annotations: dict[str, str] | None = None) -> JSON:
    status: JSON = {"phase": phase, "nodeName": node, "conditions": []}
    if live is not None:
        status["conditions"].append({"type": "LiveMigratable", "status": live,
                                     "reason": reason, "message": message})
    if evacuation:
        status["evacuationNodeName"] = evacuation
    meta: JSON = {"name": name, "namespace": "prod"}
    if annotations is not None:
        meta["annotations"] = annotations
    spec = {"evictionStrategy": strategy} if strategy is not None else {}
    return {"metadata": meta, "spec": spec, "status": status}


def vmim(name: str = "move", vmi_name: str = "db-1", phase: str | None = None,
         uid: str = "uid-other", labels: dict[str, str] | None = None, **spec: Any) -> JSON:
    meta: JSON = {"name": name, "namespace": "prod", "uid": uid}
    if labels is not None:
        meta["labels"] = labels
    obj: JSON = {"metadata": meta, "spec": {"vmiName": vmi_name, **spec}}
    if phase is not None:
        obj["status"] = {"phase": phase}
    return obj


def refused(response: JSON, code: int, message: str, causes: list[JSON] | None = None) -> None:
    assert response["allowed"] is False, response
    assert response["status"]["code"] == code, response
    assert response["status"]["message"] == message, response
    if code == 422:
        assert response["status"]["reason"] == "Invalid"
        assert response["status"]["details"]["causes"] == causes
    else:
        assert "details" not in response["status"] and "reason" not in response["status"]


def cause(reason: str, message: str, field: str | None = None) -> JSON:
    out = {"reason": reason, "message": message}
    if field:
        out["field"] = field
    return out


# -- migration-create-mutator.go: (*MigrationCreateMutator).Mutate ---------------------------------


def test_mutator_adds_the_selector_label_and_the_finalizer_as_a_json_patch() -> None:
    """migration-create-mutator.go: addMigrationSelectorLabel, addMigrationFinalizer."""
    obj = vmim(labels={"team": "a"})
    obj["metadata"]["finalizers"] = ["example.com/keep"]
    response = adm.mutate_migration_create(review("vmim", obj))
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    [op] = response["patch"]
    assert (op["op"], op["path"]) == ("replace", "/metadata")
    assert op["value"]["labels"] == {"team": "a", "kubevirt.io/vmi-name": "db-1"}
    assert op["value"]["finalizers"] == ["example.com/keep", "kubevirt.io/migrationJobFinalize"]
    assert op["value"]["name"] == "move" and obj["metadata"]["labels"] == {"team": "a"}


def test_mutator_refuses_another_resource() -> None:
    refused(adm.mutate_migration_create(review("vm", vmim())), 400,
            "expect resource to be 'virtualmachineinstancemigrations'")


# -- migration-create-admitter.go: (*MigrationCreateAdmitter).Admit --------------------------------

RUNNING = vmi()
# (id, config, user, spec changes, the VMI (None: absent), other VMIMs of it, expected)
# expected: None = allowed; else (code, message, causes)
CREATE: list[tuple[str, ClusterConfig, str, JSON, JSON | None, list[JSON], Any]] = [
    ("plain", V19, ADMIN, {}, RUNNING, [], None),
    ("vmiName missing: ValidateVirtualMachineInstanceMigrationSpec", V19, ADMIN,
     {"vmiName": ""}, RUNNING, [],
     (422, "vmiName is missing", [cause("FieldValueRequired", "vmiName is missing",
                                        "spec.vmiName")])),
    ("priority from a normal user (1.9)", V19, ADMIN, {"priority": "system-critical"},
     RUNNING, [], (422, PRIORITY_MESSAGE, [cause("FieldValueForbidden", PRIORITY_MESSAGE,
                                                 "spec.migrationPriority")])),
    ("priority from virt-controller (1.9)", V19, CONTROLLER, {"priority": "system-critical"},
     RUNNING, [], None),
    ("priority from virt-handler: a KubeVirt account, not the controller", V19, HANDLER,
     {"priority": "user-triggered"}, RUNNING, [],
     (422, PRIORITY_MESSAGE, [cause("FieldValueForbidden", PRIORITY_MESSAGE,
                                    "spec.migrationPriority")])),
    ("priority from a kubevirt-controller of another namespace", V19,
     "system:serviceaccount:other:kubevirt-controller", {"priority": "system-critical"},
     RUNNING, [], (422, PRIORITY_MESSAGE, [cause("FieldValueForbidden", PRIORITY_MESSAGE,
                                                 "spec.migrationPriority")])),
    ("priority is checked before the VMI is looked up", V19, ADMIN,
     {"priority": "system-critical"}, None, [],
     (422, PRIORITY_MESSAGE, [cause("FieldValueForbidden", PRIORITY_MESSAGE,
                                    "spec.migrationPriority")])),
    ("1.8 without MigrationPriorityQueue refuses even virt-controller", V18, CONTROLLER,
     {"priority": "system-critical"}, RUNNING, [],
     (422, GATE_MESSAGE, [cause("FieldValueForbidden", GATE_MESSAGE, "spec.migrationPriority")])),
    ("1.7 checks the gate before the user", V17, ADMIN, {"priority": "system-critical"},
     RUNNING, [],
     (422, GATE_MESSAGE, [cause("FieldValueForbidden", GATE_MESSAGE, "spec.migrationPriority")])),
    ("1.8 with the gate accepts virt-controller", gated(V18, PQ), CONTROLLER,
     {"priority": "system-critical"}, RUNNING, [], None),
    ("1.8 with the gate still refuses a normal user", gated(V18, PQ), ADMIN,
     {"priority": "system-critical"}, RUNNING, [],
     (422, PRIORITY_MESSAGE, [cause("FieldValueForbidden", PRIORITY_MESSAGE,
                                    "spec.migrationPriority")])),
    ("VMI does not exist", V19, ADMIN, {}, None, [],
     (400, 'the VMI "prod/db-1" does not exist', None)),
    ("VMI final", V19, ADMIN, {}, vmi(phase="Succeeded"), [],
     (400, "Cannot migrate VMI in finalized state.", None)),
    ("no Running check: a Scheduling VMI passes", V19, ADMIN, {}, vmi(phase="Scheduling"), [],
     None),
    ("isMigratable: LiveMigratable=False", V19, ADMIN, {},
     vmi(live="False", reason="HostDeviceNotLiveMigratable", message="has a GPU"), [],
     (400, "Cannot migrate VMI, Reason: HostDeviceNotLiveMigratable, Message: has a GPU", None)),
    ("isMigratable: an Unknown condition passes", V19, ADMIN, {}, vmi(live="Unknown"), [],
     None),
    ("isMigratable: no condition passes", V19, ADMIN, {}, vmi(live=None), [], None),
    ("isMigratable: node-local disks block a plain migration", V19, ADMIN, {},
     vmi(live="False", reason="DisksNotLiveMigratable", message="not shared"), [],
     (400, "Cannot migrate VMI, Reason: DisksNotLiveMigratable, Message: not shared", None)),
    ("isMigratable: ... but not a decentralized one", gated(V19, "DecentralizedLiveMigration"),
     ADMIN, {"sendTo": {"migrationID": "m1", "connectURL": "x"}},
     vmi(live="False", reason="DisksNotLiveMigratable", message="not shared"), [], None),
    ("ensureNoMigrationConflict: one running", V19, ADMIN, {}, RUNNING,
     [vmim("old", phase="Running")], (400, IN_FLIGHT, None)),
    ("ensureNoMigrationConflict: one without a phase yet", V19, ADMIN, {}, RUNNING,
     [vmim("old")], (400, IN_FLIGHT, None)),
    ("ensureNoMigrationConflict: finished ones do not count", V19, ADMIN, {}, RUNNING,
     [vmim("a", phase="Succeeded"), vmim("b", phase="Failed")], None),
    ("decentralized without its gate", V19, ADMIN, {"receive": {"migrationID": "m1"}},
     RUNNING, [],
     (422, "DecentralizedLiveMigration feature gate is not enabled in kubevirt resource",
      [cause("FieldValueNotSupported",
             "DecentralizedLiveMigration feature gate is not enabled in kubevirt resource")])),
    ("decentralized with mismatched IDs", gated(V19, "DecentralizedLiveMigration"), ADMIN,
     {"receive": {"migrationID": "m1"}, "sendTo": {"migrationID": "m2", "connectURL": "x"}},
     RUNNING, [],
     (422, "sendTo migrationID m2 does not match receive migrationID m1",
      [cause("FieldValueInvalid", "sendTo migrationID m2 does not match receive migrationID m1")])),
]


@pytest.mark.parametrize(("config", "user", "spec", "the_vmi", "others", "expected"),
                         [c[1:] for c in CREATE], ids=[c[0] for c in CREATE])
def test_migration_create(config: ClusterConfig, user: str, spec: JSON, the_vmi: JSON | None,
                          others: list[JSON], expected: Any) -> None:
    """migration-create-admitter.go: (*MigrationCreateAdmitter).Admit."""
    listed: list[tuple[str, str]] = []

    def list_migrations(ns: str, name: str) -> list[JSON]:
        listed.append((ns, name))
        return others

    obj = vmim(**spec) if "vmiName" not in spec else vmim(vmi_name=spec.pop("vmiName"), **spec)
    response = adm.admit_migration_create(review("vmim", obj, user=user), config,
                                          lambda ns, n: copy.deepcopy(the_vmi), list_migrations)
    if expected is None:
        assert response == {"allowed": True}
        assert listed == [("prod", "db-1")]  # the live LIST, by the VMI's name
    else:
        refused(response, *expected)


def test_migration_create_lookup_errors_are_400() -> None:
    def broken(ns: str, name: str) -> Any:
        raise RuntimeError("etcdserver: request timed out")

    refused(adm.admit_migration_create(review("vmim", vmim()), V19, broken, lambda n, v: []),
            400, "etcdserver: request timed out")
    refused(adm.admit_migration_create(review("vmim", vmim()), V19, lambda n, v: RUNNING,
                                       broken), 400, "etcdserver: request timed out")


# -- migration-update-admitter.go: (*MigrationUpdateAdmitter).Admit, ensureSelectorLabelSafe -----

SELECTOR = {"kubevirt.io/vmi-name": "db-1"}
RESTRICTED_SPEC = "update of Migration object's spec is restricted"
REMOVED = "selector label can't be removed from an in-flight migration"
MODIFIED = "selector label can't be modified on an in-flight migration"
UPDATE = [
    ("annotations and other labels may change", vmim(labels=SELECTOR),
     vmim(labels={**SELECTOR, "x": "y"}), None),
    ("the spec is immutable", vmim(labels=SELECTOR),
     vmim(labels=SELECTOR, addedNodeSelector={"zone": "b"}), RESTRICTED_SPEC),
    ("an empty and an absent selector are the same spec", vmim(labels=SELECTOR),
     vmim(labels=SELECTOR, addedNodeSelector={}), None),
    ("all labels removed in flight", vmim(labels=SELECTOR), vmim(labels=None), REMOVED),
    ("the selector label removed in flight", vmim(labels={**SELECTOR, "x": "y"}),
     vmim(labels={"x": "y"}), MODIFIED),
    ("the selector label changed in flight", vmim(labels=SELECTOR),
     vmim(labels={"kubevirt.io/vmi-name": "other"}), MODIFIED),
    ("a finished migration's label may go", vmim(labels=SELECTOR),
     vmim(labels=None, phase="Succeeded"), None),
    ("a migration that never had labels", vmim(labels=None), vmim(labels={"x": "y"}), None),
]


@pytest.mark.parametrize(("old", "new", "message"), [u[1:] for u in UPDATE],
                         ids=[u[0] for u in UPDATE])
def test_migration_update(old: JSON, new: JSON, message: str | None) -> None:
    """migration-update-admitter.go: (*MigrationUpdateAdmitter).Admit."""
    response = adm.admit_migration_update(review("vmim", new, old, operation="UPDATE"))
    if message is None:
        assert response == {"allowed": True}
    else:
        refused(response, 422, message, [cause("FieldValueNotSupported", message)])


# -- pod-eviction-admitter.go: (*PodEvictionAdmitter).Admit -------------------------------------

LAUNCHER = {"metadata": {"name": "virt-launcher-db-1-abcde", "namespace": "prod",
                         "labels": {"kubevirt.io": "virt-launcher"},
                         "annotations": {"kubevirt.io/domain": "db-1"}},
            "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}}
EVICTED = 'Eviction triggered evacuation of VMI "prod/db-1"'
MARK = [{"op": "add", "path": "/status/evacuationNodeName", "value": "node-1"}]


def pod(**changes: Any) -> JSON:
    out = copy.deepcopy(LAUNCHER)
    for path, value in changes.items():
        where = out
        *parents, last = path.split("__")
        for key in parents:
            where = where.setdefault(key, {})
        if value is None:
            where.pop(last, None)
        else:
            where[last] = value
    return out


# (id, pod (None: absent), the VMI (None: absent), config, expected message (None: allowed),
#  the mark's patch (None: no mark), whether the evacuation controller migrates)
EVICTION: list[tuple[str, JSON | None, JSON | None, ClusterConfig, str | None, Any, bool]] = [
    ("the pod is gone", None, RUNNING, V19, None, None, False),
    ("not a launcher pod", pod(metadata__labels={"app": "web"}), RUNNING, V19, None, None,
     False),
    ("a completed launcher pod", pod(status__phase="Succeeded"), RUNNING, V19, None, None,
     False),
    ("a launcher pod without kubevirt.io/domain", pod(metadata__annotations=None), RUNNING, V19,
     None, None, False),
    ("the VMI is gone: denied, unlike a hotplug pod's", pod(), None, V19,
     'kubevirt failed getting the vmi: virtualmachineinstances.kubevirt.io "db-1" not found',
     None, False),
    ("LiveMigrate, migratable: marked", pod(), RUNNING, V19, EVICTED, MARK, True),
    ("LiveMigrate, not migratable: denied, not marked", pod(), vmi(live="False"), V19,
     "VMI db-1 is configured with an eviction strategy but is not live-migratable", None,
     False),
    ("LiveMigrateIfPossible, migratable: marked", pod(),
     vmi(strategy="LiveMigrateIfPossible"), V19, EVICTED, MARK, True),
    ("LiveMigrateIfPossible, not migratable: evicted", pod(),
     vmi(strategy="LiveMigrateIfPossible", live="False"), V19, None, None, False),
    ("External: marked even when not migratable, nobody migrates it", pod(),
     vmi(strategy="External", live="False"), V19, EVICTED, MARK, False),
    ("None: evicted", pod(), vmi(strategy="None"), V19, None, None, False),
    ("no VMI strategy, the cluster's default None", pod(), vmi(strategy=None), V19, None, None,
     False),
    ("no VMI strategy, the cluster says LiveMigrate", pod(), vmi(strategy=None),
     ClusterConfig(eviction_strategy="LiveMigrate"), EVICTED, MARK, True),
    ("no strategy anywhere", pod(), vmi(strategy=None), ClusterConfig(eviction_strategy=None),
     None, None, False),
    ("already marked", pod(), vmi(evacuation="node-1"), V19,
     "Evacuation in progress: " + EVICTED, None, False),
    ("a migration target pod (another node than the VMI's)", pod(spec__nodeName="node-2"),
     RUNNING, V19, "Eviction request for target Pod", None, False),
    ("a target pod of a marked VMI", pod(spec__nodeName="node-2"), vmi(evacuation="node-1"),
     V19, "Evacuation in progress: " + EVICTED, None, False),
]


@pytest.mark.parametrize(("the_pod", "the_vmi", "config", "message", "patch", "migrate"),
                         [e[1:] for e in EVICTION], ids=[e[0] for e in EVICTION])
def test_pod_eviction(the_pod: JSON | None, the_vmi: JSON | None, config: ClusterConfig,
                      message: str | None, patch: Any, migrate: bool) -> None:
    """pod-eviction-admitter.go: (*PodEvictionAdmitter).Admit and admitLauncherPod."""
    request = review("pod", {"apiVersion": "policy/v1", "kind": "Eviction",
                             "metadata": {"name": LAUNCHER["metadata"]["name"]}},
                     name=LAUNCHER["metadata"]["name"])
    decision = adm.admit_pod_eviction(request, config, lambda ns, n: copy.deepcopy(the_pod),
                                      lambda ns, n: copy.deepcopy(the_vmi))
    if message is None:
        assert decision.response == {"allowed": True} and decision.mark is None
        return
    refused(decision.response, 429, message)
    if patch is None:
        assert decision.mark is None
    else:
        assert decision.mark is not None
        assert decision.mark.patch == patch and decision.mark.vmi_key == "prod/db-1"
        assert (decision.mark.node, decision.mark.dry_run, decision.mark.migrate) == (
            "node-1", False, migrate)


def test_pod_lookup_errors_allow_the_eviction() -> None:
    def broken(ns: str, name: str) -> Any:
        raise RuntimeError("connection refused")

    decision = adm.admit_pod_eviction(review("pod", {}, name="virt-launcher-x"), V19, broken,
                                      broken)
    assert decision.response == {"allowed": True}


def test_vmi_lookup_errors_deny_the_eviction() -> None:
    def broken(ns: str, name: str) -> Any:
        raise RuntimeError("connection refused")

    decision = adm.admit_pod_eviction(review("pod", {}, name="virt-launcher-x"), V19,
                                      lambda ns, n: LAUNCHER, broken)
    refused(decision.response, 429, "kubevirt failed getting the vmi: connection refused")


@pytest.mark.parametrize(("request_dry_run", "options", "dry_run"), [
    (False, None, False),
    (True, None, True),
    (False, {"dryRun": ["All"]}, True),
])
def test_dry_run_marks_in_dry_run_and_answers_the_same(request_dry_run: bool, options: Any,
                                                        dry_run: bool) -> None:
    """pod-eviction-admitter.go: isDryRun (the request's dryRun or deleteOptions.dryRun)."""
    eviction: JSON = {"metadata": {"name": "virt-launcher-db-1-abcde"}}
    if options:
        eviction["deleteOptions"] = options
    decision = adm.admit_pod_eviction(review("pod", eviction, dry_run=request_dry_run), V19,
                                      lambda ns, n: LAUNCHER, lambda ns, n: RUNNING)
    refused(decision.response, 429, EVICTED)
    assert decision.mark is not None and decision.mark.dry_run is dry_run


@pytest.mark.parametrize(("annotations", "op"), [
    (None, {"op": "add", "path": "/metadata/annotations",
            "value": {"kubevirt.io/eviction-source": "descheduler"}}),
    ({"a": "b"}, {"op": "replace", "path": "/metadata/annotations/kubevirt.io~1eviction-source",
                  "value": "descheduler"}),
])
def test_descheduler_evictions_are_recorded_on_the_vmi(annotations: Any, op: JSON) -> None:
    """pod-eviction-admitter.go: isDeschedulerEviction and markVMI."""
    eviction = {"metadata": {"name": "virt-launcher-db-1-abcde",
                             "annotations": {"requested-by": "sigs.k8s.io/descheduler"}}}
    decision = adm.admit_pod_eviction(review("pod", eviction), V19, lambda ns, n: LAUNCHER,
                                      lambda ns, n: vmi(annotations=annotations))
    assert decision.mark is not None and decision.mark.patch == [*MARK, op]


HOTPLUG = {"metadata": {"name": "hp-volume-xyz", "namespace": "prod",
                        "labels": {"kubevirt.io": "hotplug-disk"},
                        "ownerReferences": [{"name": LAUNCHER["metadata"]["name"]}]}}


@pytest.mark.parametrize(("owner", "the_vmi", "message"), [
    (LAUNCHER, RUNNING, "cannot evict hotplug pod: hp-volume-xyz associated with running vmi: "
     "db-1 in namespace prod"),
    (None, RUNNING, None),
    (LAUNCHER, None, None),
    (pod(status__phase="Failed"), RUNNING, None),
])
def test_hotplug_pods(owner: JSON | None, the_vmi: JSON | None, message: str | None) -> None:
    """pod-eviction-admitter.go: admitHotplugPod."""
    pods = {"hp-volume-xyz": HOTPLUG, LAUNCHER["metadata"]["name"]: owner}
    decision = adm.admit_pod_eviction(review("pod", {}, name="hp-volume-xyz"), V19,
                                      lambda ns, n: pods[n], lambda ns, n: the_vmi)
    if message is None:
        assert decision.response == {"allowed": True}
    else:
        refused(decision.response, 429, message)
    assert decision.mark is None


def test_marking_failure_message() -> None:
    refused(adm.marking_failed("the server rejected our request"), 429,
            "kubevirt failed marking the vmi for eviction: the server rejected our request")


# -- vms-admitter.go: (*VMsAdmitter).Admit, validateRunStrategy; data-volume-template.go ----------

TEMPLATE = {"spec": {"volumes": [{"name": "root", "dataVolume": {"name": "db-1-root"}},
                                 {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}]}}
DVT = {"metadata": {"name": "db-1-root"},
       "spec": {"storage": {"resources": {"requests": {"storage": "1Gi"}}},
                "source": {"blank": {}}}}
BOTH = ("Running and RunStrategy are mutually exclusive. Note that Running is deprecated, please "
        "use RunStrategy instead")
UNREFERENCED = ("DataVolumeTemplate entry spec.dataVolumeTemplate[0] must be referenced in the "
                "VMI template's 'volumes' list")


def vm(**spec: Any) -> JSON:
    return {"metadata": {"name": "db-1", "namespace": "prod"},
            "spec": {"template": copy.deepcopy(TEMPLATE), **spec}}


def dvt(name: str, **spec: Any) -> JSON:
    out = copy.deepcopy(DVT)
    out["metadata"]["name"] = name
    out["spec"].update(spec)
    return {k: v for k, v in out.items() if v is not None}


VMS: list[tuple[str, JSON, ClusterConfig, list[JSON] | None]] = [
    ("runStrategy Always", vm(runStrategy="Always"), V19, None),
    ("running only (deprecated, passes)", vm(running=True), V19, None),
    ("running and runStrategy", vm(running=False, runStrategy="Halted"), V19,
     [cause("FieldValueInvalid", BOTH, "spec.running")]),
    ("neither", vm(), V19,
     [cause("FieldValueInvalid", "RunStrategy must be specified", "spec.running")]),
    ("an unknown runStrategy", vm(runStrategy="Sometimes"), V19,
     [cause("FieldValueInvalid", "Invalid RunStrategy (Sometimes)", "spec.runStrategy")]),
    ("an empty runStrategy", vm(runStrategy=""), V19,
     [cause("FieldValueInvalid", "Invalid RunStrategy ()", "spec.runStrategy")]),
    ("WaitAsReceiver without its gate", vm(runStrategy="WaitAsReceiver"), V19,
     [cause("FieldValueInvalid", "Invalid RunStrategy (WaitAsReceiver), "
            "DecentralizedLiveMigration feature gate is not enabled in kubevirt resource",
            "spec.runStrategy")]),
    ("WaitAsReceiver with its gate", vm(runStrategy="WaitAsReceiver"),
     gated(V19, "DecentralizedLiveMigration"), None),
    ("a DataVolumeTemplate referenced as a dataVolume",
     vm(runStrategy="Always", dataVolumeTemplates=[dvt("db-1-root")]), V19, None),
    ("a DataVolumeTemplate referenced as a claim",
     vm(runStrategy="Always", dataVolumeTemplates=[dvt("d")]), V19, None),
    ("an unreferenced DataVolumeTemplate",
     vm(runStrategy="Always", dataVolumeTemplates=[dvt("old-root")]), V19,
     [cause("FieldValueRequired", UNREFERENCED, "spec.dataVolumeTemplate[0]")]),
    ("a DataVolumeTemplate without a name", vm(runStrategy="Always", dataVolumeTemplates=[
        {"metadata": {}, "spec": DVT["spec"]}]), V19,
     [cause("FieldValueRequired", "'name' field must not be empty for DataVolumeTemplate entry "
            "spec.dataVolumeTemplate[0].name.", "spec.dataVolumeTemplate[0].name")]),
    ("a DataVolumeTemplate with two sources", vm(runStrategy="Always", dataVolumeTemplates=[
        dvt("db-1-root", source={"blank": {}, "http": {"url": "x"}})]), V19,
     [cause("FieldValueInvalid", "Multiple dataVolume sources",
            "spec.dataVolumeTemplate[0].source")]),
    ("DataVolumeTemplate causes come before runStrategy's, joined",
     vm(running=True, runStrategy="Always", dataVolumeTemplates=[dvt("old-root")]), V19,
     [cause("FieldValueRequired", UNREFERENCED, "spec.dataVolumeTemplate[0]"),
      cause("FieldValueInvalid", BOTH, "spec.running")]),
    ("no template", {"metadata": {"name": "x"}, "spec": {"runStrategy": "Always"}}, V19,
     [cause("FieldValueRequired", "missing virtual machine template.", "spec.template")]),
    ("a VM being deleted passes whatever it says",
     {**vm(), "metadata": {"name": "x", "deletionTimestamp": "2026-01-01T00:00:00Z"}}, V19,
     None),
]


@pytest.mark.parametrize(("obj", "config", "causes"), [v[1:] for v in VMS],
                         ids=[v[0] for v in VMS])
@pytest.mark.parametrize("operation", ["CREATE", "UPDATE"])
def test_vm(obj: JSON, config: ClusterConfig, causes: list[JSON] | None, operation: str) -> None:
    """vms-admitter.go: (*VMsAdmitter).Admit, ValidateVirtualMachineSpec, validateRunStrategy;
    data-volume-template.go: ValidateDataVolumeTemplate."""
    old = vm(runStrategy="Always") if operation == "UPDATE" else None
    response = adm.admit_vm(review("vm", obj, old, operation=operation), config)
    if causes is None:
        assert response["allowed"] is True
    else:
        refused(response, 422, ", ".join(c["message"] for c in causes), causes)


def test_vm_running_is_allowed_with_kubevirts_warning() -> None:
    response = adm.admit_vm(review("vm", vm(running=True)), V19)
    assert response["warnings"] == ["spec.running is deprecated, please use spec.runStrategy "
                                    "instead."]


def test_more_than_ten_causes_are_cut_short() -> None:
    """webhooks.go: ToAdmissionResponse keeps 10 causes and counts the rest."""
    templates = [dvt(f"gone-{i}") for i in range(12)]
    response = adm.admit_vm(review("vm", vm(runStrategy="Always",
                                            dataVolumeTemplates=templates)), V19)
    assert response["status"]["code"] == 422
    assert response["status"]["message"].endswith(", and 2 more validation errors")
    assert len(response["status"]["details"]["causes"]) == 10


# -- migrationpolicy-admitter.go: (*MigrationPolicyAdmitter).Admit ------------------------------

STALL = "MigrationStallDetection"
DOWNTIME = ("maxDowntimeMs cannot be modified without enabling the MigrationStallDetection "
            "feature gate")
NEGATIVE = "must not be negative"
POLICIES: list[tuple[str, ClusterConfig, JSON, JSON | None, list[JSON] | None]] = [
    ("plain", V19, {"bandwidthPerMigration": "64Mi", "completionTimeoutPerGiB": 10}, None, None),
    ("negative completionTimeoutPerGiB", V19, {"completionTimeoutPerGiB": -1}, None,
     [cause("FieldValueInvalid", NEGATIVE, "spec.completionTimeoutPerGiB")]),
    ("negative bandwidthPerMigration", V19, {"bandwidthPerMigration": "-1Mi"}, None,
     [cause("FieldValueInvalid", NEGATIVE, "spec.bandwidthPerMigration")]),
    ("both negative", V18, {"completionTimeoutPerGiB": -1, "bandwidthPerMigration": -5}, None,
     [cause("FieldValueInvalid", NEGATIVE, "spec.completionTimeoutPerGiB"),
      cause("FieldValueInvalid", NEGATIVE, "spec.bandwidthPerMigration")]),
    ("1.9: maxDowntimeMs without MigrationStallDetection", V19, {"maxDowntimeMs": 300}, None,
     [cause("FieldValueInvalid", DOWNTIME, "spec.maxDowntimeMs")]),
    ("1.9: maxDowntimeMs with MigrationStallDetection", gated(V19, STALL),
     {"maxDowntimeMs": 300}, None, None),
    ("1.9: an unchanged maxDowntimeMs passes without the gate", V19, {"maxDowntimeMs": 300},
     {"maxDowntimeMs": 300}, None),
    ("1.9: a changed maxDowntimeMs does not", V19, {"maxDowntimeMs": 200},
     {"maxDowntimeMs": 300}, [cause("FieldValueInvalid", DOWNTIME, "spec.maxDowntimeMs")]),
    ("1.9: removing maxDowntimeMs passes", V19, {}, {"maxDowntimeMs": 300}, None),
    ("1.9: experimental.stallDetector without the gate", V19,
     {"experimental": {"stallDetector": {"stallMargin": 10}}}, None,
     [cause("FieldValueInvalid", "experimental.stallDetector cannot be modified without "
            "enabling the MigrationStallDetection feature gate",
            "spec.experimental.stallDetector")]),
    ("1.8: no maxDowntimeMs rule (the field does not exist there)", V18,
     {"maxDowntimeMs": 300}, None, None),
    ("1.7: likewise", V17, {"maxDowntimeMs": 300}, None, None),
]


@pytest.mark.parametrize(("config", "spec", "old", "causes"), [p[1:] for p in POLICIES],
                         ids=[p[0] for p in POLICIES])
def test_migration_policy(config: ClusterConfig, spec: JSON, old: JSON | None,
                          causes: list[JSON] | None) -> None:
    """migrationpolicy-admitter.go: (*MigrationPolicyAdmitter).Admit (v1.7.4/v1.8.4 and
    v1.9.0)."""
    policy = {"metadata": {"name": "p"}, "spec": {**spec, "selectors": {}}}
    previous = {"metadata": {"name": "p"}, "spec": old} if old is not None else None
    response = adm.admit_migration_policy(
        review("policy", policy, previous, operation="UPDATE" if old is not None else "CREATE"),
        config)
    if causes is None:
        assert response == {"allowed": True}
    else:
        refused(response, 422, ", ".join(c["message"] for c in causes), causes)


# -- vmi-update-admitter.go: (*VMIUpdateAdmitter).Admit, admitVMILabelsUpdate ----------------------

RESERVED = ("modification of the following reserved kubevirt.io/ labels on a VMI object is "
            "prohibited")


def labelled(obj: JSON, **labels: str) -> JSON:
    out = copy.deepcopy(obj)
    out["metadata"]["labels"] = {"kubevirt.io/nodeName": "node-1", **labels}
    return out


BASE_VMI = labelled(vmi())
VMI_UPDATES: list[tuple[str, str, JSON, str | None]] = [
    ("a normal user labels a VMI (the operator's policy label)", ADMIN,
     labelled(vmi(), **{"virtshift.io/policy": "gold"}), None),
    ("a normal user changes status", ADMIN,
     labelled(vmi(evacuation="node-1")), None),
    ("a normal user changes a reserved label", ADMIN,
     labelled(vmi(), **{"kubevirt.io/nodeName": "node-2"}), RESERVED),
    ("a normal user changes the spec", ADMIN, labelled(vmi(strategy="None")),
     "update of VMI object is restricted"),
    ("virt-controller changes the spec and a reserved label", CONTROLLER,
     labelled(vmi(strategy="None"), **{"kubevirt.io/nodeName": "node-2"}), None),
    ("virt-handler changes the spec", HANDLER, labelled(vmi(strategy="None")), None),
    ("virt-api marks the VMI", API, labelled(vmi(evacuation="node-1")), None),
]


@pytest.mark.parametrize(("user", "new", "message"), [u[1:] for u in VMI_UPDATES],
                         ids=[u[0] for u in VMI_UPDATES])
def test_vmi_update(user: str, new: JSON, message: str | None) -> None:
    """vmi-update-admitter.go: (*VMIUpdateAdmitter).Admit and admitVMILabelsUpdate."""
    response = adm.admit_vmi_update(review("vmi", new, BASE_VMI, user=user, operation="UPDATE"),
                                    V19)
    if message is None:
        assert response == {"allowed": True}
    else:
        refused(response, 422, message, [cause("FieldValueNotSupported", message)])


# -- what virt-api reads from the KubeVirt CR --------------------------------------------------


@pytest.mark.parametrize(("kv", "expected"), [
    (None, ClusterConfig("1.9", ())),
    ({"metadata": {"namespace": "kubevirt"}, "status": {"observedKubeVirtVersion": "v1.8.4"},
      "spec": {"configuration": {"developerConfiguration": {"featureGates": [PQ]}}}},
     ClusterConfig("1.8", (PQ,))),
    ({"metadata": {"namespace": "kv"}, "status": {"observedKubeVirtVersion": "v1.7.4"},
      "spec": {"configuration": {"evictionStrategy": "LiveMigrate"}}},
     ClusterConfig("1.7", (), "LiveMigrate", "kv")),
    ({"metadata": {}, "status": {"observedKubeVirtVersion": "devel"}}, ClusterConfig()),
])
def test_cluster_config_from_the_kubevirt_cr(kv: JSON | None, expected: ClusterConfig) -> None:
    assert ClusterConfig.from_kubevirt(kv) == expected


def test_kubevirt_service_accounts() -> None:
    """pkg/virt-api/webhooks/serviceaccounts.go: KubeVirtServiceAccounts."""
    assert adm.kubevirt_service_accounts() == {
        "system:serviceaccount:kubevirt:kubevirt-apiserver", CONTROLLER, HANDLER,
        "system:serviceaccount:kubevirt:kubevirt-synchronization-controller"}
