"""A real local control plane: etcd and kube-apiserver, as controller-runtime's envtest runs them.

``up`` starts both detached from the calling process (they outlive it, for ``virtshift cluster
up``), records their pids in ``DIR/state.json`` and writes ``DIR/kubeconfig``; ``down`` stops them
and waits until their ports are closed. No kube-controller-manager runs, so nothing garbage
collects and no namespace finishes terminating: tests use fresh names.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from virtshift.devenv import binaries, certs

ADMIN_USER = "virtshift-admin"


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class State:
    etcd_pid: int
    apiserver_pid: int
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def pids(self) -> tuple[int, int]:
        return (self.apiserver_pid, self.etcd_pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


class LocalControlPlane:
    def __init__(self, directory: Path, log: Callable[[str], None] = print,
                 audit_policy: dict | None = None, users: tuple[str, ...] = ()) -> None:
        """Opt-in, for benchmarks: ``audit_policy`` (an ``audit.k8s.io/v1`` Policy) turns on
        the API server's audit log (JSON lines in ``audit_log``); ``users`` are more static
        token users (group ``system:masters``), each with ``kubeconfig_for(user)``, so one
        client's requests can be told apart in that log. Neither changes anything else."""
        self.dir = Path(directory).resolve()
        self.log = log
        self.audit_policy = audit_policy
        self.users = tuple(users)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    def kubeconfig_for(self, user: str) -> Path:
        """The kubeconfig of one of ``users`` (written by ``up``)."""
        return self.dir / f"kubeconfig-{user}"

    def _audit_flags(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.dir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(self.audit_policy))
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-maxsize=0",
                "--audit-log-mode=blocking"]

    @property
    def _state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> State | None:
        if not self._state_file.exists():
            return None
        return State(**json.loads(self._state_file.read_text()))

    def running(self) -> bool:
        st = self.state()
        return bool(st) and all(_alive(p) for p in st.pids) and port_open(st.apiserver_port)

    # -- up ---------------------------------------------------------------------------------

    def up(self, timeout: float = 90.0) -> State:
        if self.running():
            st = self.state()
            assert st
            self.log(f"control plane already running at {st.url}")
            return st
        self.down(quiet=True)  # clear leftovers of a crashed run
        bins = binaries.ensure_all(("etcd", "kube-apiserver"))
        pki = self.dir / "pki"
        logs = self.dir / "logs"
        for d in (pki, logs):
            d.mkdir(parents=True, exist_ok=True)
        token = self._write_pki(pki)
        st = State(0, 0, _free_port(), _free_port(), _free_port())
        st.etcd_pid = self._spawn(self._etcd_argv(bins["etcd"], st), logs / "etcd.log")
        self._save(st)
        st.apiserver_pid = self._spawn(self._apiserver_argv(bins["kube-apiserver"], st, pki),
                                       logs / "kube-apiserver.log")
        self._save(st)
        self._write_kubeconfig(st, token)
        for user, user_token in self._user_tokens.items():
            self._write_kubeconfig(st, user_token, user)
        self._wait_ready(st, token, timeout)
        return st

    def _etcd_argv(self, etcd: Path, st: State) -> list[str]:
        return [
            str(etcd),
            "--name=default",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{st.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{st.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{st.etcd_peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{st.etcd_peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{st.etcd_peer_port}",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ]

    def _apiserver_argv(self, apiserver: Path, st: State, pki: Path) -> list[str]:
        return [
            str(apiserver),
            f"--etcd-servers=http://127.0.0.1:{st.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={st.apiserver_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--allow-privileged=true",
            # No controller-manager creates the default ServiceAccount of a namespace.
            "--disable-admission-plugins=ServiceAccount",
            "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500",
            "--profiling=false",
            "--v=0",
            *self._audit_flags(),
        ]

    # -- restarts (fault injection): one component down and up again, data and ports kept --

    def _token(self) -> str:
        return (self.dir / "pki" / "tokens.csv").read_text().split(",", 1)[0]

    def _stop_pid(self, pid: int, ports: tuple[int, ...], sig: signal.Signals,
                  grace: float) -> None:
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(port_open(p) for p in ports):
            time.sleep(0.05)

    def stop_apiserver(self, kill: bool = False, grace: float = 10.0) -> None:
        """Stop kube-apiserver only (SIGKILL with ``kill``); etcd and its data stay."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane recorded in {self.dir}")
        self._stop_pid(st.apiserver_pid, (st.apiserver_port,),
                       signal.SIGKILL if kill else signal.SIGTERM, grace)

    def start_apiserver(self, timeout: float = 90.0) -> State:
        """Start kube-apiserver again on the same port, certificates and etcd (after
        ``stop_apiserver``); returns once it is ready."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane recorded in {self.dir}")
        bins = binaries.ensure_all(("kube-apiserver",))
        st.apiserver_pid = self._spawn(
            self._apiserver_argv(bins["kube-apiserver"], st, self.dir / "pki"),
            self.dir / "logs" / "kube-apiserver.log")
        self._save(st)
        self._wait_ready(st, self._token(), timeout)
        return st

    def restart_apiserver(self, kill: bool = False, timeout: float = 90.0) -> State:
        self.stop_apiserver(kill=kill)
        return self.start_apiserver(timeout)

    def stop_etcd(self, kill: bool = False, grace: float = 10.0) -> None:
        """Stop etcd only; its data directory stays (the API server keeps running and answers
        errors meanwhile)."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane recorded in {self.dir}")
        self._stop_pid(st.etcd_pid, (st.etcd_port, st.etcd_peer_port),
                       signal.SIGKILL if kill else signal.SIGTERM, grace)

    def start_etcd(self, timeout: float = 90.0) -> State:
        """Start etcd again on the same ports and data; returns once the API server is ready
        (it reconnects by itself)."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane recorded in {self.dir}")
        bins = binaries.ensure_all(("etcd",))
        st.etcd_pid = self._spawn(self._etcd_argv(bins["etcd"], st),
                                  self.dir / "logs" / "etcd.log")
        self._save(st)
        self._wait_ready(st, self._token(), timeout)
        return st

    def restart_etcd(self, kill: bool = False, timeout: float = 90.0) -> State:
        self.stop_etcd(kill=kill)
        return self.start_etcd(timeout)

    def _write_pki(self, pki: Path) -> str:
        ca, ca_key = certs.make_ca()
        certs.write(ca, pki / "ca.crt", pki / "ca.key")
        serving = certs.make_serving_cert(
            ca, ca_key, ["127.0.0.1", "localhost", "kubernetes.default.svc"], "kube-apiserver"
        )
        certs.write(serving, pki / "apiserver.crt", pki / "apiserver.key")
        (pki / "sa.key").write_bytes(certs.make_rsa_key())
        token = secrets.token_hex(24)
        self._user_tokens = {user: secrets.token_hex(24) for user in self.users}
        lines = [f'{t},{u},{u},"system:masters"\n'
                 for u, t in ((ADMIN_USER, token), *self._user_tokens.items())]
        (pki / "tokens.csv").write_text("".join(lines))
        return token

    def _spawn(self, argv: list[str], logfile: Path) -> int:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.dir,
            )
        return proc.pid

    def _save(self, st: State) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps(asdict(st)))

    def _write_kubeconfig(self, st: State, token: str, user: str = ADMIN_USER) -> None:
        ca = base64.b64encode((self.dir / "pki" / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "virtshift-local",
                          "cluster": {"server": st.url, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "virtshift-local",
                          "context": {"cluster": "virtshift-local", "user": user}}],
            "current-context": "virtshift-local",
        }
        path = self.kubeconfig if user == ADMIN_USER else self.kubeconfig_for(user)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _wait_ready(self, st: State, token: str, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for pid, name in ((st.etcd_pid, "etcd"), (st.apiserver_pid, "kube-apiserver")):
                if not _alive(pid):
                    tail = (self.dir / "logs" / f"{name}.log").read_text()[-3000:]
                    self.down(quiet=True)
                    raise ControlPlaneError(f"{name} exited during start-up:\n{tail}")
            req = urllib.request.Request(
                f"{st.url}/readyz", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:  # not up yet: connection refused, 500 while hooks run
                last = str(exc)
            time.sleep(0.25)
        self.down(quiet=True)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s: {last}")

    # -- down -------------------------------------------------------------------------------

    def down(self, quiet: bool = False, grace: float = 10.0) -> None:
        st = self.state()
        if st is None:
            if not quiet:
                self.log(f"no control plane recorded in {self.dir}")
            return
        for pid in st.pids:
            if pid and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p and _alive(p) for p in st.pids):
            time.sleep(0.1)
        for pid in st.pids:
            if pid and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        for pid in st.pids:  # reap our own children so they leave no zombie
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        ports = (st.etcd_port, st.etcd_peer_port, st.apiserver_port)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(port_open(p) for p in ports):
            time.sleep(0.1)
        self._state_file.unlink(missing_ok=True)
        if not quiet:
            self.log(f"control plane in {self.dir} stopped")
