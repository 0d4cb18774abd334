"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic models.

One source of truth: the models validate in Python and render the structural OpenAPI schema
the API server enforces (types, descriptions, defaults, patterns, ranges, CEL rules). Every
field must carry a description, so ``kubectl explain`` teaches all of them.
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from virtshift.api.migrationpolicy import MigrationPolicy
from virtshift.api.nodedrain import NodeDrain

GROUP = "virtshift.io"
VERSION = "v1alpha1"


class SchemaError(TypeError):
    pass


def _apply_constraints(schema: dict[str, Any], meta: list[Any]) -> None:
    for m in meta:
        if isinstance(m, FieldInfo):
            _apply_constraints(schema, list(m.metadata))
            if isinstance(m.json_schema_extra, dict):
                _merge_extra(schema, m.json_schema_extra)
        elif isinstance(m, annotated_types.Ge):
            schema["minimum"] = m.ge
        elif isinstance(m, annotated_types.Le):
            schema["maximum"] = m.le
        elif isinstance(m, annotated_types.MinLen):
            schema["minItems" if schema.get("type") == "array" else "minLength"] = m.min_length
        elif isinstance(m, annotated_types.MaxLen):
            schema["maxItems" if schema.get("type") == "array" else "maxLength"] = m.max_length
        elif getattr(m, "pattern", None):
            schema["pattern"] = m.pattern


def _merge_extra(schema: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if key == "x-kubernetes-validations":
            schema.setdefault(key, []).extend(value)
        else:
            schema[key] = value


def _type_schema(tp: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        schema = _type_schema(base, where)
        _apply_constraints(schema, meta)
        return schema
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise SchemaError(f"{where}: unions other than Optional are not structural")
        return _type_schema(args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(item, f"{where}[]")}
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        if not args:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "additionalProperties": _type_schema(args[1], f"{where}{{}}")}
    if origin is Literal:
        return {"type": "string", "enum": list(typing.get_args(tp))}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_schema(tp, where)
    simple = {str: "string", bool: "boolean", int: "integer", float: "number"}
    if tp in simple:
        out: dict[str, Any] = {"type": simple[tp]}
        if tp is int:
            out["format"] = "int64"
        return out
    raise SchemaError(f"{where}: no schema for {tp!r}")


def _field_schema(name: str, info: FieldInfo, where: str) -> dict[str, Any]:
    schema = _type_schema(info.annotation, where)
    _apply_constraints(schema, list(info.metadata))
    if isinstance(info.json_schema_extra, dict):
        _merge_extra(schema, info.json_schema_extra)
    if not info.description:
        raise SchemaError(f"{where}: every field needs a description (kubectl explain shows it)")
    schema["description"] = info.description
    default = info.get_default(call_default_factory=True)
    if default is not None and default is not PydanticUndefined and default != []:
        if isinstance(default, BaseModel):
            default = default.model_dump(by_alias=True, exclude_none=True, mode="json")
        elif isinstance(default, list):
            default = [d.value if isinstance(d, enum.Enum) else d for d in default]
        elif isinstance(default, enum.Enum):
            default = default.value
        schema["default"] = default
    return schema


def model_schema(model: type[BaseModel], where: str = "") -> dict[str, Any]:
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        props[wire] = _field_schema(name, info, f"{where}.{wire}")
        if info.is_required():
            required.append(wire)
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    extra = model.model_config.get("json_schema_extra")
    if isinstance(extra, dict):
        _merge_extra(schema, extra)
    if model.__doc__ and where == "":
        schema["description"] = " ".join(model.__doc__.split())
    return schema


@dataclass(frozen=True)
class Kind:
    model: type[BaseModel]
    plural: str
    singular: str
    short_names: list[str]
    columns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.__name__


def _root_schema(kind: Kind) -> dict[str, Any]:
    schema = model_schema(kind.model)
    # The API server owns metadata's schema and forbids anything but the type here.
    schema["properties"]["metadata"] = {"type": "object"}
    for key in ("apiVersion", "kind"):
        schema["properties"][key].pop("default", None)
    schema["required"] = ["spec"]
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "virtshift", "app.kubernetes.io/part-of":
                       "virtshift"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": kind.name,
                "listKind": f"{kind.name}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": kind.short_names,
                "categories": ["virtshift"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *kind.columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": _root_schema(kind)},
                }
            ],
        },
    }


def _condition_column(name: str, cond: str) -> dict[str, Any]:
    return {"name": name, "type": "string",
            "jsonPath": f'.status.conditions[?(@.type=="{cond}")].status'}


KINDS = [
    Kind(
        NodeDrain, "nodedrains", "nodedrain", ["nd", "vsdrain"],
        [
            {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "ETA", "type": "string", "jsonPath": ".status.eta"},
            _condition_column("Ready", "Ready"),
            {"name": "Selector", "type": "string", "jsonPath": ".spec.nodeSelector",
             "priority": 1},
        ],
    ),
    Kind(
        MigrationPolicy, "migrationpolicies", "migrationpolicy", ["vsmp", "vspolicy"],
        [
            {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
            {"name": "Matched", "type": "integer", "jsonPath": ".status.matchedVMs"},
            {"name": "In-Flight", "type": "integer", "jsonPath": ".status.inFlight"},
            _condition_column("Ready", "Ready"),
            {"name": "Max-Downtime", "type": "string", "jsonPath": ".spec.maxDowntime",
             "priority": 1},
        ],
    ),
]


def all_crds() -> dict[str, dict[str, Any]]:
    """File name (as in crds/) -> CRD object."""
    return {f"{GROUP}_{k.plural}.yaml": crd(k) for k in KINDS}
