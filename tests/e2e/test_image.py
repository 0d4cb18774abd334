"""The operator image runs `virtshift run` against the local control plane and a drain
completes (issue 11).

No Docker engine and no registry here: `make image` (hack/build-image.sh) builds the
Dockerfile with buildah on a base made of Debian packages and unpacks the image's root
filesystem to .cache/image/rootfs. This test runs the image's entrypoint from that root
filesystem as the image's user (65532), with the root filesystem read-only and /tmp a tmpfs
(as the chart's pod has it), in a mount namespace of its own (unshare + chroot), on the host's
network, authenticated as the chart's ServiceAccount. What this does not prove: a container
runtime's seccomp profile and dropped capabilities (no runtime runs here).

Skipped when the image has not been built (`make image` first); with VIRTSHIFT_IMAGE_TEST=1
a missing image fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_harness import REPO, install_identity
from operator_harness import drain_body, phase_of, wait_for

from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

IMAGE = Path(os.environ.get("VIRTSHIFT_IMAGE_DIR", REPO / ".cache" / "image"))
SMALL = REPO / "examples" / "scenarios" / "small.yaml"


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    rootfs, inspect = IMAGE / "rootfs", IMAGE / "inspect.json"
    if not (rootfs / "opt" / "virtshift" / "bin" / "virtshift").exists() or not inspect.exists():
        if os.environ.get("VIRTSHIFT_IMAGE_TEST") == "1":
            pytest.fail(f"no image in {IMAGE}: run `make image`", pytrace=False)
        pytest.skip(f"no image in {IMAGE}: run `make image` (needs buildah and mmdebstrap)")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("running the image's root filesystem needs root and unshare")
    return {"rootfs": rootfs, "config": json.loads(inspect.read_text())["OCIv1"]["config"]}


def test_the_image_runs_as_non_root_with_the_operator_as_entrypoint(image) -> None:
    config = image["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["virtshift"] and config["Cmd"] == ["run"]
    assert not (image["rootfs"] / "opt" / "virtshift" / "bin" / "pip").exists()


@pytest.fixture(scope="module")
def running(image, fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("image")
    kubeconfig = install_identity(fresh_cluster, work)
    secrets = work / "secrets"
    secrets.mkdir()
    shutil.copy(kubeconfig, secrets / "kubeconfig")
    (secrets / "kubeconfig").chmod(0o644)  # readable by uid 65532
    scenario = load_scenario(SMALL)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    rootfs = image["rootfs"]
    env = " ".join(f"{e}" for e in image["config"]["Env"])
    args = ["run", "--standalone", "--metrics-port=0", "--health-port=0",
            "--kubeconfig=/mnt/kubeconfig",
            f"--time-scale={scenario.time_scale}", f"--metrics-source={sim.metrics.url}",
            f"--downtime-source={runner.DOWNTIME_SOURCE}"]
    script = f"""set -e
mount --make-rprivate /
mount --bind {rootfs} {rootfs}
mount -o remount,bind,ro {rootfs}
mount -t tmpfs -o size=64m tmpfs {rootfs}/tmp
mount -t proc proc {rootfs}/proc
mount --bind -o ro {secrets} {rootfs}/mnt
exec chroot --userspec=65532:65532 {rootfs} /usr/bin/env -i {env} \
    {" ".join(image["config"]["Entrypoint"])} {" ".join(args)}
"""
    log = open(work / "operator.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["unshare", "--mount", "--fork", "sh", "-c", script],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {"kube": fresh_cluster.kube, "proc": proc, "log": work / "operator.log",
               "rootfs": rootfs}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        sim.stop()


def test_the_image_drains_a_node(running) -> None:
    kube = running["kube"]
    on_node = [v for v in kube.items(rest.VMIS) if v["status"].get("nodeName") == "node-1"]
    assert on_node
    kube.create(rest.NODE_DRAINS, drain_body("from-image", nodeName="node-1"))
    wait_for(lambda: phase_of(kube, "from-image") == "Drained", timeout=120,
             what=lambda: "drained by the image's operator; its log:\n"
             + running["log"].read_text(errors="replace")[-3000:])
    assert not [v for v in kube.items(rest.VMIS) if v["status"].get("nodeName") == "node-1"]
    logs = running["log"].read_text(errors="replace")
    assert "Traceback" not in logs, logs[-3000:]
    assert running["proc"].poll() is None


def test_the_image_process_is_uid_65532_on_a_read_only_root(running) -> None:
    """Read from /proc of the operator's process: its user, and that its root is read-only."""
    children = subprocess.run(["pgrep", "-f", "-P", str(running["proc"].pid), "virtshift"],
                              capture_output=True, text=True).stdout.split()
    assert children, "the operator process is not running"
    status = Path(f"/proc/{children[0]}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65532"] * 4
    mounts = Path(f"/proc/{children[0]}/mounts").read_text().splitlines()
    # (seen from inside the chroot, the image's root filesystem is mounted on /)
    root = [m.split() for m in mounts if m.split()[1] in ("/", str(running["rootfs"]))]
    assert root and "ro" in root[-1][3].split(","), root
