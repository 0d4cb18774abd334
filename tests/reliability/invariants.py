"""The invariants every fault test checks, read only from the cluster's objects.

Nothing here asks the operator (its log, its metrics, its memory) whether something happened:
the VMIMs, VMIs, VMs, Nodes, PVCs, NodeDrains and MigrationPolicies in the API server are the
evidence. Two kinds:

* ``always`` invariants hold at every instant, so a ``Watcher`` samples the cluster while a
  fault runs: no VMI with two unfinished migrations, and no limit exceeded (KubeVirt's
  ``parallelMigrationsPerCluster`` / ``parallelOutboundMigrationsPerNode``, and each policy's
  ``maxParallelMigrations`` / ``maxParallelOutboundPerNode``);
* ``settled`` invariants hold once the fault is over and the operator has had its time
  (``check_settled``): no orphan VMIM or PVC, every finalizer removed when its object goes, no VM
  left stopped, no node left cordoned by us after its drain is gone, every drain finished or its
  status saying truthfully why not, and retries backing off (never more than ``maxAttempts``,
  never sooner than the backoff after a failure).

Each violation names its invariant (``INVARIANTS``), so the report counts what held.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.kubevirt import FINAL_PHASES, IN_FLIGHT_PHASES
from virtshift.domain.drain import CORDONED_BY, MAX_QUEUE_ROUNDS
from virtshift.domain.rules import Rules
from virtshift.domain.storage import (
    COMPLETED_ANNOTATION,
    MOVED_BY_LABEL,
    SOURCE_CLAIM_LABEL,
)
from virtshift.k8s import rest, views

JSON = dict[str, Any]

ONE_MIGRATION = "no VMI with two unfinished migrations"
LIMITS = "no limit exceeded"
ORPHAN_VMIM = "no orphan VMIM"
ORPHAN_PVC = "no orphan PVC"
FINALIZERS = "every finalizer removed when its object goes"
VM_STOPPED = "no VM left stopped"
CORDONED = "no node left cordoned by us after its drain is gone"
TRUTHFUL = "the drain finishes or its status says truthfully why not"
BACKOFF = "retries back off"
INVARIANTS = (ONE_MIGRATION, LIMITS, ORPHAN_VMIM, ORPHAN_PVC, FINALIZERS, VM_STOPPED, CORDONED,
              TRUTHFUL, BACKOFF)
FINALIZER = "virtshift.io/finalizer"


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def _phase(m: JSON) -> str | None:
    return (m.get("status") or {}).get("phase")


def _key(obj: JSON) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace')}/{meta['name']}" if meta.get("namespace") else meta["name"]


def _time(text: str | None) -> dt.datetime | None:
    return views.parse_time(text) if text else None


def _ours(m: JSON) -> bool:
    return views.DRAIN_UID_ANNOTATION in (m["metadata"].get("annotations") or {})


@dataclass
class ClusterState:
    """One read of every object the invariants look at."""

    vmims: list[JSON]
    vmis: list[JSON]
    vms: list[JSON]
    nodes: list[JSON]
    pvcs: list[JSON]
    drains: list[JSON]
    policies: list[JSON]
    kubevirt: JSON | None

    @classmethod
    def read(cls, kube: rest.KubeClient) -> ClusterState:
        kvs = kube.items(rest.KUBEVIRTS)
        return cls(kube.items(rest.VMIMS), kube.items(rest.VMIS), kube.items(rest.VMS),
                   kube.items(rest.NODES), kube.items(rest.PVCS), kube.items(rest.NODE_DRAINS),
                   kube.items(rest.POLICIES), kvs[0] if kvs else None)

    def kubevirt_limits(self) -> tuple[int, int]:
        mig = (((self.kubevirt or {}).get("spec") or {}).get("configuration") or {}).get(
            "migrations") or {}
        return (int(mig.get("parallelMigrationsPerCluster", 5)),
                int(mig.get("parallelOutboundMigrationsPerNode", 2)))


# -- always ---------------------------------------------------------------------------------------


def check_always(state: ClusterState) -> list[Violation]:
    out: list[Violation] = []
    unfinished = [m for m in state.vmims if _phase(m) not in FINAL_PHASES
                  and not m["metadata"].get("deletionTimestamp")]
    per_vmi = Counter(f"{m['metadata']['namespace']}/{m['spec']['vmiName']}" for m in unfinished)
    out += [Violation(ONE_MIGRATION, f"{vmi}: {n} unfinished VMIMs")
            for vmi, n in per_vmi.items() if n > 1]
    # KubeVirt runs at most its limits and queues the rest (Pending); virtshift keeps at most
    # MAX_QUEUE_ROUNDS rounds more of its own waiting in that queue (domain.drain._queue_rounds).
    cluster_limit, node_limit = state.kubevirt_limits()
    running = [m for m in unfinished if _phase(m) in IN_FLIGHT_PHASES]
    if len(running) > cluster_limit:
        out.append(Violation(LIMITS, f"{len(running)} migrations running > "
                                     f"parallelMigrationsPerCluster {cluster_limit}"))
    running_from = Counter(((m.get("status") or {}).get("migrationState") or {}).get(
        "sourceNode") or (m["metadata"].get("labels") or {}).get(views.SOURCE_LABEL)
        for m in running)
    out += [Violation(LIMITS, f"{n} running from {node} > parallelOutboundMigrationsPerNode "
                              f"{node_limit}") for node, n in running_from.items()
            if node and n > node_limit]
    mine = [m for m in unfinished if _ours(m)]
    rounds = 1 + MAX_QUEUE_ROUNDS
    if len(mine) > rounds * cluster_limit:
        out.append(Violation(LIMITS, f"{len(mine)} unfinished migrations of ours > {rounds} x "
                                     f"parallelMigrationsPerCluster {cluster_limit}"))
    per_source = Counter((m["metadata"].get("labels") or {}).get(views.SOURCE_LABEL)
                         for m in mine)
    out += [Violation(LIMITS, f"{n} unfinished of ours from {node} > {rounds} x "
                              f"parallelOutboundMigrationsPerNode {node_limit}")
            for node, n in per_source.items() if node and n > rounds * node_limit]
    for policy in state.policies:
        spec = policy.get("spec") or {}
        name = policy["metadata"]["name"]
        governed = [m for m in mine if (m["metadata"].get("labels") or {}).get(
            views.POLICY_LABEL) == name]
        limit = spec.get("maxParallelMigrations")
        if limit is not None and len(governed) > limit:
            out.append(Violation(LIMITS, f"policy {name}: {len(governed)} > "
                                         f"maxParallelMigrations {limit}"))
        per_node = spec.get("maxParallelOutboundPerNode")
        if per_node is not None:
            by = Counter((m["metadata"].get("labels") or {}).get(views.SOURCE_LABEL)
                         for m in governed)
            out += [Violation(LIMITS, f"policy {name}: {n} from {node} > "
                                      f"maxParallelOutboundPerNode {per_node}")
                    for node, n in by.items() if n > per_node]
    return out


class Watcher:
    """Samples the cluster in a thread and records every ``always`` violation it sees. An API
    server that is down (a fault under test) is skipped over, and counted."""

    def __init__(self, kube: rest.KubeClient, every: float = 0.1) -> None:
        self.kube = kube
        self.every = every
        self.samples = 0
        self.unreadable = 0
        self.violations: list[Violation] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                vmims = self.kube.items(rest.VMIMS)
                policies = self.kube.items(rest.POLICIES)
                kvs = self.kube.items(rest.KUBEVIRTS)
            except Exception:
                self.unreadable += 1
                self._stop.wait(0.5)
                continue
            state = ClusterState(vmims, [], [], [], [], [], policies, kvs[0] if kvs else None)
            self.samples += 1
            for v in check_always(state):
                if v not in self.violations:
                    self.violations.append(v)
            self._stop.wait(self.every)


# -- settled --------------------------------------------------------------------------------------


@dataclass
class Expect:
    """What a test knows beyond the cluster: VMs the fault itself removed (a deleted VMI), and
    the backoff the drains' rules use (the defaults unless a policy says otherwise)."""

    rules: Rules = field(default_factory=Rules)
    gone_vmis: set[str] = field(default_factory=set)


