"""The one rule for binaries the tests need (etcd, kube-apiserver, kubectl, helm,
kubeconform): found or built into the cache; with CI=true a missing one fails the test, never
skips it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtshift.devenv import binaries

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(name: str) -> Path:
    try:
        return binaries.ensure(name)
    except binaries.MissingBinaryError as exc:
        if IN_CI:
            pytest.fail(f"CI=true and {name} is missing: {exc}", pytrace=False)
        pytest.skip(f"{name} unavailable outside CI: {exc}")
