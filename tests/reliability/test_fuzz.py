"""Bad input (hypothesis): NodeDrain and MigrationPolicy specs, valid and not, submitted through
the real API server to a running operator. Each must be either rejected at admission with a
message naming a field, or accepted and handled: a Ready condition with a reason, and, on
delete, its finalizer gone. Never an operator crash, a traceback, or a stuck finalizer.
Simulator scenarios too: the loader either accepts one or rejects it naming the field.

The budget is ``harness.FUZZ_EXAMPLES`` per kind (small in CI, larger in ``make reliability``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import yaml
from harness import FUZZ_EXAMPLES, FaultRun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtshift.k8s import rest
from virtshift.k8s.rest import ApiError
from virtshift.sim.scenario import ScenarioError, load_scenario

SCENARIO = """
seed: 4
timeScale: 30
nodes:
  - generate: {count: 3, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - generate: {count: 3, prefix: vm-, namespace: apps, nodes: [node-1], memory: 1Gi}
"""
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)
STATS: dict[str, Counter[str]] = {"NodeDrain": Counter(), "MigrationPolicy": Counter(),
                                  "scenario": Counter()}


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(SCENARIO)


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=12),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4),
                                                                      st.text(max_size=4),
                                                                      max_size=2))
durations = st.one_of(st.sampled_from(["30s", "5m", "1h", "0s", "-1s", "1.5h", "90", "soon",
                                       "1h30m", "10ms"]), junk)
quantities = st.one_of(st.sampled_from(["1Gi", "500Mi", "0", "-1Gi", "10", "1.5Gi", "lots"]),
                       junk)
names = st.one_of(st.sampled_from(["node-1", "node-2", "node-9", "Node_1", "", "a" * 70]),
                  st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), junk)
selectors = st.one_of(
    st.fixed_dictionaries({"matchLabels": st.dictionaries(
        st.sampled_from(["kubernetes.io/hostname", "pool", "bad key!"]),
        st.sampled_from(["node-1", "x", "", "no way"]), max_size=2)}),
    st.fixed_dictionaries({"matchExpressions": st.lists(st.fixed_dictionaries({
        "key": st.sampled_from(["pool", "kubernetes.io/hostname"]),
        "operator": st.sampled_from(["In", "NotIn", "Exists", "Bogus"]),
        "values": st.lists(st.sampled_from(["a", "node-2"]), max_size=2)}), max_size=2)}),
    junk)

DRAIN_FIELDS = {
    "nodeName": names, "nodeSelector": selectors, "maxUnavailable": st.integers(-2, 5) | junk,
    "releaseAfter": durations, "policyRef": names,
    "targetNodeSelector": st.dictionaries(st.sampled_from(["kubernetes.io/hostname", "zone"]),
                                          st.sampled_from(["node-2", "a"]), max_size=2) | junk,
    "evictPods": st.booleans() | junk, "paused": st.booleans() | junk, "deadline": durations,
    "dryRun": st.booleans() | junk,
    "nonMigratable": st.sampled_from(["Fail", "Skip", "Restart", "Explode"]) | junk,
    "cancelOnDelete": st.booleans() | junk, "bogusField": junk,
}
POLICY_FIELDS = {
    "priority": st.integers(-10, 10**4) | junk, "namespaceSelector": selectors,
    "vmSelector": selectors, "maxDowntime": durations, "bandwidthPerMigration": quantities,
    "nodeBandwidth": quantities, "maxParallelMigrations": st.integers(-1, 50) | junk,
    "maxParallelOutboundPerNode": st.integers(-1, 10) | junk,
    "maxParallelInboundPerNode": st.integers(-1, 10) | junk,
    "completionTimeoutPerGiB": st.integers(-1, 10**5) | junk, "progressTimeout": durations,
    "maxAttempts": st.integers(-1, 20) | junk,
    "backoff": st.fixed_dictionaries({}, optional={"initial": durations, "max": durations}),
    "allowAutoConverge": st.booleans() | junk, "allowPostCopy": st.booleans() | junk,
    "onDowntimeExceeded": st.lists(st.sampled_from(["AutoConverge", "PostCopy", "Abort",
                                                    "Fail", "Allow", "Nope"]), max_size=3) | junk,
    "nonMigratable": st.sampled_from(["Fail", "Skip", "Restart", "x"]) | junk,
    "windows": st.lists(st.fixed_dictionaries({"schedule": st.sampled_from(
        ["0 22 * * *", "* * *", "61 * * * *"]), "duration": durations},
        optional={"timeZone": st.sampled_from(["Europe/Berlin", "Mars/Olympus"])}),
        max_size=2) | junk,
    "storage": st.fixed_dictionaries({}, optional={
        "targetStorageClass": names, "mode": st.sampled_from(["OnDrain", "Always", "Never"]),
        "maxParallelCopies": st.integers(-1, 5) | junk}) | junk,
}


VALID_DRAIN = {
    "maxUnavailable": st.integers(1, 3), "releaseAfter": st.sampled_from(["30s", "5m"]),
    "policyRef": st.sampled_from(["gold", "missing"]),
    "targetNodeSelector": st.dictionaries(st.just("kubernetes.io/hostname"),
                                          st.sampled_from(["node-2", "node-3", "nowhere"])),
    "evictPods": st.booleans(), "paused": st.booleans(),
    "deadline": st.sampled_from(["1s", "10m", "2h"]), "dryRun": st.booleans(),
    "nonMigratable": st.sampled_from(["Fail", "Skip", "Restart"]),
    "cancelOnDelete": st.booleans(),
}
VALID_POLICY = {
    "priority": st.integers(0, 100),
    "vmSelector": st.fixed_dictionaries({"matchLabels": st.dictionaries(
        st.sampled_from(["app", "tier"]), st.sampled_from(["db", "web"]), max_size=1)}),
    "maxDowntime": st.sampled_from(["300ms", "2s"]),
    "bandwidthPerMigration": st.sampled_from(["64Mi", "1Gi"]),
    "maxParallelMigrations": st.integers(1, 10),
    "maxParallelOutboundPerNode": st.integers(1, 4), "maxAttempts": st.integers(1, 5),
    "allowAutoConverge": st.booleans(), "allowPostCopy": st.booleans(),
    "nonMigratable": st.sampled_from(["Fail", "Skip", "Restart"]),
    "onDowntimeExceeded": st.lists(st.sampled_from(["AutoConverge", "PostCopy", "Fail"]),
                                   max_size=2, unique=True),
}


def specs(fields: dict[str, Any], valid: dict[str, Any],
          required: dict[str, Any] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Half the time well-formed values only (so acceptance, and handling, are exercised),
    half the time anything."""
    return st.one_of(st.fixed_dictionaries(required or {}, optional=valid),
                     st.fixed_dictionaries({}, optional=fields))


def names_a_field(message: str, spec: dict[str, Any]) -> bool:
    """The API server's message names a field: ``spec.<field>`` (or ``spec`` with a CEL rule's
    message that names one), or an unknown field by its name."""
    fields = set(spec) | {"nodeName", "nodeSelector"}
    return bool(re.search(r"spec\.\w+", message)) or any(f in message for f in fields)


def ready_reason(obj: dict[str, Any] | None) -> str | None:
    return next((c.get("reason") for c in ((obj or {}).get("status") or {}).get("conditions")
                 or [] if c["type"] == "Ready"), None)


def submit(env, resource: rest.Resource, kind: str, spec: dict[str, Any]) -> None:
    stats = STATS[kind]
    stats["generated"] += 1
    name = f"fz-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": "virtshift.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}
    try:
        env.kube.create(resource, body)
    except ApiError as exc:
        assert exc.status in (400, 422), (exc.status, exc.message)
        stats["rejected"] += 1
        if names_a_field(exc.message, spec):
            stats["rejected_naming_field"] += 1
        else:
            stats["rejected_unnamed"] += 1
            print(f"rejected without naming a field: {spec} -> {exc.message}")
        return
    stats["accepted"] += 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not ready_reason(env.kube.get(resource, name)):
        time.sleep(0.1)
    reason = ready_reason(env.kube.get(resource, name))
    if reason:
        stats["handled"] += 1
    else:
        print(f"accepted, no Ready reason in 20s: {kind} {spec}")
    env.kube.delete(resource, name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and env.kube.get(resource, name) is not None:
        time.sleep(0.1)
    if env.kube.get(resource, name) is not None:
        stats["stuck_finalizer"] += 1
        print(f"finalizer stuck: {kind} {spec}")
    if env.op.proc.poll() is not None:
        stats["crashes"] += 1
        env.op.start()
    assert reason, f"{kind} {spec} accepted but never handled (no Ready reason)"


@SETTINGS
@given(spec=specs(DRAIN_FIELDS, VALID_DRAIN, {"nodeName": st.sampled_from(
    ["node-1", "node-2", "node-3", "node-ghost"])}))
def test_nodedrain_specs(env, spec: dict[str, Any]) -> None:
    submit(env, rest.NODE_DRAINS, "NodeDrain", spec)


@SETTINGS
@given(spec=specs(POLICY_FIELDS, VALID_POLICY))
def test_migrationpolicy_specs(env, spec: dict[str, Any]) -> None:
    submit(env, rest.POLICIES, "MigrationPolicy", spec)


scenario_vms = st.lists(st.fixed_dictionaries(
    {"name": names},
    optional={"namespace": names, "node": names, "memory": quantities, "cpu": junk,
              "dirtyRate": quantities, "evictionStrategy": st.sampled_from(
                  ["LiveMigrate", "None", "External", "Sometimes"]) | junk,
              "cpuModel": names, "liveMigratable": st.booleans() | junk, "colour": junk}),
    max_size=3)
scenarios = st.fixed_dictionaries({}, optional={
    "seed": st.integers(-1, 10) | junk, "timeScale": st.integers(-1, 100) | junk,
    "kubevirt": st.fixed_dictionaries({}, optional={
        "version": st.sampled_from(["1.7", "1.8", "1.9", "2.0"]) | junk,
        "parallelMigrationsPerCluster": st.integers(-1, 10) | junk}) | junk,
    "network": st.fixed_dictionaries({}, optional={"nodeBandwidth": quantities,
                                                   "targetPodStartup": durations}) | junk,
    "nodes": st.lists(st.fixed_dictionaries({"name": names}, optional={
        "cpuModel": names, "schedulable": st.booleans() | junk,
        "allocatable": st.fixed_dictionaries({}, optional={"cpu": quantities,
                                                           "memory": quantities}) | junk}),
        max_size=3) | junk,
    "vms": scenario_vms | junk,
    "faults": st.lists(st.fixed_dictionaries({"kind": st.sampled_from(
        ["failTargetPod", "nodeNotReady", "dirtyRateSpike", "meteor"]) | junk},
        optional={"vm": names, "node": names, "at": durations, "attempt": junk,
                  "dirtyRate": quantities}), max_size=2) | junk,
    "extra": junk,
})


@SETTINGS
@given(raw=scenarios)
def test_simulator_scenarios(raw: dict[str, Any]) -> None:
    """The loader never raises anything but ScenarioError, and that names a field."""
    stats = STATS["scenario"]
    stats["generated"] += 1
    try:
        load_scenario(yaml.safe_dump(raw))
    except ScenarioError as exc:
        stats["rejected"] += 1
        text = str(exc)
        if raw and not any(k in text for k in (*raw, "nodes", "vms", "faults")):
            stats["rejected_unnamed"] += 1
            print(f"scenario rejected without naming a field: {raw} -> {text}")
        else:
            stats["rejected_naming_field"] += 1
        return
    stats["accepted"] += 1
    stats["handled"] += 1  # loaded into a Scenario: what the simulator runs


def test_fuzz_figures(env) -> None:
    """Record the figures; zero crashes, zero stuck finalizers, no traceback in the log, and
    every rejection naming a field."""
    alive = env.op.proc.poll() is None
    # What the accepted drains and policies (created, handled, deleted) left in the cluster.
    left = [str(v) for v in env.settled()]
    for kind, stats in STATS.items():
        what = {"NodeDrain": "NodeDrain specs via the API server",
                "MigrationPolicy": "MigrationPolicy specs via the API server",
                "scenario": "simulator scenarios via the loader"}[kind]
        run = FaultRun("bad input (hypothesis)", what)
        run.figures = {k: stats[k] for k in ("generated", "rejected", "rejected_naming_field",
                                             "accepted", "handled", "crashes")}
        run.violations = ([f"{stats['rejected_unnamed']} rejections named no field"]
                          if stats["rejected_unnamed"] else []) + (
            [f"{stats['stuck_finalizer']} finalizers stuck"] if stats["stuck_finalizer"]
            else []) + ([f"{stats['crashes']} operator crashes"] if stats["crashes"] else [])
        if kind == "NodeDrain":
            run.violations += left
        run.save()
    assert alive
    assert all(s["generated"] for s in STATS.values()), STATS
    assert not any(s["crashes"] or s["stuck_finalizer"] for s in STATS.values()), STATS
    assert not any(s["rejected_unnamed"] for s in STATS.values()), STATS
    assert not left, left
    assert not env.tracebacks(), "a traceback in the operator's log"
