"""Load simulator scenarios (/work/shared/scenario-format.md) into frozen, all-numeric models.

Every problem is collected before anything is raised, one line per problem starting with the
field path, so a scenario author can fix a file in one pass. Everything the runtime needs is
converted here (quantities to bytes, durations to seconds, generate blocks expanded with a
seeded RNG), so the simulator never parses strings and the same seed always yields the same
cluster.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field
from yaml.constructor import ConstructorError

from virtshift.api.common import DNS_SUBDOMAIN_PATTERN
from virtshift.api.units import GiB, MiB, format_bytes, parse_duration, parse_quantity

__all__ = [
    "AccessMode",
    "EvictionStrategy",
    "Fault",
    "FaultKind",
    "KubeVirtSettings",
    "KubeVirtVersion",
    "NamespaceSpec",
    "Network",
    "NodeSpec",
    "Scenario",
    "ScenarioError",
    "StorageClassSpec",
    "VMSpec",
    "VolumeSpec",
    "load_scenario",
    "parse_scenario",
]

AccessMode = Literal["ReadWriteOnce", "ReadWriteMany"]
KubeVirtVersion = Literal["1.7", "1.8", "1.9"]
EvictionStrategy = Literal["None", "LiveMigrate", "LiveMigrateIfPossible", "External"]
FaultKind = Literal["failTargetPod", "nodeNotReady", "dirtyRateSpike"]

MAX_PROBLEMS = 100  # a bad generate block could otherwise produce thousands of lines


class ScenarioError(ValueError):
    """A scenario the simulator cannot run; str() lists every problem, one per line."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- the parsed scenario ------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Feature gates whose meaning the simulator follows (KubeVirt's pkg/virt-config/featuregate).
MIGRATION_PRIORITY_QUEUE = "MigrationPriorityQueue"  # Alpha 1.7, Beta 1.8, GA in 1.9
MIGRATION_STALL_DETECTION = "MigrationStallDetection"  # new in 1.9 (Alpha)
DECENTRALIZED_LIVE_MIGRATION = "DecentralizedLiveMigration"  # Alpha in 1.7 to 1.9
# Gates that do not exist before a version: listing them there is a scenario mistake.
GATE_SINCE = {MIGRATION_STALL_DETECTION: "1.9"}
# KubeVirt's install version per scenario version (the tags the admission rules were read at).
KUBEVIRT_RELEASES = {"1.7": "v1.7.4", "1.8": "v1.8.4", "1.9": "v1.9.0"}


def version_key(version: str) -> tuple[int, ...]:
    """"1.9" -> (1, 9), so "1.10" sorts after "1.9"."""
    return tuple(int(part) for part in version.split("."))


def gate_enabled(version: str, gates: Iterable[str], gate: str) -> bool:
    """Whether KubeVirt ``version`` with ``developerConfiguration.featureGates`` has ``gate`` on.

    A GA gate is always on; Alpha and Beta gates only when listed (v1.8.4's
    ``isFeatureGateEnabled`` does not turn Beta gates on by default)."""
    if gate == MIGRATION_PRIORITY_QUEUE and version_key(version) >= (1, 9):
        return True  # GA in v1.9.0 (pkg/virt-config/featuregate/inactive.go)
    if gate in GATE_SINCE and version_key(version) < version_key(GATE_SINCE[gate]):
        return False
    return gate in gates


class KubeVirtSettings(_Frozen):
    """KubeVirt's spec.configuration.migrations, with KubeVirt's own defaults; the KubeVirt
    version whose behaviour to follow where versions differ, and its enabled feature gates."""

    version: KubeVirtVersion = "1.9"
    feature_gates: tuple[str, ...] = ()
    # The KubeVirt CR's workloadUpdateStrategy.workloadUpdateMethods: volume migrations need
    # LiveMigrate (the workload updater creates their VMIMs only then).
    workload_update_methods: tuple[str, ...] = ("LiveMigrate",)
    parallel_migrations_per_cluster: int = 5
    parallel_outbound_migrations_per_node: int = 2
    bandwidth_per_migration: float = 0.0  # bytes/s; 0 = unlimited
    completion_timeout_per_gib: int = 150  # seconds
    progress_timeout: int = 150  # seconds
    allow_auto_converge: bool = False
    allow_post_copy: bool = False

    @property
    def release(self) -> str:
        """The KubeVirt release reported in the KubeVirt CR's status, e.g. v1.9.0."""
        return KUBEVIRT_RELEASES[self.version]

    @property
    def migration_priority_queue(self) -> bool:
        """Whether virt-controller sets (and virt-api accepts) VMIM ``spec.priority``."""
        return gate_enabled(self.version, self.feature_gates, MIGRATION_PRIORITY_QUEUE)

    @property
    def migration_stall_detection(self) -> bool:
        """Whether KubeVirt hands a MigrationPolicy's ``maxDowntimeMs`` on to QEMU."""
        return gate_enabled(self.version, self.feature_gates, MIGRATION_STALL_DETECTION)


