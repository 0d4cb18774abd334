"""docs/benchmarks.md, written from the JSON results of ``virtshift bench`` (never by hand)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
from pathlib import Path
from typing import Any

from virtshift.bench.bound import FORMULA


def _n(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    return f"{v}{unit}"


def _span(run: dict[str, Any]) -> str:
    if run["makespan_s"] is not None:
        return _n(run["makespan_s"], " s")
    return f">= {_n(run['elapsed_s'], ' s')} (cut off)"


def _dt(run: dict[str, Any]) -> str:
    d = run["downtime_ms"]
    if d["p50"] is None:
        return "-"
    return f"{d['p50']:.0f} / {d['p99']:.0f} / {d['max']:.0f} ms"


def drain_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, virtshift, native) rows of one run."""
    vs, nat = r["virtshift"], r.get("native")

    def both(f) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        return f(vs), (f(nat) if nat else "-")

    def api(run: dict[str, Any]) -> str:
        a = run["api_requests"]
        return f"{a['total']} ({a['per_migration']} per migration)"

    def proc(run: dict[str, Any]) -> str:
        p = run.get("operator_process")
        return f"{p['cpu_s']} s CPU, {p['peak_rss_mib']:.0f} MiB peak RSS" if p else "-"

    rows = [
        ("makespan (cluster time)", *both(_span)),
        ("lower bound", _n(r["lower_bound_s"], " s"), ""),
        ("ratio (makespan / bound)", _n(r["ratio"]), _n(
            (nat["makespan_s"] or nat["elapsed_s"]) / r["lower_bound_s"])
            if nat and r["lower_bound_s"] else "-"),
        ("speedup (native / virtshift)", ((">= " if r.get("speedup_is_lower_bound") else "")
                                          + _n(r.get("speedup"))) if nat else "-", ""),
        ("migrations (succeeded / failed)",
         *both(lambda x: f"{x['migrations']} ({x['succeeded']} / {x['failed']})")),
        ("VMs retried after a failure", *both(lambda x: str(x["retried"]))),
        # "-": a result from before this was counted.
        ("VMs moved more than once", *both(lambda x: str(x.get("moved_more_than_once", "-")))),
        ("unfinished VMs", *both(lambda x: str(len(x["unfinished_vms"])))),
        ("downtime p50 / p99 / max", *both(_dt)),
        ("downtime-limit breaches", *both(
            lambda x: f"{x['downtime_ms']['breaches']} (> {x['downtime_ms']['limit_ms']:.0f} ms)")),
        ("API requests (audit log)", *both(api)),
        ("operator process", *both(proc)),
        ("wall time of the drain", *both(lambda x: _n(x["wall_s"], " s"))),
    ]
    k = (r["lower_bound"].get("limits") or {}).get("k")
    if k and vs.get("timeline"):
        rows.insert(3, ("outbound slots idle while VMs waited", *both(
            lambda x: _n(idle_slots(x.get("timeline") or [], x["per_node_s"], k),
                         " slot-s"))))
    return rows


def idle_slots(timeline: list[dict[str, Any]], spans: dict[str, list[float]], k: int
               ) -> float:
    """Slot-seconds a drained node's outbound slots (k) stood empty while some of its VMs had
    not started moving, within its span: where a schedule loses time against the bound
    (start-up and transfers fill the slots; this is everything else: reaction time, a queue
    run dry). From the VMIMs' own phase timestamps."""
    idle = 0.0
    for node, (begin, end) in spans.items():
        moves = [(t["stamps"].get("Scheduling"),
                  t["stamps"].get("Succeeded") or t["stamps"].get("Failed"))
                 for t in timeline if t["source"] == node]
        moves = [(a if a is not None else end, b if b is not None else end) for a, b in moves]
        points = sorted({begin, end, *(p for m in moves for p in m if begin <= p <= end)})
        for t0, t1 in itertools.pairwise(points):
            running = sum(1 for a, b in moves if a <= t0 < b)
            waiting = sum(1 for a, _b in moves if a > t0)
            idle += (t1 - t0) * max(0, min(k - running, waiting))
    return round(idle, 1)


def drain_table(r: dict[str, Any]) -> str:
    rows = [("", "virtshift", "native" if r.get("native") else ""), *drain_rows(r)]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    head = f"{r['label']} (run {r.get('run', 1)}, {r['scenario']['timeScale']:g}x)"
    return "\n".join([head] + [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows])


def scale_table(r: dict[str, Any]) -> str:
    rows = scale_rows(r)
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b}  (target {t})" for a, b, t in rows)


def scale_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    idle, wave = r["idle"], r["wave"]
    lat = wave["event_to_decision_s"]
    return [
        ("VMIs / nodes", f"{r['vmis']} / {r['nodes']}", "5000 / 100"),
        ("RSS idle (peak so far)", f"{idle['rss_mib']:.0f} MiB ({idle['peak_rss_mib']:.0f})",
         "<= 256 MiB"),
        ("RSS after the wave (peak)", f"{wave['rss_mib']:.0f} MiB ({wave['peak_rss_mib']:.0f})",
         "<= 256 MiB"),
        ("idle CPU", f"{idle['cpu_percent']:.2f}% of a core ({idle['cpu_s']} s over "
         f"{idle['seconds']:.0f} s)" + _settled(r), "<= 1%"),
        ("idle API requests per minute", _n(idle["api_requests_per_minute"]), "-"),
        ("event-to-decision p50 / p99", f"{_n(lat['p50'])} / {_n(lat['p99'])} s "
         f"({lat['count']} events)", "p99 <= 1 s"),
        ("API requests per migration (wave)",
         f"{wave['api_requests']['per_migration']} ({wave['api_requests']['total']} for "
         f"{wave['migrations']} migrations)", "<= 8"),
        ("CPU during the wave", f"{wave['cpu_s']} s over {wave['wall_s']} s wall", "-"),
    ]