def _drain_nodes(drain: JSON) -> set[str]:
    spec, status = drain.get("spec") or {}, drain.get("status") or {}
    nodes = {spec["nodeName"]} if spec.get("nodeName") else set()
    return nodes | {n["name"] for n in status.get("nodes") or []}


def _condition(drain: JSON, kind: str) -> JSON | None:
    return next((c for c in (drain.get("status") or {}).get("conditions") or []
                 if c["type"] == kind), None)


def check_settled(state: ClusterState, expect: Expect | None = None) -> list[Violation]:
    expect = expect or Expect()
    out = check_always(state)
    drains = {d["metadata"]["uid"]: d for d in state.drains}
    drain_names = {d["metadata"]["name"] for d in state.drains}
    vmis = {_key(v): v for v in state.vmis}
    vms = {_key(v): v for v in state.vms}

    # No orphan VMIM: an unfinished migration of ours whose NodeDrain or VMI is gone.
    for m in state.vmims:
        if not _ours(m) or _phase(m) in FINAL_PHASES:
            continue
        uid = m["metadata"]["annotations"][views.DRAIN_UID_ANNOTATION]
        vmi = f"{m['metadata']['namespace']}/{m['spec']['vmiName']}"
        if uid not in drains:
            out.append(Violation(ORPHAN_VMIM, f"{_key(m)} ({_phase(m)}) outlives its NodeDrain"))
        elif vmi not in vmis:
            out.append(Violation(ORPHAN_VMIM, f"{_key(m)} ({_phase(m)}) outlives its VMI"))

    # No orphan PVC: a destination we made whose owner is gone, that no VM or VMI names and no
    # later move copies from, and whose data is on its source (its VM never ran on it, and the
    # source still exists). A destination its VM ran on holds that VM's data and is kept even
    # with its VM gone (docs/storage-migration.md, "Ownership and deletion").
    sources = {(pvc["metadata"]["namespace"], (pvc["metadata"].get("labels") or {}).get(
        SOURCE_CLAIM_LABEL)) for pvc in state.pvcs}
    existing = {(pvc["metadata"]["namespace"], pvc["metadata"]["name"]) for pvc in state.pvcs
                if not pvc["metadata"].get("deletionTimestamp")}
    named = set(_claims_named(vms.values(), state.vmis))
    for pvc in state.pvcs:
        meta = pvc["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        mover = labels.get(MOVED_BY_LABEL)
        if not mover or meta.get("deletionTimestamp"):
            continue
        kind, _, owner = mover.partition(".")
        alive = owner in drain_names if kind == "drain" else owner in {
            p["metadata"]["name"] for p in state.policies}
        here = (meta["namespace"], meta["name"])
        source = (meta["namespace"], labels.get(SOURCE_CLAIM_LABEL))
        if alive or here in named or here in sources or COMPLETED_ANNOTATION in annotations \
                or source not in existing:
            continue
        out.append(Violation(ORPHAN_PVC, f"{_key(pvc)} (made by {mover}) is used by no VM, "
                                         "and its data is on its source"))

    # Finalizers: an object being deleted still holding ours.
    for obj in [*state.drains, *state.policies]:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and FINALIZER in (meta.get("finalizers") or []):
            out.append(Violation(FINALIZERS, f"{meta['name']} deleted at "
                                             f"{meta['deletionTimestamp']}, finalizer still on"))

    # No VM left stopped by a quick migration.
    for key, vm in vms.items():
        record = (vm["metadata"].get("annotations") or {}).get(views.QUICK_ANNOTATION)
        if record and views.vm_info(vm).quick and not views.vm_info(vm).quick.started:
            out.append(Violation(VM_STOPPED, f"{key} stopped by a quick migration, not "
                                             "started again"))

    # No node left cordoned by a drain that is gone.
    for node in state.nodes:
        by = (node["metadata"].get("annotations") or {}).get(CORDONED_BY)
        if by and by not in drain_names:
            out.append(Violation(CORDONED, f"{node['metadata']['name']} cordoned by {by}, "
                                           "which is gone"))
        if by and not (node.get("spec") or {}).get("unschedulable"):
            pass  # uncordoned by someone else: our annotation alone blocks nothing

    # Every drain finished, or its status says why not; and what it says is so.
    for drain in state.drains:
        name = drain["metadata"]["name"]
        if drain["metadata"].get("deletionTimestamp"):
            continue  # covered by FINALIZERS
        status = drain.get("status") or {}
        phase = status.get("phase")
        ready = _condition(drain, "Ready")
        if (status.get("observedGeneration") or 0) < drain["metadata"].get("generation", 1):
            out.append(Violation(TRUTHFUL, f"{name}: status is of generation "
                                           f"{status.get('observedGeneration')}, spec of "
                                           f"{drain['metadata'].get('generation')}"))
        if phase == "Drained":
            stuck = {f"{v['namespace']}/{v['name']}" for v in status.get("vms") or []
                     if v["phase"] in ("Failed", "Skipped")}
            left = [k for k, v in vmis.items() if (v.get("status") or {}).get("nodeName")
                    in _drain_nodes(drain) and k not in stuck
                    and not (drain.get("spec") or {}).get("dryRun")
                    and not (v["metadata"].get("deletionTimestamp"))]
            released = {n["name"] for n in status.get("nodes") or []
                        if n.get("phase") == "Released"}
            left = [k for k in left if vmis[k]["status"].get("nodeName") not in released]
            if left:
                out.append(Violation(TRUTHFUL, f"{name} says Drained; still on its nodes: "
                                               f"{sorted(left)[:5]}"))
        elif not ready or not ready.get("reason"):
            out.append(Violation(TRUTHFUL, f"{name}: phase {phase} without a Ready reason"))
        elif ready["status"] != "True" and not ready.get("message"):
            out.append(Violation(TRUTHFUL, f"{name}: not done ({ready['reason']}), no message"))
        for vm in status.get("vms") or []:
            if vm["phase"] == "Failed" and not vm.get("reason"):
                out.append(Violation(TRUTHFUL, f"{name}: {vm['namespace']}/{vm['name']} failed "
                                               "without a reason"))

    out += check_backoff(state, expect.rules)
    return out


def check_backoff(state: ClusterState, rules: Rules) -> list[Violation]:
    """Per (drain incarnation, VMI): at most ``maxAttempts`` attempts after the last success,
    and each retry created no sooner than the backoff after the failure before it (in the
    cluster's time: KubeVirt's phase transition timestamps, whole seconds)."""
    out: list[Violation] = []
    by: dict[tuple[str, str], list[JSON]] = defaultdict(list)
    for m in state.vmims:
        if _ours(m):
            by[(m["metadata"]["annotations"][views.DRAIN_UID_ANNOTATION],
                f"{m['metadata']['namespace']}/{m['spec']['vmiName']}")].append(m)
    for (_uid, vmi), migs in by.items():
        migs.sort(key=lambda m: int(m["metadata"]["labels"].get(views.ATTEMPT_LABEL, 0)))
        failures = 0
        for prev, nxt in itertools.pairwise(migs):
            if _phase(prev) != "Failed":
                failures = 0
                continue
            failures += 1
            stamps = {t["phase"]: _time(t["phaseTransitionTimestamp"]) for t in
                      (prev.get("status") or {}).get("phaseTransitionTimestamps") or []}
            later = {t["phase"]: _time(t["phaseTransitionTimestamp"]) for t in
                     (nxt.get("status") or {}).get("phaseTransitionTimestamps") or []}
            ended, began = stamps.get("Failed"), later.get("Pending")
            if ended and began:
                waited = (began - ended).total_seconds()
                wanted = rules.backoff(failures)
                if waited < wanted - 2:  # whole-second stamps
                    out.append(Violation(BACKOFF, f"{vmi}: attempt {_label_attempt(nxt)} "
                                                  f"{waited:.0f}s after a failure, backoff "
                                                  f"{wanted:.0f}s"))
        run = 0
        for m in migs:
            run = 0 if _phase(m) == "Succeeded" else run + 1
            if run > rules.max_attempts:
                out.append(Violation(BACKOFF, f"{vmi}: {run} attempts in a row > maxAttempts "
                                              f"{rules.max_attempts}"))
                break
    return out


def _label_attempt(m: JSON) -> str:
    return m["metadata"]["labels"].get(views.ATTEMPT_LABEL, "?")


def wait_settled(kube: rest.KubeClient, expect: Expect | None = None, timeout: float = 60,
                 every: float = 0.5) -> tuple[list[Violation], float]:
    """Poll until no settled invariant is violated (or the timeout): the violations left, and
    how long it took."""
    started = time.monotonic()
    while True:
        violations = check_settled(ClusterState.read(kube), expect)
        if not violations or time.monotonic() - started > timeout:
            return violations, time.monotonic() - started
        time.sleep(every)


def duplicate_migrations(state: ClusterState, drain_uid: str) -> list[str]:
    """VMIs one drain incarnation moved more than once, or attempts made twice (the SIGKILL
    figure): from the VMIMs' labels and phases."""
    mine = [m for m in state.vmims if (m["metadata"].get("annotations") or {}).get(
        views.DRAIN_UID_ANNOTATION) == drain_uid]
    per_attempt = Counter((m["spec"]["vmiName"], _label_attempt(m)) for m in mine)
    moved = Counter(m["spec"]["vmiName"] for m in mine if _phase(m) == "Succeeded")
    return ([f"{vmi} attempt {a} x{n}" for (vmi, a), n in per_attempt.items() if n > 1]
            + [f"{vmi} moved x{n}" for vmi, n in moved.items() if n > 1])


def _claims_named(vms: Any, vmis: Any) -> list[tuple[str, str]]:
    """(namespace, claim) of every claim a VM's template or a VMI's spec names."""
    out = []
    for obj in [*vms, *vmis]:
        spec = obj.get("spec") or {}
        volumes = ((spec.get("template") or {}).get("spec") or {}).get("volumes") \
            if "template" in spec else spec.get("volumes")
        for v in volumes or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName") or \
                (v.get("dataVolume") or {}).get("name")
            if claim:
                out.append((obj["metadata"]["namespace"], claim))
    return out
