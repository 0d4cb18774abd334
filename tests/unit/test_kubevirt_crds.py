"""The KubeVirt stand-in CRDs keep the structure of KubeVirt's real ones.

Schemas aside (the stand-ins keep any field), everything that changes how the API server
treats an object must match: a status subresource where KubeVirt has one and nowhere else
(issue 8: a VMI status subresource silently dropped the simulator's VMI status writes), the
names kubectl resolves, scope, served and storage versions, printer columns, required fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virtshift.devenv import crds
from virtshift.k8s import rest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ABSENT = "<absent>"


def structure(crd: dict[str, Any]) -> dict[str, Any]:
    """The properties of a CRD compared here, flattened to ``path -> value``."""
    spec = crd["spec"]
    out: dict[str, Any] = {"group": spec["group"], "scope": spec["scope"],
                           "conversion": spec.get("conversion", ABSENT),
                           "preserveUnknownFields": spec.get("preserveUnknownFields", False)}
    out.update({f"names.{key}": value for key, value in spec["names"].items()})
    out["versions"] = [v["name"] for v in spec["versions"]]
    for version in spec["versions"]:
        at = f"versions[{version['name']}]"
        subresources = version.get("subresources") or {}
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        props = schema.get("properties") or {}
        out |= {
            f"{at}.served": version["served"],
            f"{at}.storage": version["storage"],
            f"{at}.deprecated": version.get("deprecated", False),
            f"{at}.deprecationWarning": version.get("deprecationWarning", ABSENT),
            f"{at}.subresources.status": "status" in subresources,
            f"{at}.subresources.scale": subresources.get("scale", ABSENT),
            f"{at}.additionalPrinterColumns": version.get("additionalPrinterColumns", []),
            f"{at}.selectableFields": version.get("selectableFields", []),
            f"{at}.schema.required": sorted(schema.get("required", [])),
            f"{at}.schema.spec.required": sorted(props.get("spec", {}).get("required", [])),
            f"{at}.schema.spec.nullable": props.get("spec", {}).get("nullable", False),
            f"{at}.schema.status.nullable": props.get("status", {}).get("nullable", False),
        }
    return out


def differences(fallback: dict[str, Any], real: dict[str, Any]) -> list[str]:
    ours, theirs = structure(fallback), structure(real)
    kind = real["spec"]["names"]["kind"]
    return [f"{kind}: {key}: stand-in {ours.get(key, ABSENT)!r} != real {theirs.get(key, ABSENT)!r}"
            for key in sorted(ours.keys() | theirs.keys())
            if ours.get(key, ABSENT) != theirs.get(key, ABSENT)]


def by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs}


def test_stand_ins_match_kubevirts_real_crds() -> None:
    folder = crds.real_kubevirt_crds_dir()
    if folder is None:
        if IN_CI:
            pytest.fail(f"CI=true and KubeVirt's real CRDs are missing ({crds.SHARED_CRDS}, or "
                        "KUBEVIRT_CRDS_DIR): nothing to compare the stand-ins with")
        pytest.skip(f"KubeVirt's real CRDs not found ({crds.SHARED_CRDS}); "
                    "the stand-ins' own invariants are still checked below")
    real = by_name(crds.load_yaml_docs(folder.glob("*.yaml")))
    fallback = by_name(crds.minimal_kubevirt_crds())
    diffs = [f"{name}: KubeVirt has this CRD, the stand-ins do not"
             for name in sorted(real.keys() - fallback.keys())]
    diffs += [f"{name}: a stand-in for a CRD KubeVirt does not have"
              for name in sorted(fallback.keys() - real.keys())]
    for name in sorted(fallback.keys() & real.keys()):
        diffs += differences(fallback[name], real[name])
    assert not diffs, f"the stand-ins differ from {folder}:\n" + "\n".join(diffs)


def test_comparison_names_kind_and_property() -> None:
    """The comparison itself: a status subresource on the VMI is caught and named."""
    stand_ins = by_name(crds.minimal_kubevirt_crds())
    vmi = stand_ins["virtualmachineinstances.kubevirt.io"]
    broken = {**vmi, "spec": {**vmi["spec"], "versions": [
        {**vmi["spec"]["versions"][0], "subresources": {"status": {}}}]}}
    assert differences(broken, vmi) == [
        "VirtualMachineInstance: versions[v1].subresources.status: stand-in True != real False"]


# What the stand-ins must get right even where there is nothing to compare them with.
STATUS_SUBRESOURCE = {
    "VirtualMachineInstance": False,  # virt-handler writes VMI status with the VMI itself
    "VirtualMachine": True,
    "VirtualMachineInstanceMigration": True,
    "KubeVirt": True,
    "MigrationPolicy": True,
}


def test_only_the_vmi_lacks_a_status_subresource() -> None:
    for crd in crds.minimal_kubevirt_crds():
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            has = "status" in (version.get("subresources") or {})
            assert has == STATUS_SUBRESOURCE[kind], f"{kind} {version['name']}: status {has}"


def test_stand_ins_serve_every_version_virtshift_uses() -> None:
    stand_ins = by_name(crds.minimal_kubevirt_crds())
    used = [rest.VMS, rest.VMIS, rest.VMIMS, rest.KUBEVIRTS, rest.KUBEVIRT_POLICIES]
    assert sorted(stand_ins) == sorted(f"{r.plural}.{r.group}" for r in used)
    for res in used:
        crd = stand_ins[f"{res.plural}.{res.group}"]
        assert crd["spec"]["scope"] == ("Namespaced" if res.namespaced else "Cluster"), res
        versions = crd["spec"]["versions"]
        assert [v["name"] for v in versions if v["served"]].count(res.version) == 1, res
        assert sum(v["storage"] for v in versions) == 1, res


def test_stand_in_schemas_are_structural_and_permissive() -> None:
    for crd in crds.minimal_kubevirt_crds():
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert schema["type"] == "object" and schema["required"] == ["spec"]
            for node in (schema, *schema["properties"].values()):
                assert node["type"] == "object"
                assert node["x-kubernetes-preserve-unknown-fields"] is True


def test_kubevirt_crds_dir_none_forces_the_stand_ins(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("kind: CustomResourceDefinition\nmetadata: {name: x}\n")
    monkeypatch.setenv("KUBEVIRT_CRDS_DIR", str(tmp_path))
    assert crds.kubevirt_crds_dir() == tmp_path
    docs, source = crds.kubevirt_crds()
    assert [d["metadata"]["name"] for d in docs] == ["x"] and str(tmp_path) in source
    docs, source = crds.kubevirt_crds(fallback=True)
    assert docs == crds.minimal_kubevirt_crds() and "forced" in source

    monkeypatch.setenv("KUBEVIRT_CRDS_DIR", "none")
    assert crds.kubevirt_crds_dir() is None
    docs, source = crds.kubevirt_crds()
    assert docs == crds.minimal_kubevirt_crds() and "forced" in source
    expected = crds.SHARED_CRDS if crds.SHARED_CRDS.is_dir() else None
    assert crds.real_kubevirt_crds_dir() == expected

    monkeypatch.setenv("KUBEVIRT_CRDS_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        crds.kubevirt_crds_dir()
