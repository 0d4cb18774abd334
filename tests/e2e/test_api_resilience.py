"""The API client under a failing API server: retries, backoff, Retry-After, never a write done
twice, and Events aggregated. Faults come from a real proxy in front of the real API server
(``fault_proxy``); retries and their timing are read from the proxy's own log.
"""

from __future__ import annotations

import copy
import datetime as dt
import email.utils
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
import yaml
from fault_proxy import FaultProxy
from operator_harness import OperatorProcess, drain_body, phase_of, wait_for

from virtshift.k8s import rest
from virtshift.k8s.events import EventRecorder
from virtshift.k8s.informer import Informer
from virtshift.k8s.rest import ApiError, KubeClient, RetryPolicy
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

CONFIGMAPS = rest.Resource("", "v1", "configmaps")
FAST = RetryPolicy(attempts=6, base=0.2, factor=2.0, cap=5.0, budget=10.0)
SLACK = 0.02  # the proxy's clock and the client's are the same; allow for scheduling


def ca_file(cluster: Any) -> str:
    return str(cluster.cp.dir / "pki" / "ca.crt")


@pytest.fixture
def proxy(cluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.kube.server, ca_file(cluster)) as p:
        yield p


def via(proxy: FaultProxy, cluster: Any, retry: RetryPolicy = FAST) -> KubeClient:
    cfg = copy.copy(cluster.kube.cfg)
    cfg.host = proxy.url
    return KubeClient(cfg, retry=retry)


@pytest.fixture
def ns(cluster, unique) -> str:
    name = f"resilience-{unique}"
    cluster.kube.create(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": name}})
    return name


def configmap(ns: str, name: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "labels": {"test": "resilience"}}
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = "gen-"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def gaps(entries: list) -> list[float]:
    """From each answer to the next request's arrival: how long the client waited."""
    return [b.arrived - a.answered for a, b in itertools.pairwise(entries)]


# -- retries and backoff --------------------------------------------------------------------------


def test_a_read_is_retried_through_5xx_with_exponential_backoff(cluster, proxy, ns) -> None:
    cluster.kube.create(CONFIGMAPS, configmap(ns, "cm"))
    for status in (500, 502, 504):
        proxy.add("GET", f"/namespaces/{ns}/configmaps/cm", "status", status)
    got = via(proxy, cluster).get(CONFIGMAPS, "cm", ns)
    assert got["metadata"]["name"] == "cm"
    log = proxy.requests("GET", "/configmaps/cm")
    assert [e.status for e in log] == [500, 502, 504, 200]
    waits = gaps(log)
    # base 0.2 s doubling, each drawn from half to all of it: [0.1, 0.2], [0.2, 0.4], [0.4, 0.8]
    for n, wait in enumerate(waits):
        full = 0.2 * 2 ** n
        assert full / 2 - SLACK <= wait <= full + 0.3, (n, waits)


def test_429_waits_for_retry_after(cluster, proxy, ns) -> None:
    cluster.kube.create(CONFIGMAPS, configmap(ns, "cm"))
    proxy.add("GET", "/configmaps/cm", "status", 429, retry_after="1")
    via(proxy, cluster).get(CONFIGMAPS, "cm", ns)
    log = proxy.requests("GET", "/configmaps/cm")
    assert [e.status for e in log] == [429, 200]
    assert 1.0 - SLACK <= gaps(log)[0] <= 1.5, gaps(log)


def test_503_retry_after_as_an_http_date(cluster, proxy, ns) -> None:
    cluster.kube.create(CONFIGMAPS, configmap(ns, "cm"))
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    proxy.add("GET", "/configmaps/cm", "status", 503,
              retry_after=email.utils.format_datetime(when, usegmt=True))
    via(proxy, cluster).get(CONFIGMAPS, "cm", ns)
    log = proxy.requests("GET", "/configmaps/cm")
    assert [e.status for e in log] == [503, 200]
    assert 2.0 - SLACK <= gaps(log)[0] <= 3.5, gaps(log)  # the date has whole seconds


def test_a_retry_after_past_the_budget_is_not_waited_for(cluster, proxy, ns) -> None:
    proxy.add("GET", "/configmaps/cm", "status", 429, retry_after="30")
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        via(proxy, cluster, RetryPolicy(budget=5)).get(CONFIGMAPS, "cm", ns)
    assert err.value.status == 429 and err.value.retry_after == 30
    assert time.monotonic() - started < 1
    assert len(proxy.requests("GET", "/configmaps/cm")) == 1


def test_retries_are_bounded_in_number_and_in_total_time(cluster, proxy, ns) -> None:
    proxy.add("GET", "/configmaps/a", "status", 500, times=100)
    with pytest.raises(ApiError) as err:
        via(proxy, cluster, RetryPolicy(attempts=3, base=0.05)).get(CONFIGMAPS, "a", ns)
    assert err.value.status == 500
    assert len(proxy.requests("GET", "/configmaps/a")) == 3

    proxy.add("GET", "/configmaps/b", "status", 503, times=100)
    started = time.monotonic()
    with pytest.raises(ApiError):
        via(proxy, cluster, RetryPolicy(attempts=50, base=0.2, budget=1.5)).get(
            CONFIGMAPS, "b", ns)
    elapsed = time.monotonic() - started
    log = proxy.requests("GET", "/configmaps/b")
    assert elapsed <= 1.5 + 0.3, elapsed
    assert 3 <= len(log) < 10 and log[-1].arrived - log[0].arrived <= 1.5


def test_errors_that_are_answers_are_not_retried(cluster, proxy, ns) -> None:
    kube = via(proxy, cluster)
    assert kube.get(CONFIGMAPS, "missing", ns) is None  # 404
    with pytest.raises(ApiError) as err:
        kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "Bad Name", "namespace": ns}})
    assert err.value.status == 422
    assert len(proxy.requests()) == 2


