"""virt-api's admission webhooks, served against the local API server.

One HTTPS server on ``https://127.0.0.1:<port>`` (its own CA in ``caBundle``) answers on
KubeVirt's paths with the decisions of ``virtshift.sim.admission``, registered as KubeVirt
registers them (pkg/virt-operator/resource/generate/components/webhooks.go): the
ValidatingWebhookConfiguration ``virt-api-validator`` and the MutatingWebhookConfiguration
``virt-api-mutator``, KubeVirt's webhook names, ``failurePolicy: Fail``, ``timeoutSeconds: 10``.
Both are removed when the server stops.

The server reads the cluster as virt-api does: live GETs and LISTs as the ``kubevirt-apiserver``
ServiceAccount, and the KubeVirt CR (version, feature gates) from a watch. It carries out the one
side effect a decision asks for: marking a VMI for evacuation (``markVMI``'s JSON patch of
``/status/evacuationNodeName``). KubeVirt's evacuation controller then acts on that field; until
the simulated one watches it itself, ``on_marked(vmi_key, node)`` tells the simulator.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from virtshift.devenv import certs
from virtshift.k8s import rest
from virtshift.k8s.informer import Informer
from virtshift.k8s.rest import JSON, ApiError, KubeClient, Resource
from virtshift.sim import admission
from virtshift.sim.admission import ClusterConfig
from virtshift.sim.objects import KUBEVIRT_NAMESPACE

log = logging.getLogger(__name__)
VALIDATING_CONFIG = "virt-api-validator"  # components.VirtAPIValidatingWebhookName
MUTATING_CONFIG = "virt-api-mutator"  # components.VirtAPIMutatingWebhookName
KUBEVIRT_VERSIONS = list(admission.API_SUPPORTED_WEBHOOK_VERSIONS)


def _rule(operations: list[str], group: str, versions: list[str], resource: str) -> JSON:
    return {"operations": operations, "apiGroups": [group], "apiVersions": versions,
            "resources": [resource]}


@dataclass(frozen=True)
class Webhook:
    """One webhook of KubeVirt's configurations, and the path it is served on."""

    name: str
    path: str
    rules: list[JSON]
    side_effects: str = "None"
    review_versions: tuple[str, ...] = ("v1",)
    match_conditions: list[JSON] = field(default_factory=list)

    def wire(self, url: str, ca_bundle: str) -> JSON:
        out: JSON = {
            "name": self.name, "admissionReviewVersions": list(self.review_versions),
            "sideEffects": self.side_effects, "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": url + self.path, "caBundle": ca_bundle},
            "rules": self.rules,
        }
        if self.match_conditions:
            out["matchConditions"] = self.match_conditions
        return out


