"""kopf handlers for MigrationPolicy (migrationpolicies.virtshift.io): a daemon per policy that
keeps its KubeVirt MigrationPolicies, its VMI labels and its status current, and a deletion
handler that removes them (explicitly: garbage collection may not run, and labels are not
owned objects)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import kopf
from pydantic import ValidationError

from virtshift import logs
from virtshift.api.migrationpolicy import MigrationPolicy, MigrationPolicyStatus
from virtshift.api.units import parse_duration, parse_quantity
from virtshift.domain import policy as dpolicy
from virtshift.domain import progress as dprogress
from virtshift.domain import storage as dstorage
from virtshift.domain import windows as dwindows
from virtshift.handlers import metrics, runtime
from virtshift.k8s import storage as kstorage
from virtshift.k8s.policies import PolicyStore
from virtshift.k8s.rest import JSON

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "virtshift.io", "v1alpha1", "migrationpolicies"
COALESCE_SECONDS = 0.2  # after a wake-up, let a burst of watch events settle first
STOP_POLL_SECONDS = 0.1
# kubevirt: its feature gates decide maxDowntimeMs. NodeDrains (whose VM entries feed the
# outcomes) are not watched: their status changes with every drain's pass; the resync reads them.
WATCHED = ("vmi", "vmim", "policy", "kubevirt", "pvc")
# Wall seconds planned for a policy's pass to land its writes (a coalescing pause and the
# pass): storage moves stop twice that (in cluster time) plus a target pod's start-up before
# a window's end, so that none begins its copy after the end (as a NodeDrain's migrations).
POLICY_ANSWER_SECONDS = 1.0


class _Policies:
    """Per-process state of the policy handlers: the store, wake-ups, and per-policy locks so a
    reconcile never runs beside the deletion clean-up of the same policy."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.store = PolicyStore(rt.cluster, on_change=self.wake_all)
        self.wake: dict[str, threading.Event] = defaultdict(threading.Event)
        self.locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self.deleting: set[str] = set()  # UIDs
        self.labels: dict[str, tuple[tuple[str, str], ...] | None] = {}  # VMI key -> labels
        self.guard = threading.Lock()
        try:
            self.store.start()
        except Exception:
            self.store.stop()
            raise
        rt.cluster.listeners.append(self._on_change)

    def _on_change(self, kind: str, obj: JSON) -> None:
        if kind == "vmi" and not self._concerns_policies(obj):
            return
        if kind in WATCHED:
            self.wake_all()

    def _concerns_policies(self, vmi: JSON) -> bool:
        """A VMI event matters to the policies when the VMI is new or gone, or its labels
        changed (selection, labelling) -- or when a policy moves disks, which follows the
        VMIs' status. Status-only updates, the bulk of them, wake nobody otherwise."""
        meta = vmi["metadata"]
        key = f"{meta.get('namespace')}/{meta['name']}"
        labels = None if meta.get("deletionTimestamp") else tuple(sorted(
            (meta.get("labels") or {}).items()))
        with self.guard:
            changed = self.labels.get(key, ()) != labels
            self.labels[key] = labels
        return changed or any(((p.get("spec") or {}).get("storage") or {}).get("mode") ==
                              "Always" for p in self.rt.cluster.policies.values())

    def wake_all(self) -> None:
        with self.guard:
            events = list(self.wake.values())
        for ev in events:
            ev.set()

    def wake_event(self, name: str) -> threading.Event:
        with self.guard:
            return self.wake[name]

    def lock(self, name: str) -> threading.Lock:
        with self.guard:
            return self.locks[name]

    def forget(self, name: str) -> None:
        with self.guard:
            self.wake.pop(name, None)


_state: _Policies | None = None
_state_lock = threading.Lock()


def state() -> _Policies:
    global _state
    rt = runtime.get()
    with _state_lock:
        if _state is None or _state.rt is not rt:
            _state = _Policies(rt)
        return _state


