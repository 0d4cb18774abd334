"""What the chart checks need besides helm and kubeconform, made here without a download.

- The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule), from its Go module
  (``example/prometheus-operator-crd/``), so the chart's optional monitoring objects can be
  installed into the local control plane and validated.
- kubeconform's JSON schemas. Its default schemas live on GitHub, unreachable here; instead
  they are generated from the local kube-apiserver's own OpenAPI document (the same Kubernetes
  version the tests run, plus every CRD installed into it), in the layout of
  ``yannh/kubernetes-json-schema``'s ``-standalone-strict`` flavour: ``$ref``s inlined and
  ``additionalProperties: false`` on every object that lists its properties, so an unknown
  field is an error.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from virtshift.devenv.binaries import MissingBinaryError, _go, cache_root

PROMETHEUS_OPERATOR_VERSION = "v0.85.0"
MONITORING_CRDS = ("servicemonitors", "prometheusrules")
# kubeconform -schema-location: {{ .Group }} is the group ("v1" for the core group).
SCHEMA_TEMPLATE = "{{ .Group }}/{{ .ResourceKind }}-{{ .ResourceAPIVersion }}.json"


def monitoring_crds() -> list[dict[str, Any]]:
    """The ServiceMonitor and PrometheusRule CRDs of the Prometheus Operator."""
    go = _go()
    work = cache_root() / "src" / "prometheus-operator"
    work.mkdir(parents=True, exist_ok=True)
    module = f"github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR_VERSION}"
    out = subprocess.run([go, "mod", "download", "-json", module], cwd=work, capture_output=True,
                         text=True, check=False, env={**os.environ, "GOFLAGS": "-mod=mod"})
    found = re.search(r'"Dir":\s*"([^"]+)"', out.stdout)
    if out.returncode != 0 or not found:
        raise MissingBinaryError(f"cannot download {module}: {out.stdout[-800:]}{out.stderr}")
    folder = Path(found.group(1)) / "example" / "prometheus-operator-crd"
    return [yaml.safe_load((folder / f"monitoring.coreos.com_{name}.yaml").read_text())
            for name in MONITORING_CRDS]


def _strict(schema: Any, definitions: dict[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(schema, list):
        return [_strict(s, definitions, stack) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        if name in stack:  # a recursive type (JSONSchemaProps): accept anything below
            return {}
        return _strict(definitions[name], definitions, (*stack, name))
    out = {k: _strict(v, definitions, stack) if k in (
        "items", "additionalProperties", "allOf", "anyOf", "oneOf", "not")
        else v for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _strict(v, definitions, stack)
                             for k, v in schema["properties"].items()}
    if out.get("format") == "int-or-string" or out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.pop("format", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    elif out.get("format") == "quantity":  # resource.Quantity: "100m", or a bare number
        out.pop("type", None)
        out["oneOf"] = [{"type": "string"}, {"type": "number"}]
    if out.get("type") == "object" and "properties" in out and \
            "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    # The API server accepts null for optional fields; so should the schema.
    if isinstance(out.get("type"), str) and out["type"] != "null":
        out["type"] = [out["type"], "null"]
    return out


def write_schemas(openapi_v2: dict[str, Any], kinds: set[tuple[str, str, str]],
                  out: Path) -> list[Path]:
    """Write a standalone strict JSON schema for each (group, version, kind) of ``kinds``
    found in the API server's OpenAPI v2 document; returns the files written."""
    definitions = openapi_v2["definitions"]
    written = []
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind") or []:
            key = (gvk.get("group", ""), gvk["version"], gvk["kind"])
            if key not in kinds:
                continue
            schema = _strict(copy.deepcopy(definition), definitions, (name,))
            schema["$schema"] = "http://json-schema.org/schema#"
            path = out / (key[0] or key[1]) / f"{key[2].lower()}-{key[1]}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema))
            written.append(path)
    return written


def kinds_of(documents: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, version, kind) of rendered objects."""
    out = set()
    for doc in documents:
        group, _, version = doc["apiVersion"].rpartition("/")
        out.add((group, version, doc["kind"]))
    return out
