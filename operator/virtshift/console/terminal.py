"""``virtshift plan`` and ``virtshift status``, drawn with rich."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from virtshift.console import observe
from virtshift.k8s import rest
from virtshift.k8s.rest import JSON, KubeClient

PHASE_STYLE = {"Succeeded": "green", "Failed": "red", "Skipped": "yellow", "Pending": "cyan",
               "Waiting": "magenta", "Migrating": "blue", "Drained": "green",
               "Stalled": "red", "Draining": "blue", "Planned": "cyan", "Paused": "yellow",
               "Conflict": "red", "Terminating": "yellow"}


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = round(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def action_of(vm: JSON) -> str:
    """What the plan does with a VM, in a word."""
    phase = vm.get("phase")
    if phase == "Failed":
        return "blocked"
    if phase == "Skipped":
        return "skip"
    if phase == "Succeeded":
        return "done"
    return vm.get("mode") or "LiveMigration"


# -- plan ------------------------------------------------------------------------------------


def plan_view(plan: observe.Plan, target: str) -> RenderableType:
    status = plan.status.wire()
    vms = status.get("vms") or []
    table = Table(title=f"Drain plan for {target} (dry run: nothing changes)",
                  box=box.SIMPLE_HEAVY, expand=False)
    for col, kw in (("VM", {}), ("action", {}), ("candidates", {"max_width": 40}),
                    ("predicted", {"justify": "right"}),
                    ("downtime (pred.)", {"justify": "right"}), ("blocker / why", {})):
        table.add_column(col, **kw)
    for vm in vms:
        act = action_of(vm)
        why = vm.get("reason") or ""
        if vm.get("message") and act in ("blocked", "skip"):
            why = f"{why}: {vm['message']}"
        dt_ms = vm.get("predictedDowntimeMs")
        table.add_row(
            f"{vm['namespace']}/{vm['name']}",
            Text(act, style="red" if act == "blocked" else "yellow" if act == "skip" else
                 "green"),
            ", ".join(vm.get("candidates") or []) or "-",
            seconds(vm.get("predictedSeconds")),
            f"{dt_ms} ms" if dt_ms is not None else "-",
            Text(why, style="red" if act == "blocked" else ""),
        )
    c = status.get("counts") or {}
    blockers = [v for v in vms if v.get("phase") == "Failed"]
    summary = Text.assemble(
        ("ETA ", "bold"), (seconds(status.get("plannedSeconds")), "bold cyan"),
        f" (until {status.get('eta') or '-'})   ",
        ("VMs ", "bold"), f"{c.get('total', 0)}: {c.get('pending', 0)} to move, "
        f"{len(blockers)} blocked, {c.get('skipped', 0)} skipped   ",
        ("to move ", "bold"), size(status.get("bytesToMove")))
    reasons: dict[str, int] = {}
    for v in blockers:
        reasons[v.get("reason") or "Unknown"] = reasons.get(v.get("reason") or "Unknown", 0) + 1
    parts: list[RenderableType] = [table, summary]
    if reasons:
        parts.append(Text("blockers: " + ", ".join(f"{r} x{n}" for r, n in sorted(
            reasons.items())), style="red"))
    return Group(*parts)


# -- status ----------------------------------------------------------------------------------


def _drain_table(drains: list[JSON]) -> Table:
    t = Table(title="NodeDrains", box=box.SIMPLE, expand=False)
    for col in ("name", "target", "phase", "progress", "", "migrating", "failed", "ETA"):
        t.add_column(col)
    for d in drains:
        done, total = observe.progress(d)
        st = d.get("status") or {}
        spec = d.get("spec") or {}
        target = spec.get("nodeName") or ",".join(
            f"{k}={v}" for k, v in ((spec.get("nodeSelector") or {}).get("matchLabels")
                                    or {}).items())
        phase = st.get("phase") or "Pending"
        t.add_row(d["metadata"]["name"], target, Text(phase, style=PHASE_STYLE.get(phase, "")),
                  ProgressBar(total=max(total, 1), completed=done if total else 0, width=30),
                  f"{done}/{total}", str(observe.counts(d).get("migrating", 0)),
                  str(observe.counts(d).get("failed", 0)),
                  seconds(st.get("plannedSeconds")) if phase == "Draining" else
                  (st.get("completionTime") or "-"))
    return t


def _policy_table(policies: list[JSON]) -> Table:
    t = Table(title="MigrationPolicies (migrationpolicies.virtshift.io)", box=box.SIMPLE)
    for col in ("name", "ready", "matched VMs", "in flight", "window", "succeeded", "failed"):
        t.add_column(col)
    for p in policies:
        st = p.get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
        out = st.get("outcomes") or {}
        window = {True: "open", False: f"closed (next {st.get('nextWindow') or '-'})",
                  None: "-"}[st.get("windowOpen")]
        t.add_row(p["metadata"]["name"],
                  Text(ready.get("status", "?") + (f" {ready.get('reason')}" if ready.get(
                      "reason") else ""), style="green" if ready.get("status") == "True"
                       else "red"),
                  str(st.get("matchedVMs", "-")), str(st.get("inFlight", 0)), window,
                  str(out.get("succeeded", "-")), str(out.get("failed", "-")))
    return t


def _flight_table(flights: list[tuple[JSON, observe.Attempt]], now: dt.datetime,
                  transfers: dict[str, observe.Transfer], memory: dict[str, float]) -> Table:
    t = Table(title="Migrations in flight", box=box.SIMPLE)
    for col in ("VM", "drain", "phase", "source -> target", "elapsed", "memory", "remaining",
                "rate"):
        t.add_column(col)
    for obj, a in flights:
        ns, vmi = obj["metadata"]["namespace"], (obj.get("spec") or {}).get("vmiName", "")
        key = f"{ns}/{vmi}"
        tr = transfers.get(key)
        t.add_row(key, (obj["metadata"].get("labels") or {}).get("virtshift.io/drain", "-"),
                  Text(a.phase, style="blue"), f"{a.source or '?'} -> {a.target or '?'}",
                  seconds((now - a.start).total_seconds()) if a.start else "-",
                  size(memory.get(key)), size(tr.remaining) if tr else "-",
                  f"{size(tr.rate)}/s" if tr and tr.rate is not None else "-")
    if not flights:
        t.add_row("(none)", "", "", "", "", "", "", "")
    return t


def _waiting_table(drains: list[JSON], limit: int = 12) -> Table:
    t = Table(title="Waiting, and why", box=box.SIMPLE)
    for col in ("drain", "VM", "phase", "why"):
        t.add_column(col)
    rows = [(d["metadata"]["name"], v) for d in drains if not observe.drain_done(d)
            for v in observe.waiting(d)]
    for name, v in rows[:limit]:
        t.add_row(name, f"{v['namespace']}/{v['name']}", v.get("phase", ""),
                  (v.get("reason") or "") + (f": {v['message']}" if v.get("message") else ""))
    if len(rows) > limit:
        t.add_row("", f"... and {len(rows) - limit} more", "", "")
    return t


class StatusView:
    def __init__(self, kube: KubeClient, drain: str | None, metrics_source: str | None,
                 time_scale: float) -> None:
        self.kube = kube
        self.drain = drain
        self.time_scale = time_scale
        self.clock = observe.clock_for(kube, time_scale)
        self.transfers = observe.TransferWatch(metrics_source)
        self.done = False

    def render(self) -> RenderableType:
        kube = self.kube
        drains = kube.items(rest.NODE_DRAINS)
        if self.drain:
            drains = [d for d in drains if d["metadata"]["name"] == self.drain]
        policies = kube.items(rest.POLICIES)
        flights = observe.in_flight(kube)
        if self.drain:
            flights = [f for f in flights if (f[0]["metadata"].get("annotations") or {}).get(
                "virtshift.io/node-drain") == self.drain]
        memory: dict[str, float] = {}
        if flights:
            from virtshift.k8s import views

            vmis = {f"{v['metadata']['namespace']}/{v['metadata']['name']}": v
                    for v in kube.items(rest.VMIS)}
            memory = {k: views.vmi_info(v).memory for k, v in vmis.items()}
            for obj, a in flights:  # the target as KubeVirt reports it on the VMI
                vmi = vmis.get(f"{obj['metadata']['namespace']}/{obj['spec'].get('vmiName')}")
                state = ((vmi or {}).get("status") or {}).get("migrationState") or {}
                if state.get("migrationUid") == obj["metadata"].get("uid"):
                    a.target = a.target or state.get("targetNode")
                    a.source = a.source or state.get("sourceNode")
        transfers = self.transfers.sample(self.time_scale)
        now = self.clock.now()
        self.done = bool(drains) and all(observe.drain_done(d) for d in drains) \
            and not flights
        if self.drain and not drains:
            return Text(f"NodeDrain {self.drain} not found", style="red")
        head = Text(f"virtshift status  {now.strftime('%Y-%m-%d %H:%M:%S')} (cluster time)",
                    style="bold")
        return Group(head, _drain_table(drains), _flight_table(flights, now, transfers, memory),
                     _waiting_table(drains), _policy_table(policies))


def run_status(view: StatusView, console: Console, once: bool = False,
               interval: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """Refresh until every drain shown is done (or Ctrl-C)."""
    if once:
        console.print(view.render())
        return 0
    try:
        with Live(view.render(), console=console, refresh_per_second=4,
                  screen=False) as live:
            while not view.done:
                sleep(interval)
                live.update(view.render())
    except KeyboardInterrupt:
        return 130
    return 0