def _settled(r: dict[str, Any]) -> str:
    st = r.get("startup") or {}
    if st.get("settled", True) is False:  # results from before the field: no remark
        return (f"; the operator was still busy {st['settle_wall_s']:.0f} s after start "
                "(under 5% of a core over 5 s never happened), measured anyway")
    return ""


def _machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}; load average when written: {load}")


def render(results: list[dict[str, Any]]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `virtshift bench report` (run by `make bench`); do not edit. -->",
        "",
        f"Written {now} on {_machine()}.",
        "",
        "Each drain configuration runs virtshift (a NodeDrain) and KubeVirt alone (`kubectl "
        "drain`, virt-api's eviction webhook answering 429 and the evacuation controller "
        "migrating) on a fresh local control plane and simulator built from the same scenario "
        "and seed. A rolling wave's maintenance is instant on both sides: `kubectl uncordon` "
        "as soon as `kubectl drain` of a node returns, and a NodeDrain with `releaseAfter: 0s`. "
        "Every number comes from the cluster: makespan from the VMIMs' "
        "`phaseTransitionTimestamps` (first Pending to last Succeeded/Failed, cluster time), "
        "downtime from the simulator's `sim.virtshift.io/downtime-ms` annotation on each "
        "VMIM, API requests from the kube-apiserver audit log (the operator runs with its own "
        "token user), CPU and RSS from /proc of the operator process. A run cut off by its "
        "timeout shows `>=` the time it had taken.",
        "",
        "## The lower bound",
        "",
        "For every VM i: b_i = min(B, bandwidthPerMigration), T_i the pre-copy model's transfer "
        "time of i alone at b_i (post-copy / auto-converge as the KubeVirt CR or the policy "
        "allow, switching at the earliest point the model allows), X_i the bytes it sends "
        "then; s = target pod start-up, B = node NIC, k = parallelOutboundMigrationsPerNode, "
        "c = parallelMigrationsPerCluster, V_n the VMs of node n:",
        "",
        "```",
        FORMULA.replace("; ", "\n"),
        "```",
        "",
        "Sharing a NIC only lowers a migration's bandwidth, which never shortens it nor lowers "
        "its bytes; KubeVirt holds a slot from Scheduling on, so for s + T_i at least. VMs that "
        "could never finish under these limits are left out. `ratio` = makespan / bound.",
        "",
    ]
    drains = [r for r in results if "virtshift" in r]
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in drains:
        by_label.setdefault(r["label"], []).append(r)
    for label, runs in by_label.items():
        first = runs[0]
        sc = first["scenario"]
        out += [f"## {label}", "",
                f"`{Path(sc['file']).name}` (seed {sc['seed']}, {sc['timeScale']:g}x), "
                f"{sc['vms']} VMs on {sc['nodes']} nodes"
                + (f", without {', '.join(sc['excluded'])}" if sc["excluded"] else "")
                + f"; drained: {', '.join(sc['drained'])} ({sc['vms_on_drained']} VMs)"
                + (f", maxUnavailable {sc['maxUnavailable']}" if sc.get("maxUnavailable")
                   else "")
                + (f"; virtshift policy `{Path(sc['policy']).name}`" if sc.get("policy")
                   else "") + ". Bound: "
                + "; ".join(f"{', '.join(g['nodes'])}: {g['seconds']} s ({g['binding']})"
                            for g in first["lower_bound"]["groups"]) + ".", ""]
        if first.get("command"):
            when = f"Measured {first['when']} with" if first.get("when") else "Measured with"
            out += [f"{when} `{first['command']}`.", ""]
        head = "| |" + "|".join(f" run {r.get('run', i + 1)}: virtshift | native "
                                for i, r in enumerate(runs)) + "|"
        out += [head, "|---" * (1 + 2 * len(runs)) + "|"]
        rows = [drain_rows(r) for r in runs]
        for j, (what, *_rest) in enumerate(rows[0]):
            out.append(f"| {what} |" + "|".join(f" {rr[j][1]} | {rr[j][2]} " for rr in rows)
                       + "|")
        for r in runs:
            nat = r.get("native")
            if nat and nat["unfinished_vms"]:
                out.append("")
                out.append(f"Run {r.get('run', 1)}: native left {len(nat['unfinished_vms'])} "
                           f"VMs unfinished: {', '.join(nat['unfinished_vms'][:12])}"
                           + (" ..." if len(nat["unfinished_vms"]) > 12 else ""))
        out.append("")
    for r in (x for x in results if "idle" in x):
        out += [f"## Scale: {r['vmis']} VMIs on {r['nodes']} nodes", "",
                f"Measured {r['when']}; the wave drains {r['wave']['nodes']} node(s) at "
                f"{r['timeScale']:g}x. Event-to-decision: "
                f"{r['wave']['event_to_decision_s']['source']}.",
                "", *([f"Measured with `{r['command']}`.", ""] if r.get("command") else []),
                "| | measured | target |", "|---|---|---|"]
        out += [f"| {a} | {b} | {t} |" for a, b, t in scale_rows(r)]
        out.append("")
    return "\n".join(out)


def write(paths: list[str], out: Path) -> None:
    results: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        results += data if isinstance(data, list) else [data]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
