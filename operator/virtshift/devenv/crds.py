"""Install CRDs into a (local) cluster: ours, and KubeVirt's real ones or a minimal stand-in."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

REPO_ROOT = Path(__file__).resolve().parents[3]
OUR_CRDS = REPO_ROOT / "crds"

# The KubeVirt kinds virtshift reads or writes: (group, version, kind, plural, scope, short names)
KUBEVIRT_KINDS = [
    ("kubevirt.io", "v1", "KubeVirt", "kubevirts", "Namespaced", ["kv"]),
    ("kubevirt.io", "v1", "VirtualMachine", "virtualmachines", "Namespaced", ["vm"]),
    ("kubevirt.io", "v1", "VirtualMachineInstance", "virtualmachineinstances", "Namespaced",
     ["vmi"]),
    ("kubevirt.io", "v1", "VirtualMachineInstanceMigration", "virtualmachineinstancemigrations",
     "Namespaced", ["vmim"]),
    ("migrations.kubevirt.io", "v1alpha1", "MigrationPolicy", "migrationpolicies", "Cluster", []),
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
    """Permissive stand-ins for machines without KubeVirt's real schemas."""
    out = []
    for group, version, kind, plural, scope, short in KUBEVIRT_KINDS:
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {
                "group": group,
                "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                          "shortNames": short},
                "versions": [{
                    "name": version, "served": True, "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }],
            },
        })
    return out


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