def reconcile(name: str) -> dt.datetime | None:
    """gather -> render and decide (domain) -> apply -> status, for one policy. Returns when
    to look again at the latest (a migration's progressTimeout; for storage moves, a window's
    last start or next opening), if sooner than the resync."""
    st = state()
    rt, store = st.rt, st.store
    obj = store.policy(name)
    if obj is None or obj["metadata"].get("deletionTimestamp") \
            or obj["metadata"].get("uid") in st.deleting:
        return None
    meta = obj["metadata"]
    generation = meta.get("generation", 1)
    now = rt.cluster.clock.now()
    recheck = None
    try:
        model = MigrationPolicy.model_validate(obj)
    except ValidationError as exc:
        previous = _previous_status(obj)
        decision = dpolicy.invalid_spec(previous, generation, _short(exc), now)
    else:
        recheck = _progress_timeout(obj, model, now)
        policies = rt.cluster.named_policies()
        # KubeVirt policies first, so a VMI never carries a label nothing selects yet.
        owned, conflicts = store.apply_rendered(name, dpolicy.render(
            name, meta["uid"], model.spec, rt.cluster.kubevirt_applies_max_downtime()))
        vmis = store.vmi_views()
        store.relabel(dpolicy.label_changes(name, policies, vmis))
        governs = dpolicy.governed(name, policies, vmis)
        metrics_source, unknown_rates = store.dirty_rates(model.spec, governs)
        decision = dpolicy.derive_status(dpolicy.PolicySnapshot(
            name=name, generation=generation, spec=model.spec,
            status=model.status or MigrationPolicyStatus(), now=now,
            matched=len(governs),
            migrations=store.migrations_of(name), conflicts=conflicts, rendered=owned,
            drain_vms=store.drain_vms(name, policies), metrics_source=metrics_source,
            unknown_rates=unknown_rates,
            overrides=dpolicy.overridden(name, model.spec, policies, vmis,
                                         store.kubevirt_views(), owned)))
        if model.spec.storage is not None:
            governed = set(dpolicy.governed(name, policies, vmis))
            moves = _storage_moves(name, model, now, governed, meta["uid"])
            recheck = _earliest(recheck, _storage_recheck(model, now))
            decision = dataclasses.replace(
                decision, status=decision.status.model_copy(update={"storage": moves.status}),
                events=[*decision.events, *moves.events])
    store.write_status(obj, decision.status.wire())
    _policy_metrics(name, obj, now)
    for kind, reason, message in decision.events:
        rt.actions.event(_for_events(obj), kind, reason, message)
    return recheck


def _policy_metrics(name: str, obj: JSON, now: dt.datetime) -> None:
    """Window gauges and the VMs still to move under this policy (for the alert on a window
    about to close with work left)."""
    st = state()
    try:
        model = MigrationPolicy.model_validate(obj)
        win = dwindows.window_state(model.spec.windows, now)
    except (ValidationError, ValueError):
        return
    metrics.WINDOW_OPEN.labels(name).set(1 if win.open else 0)
    if win.open and win.closes_at is not None:
        metrics.WINDOW_CLOSES_IN.labels(name).set((win.closes_at - now).total_seconds())
    else:
        with contextlib.suppress(KeyError):
            metrics.WINDOW_CLOSES_IN.remove(name)
    left = [v for v in st.store.drain_vms(name, st.rt.cluster.named_policies())
            if v.phase in ("Pending", "Waiting", "Migrating")]
    metrics.POLICY_WORK_LEFT.labels(name).set(len(left))


def _forget_metrics(name: str) -> None:
    for gauge in (metrics.WINDOW_OPEN, metrics.WINDOW_CLOSES_IN, metrics.POLICY_WORK_LEFT):
        with contextlib.suppress(KeyError):
            gauge.remove(name)


def _storage_window(model: MigrationPolicy, now: dt.datetime
                    ) -> tuple[dwindows.StartGate, float]:
    """The windows' verdict on beginning a storage move now, and the lead before a window's
    end within which none begins: a target pod's start-up plus twice our time to act (the
    pass due at that moment, and one under way then)."""
    settings = state().rt.settings
    margin = 2 * POLICY_ANSWER_SECONDS * settings.time_scale
    lead = settings.estimator.target_startup + margin
    try:
        return dwindows.start_gate(model.spec.windows, now, lead), lead
    except dwindows.WindowError:  # the Ready condition says why; nothing begins meanwhile
        return dwindows.StartGate(False, None, None), lead


