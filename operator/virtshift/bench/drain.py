"""``virtshift bench drain``: one scenario drained by virtshift (a NodeDrain) and, with
``--baseline native``, by KubeVirt alone (``kubectl drain``: virt-api's eviction webhook answers
429 and the evacuation controller migrates), each on a fresh control plane and simulator built
from the same scenario and seed, in the same command.

Everything reported comes from the cluster's own objects, never from the operator's status:
makespan from the VMIMs' ``phaseTransitionTimestamps`` (cluster time: first Pending to last
Succeeded/Failed), outcomes and retries from the VMIMs, what is left from the VMIs, downtime
from the simulator's annotation on each VMIM, API requests from the API server's audit log,
CPU and memory from /proc of the operator process.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virtshift.bench import audit
from virtshift.bench.bound import BoundVM, Limits, lower_bound, waves
from virtshift.bench.procstat import ProcWatch
from virtshift.domain.physics import QEMU_DEFAULT_DOWNTIME
from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, KubeClient
from virtshift.sim.objects import DOWNTIME_ANNOTATION
from virtshift.sim.scenario import Scenario, load_scenario

WAVE_LABEL = "bench.virtshift.io/wave"
DRAIN_NAME = "bench"


@dataclass
class DrainConfig:
    scenario: Path
    nodes: list[str]
    exclude: list[str] = field(default_factory=list)  # namespace/name globs of VMs to drop
    time_scale: float | None = None  # override the scenario's
    max_unavailable: int | None = None  # several nodes: how many at once (default 1)
    policy: Path | None = None  # virtshift MigrationPolicy YAML applied before the drain
    timeout: float = 3600.0  # cluster seconds a run may take before it is cut off
    label: str | None = None  # the report's name for this configuration

    def load(self) -> Scenario:
        sc = load_scenario(self.scenario)
        update: dict[str, Any] = {}
        if self.exclude:
            update["vms"] = [vm for vm in sc.vms
                             if not any(fnmatch.fnmatchcase(vm.key, p) for p in self.exclude)]
        if self.time_scale:
            update["time_scale"] = self.time_scale
        return sc.model_copy(update=update) if update else sc

    @property
    def groups(self) -> list[list[str]]:
        if len(self.nodes) == 1:
            return [list(self.nodes)]
        return waves(self.nodes, self.max_unavailable or 1)


def policy_doc(cfg: DrainConfig) -> dict[str, Any] | None:
    return yaml.safe_load(cfg.policy.read_text()) if cfg.policy else None


# -- the bound --------------------------------------------------------------------------------


def bound_for(cfg: DrainConfig, scenario: Scenario) -> dict[str, Any]:
    """The lower bound under the limits both runs share: KubeVirt's CR, the network, and what
    the virtshift policy allows (post-copy, auto-converge, bandwidth)."""
    kv = scenario.kubevirt
    spec = (policy_doc(cfg) or {}).get("spec") or {}
    from virtshift.api.units import parse_quantity

    per_migration = kv.bandwidth_per_migration
    if spec.get("bandwidthPerMigration"):
        per_migration = parse_quantity(str(spec["bandwidthPerMigration"]))
    limits = Limits(
        node_bandwidth=scenario.network.node_bandwidth,
        target_startup=scenario.network.target_pod_startup,
        per_node=kv.parallel_outbound_migrations_per_node,
        per_cluster=kv.parallel_migrations_per_cluster,
        bandwidth_per_migration=per_migration,
        post_copy=bool(spec.get("allowPostCopy", kv.allow_post_copy)),
        auto_converge=bool(spec.get("allowAutoConverge", kv.allow_auto_converge)))
    vms = [BoundVM(vm.key, vm.node, vm.memory, vm.dirty_rate) for vm in scenario.vms
           if vm.live_migratable and vm.eviction_strategy in ("LiveMigrate",
                                                             "LiveMigrateIfPossible")]
    b = lower_bound(vms, limits, cfg.groups)
    return {"seconds": round(b.seconds, 1), "formula": b.formula,
            "groups": [{"nodes": list(g.nodes), "seconds": round(g.seconds, 1),
                        "binding": g.binding,
                        "terms": {k: round(v, 1) for k, v in g.terms.items()}}
                       for g in b.groups],
            "left_out_unfinishable": list(b.unfinishable),
            "limits": {"B": limits.node_bandwidth, "s": limits.target_startup,
                       "k": limits.per_node, "c": limits.per_cluster,
                       "bandwidthPerMigration": limits.bandwidth_per_migration,
                       "postCopy": limits.post_copy, "autoConverge": limits.auto_converge}}


# -- one run ----------------------------------------------------------------------------------


def _stamps(m: dict[str, Any]) -> dict[str, float]:
    return {t["phase"]: dt.datetime.fromisoformat(
        t["phaseTransitionTimestamp"].replace("Z", "+00:00")).timestamp()
        for t in (m.get("status") or {}).get("phaseTransitionTimestamps") or []}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _downtime_limit_ms(cfg: DrainConfig) -> float:
    spec = (policy_doc(cfg) or {}).get("spec") or {}
    if spec.get("maxDowntime"):
        from virtshift.api.units import parse_duration

        return parse_duration(str(spec["maxDowntime"])) * 1000
    return QEMU_DEFAULT_DOWNTIME * 1000


def residents(kube: KubeClient, nodes: list[str]) -> dict[str, tuple[str, str]]:
    """The VMIs on these nodes now: UID -> (namespace/name, node)."""
    return {v["metadata"]["uid"]: (f"{v['metadata']['namespace']}/{v['metadata']['name']}",
                                   (v.get("status") or {}).get("nodeName"))
            for v in kube.items(rest.VMIS)
            if (v.get("status") or {}).get("nodeName") in nodes}


def left_behind(vmis: list[JSON], before: dict[str, tuple[str, str]],
                left_from: set[tuple[str, str]]) -> tuple[list[str], set[str]]:
    """The VMIs of ``before`` (the drained nodes' VMIs at the start) still on their node, the
    same VMI, without a successful migration off it (``left_from``: (VM, source node) of the
    Succeeded VMIMs); and which of them cannot live-migrate at all. A VM that left and came
    back to a released node is not left behind; nor is one a quick migration restarted."""
    left, unmovable = [], set()
    for v in vmis:
        was = before.get(v["metadata"]["uid"])
        if was is None or (v.get("status") or {}).get("nodeName") != was[1] or was in left_from:
            continue
        left.append(was[0])
        if any(c.get("type") == "LiveMigratable" and c.get("status") == "False"
               for c in (v.get("status") or {}).get("conditions") or []):
            unmovable.add(was[0])
    return sorted(left), unmovable


def cluster_report(kube: KubeClient, cfg: DrainConfig, now_cluster: float, finished: bool,
                   t_start_cluster: float, before: dict[str, tuple[str, str]]
                   ) -> dict[str, Any]:
    """What the cluster's objects say about the drain."""
    vmims = kube.items(rest.VMIMS)
    drained = set(cfg.nodes)
    starts, ends = [], []
    outcomes: Counter[str] = Counter()
    per_vm: Counter[str] = Counter()
    moves: Counter[str] = Counter()
    spans: dict[str, list[float]] = {}  # source node -> [first Pending, last end]
    failed_vms: set[str] = set()
    downtimes: list[tuple[float, str]] = []
    failures: Counter[str] = Counter()
    timeline: list[dict[str, Any]] = []
    for m in vmims:
        st = m.get("status") or {}
        stamps = _stamps(m)
        vm = f"{m['metadata']['namespace']}/{m['spec']['vmiName']}"
        per_vm[vm] += 1
        phase = st.get("phase") or "Pending"
        outcomes[phase] += 1
        if phase == "Succeeded":
            moves[vm] += 1
        elif phase == "Failed":
            failed_vms.add(vm)
        if "Pending" in stamps:
            starts.append(stamps["Pending"])
        end = stamps.get("Succeeded") or stamps.get("Failed")
        if end:
            ends.append(end)
        source = (st.get("migrationState") or {}).get("sourceNode")
        if source in drained and "Pending" in stamps:
            span = spans.setdefault(source, [stamps["Pending"], end or stamps["Pending"]])
            span[0] = min(span[0], stamps["Pending"])
            span[1] = max(span[1], end or span[1])
        if phase == "Failed":
            failures[((st.get("migrationState") or {}).get("failureReason") or "?")[:80]] += 1
        ms = (m["metadata"].get("annotations") or {}).get(DOWNTIME_ANNOTATION)
        if phase == "Succeeded" and ms is not None:
            downtimes.append((float(ms), vm))
        timeline.append({"vm": vm, "source": source,
                         "target": (st.get("migrationState") or {}).get("targetNode"),
                         "created": m["metadata"].get("creationTimestamp"), "stamps": stamps})
    left_from = {(t["vm"], t["source"]) for t in timeline if "Succeeded" in t["stamps"]}
    left, unmovable = left_behind(kube.items(rest.VMIS), before, left_from)
    unfinished = [v for v in left if v not in unmovable]
    all_final = all(((m.get("status") or {}).get("phase") in ("Succeeded", "Failed"))
                    for m in vmims)
    # Done when the cluster says so (every VMIM final, no migratable VM left on the nodes),
    # whatever the harness saw: kubectl drain may still be waiting to retry an eviction.
    done = bool(starts and ends and all_final and not unfinished)
    makespan: float | None = max(ends) - min(starts) if done else None  # None: cut off
    elapsed = now_cluster - (min(starts) if starts else t_start_cluster)
    limit_ms = _downtime_limit_ms(cfg)
    values = [d for d, _ in downtimes]
    worst = max(downtimes) if downtimes else None
    return {
        "finished": done,
        "harness_finished": finished,  # the NodeDrain's phase / kubectl drain's exit status
        "makespan_s": None if makespan is None else round(makespan, 1),
        "elapsed_s": round(elapsed, 1),
        "migrations": len(vmims),
        "succeeded": outcomes.get("Succeeded", 0),
        "failed": outcomes.get("Failed", 0),
        "failure_reasons": dict(failures.most_common(5)),
        # A VM whose migration failed and that got another one.
        "retried": sum(1 for v in failed_vms if per_vm[v] > 1),
        # A VM that moved again (e.g. onto a node the wave drained later).
        "moved_more_than_once": sum(1 for n in moves.values() if n > 1),
        "unfinished_vms": unfinished,
        "not_migratable_left": sorted(set(left) & unmovable),
        "downtime_ms": {
            "p50": _percentile(values, 0.50), "p99": _percentile(values, 0.99),
            "max": worst[0] if worst else None, "max_vm": worst[1] if worst else None,
            "count": len(values), "limit_ms": limit_ms,
            "breaches": sum(1 for v in values if v > limit_ms),
            "source": f"VMIM annotation {DOWNTIME_ANNOTATION} (the simulator's measurement of "
                      "each switch-over), Succeeded VMIMs only",
        },
        # Per drained node, seconds after the first migration: when its first migration was
        # created and its last ended (the gaps between a wave's nodes show up here).
        "per_node_s": {n: [round(a - min(starts), 1), round(b - min(starts), 1)]
                       for n, (a, b) in sorted(spans.items())},
        "makespan_source": "VMIM status.phaseTransitionTimestamps: first Pending to last "
                           "Succeeded/Failed (cluster time)",
        # Each migration's phases, seconds after the first Pending: where a schedule lost time.
        "timeline": sorted(({**t, "stamps": {p: round(v - min(starts), 1)
                                             for p, v in t["stamps"].items()}}
                            for t in timeline), key=lambda t: t["stamps"].get("Pending", 0.0))
        if starts else [],
    }


class Stage:
    """A fresh control plane (audited), the simulator, and optionally the operator."""

    def __init__(self, workdir: Path, scenario: Scenario, log) -> None:  # type: ignore[no-untyped-def]
        self.workdir, self.scenario, self.log = workdir, scenario, log
        self.cp = None
        self.sim = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.watch: ProcWatch | None = None

    def __enter__(self) -> Stage:
        from kubernetes import config

        from virtshift.devenv import crds
        from virtshift.devenv.controlplane import LocalControlPlane
        from virtshift.sim import runner

        self.cp = LocalControlPlane(self.workdir / "cluster", log=lambda _m: None,
                                    audit_policy=audit.POLICY, users=(audit.OPERATOR_USER,))
        self.cp.up()
        try:
            kubevirt, _source = crds.kubevirt_crds()
            crds.apply_crds(config.new_client_from_config(str(self.cp.kubeconfig)),
                            crds.our_crds() + kubevirt)
            self.kube = KubeClient.from_kubeconfig(str(self.cp.kubeconfig))
            self.sim = runner.start(self.kube, self.scenario, log=lambda _m: None)
            want = len(self.scenario.vms)
            deadline = time.monotonic() + 900
            while sum(1 for v in self.kube.items(rest.VMIS)
                      if (v.get("status") or {}).get("phase") == "Running") < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{want} VMIs not Running after 900 s")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_operator(self) -> None:
        from virtshift.sim import runner

        assert self.cp is not None and self.sim is not None
        log = open(self.workdir / "operator.log", "wb")  # noqa: SIM115 - as long as the process
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "virtshift", "run", "--standalone", "--metrics-port", "0",
             "--kubeconfig", str(self.cp.kubeconfig_for(audit.OPERATOR_USER)),
             "--time-scale", str(self.scenario.time_scale),
             "--metrics-source", self.sim.metrics.url,
             "--downtime-source", runner.DOWNTIME_SOURCE],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.watch = ProcWatch(self.operator.pid).start()

    def now(self) -> float:
        """Cluster time, epoch seconds."""
        assert self.sim is not None
        return self.sim.clock.at(self.sim.clock.now()).timestamp()

    def __exit__(self, *_exc: object) -> None:
        if self.watch:
            self.watch.stop()
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(15)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(5)
        if self.sim is not None:
            self.sim.stop()
        if self.cp is not None:
            self.cp.down(quiet=True, grace=5)


