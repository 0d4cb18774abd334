"""Benchmark the KubeVirt simulator on examples/scenarios/large.yaml (50 nodes, 2000 VMs).

Starts a local control plane (etcd + kube-apiserver, KubeVirt's CRDs), runs
``python -m virtshift sim`` as a subprocess so its CPU time and memory are its own, waits until
all 2000 VMIs are Running (populate time), then creates 200 VMIMs at once for VMs spread over
several nodes and waits until every one is final. Reports populate time, makespan (wall and
simulated, from the VMIMs' phaseTransitionTimestamps), the peak number of in-flight VMIMs seen
by sampling, and the simulator process's CPU seconds and peak RSS.

    python benchmarks/bench_sim.py [--scenario FILE] [--migrations 200] [--nodes 20]

Results are printed as a table and written to benchmarks/results/bench_sim.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import config

from virtshift.api.kubevirt import FINAL_PHASES, IN_FLIGHT_PHASES
from virtshift.devenv import crds
from virtshift.devenv.controlplane import LocalControlPlane
from virtshift.k8s import rest
from virtshift.k8s.rest import KubeClient
from virtshift.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_sim.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the simulator process, from /proc ------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process."""
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime (14, 15)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


# -- waiting and sampling ---------------------------------------------------------------------


def wait_until(predicate, timeout: float, every: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the simulator exited with {proc.returncode} while waiting for "
                             f"{what}")
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def running_vmis(kube: KubeClient) -> list[dict[str, Any]]:
    return [v for v in kube.items(rest.VMIS)
            if (v.get("status") or {}).get("phase") == "Running"]


