"""Find or build the control-plane binaries and chart tools: kube-apiserver, etcd, kubectl,
helm, kubeconform; and KubeVirt's own virt-controller and virt-api (plus virtshift's program that
prints KubeVirt's manifests, ``kubevirt-manifests``), per KubeVirt version.

Order of search, following controller-runtime's envtest: ``$KUBEBUILDER_ASSETS`` first, then
our versioned cache folder, then (kubectl and helm only) ``PATH``; failing all, the binary is
built from Go modules into the cache. Nothing is downloaded but Go modules.

KubeVirt's Go modules are not served by the module proxy, but its source vendors them: its
binaries are built offline from a KubeVirt source (``$KUBEVIRT_SRC``, else the shared archive
beside the checkout; see ``kubevirt_source``), each into a cache folder named by the KubeVirt
version and the source's commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
KUBECONFORM_VERSION = "v0.8.0"
# The KubeVirt releases the shared source archives hold; the first is the default.
KUBEVIRT_VERSIONS = ("v1.9.0", "v1.8.4")
REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_KUBEVIRT_SRC = REPO_ROOT.parent / "shared" / "kubevirt-src"
# The Go program (virtshift's) that prints KubeVirt's manifests: package data, built inside the
# KubeVirt tree as this package.
MANIFESTS_MAIN = Path(__file__).with_name("kubevirt_manifests.go")
MANIFESTS_PACKAGE = "./cmd/virtshift-manifests"


class MissingBinaryError(RuntimeError):
    """A binary is neither present nor buildable; the message says what to install."""


def cache_root() -> Path:
    explicit = os.environ.get("VIRTSHIFT_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "virtshift"


@dataclass(frozen=True)
class Tool:
    name: str
    version: str
    from_path: bool  # whether a copy on PATH is acceptable (clients only)
    source: str  # the Go module folder it is built in; tools built together share one
    build: Callable[[Path, Path, Callable[[str], None]], None]
    flavour: str = ""  # a build setting that changes the binary: part of its cache folder
    origin: str = "Go modules"  # what it is built from, for the progress lines

    @property
    def cache_bin(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}{self.flavour}" / "bin" / self.name


def _run(cmd: list[str], cwd: Path, log: Callable[[str], None], what: str,
         env_overrides: dict[str, str] | None = None) -> None:
    """Run a go command, streaming a progress line per hundred packages compiled."""
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", **(env_overrides or {})}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for count, line in enumerate(proc.stdout, start=1):
        tail = [*tail[-30:], line.rstrip()]
        if count % 100 == 0:
            log(f"  {what}: {count} steps, {time.monotonic() - started:.0f}s")
    if proc.wait() != 0:
        raise MissingBinaryError(f"{what} failed ({' '.join(cmd)}):\n" + "\n".join(tail))


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise MissingBinaryError(
            "Go is not installed, so the control-plane binaries cannot be built. Either install "
            "Go (1.26 or newer) or set KUBEBUILDER_ASSETS to a folder holding kube-apiserver, "
            "etcd and kubectl (as controller-runtime's setup-envtest provides)."
        )
    return go


def _staging_modules(go: str, srcdir: Path, log: Callable[[str], None]) -> list[str]:
    """k8s.io/kubernetes requires its staging modules at v0.0.0; list them from its go.mod."""
    out = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=srcdir, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise MissingBinaryError(f"cannot download k8s.io/kubernetes: {out.stderr.strip()}")
    gomod = re.search(r'"GoMod":\s*"([^"]+)"', out.stdout)
    assert gomod, out.stdout
    text = Path(gomod.group(1)).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+) v0\.0\.0\s*$", text, re.M)))


def _build_kubernetes(srcdir: Path, out: Path, log: Callable[[str], None]) -> None:
    """Build kube-apiserver and kubectl from one wrapper module (they share the module graph)."""
    go = _go()
    srcdir.mkdir(parents=True, exist_ok=True)
    (srcdir / "go.mod").write_text("module virtshift.local/kube\n\ngo 1.26.0\n")
    staging_version = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
    replaces = "\n".join(
        f"\t{m} => {m} {staging_version}" for m in _staging_modules(go, srcdir, log)
    )
    (srcdir / "go.mod").write_text(
        "module virtshift.local/kube\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{replaces}\n)\n"
    )
    (srcdir / "tools.go").write_text(
        "//go:build tools\n\npackage tools\n\nimport (\n"
        '\t_ "k8s.io/kubernetes/cmd/kube-apiserver"\n\t_ "k8s.io/kubernetes/cmd/kubectl"\n)\n'
    )
    log(f"  resolving Go modules for Kubernetes {KUBERNETES_VERSION}")
    _run([go, "mod", "tidy"], srcdir, log, "go mod tidy")
    # Stamp the release into the binaries, as Kubernetes' own build does (hack/lib/version.sh):
    # unstamped, /version says v0.0.0-master and Helm refuses a chart's kubeVersion.
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    stamp = " ".join(
        f"-X {pkg}.{var}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for var, value in (("gitVersion", KUBERNETES_VERSION), ("gitMajor", major),
                           ("gitMinor", minor), ("gitTreeState", "clean")))
    for name in ("kube-apiserver", "kubectl"):
        target = TOOLS[name].cache_bin
        target.parent.mkdir(parents=True, exist_ok=True)
        _go_build(go, srcdir, f"k8s.io/kubernetes/cmd/{name}", target, log, stamp)


def _go_build(go: str, srcdir: Path, package: str, target: Path, log: Callable[[str], None],
              ldflags: str = ""):
    partial = target.with_suffix(".partial")
    _run(
        [go, "build", "-v", "-trimpath", f"-ldflags=-s -w {ldflags}".strip(), "-o", str(partial),
         package],
        srcdir, log, f"go build {package.rsplit('/', 1)[-1]}",
    )
    partial.replace(target)


def _build_etcd(srcdir: Path, out: Path, log: Callable[[str], None]) -> None:
    go = _go()
    srcdir.mkdir(parents=True, exist_ok=True)
    (srcdir / "go.mod").write_text(
        "module virtshift.local/etcd\n\ngo 1.26.0\n\n"
        f"require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    )
    (srcdir / "main.go").write_text(
        "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\n"
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    log(f"  resolving Go modules for etcd {ETCD_VERSION}")
    _run([go, "mod", "tidy"], srcdir, log, "go mod tidy")
    _go_build(go, srcdir, ".", out, log)


def _go_install(module: str, out: Path, srcdir: Path, log: Callable[[str], None]) -> None:
    """``go install module@version`` with GOBIN set to the cache folder of ``out``."""
    go = _go()
    srcdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOBIN": str(out.parent)}
    log(f"  go install {module}")
    proc = subprocess.run(
        [go, "install", "-trimpath", "-ldflags=-s -w", module],
        cwd=srcdir, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise MissingBinaryError(f"go install {module} failed:\n{proc.stderr[-3000:]}")


def _build_helm(srcdir: Path, out: Path, log: Callable[[str], None]) -> None:
    _go_install(f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}", out, srcdir, log)


def _build_kubeconform(srcdir: Path, out: Path, log: Callable[[str], None]) -> None:
    _go_install(f"github.com/yannh/kubeconform/cmd/kubeconform@{KUBECONFORM_VERSION}", out,
                srcdir, log)


# -- KubeVirt: virt-controller, virt-api and the manifests program, from KubeVirt's source -----


@dataclass(frozen=True)
class KubeVirtSource:
    """One KubeVirt source: a release archive (``kubevirt-v<version>.tar.xz``, holding
    ``kubevirt/``) or a source tree (a checkout of kubevirt/kubevirt at a release tag, or an
    unpacked archive), with the release and commit it is of."""

    version: str  # "v1.9.0"
    commit: str  # the full git commit of the tag
    path: Path  # the archive file, or the tree (the folder holding go.mod)

    @property
    def archive(self) -> bool:
        return self.path.is_file()

    @property
    def key(self) -> str:
        """What names its cache folders: a rebuilt tag (another commit) is another build."""
        return f"{self.version}-{self.commit[:12]}"


def normalize_kubevirt_version(version: str) -> str:
    """``1.9.0`` or ``v1.9.0`` -> ``v1.9.0``; anything but a release version is refused."""
    match = re.fullmatch(r"v?(\d+\.\d+\.\d+)", version.strip())
    if not match:
        raise ValueError(f"not a KubeVirt release version: {version!r} (e.g. 1.9.0)")
    return f"v{match.group(1)}"


def parse_kubevirt_version_file(text: str) -> tuple[str, str]:
    """The release and commit a ``KUBEVIRT_VERSION`` file names (``v1.9.0 <40 hex>``)."""
    match = re.fullmatch(r"(v\d+\.\d+\.\d+)\s+([0-9a-f]{40})", text.strip())
    if not match:
        raise MissingBinaryError(f"unreadable KUBEVIRT_VERSION: {text.strip()!r} "
                                 "(expected 'v<x.y.z> <commit>')")
    return match.group(1), match.group(2)


def _kubevirt_tree(folder: Path) -> Path | None:
    """``folder`` itself when it is KubeVirt's module root, or its ``kubevirt/`` (an unpacked
    archive's layout); else None."""
    for tree in (folder, folder / "kubevirt"):
        gomod = tree / "go.mod"
        if gomod.is_file() and re.search(r"^module kubevirt\.io/kubevirt\s*$",
                                         gomod.read_text(), re.M):
            return tree
    return None


