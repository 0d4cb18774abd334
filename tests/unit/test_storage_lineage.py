"""Nothing lost, nothing left behind: random sequences of storage moves by several owners, VM
deletions, policy edits and deletions and drains, against a minimal model of KubeVirt written
here (independently of virtshift's code), with every decision taken by virtshift's real domain
functions: ``plan_policy_storage``, ``cancel_policy_storage``/``cancel_pending`` (a policy's
deletion), ``plan_drain`` and ``finalize_drain`` (a NodeDrain's storage decisions and its
deletion), and ``collect`` (the claims collector, which runs after every step, as its watch
wakes it).

The model of KubeVirt: a VM names one claim per volume (its template); its VMI runs on a claim
(the domain's disk) and names one in its spec. When the template names another claim that
exists, KubeVirt starts a volume migration (the VMI's spec names the destination, the domain
still runs on the source); a migration completes when KubeVirt switches the domain to the
destination, and only then does the destination hold the VM's data. Pointing the template back
at the source cancels it. A VM deletion first ends its VMI (no migration completes then), then
removes VM and VMI; its claims are kept. Claims are deleted at once when virtshift asks (no
pvc-protection delay: the strictest case for data loss).

After every step: every VM's data -- existing VMs' and deleted VMs' whose claims were kept --
is on a claim that exists (the data's lineage: which claim holds the current copy of each
disk), and every claim a VM or VMI names exists. Every deletion: a claim a finished move
copied goes only by that move's owner (same UID), and only if the move began under
sourceClaims: Delete. At the end, after every owner is gone and cleanup has run: no orphan
destination claim (one that holds no VM's current data and is no kept move's source).

``STORAGE_LINEAGE_SEQUENCES`` sets how many sequences run (200 by default)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from test_drain_planner import NOW, node, vmi

from virtshift.api.migrationpolicy import StorageMigration
from virtshift.api.nodedrain import NodeDrainSpec, NodeDrainStatus
from virtshift.api.units import GiB
from virtshift.domain import storage
from virtshift.domain.drain import ABORT_WAIT_SECONDS, DrainSnapshot, finalize_drain, plan_drain
from virtshift.domain.rules import Rules
from virtshift.domain.storage import ClaimInfo, VMStorage, VolumeInfo

SEQUENCES = int(os.environ.get("STORAGE_LINEAGE_SEQUENCES", "200"))
NS = "ns"
VMS = ("vm0", "vm1", "vm2", "vm3", "vm4")
# Policies and the VMs they select; the first existing one (not being deleted) governs.
SELECTS = {"p0": {"vm0", "vm1", "vm2"}, "p1": {"vm2", "vm3", "vm4"}}
DRAINS = {"d": "n1", "e": "n3"}  # name -> the node it drains
NODES = ("n1", "n2", "n3")
CLASSES = ("local", "c1", "c2")
DISK_FULL = "One of the destination volumes doesn't exist"
STATS: Counter[str] = Counter()


# -- KubeVirt, as the test sees it --------------------------------------------------------------


@dataclass
class VMI:
    spec: str  # the claim the VMI's spec names
    running: str  # the claim the domain runs on
    node: str
    ended: bool = False  # being deleted: KubeVirt completes no migration of it now

    @property
    def migrating(self) -> bool:
        return self.spec != self.running


@dataclass
class VM:
    name: str
    template: str
    vmi: VMI | None
    data: str  # lineage: the claim holding the current copy of its disk
    deleting: bool = False
    refused: bool = False  # KubeVirt refused the volume update (VolumesChange False)
    failures: int = 0  # failed copies since the current move began
    uid: str = ""


@dataclass
class Owner:
    uid: str
    deleting: bool = False
    spec: StorageMigration | None = None  # a policy's storage
    status: NodeDrainStatus = field(default_factory=NodeDrainStatus)  # a drain's last status


@dataclass
class World:
    claims: dict[str, ClaimInfo] = field(default_factory=dict)
    vms: dict[str, VM] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # deleted VM -> claim with its data
    finished: set[tuple[str, str]] = field(default_factory=set)  # (source, destination) moves
    policies: dict[str, Owner] = field(default_factory=dict)
    drains: dict[str, Owner] = field(default_factory=dict)
    serial: int = 0

    def uid(self) -> str:
        self.serial += 1
        return f"uid-{self.serial}"

    def add_claim(self, name: str, cls: str, **kw: object) -> None:
        self.claims[f"{NS}/{name}"] = ClaimInfo(namespace=NS, name=name, storage_class=cls,
                                                size=10 * GiB, uid=self.uid(), **kw)

    # KubeVirt's reactions -------------------------------------------------------------------

    def react(self, name: str) -> None:
        """The VM controller: a template naming another existing claim starts (or retargets)
        a volume migration; naming the source again cancels it (VolumeMigrationCancel)."""
        vm = self.vms.get(name)
        if vm is None or vm.vmi is None or vm.vmi.ended or vm.template == vm.vmi.spec:
            return
        if vm.template == vm.vmi.running:
            vm.vmi.spec, vm.refused = vm.vmi.running, False
        elif f"{NS}/{vm.template}" in self.claims:
            vm.vmi.spec, vm.refused, vm.failures = vm.template, False, 0
        else:
            vm.refused = True

    def complete(self, name: str) -> None:
        """The migration completes: the domain runs on the destination, which now holds the
        VM's data; it lands on a node no drain drains."""
        vm = self.vms.get(name)
        if vm is None or vm.vmi is None or vm.vmi.ended or not vm.vmi.migrating:
            return
        assert f"{NS}/{vm.vmi.spec}" in self.claims, f"{name} copies to a deleted claim"
        self.finished.add((vm.vmi.running, vm.vmi.spec))
        vm.vmi.running = vm.data = vm.vmi.spec
        drained = {DRAINS[d] for d in self.drains}
        vm.vmi.node = next((n for n in ("n2", "n3", "n1") if n not in drained), vm.vmi.node)
        STATS["moves completed"] += 1

    def fail(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is not None and vm.vmi is not None and vm.vmi.migrating and not vm.vmi.ended:
            vm.failures += 1

    def delete_vm(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is not None and not vm.deleting:
            vm.deleting = True
            if vm.vmi is not None:
                vm.vmi.ended = True

    def vm_gone(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is not None and vm.deleting:
            del self.vms[name]
            self.kept[name] = vm.data
            STATS["VMs deleted"] += 1

    # what virtshift sees ----------------------------------------------------------------------

    def view(self, vm: VM) -> VMStorage:
        i = vm.vmi
        return VMStorage(
            namespace=NS, name=vm.name, uid=vm.uid,
            volumes=(VolumeInfo("root", vm.template, i.running if i else None,
                                vmi_claim=i.spec if i else None),),
            running=i is not None and not i.ended, migrating_volumes=bool(i and i.migrating),
            volumes_change=False if vm.refused else True if i and i.migrating else None,
            volumes_change_message=DISK_FULL if vm.refused else None,
            vmi_ended=bool(i and i.ended))

    def views(self) -> dict[str, VMStorage]:
        return {f"{NS}/{n}": self.view(vm) for n, vm in self.vms.items()}

    def governing(self, vm: str) -> str | None:
        return next((p for p in sorted(self.policies) if vm in SELECTS[p]
                     and not self.policies[p].deleting), None)

    # virtshift's decisions, carried out as k8s.storage would ---------------------------------

    def apply(self, create: list[storage.NewClaim], update: list[storage.VolumeUpdate],
              delete: list[str], by: storage.Owner | None = None) -> None:
        """``by``: who decided (None: the claims collector)."""
        broken = set()
        for c in create:
            found = self.claims.get(f"{c.namespace}/{c.name}")
            if found is None:
                self.add_claim(c.name, c.storage_class, source_claim=c.source,
                               moved_by=c.moved_by, vm=c.vm, owner_uid=c.owner_uid,
                               source_uid=c.source_uid, source_claims=c.source_claims,
                               vm_uid=c.vm_uid)
                STATS["destination claims created"] += 1
            elif (found.moved_by, found.source_claim, found.owner_uid) != (
                    c.moved_by, c.source, c.owner_uid):
                broken.add(c.vm)  # k8s.storage.ClaimTaken: the VM is not repointed
            elif found.abandoned:  # the same move again: k8s.storage clears the old outcome
                self.claims[found.key] = dataclasses.replace(found, abandoned=False)
                STATS["destinations made again"] += 1
        for u in update:
            if u.vm in self.vms and u.vm not in broken:
                self.vms[u.vm].template = u.claims["root"]
        for key in delete:
            if key in self.claims:
                self.entitled(key, by)
                del self.claims[key]
                STATS["claims deleted"] += 1

    def entitled(self, key: str, by: storage.Owner | None) -> None:
        """A claim a finished move copied is deleted only by that move's owner (same UID),
        and only if the move began under sourceClaims: Delete; a claim nothing copied only if
        it is a destination of ours."""
        c = self.claims[key]
        copies = [d for d in self.claims.values() if (c.name, d.name) in self.finished]
        if copies:
            assert by is not None and any(
                (d.moved_by, d.owner_uid, d.source_claims) == (by.moved_by, by.uid, "Delete")
                for d in copies), \
                f"{key}, copied by {[(d.name, d.moved_by, d.source_claims) for d in copies]}," \
                f" deleted by {by}"
        else:
            assert c.source_claim, f"{key}, no destination, deleted by {by}"

    def policy_pass(self, name: str) -> None:
        owner = self.policies.get(name)
        if owner is None:
            return
        everyone = list(self.views().values())
        if owner.deleting:
            undo = storage.cancel_policy_storage(name, everyone, self.claims, owner.uid)
            self.apply([], undo.update, undo.delete, storage.Owner("policy", name, owner.uid))
            waiting = storage.cancel_pending(name, list(self.views().values()), self.claims,
                                             owner.uid)
            if not (undo.update or undo.delete or waiting):
                del self.policies[name]  # the finalizer goes
            return
        assert owner.spec is not None
        governed = {k: v for k, v in self.views().items()
                    if self.governing(v.name) == name and v.running}
        d = storage.plan_policy_storage(storage.PolicyStorageSnapshot(
            policy=name, spec=owner.spec, now=NOW, governed=governed, everyone=everyone,
            claims=self.claims, classes={}, updates_migrate=True, max_attempts=2,
            failed_attempts={f"{NS}/{n}": vm.failures for n, vm in self.vms.items()},
            uid=owner.uid))
        self.apply(d.create, d.update, d.delete, storage.Owner("policy", name, owner.uid))

    def drain_snapshot(self, name: str) -> DrainSnapshot:
        owner = self.drains[name]
        drained = DRAINS[name]
        vmis = {f"{NS}/{n}": vmi(n, vm.vmi.node, migratable=vm.vmi.migrating,
                                 not_migratable_reason=None if vm.vmi.migrating
                                 else "DisksNotLiveMigratable")
                for n, vm in self.vms.items() if vm.vmi is not None and not vm.vmi.ended}
        rules = {}
        for key in vmis:
            p = self.governing(key.split("/")[1])
            spec = self.policies[p].spec if p else None
            rules[key] = Rules(policy=p, storage=spec)
        return DrainSnapshot(
            name=name, generation=1, spec=NodeDrainSpec.model_validate({"nodeName": drained}),
            status=owner.status, now=NOW,
            nodes={n: node(n, unschedulable=n in {DRAINS[d] for d in self.drains})
                   for n in NODES},
            vmis=vmis, rules=rules, uid=owner.uid, storage=self.views(), claims=self.claims)

    def drain_pass(self, name: str, waited_long: bool) -> None:
        owner = self.drains.get(name)
        if owner is None:
            return
        if owner.deleting:
            d = finalize_drain(self.drain_snapshot(name),
                               waited=ABORT_WAIT_SECONDS if waited_long else 0.0)
            self.apply([], d.revert, d.delete_claims, storage.Owner("drain", name, owner.uid))
            if not d.hold:
                del self.drains[name]  # the finalizer goes
                STATS["drains ended" + (" with reverts pending" if d.revert else "")] += 1
            return
        d = plan_drain(self.drain_snapshot(name))
        owner.status = d.status
        self.apply(d.claims, d.volumes + d.revert, d.delete_claims,
                   storage.Owner("drain", name, owner.uid))

    def collect(self) -> None:
        owners = {storage.moved_by("policy", p): o.uid for p, o in self.policies.items()}
        owners |= {storage.moved_by("drain", d): o.uid for d, o in self.drains.items()}
        found = storage.collect(list(self.views().values()), self.claims, owners)
        for key, annotation in found.marks:
            c = self.claims[key]
            self.claims[key] = dataclasses.replace(
                c, completed=c.completed or annotation == storage.COMPLETED_ANNOTATION,
                abandoned=c.abandoned or annotation == storage.ABANDONED_ANNOTATION)
        for key, _v in found.delete:
            self.entitled(key, None)
            del self.claims[key]
            STATS["claims deleted by the collector"] += 1
        STATS["destinations kept, outcome unknown"] += len(found.kept)

    # the checks -------------------------------------------------------------------------------

    def check(self, step: object) -> None:
        for name, vm in self.vms.items():
            assert f"{NS}/{vm.data}" in self.claims, f"after {step}: {name}'s data is gone"
            named = {vm.template} | ({vm.vmi.spec, vm.vmi.running} if vm.vmi else set())
            for c in named:
                assert f"{NS}/{c}" in self.claims, f"after {step}: {name} names deleted {c}"
        for name, data in self.kept.items():
            assert f"{NS}/{data}" in self.claims, \
                f"after {step}: deleted {name}'s kept data ({data}) is gone"

    def orphans(self) -> list[str]:
        """Destination claims holding no VM's data that no remaining claim copies."""
        data = {f"{NS}/{vm.data}" for vm in self.vms.values()} | {
            f"{NS}/{c}" for c in self.kept.values()}
        sources = {f"{NS}/{c.source_claim}" for c in self.claims.values() if c.source_claim}
        return sorted(k for k, c in self.claims.items()
                      if c.source_claim and k not in data and k not in sources)


def new_world() -> World:
    w = World()
    for i, name in enumerate(VMS):
        w.add_claim(f"{name}-root", "local")
        w.vms[name] = VM(name, f"{name}-root", VMI(f"{name}-root", f"{name}-root",
                                                  "n1" if i < 3 else "n2"), f"{name}-root",
                         uid=w.uid())
    return w


# -- the sequences --------------------------------------------------------------------------------

POLICY_SPEC = st.builds(
    lambda mode, keep, target: StorageMigration.model_validate(
        {"mode": mode, "sourceClaims": keep, "targetStorageClass": target}),
    st.sampled_from(["Always", "OnDrain"]), st.sampled_from(["Keep", "Delete"]),
    st.sampled_from(CLASSES))
POLICIES, DRAIN_NAMES = st.sampled_from(sorted(SELECTS)), st.sampled_from(sorted(DRAINS))
A_VM = st.sampled_from(VMS)
# step -> (weight, its arguments): passes and KubeVirt's steps come more often than people's.
STEPS = {
    "policy set": (3, st.tuples(POLICIES, POLICY_SPEC)),
    "policy delete": (1, st.tuples(POLICIES)),
    "policy pass": (6, st.tuples(POLICIES)),
    "drain create": (2, st.tuples(DRAIN_NAMES)),
    "drain delete": (1, st.tuples(DRAIN_NAMES)),
    "drain pass": (6, st.tuples(DRAIN_NAMES, st.booleans())),
    "kubevirt reacts": (3, st.tuples(A_VM)),
    "kubevirt completes": (5, st.tuples(A_VM)),
    "kubevirt fails": (2, st.tuples(A_VM)),
    "vm delete": (1, st.tuples(A_VM)),
    "vm gone": (1, st.tuples(A_VM)),
}
STEP = st.sampled_from([k for k, (weight, _a) in STEPS.items() for _ in range(weight)]).flatmap(
    lambda kind: STEPS[kind][1].map(lambda args: (kind, *args)))


def run(w: World, step: tuple) -> None:
    what, name = step[0], step[1]
    if what == "policy set":
        if name not in w.policies:
            w.policies[name] = Owner(w.uid())
        if not w.policies[name].deleting:
            w.policies[name].spec = step[2]
    elif what == "policy delete" and name in w.policies:
        w.policies[name].deleting = True
    elif what == "policy pass":
        w.policy_pass(name)
    elif what == "drain create" and name not in w.drains:
        w.drains[name] = Owner(w.uid())
    elif what == "drain delete" and name in w.drains:
        w.drains[name].deleting = True
    elif what == "drain pass":
        w.drain_pass(name, step[2])
    elif what == "kubevirt reacts":
        w.react(name)
    elif what == "kubevirt completes":
        w.react(name)
        w.complete(name)
    elif what == "kubevirt fails":
        w.fail(name)
    elif what == "vm delete":
        w.delete_vm(name)
    elif what == "vm gone":
        w.vm_gone(name)
    w.collect()
    w.check(step)


def wind_down(w: World) -> None:
    """Every owner deleted, every VM deletion finished, KubeVirt and virtshift left to settle:
    rounds of each until a round changes nothing."""
    for o in (*w.policies.values(), *w.drains.values()):
        o.deleting = True
    before = None
    for _round in range(30):
        for name in list(w.vms):
            run(w, ("kubevirt reacts", name))
            if w.vms[name].deleting:
                run(w, ("vm gone", name))
        for p in list(w.policies):
            run(w, ("policy pass", p))
        for d in list(w.drains):
            run(w, ("drain pass", d, True))
        now = (sorted(w.claims), repr(w.vms), sorted(w.policies), sorted(w.drains))
        if now == before:
            break
        before = now
    assert not (w.policies or w.drains), f"owners left: {w.policies} {w.drains}"


def _short(arg: object) -> str:
    if isinstance(arg, StorageMigration):
        return f"{arg.mode}/{arg.source_claims}/{arg.target_storage_class}"
    return str(arg)


def _spec(mode: str, keep: str, target: str) -> StorageMigration:
    return StorageMigration.model_validate({"mode": mode, "sourceClaims": keep,
                                            "targetStorageClass": target})


# The cases, always run besides the generated ones.
FINISHED_THEN_VM_DELETED = [("policy set", "p0", _spec("Always", "Keep", "c1")),
                            ("policy pass", "p0"), ("kubevirt completes", "vm0"),
                            ("vm delete", "vm0"), ("vm gone", "vm0"), ("policy pass", "p0"),
                            ("policy delete", "p0"), ("policy pass", "p0")]
MOVED_AGAIN = [("policy set", "p0", _spec("Always", "Delete", "c1")), ("policy pass", "p0"),
               ("kubevirt completes", "vm2"), ("policy delete", "p0"), ("policy pass", "p0"),
               ("policy set", "p1", _spec("Always", "Keep", "c2")), ("policy pass", "p1"),
               ("kubevirt completes", "vm2"), ("policy pass", "p1")]
KEEP_MOVE_OF_A_DRAIN = [("policy set", "p0", _spec("OnDrain", "Keep", "local")),
                        ("drain create", "d"), ("drain pass", "d", False),
                        ("kubevirt completes", "vm0"), ("drain pass", "d", False),
                        ("policy set", "p0", _spec("Always", "Delete", "local")),
                        ("policy pass", "p0"), ("drain pass", "d", False)]
DRAIN_MADE_AGAIN = [("policy set", "p0", _spec("OnDrain", "Delete", "c1")),
                    ("drain create", "d"), ("drain pass", "d", False),
                    ("kubevirt completes", "vm1"), ("drain delete", "d"),
                    ("drain pass", "d", True), ("drain create", "d"), ("drain pass", "d", False)]
DRAIN_GONE_WITH_REVERTS_PENDING = [("drain create", "d"), ("drain pass", "d", False),
                                   ("kubevirt reacts", "vm0"), ("drain delete", "d"),
                                   ("drain pass", "d", True), ("kubevirt reacts", "vm0")]


@settings(max_examples=SEQUENCES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(STEP, min_size=20, max_size=120))
@example(FINISHED_THEN_VM_DELETED)
@example(MOVED_AGAIN)
@example(KEEP_MOVE_OF_A_DRAIN)
@example(DRAIN_MADE_AGAIN)
@example(DRAIN_GONE_WITH_REVERTS_PENDING)
def test_no_vm_data_is_lost_and_no_destination_is_left_behind(steps: list[tuple]) -> None:
    w = new_world()
    for step in steps:
        note(f"{step[0]} {', '.join(map(_short, step[1:]))}")
        run(w, step)
    wind_down(w)
    orphans = w.orphans()
    assert not orphans, f"orphan destination claims: {orphans}"
    STATS["sequences"] += 1
    STATS["steps"] += len(steps)


def test_report() -> None:
    """What the sequences above did (printed with -s; the counts are part of the report)."""
    print(f"\nstorage lineage: {dict(sorted(STATS.items()))}")
