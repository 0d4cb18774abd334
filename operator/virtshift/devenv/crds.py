"""Install CRDs into a (local) cluster: ours, and KubeVirt's real ones or a minimal stand-in."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

REPO_ROOT = Path(__file__).resolve().parents[3]
OUR_CRDS = REPO_ROOT / "crds"


@dataclass(frozen=True)
class KubeVirtKind:
    """What of a KubeVirt CRD changes how the API server treats its objects, schemas aside.

    Copied by hand from KubeVirt's generated CRDs (``../shared/kubevirt-crds``);
    tests/unit/test_kubevirt_crds.py compares the two field by field.
    """

    group: str
    kind: str
    plural: str
    scope: str
    short_names: tuple[str, ...]
    # A status subresource makes the API server drop ``status`` from writes to the main
    # resource (and those to /status drop everything else). KubeVirt's VMI has none:
    # virt-handler patches the VMI itself, status included.
    status_subresource: bool
    spec_required: tuple[str, ...]  # required fields of ``spec`` (``spec`` itself always is)
    printer_columns: tuple[dict[str, Any], ...] = ()
    versions: tuple[str, ...] = ("v1",)  # all served; the first is the storage version
    categories: tuple[str, ...] = ()
    status_nullable: bool = False

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


def _column(name: str, type_: str, json_path: str, priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": type_, "jsonPath": json_path,
            **({"priority": priority} if priority else {})}


_AGE = _column("Age", "date", ".metadata.creationTimestamp")
_PHASE = _column("Phase", "string", ".status.phase")

# The KubeVirt kinds virtshift and its simulator read or write.
KUBEVIRT_KINDS = [
    KubeVirtKind("kubevirt.io", "KubeVirt", "kubevirts", "Namespaced", ("kv", "kvs"),
                 status_subresource=True, spec_required=(), printer_columns=(_AGE, _PHASE)),
    KubeVirtKind("kubevirt.io", "VirtualMachine", "virtualmachines", "Namespaced", ("vm", "vms"),
                 status_subresource=True, spec_required=("template",), printer_columns=(
                     _AGE, _column("Status", "string", ".status.printableStatus"))),
    KubeVirtKind("kubevirt.io", "VirtualMachineInstance", "virtualmachineinstances",
                 "Namespaced", ("vmi", "vmis"), status_subresource=False,
                 spec_required=("domain",), printer_columns=(
                     _AGE, _PHASE, _column("NodeName", "string", ".status.nodeName"),
                     _column("Live-Migratable", "string",
                             ".status.conditions[?(@.type=='LiveMigratable')].status", 1))),
    KubeVirtKind("kubevirt.io", "VirtualMachineInstanceMigration",
                 "virtualmachineinstancemigrations", "Namespaced", ("vmim", "vmims"),
                 status_subresource=True, spec_required=(), printer_columns=(
                     _PHASE, _column("VMI", "string", ".spec.vmiName"))),
    KubeVirtKind("migrations.kubevirt.io", "MigrationPolicy", "migrationpolicies", "Cluster", (),
                 status_subresource=True, spec_required=("selectors",),
                 versions=("v1alpha1",), status_nullable=True),
]


SHARED_CRDS = REPO_ROOT.parent / "shared" / "kubevirt-crds"


def fallback_forced() -> bool:
    """``KUBEVIRT_CRDS_DIR=none``: the stand-ins even where KubeVirt's real CRDs exist."""
    return os.environ.get("KUBEVIRT_CRDS_DIR", "").strip().lower() == "none"


def kubevirt_crds_dir() -> Path | None:
    """Where KubeVirt's real CRDs are, or None to use the stand-ins.

    ``$KUBEVIRT_CRDS_DIR`` when set to a folder; None when set to ``none``; else the shared
    folder beside the checkout, if present.
    """
    return None if fallback_forced() else real_kubevirt_crds_dir()


def real_kubevirt_crds_dir() -> Path | None:
    """KubeVirt's real CRDs even when the stand-ins are forced: to compare the two."""
    explicit = os.environ.get("KUBEVIRT_CRDS_DIR", "")
    if explicit and not fallback_forced():
        path = Path(explicit)
        if not path.is_dir():
            raise FileNotFoundError(f"KUBEVIRT_CRDS_DIR={explicit} is not a folder")
        return path
    return SHARED_CRDS if SHARED_CRDS.is_dir() else None


def minimal_kubevirt_crds() -> list[dict[str, Any]]:
    """Stand-ins for machines without KubeVirt's real CRDs: the real names, scope, versions,
    subresources and printer columns, with schemas that keep any field (nothing is pruned or
    validated beyond ``spec`` and its required fields)."""
    return [_stand_in(kind) for kind in KUBEVIRT_KINDS]


def _stand_in(kind: KubeVirtKind) -> dict[str, Any]:
    def permissive(**extra: Any) -> dict[str, Any]:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, **extra}

    spec = permissive(**({"required": list(kind.spec_required)} if kind.spec_required else {}))
    status = permissive(**({"nullable": True} if kind.status_nullable else {}))
    schema = permissive(required=["spec"], properties={"spec": spec, "status": status})
    names: dict[str, Any] = {"plural": kind.plural, "singular": kind.kind.lower(),
                             "kind": kind.kind}
    if kind.short_names:
        names["shortNames"] = list(kind.short_names)
    if kind.categories:
        names["categories"] = list(kind.categories)
    versions = []
    for i, name in enumerate(kind.versions):
        version: dict[str, Any] = {"name": name, "served": True, "storage": i == 0,
                                   "schema": {"openAPIV3Schema": schema}}
        if kind.status_subresource:
            version["subresources"] = {"status": {}}
        if kind.printer_columns:
            version["additionalPrinterColumns"] = [dict(c) for c in kind.printer_columns]
        versions.append(version)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {"group": kind.group, "scope": kind.scope, "names": names,
                 "versions": versions},
    }


def load_yaml_docs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(paths):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def kubevirt_crds(fallback: bool = False) -> tuple[list[dict[str, Any]], str]:
    """KubeVirt's CRDs and where they came from; ``fallback=True`` forces the stand-ins."""
    folder = None if fallback else kubevirt_crds_dir()
    if folder:
        return load_yaml_docs(folder.glob("*.yaml")), f"KubeVirt's real CRDs from {folder}"
    why = "forced" if fallback or fallback_forced() else "KubeVirt's real CRDs not found"
    return minimal_kubevirt_crds(), f"KubeVirt stand-in CRDs ({why})"


def our_crds() -> list[dict[str, Any]]:
    return load_yaml_docs(OUR_CRDS.glob("*.yaml"))


def apply_crds(api: client.ApiClient, crds: list[dict[str, Any]], timeout: float = 60) -> None:
    ext = client.ApiextensionsV1Api(api)
    for crd in crds:
        name = crd["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(name)
            crd = {**crd, "metadata": {**crd["metadata"],
                                       "resourceVersion": current.metadata.resource_version}}
            ext.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    pending = {c["metadata"]["name"] for c in crds}
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    if pending:
        raise TimeoutError(f"CRDs not established after {timeout}s: {sorted(pending)}")
