"""Storage moves (domain.storage) and shared-nothing migration in the drain planner,
table-driven over hand-built views (no API server)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from test_drain_planner import NOW, cordoned, entry, mig, node, snap, vmi

from virtshift.api.migrationpolicy import StorageMigration
from virtshift.api.units import GiB
from virtshift.domain import storage
from virtshift.domain.drain import finalize_drain, plan_drain
from virtshift.domain.rules import Rules
from virtshift.domain.storage import (
    ClaimInfo,
    PolicyStorageSnapshot,
    VMStorage,
    VolumeInfo,
    plan_policy_storage,
)

OWNER = "policy.p"
P = storage.Owner("policy", "p")


def claim(name: str, cls: str = "old", size: float = 10 * GiB, **kw: Any) -> ClaimInfo:
    return ClaimInfo(namespace="ns", name=name, storage_class=cls, size=size,
                     uid=f"uid-{name}", **kw)


def dest(name: str, source: str, cls: str = "new", owner: str = OWNER, **kw: Any) -> ClaimInfo:
    return claim(name, cls, source_claim=source, moved_by=owner, vm=kw.pop("vm", None), **kw)


def vm(name: str, claim_name: str | None = None, running: str | None = None,
       **kw: Any) -> VMStorage:
    c = claim_name or f"{name}-root"
    vol = VolumeInfo("root", c, running or c, vmi_claim=kw.pop("vmi_claim", None) or c,
                     refused=kw.pop("refused", None))
    return VMStorage(namespace="ns", name=name, volumes=(vol,), **kw)


def claims(*items: ClaimInfo) -> dict[str, ClaimInfo]:
    return {c.key: c for c in items}


# -- names ---------------------------------------------------------------------------------------


def test_destination_names_are_deterministic_and_never_collide() -> None:
    a = claim("data")
    assert storage.destination_name(a, "ceph") == storage.destination_name(a, "ceph")
    assert storage.destination_name(a, "ceph") != storage.destination_name(a, "nfs")
    # The same name after a delete (another UID) gets another destination.
    again = dataclasses.replace(a, uid="other")
    assert storage.destination_name(a, "ceph") != storage.destination_name(again, "ceph")
    # A claim moved again does not grow a longer and longer name.
    moved = claim(storage.destination_name(a, "ceph"), "ceph")
    second = storage.destination_name(moved, "nfs")
    assert second.startswith("data-vs-") and len(second) == len("data-vs-") + 6
    assert len(storage.destination_name(claim("x" * 253), "c")) <= 253


# -- reading a move back from the cluster --------------------------------------------------------


@pytest.mark.parametrize("template, running, expect_moving, expect_moved", [
    ("a-root", "a-root", {}, {}),  # idle
    ("a-root-vs-000001", "a-root", {"root": ("a-root", "a-root-vs-000001")}, {}),  # copying
    ("a-root-vs-000001", "a-root-vs-000001", {}, {"root": ("a-root", "a-root-vs-000001")}),
    ("other", "a-root", {}, {}),  # someone else's update: not ours to follow
])
def test_a_move_is_read_from_the_vm_and_its_vmi(template, running, expect_moving,
                                                 expect_moved) -> None:
    cs = claims(claim("a-root"), claim("other"), dest("a-root-vs-000001", "a-root"))
    v = vm("a", template, running)
    assert storage.moving(v, cs) == expect_moving
    assert storage.moved(v, cs) == expect_moved
    back = storage.revert(v, cs)
    assert (back.claims if back else {}) == {n: s for n, (s, _d) in expect_moving.items()}


@pytest.mark.parametrize("volume_kw, vm_kw, updates, reason", [
    ({}, {}, True, None),
    ({}, {}, False, storage.WORKLOAD_UPDATE_MISSING),
    ({}, {"storage_migratable": False, "storage_message": "no"}, True,
     storage.STORAGE_NOT_LIVE_MIGRATABLE),
    ({"refused": "a shareable disk cannot be migrated"}, {}, True,
     storage.VOLUME_NOT_MIGRATABLE),
])
def test_what_kubevirt_would_refuse_is_refused_before_anything_is_touched(
        volume_kw, vm_kw, updates, reason) -> None:
    v = vm("a", **volume_kw, **vm_kw)
    found = storage.refusal(v, v.volumes, updates)
    assert (found[0] if found else None) == reason


# -- a policy with storage.mode Always -----------------------------------------------------------


def policy_snapshot(vms: list[VMStorage], cs: dict[str, ClaimInfo], **kw: Any
                    ) -> PolicyStorageSnapshot:
    spec = StorageMigration.model_validate({"targetStorageClass": "new", "mode": "Always",
                                            **kw.pop("spec", {})})
    return PolicyStorageSnapshot(
        policy="p", spec=spec, now=NOW,
        governed=kw.pop("governed", None) or {v.key: v for v in vms}, everyone=vms,
        claims=cs, classes={}, updates_migrate=kw.pop("updates", True), **kw)


def test_moves_start_within_max_parallel_copies() -> None:
    vms = [vm(f"v{i}") for i in range(5)]
    busy = vm("busy", "busy-root-vs-000001", "busy-root")
    cs = claims(*(claim(f"v{i}-root") for i in range(5)), claim("busy-root"),
                dest("busy-root-vs-000001", "busy-root"))
    d = plan_policy_storage(policy_snapshot([*vms, busy], cs, spec={"maxParallelCopies": 3}))
    assert len(d.update) == 2  # 3 at once, one already copying
    assert {c.storage_class for c in d.create} == {"new"}
    assert all(c.size >= 10 * GiB and c.source == f"{c.vm}-root" for c in d.create)
    assert {u.vm for u in d.update} == {c.vm for c in d.create}
    assert d.status.counts.copying == 3 and d.status.counts.pending == 3


def test_copy_bandwidth_over_bandwidth_per_migration_bounds_the_copies() -> None:
    vms = [vm(f"v{i}") for i in range(5)]
    cs = claims(*(claim(f"v{i}-root") for i in range(5)))
    d = plan_policy_storage(policy_snapshot(vms, cs, spec={"copyBandwidth": "2Gi"},
                                            bandwidth_per_migration=GiB))
    assert len(d.update) == 2


def test_a_closed_window_starts_nothing() -> None:
    d = plan_policy_storage(policy_snapshot([vm("a")], claims(claim("a-root")),
                                            may_start=False))
    assert not d.changes_cluster and d.status.vms[0].reason == "OutsideWindow"


def test_without_live_migrate_updates_nothing_is_touched() -> None:
    d = plan_policy_storage(policy_snapshot([vm("a")], claims(claim("a-root")), updates=False))
    assert not d.changes_cluster
    assert d.status.vms[0].phase == "Refused"
    assert d.status.vms[0].reason == storage.WORKLOAD_UPDATE_MISSING


@pytest.mark.parametrize("vm_kw, failures, reverted", [
    ({}, 0, False),
    ({"volumes_change": False, "volumes_change_message": "One of the destination volumes "
      "doesn't exist"}, 0, True),
    ({"restart_required": "cannot migrate the VM"}, 0, True),
    ({}, 3, True),  # maxAttempts copies failed
])
def test_a_move_kubevirt_refuses_or_that_keeps_failing_goes_back(vm_kw, failures,
                                                                  reverted) -> None:
    v = vm("a", "a-root-vs-000001", "a-root", **vm_kw)
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root"))
    d = plan_policy_storage(policy_snapshot([v], cs, failed_attempts={"ns/a": failures}))
    assert bool(d.update) == reverted
    if reverted:
        assert d.update[0].claims == {"root": "a-root"}
        assert d.status.vms[0].phase == "Failed" and d.events


def test_finished_moves_delete_sources_only_when_asked() -> None:
    v = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root"))
    keep = plan_policy_storage(policy_snapshot([v], cs))
    assert keep.delete == [] and keep.status.counts.succeeded == 1
    gone = plan_policy_storage(policy_snapshot([v], cs, spec={"sourceClaims": "Delete"}))
    assert gone.delete == ["ns/a-root"]


def test_unused_destinations_are_deleted_but_never_one_a_vmi_still_uses() -> None:
    # Reverted by us; KubeVirt has not cancelled yet: the VMI's spec still names the
    # destination, so it stays until KubeVirt lets go of it.
    held = vm("a", "a-root", "a-root", vmi_claim="a-root-vs-000001")
    orphan = dest("b-root-vs-000002", "b-root")
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root"), claim("b-root"), orphan,
                dest("c-root-vs-000003", "c-root", owner="policy.other"))
    assert storage.deletable_destinations(P, [held, vm("b")], cs) == ["ns/b-root-vs-000002"]
    assert storage.pending_cancel(P, [held, vm("b")], cs) == 1


def test_cancelling_reverts_only_this_owners_unfinished_moves() -> None:
    mine = vm("a", "a-root-vs-000001", "a-root")
    theirs = vm("b", "b-root-vs-000002", "b-root")
    done = vm("c", "c-root-vs-000003", "c-root-vs-000003")
    cs = claims(claim("a-root"), claim("b-root"), claim("c-root"),
                dest("a-root-vs-000001", "a-root"),
                dest("b-root-vs-000002", "b-root", owner="drain.x"),
                dest("c-root-vs-000003", "c-root"))
    d = storage.cancel_policy_storage("p", [mine, theirs, done], cs)
    assert [(u.vm, dict(u.claims)) for u in d.update] == [("a", {"root": "a-root"})]
    assert d.delete == []


# -- shared-nothing during a drain ---------------------------------------------------------------


def local(name: str, **kw: Any) -> ClaimInfo:
    return claim(name, "local", node="n1", **kw)


DISKS = {"migratable": False, "not_migratable_reason": "DisksNotLiveMigratable",
         "not_migratable_message": "cannot migrate VMI: PVC a-root is not shared"}


def drain_snap(vms: list[VMStorage], cs: dict[str, ClaimInfo], vmis: list | None = None,
               **kw: Any):
    return snap(vmis or [vmi(v.name, **DISKS) for v in vms], nodes=cordoned(),
                storage={v.key: v for v in vms}, claims=cs, **kw)


def test_a_vm_on_node_local_disks_moves_with_them() -> None:
    d = plan_drain(drain_snap([vm("a")], claims(local("a-root"))))
    e = entry(d, "a")
    assert e.phase == "Migrating" and e.reason == "PreparingVolumes" and e.mode == "SharedNothing"
    assert [(c.source, c.storage_class, c.moved_by) for c in d.claims] == [
        ("a-root", "local", "drain.d")]
    assert d.volumes[0].claims == {"root": d.claims[0].name}
    assert not d.create  # the migration follows once KubeVirt migrates the volumes
    assert e.volumes[0].destination_claim == d.claims[0].name


def test_shared_nothing_goes_to_the_policys_target_class() -> None:
    spec = StorageMigration.model_validate({"targetStorageClass": "ceph"})
    d = plan_drain(drain_snap([vm("a")], claims(local("a-root")),
                              rules={"ns/a": Rules(policy="p", storage=spec)}))
    assert d.claims[0].storage_class == "ceph"


def test_shared_nothing_holds_a_slot_until_its_migration_is_created() -> None:
    # Two outbound slots: one VM already pointed at its destination (waiting for KubeVirt),
    # so only one more may begin.
    waiting = vm("a", "a-root-vs-000001", "a-root")
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a"),
                local("b-root"), local("c-root"))
    d = plan_drain(drain_snap([waiting, vm("b"), vm("c")], cs))
    assert entry(d, "a").reason == "UpdatingVolumes"
    assert len(d.volumes) == 1


def test_once_kubevirt_migrates_the_volumes_the_drain_creates_the_migration() -> None:
    moving = vm("a", "a-root-vs-000001", "a-root", migrating_volumes=True,
                volumes_change=True)
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a"))
    d = plan_drain(drain_snap([moving], cs, vmis=[vmi("a")]))
    assert [m.vmi for m in d.create] == ["a"]
    assert entry(d, "a").mode == "SharedNothing"


def test_a_refused_volume_update_goes_back_to_the_source() -> None:
    refused = vm("a", "a-root-vs-000001", "a-root", volumes_change=False,
                 volumes_change_message="One of the destination volumes doesn't exist")
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a"))
    d = plan_drain(drain_snap([refused], cs))
    assert entry(d, "a").phase == "Failed"
    assert [dict(u.claims) for u in d.revert] == [{"root": "a-root"}]


@pytest.mark.parametrize("action, phase", [("Fail", "Failed"), ("Skip", "Skipped")])
def test_disks_kubevirt_cannot_move_fall_to_non_migratable(action, phase) -> None:
    d = plan_drain(drain_snap([vm("a")], claims(local("a-root")), updates_migrate=False,
                              rules={"ns/a": Rules(non_migratable=action)}))
    e = entry(d, "a")
    assert (e.phase, e.reason) == (phase, storage.WORKLOAD_UPDATE_MISSING)
    assert not d.claims and not d.volumes


def test_deleting_the_drain_puts_unfinished_moves_back_and_waits() -> None:
    moving = vm("a", "a-root-vs-000001", "a-root")
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a"))
    d = finalize_drain(drain_snap([moving], cs))
    assert [dict(u.claims) for u in d.revert] == [{"root": "a-root"}]
    assert d.hold and not d.uncordon
    # KubeVirt cancelled: nothing points at the destination; it goes, and so does the hold.
    back = vm("a")
    later = finalize_drain(drain_snap([back], cs))
    assert later.delete_claims == ["ns/a-root-vs-000001"]
    # Deleting it holds nothing up: one a snapshot still refers to is kept by the delete step
    # and collected once the drain is gone (it held the finalizer, and the nodes cordoned,
    # for 300 s).
    assert not later.hold
    gone = finalize_drain(drain_snap([back], claims(local("a-root"))))
    assert not gone.hold and not gone.revert


def test_the_node_is_drained_when_the_vm_left_with_its_disks() -> None:
    done = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a", created=NOW - dt.timedelta(
                                          seconds=60)))
    d = plan_drain(drain_snap([done], cs, vmis=[vmi("a", node_name="n2")]))
    e = entry(d, "a")
    assert (e.phase, e.mode) == ("Succeeded", "SharedNothing")
    assert e.volumes[0].phase == "Completed"
    assert d.status.phase == "Drained"
    assert node("n2").name == e.target_node


def test_a_dry_run_lists_the_volumes_and_their_predicted_copy_time() -> None:
    cs = claims(local("a-root", size=20 * GiB))
    d = plan_drain(drain_snap([vm("a")], cs, spec={"nodeName": "n1", "dryRun": True},
                              classes={"local": storage.ClassInfo("local",
                                                                  copy_bandwidth=GiB)}))
    e = entry(d, "a")
    assert not d.changes_cluster
    assert e.mode == "SharedNothing" and e.volumes[0].source_claim == "a-root"
    assert e.volumes[0].predicted_seconds == 20.0  # 20 GiB at the class's 1 GiB/s
    assert e.predicted_seconds >= 20.0


def test_a_finished_copy_reports_its_duration() -> None:
    done = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    start = NOW - dt.timedelta(seconds=90)
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a", created=start))
    ours = mig("a", 1, "Succeeded", ended=NOW - dt.timedelta(seconds=30))
    d = plan_drain(drain_snap([done], cs, vmis=[vmi("a", node_name="n2")], migrations=[ours]))
    assert entry(d, "a").volumes[0].duration_seconds == 60.0


# -- what may be deleted: ownership, references, where the data is (issue 20) -------------------


def test_a_finished_moves_claim_survives_its_vms_deletion() -> None:
    """The VM was deleted with its claims kept after its move had finished: the destination
    holds its data (the source is older). None of the owner's passes deletes it."""
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root", vm="a"))
    assert plan_policy_storage(policy_snapshot([], cs)).delete == []
    assert plan_policy_storage(policy_snapshot([], cs, spec={"mode": "OnDrain"})).delete == []
    assert storage.cancel_policy_storage("p", [], cs).delete == []
    local_cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                            owner="drain.d", vm="a"))
    assert finalize_drain(drain_snap([], local_cs)).delete_claims == []


