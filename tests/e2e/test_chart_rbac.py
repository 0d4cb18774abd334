"""The chart's RBAC is no more than the operator needs (issue 11).

tests/e2e/test_nodedrain.py proves it is enough: the whole NodeDrain suite runs the operator as
the chart's ServiceAccount. Here, the same identity (a TokenRequest token) asks the API server
itself: what it must not do is refused for real (403), and ``kubectl auth can-i`` (a
SelfSubjectAccessReview) answers the rest of the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chart_harness import install_identity, service_account_of, token_of

from virtshift.k8s import rest
from virtshift.k8s.leader import LEASES

SECRETS = rest.Resource("", "v1", "secrets")
NS = "virtshift"
VM = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
      "metadata": {"name": "vm-1", "namespace": "apps"},
      "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {}}}}}}


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> dict[str, Any]:
    kubeconfig = install_identity(fresh_cluster, tmp_path_factory.mktemp("rbac"))
    admin = fresh_cluster.kube
    admin.create_or_get(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": "apps"}})
    admin.create(rest.NODES, {"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": "node-1"}})
    admin.create(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "db-password", "namespace": "apps"},
                           "stringData": {"password": "hunter2"}})
    admin.create(rest.VMS, VM)
    token = token_of(kubeconfig)
    return {"admin": admin, "sa": admin.with_token(token), "kubeconfig": kubeconfig,
            "token": token, "cluster": fresh_cluster}


def test_the_identity_is_the_charts_service_account(env) -> None:
    assert service_account_of(env["token"]) == f"system:serviceaccount:{NS}:virtshift"
    review = env["sa"].create(
        rest.Resource("authentication.k8s.io", "v1", "selfsubjectreviews", namespaced=False),
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{NS}:virtshift"


# What it must never do, tried for real.
REFUSED = [
    ("read Secrets", lambda sa: sa.get(SECRETS, "db-password", "apps")),
    ("list Secrets", lambda sa: sa.items(SECRETS)),
    ("delete Nodes", lambda sa: sa.delete(rest.NODES, "node-1")),
    ("create Pods", lambda sa: sa.create(rest.PODS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "apps"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})),
    ("delete Pods (only evictions)", lambda sa: sa.delete(rest.PODS, "any", "apps")),
    ("delete VirtualMachines", lambda sa: sa.delete(rest.VMS, "vm-1", "apps")),
    ("create VirtualMachines", lambda sa: sa.create(rest.VMS, {
        **VM, "metadata": {"name": "vm-2", "namespace": "apps"}})),
    ("create NodeDrains (users do)", lambda sa: sa.create(rest.NODE_DRAINS, {
        "apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
        "metadata": {"name": "x"}, "spec": {"nodeName": "node-1"}})),
    ("take another Lease", lambda sa: sa.create(LEASES, {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kube-scheduler", "namespace": "kube-system"}, "spec": {}})),
]


@pytest.mark.parametrize(("what", "attempt"), REFUSED, ids=[r[0] for r in REFUSED])
def test_it_cannot(env, what: str, attempt) -> None:
    with pytest.raises(rest.ApiError) as refused:
        attempt(env["sa"])
    assert refused.value.status == 403, refused.value
    assert f"system:serviceaccount:{NS}:virtshift" in refused.value.message
    # and nothing changed
    admin = env["admin"]
    assert admin.get(rest.NODES, "node-1") is not None
    assert admin.get(rest.VMS, "vm-1", "apps") is not None


# (verb, resource, namespace or None for all/cluster-scoped, allowed): the whole table.
TABLE = [
    # allowed: exactly what the operator does
    ("patch", "nodes", None, True),
    ("list", "pods", None, True),
    ("create", "pods/eviction", "apps", True),
    ("create", "virtualmachineinstancemigrations.kubevirt.io", "apps", True),
    ("delete", "virtualmachineinstancemigrations.kubevirt.io", "apps", True),
    ("patch", "virtualmachineinstances.kubevirt.io", "apps", True),
    ("patch", "virtualmachines.kubevirt.io", "apps", True),
    ("update", "migrationpolicies.migrations.kubevirt.io", None, True),
    ("patch", "nodedrains.virtshift.io/status", None, True),
    ("patch", "migrationpolicies.virtshift.io/status", None, True),
    ("create", "events", "apps", True),
    ("create", "persistentvolumeclaims", "apps", True),  # storage migration (issue 10)
    ("patch", "persistentvolumeclaims", "apps", True),  # a move's outcome (issue 20)
    ("get", "leases.coordination.k8s.io/virtshift", NS, True),
    ("update", "leases.coordination.k8s.io/virtshift", NS, True),
    # refused: everything else
    ("get", "secrets", "apps", False),
    ("get", "configmaps", "apps", False),
    ("delete", "nodes", None, False),
    ("update", "nodes", None, False),
    ("create", "pods", "apps", False),
    ("delete", "pods", "apps", False),
    ("patch", "pods", "apps", False),
    ("delete", "virtualmachines.kubevirt.io", "apps", False),
    ("create", "virtualmachines.kubevirt.io", "apps", False),
    ("delete", "virtualmachineinstances.kubevirt.io", "apps", False),
    ("update", "virtualmachineinstancemigrations.kubevirt.io", "apps", False),
    ("patch", "kubevirts.kubevirt.io", "kubevirt", False),
    ("create", "nodedrains.virtshift.io", None, False),
    ("delete", "nodedrains.virtshift.io", None, False),
    ("delete", "persistentvolumes", None, False),
    ("update", "leases.coordination.k8s.io/other", NS, False),
    ("update", "leases.coordination.k8s.io/virtshift", "kube-system", False),
    ("create", "serviceaccounts/token", NS, False),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None, False),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None, False),
    ("impersonate", "users", None, False),
    ("get", "customresourcedefinitions.apiextensions.k8s.io", None, False),
]


def test_access_table(env) -> None:
    cluster, kubeconfig = env["cluster"], env["kubeconfig"]
    wrong = []
    for verb, resource, ns, allowed in TABLE:
        scope = ["-n", ns] if ns else ["--all-namespaces"] if verb in ("list",) else []
        kind, _, sub = resource.partition("/")
        if sub in ("status", "eviction", "token"):  # else resource/NAME
            resource, scope = kind, [*scope, f"--subresource={sub}"]
        proc = cluster.kubectl("auth", "can-i", verb, resource, *scope,
                               f"--kubeconfig={kubeconfig}", check=False)
        answer = proc.stdout.strip()
        if answer != ("yes" if allowed else "no"):
            wrong.append((verb, resource, ns, answer, proc.stderr.strip()))
    assert not wrong, wrong


def test_view_and_edit_roles_are_aggregated_and_scoped(env, tmp_path: Path) -> None:
    """The chart's -view and -edit roles carry the aggregation labels (no controller-manager
    runs here to aggregate them, so their rules are checked bound directly)."""
    cluster = env["cluster"]
    view = cluster.kubectl("get", "clusterrole", "virtshift-view", "-o",
                           "jsonpath={.metadata.labels}").stdout
    edit = cluster.kubectl("get", "clusterrole", "virtshift-edit", "-o",
                           "jsonpath={.metadata.labels}").stdout
    assert '"rbac.authorization.k8s.io/aggregate-to-view":"true"' in view
    assert '"rbac.authorization.k8s.io/aggregate-to-edit":"true"' in edit
    assert "aggregate-to-view" not in edit  # viewers never write
    for user, role in (("alice", "virtshift-view"), ("bob", "virtshift-edit")):
        cluster.kubectl("create", "clusterrolebinding", f"{user}-{role}",
                        f"--clusterrole={role}", f"--user={user}")
    expect = [("alice", "get", "nodedrains.virtshift.io", "yes"),
              ("alice", "get", "nodedrains.virtshift.io/status", "yes"),
              ("alice", "list", "migrationpolicies.virtshift.io", "yes"),
              ("alice", "create", "nodedrains.virtshift.io", "no"),
              ("bob", "create", "nodedrains.virtshift.io", "yes"),
              ("bob", "delete", "migrationpolicies.virtshift.io", "yes"),
              ("bob", "patch", "nodedrains.virtshift.io/status", "no"),
              ("bob", "get", "secrets", "no")]
    def can(user: str, verb: str, resource: str) -> str:
        kind, _, sub = resource.partition("/")
        extra = [f"--subresource={sub}"] if sub else []
        return cluster.kubectl("auth", "can-i", verb, kind, *extra, f"--as={user}",
                               check=False).stdout.strip()

    got = [(u, v, r, can(u, v, r)) for u, v, r, _ in expect]
    assert got == expect
