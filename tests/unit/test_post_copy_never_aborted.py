"""KubeVirt never aborts a migration in post-copy (the guest already runs on the target), and
neither does virtshift: the mode is read where KubeVirt writes it while the migration runs (the
VMI's migrationState), and neither progressTimeout nor cancelOnDelete deletes such a migration;
each says it let it finish. Table tests, no cluster."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from virtshift.api.nodedrain import NodeDrainSpec, NodeDrainStatus
from virtshift.api.units import GiB
from virtshift.domain import progress as pr
from virtshift.domain.drain import CORDONED_BY, DrainSnapshot, finalize_drain
from virtshift.domain.views import MigrationInfo, NodeInfo, VMIInfo
from virtshift.k8s import views

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
UID = "3f0c-vmim"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# -- the mode: the VMI's while the migration runs, the VMIM's copy once final ------------------


def vmim(phase: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """A VMIM as KubeVirt writes it: until final its migrationState holds the source pod only
    (SetSourcePod); once final, a copy of the VMI's (migration.go updateStatus)."""
    return {"metadata": {"namespace": "ns", "name": "vs-d-a-1", "uid": UID},
            "spec": {"vmiName": "a"},
            "status": {"phase": phase, "migrationState": state or {"sourcePod": "launcher-a"}}}


def vmi(**state: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "a"},
            "status": {"migrationState": state} if state else {}}


@pytest.mark.parametrize(("obj", "vmi_obj", "mode"), [
    pytest.param(vmim("Running"), vmi(migrationUid=UID, mode="PostCopy"), "PostCopy",
                 id="running: the VMI says post-copy"),
    pytest.param(vmim("Running"), vmi(migrationUid=UID, mode="PreCopy"), "PreCopy",
                 id="running: the VMI says pre-copy"),
    pytest.param(vmim("Running"), vmi(migrationUid="another", mode="PostCopy"), None,
                 id="the VMI's state is another migration's"),
    pytest.param(vmim("Running"), None, None, id="no VMI"),
    pytest.param(vmim("Succeeded", {"migrationUid": UID, "mode": "PreCopy"}),
                 vmi(migrationUid="later", mode="PostCopy"), "PreCopy",
                 id="final: the VMIM's own copy"),
])
def test_the_mode_is_the_vmis_while_the_migration_runs(obj, vmi_obj, mode) -> None:
    info = views.migration_info(obj, vmi=vmi_obj)
    assert info.mode == mode
    assert info.in_post_copy is (mode == "PostCopy" and not info.final)


# -- progressTimeout ---------------------------------------------------------------------------


def mig(name: str = "vs-d-a-1", **kw: Any) -> MigrationInfo:
    fields: dict[str, Any] = {"namespace": "ns", "name": name, "vmi": "a", "phase": "Running",
                              "drain": "d", "policy": "gold", "attempt": 1,
                              "running_at": at(0), "mode": "PreCopy"}
    return MigrationInfo(**{**fields, **kw})


def stalled() -> pr.Progress | None:
    state = None
    for second, remaining in ((0, 100), (5, 80), (10, 80), (40, 80)):  # progress last at 5 s
        state = pr.observe(state, at(second), remaining)
    return state


@pytest.mark.parametrize(("mode", "aborted", "spared"), [
    ("PreCopy", ["vs-d-a-1"], []),
    ("PostCopy", [], ["vs-d-a-1"]),
    ("Paused", ["vs-d-a-1"], []),  # a paused guest is still pre-copy: KubeVirt may abort it
])
def test_progress_timeout_never_aborts_post_copy_and_says_so(mode, aborted, spared) -> None:
    verdict = pr.check([mig(mode=mode)], {"ns/a": stalled()}, at(60), 30)
    assert [s.migration.name for s in verdict.abort] == aborted
    assert [s.migration.name for s in verdict.spared] == spared
    for s in verdict.spared:
        assert "post-copy" in s.message and "letting it finish" in s.message


# -- cancelOnDelete ----------------------------------------------------------------------------


def drain_snapshot(migrations: list[MigrationInfo], cancel_on_delete: bool = True
                   ) -> DrainSnapshot:
    nodes = [NodeInfo(name="n1", cpu=64, memory=512 * GiB, unschedulable=True,
                      annotations={CORDONED_BY: "d"}),
             NodeInfo(name="n2", cpu=64, memory=512 * GiB)]
    vmis = [VMIInfo(namespace="ns", name=n, node="n1", memory=4 * GiB) for n in ("a", "b")]
    return DrainSnapshot(
        name="d", generation=1,
        spec=NodeDrainSpec.model_validate({"nodeName": "n1",
                                           "cancelOnDelete": cancel_on_delete}),
        status=NodeDrainStatus(), now=at(0), nodes={n.name: n for n in nodes},
        vmis={v.key: v for v in vmis}, migrations=migrations,
        cluster_unfinished=[m for m in migrations if not m.final])


def test_cancel_on_delete_lets_a_migration_in_post_copy_finish() -> None:
    pre, post = mig("vs-d-a-1"), mig("vs-d-b-1", vmi="b", mode="PostCopy")
    d = finalize_drain(drain_snapshot([pre, post]))
    assert [m.name for m in d.cancel] == ["vs-d-a-1"]
    [(kind, _reason, message)] = [e for e in d.events if e[1] == "PostCopyNotAborted"]
    assert kind == "Normal" and "ns/vs-d-b-1" in message and "letting them finish" in message
    # The node stays cordoned until both have ended: the aborted one and the one let finish.
    assert d.uncordon == [] and "1 migrations in post-copy" in (d.hold or "")
    ready = next(c for c in d.status.conditions if c.type == "Ready")
    assert "letting 1 migrations in post-copy finish" in ready.message
    aborted = MigrationInfo(**{**pre.__dict__, "phase": "Failed", "terminating": True})
    d = finalize_drain(drain_snapshot([aborted, post]))
    assert d.cancel == [] and d.uncordon == [] and d.hold
    done = MigrationInfo(**{**post.__dict__, "phase": "Succeeded"})
    d = finalize_drain(drain_snapshot([aborted, done]))
    assert d.uncordon == ["n1"] and not d.hold
    assert not [e for e in d.events if e[1] == "PostCopyNotAborted"]


def test_without_cancel_on_delete_nothing_is_said_about_post_copy() -> None:
    d = finalize_drain(drain_snapshot([mig(mode="PostCopy")], cancel_on_delete=False))
    assert d.cancel == [] and d.uncordon == ["n1"]
    assert not [e for e in d.events if e[1] == "PostCopyNotAborted"]
