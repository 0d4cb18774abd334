"""The API client under a failing API server: retries, backoff, Retry-After, never a write done
twice. Faults come from a real proxy in front of the real API server
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
from fault_proxy import FaultProxy
from operator_harness import wait_for

from virtshift.k8s import rest
from virtshift.k8s.informer import Informer
from virtshift.k8s.rest import ApiError, KubeClient, RetryPolicy

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
