"""Building KubeVirt's control plane from its source (devenv/binaries.py) and reading its
manifests (devenv/kubevirt.py): which source is used, which version, which cache folder, and
what the manifests program's output must look like. Fake sources stand in for KubeVirt's."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from virtshift import cli
from virtshift.devenv import binaries, kubevirt
from virtshift.devenv.binaries import MissingBinaryError

V190 = ("v1.9.0", "79d34c1762169e5b0370ec491cef5ca12e6b504c")
V184 = ("v1.8.4", "dfaa398f086692d19e01be21d83a01036e07815f")
GO_MOD = "module kubevirt.io/kubevirt\n\ngo 1.22\n"
HELLO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("virt-controller (fake)") }\n'


def make_archive(folder: Path, release: tuple[str, str], name: str | None = None,
                 main: str | None = None) -> Path:
    """A KubeVirt-like archive: kubevirt/KUBEVIRT_VERSION among the first members, go.mod, and
    optionally a cmd/virt-controller main."""
    files = {"kubevirt/go.mod": GO_MOD, "kubevirt/KUBEVIRT_VERSION": " ".join(release) + "\n"}
    if main:
        files["kubevirt/cmd/virt-controller/main.go"] = main
    path = folder / (name or f"kubevirt-{release[0]}.tar.xz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:xz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tree(folder: Path, release: tuple[str, str] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "go.mod").write_text(GO_MOD)
    if release:
        (folder / "KUBEVIRT_VERSION").write_text(" ".join(release) + "\n")
    return folder


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KUBEVIRT_SRC, an empty shared folder and an empty cache, all in tmp_path."""
    monkeypatch.delenv("KUBEVIRT_SRC", raising=False)
    monkeypatch.setattr(binaries, "SHARED_KUBEVIRT_SRC", tmp_path / "shared" / "kubevirt-src")
    monkeypatch.setenv("VIRTSHIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize(("given", "expected"), [
    ("1.9.0", "v1.9.0"), ("v1.8.4", "v1.8.4"), (" 1.10.2 ", "v1.10.2"),
    ("1.9", None), ("latest", None), ("v1.9.0-rc.1", None), ("", None),
])
def test_version_names(given: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="not a KubeVirt release version"):
            binaries.normalize_kubevirt_version(given)
    else:
        assert binaries.normalize_kubevirt_version(given) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (f"{V190[0]} {V190[1]}\n", V190),
    (f"  {V184[0]}\t{V184[1]}", V184),
    ("v1.9.0", None), ("v1.9.0 79d34c1", None), (f"1.9.0 {V190[1]}", None), ("", None),
])
def test_kubevirt_version_file(text: str, expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(MissingBinaryError, match="unreadable KUBEVIRT_VERSION"):
            binaries.parse_kubevirt_version_file(text)
    else:
        assert binaries.parse_kubevirt_version_file(text) == expected


# -- which source --------------------------------------------------------------------------


def test_shared_archive_of_the_default_version(isolated: Path) -> None:
    shared = binaries.SHARED_KUBEVIRT_SRC
    make_archive(shared, V184)
    assert binaries.kubevirt_source() is None  # only 1.8.4 there; the default is 1.9.0
    archive = make_archive(shared, V190)
    source = binaries.kubevirt_source()
    assert source == binaries.KubeVirtSource(*V190, archive) and source.archive
    assert binaries.kubevirt_source("1.8.4").version == "v1.8.4"
    assert binaries.kubevirt_source("1.7.4") is None


def test_kubevirt_src_comes_first(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_archive(binaries.SHARED_KUBEVIRT_SRC, V190)
    mine = make_archive(isolated / "mine", V190, name="any-name.tar.xz")
    monkeypatch.setenv("KUBEVIRT_SRC", str(mine))
    assert binaries.kubevirt_source().path == mine


def test_kubevirt_src_archive_is_of_its_own_version(isolated: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEVIRT_SRC", str(make_archive(isolated / "a", V184)))
    assert binaries.kubevirt_source().version == "v1.8.4"  # no version asked: the source's
    assert binaries.kubevirt_source("v1.8.4").version == "v1.8.4"
    with pytest.raises(MissingBinaryError, match=r"is KubeVirt v1\.8\.4, not the requested "
                       r"v1\.9\.0"):
        binaries.kubevirt_source("1.9.0")


def test_kubevirt_src_folder_of_archives_picks_the_version(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = isolated / "archives"
    make_archive(folder, V190)
    make_archive(folder, V184)
    monkeypatch.setenv("KUBEVIRT_SRC", str(folder))
    assert binaries.kubevirt_source().version == "v1.9.0"
    assert binaries.kubevirt_source("1.8.4").version == "v1.8.4"
    with pytest.raises(MissingBinaryError, match=r"nor a folder holding kubevirt-v1\.7\.4"):
        binaries.kubevirt_source("1.7.4")


def test_kubevirt_src_tree_or_its_parent(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(isolated / "unpacked" / "kubevirt", V184)
    for given in (tree, tree.parent):
        monkeypatch.setenv("KUBEVIRT_SRC", str(given))
        source = binaries.kubevirt_source()
        assert source == binaries.KubeVirtSource(*V184, tree) and not source.archive


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_kubevirt_src_checkout_must_be_at_a_release_tag(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(isolated / "checkout", None)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "go.mod")
    git("commit", "-qm", "x")
    monkeypatch.setenv("KUBEVIRT_SRC", str(tree))
    with pytest.raises(MissingBinaryError, match="check out a release tag"):
        binaries.kubevirt_source()
    git("tag", "v1.8.4")
    assert binaries.kubevirt_source() == binaries.KubeVirtSource(
        "v1.8.4", git("rev-parse", "HEAD"), tree)


def test_kubevirt_src_not_an_archive(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = isolated / "kubevirt-v1.9.0.tar.xz"
    bogus.write_text("not xz")
    monkeypatch.setenv("KUBEVIRT_SRC", str(bogus))
    with pytest.raises(MissingBinaryError, match=r"is not a readable \.tar\.xz archive"):
        binaries.kubevirt_source()
    with tarfile.open(bogus, "w:xz") as tar:  # an archive, but not of KubeVirt
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    with pytest.raises(MissingBinaryError, match="holds no kubevirt/KUBEVIRT_VERSION"):
        binaries.kubevirt_source()


def test_kubevirt_src_naming_nothing_says_what_it_may_be(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEVIRT_SRC", str(isolated / "nowhere"))
    with pytest.raises(MissingBinaryError, match="is neither a KubeVirt source archive"):
        binaries.kubevirt_source()


# -- cache folders -------------------------------------------------------------------------


def test_cache_folder_is_named_by_version_and_commit(isolated: Path) -> None:
    archive = make_archive(binaries.SHARED_KUBEVIRT_SRC, V190)
    assert binaries.KubeVirtSource(*V190, archive).key == "v1.9.0-79d34c176216"
    tool = binaries._tool("virt-api")
    assert tool.cache_bin == isolated / "cache/virt-api-v1.9.0-79d34c176216/bin/virt-api"
    # The same tag rebuilt (another commit) is another build.
    make_archive(binaries.SHARED_KUBEVIRT_SRC, (V190[0], "0" * 40))
    assert binaries._tool("virt-api").cache_bin.parent.parent.name == "virt-api-v1.9.0-000000000000"


def test_without_a_source_the_cached_build_of_the_version_is_used(isolated: Path) -> None:
    assert binaries.find("virt-controller") is None
    with pytest.raises(MissingBinaryError, match="set KUBEVIRT_SRC to a kubevirt/kubevirt "
                       r"checkout at tag v1\.9\.0"):
        binaries.ensure("virt-controller")
    cached = isolated / "cache/virt-controller-v1.8.4-dfaa398f0866/bin/virt-controller"
    cached.parent.mkdir(parents=True)
    cached.write_text("")
    assert binaries.find("virt-controller") is None  # 1.9.0 asked by default
    assert binaries.ensure("virt-controller", kubevirt_version="1.8.4") == cached


def test_cli_says_what_to_set(isolated: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBEVIRT_SRC", str(make_archive(isolated / "a", V190)))
    assert cli.main(["binaries", "virt-api", "--kubevirt-version", "1.8.4"]) == 1
    assert "is KubeVirt v1.9.0, not the requested v1.8.4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["binaries", "virt-api", "--kubevirt-version", "nine"])
    assert "not a KubeVirt release version: 'nine'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("go") is None, reason="Go not installed")
def test_build_from_an_archive_unpacks_into_the_cache(isolated: Path) -> None:
    """The whole path with a tiny fake KubeVirt: unpacked once into the cache's src folder,
    built with the vendored-module flags into the folder named by version and commit."""
    make_archive(binaries.SHARED_KUBEVIRT_SRC, V184, main=HELLO)
    lines: list[str] = []
    built = binaries.ensure("virt-controller", lines.append, kubevirt_version="1.8.4")
    assert built == isolated / "cache/virt-controller-v1.8.4-dfaa398f0866/bin/virt-controller"
    assert subprocess.run([built], capture_output=True, text=True).stdout == (
        "virt-controller (fake)\n")
    assert (isolated / "cache/src/kubevirt-v1.8.4-dfaa398f0866/kubevirt/go.mod").is_file()
    assert not (binaries.SHARED_KUBEVIRT_SRC / "kubevirt").exists()
    assert any("from KubeVirt's source" in line for line in lines), lines
    assert binaries.ensure("virt-controller", lines.append, kubevirt_version="1.8.4") == built


# -- the manifests program's output ---------------------------------------------------------


def crd(kind: str, versions: list[tuple[str, bool, bool]]) -> dict:
    """As the program prints one: Go's zero values included."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{kind.lower()}s.kubevirt.io", "creationTimestamp": None,
                         "labels": {"kubevirt.io": ""}},
            "spec": {"group": "kubevirt.io", "names": {"kind": kind},
                     "versions": [{"name": n, "served": s, "storage": st}
                                  for n, s, st in versions]},
            "status": {"acceptedNames": {"kind": "", "plural": ""}, "storedVersions": None}}


def rbac(component: str) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": f"kubevirt-{component}", "namespace": "kubevirt"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": f"kubevirt-{component}", "creationTimestamp": None},
             "rules": []}]


def output(**changes: object) -> str:
    doc = {"crds": [crd("VirtualMachineInstance", [("v1", True, True), ("v1alpha3", True, False)]),
                    crd("KubeVirt", [("v1", True, True), ("v1alpha2", False, False)])],
           "validatingWebhookConfigurations": [{
               "apiVersion": "admissionregistration.k8s.io/v1",
               "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "virt-api-validator"},
               "webhooks": []}],
           "mutatingWebhookConfigurations": [{
               "apiVersion": "admissionregistration.k8s.io/v1",
               "kind": "MutatingWebhookConfiguration", "metadata": {"name": "virt-api-mutator"},
               "webhooks": []}],
           "rbac": {c: rbac(c) for c in ("controller", "apiServer", "handler")}}
    doc.update(changes)
    return yaml.safe_dump(doc)


def test_manifests_parse_into_objects_ready_to_create() -> None:
    parsed = kubevirt.parse_manifests(output())
    vmi = parsed.crd("VirtualMachineInstance")
    assert "status" not in vmi and vmi["metadata"] == {
        "name": "virtualmachineinstances.kubevirt.io", "labels": {"kubevirt.io": ""}}
    assert kubevirt.served_versions(vmi) == {"v1": True, "v1alpha3": False}
    assert kubevirt.served_versions(parsed.crd("KubeVirt")) == {"v1": True}
    assert [w["metadata"]["name"] for w in parsed.validating_webhooks] == ["virt-api-validator"]
    assert [w["metadata"]["name"] for w in parsed.mutating_webhooks] == ["virt-api-mutator"]
    assert sorted(parsed.rbac) == ["apiServer", "controller", "handler"]
    assert parsed.rbac["controller"][1]["metadata"] == {"name": "kubevirt-controller"}
    with pytest.raises(KeyError, match="no CRD of kind VirtualMachinePool"):
        parsed.crd("VirtualMachinePool")


@pytest.mark.parametrize(("changes", "error"), [
    ({"crds": []}, "no CRDs"),
    ({"rbac": {"controller": []}}, "expected RBAC of"),
    ({"crds": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}]},
     "crds: unexpected object"),
    ({"rbac": {"controller": [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}],
               "apiServer": [], "handler": []}}, "rbac: unexpected object"),
    ({"mutatingWebhookConfigurations": [{"apiVersion": "admissionregistration.k8s.io/v1",
                                         "kind": "MutatingWebhookConfiguration",
                                         "metadata": {}}]}, "without a name"),
])
def test_manifests_not_as_expected_are_refused(changes: dict, error: str) -> None:
    with pytest.raises(kubevirt.ManifestsError, match=error):
        kubevirt.parse_manifests(output(**changes))


def test_manifests_without_a_part_are_refused() -> None:
    doc = yaml.safe_load(output())
    del doc["mutatingWebhookConfigurations"]
    with pytest.raises(kubevirt.ManifestsError, match="expected the keys"):
        kubevirt.parse_manifests(yaml.safe_dump(doc))
    with pytest.raises(kubevirt.ManifestsError, match="expected the keys"):
        kubevirt.parse_manifests("- just a list\n")