def _wall_left(stage: Stage, cfg: DrainConfig, t0_cluster: float) -> float:
    return (cfg.timeout - (stage.now() - t0_cluster)) / stage.scenario.time_scale


def run_virtshift(cfg: DrainConfig, scenario: Scenario, workdir: Path, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    with Stage(workdir, scenario, log) as stage:
        kube = stage.kube
        if (doc := policy_doc(cfg)) is not None:
            kube.create(rest.POLICIES, doc)
        stage.start_operator()
        assert stage.operator is not None and stage.watch is not None
        wall0 = time.time()
        t0 = stage.now()
        if len(cfg.nodes) == 1:
            spec: dict[str, Any] = {"nodeName": cfg.nodes[0]}
        else:
            for n in cfg.nodes:
                kube.patch(rest.NODES, n, {"metadata": {"labels": {WAVE_LABEL: "1"}}})
            # Maintenance is instant, as in the native rolling drain (kubectl drain, then
            # kubectl uncordon at once): each node is released as soon as it has drained.
            spec = {"nodeSelector": {"matchLabels": {WAVE_LABEL: "1"}},
                    "maxUnavailable": cfg.max_unavailable or 1, "releaseAfter": "0s"}
        before = residents(kube, cfg.nodes)
        kube.create(rest.NODE_DRAINS, {"apiVersion": "virtshift.io/v1alpha1",
                                       "kind": "NodeDrain", "metadata": {"name": DRAIN_NAME},
                                       "spec": spec})
        log(f"virtshift: NodeDrain {DRAIN_NAME} {spec}")
        finished = False
        while _wall_left(stage, cfg, t0) > 0:
            if stage.operator.poll() is not None:
                raise RuntimeError(f"the operator exited; see {workdir / 'operator.log'}")
            st = (kube.get(rest.NODE_DRAINS, DRAIN_NAME) or {}).get("status") or {}
            if st.get("phase") in ("Drained", "Stalled"):
                finished = st.get("phase") == "Drained"
                break
            time.sleep(0.05)
        wall = time.time() - wall0
        out = cluster_report(kube, cfg, stage.now(), finished, t0, before)
        out["drain_phase"] = ((kube.get(rest.NODE_DRAINS, DRAIN_NAME) or {}).get("status")
                              or {}).get("phase")
        out["wall_s"] = round(wall, 1)
        out["operator_process"] = stage.watch.report()
        time.sleep(1.5)  # let the audit log catch up with the last requests
        requests = list(audit.read(stage.cp.audit_log))  # type: ignore[union-attr]
        counted = audit.count(requests, user=audit.OPERATOR_USER)
        out["api_requests"] = counted | {
            "per_migration": round(counted["total"] / max(out["migrations"], 1), 1),
            "source": "kube-apiserver audit log, user " + audit.OPERATOR_USER + " (the "
                      "operator's own token), from its start to the end of the drain"}
        return out


def run_native(cfg: DrainConfig, scenario: Scenario, workdir: Path, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from virtshift.devenv import binaries

    kubectl = str(binaries.ensure("kubectl"))
    with Stage(workdir, scenario, log) as stage:
        assert stage.cp is not None
        env = {**os.environ, "KUBECONFIG": str(stage.cp.kubeconfig)}
        wall0 = time.time()
        t0 = stage.now()
        finished = True
        before = residents(stage.kube, cfg.nodes)
        with open(workdir / "kubectl.log", "w") as out_log:
            for group in cfg.groups:
                left = _wall_left(stage, cfg, t0)
                if left <= 0:
                    finished = False
                    break
                log(f"native: kubectl drain {' '.join(group)}")
                try:
                    rc = subprocess.run(
                        [kubectl, "drain", *group, "--ignore-daemonsets",
                         "--delete-emptydir-data", "--force", f"--timeout={int(left) + 1}s"],
                        env=env, stdout=out_log, stderr=subprocess.STDOUT,
                        timeout=left + 30).returncode
                except subprocess.TimeoutExpired:
                    rc = -1
                if rc != 0:
                    finished = False
                    break
                if len(cfg.groups) > 1 and group != cfg.groups[-1]:
                    subprocess.run([kubectl, "uncordon", *group], env=env, stdout=out_log,
                                   stderr=subprocess.STDOUT, check=False)
        # Let what KubeVirt still has in flight end (a cut-off drain leaves some).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                (m.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                for m in stage.kube.items(rest.VMIMS)) and finished:
            time.sleep(0.2)
        wall = time.time() - wall0
        out = cluster_report(stage.kube, cfg, stage.now(), finished, t0, before)
        out["wall_s"] = round(wall, 1)
        time.sleep(1.5)
        requests = list(audit.read(stage.cp.audit_log))
        counted = audit.count(requests, agent_prefix="kubectl")
        out["api_requests"] = counted | {
            "per_migration": round(counted["total"] / max(out["migrations"], 1), 1),
            "source": "kube-apiserver audit log, kubectl's requests (user agent kubectl/); "
                      "KubeVirt's own controllers are not counted"}
        return out


def run(cfg: DrainConfig, workdir: Path, baseline: str | None = None,
        log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    scenario = cfg.load()
    result: dict[str, Any] = {
        "label": cfg.label or f"{cfg.scenario.stem} {','.join(cfg.nodes)}",
        "scenario": {"file": str(cfg.scenario), "seed": scenario.seed,
                     "timeScale": scenario.time_scale, "vms": len(scenario.vms),
                     "nodes": len(scenario.nodes), "excluded": cfg.exclude,
                     "drained": cfg.nodes,
                     "vms_on_drained": sum(1 for v in scenario.vms if v.node in cfg.nodes),
                     "maxUnavailable": (cfg.max_unavailable or 1) if len(cfg.nodes) > 1
                     else None,
                     "policy": str(cfg.policy) if cfg.policy else None},
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lower_bound": bound_for(cfg, scenario),
    }
    log(f"[{result['label']}] lower bound {result['lower_bound']['seconds']} s")
    vs = run_virtshift(cfg, scenario, workdir / "virtshift", log)
    result["virtshift"] = vs
    lb = result["lower_bound"]["seconds"]
    span = vs["makespan_s"] if vs["makespan_s"] is not None else vs["elapsed_s"]
    result["makespan_s"] = vs["makespan_s"]
    result["lower_bound_s"] = lb
    result["ratio"] = round(span / lb, 3) if lb else None
    log(f"[{result['label']}] virtshift: makespan {vs['makespan_s']} s, ratio {result['ratio']}")
    if baseline == "native":
        nat = run_native(cfg, scenario, workdir / "native", log)
        result["native"] = nat
        nspan = nat["makespan_s"] if nat["makespan_s"] is not None else nat["elapsed_s"]
        result["speedup"] = round(nspan / span, 3) if span else None
        # Cut off before it finished: the native run took at least that long.
        result["speedup_is_lower_bound"] = nat["makespan_s"] is None
        result["native_unfinished_vms"] = nat["unfinished_vms"]
        log(f"[{result['label']}] native: makespan {nat['makespan_s']} s "
            f"(elapsed {nat['elapsed_s']} s, unfinished {len(nat['unfinished_vms'])}); "
            f"speedup {result['speedup']}")
    return result