class Network(_Frozen):
    """What bounds a migration besides KubeVirt's limits: the node NICs and target start-up."""

    node_bandwidth: float = 10 * GiB  # bytes/s per node, shared by all its migrations
    target_pod_startup: float = 10.0  # seconds from VMIM creation to TargetReady


class StorageClassSpec(_Frozen):
    name: str
    node_local: bool = False  # PVs are pinned to the node the VM runs on
    access_mode: AccessMode = "ReadWriteOnce"
    copy_bandwidth: float = float(GiB)  # bytes/s for volume migrations


class NodeSpec(_Frozen):
    name: str
    cpu_model: str = "Skylake-Server"
    allocatable_cpu: float  # cores
    allocatable_memory: float  # bytes
    labels: dict[str, str] = Field(default_factory=dict)
    schedulable: bool = True


class VolumeSpec(_Frozen):
    name: str
    claim_name: str
    size: float  # bytes
    storage_class: str
    # Disk kinds KubeVirt's volume migration refuses or allows (docs/scenario-storage.md).
    shareable: bool = False  # disk shareable: true
    lun: bool = False  # a LUN disk instead of a virtio disk
    hotplug: bool = False  # a hotplugged volume (persistentVolumeClaim.hotpluggable)
    filesystem: bool = False  # exposed through virtiofs (VM-level ``filesystems``)


class NamespaceSpec(_Frozen):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class VMSpec(_Frozen):
    name: str
    namespace: str = "default"
    node: str
    memory: float  # bytes
    cpu: int = 1
    dirty_rate: float = 0.0  # bytes/s
    labels: dict[str, str] = Field(default_factory=dict)
    eviction_strategy: EvictionStrategy = "LiveMigrate"
    cpu_model: str = "host-model"
    live_migratable: bool = True
    not_migratable_reason: str | None = None
    volumes: list[VolumeSpec] = Field(default_factory=list)

    @property
    def key(self) -> str:
        """namespace/name, the form faults and the runtime use to refer to a VM."""
        return f"{self.namespace}/{self.name}"


class Fault(_Frozen):
    kind: FaultKind
    vm: str | None = None  # always "namespace/name" after loading, even if written bare
    node: str | None = None
    attempt: int | None = None  # failTargetPod: which migration attempt (1 = first)
    at: float = 0.0  # simulated seconds since start
    dirty_rate: float | None = None  # dirtyRateSpike: the new rate, bytes/s


class Scenario(_Frozen):
    seed: int = 0
    time_scale: float = 1.0
    kubevirt: KubeVirtSettings = Field(default_factory=KubeVirtSettings)
    network: Network = Field(default_factory=Network)
    storage_classes: list[StorageClassSpec] = Field(default_factory=list)
    namespaces: list[NamespaceSpec] = Field(default_factory=list)
    nodes: list[NodeSpec] = Field(default_factory=list)
    vms: list[VMSpec] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)


# --- value converters: each returns the converted value or raises ValueError -------------------


class _FieldError(ValueError):
    """A problem inside a value (a label, a range end) whose path is longer than the field's."""

    def __init__(self, subpath: str, message: str) -> None:
        self.subpath = subpath
        super().__init__(message)


Convert = Callable[[Any], Any]

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return f"{type(value).__name__} {value!r}"


def _name(what: str, pattern: str, max_len: int, rule: str) -> Convert:
    """Names end up as Kubernetes object names or label parts, so they must obey those rules."""

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        if len(value) > max_len or not re.fullmatch(pattern, value):
            raise ValueError(f"{value!r} is not a valid {what} ({rule}, at most {max_len})")
        return value

    return convert


_NODE_NAME = _name("node name", DNS_SUBDOMAIN_PATTERN, 253, "lowercase DNS subdomain")
_VM_NAME = _name("VM name", _DNS_LABEL, 63, "lowercase DNS label")
_NAMESPACE = _name("namespace", _DNS_LABEL, 63, "lowercase DNS label")
_CLASS_NAME = _name("storage class name", DNS_SUBDOMAIN_PATTERN, 253, "lowercase DNS subdomain")
_CLAIM_NAME = _name("claim name", DNS_SUBDOMAIN_PATTERN, 253, "lowercase DNS subdomain")
_VOLUME_NAME = _name("volume name", _DNS_LABEL, 63, "lowercase DNS label")
# The model becomes the name part of cpu-model-migration.node.kubevirt.io/<model>.
_CPU_MODEL = _name("CPU model", _LABEL_NAME, 63, "a label name such as Skylake-Server")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_describe(value)}")
    return value


