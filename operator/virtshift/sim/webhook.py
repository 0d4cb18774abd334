"""KubeVirt's virt-launcher eviction interceptor, against the local API server.

KubeVirt answers an eviction of a virt-launcher pod whose VMI should migrate with
``allowed: false`` and code 429 ("Eviction triggered evacuation of VMI ns/name"), marks the VMI
with ``status.evacuationNodeName`` and migrates it. An ``objectSelector`` never matches
``pods/eviction`` (the object is the Eviction), so the handler looks the pod up itself.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from virtshift.devenv import certs
from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, KubeClient
from virtshift.sim.kubevirt import KubeVirtSim

log = logging.getLogger(__name__)
WEBHOOK_NAME = "virt-launcher-eviction-interceptor.kubevirt.io"
CONFIG_NAME = "virt-api-validator"
MIGRATING = ("LiveMigrate", "LiveMigrateIfPossible", "External")


def decide(sim: KubeVirtSim, request: JSON) -> JSON:
    """The admission response for one pods/eviction request."""
    ns, name = request.get("namespace"), request.get("name")
    vm = next((v for v in sim.world.vms.values()
               if v.pod_name == name and v.spec.namespace == ns and v.running), None)
    if vm is None:
        return {"allowed": True}
    strategy = vm.spec.eviction_strategy
    migratable = vm.spec.live_migratable
    if strategy not in MIGRATING or (strategy == "LiveMigrateIfPossible" and not migratable):
        return {"allowed": True}
    if not request.get("dryRun"):
        sim.kube.patch(rest.VMIS, vm.spec.name, {"status": {"evacuationNodeName": vm.node}}, ns)
        if strategy != "External":
            sim.request_evacuation(vm.key, vm.node)
    return {"allowed": False, "status": {
        "code": 429, "reason": "TooManyRequests",
        "message": f"Eviction triggered evacuation of VMI \"{vm.key}\""}}


class _Handler(BaseHTTPRequestHandler):
    sim: KubeVirtSim

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        request = review.get("request") or {}
        try:
            response = decide(self.sim, request)
        except Exception as exc:
            log.warning("eviction webhook failed: %s", exc)
            response = {"allowed": True}
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": {"uid": request.get("uid", ""), **response}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug(fmt, *args)


class EvictionWebhook:
    def __init__(self, kube: KubeClient, sim: KubeVirtSim) -> None:
        self.kube = kube
        handler = type("Handler", (_Handler,), {"sim": sim})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ca, ca_key = certs.make_ca("virtshift-sim-webhook-ca")
        serving = certs.make_serving_cert(ca, ca_key, ["127.0.0.1", "localhost"], "virt-api")
        self._dir = tempfile.TemporaryDirectory(prefix="virtshift-webhook-")
        cert, key = Path(self._dir.name) / "tls.crt", Path(self._dir.name) / "tls.key"
        certs.write(serving, cert, key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.ca_bundle = base64.b64encode(ca.cert).decode()
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="eviction-webhook")

    def start(self) -> EvictionWebhook:
        self._thread.start()
        body = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": CONFIG_NAME},
            "webhooks": [{
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "NoneOnDryRun",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://127.0.0.1:{self.port}/launcher-eviction",
                                 "caBundle": self.ca_bundle},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods/eviction"], "scope": "Namespaced"}],
            }],
        }
        existing = self.kube.get(rest.WEBHOOKS, CONFIG_NAME)
        if existing:
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            self.kube.replace(rest.WEBHOOKS, body)
        else:
            self.kube.create(rest.WEBHOOKS, body)
        return self

    def stop(self) -> None:
        self.kube.delete(rest.WEBHOOKS, CONFIG_NAME)
        self.server.shutdown()
        self._dir.cleanup()