def test_the_middle_claim_of_a_move_moved_again_belongs_to_the_later_move() -> None:
    """a-root -> B by policy p, then B -> C by policy q (sourceClaims Keep): B is q's
    source, and with p's sourceClaims Delete possibly the only older copy q keeps."""
    on_c = vm("a", "a-root-vs-00000c", "a-root-vs-00000c")
    cs = claims(claim("a-root"), dest("a-root-vs-00000b", "a-root", vm="a"),
                dest("a-root-vs-00000c", "a-root-vs-00000b", cls="other", owner="policy.q",
                     vm="a"))
    assert plan_policy_storage(policy_snapshot([on_c], cs, governed={"x/none": vm("x")})
                               ).delete == []
    assert storage.cancel_policy_storage("p", [on_c], cs).delete == []
    drained = claims(local("a-root"), dest("a-root-vs-00000b", "a-root", cls="local",
                                           owner="drain.d", vm="a"),
                     dest("a-root-vs-00000c", "a-root-vs-00000b", owner="policy.q", vm="a"))
    assert finalize_drain(drain_snap([on_c], drained)).delete_claims == []


def test_delete_removes_only_the_sources_of_this_policys_own_moves() -> None:
    """sourceClaims: Delete. A VM whose finished move a NodeDrain made (under Keep) keeps
    its source; the policy's own finished move loses its source."""
    by_drain = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    by_policy = vm("b", "b-root-vs-000002", "b-root-vs-000002")
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root", owner="drain.x", vm="a"),
                claim("b-root"), dest("b-root-vs-000002", "b-root", vm="b"))
    d = plan_policy_storage(policy_snapshot([by_drain, by_policy], cs,
                                            spec={"sourceClaims": "Delete"}))
    assert d.delete == ["ns/b-root"]