def test_a_dropped_read_is_retried(cluster, proxy, ns) -> None:
    cluster.kube.create(CONFIGMAPS, configmap(ns, "cm"))
    proxy.add("GET", "/configmaps/cm", "drop", times=2)
    assert via(proxy, cluster).get(CONFIGMAPS, "cm", ns) is not None
    assert [e.status for e in proxy.requests("GET", "/configmaps/cm")] == [None, None, 200]


def test_a_server_that_is_not_listening_yet_is_waited_for(cluster, ns) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late: list[FaultProxy] = []  # nothing listens on the port for half a second
    timer = threading.Timer(0.5, lambda: late.append(
        FaultProxy(cluster.kube.server, ca_file(cluster), port=port).start()))
    timer.start()
    try:
        cfg = copy.copy(cluster.kube.cfg)
        cfg.host = f"http://127.0.0.1:{port}"
        # Even a generateName create: refused connections mean the server never saw it.
        created = KubeClient(cfg, retry=FAST).create(CONFIGMAPS, configmap(ns))
        assert created["metadata"]["name"].startswith("gen-")
    finally:
        timer.join()
        for p in late:
            p.stop()
    assert len(late[0].requests("POST")) == 1


# -- nothing is done twice ------------------------------------------------------------------------


def generated(cluster: Any, ns: str) -> list[dict[str, Any]]:
    return [c for c in cluster.kube.items(CONFIGMAPS, ns)
            if c["metadata"]["name"].startswith("gen-")]


def test_a_generate_name_create_is_never_repeated_once_it_may_have_happened(
        cluster, proxy, ns) -> None:
    kube = via(proxy, cluster)
    proxy.add("POST", "/configmaps", "drop-after")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        kube.create(CONFIGMAPS, configmap(ns))
    assert len(proxy.requests("POST")) == 1
    assert len(generated(cluster, ns)) == 1  # it did happen, once

    proxy.add("POST", "/configmaps", "status", 500)
    with pytest.raises(ApiError):
        kube.create(CONFIGMAPS, configmap(ns))
    assert len(proxy.requests("POST")) == 2 and len(generated(cluster, ns)) == 1

    # 429: the server says it did not do it; repeating is safe.
    proxy.add("POST", "/configmaps", "status", 429, retry_after="0")
    kube.create(CONFIGMAPS, configmap(ns))
    assert [e.status for e in proxy.requests("POST")][2:] == [429, 201]
    assert len(generated(cluster, ns)) == 2