@functools.lru_cache(maxsize=16)
def _archive_identity(path: Path, mtime_ns: int, size: int) -> tuple[str, str]:
    """The archive's ``kubevirt/KUBEVIRT_VERSION`` (streamed: it is among the first members);
    cached per file state, as reading it decompresses."""
    try:
        with tarfile.open(path, "r|xz") as tar:
            for member in tar:
                if member.name.removeprefix("./") == "kubevirt/KUBEVIRT_VERSION":
                    data = tar.extractfile(member)
                    assert data is not None
                    return parse_kubevirt_version_file(data.read().decode())
    except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        raise MissingBinaryError(f"{path} is not a readable .tar.xz archive: {exc}") from exc
    raise MissingBinaryError(f"{path} holds no kubevirt/KUBEVIRT_VERSION: not a KubeVirt "
                             "source archive")


def _tree_identity(tree: Path) -> tuple[str, str]:
    """An unpacked archive names itself in KUBEVIRT_VERSION; a checkout by its exact tag."""
    version_file = tree / "KUBEVIRT_VERSION"
    if version_file.is_file():
        return parse_kubevirt_version_file(version_file.read_text())

    def git(*args: str) -> str:
        if not shutil.which("git"):
            return ""
        out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    tag, commit = git("describe", "--tags", "--exact-match", "HEAD"), git("rev-parse", "HEAD")
    if not commit or not re.fullmatch(r"v\d+\.\d+\.\d+", tag):
        raise MissingBinaryError(
            f"{tree} is a KubeVirt tree but neither has a KUBEVIRT_VERSION file nor is a git "
            f"checkout at a release tag (HEAD {commit or 'unknown'}, tag {tag or 'none'}): "
            "check out a release tag, e.g. git checkout v1.9.0")
    return tag, commit


