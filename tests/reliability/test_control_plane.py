"""The control plane fails under a running drain: kube-apiserver restarted (etcd and its data
kept), etcd restarted (the API server answers errors meanwhile), and a fault-injecting proxy
between the operator and the API server (5xx, 409, 429 with Retry-After, dropped requests,
dropped watch streams, slow responses). After each: every invariant, the drain finished, and
how long the operator took to act again.
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from fault_proxy import FaultProxy
from harness import FaultRun, two_busy_nodes
from invariants import Watcher

SCENARIO = two_busy_nodes(seed=9)


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(SCENARIO)


def _mid_drain(env, name: str) -> None:
    """Until the first migration of the drain has been created."""
    deadline = time.monotonic() + 60
    while not env.migrations(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def _run(env, fault: str, name: str, inject, down: float = 0.0) -> None:
    """Drain the fullest node, inject once the first migration exists, measure recovery."""
    op = env.op
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    node = env.fullest_node()
    total = len(env.vmis_on(node))
    run = FaultRun(fault, f"{name} ({total} VMs)")
    with Watcher(env.kube) as watcher:
        env.drain(name, node)
        _mid_drain(env, name)
        before = env.activity(name)
        inject()
        started = time.monotonic()
        run.recover_s = env.next_action(name, before, started, timeout=120)
        env.wait_done(name, timeout=240)
        run.finish_s = time.monotonic() - started
    violations = [str(v) for v in watcher.violations]
    violations += [str(v) for v in env.settled()]
    run.figures = {"vms": total, "left_on_node": len(env.vmis_on(node)),
                   "operator_alive": op.proc.poll() is None,
                   "unreadable_samples": watcher.unreadable}
    env.end(name)
    violations += [str(v) for v in env.settled()]
    run.violations = violations
    run.save()
    assert run.figures["left_on_node"] == 0
    assert run.figures["operator_alive"], "the operator exited"
    assert not violations, violations


def test_apiserver_restarted_mid_drain(env) -> None:
    def inject() -> None:
        env.cp.stop_apiserver()
        time.sleep(2)
        env.cp.start_apiserver()

    _run(env, "kube-apiserver restarted mid-drain (etcd kept)", "api-restart", inject)


def test_apiserver_killed_mid_drain(env) -> None:
    def inject() -> None:
        env.cp.stop_apiserver(kill=True)
        time.sleep(1)
        env.cp.start_apiserver()

    _run(env, "kube-apiserver SIGKILLed mid-drain (etcd kept)", "api-kill", inject)


def test_etcd_restarted_mid_drain(env) -> None:
    def inject() -> None:
        env.cp.stop_etcd()
        time.sleep(2)
        env.cp.start_etcd()

    _run(env, "etcd restarted mid-drain", "etcd-restart", inject)


# -- the proxy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(env, tmp_path_factory):
    """A second operator, talking through the proxy; the direct one is stopped meanwhile."""
    proxy = FaultProxy(env.kube.server, str(env.cp.dir / "pki" / "ca.crt")).start()
    config = yaml.safe_load(env.cp.kubeconfig.read_text())
    config["clusters"][0]["cluster"] = {"server": proxy.url}
    kubeconfig = tmp_path_factory.mktemp("proxied") / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    env.op.stop()
    op = env.operator(kubeconfig=kubeconfig)
    op.start()
    direct, env.op = env.op, op
    try:
        yield proxy
    finally:
        op.stop()
        env.op = direct
        proxy.stop()


# (method, path regex, action, status, Retry-After, times): each a fault of its own.
PROXY_FAULTS = {
    "5xx on creating migrations": ("POST", "virtualmachineinstancemigrations", "status", 503,
                                   None, 8),
    "500 on status writes": ("PATCH", "nodedrains/.*/status", "status", 500, None, 6),
    "409 on node patches": ("PATCH", "/nodes/", "status", 409, None, 3),
    "429 with Retry-After on every write": ("POST|PATCH", "", "status", 429, "1", 6),
    "creates dropped after the server did them": ("POST", "virtualmachineinstancemigrations",
                                                  "drop-after", 0, None, 3),
    "requests dropped unanswered (timeouts)": ("GET", "", "drop", 0, None, 10),
}


def _add(proxy: FaultProxy, method: str, path: str, action: str, status: int,
         retry_after: str | None, times: int) -> None:
    for m in method.split("|"):
        proxy.add(m, path, action, status, retry_after, times)


@pytest.mark.parametrize("fault", list(PROXY_FAULTS))
def test_proxy_fault(env, proxied, fault: str) -> None:
    proxied.clear()
    _run(env, f"API proxy: {fault}", f"proxy-{list(PROXY_FAULTS).index(fault)}",
         lambda: _add(proxied, *PROXY_FAULTS[fault]))


def test_proxy_drops_watch_streams_and_slows_responses(env, proxied) -> None:
    """Every open watch stream cut mid-stream, again and again, while every read is slowed by
    half a second: the informers must re-list and re-watch without losing an event."""
    proxied.clear()
    stop = threading.Event()
    cuts: list[int] = []

    def cut_watches() -> None:
        while not stop.is_set():
            cuts.append(proxied.cut_watches())
            stop.wait(1.5)

    cutter = threading.Thread(target=cut_watches, daemon=True)

    def inject() -> None:
        proxied.add("GET", "", "delay", times=200, delay=0.5)
        cutter.start()

    try:
        _run(env, "API proxy: watch streams cut, slow responses", "proxy-watch", inject)
    finally:
        stop.set()
        cutter.join(5)
    assert sum(cuts) > 0, "no watch was open to cut"
