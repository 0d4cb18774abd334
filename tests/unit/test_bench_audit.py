"""Reading the API server's audit log for the benchmarks: one request per audit ID, counts by
user or user agent, and event-to-decision latency from the cluster's side."""

from __future__ import annotations

import json

from virtshift.bench import audit
from virtshift.bench.scale import event_to_decision


def _event(aid: str, user: str, verb: str, resource: str, t: float,
           stage: str = "ResponseComplete", name: str = "m1", body: dict | None = None,
           agent: str = "virtshift", received: float | None = None) -> dict:
    stamp = f"2026-01-01T00:00:{t:09.6f}Z"
    ev = {"auditID": aid, "stage": stage, "verb": verb, "user": {"username": user},
          "userAgent": agent, "objectRef": {"resource": resource, "namespace": "ns", "name": name},
          "requestReceivedTimestamp": f"2026-01-01T00:00:{received or t:09.6f}Z",
          "stageTimestamp": stamp,
          "responseStatus": {"code": 200}}
    if body is not None:
        ev["requestObject"] = body
    return ev


def test_each_request_counts_once_and_by_user_or_agent(tmp_path) -> None:
    log = tmp_path / "audit.log"
    events = [
        _event("a", audit.OPERATOR_USER, "watch", "nodes", 1.0, stage="ResponseStarted"),
        _event("a", audit.OPERATOR_USER, "watch", "nodes", 9.0, received=1.0),
        _event("b", audit.OPERATOR_USER, "create", "virtualmachineinstancemigrations", 2.0),
        _event("c", "virtshift-admin", "create", "pods", 3.0, agent="kubectl/v1.36.3"),
        _event("d", "virtshift-admin", "list", "pods", 4.0, agent="python"),
    ]
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n{\"partial")
    reqs = list(audit.read(log))
    assert len(reqs) == 4
    ours = audit.count(reqs, user=audit.OPERATOR_USER)
    assert ours["total"] == 2 and ours["by_verb"] == {"watch": 1, "create": 1}
    assert audit.count(reqs, agent_prefix="kubectl")["total"] == 1
    watch = next(r for r in reqs if r.verb == "watch")
    assert watch.received + 8 == watch.completed  # the last stage logged, received kept
    assert audit.count(reqs, user=audit.OPERATOR_USER, since=watch.received + 0.5)["total"] == 1


def test_event_to_decision_from_the_first_final_write_to_the_next_operator_write(tmp_path) -> None:
    log = tmp_path / "audit.log"
    done = {"status": {"phase": "Succeeded"}}
    events = [
        _event("1", audit.SIM_CONTROLLER, "patch", "virtualmachineinstancemigrations", 1.0,
               body={"status": {"phase": "Running"}}),
        _event("2", audit.SIM_CONTROLLER, "patch", "virtualmachineinstancemigrations", 2.0,
               body=done),
        _event("3", audit.SIM_CONTROLLER, "patch", "virtualmachineinstancemigrations", 2.5,
               body=done),  # the same VMIM written again: not a new event
        _event("4", audit.OPERATOR_USER, "get", "nodedrains", 2.1),  # a read is no decision
        _event("5", audit.OPERATOR_USER, "patch", "nodedrains", 2.25),
        _event("6", audit.SIM_CONTROLLER, "patch", "virtualmachineinstancemigrations", 3.0,
               name="m2", body={"status": {"phase": "Failed"}}),
        _event("7", audit.OPERATOR_USER, "create", "virtualmachineinstancemigrations", 3.5),
    ]
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    reqs = list(audit.read(log))
    t0 = min(r.received for r in reqs)
    lat = event_to_decision(reqs, t0, t0 + 100)
    assert lat["count"] == 2
    assert lat["p50"] == 0.25 and lat["p99"] == 0.5 and lat["max"] == 0.5
