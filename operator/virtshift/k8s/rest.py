"""A small JSON client for the Kubernetes API: plain dicts in and out, list, watch, patch.

It takes its connection settings (server, CA, token or client certificate) from the official
``kubernetes`` package's kubeconfig / in-cluster loaders, and talks over one thread-safe
urllib3 pool. Dicts keep us close to the wire format that our pydantic models and KubeVirt's
schemas describe, with no generated model classes in between.

Transient failures are retried (``RetryPolicy``): a connection that could not be opened, 429
(the API server's priority and fairness, or max-in-flight), 500, 502, 503 and 504, with
exponential backoff and jitter, waiting at least what a ``Retry-After`` says, and never longer
in all than the policy's budget. A request the server may already have carried out (the
connection broke after it was sent, or a 5xx other than 503) is retried only when repeating it
cannot do anything twice: reads, PUT, DELETE, merge and apply patches, and creates of a fixed
name (a repeat answers 409 AlreadyExists, which callers take as "it exists"). A create with
``generateName`` or a JSON patch is sent again only when the server cannot have seen it. An
eviction's 429 is its answer (a PodDisruptionBudget, or KubeVirt migrating the VM instead), not
back-pressure, and is returned at once.
"""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes import client as kclient
from kubernetes import config as kconfig
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)
# Every try of every request, by verb, resource (plural, plus subresource) and status code
# (0: no answer): bounded labels, no object names.
API_REQUESTS = Counter("virtshift_api_requests_total",
                       "Requests to the Kubernetes API server, each try, by verb, resource "
                       "and status code (0: no answer)", ["verb", "resource", "code"])
