"""Shared fixtures: a real control plane (etcd + kube-apiserver) for the e2e tests.

With CI=true a missing binary fails the run; elsewhere it skips with the reason, so a developer
without Go can still run the unit tests.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from binaries_needed import need
from virtshift.devenv import crds
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s.rest import KubeClient

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


class Cluster:
    def __init__(self, cp: LocalControlPlane, api: client.ApiClient) -> None:
        self.cp = cp
        self.api = api
        self.kubeconfig = cp.kubeconfig
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.kube = KubeClient.from_kubeconfig(str(cp.kubeconfig))

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True):
        kubectl = need("kubectl")
        return subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, check=check, timeout=120,
        )


@pytest.fixture(scope="session")
def control_plane_binaries() -> dict[str, Path]:
    return {name: need(name) for name in ("etcd", "kube-apiserver")}


def _serve_cluster(tmp_path_factory: pytest.TempPathFactory,
                   kubevirt_fallback: bool = False) -> Iterator[Cluster]:
    """etcd + kube-apiserver with our CRDs and KubeVirt's (real, or the stand-ins when
    ``kubevirt_fallback``), stopped afterwards."""
    cp = LocalControlPlane(tmp_path_factory.mktemp("controlplane"), log=lambda _m: None)
    cp.up()
    try:
        api = config.new_client_from_config(str(cp.kubeconfig))
        kubevirt, _source = crds.kubevirt_crds(fallback=kubevirt_fallback)
        crds.apply_crds(api, crds.our_crds() + kubevirt)
        yield Cluster(cp, api)
    finally:
        cp.down(quiet=True, grace=3)


@pytest.fixture(scope="session")
def cluster(
    control_plane_binaries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from _serve_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def fresh_cluster(
    control_plane_binaries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A control plane of the test module's own, for tests that create nodes and VMs."""
    yield from _serve_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def fallback_cluster(
    control_plane_binaries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Like ``fresh_cluster``, but with the KubeVirt stand-in CRDs even where the real ones are
    available: what a fresh clone without ../shared runs on."""
    yield from _serve_cluster(tmp_path_factory, kubevirt_fallback=True)


@pytest.fixture
def unique() -> str:
    """A short random suffix: no controller-manager runs, so deleted names are not reusable."""
    return uuid.uuid4().hex[:6]