def test_a_drain_deletes_only_the_sources_of_its_own_incarnations_moves() -> None:
    """A NodeDrain created again under the same name is another owner: the moves its
    predecessor made keep their sources, even under a policy that says Delete."""
    done = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    rules = {"ns/a": Rules(policy="p", storage=StorageMigration.model_validate(
        {"targetStorageClass": "local", "sourceClaims": "Delete"}))}

    def deleted(owner_uid: str, begun_under: str | None = "Delete") -> list[str]:
        cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                          owner="drain.d", vm="a", owner_uid=owner_uid,
                                          source_claims=begun_under))
        return plan_drain(drain_snap([done], cs, vmis=[vmi("a", node_name="n2")], rules=rules,
                                     uid="uid-now")).delete_claims
    assert deleted("uid-now") == ["ns/a-root"]
    assert deleted("uid-now", begun_under=None) == ["ns/a-root"]  # written before it was kept
    assert deleted("uid-before") == []
    # Begun with no policy (Keep); the policy that says Delete came later.
    assert deleted("uid-now", begun_under="Keep") == []


def test_a_move_begun_under_keep_keeps_its_source_after_the_policy_says_delete() -> None:
    done = vm("a", "a-root-vs-000001", "a-root-vs-000001")
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root", vm="a",
                                      source_claims="Keep"))
    assert plan_policy_storage(policy_snapshot([done], cs, spec={"sourceClaims": "Delete"})
                               ).delete == []
    began = plan_policy_storage(policy_snapshot([vm("b")], claims(claim("b-root")),
                                                spec={"sourceClaims": "Delete"}))
    assert [c.source_claims for c in began.create] == ["Delete"]