def _source_at(path: Path, version: str | None) -> KubeVirtSource:
    """The source ``$KUBEVIRT_SRC`` names: an archive, a tree, or a folder of archives."""
    if path.is_file():
        return KubeVirtSource(*_archive_identity(path, *_file_state(path)), path)
    if path.is_dir():
        if tree := _kubevirt_tree(path):
            return KubeVirtSource(*_tree_identity(tree), tree)
        archive = path / f"kubevirt-{version or KUBEVIRT_VERSIONS[0]}.tar.xz"
        if archive.is_file():
            return KubeVirtSource(*_archive_identity(archive, *_file_state(archive)), archive)
    raise MissingBinaryError(
        f"KUBEVIRT_SRC={path} is neither a KubeVirt source archive (kubevirt-v<x.y.z>.tar.xz), "
        "a KubeVirt source tree (a kubevirt/kubevirt checkout at a release tag), nor a folder "
        f"holding kubevirt-{version or KUBEVIRT_VERSIONS[0]}.tar.xz")


def _file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def kubevirt_source(version: str | None = None) -> KubeVirtSource | None:
    """The KubeVirt source to build ``version`` (default: what ``$KUBEVIRT_SRC`` is of, else
    ``KUBEVIRT_VERSIONS[0]``) from, or None when there is none.

    ``$KUBEVIRT_SRC`` first (an archive, a tree, or a folder holding
    ``kubevirt-v<version>.tar.xz``; it must be of the requested version); else the shared
    archive ``../shared/kubevirt-src/kubevirt-v<version>.tar.xz`` beside the checkout.
    """
    wanted = normalize_kubevirt_version(version) if version else None
    explicit = os.environ.get("KUBEVIRT_SRC", "").strip()
    if explicit:
        source = _source_at(Path(explicit).expanduser().resolve(), wanted)
        if wanted and source.version != wanted:
            raise MissingBinaryError(
                f"KUBEVIRT_SRC={explicit} is KubeVirt {source.version}, not the requested "
                f"{wanted}: point KUBEVIRT_SRC at a {wanted} source, or ask for "
                f"{source.version}")
        return source
    shared = SHARED_KUBEVIRT_SRC / f"kubevirt-{wanted or KUBEVIRT_VERSIONS[0]}.tar.xz"
    if shared.is_file():
        return KubeVirtSource(*_archive_identity(shared, *_file_state(shared)), shared)
    return None


