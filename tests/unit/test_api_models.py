"""The CRDs in crds/ are exactly what the API models generate, and they are complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from virtshift.api.crdgen import KINDS, all_crds
from virtshift.api.migrationpolicy import MigrationPolicy
from virtshift.api.nodedrain import NodeDrain
from virtshift.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_crd_files_are_generated_from_the_models() -> None:
    assert main(["crds", "--out", str(REPO / "crds"), "--check"]) == 0
    for filename, generated in all_crds().items():
        assert yaml.safe_load((REPO / "crds" / filename).read_text()) == generated


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_every_field_has_a_description_and_a_type(kind) -> None:
    root = all_crds()[f"virtshift.io_{kind.plural}.yaml"]["spec"]["versions"][0]
    for path, node in _walk(root["schema"]["openAPIV3Schema"], kind.name):
        if path.endswith(("[]", "{}", ".metadata")):
            continue
        assert node.get("description"), path
        assert node.get("type"), path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_names_do_not_collide_with_kubevirt(kind) -> None:
    names = all_crds()[f"virtshift.io_{kind.plural}.yaml"]["spec"]["names"]
    kubevirt_short_names = {"vm", "vms", "vmi", "vmis", "vmim", "vmims", "kv", "kvs", "vmipreset",
                            "vmirs", "mp", "migrationpolicy"}
    assert not set(names["shortNames"]) & kubevirt_short_names
    assert names["categories"] == ["virtshift"]


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_into_the_models(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    model = {"NodeDrain": NodeDrain, "MigrationPolicy": MigrationPolicy}[doc["kind"]]
    parsed = model.model_validate(doc)
    wire = parsed.spec.wire()
    for key, value in doc["spec"].items():
        assert wire[key] == value, key