def test_a_named_create_is_repeated_and_finds_its_own_object(cluster, proxy, ns) -> None:
    proxy.add("POST", "/configmaps", "drop-after")
    got = via(proxy, cluster).create_or_get(CONFIGMAPS, configmap(ns, "fixed", v="1"))
    assert got["metadata"]["name"] == "fixed" and got["data"] == {"v": "1"}
    assert [(e.method, e.status) for e in proxy.requests()] == [
        ("POST", None), ("POST", 409), ("GET", 200)]
    assert [c["metadata"]["name"] for c in cluster.kube.items(CONFIGMAPS, ns)
            if c["metadata"]["name"] == "fixed"] == ["fixed"]


def test_merge_patches_are_repeated_json_patches_are_not(cluster, proxy, ns) -> None:
    cluster.kube.create(CONFIGMAPS, configmap(ns, "cm", items="a"))
    kube = via(proxy, cluster)
    proxy.add("PATCH", "/configmaps/cm", "drop-after")
    kube.patch(CONFIGMAPS, "cm", {"data": {"merged": "yes"}}, ns)
    assert len(proxy.requests("PATCH")) == 2

    proxy.add("PATCH", "/configmaps/cm", "drop-after")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        kube.patch(CONFIGMAPS, "cm", [{"op": "add", "path": "/data/items", "value": "a,b"}],
                   ns, kind=rest.JSON_PATCH)
    assert len(proxy.requests("PATCH")) == 3


def test_an_evictions_429_is_its_answer(cluster, proxy, ns) -> None:
    proxy.add("POST", "/pods/p/eviction", "status", 429, retry_after="1")
    with pytest.raises(ApiError) as err:
        via(proxy, cluster).create(rest.PODS, {"apiVersion": "policy/v1", "kind": "Eviction",
                                               "metadata": {"name": "p", "namespace": ns}},
                                   namespace=ns, name="p", subresource="eviction")
    assert err.value.status == 429
    assert len(proxy.requests("POST")) == 1


# -- watches --------------------------------------------------------------------------------------


def test_an_informer_waits_for_retry_after_before_watching_again(cluster, proxy, ns) -> None:
    proxy.add("GET", "watch=1", "status", 429, retry_after="1", times=2)
    informer = Informer(via(proxy, cluster), CONFIGMAPS, label_selector="test=resilience")
    informer.start()
    try:
        informer.wait_synced(10)
        wait_for(lambda: len(proxy.requests("GET", "watch=1")) >= 3, timeout=15,
                 what="a third watch")
        cluster.kube.create(CONFIGMAPS, configmap(ns, "seen"))  # arrives by the watch
        wait_for(lambda: informer.get(f"{ns}/seen"), timeout=15, what="watched")
    finally:
        informer.stop()
    watches = proxy.requests("GET", "watch=1")
    assert [e.status for e in watches[:3]] == [429, 429, 200]
    for refused, following in itertools.pairwise(watches[:3]):
        assert following.arrived - refused.answered >= 1.0 - SLACK


# -- Events ---------------------------------------------------------------------------------------


def drain_like(unique: str) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
            "metadata": {"name": f"ev-{unique}", "uid": f"uid-{unique}"}}


def events_for(cluster: Any, name: str) -> list[dict[str, Any]]:
    return cluster.kube.items(rest.EVENTS, "default",
                              field_selector=f"involvedObject.name={name}")


# background: the operator's recorder, whose writes leave from a thread of their own (in order).
@pytest.mark.parametrize("background", [False, True])
def test_repeated_events_are_counted_on_one_event(cluster, unique, background: bool) -> None:
    tag = f"{unique}-{str(background).lower()}"
    obj = drain_like(tag)
    recorder = EventRecorder(cluster.kube, min_interval=0, background=background)
    for pause in (1.05, 0, 0):  # Event timestamps have whole seconds
        recorder.record(obj, "Warning", "WriteFailed", "cordon n1: 500 InternalError")
        time.sleep(pause)
    recorder.record(obj, "Warning", "WriteFailed", "cordon n2: 500 InternalError")
    recorder.flush()
    found = {e["message"]: e for e in events_for(cluster, obj["metadata"]["name"])}
    assert set(found) == {"cordon n1: 500 InternalError", "cordon n2: 500 InternalError"}
    one = found["cordon n1: 500 InternalError"]
    assert one["count"] == 3 and one["lastTimestamp"] > one["firstTimestamp"]
    assert found["cordon n2: 500 InternalError"]["count"] == 1
    assert one["involvedObject"]["uid"] == f"uid-{tag}"


