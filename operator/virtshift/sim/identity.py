"""KubeVirt's own identities, so the API server (and virt-api's admitters) see the simulator's
requests as KubeVirt's: ``system:serviceaccount:kubevirt:kubevirt-controller`` and friends.

KubeVirt's components run under ServiceAccounts of its install namespace (``kubevirt-controller``
for virt-controller, ``kubevirt-apiserver`` for virt-api, ``kubevirt-handler`` for virt-handler).
The simulator creates them, binds them to ``cluster-admin`` (KubeVirt's own ClusterRoles are
narrower; the simulator needs no less), and authenticates as them with tokens from the
TokenRequest API (``serviceaccounts/token``), renewed before they expire.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass

from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, KubeClient
from virtshift.sim.admission import (
    API_SERVICE_ACCOUNT,
    CONTROLLER_SERVICE_ACCOUNT,
    HANDLER_SERVICE_ACCOUNT,
)
from virtshift.sim.objects import KUBEVIRT_NAMESPACE

BINDING = "virtshift-sim-kubevirt-cluster-admin"
SERVICE_ACCOUNTS = (CONTROLLER_SERVICE_ACCOUNT, API_SERVICE_ACCOUNT, HANDLER_SERVICE_ACCOUNT)
TOKEN_SECONDS = 3600  # asked for; renewed when 80% of the granted lifetime has passed


class ServiceAccountToken:
    """A bearer token of one ServiceAccount (TokenRequest API), renewed before it expires."""

    def __init__(self, admin: KubeClient, name: str, namespace: str = KUBEVIRT_NAMESPACE,
                 seconds: int = TOKEN_SECONDS) -> None:
        self.admin, self.name, self.namespace, self.seconds = admin, name, namespace, seconds
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                started = time.monotonic()
                status = self.admin.create(rest.SERVICE_ACCOUNTS, {
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"expirationSeconds": self.seconds}},
                    namespace=self.namespace, name=self.name, subresource="token")["status"]
                granted = _seconds_until(status.get("expirationTimestamp"), self.seconds)
                self._token = status["token"]
                self._renew_at = started + 0.8 * granted
            return self._token


def _seconds_until(stamp: str | None, default: float) -> float:
    if not stamp:
        return default
    when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max(60.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


@dataclass
class Identities:
    """KubeClients that act as KubeVirt's components."""

    controller: KubeClient  # virt-controller: VMIMs it creates, VMI and pod writes
    api: KubeClient  # virt-api: the admitters' lookups and the eviction mark
    handler: KubeClient  # virt-handler


def ensure_identities(admin: KubeClient, namespace: str = KUBEVIRT_NAMESPACE) -> Identities:
    """Create KubeVirt's ServiceAccounts and their cluster-admin binding (idempotent), and
    clients authenticating as them."""
    admin.create_or_get(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": namespace}})
    for name in SERVICE_ACCOUNTS:
        admin.create_or_get(rest.SERVICE_ACCOUNTS, {
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "virtshift-sim"}}})
    binding: JSON = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": BINDING, "labels": {"app.kubernetes.io/managed-by": "virtshift-sim"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}
                     for name in SERVICE_ACCOUNTS],
    }
    existing = admin.create_or_get(rest.CLUSTER_ROLE_BINDINGS, binding)
    if existing.get("subjects") != binding["subjects"]:
        admin.patch(rest.CLUSTER_ROLE_BINDINGS, BINDING, {"subjects": binding["subjects"]})
    clients = {name: admin.with_token(ServiceAccountToken(admin, name, namespace))
               for name in SERVICE_ACCOUNTS}
    return Identities(controller=clients[CONTROLLER_SERVICE_ACCOUNT],
                      api=clients[API_SERVICE_ACCOUNT], handler=clients[HANDLER_SERVICE_ACCOUNT])
