"""Deterministic names and label values for what virtshift creates: a restart never
duplicates a migration, because the same (drain incarnation, VM, attempt) always gives the same
name. The incarnation is a short hash of the NodeDrain's UID, so a NodeDrain deleted and created
again under the same name never meets the migrations its predecessor left behind (KubeVirt
keeps up to five finished ones per VMI)."""

from __future__ import annotations

import hashlib

MAX_NAME = 253
MAX_LABEL = 63


def _short(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-.')}-{digest}"


def incarnation(uid: str) -> str:
    """Six hex digits that tell NodeDrains of the same name apart."""
    return hashlib.sha256(uid.encode()).hexdigest()[:6]


def migration_name(drain: str, vm: str, attempt: int, uid: str = "") -> str:
    """``vs-<drain>-<vm>-<attempt>-<incarnation>`` (without a UID: no incarnation)."""
    suffix = f"-{incarnation(uid)}" if uid else ""
    return _short(f"vs-{drain}-{vm}-{attempt}{suffix}", MAX_NAME)


def label_value(text: str) -> str:
    """A label value (63 characters at most) that still identifies ``text``."""
    return _short(text, MAX_LABEL)


def kubevirt_policy_name(policy: str) -> str:
    return _short(f"virtshift-{policy}", MAX_NAME)
