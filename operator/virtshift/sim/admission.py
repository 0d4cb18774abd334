"""virt-api's admission rules, as pure decisions: one function per KubeVirt admitter.

Each function takes the AdmissionReview ``request`` (a dict, as the API server sends it) and,
where KubeVirt's admitter reads the cluster, small lookup callables (get a VMI, list a VMI's
migrations by label, get a pod) and the cluster configuration KubeVirt reads from its CR. It
returns the AdmissionResponse fields (``allowed``, ``status``, ``patch``...) with KubeVirt's own
messages, HTTP codes and causes, so a client of the API server sees what it would see with
KubeVirt: ``admission webhook "<name>" denied the request: <message>``.

Rules follow KubeVirt v1.7.4, v1.8.4 and v1.9.0 (``ClusterConfig.version`` picks where they
differ). The webhook server (``virtshift.sim.webhook``) serves them on KubeVirt's paths and
carries out the one side effect a decision can ask for: marking a VMI for evacuation.

Not modelled: the OpenAPI schema checks (``webhookutils.ValidateSchema``; the API server
validates against KubeVirt's CRD schemas already), the VM template's metadata and full VMI spec
validation, instancetypes and preferences, the DataVolumeTemplate namespace check, the
snapshot/restore status rules, VMI hotplug and node-restriction checks, the stall detector's
factor ranges, and the webhooks this simulator has no use for (VMI create, replica sets, pools,
snapshots, exports, clones, instancetypes, the status validator).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtshift.api.units import parse_quantity
from virtshift.sim.objects import DOMAIN_ANNOTATION, KUBEVIRT_NAMESPACE
from virtshift.sim.scenario import (
    DECENTRALIZED_LIVE_MIGRATION,
    MIGRATION_PRIORITY_QUEUE,
    MIGRATION_STALL_DETECTION,
    KubeVirtSettings,
    gate_enabled,
    version_key,
)

JSON = dict[str, Any]

# pkg/virt-operator/resource/generate/components/serviceaccountnames.go
API_SERVICE_ACCOUNT = "kubevirt-apiserver"
CONTROLLER_SERVICE_ACCOUNT = "kubevirt-controller"
HANDLER_SERVICE_ACCOUNT = "kubevirt-handler"
SYNCHRONIZATION_SERVICE_ACCOUNT = "kubevirt-synchronization-controller"

# staging/src/kubevirt.io/api/core/v1 (types.go, deprecated.go)
MIGRATION_SELECTOR_LABEL = "kubevirt.io/vmi-name"
MIGRATION_FINALIZER = "kubevirt.io/migrationJobFinalize"
EVICTION_SOURCE_ANNOTATION = "kubevirt.io/eviction-source"
APP_LABEL = "kubevirt.io"
API_SUPPORTED_WEBHOOK_VERSIONS = ("v1alpha3", "v1")
# vmi-create-admitter.go: restrictedVmiLabels, also checked on update for non-KubeVirt users.
RESTRICTED_VMI_LABELS = frozenset({
    "kubevirt.io/created-by", "kubevirt.io/migrationJobUID", "kubevirt.io/nodeName",
    "kubevirt.io/migrationTargetNodeName", "kubevirt.io/schedulable",
    "kubevirt.io/install-strategy",
})
# vms-admitter.go: validRunStrategies (WaitAsReceiver is handled apart)
VALID_RUN_STRATEGIES = ("Halted", "Manual", "Always", "RerunOnFailure", "Once")
WAIT_AS_RECEIVER = "WaitAsReceiver"
FINAL_MIGRATION_PHASES = ("Succeeded", "Failed")
FINAL_VMI_PHASES = ("Succeeded", "Failed")
# pod-eviction-admitter.go
REQUESTED_BY_ANNOTATION = "requested-by"
REQUESTED_BY_DESCHEDULER = "sigs.k8s.io/descheduler"
EVICTION_FMT = 'Eviction triggered evacuation of VMI "{}/{}"'

# metav1.CauseType values
FIELD_VALUE_REQUIRED = "FieldValueRequired"
FIELD_VALUE_INVALID = "FieldValueInvalid"
FIELD_VALUE_NOT_SUPPORTED = "FieldValueNotSupported"
FORBIDDEN = "FieldValueForbidden"


def service_account_user(name: str, namespace: str = KUBEVIRT_NAMESPACE) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def kubevirt_service_accounts(namespace: str = KUBEVIRT_NAMESPACE) -> frozenset[str]:
    """pkg/virt-api/webhooks/serviceaccounts.go: KubeVirtServiceAccounts."""
    return frozenset(service_account_user(sa, namespace) for sa in (
        API_SERVICE_ACCOUNT, CONTROLLER_SERVICE_ACCOUNT, HANDLER_SERVICE_ACCOUNT,
        SYNCHRONIZATION_SERVICE_ACCOUNT))


# -- what virt-api reads from the KubeVirt CR -----------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """The part of KubeVirt's ``virtconfig.ClusterConfig`` these admitters read: the release
    (where the rules differ), ``developerConfiguration.featureGates`` and the cluster-wide
    ``evictionStrategy`` (KubeVirt's default is None)."""

    version: str = "1.9"
    feature_gates: tuple[str, ...] = ()
    eviction_strategy: str | None = "None"
    namespace: str = KUBEVIRT_NAMESPACE  # virt-api's own namespace

    def enabled(self, gate: str) -> bool:
        return gate_enabled(self.version, self.feature_gates, gate)

    def at_least(self, version: str) -> bool:
        return version_key(self.version) >= version_key(version)

    @property
    def service_accounts(self) -> frozenset[str]:
        return kubevirt_service_accounts(self.namespace)

    @classmethod
    def from_settings(cls, settings: KubeVirtSettings) -> ClusterConfig:
        return cls(version=settings.version, feature_gates=tuple(settings.feature_gates))

    @classmethod
    def from_kubevirt(cls, kv: JSON | None) -> ClusterConfig:
        """From the KubeVirt CR: the version it reports (``status.observedKubeVirtVersion``,
        e.g. v1.8.4 -> "1.8"; 1.9 when it reports none) and its configuration."""
        kv = kv or {}
        observed = (kv.get("status") or {}).get("observedKubeVirtVersion") or ""
        parts = observed.lstrip("v").split(".")
        version = ".".join(parts[:2]) if len(parts) >= 2 and all(
            p.isdigit() for p in parts[:2]) else cls.version
        config = (kv.get("spec") or {}).get("configuration") or {}
        gates = (config.get("developerConfiguration") or {}).get("featureGates") or ()
        return cls(version=version, feature_gates=tuple(gates),
                   eviction_strategy=config.get("evictionStrategy", "None"),
                   namespace=(kv.get("metadata") or {}).get("namespace") or KUBEVIRT_NAMESPACE)


# -- responses (pkg/util/webhooks/webhooks.go, validating-webhooks/validating-webhook.go) ---------


@dataclass(frozen=True)
class Cause:
    """A metav1.StatusCause."""

    type: str
    message: str
    field: str = ""

    def wire(self) -> JSON:
        out = {"reason": self.type, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


def passing() -> JSON:
    """validating_webhooks.NewPassingAdmissionResponse."""
    return {"allowed": True}


def response_error(message: str) -> JSON:
    """webhookutils.ToAdmissionResponseError: refused with code 400 and the error's text."""
    return {"allowed": False, "status": {"message": message, "code": 400}}


def response_causes(causes: list[Cause]) -> JSON:
    """webhookutils.ToAdmissionResponse: 422 Invalid, the first 10 causes' messages joined."""
    kept = causes[:10]
    message = ", ".join(c.message for c in kept)
    if len(causes) > 10:
        message = f"{message}, and {len(causes) - 10} more validation errors"
    return {"allowed": False, "status": {
        "message": message, "reason": "Invalid", "code": 422,
        "details": {"causes": [c.wire() for c in kept]}}}


def denied(message: str) -> JSON:
    """pod-eviction-admitter.go: denied; code 429 so that drains and the descheduler retry."""
    return {"allowed": False, "status": {"message": message, "code": 429}}


# -- request helpers ----------------------------------------------------------------------------


def _resource_is(request: JSON, group: str, resource: str) -> bool:
    """webhookutils.ValidateRequestResource: the group, the resource, a supported version."""
    res = request.get("resource") or {}
    return (res.get("group") == group and res.get("resource") == resource
            and res.get("version") in API_SUPPORTED_WEBHOOK_VERSIONS)


def _object(request: JSON, key: str = "object") -> JSON:
    return request.get(key) or {}


def _spec(obj: JSON) -> JSON:
    return obj.get("spec") or {}


def _meta(obj: JSON) -> JSON:
    return obj.get("metadata") or {}


def _semantic(value: Any) -> Any:
    """For equality.Semantic.DeepEqual: absent, null, empty maps and empty lists are the same."""
    if isinstance(value, dict):
        out = {k: _semantic(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_semantic(v) for v in value]
    return value


def _semantic_equal(a: Any, b: Any) -> bool:
    return _semantic(a) == _semantic(b)


def _condition(obj: JSON, kind: str) -> JSON | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c.get("type") == kind), None)


def _is_migratable(vmi: JSON) -> bool:
    """VirtualMachineInstance.IsMigratable: a LiveMigratable=True condition."""
    cond = _condition(vmi, "LiveMigratable")
    return cond is not None and cond.get("status") == "True"


def _phase(obj: JSON) -> str:
    return (obj.get("status") or {}).get("phase") or ""


# -- VMIM: mutating webhook ---------------------------------------------------------------------


def mutate_migration_create(request: JSON) -> JSON:
    """``migrations-mutator.kubevirt.io`` on ``/migration-mutate-create``.

    Follows pkg/virt-api/webhooks/mutating-webhook/mutators/migration-create-mutator.go,
    ``(*MigrationCreateMutator).Mutate`` (the same in v1.7.4, v1.8.4 and v1.9.0): label the
    migration ``kubevirt.io/vmi-name=<spec.vmiName>`` (what the create admitter's in-flight check
    selects on), append the finalizer ``kubevirt.io/migrationJobFinalize``, and answer with a
    JSONPatch replacing ``/metadata``.
    """
    if not _resource_is(request, "kubevirt.io", "virtualmachineinstancemigrations"):
        return response_error("expect resource to be 'virtualmachineinstancemigrations'")
    migration = _object(request)
    meta = copy.deepcopy(_meta(migration))
    meta["labels"] = {**(meta.get("labels") or {}),
                      MIGRATION_SELECTOR_LABEL: _spec(migration).get("vmiName", "")}
    meta["finalizers"] = [*(meta.get("finalizers") or []), MIGRATION_FINALIZER]
    # The server base64-encodes the patch into the AdmissionResponse.
    return {"allowed": True, "patchType": "JSONPatch",
            "patch": [{"op": "replace", "path": "/metadata", "value": meta}]}


# -- VMIM: validating webhooks ------------------------------------------------------------------


def _migration_request(request: JSON) -> tuple[JSON, JSON | None] | JSON:
    """migration-create-admitter.go: getAdmissionReviewMigration; a response when refused."""
    if not _resource_is(request, "kubevirt.io", "virtualmachineinstancemigrations"):
        # fmt's %s of the (non-pointer) GroupVersionResource prints the struct.
        return response_error(
            "expect resource to be '{kubevirt.io v1 virtualmachineinstancemigrations}'")
    old = _object(request, "oldObject") if request.get("operation") == "UPDATE" else None
    return _object(request), old


def _is_decentralized(migration: JSON) -> bool:
    """VirtualMachineInstanceMigration.IsDecentralized: exactly one of sendTo and receive."""
    spec = _spec(migration)
    return (spec.get("sendTo") is None) != (spec.get("receive") is None)


def _migratable_error(vmi: JSON, migration: JSON) -> str | None:
    """migration-create-admitter.go: isMigratable."""
    for cond in (vmi.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "LiveMigratable" and cond.get("status") == "False":
            if cond.get("reason") == "DisksNotLiveMigratable" and _is_decentralized(migration):
                continue
            return (f"Cannot migrate VMI, Reason: {cond.get('reason', '')}, "
                    f"Message: {cond.get('message', '')}")
    return None


def admit_migration_create(
    request: JSON,
    config: ClusterConfig,
    get_vmi: Callable[[str, str], JSON | None],
    list_migrations: Callable[[str, str], list[JSON]],
) -> JSON:
    """``migration-create-validator.kubevirt.io`` on ``/migration-validate-create``.

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/migration-create-admitter.go,
    ``(*MigrationCreateAdmitter).Admit``, with ``ValidateVirtualMachineInstanceMigrationSpec``,
    ``hasRequestOriginatedFromVirtController``, ``isMigratable`` and
    ``ensureNoMigrationConflict``. In order: ``spec.vmiName`` is required (422); ``spec.priority``
    needs the MigrationPriorityQueue gate on v1.7/v1.8 (422; the check is gone in v1.9.0, where
    the gate is GA) and may only come from ``system:serviceaccount:<ns>:kubevirt-controller``
    (422); the VMI must exist (a live GET; 400), must not be final (400) and must not have
    LiveMigratable=False (400); no other migration of the VMI found by the label
    ``kubevirt.io/vmi-name`` (a live LIST) may be unfinished (400); a decentralized migration
    needs its gate and matching migration IDs (422).

    ``get_vmi(namespace, name)`` returns None when the VMI does not exist and raises on any
    other error; ``list_migrations(namespace, vmi_name)`` lists by the selector label.
    """
    parsed = _migration_request(request)
    if isinstance(parsed, dict):
        return parsed
    migration, _old = parsed
    spec = _spec(migration)
    namespace = _meta(migration).get("namespace") or request.get("namespace", "")
    vmi_name = spec.get("vmiName") or ""
    if not vmi_name:
        return response_causes([Cause(FIELD_VALUE_REQUIRED, "vmiName is missing",
                                      "spec.vmiName")])
    if spec.get("priority") is not None:
        if not config.at_least("1.9") and not config.enabled(MIGRATION_PRIORITY_QUEUE):
            return response_causes([Cause(
                FORBIDDEN, "MigrationPriorityQueue feature gate is not enabled in kubevirt "
                "resource", "spec.migrationPriority")])
        if not _from_virt_controller(request, config):
            return response_causes([Cause(
                FORBIDDEN, "Migration priority queue, only virt-controller is allowed to set "
                "priority field", "spec.migrationPriority")])
    try:
        vmi = get_vmi(namespace, vmi_name)
    except Exception as exc:
        return response_error(str(exc))
    if vmi is None:
        return response_error(f'the VMI "{namespace}/{vmi_name}" does not exist')
    if _phase(vmi) in FINAL_VMI_PHASES:
        return response_error("Cannot migrate VMI in finalized state.")
    blocker = _migratable_error(vmi, migration)
    if blocker:
        return response_error(blocker)
    try:
        others = list_migrations(namespace, vmi_name)
    except Exception as exc:
        return response_error(str(exc))
    for other in others:
        if _phase(other) in FINAL_MIGRATION_PHASES:
            continue
        return response_error(
            f"in-flight migration detected. Active migration job ({_meta(other).get('uid', '')})"
            f" is currently already in progress for VMI {_spec(other).get('vmiName', '')}.")
    send_to, receive = spec.get("sendTo"), spec.get("receive")
    if send_to is not None or receive is not None:
        if not config.enabled(DECENTRALIZED_LIVE_MIGRATION):
            return response_causes([Cause(
                FIELD_VALUE_NOT_SUPPORTED,
                f"{DECENTRALIZED_LIVE_MIGRATION} feature gate is not enabled in kubevirt "
                "resource")])
        if send_to is not None and receive is not None and \
                send_to.get("migrationID") != receive.get("migrationID"):
            return response_causes([Cause(
                FIELD_VALUE_INVALID, f"sendTo migrationID {send_to.get('migrationID', '')} does "
                f"not match receive migrationID {receive.get('migrationID', '')}")])
    return passing()


def _from_virt_controller(request: JSON, config: ClusterConfig) -> bool:
    """migration-create-admitter.go: hasRequestOriginatedFromVirtController."""
    user = (request.get("userInfo") or {}).get("username", "")
    return user in config.service_accounts and user.endswith(CONTROLLER_SERVICE_ACCOUNT)


def admit_migration_update(request: JSON) -> JSON:
    """``migration-update-validator.kubevirt.io`` on ``/migration-validate-update``.

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/migration-update-admitter.go,
    ``(*MigrationUpdateAdmitter).Admit`` and ``ensureSelectorLabelSafe`` (the same in all three
    releases): the spec is immutable; while the migration is unfinished the selector label
    ``kubevirt.io/vmi-name`` can be neither removed nor changed (422). Status writes go to the
    status subresource and never reach this admitter.
    """
    parsed = _migration_request(request)
    if isinstance(parsed, dict):
        return parsed
    new, old = parsed
    old = old or {}
    if not _semantic_equal(_spec(new), _spec(old)):
        return response_causes([Cause(FIELD_VALUE_NOT_SUPPORTED,
                                      "update of Migration object's spec is restricted")])
    old_labels = _meta(old).get("labels")
    if _phase(new) not in FINAL_MIGRATION_PHASES and old_labels is not None:
        new_labels = _meta(new).get("labels")
        had = MIGRATION_SELECTOR_LABEL in old_labels
        if new_labels is None:
            if had:
                return response_causes([Cause(
                    FIELD_VALUE_NOT_SUPPORTED,
                    "selector label can't be removed from an in-flight migration")])
        elif had and new_labels.get(MIGRATION_SELECTOR_LABEL) != \
                old_labels[MIGRATION_SELECTOR_LABEL]:
            return response_causes([Cause(
                FIELD_VALUE_NOT_SUPPORTED,
                "selector label can't be modified on an in-flight migration")])
    return passing()


# -- pods/eviction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvictionMark:
    """markVMI's JSON patch of the VMI (main resource, as virt-api's service account), and
    whether KubeVirt's evacuation controller then migrates the VMI
    (``migrations.VMIMigratableOnEviction``: LiveMigrate, or LiveMigrateIfPossible when it is
    migratable; External leaves the move to someone else)."""

    namespace: str
    name: str
    node: str
    patch: list[JSON]
    dry_run: bool
    migrate: bool

    @property
    def vmi_key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EvictionDecision:
    """The answer, and the VMI to mark before giving it. If marking fails, the answer becomes
    ``denied("kubevirt failed marking the vmi for eviction: <error>")`` (``marking_failed``)."""

    response: JSON
    mark: EvictionMark | None = None


def marking_failed(error: str) -> JSON:
    return denied(f"kubevirt failed marking the vmi for eviction: {error}")


def vmi_eviction_strategy(config: ClusterConfig, vmi: JSON) -> str | None:
    """pkg/util/migrations/migrations.go: VMIEvictionStrategy."""
    strategy = _spec(vmi).get("evictionStrategy")
    return strategy if strategy is not None else config.eviction_strategy


def _not_found(resource: str, name: str) -> str:
    """The text of a Kubernetes NotFound error, as ``%v`` prints it."""
    return f'{resource} "{name}" not found'


def _is_launcher(pod: JSON) -> bool:
    return (_meta(pod).get("labels") or {}).get(APP_LABEL) == "virt-launcher"


def _is_completed(pod: JSON) -> bool:
    return _phase(pod) in ("Succeeded", "Failed")


def admit_pod_eviction(
    request: JSON,
    config: ClusterConfig,
    get_pod: Callable[[str, str], JSON | None],
    get_vmi: Callable[[str, str], JSON | None],
) -> EvictionDecision:
    """``virt-launcher-eviction-interceptor.kubevirt.io`` (and the hotplug pod one) on
    ``/pod-eviction-validate``.

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/pod-eviction-admitter.go,
    ``(*PodEvictionAdmitter).Admit`` with ``admitHotplugPod``, ``admitLauncherPod``, ``markVMI``,
    ``isDryRun`` and ``isDeschedulerEviction`` (byte-identical in all three releases). The pod
    is looked up live (any error allows the eviction); for a running virt-launcher pod the VMI
    named by its ``kubevirt.io/domain`` annotation is read live (any error, NotFound included,
    denies with 429). By eviction strategy: LiveMigrate denies a non-migratable VMI, else marks
    it; LiveMigrateIfPossible marks a migratable VMI and lets the eviction through otherwise;
    External always marks; None lets it through. Marking is refused when the VMI is already
    marked ("Evacuation in progress: ...") or the pod is on another node than the VMI (a
    migration target pod); otherwise the VMI is patched with ``/status/evacuationNodeName``
    (dry-run when the eviction is) and the eviction is still refused with 429
    ``Eviction triggered evacuation of VMI "ns/name"``.

    ``get_pod`` and ``get_vmi`` return None for NotFound and raise on other errors.
    """
    namespace, name = request.get("namespace", ""), request.get("name", "")
    try:
        pod = get_pod(namespace, name)
    except Exception:
        return EvictionDecision(passing())
    if pod is None:
        return EvictionDecision(passing())
    labels = _meta(pod).get("labels") or {}
    owners = _meta(pod).get("ownerReferences") or []
    if labels.get(APP_LABEL) == "hotplug-disk" and len(owners) == 1:
        return EvictionDecision(_admit_hotplug_pod(pod, owners[0], get_pod, get_vmi))
    if _is_launcher(pod) and not _is_completed(pod):
        return _admit_launcher_pod(request, config, pod, get_vmi)
    return EvictionDecision(passing())


def _admit_hotplug_pod(pod: JSON, owner: JSON, get_pod: Callable[[str, str], JSON | None],
                       get_vmi: Callable[[str, str], JSON | None]) -> JSON:
    """pod-eviction-admitter.go: admitHotplugPod."""
    namespace = _meta(pod).get("namespace", "")
    try:
        owner_pod = get_pod(namespace, owner.get("name", ""))
    except Exception as exc:
        return denied(f"failed getting owner for hotplug pod: {exc}")
    if owner_pod is None or not _is_launcher(owner_pod) or _is_completed(owner_pod):
        return passing()
    vmi_name = (_meta(owner_pod).get("annotations") or {}).get(DOMAIN_ANNOTATION)
    if vmi_name is None:
        return passing()
    try:
        vmi = get_vmi(namespace, vmi_name)
    except Exception as exc:
        return denied(f"kubevirt failed getting the vmi: {exc}")
    if vmi is None:
        return passing()
    return denied(f"cannot evict hotplug pod: {_meta(pod).get('name', '')} associated with "
                  f"running vmi: {vmi_name} in namespace {namespace}")


def _admit_launcher_pod(request: JSON, config: ClusterConfig, pod: JSON,
                        get_vmi: Callable[[str, str], JSON | None]) -> EvictionDecision:
    """pod-eviction-admitter.go: admitLauncherPod (and markVMI's patch)."""
    vmi_name = (_meta(pod).get("annotations") or {}).get(DOMAIN_ANNOTATION)
    if vmi_name is None:
        return EvictionDecision(passing())
    namespace = request.get("namespace", "")
    try:
        vmi = get_vmi(namespace, vmi_name)
    except Exception as exc:
        return EvictionDecision(denied(f"kubevirt failed getting the vmi: {exc}"))
    if vmi is None:
        return EvictionDecision(denied("kubevirt failed getting the vmi: " + _not_found(
            "virtualmachineinstances.kubevirt.io", vmi_name)))
    strategy = vmi_eviction_strategy(config, vmi)
    if strategy is None:
        return EvictionDecision(passing())
    migratable = _is_migratable(vmi)
    vmi_meta = _meta(vmi)
    if strategy == "LiveMigrate":
        if not migratable:
            return EvictionDecision(denied(
                f"VMI {vmi_meta.get('name', '')} is configured with an eviction strategy but is "
                "not live-migratable"))
        mark = True
    elif strategy == "LiveMigrateIfPossible":
        mark = migratable
    else:
        mark = strategy == "External"
    if not mark:
        return EvictionDecision(passing())
    vmi_ns, vmi_name = vmi_meta.get("namespace", namespace), vmi_meta.get("name", vmi_name)
    status = vmi.get("status") or {}
    if status.get("evacuationNodeName"):
        return EvictionDecision(denied("Evacuation in progress: " +
                                       EVICTION_FMT.format(vmi_ns, vmi_name)))
    node = (pod.get("spec") or {}).get("nodeName", "")
    if status.get("nodeName", "") != node:
        return EvictionDecision(denied("Eviction request for target Pod"))
    eviction = _object(request)
    if not isinstance(eviction, dict):
        return EvictionDecision(denied("failed to parse the eviction object: not an object"))
    patch: list[JSON] = [{"op": "add", "path": "/status/evacuationNodeName", "value": node}]
    if (_meta(eviction).get("annotations") or {}).get(REQUESTED_BY_ANNOTATION) == \
            REQUESTED_BY_DESCHEDULER:
        if not vmi_meta.get("annotations"):
            patch.append({"op": "add", "path": "/metadata/annotations",
                          "value": {EVICTION_SOURCE_ANNOTATION: "descheduler"}})
        else:
            patch.append({"op": "replace", "path": "/metadata/annotations/" +
                          EVICTION_SOURCE_ANNOTATION.replace("~", "~0").replace("/", "~1"),
                          "value": "descheduler"})
    dry_run = bool(request.get("dryRun")) or \
        ((eviction.get("deleteOptions") or {}).get("dryRun") or [""])[0] == "All"
    migrate = strategy == "LiveMigrate" or (strategy == "LiveMigrateIfPossible" and migratable)
    return EvictionDecision(denied(EVICTION_FMT.format(vmi_ns, vmi_name)),
                            EvictionMark(vmi_ns, vmi_name, node, patch, dry_run, migrate))


# -- VirtualMachine -----------------------------------------------------------------------------


def _run_strategy_causes(spec: JSON, config: ClusterConfig) -> list[Cause]:
    """vms-admitter.go: validateRunStrategy."""
    causes: list[Cause] = []
    running, strategy = spec.get("running"), spec.get("runStrategy")
    if running is not None and strategy is not None:
        causes.append(Cause(FIELD_VALUE_INVALID, "Running and RunStrategy are mutually "
                            "exclusive. Note that Running is deprecated, please use RunStrategy "
                            "instead", "spec.running"))
    if running is None and strategy is None:
        causes.append(Cause(FIELD_VALUE_INVALID, "RunStrategy must be specified", "spec.running"))
    if strategy is not None:
        if strategy == WAIT_AS_RECEIVER:
            if config.enabled(DECENTRALIZED_LIVE_MIGRATION):
                return causes
            causes.append(Cause(FIELD_VALUE_INVALID, f"Invalid RunStrategy ({strategy}), "
                                f"{DECENTRALIZED_LIVE_MIGRATION} feature gate is not enabled in "
                                "kubevirt resource", "spec.runStrategy"))
        elif strategy not in VALID_RUN_STRATEGIES:
            causes.append(Cause(FIELD_VALUE_INVALID, f"Invalid RunStrategy ({strategy})",
                                "spec.runStrategy"))
    return causes


def _data_volume_causes(path: str, dvt: JSON) -> list[Cause]:
    """pkg/storage/admitters/data-volume-template.go: validateDataVolume."""
    if not _meta(dvt).get("name"):
        return [Cause(FIELD_VALUE_REQUIRED, f"'name' field must not be empty for "
                      f"DataVolumeTemplate entry {path}.name.", f"{path}.name")]
    spec = _spec(dvt)
    pvc, storage = spec.get("pvc"), spec.get("storage")
    if pvc is None and storage is None:
        return [Cause(FIELD_VALUE_INVALID, "Missing Data volume PVC or Storage",
                      f"{path}.PVC.Storage")]
    if pvc is not None and storage is not None:
        return [Cause(FIELD_VALUE_INVALID, "Duplicate storage definition, both target storage "
                      "and target pvc defined", f"{path}.PVC.Storage")]
    claim = pvc if pvc is not None else storage
    external = claim.get("dataSourceRef") is not None or claim.get("dataSource") is not None
    sourced = spec.get("source") is not None or spec.get("sourceRef") is not None
    if external and sourced:
        return [Cause(FIELD_VALUE_INVALID, "External population is incompatible with Source "
                      "and SourceRef", f"{path}.source")]
    if not external and not sourced:
        return [Cause(FIELD_VALUE_INVALID, "Data volume should have either Source, SourceRef, "
                      "or be externally populated", f"{path}.source.sourceRef")]
    source = spec.get("source")
    if source is not None:
        count = sum(1 for v in source.values() if v is not None)
        if count == 0:
            return [Cause(FIELD_VALUE_INVALID, "Missing dataVolume valid source",
                          f"{path}.source")]
        if count > 1:
            return [Cause(FIELD_VALUE_INVALID, "Multiple dataVolume sources", f"{path}.source")]
    return []


def _data_volume_template_causes(spec: JSON) -> list[Cause]:
    """pkg/storage/admitters/data-volume-template.go: ValidateDataVolumeTemplate. Every
    dataVolumeTemplate must be valid and referenced by a template volume, as a
    persistentVolumeClaim or a dataVolume of its name."""
    causes: list[Cause] = []
    volumes = (((spec.get("template") or {}).get("spec") or {}).get("volumes")) or []
    for i, dvt in enumerate(spec.get("dataVolumeTemplates") or []):
        path = f"spec.dataVolumeTemplate[{i}]"
        bad = _data_volume_causes(path, dvt)
        if bad:
            causes.extend(bad)
            continue
        name = _meta(dvt).get("name")
        if not any((v.get("persistentVolumeClaim") or {}).get("claimName") == name or
                   (v.get("dataVolume") or {}).get("name") == name for v in volumes):
            causes.append(Cause(FIELD_VALUE_REQUIRED, f"DataVolumeTemplate entry {path} must be "
                                "referenced in the VMI template's 'volumes' list", path))
    return causes


def admit_vm(request: JSON, config: ClusterConfig) -> JSON:
    """``virtualmachine-validator.kubevirt.io`` on ``/virtualmachines-validate`` (CREATE and
    UPDATE of the main resource; status writes do not reach it).

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/vms-admitter.go,
    ``(*VMsAdmitter).Admit`` and ``ValidateVirtualMachineSpec`` as far as this simulator
    models VMs: a VM being deleted passes at once; ``spec.template`` is required; the
    dataVolumeTemplates rules of pkg/storage/admitters/data-volume-template.go
    (``ValidateDataVolumeTemplate``); and ``validateRunStrategy`` (running and runStrategy
    both set, neither set, an invalid value, WaitAsReceiver without its gate). The causes are
    answered together with 422, as KubeVirt does.
    """
    if not _resource_is(request, "kubevirt.io", "virtualmachines"):
        return response_error("expect resource to be 'virtualmachines'")
    vm = _object(request)
    if _meta(vm).get("deletionTimestamp"):
        return passing()
    spec = _spec(vm)
    if spec.get("template") is None:
        return response_causes([Cause(FIELD_VALUE_REQUIRED, "missing virtual machine template.",
                                      "spec.template")])
    causes = _data_volume_template_causes(spec) + _run_strategy_causes(spec, config)
    if causes:
        return response_causes(causes)
    response = passing()
    if spec.get("running") is not None:
        response["warnings"] = ["spec.running is deprecated, please use spec.runStrategy "
                                "instead."]
    return response


# -- MigrationPolicy (migrations.kubevirt.io) ---------------------------------------------------


def _negative(quantity: Any) -> bool:
    try:
        return parse_quantity(quantity) < 0
    except (TypeError, ValueError):
        return str(quantity).strip().startswith("-")


def admit_migration_policy(request: JSON, config: ClusterConfig) -> JSON:
    """``migration-policy-validator.kubevirt.io`` on ``/migration-policy-validate-create``
    (CREATE and UPDATE).

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/migrationpolicy-admitter.go,
    ``(*MigrationPolicyAdmitter).Admit``: ``completionTimeoutPerGiB`` and
    ``bandwidthPerMigration`` must not be negative. From v1.9.0 (where ``maxDowntimeMs`` and
    ``experimental.stallDetector`` exist) neither may be set or changed unless the
    MigrationStallDetection gate is enabled; an unchanged value passes. All causes together,
    422.
    """
    res = request.get("resource") or {}
    if res.get("group") != "migrations.kubevirt.io" or res.get("resource") != "migrationpolicies":
        return response_error(f"unexpected resource {{Group:{res.get('group', '')} "
                              f"Version:{res.get('version', '')} "
                              f"Resource:{res.get('resource', '')}}}")
    spec = _spec(_object(request))
    old_spec = _spec(_object(request, "oldObject"))
    causes: list[Cause] = []
    timeout = spec.get("completionTimeoutPerGiB")
    if isinstance(timeout, int | float) and timeout < 0:
        causes.append(Cause(FIELD_VALUE_INVALID, "must not be negative",
                            "spec.completionTimeoutPerGiB"))
    if config.at_least("1.9"):
        gated = not config.enabled(MIGRATION_STALL_DETECTION)
        downtime = spec.get("maxDowntimeMs")
        if downtime is not None and gated and downtime != old_spec.get("maxDowntimeMs"):
            causes.append(Cause(FIELD_VALUE_INVALID, "maxDowntimeMs cannot be modified without "
                                f"enabling the {MIGRATION_STALL_DETECTION} feature gate",
                                "spec.maxDowntimeMs"))
        detector = (spec.get("experimental") or {}).get("stallDetector")
        old_detector = (old_spec.get("experimental") or {}).get("stallDetector")
        if detector is not None and gated and not _semantic_equal(detector, old_detector):
            causes.append(Cause(FIELD_VALUE_INVALID, "experimental.stallDetector cannot be "
                                f"modified without enabling the {MIGRATION_STALL_DETECTION} "
                                "feature gate", "spec.experimental.stallDetector"))
    bandwidth = spec.get("bandwidthPerMigration")
    if bandwidth is not None and _negative(bandwidth):
        causes.append(Cause(FIELD_VALUE_INVALID, "must not be negative",
                            "spec.bandwidthPerMigration"))
    return response_causes(causes) if causes else passing()


# -- VirtualMachineInstance updates -------------------------------------------------------------


def _restricted_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """vmi-update-admitter.go: filterKubevirtLabels."""
    return {k: v for k, v in (labels or {}).items() if k in RESTRICTED_VMI_LABELS}


def admit_vmi_update(request: JSON, config: ClusterConfig) -> JSON:
    """``virtualmachineinstances-update-validator.kubevirt.io`` on
    ``/virtualmachineinstances-validate-update``.

    Follows pkg/virt-api/webhooks/validating-webhook/admitters/vmi-update-admitter.go,
    ``(*VMIUpdateAdmitter).Admit`` and ``admitVMILabelsUpdate``, as far as others than KubeVirt
    write VMIs: only KubeVirt's service accounts may change ``spec`` ("update of VMI object is
    restricted", 422), and others may change any label except KubeVirt's reserved ones
    (``restrictedVmiLabels``: kubevirt.io/nodeName, kubevirt.io/created-by, ...). Labels such as
    ``virtshift.io/policy`` pass. The VMI CRD has no status subresource, so status writes come
    here too and pass. What KubeVirt checks of its own service accounts' spec changes (CPU,
    memory and volume hotplug) and the NodeRestriction gate are not modelled.
    """
    if not _resource_is(request, "kubevirt.io", "virtualmachineinstances"):
        return response_error("expect resource to be 'virtualmachineinstances'")
    new, old = _object(request), _object(request, "oldObject")
    user = (request.get("userInfo") or {}).get("username", "")
    kubevirt = user in config.service_accounts
    if not kubevirt and not _semantic_equal(_spec(new), _spec(old)):
        return response_causes([Cause(FIELD_VALUE_NOT_SUPPORTED,
                                      "update of VMI object is restricted")])
    if not kubevirt and _restricted_labels(_meta(new).get("labels")) != \
            _restricted_labels(_meta(old).get("labels")):
        return response_causes([Cause(
            FIELD_VALUE_NOT_SUPPORTED,
            "modification of the following reserved kubevirt.io/ labels on a VMI object is "
            "prohibited")])
    return passing()
