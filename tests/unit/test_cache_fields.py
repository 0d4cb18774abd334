"""The caches keep only what the operator reads (k8s.fields): every reader gives the same
answer on the trimmed object as on the whole one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from virtshift.handlers.runtime import _route
from virtshift.k8s import fields, views

# A virt-launcher pod as virt-controller renders it (pkg/virt-controller/services/
# template.go renderLaunchManifest), cut down but with its large parts.
LAUNCHER: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "name": "virt-launcher-db-1-x2kq9", "namespace": "prod", "uid": "u-1",
        "resourceVersion": "4711", "creationTimestamp": "2026-11-29T07:00:00Z",
        "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "vmi-uid",
                   "vm.kubevirt.io/name": "db-1", "app": "db"},
        "annotations": {"kubevirt.io/domain": "db-1",
                        "kubectl.kubernetes.io/default-container": "compute",
                        "post.hook.backup.velero.io/command": "[\"/usr/bin/virt-freezer\"]"},
        "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                             "name": "db-1", "uid": "vmi-uid", "controller": True}],
        "managedFields": [{"manager": "virt-controller", "fieldsV1": {"f:spec": {}}}]},
    "spec": {
        "nodeName": "node-7",
        "nodeSelector": {"cpu-model-migration.node.kubevirt.io/Skylake": "true",
                         "kubevirt.io/schedulable": "true"},
        "containers": [
            {"name": "compute", "image": "quay.io/kubevirt/virt-launcher:v1.8.0",
             "command": ["/usr/bin/virt-launcher-monitor", "--qemu-timeout", "321s"],
             "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {
                 "fieldPath": "metadata.name"}}}],
             "resources": {"requests": {"cpu": "4", "memory": "16706Mi",
                                        "devices.kubevirt.io/kvm": "1"},
                           "limits": {"devices.kubevirt.io/kvm": "1"}},
             "volumeMounts": [{"name": "private", "mountPath": "/var/run/kubevirt-private"}]},
            {"name": "guest-console-log", "image": "quay.io/kubevirt/virt-launcher:v1.8.0",
             "resources": {"requests": {"cpu": "5m", "memory": "35M"}}}],
        "volumes": [{"name": "private", "emptyDir": {}}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]},
    "status": {"phase": "Running", "podIP": "10.0.0.7",
               "containerStatuses": [{"name": "compute", "ready": True, "restartCount": 0}]},
}

PV: dict[str, Any] = {
    "metadata": {"name": "pvc-1", "uid": "pv-uid", "resourceVersion": "9",
                 "annotations": {"pv.kubernetes.io/provisioned-by": "local"}},
    "spec": {"capacity": {"storage": "10Gi"}, "local": {"path": "/mnt/disks/1"},
             "accessModes": ["ReadWriteOnce"], "storageClassName": "local",
             "claimRef": {"namespace": "prod", "name": "db-1-root"},
             "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                 {"key": "kubernetes.io/hostname", "operator": "In",
                  "values": ["node-7"]}]}]}}},
}


def _variants(pod: dict[str, Any]) -> list[dict[str, Any]]:
    terminating = copy.deepcopy(pod)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-29T07:05:00Z"
    done = copy.deepcopy(pod)
    done["status"]["phase"] = "Succeeded"
    bare = copy.deepcopy(pod)
    del bare["spec"]["nodeName"], bare["status"]
    return [pod, terminating, done, bare]


@pytest.mark.parametrize("pod", _variants(LAUNCHER))
def test_a_trimmed_launcher_pod_reads_as_the_whole_one(pod: dict[str, Any]) -> None:
    whole = copy.deepcopy(pod)
    trimmed = fields.launcher(copy.deepcopy(pod))
    assert views.pod_info(trimmed) == views.pod_info(whole)
    assert views.pod_requests(trimmed) == views.pod_requests(whole)
    assert views.pod_running(trimmed) == views.pod_running(whole)
    assert _route("pod", trimmed) == _route("pod", whole)
    assert trimmed["spec"].get("nodeSelector") == whole["spec"].get("nodeSelector")
    text = str(trimmed)
    assert not any(big in text for big in ("volumes", "env", "image", "containerStatuses",
                                           "managedFields", "velero"))


def test_a_trimmed_volume_pins_the_same_node() -> None:
    claim = {"metadata": {"name": "db-1-root", "namespace": "prod"},
             "spec": {"volumeName": "pvc-1", "resources": {"requests": {"storage": "10Gi"}}}}
    trimmed = fields.persistent_volume(copy.deepcopy(PV))
    assert views.claim_info(claim, trimmed) == views.claim_info(claim, PV)
    assert views.claim_info(claim, trimmed).node == "node-7"
    assert fields.persistent_volume({"metadata": {"name": "x"}, "spec": {}})["spec"] == {}


def test_slim_drops_only_managed_fields() -> None:
    pod = fields.slim(copy.deepcopy(LAUNCHER))
    assert "managedFields" not in pod["metadata"]
    assert pod["spec"] == LAUNCHER["spec"] and pod["status"] == LAUNCHER["status"]
