"""The operator SIGKILLed at random points and restarted, one seed per drain: the seed picks how
many kills (1-3), when each lands (from the drain's creation) and how long the operator stays
down. Every seed drains the fullest node, checks every invariant from the cluster's objects,
then ends the drain (uncordon, finalizer) and checks them again.

Run at two time scales (even seeds 10x, odd seeds 30x: at 30x a kill lands on more migrations
at once, and at 10x more often between a create and its VMI mark).
"""

from __future__ import annotations

import random
import time

import pytest
from harness import SIGKILL_SEEDS, FaultRun, two_busy_nodes
from invariants import ClusterState, Watcher, duplicate_migrations

SCENARIO = two_busy_nodes(seed=5)


ENVS: dict[int, object] = {}


@pytest.fixture(scope="module")
def env(request, make_env):
    scale = request.param
    if scale not in ENVS:
        ENVS[scale] = make_env(SCENARIO, time_scale=scale)
    return ENVS[scale]


CASES = sorted((10 if s % 2 == 0 else 30, s) for s in range(SIGKILL_SEEDS))


@pytest.mark.parametrize(("env", "seed"), CASES, indirect=["env"],
                         ids=[f"{scale}x-seed{seed}" for scale, seed in CASES])
def test_sigkill_at_random_points(env, seed: int) -> None:
    scale = int(env.scenario.time_scale)
    rng = random.Random(seed)
    op, kube = env.op, env.kube
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    node = env.fullest_node()
    total = len(env.vmis_on(node))
    name = f"kill-{seed}"
    run = FaultRun("operator SIGKILL at random points", f"seed {seed} ({scale}x, {total} VMs)")
    kills = rng.randint(1, 3)
    recover: list[float] = []
    with Watcher(kube) as watcher:
        created = env.drain(name, node)
        t0 = time.monotonic()
        for _ in range(kills):
            # Anywhere in the drain's first seconds, where migrations are created and run.
            time.sleep(rng.uniform(0.0, 40.0 / scale))
            op.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            before = env.activity(name)
            started = time.monotonic()
            op.start()
            took = env.next_action(name, before, started)
            if took is not None:
                recover.append(took)
        env.wait_done(name, timeout=240)
        finish = time.monotonic() - t0
        violations = [str(v) for v in watcher.violations]
    violations += [str(v) for v in env.settled()]
    state = ClusterState.read(kube)
    dups = duplicate_migrations(state, created["metadata"]["uid"])
    left = len(env.vmis_on(node))
    run.figures = {"kills": kills, "vms": total, "duplicates": len(dups), "left_on_node": left,
                   "drained": env.phase(name) == "Drained", "samples": watcher.samples}
    ended = env.end(name)
    violations += [str(v) for v in env.settled()]
    run.figures["finalizer_removed_s"] = round(ended, 2)
    run.violations = violations + dups
    run.recover_s = max(recover) if recover else None
    run.finish_s = finish
    run.save()
    assert not dups, dups
    assert left == 0, f"{left} VMs left on {node}"
    assert not violations, violations
    assert not env.tracebacks(), "a traceback in the operator's log"