def no_kubevirt_source_message(version: str | None = None) -> str:
    wanted = normalize_kubevirt_version(version) if version else KUBEVIRT_VERSIONS[0]
    return (f"no KubeVirt {wanted} source found: set KUBEVIRT_SRC to a kubevirt/kubevirt "
            f"checkout at tag {wanted}, to kubevirt-{wanted}.tar.xz, or to a folder holding it "
            f"(looked for {SHARED_KUBEVIRT_SRC / f'kubevirt-{wanted}.tar.xz'})")


def _unpacked_tree(source: KubeVirtSource, srcdir: Path, log: Callable[[str], None]) -> Path:
    """The source tree to build in: a tree as it is; an archive unpacked into ``srcdir`` (in
    the cache, once; a half-done unpack is redone)."""
    if not source.archive:
        return source.path
    tree, done = srcdir / "kubevirt", srcdir / ".unpacked"
    if done.is_file():
        return tree
    log(f"  unpacking {source.path} into {srcdir}")
    shutil.rmtree(srcdir, ignore_errors=True)
    srcdir.mkdir(parents=True)
    with tarfile.open(source.path, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths outside
            tar.extractall(srcdir, filter="data")
        else:
            tar.extractall(srcdir)  # older Pythons: no filters
    if _kubevirt_tree(srcdir) != tree:
        raise MissingBinaryError(f"{source.path} holds no kubevirt/go.mod of kubevirt.io/kubevirt")
    done.write_text(source.key + "\n")
    return tree


def _build_kubevirt(source: KubeVirtSource, package: str, srcdir: Path, out: Path,
                    log: Callable[[str], None]) -> None:
    """``GOFLAGS=-mod=vendor CGO_ENABLED=0 go build`` of one package inside KubeVirt's tree, its
    release stamped as KubeVirt's own build does (hack/version.sh). The manifests program is
    added to the tree with ``-overlay``, so a checkout given as KUBEVIRT_SRC is never written."""
    go = _go()
    tree = _unpacked_tree(source, srcdir, log)
    extra: list[str] = []
    if package == MANIFESTS_PACKAGE:
        overlay = out.parent / "overlay.json"
        overlay.write_text(json.dumps({"Replace": {
            str(tree / package / "main.go"): str(MANIFESTS_MAIN)}}))
        extra = [f"-overlay={overlay}"]
    stamp = " ".join(f"-X kubevirt.io/client-go/version.{var}={value}" for var, value in (
        ("gitVersion", source.version), ("gitCommit", source.commit), ("gitTreeState", "clean")))
    partial = out.with_suffix(".partial")
    _run([go, "build", "-v", "-trimpath", f"-ldflags=-s -w {stamp}", *extra, "-o", str(partial),
          package], tree, log, f"go build {out.name}",
         # Vendored: nothing is fetched, nor is another Go toolchain.
         {"GOFLAGS": "-mod=vendor", "GOTOOLCHAIN": "local", "GOPROXY": "off"})
    partial.replace(out)


# What of KubeVirt's tree each KubeVirt tool is built from.
KUBEVIRT_PACKAGES = {"virt-controller": "./cmd/virt-controller", "virt-api": "./cmd/virt-api",
                     "kubevirt-manifests": MANIFESTS_PACKAGE}


def _kubevirt_tool(name: str, version: str | None) -> Tool:
    """The tool for the KubeVirt version asked, its cache folder named by version and commit
    (``KubeVirtSource.key``). Without a source: the newest build of that version already in
    the cache; without either, MissingBinaryError saying what to set."""
    base = TOOLS[name]
    source = kubevirt_source(version)
    if source is None:
        wanted = normalize_kubevirt_version(version) if version else KUBEVIRT_VERSIONS[0]
        cached = sorted(cache_root().glob(f"{name}-{wanted}-*/bin/{name}"),
                        key=lambda p: p.stat().st_mtime)
        if not cached:
            raise MissingBinaryError(no_kubevirt_source_message(wanted))
        return dataclasses.replace(base, version=cached[-1].parent.parent.name.removeprefix(
            f"{name}-"))
    return dataclasses.replace(
        base, version=source.key, origin=f"KubeVirt's source {source.path}",
        build=functools.partial(_build_kubevirt, source, KUBEVIRT_PACKAGES[name]))


def _no_source(*_args: object) -> None:
    raise MissingBinaryError(no_kubevirt_source_message())


TOOLS: dict[str, Tool] = {
    "kube-apiserver": Tool(
        "kube-apiserver", KUBERNETES_VERSION, False, "kubernetes", _build_kubernetes, "-stamped"
    ),
    "kubectl": Tool("kubectl", KUBERNETES_VERSION, True, "kubernetes", _build_kubernetes,
                    "-stamped"),
    "etcd": Tool("etcd", ETCD_VERSION, False, "etcd", _build_etcd),
    "helm": Tool("helm", HELM_VERSION, True, "helm", _build_helm),
    "kubeconform": Tool("kubeconform", KUBECONFORM_VERSION, True, "kubeconform",
                        _build_kubeconform),
    # Placeholders: _kubevirt_tool fills in the version, the source and the build.
    **{name: Tool(name, KUBEVIRT_VERSIONS[0], False, "kubevirt", _no_source)
       for name in KUBEVIRT_PACKAGES},
}


def _tool(name: str, kubevirt_version: str | None = None) -> Tool:
    return _kubevirt_tool(name, kubevirt_version) if name in KUBEVIRT_PACKAGES else TOOLS[name]


def find(name: str, kubevirt_version: str | None = None) -> Path | None:
    """Where the binary is without building anything, or None. ``kubevirt_version`` picks the
    release of KubeVirt's binaries (default: see ``kubevirt_source``)."""
    try:
        return _find(_tool(name, kubevirt_version))
    except MissingBinaryError:  # no KubeVirt source, nothing cached
        return None


def _find(tool: Tool) -> Path | None:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and tool.name not in KUBEVIRT_PACKAGES and (Path(assets) / tool.name).is_file():
        return Path(assets) / tool.name
    if tool.cache_bin.is_file():
        return tool.cache_bin
    if tool.from_path and (on_path := shutil.which(tool.name)):
        return Path(on_path)
    return None


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure(name: str, log: Callable[[str], None] = _stderr,
           kubevirt_version: str | None = None) -> Path:
    """The binary's path, building it into the cache first when it is nowhere to be found."""
    tool = _tool(name, kubevirt_version)
    if found := _find(tool):
        return found
    with _build_lock():
        if found := _find(tool):  # another process built it while we waited
            return found
        log(f"building {name} {tool.version} from {tool.origin} into {tool.cache_bin.parent} "
            "(once; later runs use the cache)")
        started = time.monotonic()
        tool.cache_bin.parent.mkdir(parents=True, exist_ok=True)
        tool.build(cache_root() / "src" / f"{tool.source}-{tool.version}", tool.cache_bin, log)
        log(f"built {name} in {time.monotonic() - started:.0f}s")
    if not tool.cache_bin.is_file():
        raise MissingBinaryError(f"building {name} finished but {tool.cache_bin} is missing")
    return tool.cache_bin


def ensure_all(names: tuple[str, ...] = ("etcd", "kube-apiserver", "kubectl")) -> dict[str, Path]:
    return {n: ensure(n) for n in names}
