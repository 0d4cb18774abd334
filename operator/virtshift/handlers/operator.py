"""Operator start-up: kopf settings under virtshift.io, and the shared runtime."""

from __future__ import annotations

import logging
from typing import Any

import kopf

import virtshift.handlers.migrationpolicy  # noqa: F401 - registers the handlers
from virtshift.handlers import claims, nodedrain, runtime  # noqa: F401 - registers the handlers


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "virtshift.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="virtshift.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="virtshift.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 120
    # Our kinds are known at start-up (the chart installs their CRDs first): no watch of every
    # CRD in the cluster, which would need a cluster-wide read of customresourcedefinitions.
    settings.scanning.disabled = True
    # Every sync daemon (one per NodeDrain and per MigrationPolicy) holds a worker thread for
    # its lifetime; leave plenty for the delete, login and start-up handlers.
    settings.execution.max_workers = 512
    runtime.get().start()
    claims.start(runtime.get())  # after the caches: it decides only on synced ones


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """The same credentials as our own client (kubeconfig given on the command line, or the
    pod's service account), rather than kopf's guess from the environment."""
    cfg = runtime.get().cluster.kube.cfg
    auth = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix(
        "BearerToken")
    scheme, _, token = (auth or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        scheme=scheme or None, token=token or None, certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    claims.stop()
    runtime.get().stop()
