"""`virtshift cluster up` gives a working API server; `down` leaves no process or port behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kubernetes import client, config

from virtshift.devenv.controlplane import port_open


def _pids_of(binary_dir: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if binary_dir in cmdline:
                pids.append(int(entry))
    return pids


def test_cluster_up_then_down_leaves_nothing(control_plane_binaries, tmp_path) -> None:
    run = [sys.executable, "-m", "virtshift", "cluster"]
    up = subprocess.run([*run, "up", "--dir", str(tmp_path)], capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={tmp_path}/kubeconfig" in up.stdout
    state = json.loads((tmp_path / "state.json").read_text())
    ports = [state["etcd_port"], state["etcd_peer_port"], state["apiserver_port"]]
    assert all(port_open(p) for p in ports)
    assert _pids_of(str(tmp_path))  # etcd's data dir and the apiserver's certs live there

    api = config.new_client_from_config(str(tmp_path / "kubeconfig"))
    crd_list = client.ApiextensionsV1Api(api).list_custom_resource_definition()
    names = [c.metadata.name for c in crd_list.items]
    assert "nodedrains.virtshift.io" in names
    assert "virtualmachineinstancemigrations.kubevirt.io" in names
    # RBAC is on: an unknown identity is refused, not allowed by default.
    review = client.AuthorizationV1Api(api).create_subject_access_review({
        "spec": {"user": "nobody", "resourceAttributes": {"verb": "list", "resource": "nodes"}}
    })
    assert review.status.allowed is False

    down = subprocess.run([*run, "down", "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not any(port_open(p) for p in ports)
    assert _pids_of(str(tmp_path)) == []
    assert not (tmp_path / "state.json").exists()