def _storage_recheck(model: MigrationPolicy, now: dt.datetime) -> dt.datetime | None:
    """When the windows' verdict on storage moves changes: the last start before a window's
    end, or the next opening."""
    storage = model.spec.storage
    if storage is None or storage.mode != "Always" or not model.spec.windows:
        return None
    gate, lead = _storage_window(model, now)
    if gate.may_start and gate.closes_at is not None:
        return gate.closes_at - dt.timedelta(seconds=lead)
    return gate.next_open


def _earliest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    return min((t for t in (a, b) if t is not None), default=None)


def _storage_moves(name: str, model: MigrationPolicy, now: dt.datetime, governed: set[str],
                   uid: str) -> dstorage.StorageDecision:
    """spec.storage: move the governed VMs' disks (mode Always), delete what leaks. A move
    begins only inside a window and not within its end's lead; under withinWindow: Finish only
    when its predicted copy ends before the window does."""
    st = state()
    cluster = st.rt.cluster
    spec = model.spec
    assert spec.storage is not None
    gate, lead = _storage_window(model, now)
    closes_in = gate.closes_in(now)
    # A move's copy must end before the window's end, begun a target start-up after now
    # (and our writes landing): the lead.
    finish_within = closes_in - lead if spec.within_window == "Finish" and \
        closes_in is not None else None
    seen = cluster.storage_views()
    claims, everyone = seen["claims"], seen["storage"]
    failed, ended = kstorage.copy_history(cluster, everyone, claims)
    decision = dstorage.plan_policy_storage(dstorage.PolicyStorageSnapshot(
        policy=name, spec=spec.storage, now=now,
        governed={k: v for k, v in everyone.items()
                  if k in governed and v.running and not v.vmi_ended},
        everyone=list(everyone.values()), claims=claims, classes=seen["classes"],
        updates_migrate=seen["updates_migrate"], may_start=gate.may_start,
        finish_within=finish_within,
        max_parallel=spec.max_parallel_migrations,
        bandwidth_per_migration=parse_quantity(spec.bandwidth_per_migration)
        if spec.bandwidth_per_migration else None,
        max_attempts=spec.max_attempts, failed_attempts=failed, ended=ended, uid=uid))
    problems: list[str] = []
    kstorage.apply(cluster, decision.create, decision.update, decision.delete, problems)
    decision.events.extend(("Warning", "WriteFailed", p) for p in problems[:5])
    for c in decision.create:
        log.info("MigrationPolicy %s: %s/%s -> %s (%s)", name, c.namespace, c.source, c.name,
                 c.storage_class)
    return decision


def _cancel_storage(name: str, obj: JSON) -> str | None:
    """What is still to undo of this policy's storage moves (None: nothing)."""
    cluster = state().rt.cluster
    seen = cluster.storage_views()
    claims, everyone = seen["claims"], list(seen["storage"].values())
    uid = obj["metadata"].get("uid", "")
    undo = dstorage.cancel_policy_storage(name, everyone, claims, uid)
    problems: list[str] = []
    # A claim something else refers to (a snapshot of it, say) is the claims collector's
    # once this policy is gone: no reason to wait for it.
    held = kstorage.apply(cluster, [], undo.update, undo.delete, problems)
    deleting = [k for k in undo.delete if k not in held]
    for vm in undo.update:
        state().rt.actions.event(_for_events(obj), "Normal", "StorageMoveCancelled",
            f"{vm.namespace}/{vm.vm}: back on its source volumes")
    waiting = dstorage.cancel_pending(name, everyone, claims, uid)
    if not (undo.update or deleting or waiting or problems):
        return None
    return (f"cancelling storage moves: {len(undo.update)} VMs reverted, {len(deleting)} "
            f"destination claims deleted, {waiting} still in use"
            + (f"; failed: {'; '.join(problems[:3])}" if problems else ""))


