"""The Helm chart in tests: helm and kubeconform (built from Go modules like the control
plane's binaries), and the operator's identity as the chart installs it: its ServiceAccount,
with a token from the TokenRequest API."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from binaries_needed import need
from virtshift.devenv import binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "virtshift"
KUBE_VERSION = binaries.KUBERNETES_VERSION.lstrip("v")
# Every toggle on, and every scheduling knob set: what `make chart-test` checks besides the
# defaults.
ALL_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "argocdHealthChecks": {"enabled": True},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{
            "key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
    "podAnnotations": {"example.com/team": "platform"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {"metricsSource": "http://virt-handler.kubevirt.svc:8443/metrics",
                 "downtimeSource": "annotation=example.com/downtime-ms",
                 "extraArgs": ["--node-bandwidth=5Gi"]},
    "metrics": {"service": {"annotations": {"prometheus.io/scrape": "true"}}},
}


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True,
         values: dict[str, Any] | None = None, tmp: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    cmd = [str(need("helm")), *args]
    if kubeconfig:
        cmd.append(f"--kubeconfig={kubeconfig}")
    if values is not None:
        assert tmp is not None
        path = tmp / f"values-{abs(hash(repr(values)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(path)]
    env = {**os.environ, "HELM_CACHE_HOME": str(REPO / ".cache" / "helm"),
           "HELM_CONFIG_HOME": str(REPO / ".cache" / "helm"),
           "HELM_DATA_HOME": str(REPO / ".cache" / "helm")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(tmp: Path, values: dict[str, Any] | None = None, namespace: str = "virtshift",
           release: str = "virtshift") -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "-n", namespace,
               f"--kube-version={KUBE_VERSION}", values=values or {}, tmp=tmp).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def install_identity(cluster: Any, tmp: Path, namespace: str = "virtshift",
                     release: str = "virtshift") -> Path:
    """``helm install`` the chart (CRDs left to the test cluster, which has them already) and
    return a kubeconfig that authenticates as the chart's ServiceAccount only, with a token
    from the TokenRequest API (``kubectl create token``)."""
    helm("install", release, str(CHART), "-n", namespace, "--create-namespace",
         "--set", "crds.install=false", kubeconfig=cluster.kubeconfig)
    token = cluster.kubectl("create", "token", release, "-n", namespace,
                            "--duration=2h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": f"system:serviceaccount:{namespace}:{release}",
                   "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {
            "cluster": "local", "user": f"system:serviceaccount:{namespace}:{release}"}}],
        "current-context": "sa",
    }
    path = tmp / f"kubeconfig-{namespace}-{release}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def token_of(kubeconfig: Path) -> str:
    return yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]


def service_account_of(token: str) -> str:
    """The ``sub`` claim of a service account token (no signature check: for messages)."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return yaml.safe_load(base64.urlsafe_b64decode(payload))["sub"]
