"""KubeVirt's real control plane, built from KubeVirt's source (binaries.py): what installing it
needs, made by KubeVirt's own Go constructors, and the identity its components run as.

``manifests()`` runs virtshift's small Go program (kubevirt_manifests.go, built inside KubeVirt's
tree) that prints KubeVirt's CRDs (``install.GenerateCurrentInstallStrategy``'s list plus
``components.NewKubeVirtCrd``), virt-api's webhook configurations
(``components.NewVirtAPI{Validating,Mutating}WebhookConfiguration``) and the RBAC of
virt-controller, virt-api and virt-handler (``rbac.GetAllController``, ``GetAllApiServer``,
``GetAllHandler``), and caches its output beside the program, per KubeVirt version and commit.
Nothing of KubeVirt's is copied here.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, dynamic

from virtshift.devenv import binaries

NAMESPACE = "kubevirt"  # where KubeVirt's components live (clientutil.GetNamespace's default)
# KubeVirt's service accounts (components.ControllerServiceAccountName and friends), the
# identities its webhooks trust (pkg/virt-api/webhooks/serviceaccounts.go).
CONTROLLER_SERVICE_ACCOUNT = "kubevirt-controller"
API_SERVICE_ACCOUNT = "kubevirt-apiserver"
HANDLER_SERVICE_ACCOUNT = "kubevirt-handler"
# The components whose RBAC the manifests carry (the program's ``rbac`` keys).
RBAC_COMPONENTS = ("controller", "apiServer", "handler")
FIELD_MANAGER = "virtshift-devenv"

JSON = dict[str, Any]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # ~4 MB of YAML: the C loader if built


class ManifestsError(RuntimeError):
    """The manifests program's output is not what virtshift expects of it."""


@dataclass(frozen=True)
class KubeVirtManifests:
    crds: list[JSON]  # CustomResourceDefinitions, KubeVirt's order (KubeVirt's own CRD last)
    validating_webhooks: list[JSON]  # virt-api-validator
    mutating_webhooks: list[JSON]  # virt-api-mutator
    rbac: dict[str, list[JSON]]  # RBAC_COMPONENTS -> ServiceAccount, (Cluster)Role(Binding)s

    def crd(self, kind: str) -> JSON:
        """The CRD of ``kind`` (e.g. ``VirtualMachineInstance``)."""
        for crd in self.crds:
            if crd["spec"]["names"]["kind"] == kind:
                return crd
        raise KeyError(f"KubeVirt has no CRD of kind {kind}")


def served_versions(crd: JSON) -> dict[str, bool]:
    """``{version: storage}`` of a CRD's served versions."""
    return {v["name"]: bool(v.get("storage")) for v in crd["spec"]["versions"] if v["served"]}


# What each part of the program's output must hold.
_EXPECTED = {
    "crds": {("apiextensions.k8s.io/v1", "CustomResourceDefinition")},
    "validatingWebhookConfigurations": {
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration")},
    "mutatingWebhookConfigurations": {
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration")},
    "rbac": {("v1", "ServiceAccount"),
             *(("rbac.authorization.k8s.io/v1", kind)
               for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"))},
}


def parse_manifests(text: str) -> KubeVirtManifests:
    """The program's YAML as objects ready to create: every object of the kind its part
    promises, with the empty fields a Go struct marshals (``creationTimestamp: null``, a CRD's
    blank ``status``) left out."""
    doc = yaml.load(text, Loader=_Loader)
    if not isinstance(doc, dict) or set(_EXPECTED) - set(doc):
        raise ManifestsError(f"expected the keys {sorted(_EXPECTED)}, got "
                             f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    rbac = doc["rbac"] or {}
    if set(rbac) != set(RBAC_COMPONENTS):
        raise ManifestsError(f"expected RBAC of {sorted(RBAC_COMPONENTS)}, got {sorted(rbac)}")
    parts: dict[str, list[JSON]] = {
        part: _objects(doc[part] or [], part) for part in _EXPECTED if part != "rbac"}
    if not parts["crds"]:
        raise ManifestsError("no CRDs")
    return KubeVirtManifests(
        crds=parts["crds"],
        validating_webhooks=parts["validatingWebhookConfigurations"],
        mutating_webhooks=parts["mutatingWebhookConfigurations"],
        rbac={component: _objects(rbac[component] or [], "rbac")
              for component in RBAC_COMPONENTS})


def _objects(items: Iterable[Any], part: str) -> list[JSON]:
    out = []
    for obj in items:
        kind = (obj.get("apiVersion"), obj.get("kind")) if isinstance(obj, dict) else None
        if kind not in _EXPECTED[part]:
            raise ManifestsError(f"{part}: unexpected object {kind or obj!r}")
        if not (obj.get("metadata") or {}).get("name"):
            raise ManifestsError(f"{part}: a {kind[1]} without a name")
        out.append(_without_blanks(obj))
    return out


def _without_blanks(obj: JSON) -> JSON:
    metadata = {k: v for k, v in obj["metadata"].items() if v is not None}
    out = {**obj, "metadata": metadata}
    if obj["kind"] == "CustomResourceDefinition":
        out.pop("status", None)  # the API server's to write
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def manifests(version: str | None = None, namespace: str = NAMESPACE,
              log: Callable[[str], None] = _stderr) -> KubeVirtManifests:
    """KubeVirt's manifests for ``version`` (see ``binaries.kubevirt_source``), installed into
    ``namespace``: the program is built once, its output cached beside it."""
    program = binaries.ensure("kubevirt-manifests", log, kubevirt_version=version)
    cached = program.parent.parent / f"manifests-{namespace}.yaml"
    if cached.is_file():
        return parse_manifests(cached.read_text())
    proc = subprocess.run([str(program), f"--namespace={namespace}"], capture_output=True,
                          text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise ManifestsError(f"{program} failed:\n{proc.stderr[-3000:]}")
    parsed = parse_manifests(proc.stdout)  # what cannot be used is not cached
    partial = cached.with_suffix(".partial")
    partial.write_text(proc.stdout)
    partial.replace(cached)
    return parsed


# -- installing and identities --------------------------------------------------------------


def apply_objects(api: client.ApiClient, objects: Iterable[JSON]) -> None:
    """Server-side apply each object (created, or brought back to this content)."""
    dyn = dynamic.DynamicClient(api)
    for obj in objects:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        dyn.server_side_apply(resource, body=obj, namespace=obj["metadata"].get("namespace"),
                              field_manager=FIELD_MANAGER, force_conflicts=True)


def ensure_namespace(api: client.ApiClient, namespace: str = NAMESPACE) -> None:
    apply_objects(api, [{"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": namespace}}])


def service_account_kubeconfig(api: client.ApiClient, admin_kubeconfig: Path, name: str,
                               path: Path, namespace: str = NAMESPACE,
                               seconds: int = 3600) -> Path:
    """A kubeconfig at ``path`` that authenticates as ServiceAccount ``namespace/name`` with a
    TokenRequest token; the token is in a file of its own (``tokenFile``, which client-go
    re-reads), so writing a fresh token there renews it for a running component."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, request).status.token
    token_file = path.with_name(path.name + ".token")
    token_file.write_text(token)
    token_file.chmod(0o600)
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": user, "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def token_subject(token: str) -> str:
    """The ``sub`` claim of a service-account token (unverified: for messages and checks)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