def _progress_timeout(obj: JSON, model: MigrationPolicy, now: dt.datetime) -> dt.datetime | None:
    """progressTimeout: abort (delete) this policy's migrations whose transfer has stopped
    making progress (domain.progress); returns when the next one would be due."""
    st = state()
    spec = model.spec
    if not spec.progress_timeout:
        return None
    progress, observable = st.store.progress()
    verdict = dprogress.check(st.store.migrations_of(obj["metadata"]["name"]), progress, now,
                              parse_duration(spec.progress_timeout), observable)
    for stall in verdict.abort:
        m = stall.migration
        if st.store.abort(stall, now):
            log.info("MigrationPolicy %s: aborted %s/%s: %s", obj["metadata"]["name"],
                     m.namespace, m.name, stall.message)
            st.rt.actions.event(_for_events(obj), "Warning", dprogress.PROGRESS_TIMEOUT,
                                f"aborted migration {m.namespace}/{m.name}: {stall.message}")
    for stall in verdict.spared:  # in post-copy: never aborted
        st.rt.actions.event(_for_events(obj), "Normal", dprogress.POST_COPY_NOT_ABORTED,
                            stall.message)
    return verdict.recheck_at


def _previous_status(obj: JSON) -> MigrationPolicyStatus:
    try:
        return MigrationPolicyStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return MigrationPolicyStatus()


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                     for e in exc.errors()[:5])


def _for_events(obj: JSON) -> JSON:
    return {**obj, "apiVersion": f"{GROUP}/{VERSION}", "kind": dpolicy.KIND}


# cancellation_backoff: kopf re-checks a stopping daemon only after a delay (the backoff, else the
# whole cancellation_timeout), and the policy's finalizer waits for that check; ours exits within
# a poll interval, so a deletion completes in about a second rather than ten.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=1.0, cancellation_timeout=10)
def policy_daemon(stopped: kopf.DaemonStopped, name: str, **_: Any) -> None:
    """Reconcile whenever a VMI, a migration, a policy or a KubeVirt MigrationPolicy changes,
    and every few seconds anyway (window state, missed events)."""
    st = state()
    wake = st.wake_event(name)
    while not stopped:
        wake.clear()
        wait = st.rt.settings.resync_seconds
        metrics.RECONCILES.labels("MigrationPolicy").inc()
        try:
            with st.lock(name), logs.context(policy=name):
                recheck = reconcile(name)
            if recheck is not None:  # a progressTimeout or a window falls due before the resync
                due = (recheck - st.rt.cluster.clock.now()).total_seconds()
                wait = min(wait, max(0.0, due / st.rt.settings.time_scale))
        except Exception:
            metrics.RECONCILE_ERRORS.labels("MigrationPolicy").inc()
            log.exception("reconciling MigrationPolicy %s failed; retrying", name,
                          extra={"policy": name})
            stopped.wait(1.0)
        _wait(stopped, wake, wait)
        stopped.wait(COALESCE_SECONDS)


def _wait(stopped: kopf.DaemonStopped, wake: threading.Event, seconds: float) -> None:
    """Until woken, stopped, or ``seconds`` passed (in slices: kopf's flag cannot wake us)."""
    deadline = time.monotonic() + seconds
    while not stopped and (left := deadline - time.monotonic()) > 0:
        if wake.wait(min(left, STOP_POLL_SECONDS)):
            return


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=5.0)  # kopf's default after an error: 60 s
def policy_deleted(name: str, uid: str, body: kopf.Body, **_: Any) -> None:
    """Put every unfinished storage move of this policy back on its source volumes and delete
    its unused destination claims, delete the KubeVirt MigrationPolicies rendered from this
    policy and take its label off the VMIs (each gets the label of the policy that governs it
    now, if any)."""
    st = state()
    with st.guard:
        st.deleting.add(uid)
    with st.lock(name):
        left = _cancel_storage(name, dict(body))
        st.store.delete_rendered(name)
        others = [p for p in st.rt.cluster.named_policies() if p.name != name]
        st.store.relabel(dpolicy.label_changes(name, others, st.store.vmi_views()))
    if left:
        # The finalizer stays until every unfinished storage move is back on its source
        # volumes and its destination claims are gone: nothing half-copied is left behind.
        raise kopf.TemporaryError(left, delay=1)
    st.forget(name)
    _forget_metrics(name)
    st.wake_all()  # the policies that govern those VMIs now
