"""The Helm chart (issue 11): lint, render, values schema, kubeconform, install.

What a user sees: helm's and kubeconform's output, and the objects in a real API server.
kubeconform's schemas are generated from that API server's OpenAPI document (no download):
built-in kinds of the Kubernetes version the tests run, and every installed CRD.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_harness import ALL_ON, CHART, KUBE_VERSION, helm, need, render
from kubernetes import config

from virtshift.devenv import charttools, crds
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s import rest

VALUES = {"default": {}, "all-on": ALL_ON}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chart")


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint_strict_is_clean(name: str, tmp: Path) -> None:
    out = helm("lint", "--strict", str(CHART), f"--kube-version={KUBE_VERSION}",
               values=VALUES[name], tmp=tmp).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_defaults_render_the_operator_and_toggles_stay_off(tmp: Path) -> None:
    docs = render(tmp)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["CustomResourceDefinition"] * 2 + [
        "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding", "Service", "Deployment"])
    all_on = sorted(d["kind"] for d in render(tmp, ALL_ON))
    assert sorted([*kinds, "ServiceMonitor", "PrometheusRule", "ConfigMap", "ConfigMap"]) == all_on
    # The CRDs are crds/ verbatim, with the chart's labels and (crds.keep) helm's keep policy.
    repo = Path(__file__).resolve().parents[2] / "crds"
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        source = yaml.safe_load((repo / f"virtshift.io_{crd['spec']['names']['plural']}.yaml")
                                .read_text())
        assert crd["spec"] == source["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not [d for d in render(tmp, {"crds": {"install": False}})
                if d["kind"] == "CustomResourceDefinition"]
    no_keep = [d for d in render(tmp, {"crds": {"keep": False}})
               if d["kind"] == "CustomResourceDefinition"]
    assert no_keep and all("annotations" not in d["metadata"] for d in no_keep)


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


def test_deployment_is_restricted_probed_and_elects_a_leader(tmp: Path) -> None:
    dep = _deployment(render(tmp))
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                    "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["livenessProbe"]["httpGet"] == c["readinessProbe"]["httpGet"] == {
        "path": "/healthz", "port": "health"}
    assert "--leader-election-id=virtshift" in c["args"] and "--standalone" not in c["args"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    one = _deployment(render(tmp, {"replicas": 1, "leaderElection": {"enabled": False}}))
    assert "--standalone" in one["spec"]["template"]["spec"]["containers"][0]["args"]
    knobs = _deployment(render(tmp, ALL_ON))["spec"]["template"]["spec"]
    assert knobs["priorityClassName"] == "system-cluster-critical"
    assert knobs["nodeSelector"] == ALL_ON["nodeSelector"]
    assert knobs["tolerations"] == ALL_ON["tolerations"]
    assert knobs["affinity"] == ALL_ON["affinity"]


@pytest.mark.parametrize(("values", "message"), [
    ({"replica": 3}, "additional properties 'replica' not allowed"),
    ({"image": {"tga": "x"}}, "additional properties 'tga' not allowed"),
    ({"serviceMonitor": {"enabled": True, "intervall": "1m"}},
     "additional properties 'intervall' not allowed"),
    ({"replicas": 2, "leaderElection": {"enabled": False}}, "value must be true"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
])
def test_values_schema_rejects_unknown_and_unsafe_values(values: dict[str, Any], message: str,
                                                        tmp: Path) -> None:
    proc = helm("template", "v", str(CHART), f"--kube-version={KUBE_VERSION}", values=values,
                tmp=tmp, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


# -- against a real API server --------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_cluster(control_plane_binaries, tmp_path_factory) -> Iterator[Any]:
    """A control plane with KubeVirt's and the Prometheus Operator's CRDs but not ours: what a
    cluster looks like before `helm install virtshift`."""
    from conftest import Cluster

    cp = LocalControlPlane(tmp_path_factory.mktemp("chart-cp"), log=lambda _m: None)
    cp.up()
    try:
        api = config.new_client_from_config(str(cp.kubeconfig))
        kubevirt, _ = crds.kubevirt_crds()
        crds.apply_crds(api, kubevirt + charttools.monitoring_crds())
        yield Cluster(cp, api)
    finally:
        cp.down(quiet=True, grace=3)


@pytest.fixture(scope="module")
def installed(bare_cluster, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`helm install` with every toggle on (a superset of the defaults)."""
    return helm("install", "virtshift", str(CHART), "-n", "virtshift", "--create-namespace",
                "--wait=false", kubeconfig=bare_cluster.kubeconfig, values=ALL_ON, tmp=tmp)