def test_owners_are_told_apart_by_uid_and_old_claims_by_name() -> None:
    now = storage.Owner("drain", "d", "uid-2")
    assert now.made(dest("x", "s", owner="drain.d", owner_uid="uid-2"))
    assert not now.made(dest("x", "s", owner="drain.d", owner_uid="uid-1"))
    assert not now.made(dest("x", "s", owner="policy.d", owner_uid="uid-2"))
    assert now.made(dest("x", "s", owner="drain.d"))  # written before UIDs were recorded


# (the claims besides a-root and D, the VM, what else refers to D) -> verdict on D
@pytest.mark.parametrize("case, d_kw, vms, extra, delete, reason", [
    ("the VM points at it (copying)", {}, [vm("a", "D", "a-root")], [], False,
     storage.CLAIM_IN_USE),
    ("reverted; KubeVirt has not cancelled yet", {}, [vm("a", "a-root", "a-root",
                                                         vmi_claim="D")], [], False,
     storage.CLAIM_IN_USE),
    ("moved again: the later move's source", {}, [vm("a", "E", "E")],
     [dest("E", "D", owner="policy.q")], False, storage.CLAIM_IN_USE),
    ("the VM ran on it, then was deleted", {"completed": True}, [], [], False,
     storage.MOVE_COMPLETED),
    ("the VM is gone, its outcome never seen", {}, [], [], False, storage.OUTCOME_UNKNOWN),
    ("the VM points elsewhere", {}, [vm("a", "other", "other")], [claim("other")], False,
     storage.OUTCOME_UNKNOWN),
    ("cancelled or failed: the VM runs on the source", {}, [vm("a")], [], True,
     storage.MOVE_SUPERSEDED),
    ("another owner repointed the VM while its VMI still runs on the source", {},
     [vm("a", "E", "a-root", vmi_claim="E")], [dest("E", "a-root", owner="drain.d")], True,
     storage.MOVE_SUPERSEDED),
    ("another owner's copy of the same source completed instead", {},
     [vm("a", "E", "E")], [dest("E", "a-root", owner="drain.d")], True,
     storage.MOVE_SUPERSEDED),
    ("never started: the VM update did not go through", {}, [vm("a")], [], True,
     storage.MOVE_SUPERSEDED),
    ("its VMI ended before the move completed", {"abandoned": True}, [], [], True,
     storage.MOVE_ABANDONED),
    ("abandoned, but the source is gone", {"abandoned": True, "source_uid": "gone"}, [], [],
     False, storage.ONLY_COPY),
    ("the source's name was taken by another claim", {"source_uid": "uid-before"}, [vm("a")],
     [], False, storage.ONLY_COPY),
])
def test_a_destination_is_deleted_only_when_unused_and_its_data_is_on_its_source(
        case, d_kw, vms, extra, delete, reason) -> None:
    d = dest("D", "a-root", vm="a", **d_kw)
    cs = claims(claim("a-root"), d, *extra)
    if d_kw.get("source_uid") == "gone":
        del cs["ns/a-root"]
    found = storage.verdict(d, cs, storage.holds(vms, cs))
    assert (found.delete, found.reason) == (delete, reason), case


