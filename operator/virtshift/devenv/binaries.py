"""Find or build the control-plane binaries and chart tools: kube-apiserver, etcd, kubectl,
helm, kubeconform.

Order of search, following controller-runtime's envtest: ``$KUBEBUILDER_ASSETS`` first, then
our versioned cache folder, then (kubectl and helm only) ``PATH``; failing all, the binary is
built from Go modules into the cache. Nothing is downloaded but Go modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
KUBECONFORM_VERSION = "v0.8.0"


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

    @property
    def cache_bin(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}{self.flavour}" / "bin" / self.name


def _run(cmd: list[str], cwd: Path, log: Callable[[str], None], what: str) -> None:
    """Run a go command, streaming a progress line per hundred packages compiled."""
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
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
}


def find(name: str) -> Path | None:
    """Where the binary is without building anything, or None."""
    tool = TOOLS[name]
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).is_file():
        return Path(assets) / name
    if tool.cache_bin.is_file():
        return tool.cache_bin
    if tool.from_path and (on_path := shutil.which(name)):
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


def ensure(name: str, log: Callable[[str], None] = _stderr) -> Path:
    """The binary's path, building it into the cache first when it is nowhere to be found."""
    if found := find(name):
        return found
    tool = TOOLS[name]
    with _build_lock():
        if found := find(name):  # another process built it while we waited
            return found
        log(f"building {name} {tool.version} from Go modules into {tool.cache_bin.parent} "
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
