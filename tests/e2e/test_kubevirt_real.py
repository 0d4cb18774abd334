"""KubeVirt's real control plane against our API server (issue 21, first slice): KubeVirt's own
CRDs and RBAC, made by its Go constructors (devenv/kubevirt.py), installed in place of the
stand-ins, and KubeVirt's virt-controller, built from its source (devenv/binaries.py), running
as its own ServiceAccount: it holds its leader Lease, and its controllers act (a VM gets its VMI,
the VMI its launcher pod), every write under that identity by the API server's audit log.

Needs KubeVirt's source (KUBEVIRT_SRC, else ../shared/kubevirt-src): with CI=true a missing
source fails; elsewhere the module is skipped unless the binaries are cached already.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from binaries_needed import need, need_kubevirt_source
from conftest import Cluster
from virtshift.devenv import binaries, crds, kubevirt
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s import rest
from virtshift.sim.objects import kubevirt_cr, kubevirt_status
from virtshift.sim.scenario import KubeVirtSettings

CONTROLLER_USER = "system:serviceaccount:kubevirt:kubevirt-controller"
LEASE = "virt-controller"  # leaderelectionconfig.DefaultLeaseName, in KubeVirt's namespace
# Who wrote the Lease, the VMI and the pod, from the API server's own record of requests.
AUDIT = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "verbs": ["update", "patch"],
               "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
              {"level": "RequestResponse", "verbs": ["create"],
               "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]},
                             {"group": "kubevirt.io", "resources": ["virtualmachineinstances"]},
                             {"group": "", "resources": ["pods"]}]},
              {"level": "None"}],
}
# The kinds virtshift works with and the versions KubeVirt serves them in ({version: storage}):
# kubevirt.io's from staging/src/kubevirt.io/api/core/v1/register.go ApiSupportedVersions (v1,
# and v1alpha3 deprecated), MigrationPolicy's from migrations/v1alpha1.
SERVED = {
    "VirtualMachineInstance": {"v1": True, "v1alpha3": False},
    "VirtualMachineInstanceMigration": {"v1": True, "v1alpha3": False},
    "VirtualMachine": {"v1": True, "v1alpha3": False},
    "KubeVirt": {"v1": True, "v1alpha3": False},
    "MigrationPolicy": {"v1alpha1": True},
}


@pytest.fixture(scope="module")
def manifests() -> kubevirt.KubeVirtManifests:
    need_kubevirt_source()
    need("kubevirt-manifests")  # the program that prints them: found, built, or skipped
    return kubevirt.manifests()


@pytest.fixture(scope="module")
def real_cluster(control_plane_binaries: dict[str, Path], manifests: kubevirt.KubeVirtManifests,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Our CRDs and KubeVirt's generated ones (no stand-in, no shared copy); the writes the
    tests check are audited."""
    cp = LocalControlPlane(tmp_path_factory.mktemp("controlplane"), log=lambda _m: None,
                           audit_policy=AUDIT)
    cp.up()
    try:
        api = config.new_client_from_config(str(cp.kubeconfig))
        crds.apply_crds(api, crds.our_crds() + manifests.crds)
        yield Cluster(cp, api)
    finally:
        cp.down(quiet=True, grace=3)


def test_generated_crds_are_served_in_kubevirts_versions(
        real_cluster: Cluster, manifests: kubevirt.KubeVirtManifests) -> None:
    ext = client.ApiextensionsV1Api(real_cluster.api)
    for kind, versions in SERVED.items():
        generated = manifests.crd(kind)
        assert kubevirt.served_versions(generated) == versions, kind
        installed = ext.read_custom_resource_definition(generated["metadata"]["name"])
        assert {v.name: v.storage for v in installed.spec.versions if v.served} == versions
    # What clients discover: KubeVirt's groups, v1 preferred.
    apis = client.ApisApi(real_cluster.api).get_api_versions()
    groups = {g.name: g for g in apis.groups}
    assert groups["kubevirt.io"].preferred_version.version == "v1"
    assert {v.version for v in groups["kubevirt.io"].versions} == {"v1", "v1alpha3"}
    assert {v.version for v in groups["migrations.kubevirt.io"].versions} == {"v1alpha1"}
    # Every CRD KubeVirt installs is there, KubeVirt's own last (components.NewKubeVirtCrd).
    assert manifests.crds[-1]["spec"]["names"]["kind"] == "KubeVirt"
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    assert {c["metadata"]["name"] for c in manifests.crds} <= names