@pytest.mark.parametrize("case, the_vm, marks", [
    ("copying", vm("a", "D", "a-root"), []),
    ("done: the VM and its VMI run on it", vm("a", "D", "D"),
     [("ns/D", storage.COMPLETED_ANNOTATION)]),
    ("the VMI is being deleted mid-copy", vm("a", "D", "a-root", vmi_ended=True),
     [("ns/D", storage.ABANDONED_ANNOTATION)]),
    ("the VMI went away mid-copy (ManualRecoveryRequired)",
     VMStorage(namespace="ns", name="a", volumes=(VolumeInfo("root", "D", None),),
               running=False, manual_recovery="ManualRecoveryRequired"),
     [("ns/D", storage.ABANDONED_ANNOTATION)]),
    ("the VMI is being deleted after the move", vm("a", "D", "D", vmi_ended=True),
     [("ns/D", storage.COMPLETED_ANNOTATION)]),
    ("the VMI is being deleted while KubeVirt has not taken a revert yet",
     vm("a", "a-root", "a-root", vmi_claim="D", vmi_ended=True),
     [("ns/D", storage.ABANDONED_ANNOTATION)]),
])
def test_how_a_move_ended_is_recorded_on_its_destination(case, the_vm, marks) -> None:
    cs = claims(claim("a-root"), dest("D", "a-root", vm="a"))
    assert storage.outcome_marks([the_vm], cs) == marks, case


