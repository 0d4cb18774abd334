"""What the caches keep of each object: only the fields the operator reads. At thousands of
VMs the caches are most of the operator's memory; a launcher pod's spec (containers, volumes,
environment) and a PersistentVolume's source are large and never read here.

A transform returns a new (or trimmed) object of the same shape, so every reader works on it as
on the full object. A field read from a cached object must be kept here."""

from __future__ import annotations

from typing import Any

from virtshift.k8s.rest import JSON

# Metadata every cached object keeps (resourceVersion orders writes; uid tells incarnations).
_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
         "deletionTimestamp", "labels", "ownerReferences")


def slim(obj: JSON) -> JSON:
    """All but the managedFields, which nothing here reads and which are often the largest
    part of an object."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _meta(obj: JSON, annotations: tuple[str, ...] | None) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out = {k: meta[k] for k in _META if k in meta}
    kept = meta.get("annotations") or {}
    if annotations is not None:
        kept = {k: v for k, v in kept.items() if k in annotations}
    if kept:
        out["annotations"] = kept
    return out


# Read from a launcher pod: its VMI (views.pod_info, runtime._route), node, node selector
# (the CPU model KubeVirt keeps across moves), requests (cluster.usage), phase and deletion.
LAUNCHER_ANNOTATIONS = ("kubevirt.io/domain", "kubernetes.io/config.mirror")


def launcher(pod: JSON) -> JSON:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    out_spec: dict[str, Any] = {"containers": [
        {"name": c.get("name"), "resources": {"requests": (c.get("resources") or {}).get(
            "requests") or {}}} for c in spec.get("containers") or []]}
    for key in ("nodeName", "nodeSelector"):
        if key in spec:
            out_spec[key] = spec[key]
    return {"metadata": _meta(pod, LAUNCHER_ANNOTATIONS), "spec": out_spec,
            "status": {"phase": status["phase"]} if "phase" in status else {}}


def persistent_volume(pv: JSON) -> JSON:
    """Read from a PV: the node its required nodeAffinity pins it to (views.claim_info)."""
    spec = pv.get("spec") or {}
    return {"metadata": _meta(pv, ()),
            "spec": {"nodeAffinity": spec["nodeAffinity"]} if "nodeAffinity" in spec else {}}
