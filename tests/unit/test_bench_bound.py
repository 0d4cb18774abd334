"""The benchmark's lower bound on a drain's makespan (virtshift.bench.bound) and its report."""

from __future__ import annotations

import math

import pytest

from virtshift.api.units import GiB, MiB
from virtshift.bench import report
from virtshift.bench.bound import BoundVM, Limits, lower_bound, vm_floor, waves
from virtshift.domain.physics import Transfer, predict

B = 1 * GiB
LIMITS = Limits(node_bandwidth=B, target_startup=10.0, per_node=2, per_cluster=5)


def vm(name: str, node: str = "node-1", memory: float = 4 * GiB, dirty: float = 0.0) -> BoundVM:
    return BoundVM(f"ns/{name}", node, memory, dirty)


def test_an_idle_vm_alone_takes_startup_plus_memory_over_bandwidth() -> None:
    b = lower_bound([vm("a")], LIMITS, [["node-1"]])
    assert b.seconds == pytest.approx(10 + 4)
    assert b.groups[0].binding in ("longest VM (s + T_i)", "node NIC (s + sum X_i / B)")


def test_a_dirtying_vm_takes_the_pre_copy_rounds() -> None:
    one = vm("a", dirty=256 * MiB)  # lambda 1/4
    floor = vm_floor(one, LIMITS)
    p = predict(Transfer(memory=4 * GiB, dirty_rate=256 * MiB, bandwidth=B))
    assert floor.seconds == pytest.approx(10 + p.duration)
    assert floor.bytes == pytest.approx(p.bytes_sent)
    assert p.duration > 4 * (1 + 0.25)  # more than round 0 and round 1


def test_the_node_nic_binds_when_slots_are_plenty() -> None:
    many = [vm(f"v{i}", memory=1 * GiB) for i in range(20)]
    wide = Limits(node_bandwidth=B, target_startup=10.0, per_node=100, per_cluster=100)
    b = lower_bound(many, wide, [["node-1"]])
    assert b.groups[0].binding == "node NIC (s + sum X_i / B)"
    assert b.seconds == pytest.approx(10 + 20)


def test_outbound_slots_bind_with_startup_in_every_slot() -> None:
    many = [vm(f"v{i}", memory=1 * GiB) for i in range(10)]
    b = lower_bound(many, LIMITS, [["node-1"]])  # k = 2
    assert b.groups[0].binding == "outbound slots (sum (s + T_i) / k)"
    assert b.seconds == pytest.approx(10 * (10 + 1) / 2)


def test_cluster_slots_bind_across_nodes() -> None:
    vms = [vm(f"v{n}-{i}", node=f"node-{n}", memory=1 * GiB) for n in range(1, 5)
           for i in range(4)]
    narrow = Limits(node_bandwidth=B, target_startup=10.0, per_node=4, per_cluster=2)
    b = lower_bound(vms, narrow, [[f"node-{n}" for n in range(1, 5)]])
    assert b.groups[0].binding == "cluster slots (sum (s + T_i) / c)"
    assert b.seconds == pytest.approx(16 * 11 / 2)


def test_bandwidth_per_migration_caps_one_vm() -> None:
    capped = Limits(node_bandwidth=B, target_startup=0.0, per_node=2, per_cluster=5,
                    bandwidth_per_migration=B / 4)
    assert vm_floor(vm("a"), capped).seconds == pytest.approx(16)


def test_a_vm_that_can_never_finish_is_left_out_unless_post_copy_may_finish_it() -> None:
    hot = vm("hot", dirty=2 * GiB)  # lambda 2
    calm = vm("calm", memory=1 * GiB)
    plain = lower_bound([hot, calm], LIMITS, [["node-1"]])
    assert plain.unfinishable == ("ns/hot",)
    assert plain.seconds == pytest.approx(11)
    post = Limits(node_bandwidth=B, target_startup=10.0, per_node=2, per_cluster=5,
                  post_copy=True)
    b = lower_bound([hot, calm], post, [["node-1"]])
    assert not b.unfinishable
    assert math.isfinite(b.seconds) and b.seconds > plain.seconds
    # Round 0 sends all of memory, then post-copy pulls what the guest dirtied meanwhile.
    assert vm_floor(hot, post).bytes >= 4 * GiB


def test_a_wave_is_the_sum_of_its_groups_and_ignores_other_nodes() -> None:
    vms = [vm("a", "node-1"), vm("b", "node-2"), vm("c", "node-3")]
    assert waves(["node-1", "node-2", "node-3"], 1) == [["node-1"], ["node-2"], ["node-3"]]
    assert waves(["node-1", "node-2", "node-3"], 2) == [["node-1", "node-2"], ["node-3"]]
    assert waves(["node-1", "node-2"], None) == [["node-1", "node-2"]]
    rolling = lower_bound(vms, LIMITS, waves(["node-1", "node-2"], 1))
    together = lower_bound(vms, LIMITS, waves(["node-1", "node-2"], 2))
    assert rolling.seconds == pytest.approx(2 * 14)
    assert together.seconds == pytest.approx(14)
    assert [g.nodes for g in rolling.groups] == [("node-1",), ("node-2",)]


def _run(makespan: float | None, elapsed: float, unfinished: list[str]) -> dict:
    return {"finished": makespan is not None, "makespan_s": makespan, "elapsed_s": elapsed,
            "migrations": 3, "succeeded": 3, "failed": 0, "failure_reasons": {}, "retried": 0,
            "unfinished_vms": unfinished, "not_migratable_left": [],
            "downtime_ms": {"p50": 3.0, "p99": 41.0, "max": 41.0, "max_vm": "prod/db-1",
                            "count": 3, "limit_ms": 300.0, "breaches": 0, "source": "x"},
            "api_requests": {"total": 30, "per_migration": 10.0, "by_verb": {},
                             "by_resource": {}, "source": "audit"},
            "wall_s": 4.0}


def test_the_report_shows_both_runs_the_bound_and_a_cut_off_native_run() -> None:
    vs = _run(23.0, 23.0, []) | {"operator_process": {"cpu_s": 1.0, "peak_rss_mib": 71.0}}
    result = {
        "label": "small node-1", "run": 1,
        "scenario": {"file": "examples/scenarios/small.yaml", "seed": 1, "timeScale": 10.0,
                     "vms": 6, "nodes": 3, "excluded": ["prod/gpu-*"], "drained": ["node-1"],
                     "vms_on_drained": 3, "maxUnavailable": None, "policy": None},
        "when": "2026-01-01T00:00:00Z",
        "lower_bound": {"seconds": 16.2, "groups": [
            {"nodes": ["node-1"], "seconds": 16.2, "binding": "longest VM (s + T_i)",
             "terms": {}}], "left_out_unfinishable": []},
        "virtshift": vs, "native": _run(None, 900.0, ["prod/db-1"]),
        "makespan_s": 23.0, "lower_bound_s": 16.2, "ratio": 1.42, "speedup": 39.1,
        "speedup_is_lower_bound": True, "native_unfinished_vms": ["prod/db-1"],
    }
    text = report.render([result])
    assert "do not edit" in text and "LB(group)" in text
    assert "## small node-1" in text and "without prod/gpu-*" in text
    assert "| makespan (cluster time) | 23.0 s | >= 900 s (cut off) |" in text
    assert "| speedup (native / virtshift) | >= 39.1 |" in text
    assert "native left 1 VMs unfinished: prod/db-1" in text
    table = report.drain_table(result)
    assert "ratio (makespan / bound)" in table and "1.42" in table