def _int(minimum: int) -> Convert:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _above_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {_describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number greater than 0, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


def _enum(choices: tuple[str, ...]) -> Convert:
    def convert(value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return convert


def _is_negative(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().startswith("-")
    return bool(value < 0)


def _amount(parse: Callable[[Any], float], example: str, *, positive: bool) -> Convert:
    """Shared by quantities and durations: a string or a bare number, finite and not negative."""
    bound = "greater than 0" if positive else "0 or more"

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"must be {example}, got {_describe(value)}")
        if _is_negative(value):
            raise ValueError(f"must be {bound}, got {value!r}")
        number = parse(value)
        if not math.isfinite(number):
            raise ValueError(f"must be finite, got {value!r}")
        if positive and number <= 0:
            raise ValueError(f"must be {bound}, got {value!r}")
        return number

    return convert


_SIZE = _amount(parse_quantity, "a Kubernetes quantity such as 512Mi or 2Gi", positive=True)
_RATE = _amount(parse_quantity, "a Kubernetes quantity such as 512Mi or 2Gi", positive=False)
_DURATION = _amount(parse_duration, "a duration such as 90s or 5m", positive=False)


def _range(convert: Convert) -> Convert:
    """A value or [min, max]; generate blocks draw from the range with the scenario's RNG."""

    def convert_range(value: Any) -> float | tuple[float, float]:
        if not isinstance(value, list):
            return convert(value)
        if len(value) != 2:
            raise ValueError(f"a range must be [min, max], got a list of {len(value)}")
        ends = []
        for i, end in enumerate(value):
            try:
                ends.append(convert(end))
            except ValueError as exc:
                raise _FieldError(f"[{i}]", str(exc)) from None
        if ends[0] > ends[1]:
            raise ValueError(f"range minimum {value[0]!r} is above its maximum {value[1]!r}")
        return ends[0], ends[1]

    return convert_range


def _version(value: Any) -> str:
    """"1.9" (a bare 1.9 reads as a YAML number; it is accepted as the same version)."""
    choices = get_args(KubeVirtVersion)
    text = f"{value:g}" if isinstance(value, float) else value
    if not isinstance(text, str) or text not in choices:
        raise ValueError(f"{value!r} is not a supported KubeVirt version "
                         f"(one of {', '.join(choices)})")
    return text


_GATE_NAME = r"[A-Z][A-Za-z0-9]*"
WORKLOAD_UPDATE_METHODS = ("LiveMigrate", "Evict")


def _workload_update_methods(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of methods, got {_describe(value)}")
    for i, method in enumerate(value):
        if method not in WORKLOAD_UPDATE_METHODS:
            raise _FieldError(f"[{i}]", f"{method!r} is not a workload update method (one of "
                              f"{', '.join(WORKLOAD_UPDATE_METHODS)})")
    return tuple(value)


def _feature_gates(value: Any) -> tuple[str, ...]:
    """KubeVirt feature gate names (CamelCase), each once. Names the simulator does not act on
    are kept for the KubeVirt CR, as KubeVirt keeps gates it does not know."""
    if not isinstance(value, list):
        raise ValueError(f"must be a list of feature gate names, got {_describe(value)}")
    seen: dict[str, int] = {}
    for i, gate in enumerate(value):
        if not isinstance(gate, str) or not re.fullmatch(_GATE_NAME, gate):
            raise _FieldError(f"[{i}]", f"{gate!r} is not a feature gate name (CamelCase, such "
                              f"as {MIGRATION_PRIORITY_QUEUE})")
        if gate in seen:
            raise _FieldError(f"[{i}]", f"duplicate feature gate {gate!r} (also at "
                              f"[{seen[gate]}])")
        seen[gate] = i
    return tuple(value)


def _labels(value: Any) -> dict[str, str]:
    """Kubernetes label syntax; the runtime copies these onto Nodes and VMs verbatim."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of label keys to values, got {_describe(value)}")
    labels: dict[str, str] = {}
    for key, val in value.items():
        where = f"[{key!r}]"
        if not isinstance(key, str) or not _valid_label_key(key):
            raise _FieldError(where, f"{key!r} is not a valid label key")
        if val is None:
            val = ""
        if not isinstance(val, str):
            raise _FieldError(where, f"must be a string, got {_describe(val)} (quote it)")
        if val and (len(val) > 63 or not re.fullmatch(_LABEL_NAME, val)):
            raise _FieldError(where, f"{val!r} is not a valid label value")
        labels[key] = val
    return labels


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.fullmatch(DNS_SUBDOMAIN_PATTERN, prefix)):
        return False
    return len(name) <= 63 and re.fullmatch(_LABEL_NAME, name) is not None


# --- reading mappings and lists, collecting problems ---------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Walks raw YAML data, converting values and recording problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(
        self, raw: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        """The known fields of a mapping; null values count as absent (as `labels:` does)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problem(path or "scenario", f"must be a mapping, got {_describe(raw)}")
            return None
        fields: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(_join(path, str(key)), f"unknown field{hint}")
            elif value is not None:
                fields[key] = value
        for key in required:
            if key not in fields:
                self.problem(_join(path, key), "required field is missing")
        return fields

    def items(self, raw: Any, path: str) -> list[tuple[str, Any]]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem(path, f"must be a list, got {_describe(raw)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(raw)]

    def value(
        self, fields: dict[str, Any], key: str, path: str, convert: Convert, default: Any = None
    ) -> Any:
        """The converted field, or `default` when it is absent or bad (bad ones are recorded)."""
        if key not in fields:
            return default
        try:
            return convert(fields[key])
        except _FieldError as exc:
            self.problem(_join(path, key) + exc.subpath, str(exc))
        except ValueError as exc:
            self.problem(_join(path, key), str(exc))
        return default

    def generate(
        self, item: dict[str, Any], path: str, allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> tuple[dict[str, Any], str] | None:
        """The fields of a `- generate: {...}` entry and the path its problems are reported at."""
        for key in item:
            if key != "generate":
                self.problem(_join(path, str(key)), "not allowed next to generate")
        base = f"{path}.generate"
        fields = self.mapping(item["generate"], base, allowed, required)
        return None if fields is None else (fields, base)

    def names(self, fields: dict[str, Any], base: str, convert: Convert) -> list[str]:
        """prefix + str(i) for i in range(start, start + count), checked as names."""
        count = self.value(fields, "count", base, _int(1), 0)
        prefix = self.value(fields, "prefix", base, _text, None)
        start = self.value(fields, "start", base, _int(0), 1)
        if prefix is None or not count:
            return []
        for i in (start, start + count - 1):  # only digits vary, so the ends cover the rest
            try:
                convert(prefix + str(i))
            except ValueError as exc:
                self.problem(f"{base}.prefix", f"generates {prefix + str(i)!r}: {exc}")
                return []
        return [prefix + str(i) for i in range(start, start + count)]


@dataclass
class _Item:
    """One expanded node, VM or fault before model construction; `at(field)` names its source."""

    base: str  # "vms[3]" or "vms[1].generate"
    fields: dict[str, Any]  # model keyword arguments; None where the input was bad
    generated: bool = False

    def at(self, field: str) -> str:
        return f"{self.base}.{field}"


class _Grouped:
    """Collapses the same cross-check failing for many generated items into one line."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], list[str]] = {}

    def add(self, path: str, message: str, detail: str) -> None:
        self.groups.setdefault((path, message), []).append(detail)

    def flush(self, reader: _Reader) -> None:
        for (path, message), details in self.groups.items():
            shown = ", ".join(details[:3])
            more = f" and {len(details) - 3} more" if len(details) > 3 else ""
            reader.problem(path, f"{message}: {shown}{more}")


# --- sections ------------------------------------------------------------------------------------

_TOP_FIELDS = (
    "seed", "timeScale", "kubevirt", "network", "storageClasses", "namespaces", "nodes", "vms",
    "faults",
)
_KUBEVIRT_FIELDS = {  # YAML key -> (attribute, converter)
    "version": ("version", _version),
    "featureGates": ("feature_gates", _feature_gates),
    "workloadUpdateMethods": ("workload_update_methods", _workload_update_methods),
    "parallelMigrationsPerCluster": ("parallel_migrations_per_cluster", _int(1)),
    "parallelOutboundMigrationsPerNode": ("parallel_outbound_migrations_per_node", _int(1)),
    "bandwidthPerMigration": ("bandwidth_per_migration", _RATE),
    "completionTimeoutPerGiB": ("completion_timeout_per_gib", _int(0)),
    "progressTimeout": ("progress_timeout", _int(0)),
    "allowAutoConverge": ("allow_auto_converge", _bool),
    "allowPostCopy": ("allow_post_copy", _bool),
}
_NETWORK_FIELDS = {
    "nodeBandwidth": ("node_bandwidth", _SIZE),
    "targetPodStartup": ("target_pod_startup", _DURATION),
}
_CLASS_FIELDS = {
    "name": ("name", _CLASS_NAME),
    "nodeLocal": ("node_local", _bool),
    "accessMode": ("access_mode", _enum(get_args(AccessMode))),
    "copyBandwidth": ("copy_bandwidth", _SIZE),
}
_NODE_COMMON = {
    "cpuModel": ("cpu_model", _CPU_MODEL),
    "labels": ("labels", _labels),
    "schedulable": ("schedulable", _bool),
}
_VM_COMMON = {
    "namespace": ("namespace", _NAMESPACE),
    "cpu": ("cpu", _int(1)),
    "labels": ("labels", _labels),
    "evictionStrategy": ("eviction_strategy", _enum(get_args(EvictionStrategy))),
    "cpuModel": ("cpu_model", _CPU_MODEL),
    "liveMigratable": ("live_migratable", _bool),
    "notMigratableReason": ("not_migratable_reason", _text),
}
_VOLUME_FIELDS = {
    "name": ("name", _VOLUME_NAME),
    "claimName": ("claim_name", _CLAIM_NAME),
    "size": ("size", _SIZE),
    "storageClass": ("storage_class", _text),
}
_VOLUME_OPTIONAL = {
    "shareable": ("shareable", _bool),
    "lun": ("lun", _bool),
    "hotplug": ("hotplug", _bool),
}
_FAULT_FIELDS = {
    "kind": ("kind", _enum(get_args(FaultKind))),
    "vm": ("vm", _text),
    "node": ("node", _text),
    "attempt": ("attempt", _int(1)),
    "at": ("at", _DURATION),
    "dirtyRate": ("dirty_rate", _RATE),
}
# Per fault kind: the fields it requires, and the optional ones it uses (others are mistakes).
_FAULT_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "failTargetPod": (("vm",), ("attempt", "at")),
    "nodeNotReady": (("node",), ("at",)),
    "dirtyRateSpike": (("vm", "dirtyRate"), ("at",)),
}


def _convert_all(
    r: _Reader, fields: dict[str, Any], path: str, spec: dict[str, tuple[str, Convert]]
) -> dict[str, Any]:
    """Model keyword arguments for the spec's fields that are present (absent -> model default)."""
    out: dict[str, Any] = {}
    for key, (attr, convert) in spec.items():
        if key in fields:
            out[attr] = r.value(fields, key, path, convert)
    return out


def _settings(r: _Reader, raw: Any, path: str, spec: dict[str, tuple[str, Convert]]) -> dict:
    fields = r.mapping(raw, path, tuple(spec))
    return {} if fields is None else _convert_all(r, fields, path, spec)


def _storage_classes(r: _Reader, raw: Any) -> list[_Item]:
    out: list[_Item] = []
    for path, entry in r.items(raw, "storageClasses"):
        fields = r.mapping(entry, path, tuple(_CLASS_FIELDS), required=("name",))
        if fields is not None:
            out.append(_Item(path, _convert_all(r, fields, path, _CLASS_FIELDS)))
    for item in out:
        if item.fields.get("node_local") and item.fields.get("access_mode") == "ReadWriteMany":
            r.problem(item.at("accessMode"), "a nodeLocal storage class cannot be ReadWriteMany")
    return out


def _allocatable(r: _Reader, fields: dict[str, Any], path: str) -> dict[str, Any]:
    where = _join(path, "allocatable")
    alloc = r.mapping(fields.get("allocatable"), where, ("cpu", "memory"), ("cpu", "memory"))
    if alloc is None:
        return {"allocatable_cpu": None, "allocatable_memory": None}
    return {
        "allocatable_cpu": r.value(alloc, "cpu", where, _SIZE),
        "allocatable_memory": r.value(alloc, "memory", where, _SIZE),
    }


def _nodes(r: _Reader, raw: Any) -> list[_Item]:
    out: list[_Item] = []
    for path, entry in r.items(raw, "nodes"):
        if isinstance(entry, dict) and "generate" in entry:
            block = r.generate(
                entry, path, ("count", "prefix", "start", "allocatable", *_NODE_COMMON),
                ("count", "prefix", "allocatable"),
            )
            if block is None:
                continue
            fields, base = block
            common = _convert_all(r, fields, base, _NODE_COMMON) | _allocatable(r, fields, base)
            for name in r.names(fields, base, _NODE_NAME):
                out.append(_Item(base, {"name": name, **common}, generated=True))
            continue
        fields = r.mapping(
            entry, path, ("name", "allocatable", *_NODE_COMMON), ("name", "allocatable")
        )
        if fields is None:
            continue
        item = {"name": r.value(fields, "name", path, _NODE_NAME)}
        item |= _convert_all(r, fields, path, _NODE_COMMON) | _allocatable(r, fields, path)
        out.append(_Item(path, item))
    return out


def _draw_memory(rng: random.Random, spec: float | tuple[float, float]) -> float:
    """Uniform over the whole MiB inside [min, max], so generated sizes look like real VMs."""
    if not isinstance(spec, tuple):
        return spec
    return float(rng.randint(math.ceil(spec[0] / MiB), math.floor(spec[1] / MiB)) * MiB)


def _draw_rate(rng: random.Random, spec: float | tuple[float, float]) -> float:
    if not isinstance(spec, tuple):
        return spec
    return float(math.floor(rng.uniform(spec[0], spec[1])))


def _vms(
    r: _Reader, raw: Any, rng: random.Random, node_names: set[str], class_names: set[str]
) -> list[_Item]:
    out: list[_Item] = []
    for path, entry in r.items(raw, "vms"):
        if isinstance(entry, dict) and "generate" in entry:
            out += _generated_vms(r, entry, path, rng, node_names, class_names)
            continue
        fields = r.mapping(
            entry, path, ("name", "node", "memory", "dirtyRate", "volumes", "filesystems",
                          *_VM_COMMON),
            ("name", "node", "memory"),
        )
        if fields is None:
            continue
        item = {
            "name": r.value(fields, "name", path, _VM_NAME),
            "node": r.value(fields, "node", path, _text),
            "memory": r.value(fields, "memory", path, _SIZE),
            **_convert_all(r, fields, path, _VM_COMMON),
        }
        if "dirtyRate" in fields:
            item["dirty_rate"] = r.value(fields, "dirtyRate", path, _RATE)
        if item["node"] is not None and item["node"] not in node_names:
            r.problem(f"{path}.node", f"unknown node {item['node']!r}")
        volumes = []
        for vpath, ventry in r.items(fields.get("volumes"), f"{path}.volumes"):
            vfields = r.mapping(ventry, vpath, (*_VOLUME_FIELDS, *_VOLUME_OPTIONAL),
                                tuple(_VOLUME_FIELDS))
            if vfields is None:
                continue
            volume = _convert_all(r, vfields, vpath, _VOLUME_FIELDS | _VOLUME_OPTIONAL)
            if volume.get("storage_class") not in class_names | {None}:
                r.problem(f"{vpath}.storageClass", _unknown_class(volume["storage_class"]))
            volumes.append((vpath, volume))
        _filesystems(r, fields, path, volumes)
        item["volumes"] = volumes
        out.append(_Item(path, item))
    return out


def _filesystems(r: _Reader, fields: dict[str, Any], path: str,
                 volumes: list[tuple[str, dict[str, Any]]]) -> None:
    """A VM's ``filesystems``: names of its volumes exposed through virtiofs instead of as
    disks (KubeVirt's ``spec.domain.devices.filesystems``)."""
    by_name = {v.get("name"): (vpath, v) for vpath, v in volumes}
    for fpath, name in r.items(fields.get("filesystems"), f"{path}.filesystems"):
        if not isinstance(name, str):
            r.problem(fpath, f"must be a volume name, got {_describe(name)}")
        elif name not in by_name:
            r.problem(fpath, f"unknown volume {name!r} (not among this VM's volumes)")
        else:
            vpath, volume = by_name[name]
            for kind in ("lun", "shareable"):
                if volume.get(kind):
                    r.problem(f"{vpath}.{kind}", "a filesystem volume is not a disk")
            volume["filesystem"] = True


def _namespaces(r: _Reader, raw: Any) -> list[_Item]:
    out: list[_Item] = []
    for path, entry in r.items(raw, "namespaces"):
        fields = r.mapping(entry, path, ("name", "labels"), ("name",))
        if fields is not None:
            out.append(_Item(path, {"name": r.value(fields, "name", path, _NAMESPACE),
                                    "labels": r.value(fields, "labels", path, _labels, {})}))
    return out


def _unknown_class(name: str) -> str:
    return f"unknown storage class {name!r} (not among storageClasses)"


def _generated_vms(
    r: _Reader,
    entry: dict[str, Any],
    path: str,
    rng: random.Random,
    node_names: set[str],
    class_names: set[str],
) -> list[_Item]:
    block = r.generate(
        entry, path,
        ("count", "prefix", "start", "nodes", "memory", "dirtyRate", "storageClass", "diskSize",
         *_VM_COMMON),
        ("count", "prefix", "nodes", "memory"),
    )
    if block is None:
        return []
    fields, base = block
    common = _convert_all(r, fields, base, _VM_COMMON)
    memory = r.value(fields, "memory", base, _range(_SIZE))
    rate = r.value(fields, "dirtyRate", base, _range(_RATE), 0.0)
    if isinstance(memory, tuple) and math.ceil(memory[0] / MiB) > math.floor(memory[1] / MiB):
        r.problem(f"{base}.memory", "the range holds no whole MiB")
        memory = None
    placement: list[str] = []
    for npath, name in r.items(fields.get("nodes"), f"{base}.nodes"):
        if not isinstance(name, str):
            r.problem(npath, f"must be a node name, got {_describe(name)}")
        elif name not in node_names:
            r.problem(npath, f"unknown node {name!r}")
        placement.append(name)
    if "nodes" in fields and isinstance(fields["nodes"], list) and not placement:
        r.problem(f"{base}.nodes", "must name at least one node")
    storage_class = r.value(fields, "storageClass", base, _text)
    disk_size = r.value(fields, "diskSize", base, _SIZE)
    if storage_class is not None and storage_class not in class_names:
        r.problem(f"{base}.storageClass", _unknown_class(storage_class))
    if "storageClass" in fields and "diskSize" not in fields:
        r.problem(f"{base}.diskSize", "required when storageClass is set")
    if "diskSize" in fields and "storageClass" not in fields:
        r.problem(f"{base}.storageClass", "required when diskSize is set")
    names = r.names(fields, base, _VM_NAME)
    if memory is None or not placement:
        return []
    out = []
    for i, name in enumerate(names):
        item = {"name": name, "node": placement[i % len(placement)], **common}
        item["memory"] = _draw_memory(rng, memory)
        item["dirty_rate"] = _draw_rate(rng, rate)
        item["volumes"] = []
        if storage_class is not None:
            volume = {"name": "rootdisk", "claim_name": f"{name}-root", "size": disk_size,
                      "storage_class": storage_class}
            item["volumes"] = [(f"{base}.storageClass", volume)]
        out.append(_Item(base, item, generated=True))
    return out


def _faults(r: _Reader, raw: Any, vm_keys: set[str], node_names: set[str]) -> list[_Item]:
    by_name: dict[str, list[str]] = {}
    for key in sorted(vm_keys):
        by_name.setdefault(key.split("/", 1)[1], []).append(key)
    out: list[_Item] = []
    for path, entry in r.items(raw, "faults"):
        fields = r.mapping(entry, path, tuple(_FAULT_FIELDS), ("kind",))
        if fields is None:
            continue
        item = _convert_all(r, fields, path, _FAULT_FIELDS)
        kind = item.get("kind")
        if kind is not None:
            needed, optional = _FAULT_KINDS[kind]
            for key in needed:
                if key not in fields:
                    r.problem(f"{path}.{key}", f"required for kind {kind}")
            for key in fields:
                if key not in (*needed, *optional, "kind"):
                    r.problem(f"{path}.{key}", f"not used by kind {kind}")
        vm = item.get("vm")
        if vm is not None:
            matches = [vm] if "/" in vm else by_name.get(vm, [])
            if len(matches) > 1:
                r.problem(f"{path}.vm", f"{vm!r} is ambiguous; write one of {', '.join(matches)}")
            elif not matches or matches[0] not in vm_keys:
                r.problem(f"{path}.vm", f"unknown VM {vm!r}")
            else:
                item["vm"] = matches[0]
        node = item.get("node")
        if node is not None and node not in node_names:
            r.problem(f"{path}.node", f"unknown node {node!r}")
        out.append(_Item(path, item))
    return out


# --- cross-checks --------------------------------------------------------------------------------


def _check_gates(r: _Reader, kubevirt: dict[str, Any]) -> None:
    """A gate listed for a KubeVirt version that does not have it yet would silently do nothing."""
    version = kubevirt.get("version") or KubeVirtSettings().version
    for i, gate in enumerate(kubevirt.get("feature_gates") or ()):
        since = GATE_SINCE.get(gate)
        if since and version_key(version) < version_key(since):
            r.problem(f"kubevirt.featureGates[{i}]", f"{gate} is not a feature gate of KubeVirt "
                      f"{version} (it exists from {since})")


def _check_unique(r: _Reader, items: list[_Item], field: str, what: str, key: Callable) -> None:
    grouped = _Grouped()
    first: dict[Any, str] = {}
    for item in items:
        k = key(item.fields)
        if k is None:
            continue
        where = item.at("prefix") if item.generated else item.at(field)
        if k in first:
            grouped.add(where, f"duplicate {what} (also at {first[k]})", _show(k))
        else:
            first[k] = item.base
    grouped.flush(r)


def _show(key: Any) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)


def _check_claims(r: _Reader, vms: list[_Item]) -> None:
    grouped = _Grouped()
    first: dict[tuple[str, str], str] = {}
    for vm in vms:
        namespace = vm.fields.get("namespace", "default")
        seen: dict[str, str] = {}
        for vpath, volume in vm.fields["volumes"]:
            name, claim = volume.get("name"), volume.get("claim_name")
            if name is not None and name in seen:
                r.problem(f"{vpath}.name", f"duplicate volume name {name!r} (also at {seen[name]})")
            elif name is not None:
                seen[name] = vpath
            if claim is None or namespace is None:
                continue
            where = vpath if vm.generated else f"{vpath}.claimName"
            if (namespace, claim) in first:
                grouped.add(where, f"duplicate claim (also at {first[namespace, claim]})",
                            f"{namespace}/{claim}")
            else:
                first[namespace, claim] = where
    grouped.flush(r)


def _check_capacity(r: _Reader, nodes: list[_Item], vms: list[_Item]) -> None:
    """The scheduler could never have placed these VMs, so the cluster state is impossible."""
    memory = {n.fields["name"]: n for n in nodes if n.fields.get("allocatable_memory")}
    used: dict[str, float] = {}
    too_big = _Grouped()
    oversized_nodes: set[str] = set()
    for vm in vms:
        node, size = memory.get(vm.fields["node"]), vm.fields.get("memory")
        if node is None or size is None:
            continue
        used[vm.fields["node"]] = used.get(vm.fields["node"], 0.0) + size
        limit = node.fields["allocatable_memory"]
        if size > limit:
            oversized_nodes.add(vm.fields["node"])
            too_big.add(
                vm.at("memory"), "more than the node's allocatable memory",
                f"{vm.fields['name']} {format_bytes(size)} > {vm.fields['node']} "
                f"{format_bytes(limit)}",
            )
    too_big.flush(r)
    for name, total in used.items():
        node = memory[name]
        if name not in oversized_nodes and total > node.fields["allocatable_memory"]:
            r.problem(
                node.at("allocatable.memory"),
                f"{name} has {format_bytes(node.fields['allocatable_memory'])} allocatable "
                f"but its VMs need {format_bytes(total)}",
            )


# --- entry points --------------------------------------------------------------------------------


def parse_scenario(data: dict[str, Any]) -> Scenario:
    """A scenario from already-parsed YAML; raises ScenarioError listing every problem."""
    r = _Reader()
    top = r.mapping(data, "", _TOP_FIELDS)
    if top is None:
        raise ScenarioError(r.problems)
    seed = r.value(top, "seed", "", _int(0), 0)
    time_scale = r.value(top, "timeScale", "", _above_zero, 1.0)
    kubevirt = _settings(r, top.get("kubevirt"), "kubevirt", _KUBEVIRT_FIELDS)
    _check_gates(r, kubevirt)
    network = _settings(r, top.get("network"), "network", _NETWORK_FIELDS)
    classes = _storage_classes(r, top.get("storageClasses"))
    namespaces = _namespaces(r, top.get("namespaces"))
    nodes = _nodes(r, top.get("nodes"))
    node_names = {n.fields["name"] for n in nodes} - {None}
    class_names = {c.fields.get("name") for c in classes} - {None}
    vms = _vms(r, top.get("vms"), random.Random(seed), node_names, class_names)
    vm_keys = {
        f"{vm.fields.get('namespace', 'default')}/{vm.fields['name']}"
        for vm in vms
        if vm.fields["name"] is not None and vm.fields.get("namespace", "default") is not None
    }
    faults = _faults(r, top.get("faults"), vm_keys, node_names)

    _check_unique(r, classes, "name", "storage class", lambda f: f.get("name"))
    _check_unique(r, nodes, "name", "node", lambda f: f["name"])
    _check_unique(r, namespaces, "name", "namespace", lambda f: f["name"])
    _check_unique(r, vms, "name", "VM", _vm_key)
    _check_claims(r, vms)
    _check_capacity(r, nodes, vms)

    if r.problems:
        if len(r.problems) > MAX_PROBLEMS:
            hidden = len(r.problems) - MAX_PROBLEMS
            r.problems[MAX_PROBLEMS:] = [f"scenario: {hidden} more problems not shown"]
        raise ScenarioError(r.problems)
    return Scenario(
        seed=seed,
        time_scale=time_scale,
        kubevirt=KubeVirtSettings(**kubevirt),
        network=Network(**network),
        storage_classes=[StorageClassSpec(**c.fields) for c in classes],
        namespaces=[NamespaceSpec(**n.fields) for n in namespaces],
        nodes=[NodeSpec(**n.fields) for n in nodes],
        vms=[
            VMSpec(**(vm.fields | {"volumes": [VolumeSpec(**v) for _, v in vm.fields["volumes"]]}))
            for vm in vms
        ],
        faults=[Fault(**f.fields) for f in faults],
    )


def _vm_key(fields: dict[str, Any]) -> tuple[str, str] | None:
    namespace, name = fields.get("namespace", "default"), fields["name"]
    return None if namespace is None or name is None else (namespace, name)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            if key_node.value in seen:
                raise ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_scenario(source: str | Path) -> Scenario:
    """A scenario from a YAML file path, or from YAML text when `source` contains a newline."""
    if isinstance(source, str) and "\n" in source:
        text = source
    else:
        text = Path(source).read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ScenarioError([f"yaml: {where}{exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ScenarioError([f"yaml: {exc}"]) from None
    if data is None:
        raise ScenarioError(["scenario: the document is empty"])
    return parse_scenario(data)