def test_events_after_a_quiet_window_are_new_events(cluster, unique) -> None:
    obj = drain_like(unique)
    recorder = EventRecorder(cluster.kube, window=0.3, min_interval=0)
    recorder.record(obj, "Normal", "Draining", "started")
    recorder.record(obj, "Normal", "Draining", "started")
    time.sleep(0.5)
    recorder.record(obj, "Normal", "Draining", "started")
    assert sorted(e["count"] for e in events_for(cluster, obj["metadata"]["name"])) == [1, 2]


def test_repeats_within_the_write_interval_are_held_then_written(cluster, unique) -> None:
    obj = drain_like(unique)
    recorder = EventRecorder(cluster.kube, min_interval=1.0)
    for _ in range(5):
        recorder.record(obj, "Warning", "WriteFailed", "same")
    [event] = events_for(cluster, obj["metadata"]["name"])
    assert event["count"] == 1  # the four repeats are held
    time.sleep(1.1)
    recorder.record(obj, "Normal", "Other", "another event writes what was held")
    counts = {e["reason"]: e["count"] for e in events_for(cluster, obj["metadata"]["name"])}
    assert counts == {"WriteFailed": 5, "Other": 1}


def test_an_event_create_repeated_by_the_client_makes_one_event(cluster, proxy, unique) -> None:
    obj = drain_like(unique)
    proxy.add("POST", "/namespaces/default/events", "drop-after")
    EventRecorder(via(proxy, cluster), min_interval=0).record(obj, "Normal", "R", "once")
    assert [(e.method, e.status) for e in proxy.requests()] == [
        ("POST", None), ("POST", 409), ("PATCH", 200)]
    [event] = events_for(cluster, obj["metadata"]["name"])
    assert event["count"] == 1


# -- the operator through the proxy ---------------------------------------------------------------

SCENARIO = """
seed: 3
timeScale: 10
nodes:
  - generate: {count: 2, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - {name: vm-1, namespace: apps, node: node-1, memory: 1Gi}
"""


@pytest.fixture(scope="module")
def proxied_operator(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    proxy = FaultProxy(fresh_cluster.kube.server, ca_file(fresh_cluster)).start()
    workdir = tmp_path_factory.mktemp("proxied")
    config = yaml.safe_load(fresh_cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"] = {"server": proxy.url}
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    op = OperatorProcess(kubeconfig, workdir, scenario.time_scale).start()
    try:
        yield {"kube": fresh_cluster.kube, "proxy": proxy, "op": op}
    finally:
        op.stop()
        proxy.stop()
        sim.stop()


def test_a_step_failing_on_every_pass_makes_one_event_with_a_count(proxied_operator) -> None:
    kube, proxy = proxied_operator["kube"], proxied_operator["proxy"]
    failing = proxy.add("POST", "/virtualmachineinstancemigrations", "status", 500,
                        times=10**6)
    kube.create(rest.NODE_DRAINS, drain_body("flaky", nodeName="node-1"))

    def write_failed() -> list[dict[str, Any]]:
        return [e for e in kube.items(rest.EVENTS, "default",
                                      field_selector="involvedObject.name=flaky")
                if e["reason"] == "WriteFailed"]

    wait_for(lambda: failing.used >= 12, timeout=60, what="two passes of failed creates")
    events = wait_for(lambda: (w := write_failed()) and w[0]["count"] >= 2 and w,
                      timeout=30, what=lambda: "a counted WriteFailed event: " + str(
                          [(e["count"], e["message"][:90]) for e in write_failed()]))
    assert len(events) == 1, events
    assert events[0]["message"].startswith("create apps/")
    assert "500 InternalError" in events[0]["message"]
    # Each pass retried the create (six tries, backing off) before reporting it.
    creates = proxy.requests("POST", "/virtualmachineinstancemigrations")
    first_pass = creates[:6]
    assert all(b.arrived - a.answered >= 0.1 * 2 ** n - SLACK
               for n, (a, b) in enumerate(itertools.pairwise(first_pass)))
    failing.times = 0  # the API server recovers
    wait_for(lambda: phase_of(kube, "flaky") == "Drained", timeout=60, what="drained")
    assert len(write_failed()) == 1
    assert "Traceback" not in proxied_operator["op"].logs()
