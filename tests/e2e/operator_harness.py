"""Run the operator as a real process (so tests can SIGKILL it) against a test cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtshift.k8s import rest


class OperatorProcess:
    def __init__(self, kubeconfig: Path, log_dir: Path, time_scale: float,
                 dirty_rate_source: str | None = None,
                 downtime_source: str | None = None,
                 leader_election: tuple[str, str, str] | None = None,
                 metrics_port: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        """``downtime_source``: ``virtshift run --downtime-source`` (e.g. the simulator's,
        ``runner.DOWNTIME_SOURCE``); without it nothing is observed. ``leader_election``:
        (namespace, Lease name, identity) to run as one of several replicas instead of
        ``--standalone``. ``metrics_port``: serve /metrics there (0: off); ``extra_args``:
        more flags of ``virtshift run``."""
        self.kubeconfig = kubeconfig
        self.extra = ["--metrics-source", dirty_rate_source] if dirty_rate_source else []
        if downtime_source:
            self.extra += ["--downtime-source", downtime_source]
        self.extra += list(extra_args)
        self.metrics_port = metrics_port
        self.log_dir = log_dir
        self.time_scale = time_scale
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.mode = ["--standalone"]
        if leader_election:
            ns, lease, identity = leader_election
            self.mode = [f"--leader-election-namespace={ns}", f"--leader-election-id={lease}",
                         f"--identity={identity}"]

    def start(self) -> OperatorProcess:
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtshift", "run", *self.mode,
             "--metrics-port", str(self.metrics_port),
             "--kubeconfig", str(self.kubeconfig), "--time-scale", str(self.time_scale),
             *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no finalizer handling: a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob("operator-*.log")))


def wait_for(predicate: Callable[[], Any], timeout: float = 120, every: float = 0.1,
             what: str | Callable[[], str] = "condition") -> Any:
    """Poll until ``predicate`` is truthy; ``what`` (or what it returns, evaluated only on
    failure, so it can describe the state then) names it in the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what() if callable(what) else what} not met in {timeout}s")


def drain_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
            "metadata": {"name": name}, "spec": spec}


def get_drain(kube: rest.KubeClient, name: str) -> dict[str, Any] | None:
    return kube.get(rest.NODE_DRAINS, name)


def phase_of(kube: rest.KubeClient, name: str) -> str | None:
    d = get_drain(kube, name)
    return ((d or {}).get("status") or {}).get("phase")