VALIDATING = [
    Webhook("virt-launcher-eviction-interceptor.kubevirt.io", "/pod-eviction-validate",
            [_rule(["*"], "", ["v1"], "pods/eviction")], side_effects="NoneOnDryRun",
            match_conditions=[{"name": "only-vms", "expression":
                               'object.metadata.name.startsWith("virt-launcher")'}]),
    Webhook("hotplug-pod-eviction-interceptor.kubevirt.io", "/pod-eviction-validate",
            [_rule(["*"], "", ["v1"], "pods/eviction")], side_effects="NoneOnDryRun",
            review_versions=("v1", "v1beta1"),
            match_conditions=[{"name": "only-hotplug-pods", "expression":
                               'object.metadata.name.startsWith("hp-volume-")'}]),
    Webhook("virtualmachineinstances-update-validator.kubevirt.io",
            "/virtualmachineinstances-validate-update",
            [_rule(["UPDATE"], "kubevirt.io", KUBEVIRT_VERSIONS, "virtualmachineinstances")]),
    Webhook("virtualmachine-validator.kubevirt.io", "/virtualmachines-validate",
            [_rule(["CREATE", "UPDATE"], "kubevirt.io", KUBEVIRT_VERSIONS, "virtualmachines")]),
    Webhook("migration-create-validator.kubevirt.io", "/migration-validate-create",
            [_rule(["CREATE"], "kubevirt.io", KUBEVIRT_VERSIONS,
                   "virtualmachineinstancemigrations")]),
    Webhook("migration-update-validator.kubevirt.io", "/migration-validate-update",
            [_rule(["UPDATE"], "kubevirt.io", KUBEVIRT_VERSIONS,
                   "virtualmachineinstancemigrations")]),
    Webhook("migration-policy-validator.kubevirt.io", "/migration-policy-validate-create",
            [_rule(["CREATE", "UPDATE"], "migrations.kubevirt.io", ["v1alpha1"],
                   "migrationpolicies")]),
]
MUTATING = [
    Webhook("migrations-mutator.kubevirt.io", "/migration-mutate-create",
            [_rule(["CREATE"], "kubevirt.io", KUBEVIRT_VERSIONS,
                   "virtualmachineinstancemigrations")]),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the API server reuses its connections
    # Headers and body go out in two writes: without TCP_NODELAY the body waits for the
    # API server's delayed ACK (~40 ms a call).
    disable_nagle_algorithm = True
    server_ref: AdmissionWebhooks

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        request = review.get("request") or {}
        handler = self.server_ref.routes.get(self.path.split("?", 1)[0])
        if handler is None:
            self._send(404, b"not found", "text/plain")
            return
        try:
            response = dict(handler(request))
        except Exception as exc:  # a bug here must not pass silently, nor hang the caller
            log.exception("admission on %s failed", self.path)
            response = {"allowed": False, "status": {
                "code": 500, "message": f"virtshift simulator: admission failed: {exc}"}}
        if isinstance(response.get("patch"), list):
            response["patch"] = base64.b64encode(json.dumps(response["patch"]).encode()).decode()
        body = json.dumps({"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
                           "kind": "AdmissionReview",
                           "response": {"uid": request.get("uid", ""), **response}}).encode()
        self._send(200, body, "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug(fmt, *args)


def _lookup(fn: Callable[[], JSON | None]) -> JSON | None:
    """None for NotFound; any other API error raised with the API server's message."""
    try:
        return fn()
    except ApiError as exc:
        raise RuntimeError(exc.message) from None


class AdmissionWebhooks:
    """virt-api's validating and mutating webhooks, served and registered."""

    def __init__(self, admin: KubeClient, api: KubeClient,
                 on_marked: Callable[[str, str], None] | None = None,
                 namespace: str = KUBEVIRT_NAMESPACE) -> None:
        self.admin = admin  # registers the configurations
        self.api = api  # reads and marks, as virt-api's ServiceAccount
        self.on_marked = on_marked
        self.namespace = namespace
        self.kubevirts = Informer(api, rest.KUBEVIRTS)
        self.routes: dict[str, Callable[[JSON], JSON]] = {
            "/migration-mutate-create": admission.mutate_migration_create,
            "/migration-validate-create": lambda r: admission.admit_migration_create(
                r, self.config(), self._get_vmi, self._list_migrations),
            "/migration-validate-update": admission.admit_migration_update,
            "/pod-eviction-validate": self._pod_eviction,
            "/virtualmachines-validate": lambda r: admission.admit_vm(r, self.config()),
            "/migration-policy-validate-create": lambda r: admission.admit_migration_policy(
                r, self.config()),
            "/virtualmachineinstances-validate-update": lambda r: admission.admit_vmi_update(
                r, self.config()),
        }
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        ca, ca_key = certs.make_ca("virtshift-sim-virt-api-ca")
        serving = certs.make_serving_cert(ca, ca_key, ["127.0.0.1", "localhost"], "virt-api")
        self._dir = tempfile.TemporaryDirectory(prefix="virtshift-webhook-")
        cert, key = Path(self._dir.name) / "tls.crt", Path(self._dir.name) / "tls.key"
        certs.write(serving, cert, key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.ca_bundle = base64.b64encode(ca.cert).decode()
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="virt-api-webhooks")

    # -- what the admitters read -------------------------------------------------------------

    def config(self) -> ClusterConfig:
        return ClusterConfig.from_kubevirt(next(
            (kv for kv in self.kubevirts.values()
             if kv["metadata"].get("namespace") == self.namespace), None))

    def _get_vmi(self, namespace: str, name: str) -> JSON | None:
        return _lookup(lambda: self.api.get(rest.VMIS, name, namespace))

    def _get_pod(self, namespace: str, name: str) -> JSON | None:
        return _lookup(lambda: self.api.get(rest.PODS, name, namespace))

    def _list_migrations(self, namespace: str, vmi: str) -> list[JSON]:
        try:
            return self.api.items(rest.VMIMS, namespace, label_selector=(
                f"{admission.MIGRATION_SELECTOR_LABEL} in ({vmi})"))
        except ApiError as exc:
            raise RuntimeError(exc.message) from None

    def _pod_eviction(self, request: JSON) -> JSON:
        decision = admission.admit_pod_eviction(request, self.config(), self._get_pod,
                                                self._get_vmi)
        mark = decision.mark
        if mark is None:
            return decision.response
        try:
            self.api.patch(rest.VMIS, mark.name, mark.patch, mark.namespace,
                           kind=rest.JSON_PATCH, dry_run=mark.dry_run)
        except ApiError as exc:
            return admission.marking_failed(exc.message)
        if not mark.dry_run and mark.migrate and self.on_marked is not None:
            try:
                self.on_marked(mark.vmi_key, mark.node)
            except Exception:
                log.exception("evacuation of %s not started", mark.vmi_key)
        return decision.response

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> AdmissionWebhooks:
        self.kubevirts.start()
        self.kubevirts.wait_synced(timeout)
        self._thread.start()
        self._apply(rest.WEBHOOKS, "ValidatingWebhookConfiguration", VALIDATING_CONFIG,
                    VALIDATING)
        self._apply(rest.MUTATING_WEBHOOKS, "MutatingWebhookConfiguration", MUTATING_CONFIG,
                    MUTATING)
        return self

    def _apply(self, res: Resource, kind: str, name: str, hooks: list[Webhook]) -> None:
        body: JSON = {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "labels": {"kubevirt.io": name,
                                                  "app.kubernetes.io/managed-by": "virtshift-sim"}},
            "webhooks": [h.wire(self.url, self.ca_bundle) for h in hooks],
        }
        existing = self.admin.get(res, name)
        if existing:  # left by a simulator that did not stop cleanly: point it here
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            self.admin.replace(res, body)
        else:
            self.admin.create(res, body)

    def stop(self) -> None:
        for res, name in ((rest.WEBHOOKS, VALIDATING_CONFIG),
                          (rest.MUTATING_WEBHOOKS, MUTATING_CONFIG)):
            try:
                self.admin.delete(res, name)
            except ApiError as exc:
                log.warning("could not remove %s: %s", name, exc)
        self.server.shutdown()
        self.server.server_close()
        self.kubevirts.stop()
        self._dir.cleanup()
