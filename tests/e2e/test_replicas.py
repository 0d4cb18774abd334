"""Two replicas, one active (issue 11): the holder of a coordination.k8s.io Lease acts, the
other waits; SIGKILL the active one mid-drain and the standby takes over within 30 s and
finishes the drain, with no migration duplicated.

Both run as the Helm chart installs them: as the chart's ServiceAccount (TokenRequest token),
with the chart's Role for the Lease. Checked on the cluster: the Lease, the VMIMs, the VMIs,
the Events' reportingInstance.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_harness import install_identity
from operator_harness import OperatorProcess, drain_body, phase_of, wait_for

from virtshift.k8s import rest
from virtshift.k8s.leader import LEASES
from virtshift.k8s.views import DRAIN_LABEL, parse_time
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

MEDIUM = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "medium.yaml"
NAMESPACE, LEASE = "virtshift", "virtshift"  # the chart's defaults for release "virtshift"
TAKEOVER_LIMIT = 30.0


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(MEDIUM).model_copy(update={"time_scale": 10})
    identity = install_identity(fresh_cluster, tmp_path_factory.mktemp("identity"))
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    ops = {name: OperatorProcess(identity, tmp_path_factory.mktemp(name), scenario.time_scale,
                                 sim.metrics.url, runner.DOWNTIME_SOURCE,
                                 leader_election=(NAMESPACE, LEASE, name))
           for name in ("replica-a", "replica-b")}
    try:
        yield {"kube": fresh_cluster.kube, "ops": ops}
    finally:
        for op in ops.values():
            op.stop()
        sim.stop()


def holder(kube: rest.KubeClient) -> str | None:
    lease = kube.get(LEASES, LEASE, NAMESPACE)
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def test_one_replica_acts_and_the_standby_finishes_the_drain_after_sigkill(env) -> None:
    kube, ops = env["kube"], env["ops"]
    a, b = ops["replica-a"], ops["replica-b"]
    a.start()
    wait_for(lambda: holder(kube) == "replica-a", timeout=60, what="replica-a leads")
    b.start()
    wait_for(lambda: "waiting for Lease" in b.logs(), timeout=60, what="replica-b waits")

    node = "node-3"
    total = len([v for v in kube.items(rest.VMIS) if v["status"].get("nodeName") == node])
    assert total >= 5
    kube.create(rest.NODE_DRAINS, drain_body("ha", nodeName=node))

    def ours() -> list[dict[str, Any]]:
        return kube.items(rest.VMIMS, label_selector=f"{DRAIN_LABEL}=ha")

    def mid_drain() -> list[str]:
        """Names of the migrations in flight, once 3 VMs have moved and some are moving."""
        now = ours()
        done = sum(m.get("status", {}).get("phase") == "Succeeded" for m in now)
        moving = [m["metadata"]["name"] for m in now
                  if m.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        return moving if done >= 3 else []

    in_flight = wait_for(mid_drain, timeout=120, every=0.02,
                         what="3 VMs moved and more in flight")
    assert holder(kube) == "replica-a"
    killed_at = time.monotonic()
    killed_wall = time.time()
    a.kill()
    wait_for(lambda: holder(kube) == "replica-b", timeout=TAKEOVER_LIMIT + 5,
             what="replica-b takes the Lease")
    takeover = time.monotonic() - killed_at
    print(f"standby took over {takeover:.1f}s after SIGKILL "
          f"({len(in_flight)} migrations in flight at the kill)")
    assert takeover <= TAKEOVER_LIMIT
    assert phase_of(kube, "ha") != "Drained"  # mid-drain indeed
    assert in_flight
    wait_for(lambda: phase_of(kube, "ha") == "Drained", timeout=180,
             what="the standby finishes the drain")

    # The cluster's migrations: one per (VM, attempt), each VM moved exactly once.
    migrations = ours()
    per_attempt = Counter((m["spec"]["vmiName"], m["metadata"]["labels"]["virtshift.io/attempt"])
                          for m in migrations)
    assert max(per_attempt.values()) == 1, per_attempt
    moved = Counter(m["spec"]["vmiName"] for m in migrations
                    if m["status"]["phase"] == "Succeeded")
    assert len(moved) == total and max(moved.values()) == 1, moved
    assert not [v for v in kube.items(rest.VMIS) if v["status"].get("nodeName") == node]

    # Who acted: the Events say which replica wrote them; replica-b only after the kill.
    events = [e for e in kube.items(rest.EVENTS, "default")
              if e["involvedObject"].get("name") == "ha"]
    by = Counter(e.get("reportingInstance") for e in events)
    assert set(by) <= {"replica-a", "replica-b"} and by["replica-a"] and by["replica-b"], by
    early = [e["reason"] for e in events if e.get("reportingInstance") == "replica-b"
             and parse_time(e["firstTimestamp"]).timestamp() < killed_wall - 1]
    assert not early, early
    lease = kube.get(LEASES, LEASE, NAMESPACE)
    assert lease["spec"]["leaseTransitions"] == 1  # a took it (0), b from a (1)


def test_a_clean_stop_hands_over_at_once(env) -> None:
    """SIGTERM: the leader releases the Lease, so a new standby need not wait it out."""
    kube, ops = env["kube"], env["ops"]
    a, b = ops["replica-a"], ops["replica-b"]
    a.start()  # the standby now
    wait_for(lambda: a.logs().count("waiting for Lease") >= 2, timeout=60,
             what="replica-a waits")
    stopped = time.monotonic()
    b.stop()
    wait_for(lambda: holder(kube) == "replica-a", timeout=15, what="replica-a leads")
    assert time.monotonic() - stopped < 10
