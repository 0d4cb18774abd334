"""`virtshift bench drain` end to end on the small scenario: virtshift and kubectl drain, each on
its own fresh control plane and simulator; the JSON carries every field, with sane values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from virtshift.devenv import binaries

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "examples" / "scenarios" / "small.yaml"


def test_bench_drain_small_against_native(tmp_path) -> None:
    for name in ("etcd", "kube-apiserver", "kubectl"):
        binaries.ensure(name)
    out = tmp_path / "small.json"
    doc = tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "virtshift", "bench", "drain", "--scenario", str(SMALL),
         "--nodes", "node-1", "--baseline", "native", "--json", str(out), "--timeout", "600"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    vs, nat = r["virtshift"], r["native"]
    # node-1 holds db-1, web-1 and web-4: all of them move, in both runs.
    for run in (vs, nat):
        assert run["finished"] and not run["unfinished_vms"]
        assert run["succeeded"] == 3 and run["failed"] == 0 and run["retried"] == 0
        assert run["makespan_s"] > 0
        d = run["downtime_ms"]
        assert d["count"] == 3 and 0 < d["p50"] <= d["p99"] <= d["max"] <= d["limit_ms"]
        assert d["breaches"] == 0 and "sim.virtshift.io/downtime-ms" in d["source"]
        assert run["api_requests"]["total"] > 0 and "audit" in run["api_requests"]["source"]
    # Nobody beats the bound; the ratio and speedup are what the makespans say.
    assert 0 < r["lower_bound_s"] <= min(vs["makespan_s"], nat["makespan_s"])
    assert r["ratio"] == round(vs["makespan_s"] / r["lower_bound_s"], 3)
    assert r["speedup"] == round(nat["makespan_s"] / vs["makespan_s"], 3)
    assert r["native_unfinished_vms"] == [] and not r["speedup_is_lower_bound"]
    # The operator's requests come from its own token user; kubectl's from its user agent.
    assert vs["api_requests"]["by_resource"].get("virtualmachineinstancemigrations", 0) >= 3
    assert nat["api_requests"]["by_resource"].get("pods/eviction", 0) >= 3
    proc_stats = vs["operator_process"]
    assert proc_stats["cpu_s"] > 0 and 20 < proc_stats["peak_rss_mib"] < 1024
    # The report renders from it.
    subprocess.run([sys.executable, "-m", "virtshift", "bench", "report", str(out), "--out",
                    str(doc)], check=True, cwd=REPO, capture_output=True)
    text = doc.read_text()
    assert "## small node-1" in text and "LB(group)" in text