def test_virt_controller_leads_and_acts_as_its_service_account(
        real_cluster: Cluster, manifests: kubevirt.KubeVirtManifests, tmp_path: Path,
        unique: str) -> None:
    virt_controller = need("virt-controller")
    api = real_cluster.api
    kubevirt.ensure_namespace(api)
    kubevirt.apply_objects(api, manifests.rbac["controller"])
    install_kubevirt_cr(real_cluster)
    kubeconfig = kubevirt.service_account_kubeconfig(
        api, real_cluster.kubeconfig, kubevirt.CONTROLLER_SERVICE_ACCOUNT,
        tmp_path / "kubeconfig-virt-controller")
    token = Path(str(kubeconfig) + ".token").read_text()
    assert kubevirt.token_subject(token) == CONTROLLER_USER

    log = tmp_path / "virt-controller.log"
    with running(virt_controller, kubeconfig, log) as proc:
        first = wait_for_lease(real_cluster, proc, log, timeout=90)
        assert first["holderIdentity"] == socket.gethostname(), first  # vca.host
        # It keeps leading: renewals every retry period (2 s), still alive after several.
        renewed = wait_for_lease(real_cluster, proc, log, timeout=30,
                                 after=first["renewTime"])
        time.sleep(6)
        assert proc.poll() is None, f"virt-controller exited:\n{tail(log)}"
        last = wait_for_lease(real_cluster, proc, log, timeout=30, after=renewed["renewTime"])
        assert last["holderIdentity"] == first["holderIdentity"]
        # Its controllers work: the VM controller starts a VMI, the VMI controller its pod.
        namespace = f"probe-{unique}"
        vmi, pod = start_vm(real_cluster, namespace, proc, log)
        assert owner(vmi) == ("VirtualMachine", "probe")
        assert owner(pod) == ("VirtualMachineInstance", "probe")
        assert pod["metadata"]["name"].startswith("virt-launcher-probe-")
        assert pod["spec"]["nodeSelector"]["kubevirt.io/schedulable"] == "true"
    assert writers(real_cluster.cp, "leases", LEASE) == {CONTROLLER_USER}
    assert writers(real_cluster.cp, "virtualmachineinstances", "probe") == {CONTROLLER_USER}
    assert writers(real_cluster.cp, "pods", pod["metadata"]["name"]) == {CONTROLLER_USER}


def start_vm(cluster: Cluster, namespace: str, proc: subprocess.Popen,
             log: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A VM with runStrategy Always; its VMI and launcher pod once virt-controller made them
    (no node runs them: the pod stays Pending)."""
    kubevirt.ensure_namespace(cluster.api, namespace)
    cluster.kube.create(rest.VMS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {
            "devices": {}, "resources": {"requests": {"memory": "1Gi"}}}}}}})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"virt-controller exited ({proc.returncode}):\n{tail(log)}"
        vmi = cluster.kube.get(rest.VMIS, "probe", namespace)
        pods = cluster.kube.items(rest.PODS, namespace)
        if vmi and pods:
            return vmi, pods[0]
        time.sleep(0.5)
    raise AssertionError(f"no VMI and launcher pod in {namespace} within 60s:\n{tail(log)}")


def owner(obj: dict[str, Any]) -> tuple[str, str]:
    refs = [r for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")]
    return (refs[0]["kind"], refs[0]["name"]) if refs else ("", "")


def install_kubevirt_cr(cluster: Cluster) -> None:
    """The one KubeVirt CR virt-controller reads its configuration from, with the status
    virt-operator would report (phase set: pkg/virt-config reads the CR once it has one)."""
    settings = KubeVirtSettings()
    source = binaries.kubevirt_source()
    release = source.version if source else settings.release  # what the binaries are of
    status = kubevirt_status(settings)
    status["status"] |= {"observedKubeVirtVersion": release, "targetKubeVirtVersion": release,
                         "operatorVersion": release}
    kv = cluster.kube.create_or_get(rest.KUBEVIRTS, kubevirt_cr(settings))
    cluster.kube.patch(rest.KUBEVIRTS, kv["metadata"]["name"], status,
                       namespace=kubevirt.NAMESPACE, subresource="status")


@contextlib.contextmanager
def running(binary: Path, kubeconfig: Path, log: Path) -> Iterator[subprocess.Popen]:
    """virt-controller on a free local port, stopped (and reaped) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), f"--kubeconfig={kubeconfig}", "--listen=127.0.0.1", f"--port={port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_lease(cluster: Cluster, proc: subprocess.Popen, log: Path, timeout: float,
                   after: str | None = None) -> dict[str, Any]:
    """The Lease's spec once it has a holder (renewed later than ``after``, if given)."""
    coordination = client.CoordinationV1Api(cluster.api)
    deadline = time.monotonic() + timeout
    spec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"virt-controller exited ({proc.returncode}):\n{tail(log)}"
        with contextlib.suppress(client.ApiException):
            lease = coordination.read_namespaced_lease(LEASE, kubevirt.NAMESPACE)
            spec = cluster.api.sanitize_for_serialization(lease.spec)
            if spec.get("holderIdentity") and (after is None or _later(spec["renewTime"], after)):
                return spec
        time.sleep(0.5)
    raise AssertionError(f"no Lease {kubevirt.NAMESPACE}/{LEASE} held (renewed after {after}) "
                         f"within {timeout}s; last {spec}:\n{tail(log)}")


def _later(stamp: str, than: str) -> bool:
    return dt.datetime.fromisoformat(stamp) > dt.datetime.fromisoformat(than)


def writers(cp: LocalControlPlane, resource: str, name: str) -> set[str]:
    """Who created or changed the object, by the API server's audit log."""
    found = set()
    for line in cp.audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        # A create's audit event names the object only in its response: match its name there.
        named = ref.get("name") == name or (
            event["verb"] == "create" and ref.get("resource") == resource and
            ((event.get("responseObject") or {}).get("metadata") or {}).get("name") == name)
        if ref.get("resource") == resource and not ref.get("subresource") and named and \
                event["verb"] in ("create", "update", "patch") and \
                (event.get("responseStatus") or {}).get("code", 0) < 300:
            found.add(event["user"]["username"])
    return found


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
