"""API requests counted at the API server: the audit policy the benchmarks run it with, and
reading its log (JSON lines, one per request stage)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPERATOR_USER = "virtshift-operator"  # the operator's own static-token user in a benchmark
SIM_CONTROLLER = "system:serviceaccount:kubevirt:kubevirt-controller"
MUTATING = frozenset({"create", "update", "patch", "delete", "deletecollection"})

# Metadata for the operator (every request it makes) and for the admin (kubectl drain, told
# apart by its user agent); the request body of the simulated virt-controller's writes to
# VMIMs (the phase it wrote: the events the operator reacts to); nothing else.
POLICY: dict[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "users": [OPERATOR_USER]},
        {"level": "Request", "users": [SIM_CONTROLLER], "verbs": ["create", "update", "patch"],
         "resources": [{"group": "kubevirt.io",
                        "resources": ["virtualmachineinstancemigrations",
                                      "virtualmachineinstancemigrations/status"]}]},
        {"level": "Metadata", "users": ["virtshift-admin"]},
        {"level": "None"},
    ],
}


@dataclass(frozen=True)
class Request:
    user: str
    user_agent: str
    verb: str
    resource: str  # resource[/subresource]
    namespace: str | None
    name: str | None
    received: float  # epoch seconds (wall)
    completed: float  # epoch seconds (wall)
    code: int | None
    body: dict[str, Any] | None  # the request object, at level Request


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read(path: Path) -> Iterator[Request]:
    """One Request per audit ID (the last stage logged), in log order."""
    last: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return iter(())
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:  # the last line may still be being written
                continue
            last[ev["auditID"]] = ev
    return (_request(ev) for ev in last.values())


def _request(ev: dict[str, Any]) -> Request:
    ref = ev.get("objectRef") or {}
    resource = ref.get("resource") or ""
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return Request(
        user=(ev.get("user") or {}).get("username", ""), user_agent=ev.get("userAgent", ""),
        verb=ev.get("verb", ""), resource=resource, namespace=ref.get("namespace"),
        name=ref.get("name"), received=_ts(ev["requestReceivedTimestamp"]),
        completed=_ts(ev.get("stageTimestamp") or ev["requestReceivedTimestamp"]),
        code=(ev.get("responseStatus") or {}).get("code"), body=ev.get("requestObject"))


def count(requests: list[Request], user: str | None = None, agent_prefix: str | None = None,
          since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """Requests by one user (or user agent) in a window: total, by verb and by resource."""
    picked = [r for r in requests
              if (user is None or r.user == user)
              and (agent_prefix is None or r.user_agent.startswith(agent_prefix))
              and (since is None or r.received >= since)
              and (until is None or r.received <= until)]
    return {"total": len(picked),
            "by_verb": dict(Counter(r.verb for r in picked).most_common()),
            "by_resource": dict(Counter(r.resource for r in picked).most_common(12))}
