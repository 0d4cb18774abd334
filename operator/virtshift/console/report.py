"""``virtshift report NODEDRAIN --html FILE``: one self-contained HTML file (inline CSS and
SVG, no scripts, nothing fetched) about a drain, from the cluster's objects:

* a timeline: one row per VM, one bar per migration attempt (VMIM phaseTransitionTimestamps,
  Pending to Succeeded/Failed), coloured by outcome;
* the downtime distribution: observed (status ``observedDowntimeMs``, with its source) and,
  separately and labelled so, the planner's predictions (``predictedDowntimeMs``);
* bytes moved per node (guest memory of VMs that moved, out of each source, into each target);
* the plan against what happened: the ETA and blockers of a plan saved before the drain
  (``virtshift plan --json``, given as ``--plan``) against the real makespan and blockers, and
  each VM's predictions against its attempts' real duration and observed downtime.
"""

from __future__ import annotations

import datetime as dt
import html
from collections import defaultdict
from collections.abc import Sequence

from virtshift.console import observe
from virtshift.console.terminal import seconds, size
from virtshift.k8s.rest import JSON

COLOURS = {"succeeded": "#2e9d4f", "failed": "#d23c3c", "aborted": "#e8962e",
           "in-flight": "#3b7dd8"}
ROW_H, LEFT, WIDTH = 16, 190, 1000
CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #ddd;
text-align:left} th{background:#f3f3f3} .num{text-align:right}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.kpi{display:inline-block;margin-right:28px} .kpi b{font-size:18px;display:block}
.note{color:#666}
"""


def _esc(s: object) -> str:
    return html.escape(str(s))


def timeline_svg(vms: Sequence[observe.VMHistory], t0: dt.datetime, t1: dt.datetime) -> str:
    span = max((t1 - t0).total_seconds(), 1.0)
    scale = (WIDTH - LEFT - 10) / span
    rows = [h for h in vms if h.attempts]
    height = ROW_H * len(rows) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-size="10" role="img" aria-label="migration timeline">']
    step = _tick(span)
    t = 0.0
    while t <= span:
        x = LEFT + t * scale
        out.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 20}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" '
                   f'fill="#666">{seconds(t)}</text>')
        t += step
    for i, h in enumerate(rows):
        y = i * ROW_H
        out.append(f'<text x="{LEFT - 6}" y="{y + 11}" text-anchor="end">{_esc(h.key)}</text>')
        for a in h.attempts:
            if a.start is None:
                continue
            end = a.end or t1
            x = LEFT + (a.start - t0).total_seconds() * scale
            w = max((end - a.start).total_seconds() * scale, 2.0)
            title = (f"{h.key} attempt {a.attempt}: {a.outcome}, "
                     f"{seconds((end - a.start).total_seconds())}, {a.source} -> {a.target}"
                     + (f", {a.failure}" if a.failure else ""))
            out.append(f'<rect class="bar {a.outcome}" x="{x:.1f}" y="{y + 2}" '
                       f'width="{w:.1f}" height="{ROW_H - 4}" rx="2" '
                       f'fill="{COLOURS[a.outcome]}"><title>{_esc(title)}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _tick(span: float) -> float:
    for step in (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400):
        if span / step <= 12:
            return float(step)
    return span / 10


BUCKETS_MS = (0, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000)


def histogram_svg(values: Sequence[int], colour: str, label: str) -> str:
    counts = [0] * len(BUCKETS_MS)
    for v in values:
        i = max(i for i, lo in enumerate(BUCKETS_MS) if v >= lo)
        counts[i] += 1
    top = max(counts) or 1
    bw, h = 60, 140
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{bw * len(counts) + 40}" '
           f'height="{h + 40}" font-size="10" role="img" aria-label="{_esc(label)}">']
    for i, (lo, n) in enumerate(zip(BUCKETS_MS, counts, strict=True)):
        bh = h * n / top
        x = 20 + i * bw
        hi = BUCKETS_MS[i + 1] if i + 1 < len(BUCKETS_MS) else None
        out.append(f'<rect class="hbar" x="{x + 4}" y="{h - bh + 10:.1f}" width="{bw - 8}" '
                   f'height="{bh:.1f}" fill="{colour}"><title>{n}</title></rect>')
        out.append(f'<text x="{x + bw / 2}" y="{h - bh + 6:.1f}" text-anchor="middle">'
                   f'{n or ""}</text>')
        out.append(f'<text x="{x + bw / 2}" y="{h + 24}" text-anchor="middle">'
                   f'{lo}{"-" + str(hi) if hi else "+"} ms</text>')
    out.append("</svg>")
    return "".join(out)


def bytes_table(vms: Sequence[observe.VMHistory]) -> str:
    out_of: dict[str, float] = defaultdict(float)
    into: dict[str, float] = defaultdict(float)
    for h in vms:
        done = [a for a in h.attempts if a.phase == "Succeeded"]
        if done:
            out_of[done[-1].source or "?"] += h.memory
            into[done[-1].target or "?"] += h.memory
    nodes = sorted(set(out_of) | set(into))
    rows = "".join(f"<tr><td>{_esc(n)}</td><td class=num>{size(out_of.get(n))}</td>"
                   f"<td class=num>{size(into.get(n))}</td></tr>" for n in nodes)
    return ("<table><tr><th>node</th><th>moved out</th><th>moved in</th></tr>"
            f"{rows}</table>")


def render(drain: JSON, vms: Sequence[observe.VMHistory], plan: JSON | None = None) -> str:
    name = drain["metadata"]["name"]
    st = drain.get("status") or {}
    attempts = [a for h in vms for a in h.attempts]
    starts = [a.start for a in attempts if a.start]
    ends = [a.end for a in attempts if a.end]
    t0 = min(starts) if starts else dt.datetime.now(dt.UTC)
    t1 = max([*ends, *starts]) if starts else t0
    makespan = (max(ends) - t0).total_seconds() if ends else None
    outcomes = defaultdict(int)
    for a in attempts:
        outcomes[a.outcome] += 1
    observed = [h.entry["observedDowntimeMs"] for h in vms
                if h.entry.get("observedDowntimeMs") is not None]
    sources = sorted({h.entry.get("downtimeSource") for h in vms
                      if h.entry.get("observedDowntimeMs") is not None} - {None})
    predicted = [h.entry["predictedDowntimeMs"] for h in vms
                 if h.entry.get("predictedDowntimeMs") is not None
                 and h.entry.get("phase") == "Succeeded"]
    legend = "".join(f'<span><i style="background:{c}"></i>{k} ({outcomes.get(k, 0)})</span>'
                     for k, c in COLOURS.items())
    planned = (plan or {}).get("status", {}).get("plannedSeconds")
    plan_blockers = sorted({f"{v['namespace']}/{v['name']}: {v.get('reason')}"
                            for v in (plan or {}).get("status", {}).get("vms") or []
                            if v.get("phase") == "Failed"})
    real_blockers = sorted({f"{v['namespace']}/{v['name']}: {v.get('reason')}"
                            for v in st.get("vms") or [] if v.get("phase") == "Failed"})
    kpis = [("phase", st.get("phase", "-")), ("VMs", st.get("progress", "-")),
            ("attempts", len(attempts)), ("makespan", seconds(makespan)),
            ("planned (ETA)", seconds(planned) if planned is not None else "no plan given"),
            ("moved", size(st.get("bytesMoved")))]
    rows = []
    for h in vms:
        last = h.attempts[-1] if h.attempts else None
        took = ((last.end - last.start).total_seconds()
                if last and last.end and last.start else None)
        e = h.entry
        rows.append(
            f"<tr><td>{_esc(h.key)}</td><td>{_esc(e.get('phase', '-'))}</td>"
            f"<td>{_esc(e.get('reason') or '')}</td><td class=num>{len(h.attempts)}</td>"
            f"<td class=num>{seconds(e.get('predictedSeconds'))}</td>"
            f"<td class=num>{seconds(took)}</td>"
            f"<td class=num>{_ms(e.get('predictedDowntimeMs'))}</td>"
            f"<td class=num>{_ms(e.get('observedDowntimeMs'))}</td></tr>")
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>virtshift report: "
        f"{_esc(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>NodeDrain {_esc(name)}</h1>",
        f"<p class=note>target {_esc((drain.get('spec') or {}).get('nodeName') or 'wave')}; "
        f"started {_esc(st.get('startTime', '-'))}, completed "
        f"{_esc(st.get('completionTime', '-'))} (cluster time). Read from the cluster's "
        "objects: VirtualMachineInstanceMigrations, VMIs and the NodeDrain's status.</p>",
        "<div>" + "".join(f'<div class=kpi>{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in kpis)
        + "</div>",
        "<h2>Timeline: one row per VM, one bar per migration attempt</h2>",
        f"<div class=legend>{legend}</div>",
        timeline_svg(vms, t0, t1),
        f"<h2>Downtime: observed ({len(observed)} moves; source "
        f"{_esc(', '.join(sources) or 'none configured')})</h2>",
        histogram_svg(observed, "#7b4fc9", "observed downtime") if observed else
        "<p class=note>No observed downtimes: the operator ran without --downtime-source."
        "</p>",
        f"<h2>Downtime: predicted by the planner ({len(predicted)} moves; a prediction, "
        "not a measurement)</h2>",
        histogram_svg(predicted, "#9bb0c8", "predicted downtime"),
        "<h2>Bytes moved per node</h2>", bytes_table(vms),
        "<h2>Plan against what happened</h2>",
        f"<p>ETA planned {seconds(planned)}; real makespan {seconds(makespan)}"
        + (f" ({(planned - makespan) / makespan:+.0%})" if planned and makespan else "")
        + ".</p>",
        f"<p>blockers planned: {_esc('; '.join(plan_blockers) or '-')}<br>"
        f"blockers met: {_esc('; '.join(real_blockers) or '-')}</p>" if plan else "",
        "<table><tr><th>VM</th><th>phase</th><th>reason</th><th>attempts</th>"
        "<th>predicted time</th><th>real time (last attempt)</th>"
        "<th>predicted downtime</th><th>observed downtime</th></tr>"
        + "".join(rows) + "</table>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _ms(v: int | None) -> str:
    return "-" if v is None else f"{v} ms"
