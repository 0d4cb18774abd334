"""Operator start-up: kopf settings under virtshift.io, and the shared runtime."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from virtshift.handlers import nodedrain, runtime  # noqa: F401 - registers the handlers


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "virtshift.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="virtshift.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="virtshift.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 120
    settings.execution.max_workers = 32
    runtime.get().start()


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    runtime.get().stop()
