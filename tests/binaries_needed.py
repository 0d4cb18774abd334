"""The one rule for binaries the tests need (etcd, kube-apiserver, kubectl, helm,
kubeconform; KubeVirt's virt-controller and virt-api): found or built into the cache; with
CI=true a missing one fails the test, never skips it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtshift.devenv import binaries

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(name: str, kubevirt_version: str | None = None) -> Path:
    try:
        return binaries.ensure(name, kubevirt_version=kubevirt_version)
    except binaries.MissingBinaryError as exc:
        if IN_CI:
            pytest.fail(f"CI=true and {name} is missing: {exc}", pytrace=False)
        pytest.skip(f"{name} unavailable outside CI: {exc}")


def need_kubevirt_source(version: str | None = None) -> None:
    """KubeVirt's source (binaries.kubevirt_source) must be there with CI=true (CI has
    ../shared/kubevirt-src), even where its binaries are cached; elsewhere a missing source
    skips only when nothing built from it is cached either (``need`` decides)."""
    try:
        source = binaries.kubevirt_source(version)
    except binaries.MissingBinaryError as exc:  # KUBEVIRT_SRC names nothing usable
        pytest.fail(str(exc), pytrace=False)
    if source is None and IN_CI:
        pytest.fail(f"CI=true and {binaries.no_kubevirt_source_message(version)}",
                    pytrace=False)