class Sampler(threading.Thread):
    """Lists the benchmark's VMIMs every `every` seconds; remembers the most in flight."""

    def __init__(self, kube: KubeClient, label: str, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.kube, self.label, self.every = kube, label, every
        self.peak = 0
        self.samples = 0
        self.final: list[dict[str, Any]] = []
        self.total = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            items = self.kube.items(rest.VMIMS, label_selector=self.label)
            phases = [(o.get("status") or {}).get("phase") for o in items]
            self.peak = max(self.peak, sum(p in IN_FLIGHT_PHASES for p in phases))
            self.samples += 1
            self.total = len(items)
            self.final = [o for o, p in zip(items, phases, strict=True) if p in FINAL_PHASES]
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def stamp_seconds(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.UTC).timestamp()


def pick_vms(vmis: list[dict[str, Any]], count: int, nodes: int) -> list[dict[str, Any]]:
    """`count` VMIs from the first `nodes` nodes (by name order), the same number per node."""
    by_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in sorted(vmis, key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"])):
        by_node[v["status"]["nodeName"]].append(v)
    chosen_nodes = sorted(by_node, key=lambda n: (len(n), n))[:nodes]
    picked: list[dict[str, Any]] = []
    while len(picked) < count:
        before = len(picked)
        for node in chosen_nodes:
            if by_node[node] and len(picked) < count:
                picked.append(by_node[node].pop(0))
        if len(picked) == before:
            raise SystemExit(f"only {len(picked)} VMs on {nodes} nodes, {count} wanted")
    return picked


# -- the run ------------------------------------------------------------------------------------


def run(scenario_path: Path, migrations: int, nodes: int, workdir: Path) -> dict[str, Any]:
    scenario = load_scenario(scenario_path)
    expected = len(scenario.vms)
    cp = LocalControlPlane(workdir / "controlplane", log=lambda _m: None)
    t0 = time.monotonic()
    cp.up()
    try:
        api = config.new_client_from_config(str(cp.kubeconfig))
        kubevirt, source = crds.kubevirt_crds()
        crds.apply_crds(api, crds.our_crds() + kubevirt)
        kube = KubeClient.from_kubeconfig(str(cp.kubeconfig))
        print(f"control plane up in {time.monotonic() - t0:.1f}s (KubeVirt CRDs: {source})")

        log_path = workdir / "sim.log"
        with open(log_path, "w") as sim_log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "virtshift", "sim", "--scenario", str(scenario_path),
                 "--kubeconfig", str(cp.kubeconfig)],
                stdout=sim_log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            return measure(kube, proc, started, expected, migrations, nodes, scenario)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                print(f"simulator exited with {proc.returncode}; log: {log_path}",
                      file=sys.stderr)
                print(log_path.read_text()[-3000:], file=sys.stderr)
    finally:
        cp.down(quiet=True, grace=5)


def measure(kube: KubeClient, proc: subprocess.Popen, started: float, expected: int,
            migrations: int, nodes: int, scenario: Any) -> dict[str, Any]:
    vmis = wait_until(lambda: (r := running_vmis(kube)) and len(r) >= expected and r,
                      timeout=900, every=1.0, what=f"{expected} Running VMIs", proc=proc)
    populate_wall = time.monotonic() - started
    user_p, sys_p = cpu_seconds(proc.pid)
    rss_populate = peak_rss_mib(proc.pid)
    print(f"{len(vmis)} VMIs Running after {populate_wall:.1f}s")

    picked = pick_vms(vmis, migrations, nodes)
    label = "bench.virtshift.io/run"
    run_id = str(int(time.time()))
    sampler = Sampler(kube, f"{label}={run_id}")
    sampler.start()

    def create(v: dict[str, Any]) -> None:
        meta = v["metadata"]
        kube.create(rest.VMIMS, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": f"bench-{meta['name']}", "namespace": meta["namespace"],
                         "labels": {label: run_id}},
            "spec": {"vmiName": meta["name"]}})

    t_create = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(create, picked))
    created_wall = time.monotonic() - t_create
    try:
        wait_until(lambda: sampler.samples and len(sampler.final) == migrations,
                   timeout=900, every=0.2, what=f"{migrations} final VMIMs", proc=proc)
    finally:
        sampler.stop()
    makespan_wall = time.monotonic() - t_create
    user, system = cpu_seconds(proc.pid)
    rss = peak_rss_mib(proc.pid)

    done = kube.items(rest.VMIMS, label_selector=f"{label}={run_id}")
    outcomes = Counter(o["status"]["phase"] for o in done)
    failures = Counter(o["status"].get("migrationState", {}).get("failureReason", "?")[:80]
                       for o in done if o["status"]["phase"] == "Failed")
    stamps = [(t["phase"], stamp_seconds(t["phaseTransitionTimestamp"]))
              for o in done for t in o["status"].get("phaseTransitionTimestamps") or []]
    first = min(s for p, s in stamps if p == "Pending")
    last = max(s for p, s in stamps if p in FINAL_PHASES)
    durations = sorted(
        stamp_seconds(o["status"]["migrationState"]["endTimestamp"]) -
        stamp_seconds(o["status"]["migrationState"]["startTimestamp"])
        for o in done if o["status"]["phase"] == "Succeeded"
        and "startTimestamp" in o["status"].get("migrationState", {}))
    sources = {v["status"]["nodeName"] for v in picked}
    return {
        "scenario": {"nodes": len(scenario.nodes), "vms": expected,
                     "timeScale": scenario.time_scale,
                     "parallelMigrationsPerCluster":
                         scenario.kubevirt.parallel_migrations_per_cluster,
                     "parallelOutboundMigrationsPerNode":
                         scenario.kubevirt.parallel_outbound_migrations_per_node},
        "populate": {"wall_s": round(populate_wall, 2),
                     "sim_cpu_s": round(user_p + sys_p, 2),
                     "sim_peak_rss_mib": round(rss_populate, 1)},
        "migrations": {"count": migrations, "source_nodes": len(sources),
                       "create_wall_s": round(created_wall, 2),
                       "outcomes": dict(outcomes),
                       "failure_reasons": dict(failures.most_common(5)),
                       "makespan_wall_s": round(makespan_wall, 2),
                       "makespan_sim_s": round(last - first, 1),
                       "peak_in_flight": sampler.peak,
                       "samples": sampler.samples,
                       "transfer_s_median": durations[len(durations) // 2] if durations else None,
                       "transfer_s_max": durations[-1] if durations else None},
        "simulator_process": {"cpu_user_s": round(user, 2), "cpu_sys_s": round(system, 2),
                              "cpu_total_s": round(user + system, 2),
                              "peak_rss_mib": round(rss, 1)},
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }


def table(r: dict[str, Any]) -> str:
    p, m, s = r["populate"], r["migrations"], r["simulator_process"]
    rows = [
        ("scenario", f"{r['scenario']['nodes']} nodes, {r['scenario']['vms']} VMs, "
                     f"timeScale {r['scenario']['timeScale']:g}, limits "
                     f"{r['scenario']['parallelMigrationsPerCluster']}/cluster "
                     f"{r['scenario']['parallelOutboundMigrationsPerNode']}/node"),
        ("populate (all VMIs Running)", f"{p['wall_s']:.1f} s wall"),
        ("migrations", f"{m['count']} from {m['source_nodes']} nodes: " +
         ", ".join(f"{v} {k}" for k, v in sorted(m["outcomes"].items()))),
        *((("failures", f"{n} x {reason}") for reason, n in m["failure_reasons"].items())),
        ("makespan", f"{m['makespan_wall_s']:.1f} s wall, {m['makespan_sim_s']:.0f} s simulated"),
        ("peak in-flight VMIMs", f"{m['peak_in_flight']} (over {m['samples']} samples)"),
        ("transfer time", f"median {m['transfer_s_median']} s, max {m['transfer_s_max']} s "
                          "simulated"),
        ("simulator CPU", f"{s['cpu_total_s']:.1f} s (user {s['cpu_user_s']:.1f}, sys "
                          f"{s['cpu_sys_s']:.1f}); {p['sim_cpu_s']:.1f} s of it populating"),
        ("simulator peak RSS", f"{s['peak_rss_mib']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=REPO / "examples/scenarios/large.yaml")
    ap.add_argument("--migrations", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=20, help="source nodes to spread them over")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        result = run(args.scenario.resolve(), args.migrations, args.nodes, Path(tmp))
    print()
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