def test_a_drain_gone_with_reverts_pending_leaves_no_destination_behind() -> None:
    """The NodeDrain's deletion stops waiting after ABORT_WAIT_SECONDS while KubeVirt has not
    cancelled yet; once it has, the claims collector deletes the destination (its owner is
    gone). Before that the VMI still names it, and the collector leaves it."""
    from virtshift.domain.drain import ABORT_WAIT_SECONDS

    copying = vm("a", "a-root-vs-000001", "a-root")
    cs = claims(local("a-root"), dest("a-root-vs-000001", "a-root", cls="local",
                                      owner="drain.d", vm="a", owner_uid="uid-d"))
    ending = finalize_drain(drain_snap([copying], cs, uid="uid-d"), waited=ABORT_WAIT_SECONDS)
    assert not ending.hold and [dict(u.claims) for u in ending.revert] == [{"root": "a-root"}]
    # The revert is written; KubeVirt has not cancelled yet.
    reverting = vm("a", "a-root", "a-root", vmi_claim="a-root-vs-000001")
    assert storage.collect([reverting], cs, owners={}).delete == []
    # The same name and UID still exists: the drain decides about its own.
    assert storage.collect([vm("a")], cs, owners={"drain.d": "uid-d"}).delete == []
    gone = storage.collect([vm("a")], cs, owners={"drain.d": "uid-new-incarnation"})
    assert [(k, v.reason) for k, v in gone.delete] == [("ns/a-root-vs-000001",
                                                        storage.MOVE_SUPERSEDED)]