def test_helm_install_succeeds_and_every_object_is_in_the_cluster(bare_cluster, installed,
                                                                 tmp: Path) -> None:
    assert "STATUS: deployed" in installed.stdout
    assert "kubectl get nodedrains -w" in installed.stdout  # NOTES: what to do next
    docs = render(tmp, ALL_ON)
    for d in docs:
        ns = ["-n", "virtshift"] if d["kind"] not in (
            "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding") else []
        got = bare_cluster.kubectl("get", f"{d['kind']}.{d['apiVersion'].split('/')[0]}"
                                   if "/" in d["apiVersion"] else d["kind"],
                                   d["metadata"]["name"], *ns, "-o", "json", check=False)
        assert got.returncode == 0, (d["kind"], d["metadata"]["name"], got.stderr)
    # The installed CRDs serve: a NodeDrain can be created (and explained).
    bare_cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                         "crd/nodedrains.virtshift.io", "crd/migrationpolicies.virtshift.io")
    explain = bare_cluster.kubectl("explain", "nodedrains.spec.nodeName").stdout
    assert "nodeName" in explain


def test_every_rendered_object_passes_strict_server_validation(bare_cluster, installed,
                                                              tmp: Path) -> None:
    """Unknown or misplaced fields are errors (fieldValidation=Strict), not silently dropped;
    the default values too, rendered for another namespace."""
    for name, values in (("all-on", ALL_ON), ("default", {"crds": {"install": False}})):
        path = tmp / f"rendered-{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(tmp, values, namespace="virtshift")))
        proc = bare_cluster.kubectl("apply", "--server-side", "--force-conflicts",
                                    "--dry-run=server", "--validate=strict",
                                    "--field-manager=chart-test", "-f", str(path), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr


def test_the_pod_passes_the_restricted_pod_security_standard(bare_cluster, tmp: Path) -> None:
    """PodSecurity admission, enforcing `restricted` on a namespace, accepts the chart's pod
    and refuses it with one setting loosened."""
    bare_cluster.kubectl("create", "namespace", "restricted")
    bare_cluster.kubectl("label", "namespace", "restricted",
                         "pod-security.kubernetes.io/enforce=restricted")
    template = _deployment(render(tmp, namespace="restricted"))["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "virtshift-pss", "namespace": "restricted",
                        "labels": template["metadata"]["labels"]},
           "spec": template["spec"]}
    kube = bare_cluster.kube
    kube.create(rest.PODS, pod, dry_run=True)
    loose = json.loads(json.dumps(pod))
    del loose["spec"]["containers"][0]["securityContext"]["capabilities"]
    with pytest.raises(rest.ApiError) as refused:
        kube.create(rest.PODS, loose, dry_run=True)
    assert refused.value.status == 403 and 'violates PodSecurity "restricted' in str(
        refused.value), refused.value


@pytest.mark.parametrize("name", list(VALUES))
def test_kubeconform_strict_accepts_every_rendered_object(name: str, bare_cluster, installed,
                                                         tmp: Path) -> None:
    docs = render(tmp, VALUES[name])
    openapi = bare_cluster.kube.request("GET", "/openapi/v2", timeout=120)
    schemas = tmp / "schemas"
    written = charttools.write_schemas(openapi, charttools.kinds_of(docs), schemas)
    assert len(written) == len(charttools.kinds_of(docs)), written
    rendered = tmp / f"kubeconform-{name}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [str(need("kubeconform")), "-strict", "-summary", "-output", "text",
         "-schema-location", f"{schemas}/{charttools.SCHEMA_TEMPLATE}", str(rendered)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Valid: {len(docs)}, Invalid: 0, Errors: 0, Skipped: 0" in proc.stdout, proc.stdout


def test_kubeconform_strict_catches_a_misspelt_field(bare_cluster, installed,
                                                    tmp: Path) -> None:
    """The generated schemas are strict: the check above could fail."""
    docs = render(tmp)
    dep = _deployment(docs)
    dep["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    openapi = bare_cluster.kube.request("GET", "/openapi/v2", timeout=120)
    schemas = tmp / "schemas-neg"
    charttools.write_schemas(openapi, charttools.kinds_of([dep]), schemas)
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(dep))
    proc = subprocess.run(
        [str(need("kubeconform")), "-strict", "-schema-location",
         f"{schemas}/{charttools.SCHEMA_TEMPLATE}", str(path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "securityContex" in proc.stdout, proc.stdout


def test_uninstall_keeps_the_crds_and_the_users_objects(bare_cluster, installed) -> None:
    kube = bare_cluster.kube
    kube.create(rest.NODE_DRAINS, {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
                                   "metadata": {"name": "kept"},
                                   "spec": {"nodeName": "node-1", "dryRun": True}})
    out = helm("uninstall", "virtshift", "-n", "virtshift",
               kubeconfig=bare_cluster.kubeconfig).stdout
    assert "kept due to the resource policy" in out, out
    assert kube.get(rest.NODE_DRAINS, "kept") is not None
    assert kube.get(rest.Resource("apps", "v1", "deployments"), "virtshift", "virtshift") is None