API_LATENCY = Histogram("virtshift_api_request_duration_seconds",
                        "Latency of Kubernetes API requests (each try)", ["verb"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

JSON = dict[str, Any]
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


# What a call may raise besides ApiError when the API server could not be reached or the
# connection broke (after the client's own retries): transient, like a 5xx.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


class ApiError(Exception):
    def __init__(self, status: int, body: str, retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        details: Any = {}
        try:
            parsed = json.loads(body)
            self.reason = parsed.get("reason", "")
            self.message = parsed.get("message", body)
            details = parsed.get("details") or {}
        except (ValueError, AttributeError):
            self.reason, self.message = "", body
        if retry_after is None and isinstance(details, dict) and details.get("retryAfterSeconds"):
            retry_after = float(details["retryAfterSeconds"])
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said
        super().__init__(f"{status} {self.reason}: {self.message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Answers that say the request was not carried out: safe to repeat whatever it was.
NOT_PROCESSED_STATUSES = frozenset({429})


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried: at most ``attempts`` tries, waiting ``base`` x ``factor``^n
    (at most ``cap``) with jitter (a uniform draw from half to all of it) between them, or at
    least a ``Retry-After``; and no more than ``budget`` seconds from the first try to the
    start of the last. A wait that would end past the budget is not begun: the last error is
    raised at once."""

    attempts: int = 6
    base: float = 0.2
    factor: float = 2.0
    cap: float = 5.0
    budget: float = 10.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1 for the first), with jitter."""
        full = min(self.cap, self.base * self.factor ** (retry - 1))
        return full * rng.uniform(0.5, 1.0)


def _repeatable(method: str, body: Any, content_type: str, name_in_path: bool) -> bool:
    """Whether sending this request twice does no more than sending it once."""
    if method in ("GET", "HEAD", "PUT", "DELETE"):
        return True
    if method == "PATCH":
        return content_type in (MERGE, APPLY, STRATEGIC)
    if method == "POST":
        if name_in_path:  # a subresource of a named object (an eviction)
            return True
        meta = (body.get("metadata") or {}) if isinstance(body, Mapping) else {}
        return bool(meta.get("name")) and not meta.get("generateName")
    return False


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API: group ("" for core), version, plural, namespaced."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


NODES = Resource("", "v1", "nodes", namespaced=False)
PODS = Resource("", "v1", "pods")
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)
EVENTS = Resource("", "v1", "events")
PVCS = Resource("", "v1", "persistentvolumeclaims")
PVS = Resource("", "v1", "persistentvolumes", namespaced=False)
STORAGE_CLASSES = Resource("storage.k8s.io", "v1", "storageclasses", namespaced=False)
VMS = Resource("kubevirt.io", "v1", "virtualmachines")
VMIS = Resource("kubevirt.io", "v1", "virtualmachineinstances")
VMIMS = Resource("kubevirt.io", "v1", "virtualmachineinstancemigrations")
KUBEVIRTS = Resource("kubevirt.io", "v1", "kubevirts")
KUBEVIRT_POLICIES = Resource("migrations.kubevirt.io", "v1alpha1", "migrationpolicies",
                             namespaced=False)
NODE_DRAINS = Resource("virtshift.io", "v1alpha1", "nodedrains", namespaced=False)
POLICIES = Resource("virtshift.io", "v1alpha1", "migrationpolicies", namespaced=False)
WEBHOOKS = Resource("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
                    namespaced=False)
MUTATING_WEBHOOKS = Resource("admissionregistration.k8s.io", "v1",
                             "mutatingwebhookconfigurations", namespaced=False)
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts")
CLUSTER_ROLE_BINDINGS = Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings",
                                 namespaced=False)
PDBS = Resource("policy", "v1", "poddisruptionbudgets")


def load_configuration(kubeconfig: str | None = None) -> kclient.Configuration:
    """Settings from a kubeconfig (argument, $KUBECONFIG, ~/.kube/config) or the pod's account."""
    cfg = kclient.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path or os.path.exists(os.path.expanduser("~/.kube/config")):
        kconfig.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        kconfig.load_incluster_config(client_configuration=cfg)
    return cfg


class KubeClient:
    def __init__(self, cfg: kclient.Configuration, pool_size: int = 32,
                 retry: RetryPolicy | None = None) -> None:
        self.cfg = cfg
        self.retry = retry or RetryPolicy()
        self._rng = random.Random()
        self.server = cfg.host.rstrip("/")
        if cfg.verify_ssl:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:  # only when the kubeconfig asks for insecure-skip-tls-verify
            ctx = ssl._create_unverified_context()
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        self.http = urllib3.PoolManager(num_pools=4, maxsize=pool_size, ssl_context=ctx)
        self._token: Callable[[], str] | None = None

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None) -> KubeClient:
        return cls(load_configuration(kubeconfig))

    def with_token(self, token: str | Callable[[], str], pool_size: int = 32) -> KubeClient:
        """A client of the same server (and CA) that authenticates only with this bearer token,
        e.g. a ServiceAccount's from the TokenRequest API. A callable is asked for the token
        on every request, so it can renew one before it expires."""
        cfg = copy.copy(self.cfg)
        cfg.api_key, cfg.api_key_prefix = {}, {}
        cfg.refresh_api_key_hook = None
        cfg.cert_file = cfg.key_file = None  # a client certificate would authenticate first
        client = KubeClient(cfg, pool_size, self.retry)
        client._token = token if callable(token) else (lambda: token)
        return client

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token()}"
        else:
            key = self.cfg.get_api_key_with_prefix
            auth = key("authorization") or key("BearerToken")
            if auth:
                headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30,
                retry: RetryPolicy | None = None, answers: frozenset[int] = frozenset()
                ) -> JSON:
        """One API call, retried as the module docstring says. ``answers``: statuses that are
        this call's answer rather than a transient failure (never retried)."""
        url = self.server + path + (("?" + urlencode(params)) if params else "")
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        policy = retry or self.retry
        repeatable = _repeatable(method, body, content_type, name_in_path=_names_object(path))
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                resp = self._send(method, url, data, path,
                                  self._headers(content_type if data else None),
                                  urllib3.Timeout(connect=5, read=timeout))
            except urllib3.exceptions.ConnectTimeoutError as exc:  # never reached the server
                failure: Exception = exc
                wait = None
            except (urllib3.exceptions.ProtocolError,
                    urllib3.exceptions.ReadTimeoutError) as exc:  # may have been carried out
                if not repeatable:
                    raise
                failure, wait = exc, None
            else:
                text = resp.data.decode()
                if resp.status < 400:
                    return json.loads(text) if text else {}
                error = ApiError(resp.status, text,
                                 parse_retry_after(resp.headers.get("Retry-After")))
                if resp.status not in RETRY_STATUSES or resp.status in answers or (
                        not repeatable and resp.status not in NOT_PROCESSED_STATUSES):
                    raise error
                failure, wait = error, error.retry_after
            if attempt == policy.attempts:
                raise failure
            delay = policy.backoff(attempt, self._rng)
            if wait is not None:  # at least what the server asked, plus a little jitter
                delay = wait + self._rng.uniform(0, min(1.0, 0.1 * wait + 0.05))
            if time.monotonic() + delay - started > policy.budget:
                raise failure
            log.info("%s %s failed (%s); retry %d of %d in %.2fs", method, path,
                     _describe(failure), attempt, policy.attempts - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, data: Any, path: str, headers: dict[str, str],
              timeout: urllib3.Timeout) -> Any:
        """One try, counted in virtshift_api_requests_total."""
        sent = time.monotonic()
        code = 0
        try:
            resp = self.http.request(method, url, body=data, headers=headers, timeout=timeout,
                                     retries=False)
            code = resp.status
            return resp
        finally:
            API_REQUESTS.labels(method, resource_of(path), str(code)).inc()
            API_LATENCY.labels(method).observe(time.monotonic() - sent)

    # -- verbs ------------------------------------------------------------------------------

    def get(self, res: Resource, name: str, namespace: str | None = None) -> JSON | None:
        try:
            return self.request("GET", res.path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list(self, res: Resource, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None,
             transform: Callable[[JSON], JSON] | None = None) -> tuple[list[JSON], str]:
        """Every item (following continue tokens; ``transform``: each item as its page
        arrives) and the list's resourceVersion."""
        items: list[JSON] = []
        params: dict[str, Any] = {"limit": 500}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        while True:
            page = self.request("GET", res.path(namespace), params=params)
            page_items = page.get("items") or []
            items.extend(map(transform, page_items) if transform else page_items)
            token = page.get("metadata", {}).get("continue")
            if not token:
                return items, page.get("metadata", {}).get("resourceVersion", "")
            params["continue"] = token

    def items(self, res: Resource, namespace: str | None = None, **selectors: str | None
              ) -> list[JSON]:
        return self.list(res, namespace, **selectors)[0]

    def create(self, res: Resource, body: JSON, namespace: str | None = None,
               subresource: str | None = None, name: str | None = None,
               dry_run: bool = False) -> JSON:
        ns = namespace or body.get("metadata", {}).get("namespace")
        params = {"dryRun": "All"} if dry_run else None
        # An eviction's 429 is its answer: a disruption budget, or KubeVirt migrating the VM.
        answers = frozenset({429}) if subresource == "eviction" else frozenset()
        return self.request("POST", res.path(ns, name, subresource), body, params=params,
                            answers=answers)

    def create_or_get(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        """Create; on 409 (already exists, e.g. after a restart) return the existing object."""
        try:
            return self.create(res, body, namespace)
        except ApiError as exc:
            if not exc.conflict:
                raise
            existing = self.get(res, body["metadata"]["name"],
                                namespace or body["metadata"].get("namespace"))
            if existing is None:
                raise
            return existing

    def replace(self, res: Resource, body: JSON, subresource: str | None = None) -> JSON:
        meta = body["metadata"]
        return self.request("PUT", res.path(meta.get("namespace"), meta["name"], subresource), body)

    def patch(self, res: Resource, name: str, patch: Any, namespace: str | None = None,
              subresource: str | None = None, kind: str = MERGE,
              field_manager: str | None = None, dry_run: bool = False) -> JSON:
        params: dict[str, str] | None = {"fieldManager": field_manager} if field_manager else None
        if kind == APPLY:
            params = {"fieldManager": field_manager or "virtshift", "force": "true"}
        if dry_run:
            params = {**(params or {}), "dryRun": "All"}
        return self.request("PATCH", res.path(namespace, name, subresource), patch,
                            params=params, content_type=kind)

    def delete(self, res: Resource, name: str, namespace: str | None = None,
               grace_seconds: int | None = None, uid: str | None = None,
               resource_version: str | None = None) -> bool:
        """Delete; False when it was already gone. ``uid``/``resource_version``: only that
        object, as it was then (409 Conflict otherwise)."""
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        preconditions = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version))
                         if v}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            self.request("DELETE", res.path(namespace, name), body)
            return True
        except ApiError as exc:
            if exc.not_found:
                return False
            raise

    def watch(self, res: Resource, resource_version: str, namespace: str | None = None,
              label_selector: str | None = None, timeout_seconds: int = 60
              ) -> Iterator[tuple[str, JSON]]:
        """(type, object) events from resource_version on; ends when the server closes it."""
        params: dict[str, Any] = {"watch": "1", "resourceVersion": resource_version,
                                  "timeoutSeconds": timeout_seconds,
                                  "allowWatchBookmarks": "true"}
        if label_selector:
            params["labelSelector"] = label_selector
        url = self.server + res.path(namespace) + "?" + urlencode(params)
        resp = self.http.request("GET", url, headers=self._headers(), preload_content=False,
                                 timeout=urllib3.Timeout(connect=5, read=timeout_seconds + 10),
                                 retries=False)
        API_REQUESTS.labels("WATCH", res.plural, str(resp.status)).inc()
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.data.decode(),
                               parse_retry_after(resp.headers.get("Retry-After")))
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        yield event["type"], event["object"]
        finally:
            resp.release_conn()


def resource_of(path: str) -> str:
    """The resource a path addresses: its plural, plus a subresource (pods/eviction)."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return "discovery"
    return rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")


def _names_object(path: str) -> bool:
    """A path of a named object's subresource, e.g. .../pods/NAME/eviction."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # past /api/v1 or /apis/g/v
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    return len(rest) >= 3  # plural, name, subresource


def _describe(failure: Exception) -> str:
    if isinstance(failure, ApiError):
        return f"{failure.status} {failure.reason}".strip()
    return type(failure).__name__
