"""Deterministic names and label values for what virtshift creates: a restart never
duplicates a migration, because the same (drain, VM, attempt) always gives the same name."""

from __future__ import annotations

import hashlib

MAX_NAME = 253
MAX_LABEL = 63


def _short(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-.')}-{digest}"


def migration_name(drain: str, vm: str, attempt: int) -> str:
    return _short(f"vs-{drain}-{vm}-{attempt}", MAX_NAME)


def label_value(text: str) -> str:
    """A label value (63 characters at most) that still identifies ``text``."""
    return _short(text, MAX_LABEL)


def kubevirt_policy_name(policy: str) -> str:
    return _short(f"virtshift-{policy}", MAX_NAME)