def test_a_vm_deleted_mid_move_leaves_no_destination_behind() -> None:
    """VM deletion: KubeVirt deletes the VMI (it never completes a migration then), then the
    VM goes. The collector records the abandoned move while the VMI is being deleted, so the
    partial copy goes once nothing points at it; a finished move's claim stays."""
    cs = claims(claim("a-root"), dest("a-root-vs-000001", "a-root", vm="a", owner_uid="u"),
                claim("b-root"), dest("b-root-vs-000002", "b-root", vm="b", owner_uid="u"))
    deleting = [vm("a", "a-root-vs-000001", "a-root", vmi_ended=True),
                vm("b", "b-root-vs-000002", "b-root-vs-000002", vmi_ended=True)]
    seen = storage.collect(deleting, cs, owners={})
    assert seen.marks == [("ns/a-root-vs-000001", storage.ABANDONED_ANNOTATION),
                          ("ns/b-root-vs-000002", storage.COMPLETED_ANNOTATION)]
    assert seen.delete == []  # the VMs still point at them
    marked = dict(cs)
    marked["ns/a-root-vs-000001"] = dataclasses.replace(cs["ns/a-root-vs-000001"],
                                                        abandoned=True)
    marked["ns/b-root-vs-000002"] = dataclasses.replace(cs["ns/b-root-vs-000002"],
                                                        completed=True)
    after = storage.collect([], marked, owners={})
    assert [k for k, _v in after.delete] == ["ns/a-root-vs-000001"]
    assert after.kept == []
    # Its owner, still there, deletes it itself.
    policy = storage.Owner("policy", "p", "u")
    assert storage.deletable_destinations(policy, [], marked) == ["ns/a-root-vs-000001"]


def test_what_a_destination_records_is_read_back() -> None:
    from virtshift.k8s import views

    src = claim("a-root")
    move = storage.plan_move(vm("a"), vm("a").volumes, claims(src), "ceph", StorageMigration(
        targetStorageClass="ceph", sourceClaims="Delete"), storage.Owner("policy", "p", "u-p"),
        {}, NOW)
    body = views.destination_claim(move.claims[0])
    body["metadata"]["uid"] = "u-d"
    back = views.claim_info(body, None)
    assert (back.moved_by, back.owner_uid, back.source_claim, back.source_uid, back.vm,
            back.source_claims) == ("policy.p", "u-p", "a-root", "uid-a-root", "a", "Delete")
    assert body["metadata"]["labels"][storage.OWNER_UID_ANNOTATION] == "u-p"
    assert not (back.completed or back.abandoned)
    # Written before owners' UIDs were recorded: matched by name, rule unknown.
    old = {"metadata": {"name": "x", "namespace": "ns", "annotations": {
        storage.MOVED_BY_LABEL: "drain.d", storage.SOURCE_CLAIM_LABEL: "s"}}}
    legacy = views.claim_info(old, None)
    assert (legacy.owner_uid, legacy.source_uid, legacy.source_claims) == ("", "", None)
    assert storage.Owner("drain", "d", "any").made(legacy)


@pytest.mark.parametrize("fn, obj, names", [
    ("data_volume_claims", {"metadata": {"name": "dv", "namespace": "ns"},
                            "spec": {"source": {"pvc": {"name": "golden", "namespace": "ns"}}}},
     ["dv", "golden"]),
    ("data_volume_claims", {"metadata": {"name": "dv", "namespace": "ns"},
                            "spec": {"source": {"pvc": {"name": "x", "namespace": "other"}}}},
     ["dv"]),
    ("volume_snapshot_claims", {"spec": {"source": {"persistentVolumeClaimName": "c"}}}, ["c"]),
    ("vm_snapshot_content_claims", {"spec": {"volumeBackups": [
        {"volumeName": "root", "persistentVolumeClaim": {"metadata": {"name": "c"}}}]}}, ["c"]),
    ("vm_export_claims", {"spec": {"source": {"kind": "PersistentVolumeClaim", "name": "c"}}},
     ["c"]),
    ("vm_export_claims", {"spec": {"source": {"kind": "VirtualMachine", "name": "vm"}}}, []),
])
def test_the_objects_outside_the_caches_that_refer_to_a_claim(fn, obj, names) -> None:
    from virtshift.k8s import views

    assert getattr(views, fn)(obj) == names
