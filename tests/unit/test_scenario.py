"""The scenario loader: examples load, expansion is seeded, bad input names its field."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtshift.api.units import GiB, MiB
from virtshift.sim.scenario import (
    Fault,
    Scenario,
    ScenarioError,
    VolumeSpec,
    load_scenario,
    parse_scenario,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"

# The full example from scenario-format.md: every documented field at least once.
FORMAT_EXAMPLE = """\
seed: 7
timeScale: 60
kubevirt:
  version: "1.9"
  parallelMigrationsPerCluster: 5
  parallelOutboundMigrationsPerNode: 2
  bandwidthPerMigration: 0
  completionTimeoutPerGiB: 150
  progressTimeout: 150
  allowAutoConverge: false
  allowPostCopy: false
network:
  nodeBandwidth: 10Gi
  targetPodStartup: 10s
storageClasses:
  - {name: local-lvm, nodeLocal: true, copyBandwidth: 500Mi}
  - {name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 1Gi}
nodes:
  - name: node-1
    cpuModel: Skylake-Server
    allocatable: {cpu: "64", memory: 512Gi}
    labels: {topology.kubernetes.io/zone: a}
    schedulable: true
  - generate: {count: 8, prefix: node-, start: 2, cpuModel: Skylake-Server,
               allocatable: {cpu: "64", memory: 512Gi}}
vms:
  - name: db-1
    namespace: prod
    node: node-1
    memory: 16Gi
    cpu: 4
    dirtyRate: 200Mi
    labels: {app: db}
    evictionStrategy: LiveMigrate
    cpuModel: host-model
    liveMigratable: true
    notMigratableReason: HostDeviceNotLiveMigratable
    volumes:
      - {name: rootdisk, claimName: db-1-root, size: 50Gi, storageClass: local-lvm}
  - generate:
      count: 40
      prefix: web-
      namespace: web
      nodes: [node-1, node-2]
      memory: [2Gi, 32Gi]
      dirtyRate: [10Mi, 400Mi]
      storageClass: ceph-rbd
      diskSize: 20Gi
faults:
  - {kind: failTargetPod, vm: db-1, attempt: 1}
  - {kind: nodeNotReady, node: node-4, at: 120s}
  - {kind: dirtyRateSpike, vm: web-3, dirtyRate: 3Gi, at: 0s}
"""

# A valid cluster the bad cases below modify by replacing top-level sections.
BASE = """\
storageClasses: [{name: ceph-rbd, accessMode: ReadWriteMany}]
nodes:
  - {name: node-0, allocatable: {cpu: "64", memory: 512Gi}}
  - generate: {count: 2, prefix: node-, allocatable: {cpu: "64", memory: 64Gi}}
vms:
  - {name: db-1, node: node-1, memory: 4Gi}
  - generate: {count: 4, prefix: web-, namespace: web, nodes: [node-1, node-2],
               memory: [1Gi, 4Gi], storageClass: ceph-rbd, diskSize: 10Gi}
"""


def _scenario(override: str = "") -> dict[str, Any]:
    return yaml.safe_load(BASE) | (yaml.safe_load(textwrap.dedent(override)) or {})


def test_base_is_valid() -> None:
    scenario = parse_scenario(_scenario())
    assert [n.name for n in scenario.nodes] == ["node-0", "node-1", "node-2"]
    assert len(scenario.vms) == 5


# --- examples ------------------------------------------------------------------------------------

EXAMPLE_COUNTS = [  # file, nodes, VMs (None: any)
    ("small.yaml", 3, 6),
    ("medium.yaml", 10, 100),
    ("large.yaml", 50, 2000),
    ("node-local.yaml", None, None),
    ("mixed-cpu.yaml", None, None),
    ("faults.yaml", None, None),
    ("storage.yaml", 4, 20),
    ("shared-nothing.yaml", 4, 10),
    ("postcopy.yaml", 4, 19),
]


@pytest.mark.parametrize(("filename", "nodes", "vms"), EXAMPLE_COUNTS)
def test_example_loads(filename: str, nodes: int | None, vms: int | None) -> None:
    scenario = load_scenario(EXAMPLES / filename)
    assert scenario.nodes and scenario.vms
    if nodes is not None:
        assert len(scenario.nodes) == nodes
    if vms is not None:
        assert len(scenario.vms) == vms


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == {row[0] for row in EXAMPLE_COUNTS}


def test_medium_crowds_node_1() -> None:
    scenario = load_scenario(EXAMPLES / "medium.yaml")
    on_node_1 = [vm for vm in scenario.vms if vm.node == "node-1"]
    assert len(on_node_1) >= 32
    assert all(2 * GiB <= vm.memory <= 16 * GiB for vm in on_node_1)
    assert all(10 * MiB <= vm.dirty_rate <= 300 * MiB for vm in on_node_1)
    pinned = [vm for vm in on_node_1 if not vm.live_migratable]
    assert len(pinned) >= 2
    assert {vm.not_migratable_reason for vm in pinned} == {"HostDeviceNotLiveMigratable"}
    assert scenario.time_scale == 60


def test_node_local_and_mixed_cpu_examples_have_what_they_promise() -> None:
    local = load_scenario(EXAMPLES / "node-local.yaml")
    local_classes = {c.name for c in local.storage_classes if c.node_local}
    assert local_classes and "ceph-rbd" in {c.name for c in local.storage_classes}
    assert any(v.storage_class in local_classes for vm in local.vms for v in vm.volumes)
    mixed = load_scenario(EXAMPLES / "mixed-cpu.yaml")
    assert len({n.cpu_model for n in mixed.nodes}) >= 2
    assert "host-model" in {vm.cpu_model for vm in mixed.vms}
    assert len({vm.cpu_model for vm in mixed.vms}) >= 2
    faults = load_scenario(EXAMPLES / "faults.yaml")
    assert {f.kind for f in faults.faults} == {"failTargetPod", "nodeNotReady", "dirtyRateSpike"}


# --- conversion and expansion --------------------------------------------------------------------


def test_format_example_accepts_every_field_and_converts_to_numbers() -> None:
    scenario = load_scenario(FORMAT_EXAMPLE)
    assert scenario.seed == 7 and scenario.time_scale == 60.0
    assert scenario.network.node_bandwidth == 10 * GiB
    assert scenario.network.target_pod_startup == 10.0
    assert scenario.storage_classes[0].node_local
    assert scenario.storage_classes[0].copy_bandwidth == 500 * MiB
    assert scenario.storage_classes[1].access_mode == "ReadWriteMany"
    assert [n.name for n in scenario.nodes] == [f"node-{i}" for i in range(1, 10)]
    node = scenario.nodes[0]
    assert (node.allocatable_cpu, node.allocatable_memory) == (64.0, 512 * GiB)
    assert node.labels == {"topology.kubernetes.io/zone": "a"}
    db = scenario.vms[0]
    assert (db.key, db.memory, db.cpu, db.dirty_rate) == ("prod/db-1", 16 * GiB, 4, 200 * MiB)
    assert db.volumes == [VolumeSpec(name="rootdisk", claim_name="db-1-root", size=50 * GiB,
                                     storage_class="local-lvm")]
    assert scenario.faults == [
        Fault(kind="failTargetPod", vm="prod/db-1", attempt=1),
        Fault(kind="nodeNotReady", node="node-4", at=120.0),
        Fault(kind="dirtyRateSpike", vm="web/web-3", dirty_rate=3 * GiB),
    ]


def test_generate_expands_in_order_round_robin_with_a_root_disk() -> None:
    scenario = load_scenario(FORMAT_EXAMPLE)
    web = scenario.vms[1:]
    assert [vm.name for vm in web] == [f"web-{i}" for i in range(1, 41)]
    assert [vm.node for vm in web[:4]] == ["node-1", "node-2", "node-1", "node-2"]
    for vm in web:
        assert vm.namespace == "web"
        assert 2 * GiB <= vm.memory <= 32 * GiB and vm.memory % MiB == 0
        assert 10 * MiB <= vm.dirty_rate <= 400 * MiB
        assert vm.volumes == [VolumeSpec(name="rootdisk", claim_name=f"{vm.name}-root",
                                         size=20 * GiB, storage_class="ceph-rbd")]


@pytest.mark.parametrize(("kubevirt", "release", "priority_queue", "stall_detection"), [
    ({}, "v1.9.0", True, False),
    ({"version": "1.9", "featureGates": ["MigrationStallDetection"]}, "v1.9.0", True, True),
    ({"version": 1.9}, "v1.9.0", True, False),  # an unquoted version reads as a number
    ({"version": "1.8"}, "v1.8.4", False, False),
    ({"version": "1.8", "featureGates": ["MigrationPriorityQueue"]}, "v1.8.4", True, False),
    ({"version": "1.7", "featureGates": ["MigrationPriorityQueue", "Sidecar"]}, "v1.7.4", True,
     False),
])
def test_kubevirt_version_and_feature_gates(kubevirt: dict, release: str, priority_queue: bool,
                                            stall_detection: bool) -> None:
    settings = parse_scenario(_scenario() | {"kubevirt": kubevirt}).kubevirt
    assert settings.release == release
    assert settings.feature_gates == tuple(kubevirt.get("featureGates", ()))
    assert settings.migration_priority_queue is priority_queue
    assert settings.migration_stall_detection is stall_detection


def test_defaults() -> None:
    scenario = parse_scenario({"nodes": [{"name": "n", "allocatable": {"cpu": 2, "memory": "8Gi"}}],
                               "vms": [{"name": "v", "node": "n", "memory": "1Gi"}]})
    assert scenario == Scenario(nodes=scenario.nodes, vms=scenario.vms)
    assert (scenario.seed, scenario.time_scale) == (0, 1.0)
    assert scenario.kubevirt.parallel_migrations_per_cluster == 5
    assert scenario.kubevirt.parallel_outbound_migrations_per_node == 2
    assert scenario.kubevirt.completion_timeout_per_gib == 150
    assert (scenario.kubevirt.version, scenario.kubevirt.feature_gates) == ("1.9", ())
    assert scenario.network.node_bandwidth == 10 * GiB
    assert scenario.network.target_pod_startup == 10.0
    node, vm = scenario.nodes[0], scenario.vms[0]
    assert (node.cpu_model, node.schedulable, node.labels) == ("Skylake-Server", True, {})
    assert (vm.namespace, vm.cpu, vm.dirty_rate, vm.cpu_model) == ("default", 1, 0.0, "host-model")
    assert (vm.eviction_strategy, vm.live_migratable, vm.volumes) == ("LiveMigrate", True, [])


def _memory_draws(seed: int) -> list[float]:
    return [vm.memory for vm in parse_scenario(_scenario(f"seed: {seed}")).vms[1:]]


def test_same_seed_same_expansion() -> None:
    assert load_scenario(FORMAT_EXAMPLE) == load_scenario(FORMAT_EXAMPLE)
    assert _memory_draws(3) == _memory_draws(3)


def test_different_seed_different_draws() -> None:
    assert _memory_draws(3) != _memory_draws(4)
    data = yaml.safe_load(FORMAT_EXAMPLE)
    other = parse_scenario(data | {"seed": 8})
    same = load_scenario(FORMAT_EXAMPLE)
    assert [vm.memory for vm in other.vms] != [vm.memory for vm in same.vms]


def test_loads_text_or_path(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(FORMAT_EXAMPLE)
    assert load_scenario(path) == load_scenario(str(path)) == load_scenario(FORMAT_EXAMPLE)


def test_models_are_frozen() -> None:
    scenario = load_scenario(FORMAT_EXAMPLE)
    with pytest.raises(ValueError, match="frozen"):
        scenario.vms[0].memory = 1  # type: ignore[misc]


# --- bad scenarios -------------------------------------------------------------------------------

BAD = [  # (override of BASE's top-level sections, a problem line must start with this)
    ("vms: [{name: db-1, node: node-1, memory: 16GB}]",
     "vms[0].memory: '16GB' is not a Kubernetes quantity"),
    ("nodes: [{name: node-1, cpuModell: x, allocatable: {cpu: '1', memory: 1Gi}}]",
     "nodes[0].cpuModell: unknown field (did you mean cpuModel?)"),
    ("timescale: 2", "timescale: unknown field (did you mean timeScale?)"),
    ("timeScale: 0", "timeScale: must be a finite number greater than 0"),
    ("timeScale: -5", "timeScale: must be a finite number greater than 0"),
    ("seed: -1", "seed: must be at least 0"),
    ("seed: lucky", "seed: must be a whole number"),
    ("kubevirt: {parallelMigrationsPerCluster: -1}",
     "kubevirt.parallelMigrationsPerCluster: must be at least 1"),
    ("kubevirt: {allowPostCopy: maybe}", "kubevirt.allowPostCopy: must be true or false"),
    ("kubevirt: {bandwidthPerMigration: -64Mi}",
     "kubevirt.bandwidthPerMigration: must be 0 or more"),
    ("kubevirt: {version: '1.6'}",
     "kubevirt.version: '1.6' is not a supported KubeVirt version (one of 1.7, 1.8, 1.9)"),
    ("kubevirt: {version: v1.9.0}", "kubevirt.version: 'v1.9.0' is not a supported"),
    ("kubevirt: {featureGates: MigrationPriorityQueue}",
     "kubevirt.featureGates: must be a list of feature gate names"),
    ("kubevirt: {featureGates: [migration-priority-queue]}",
     "kubevirt.featureGates[0]: 'migration-priority-queue' is not a feature gate name"),
    ("kubevirt: {featureGates: [Sidecar, 7]}",
     "kubevirt.featureGates[1]: 7 is not a feature gate name"),
    ("kubevirt: {featureGates: [Sidecar, Sidecar]}",
     "kubevirt.featureGates[1]: duplicate feature gate 'Sidecar' (also at [0])"),
    ("kubevirt: {version: '1.8', featureGates: [MigrationStallDetection]}",
     "kubevirt.featureGates[0]: MigrationStallDetection is not a feature gate of KubeVirt 1.8"),
    ("kubevirt: {featureGate: [Sidecar]}",
     "kubevirt.featureGate: unknown field (did you mean featureGates?)"),
    ("network: {nodeBandwidth: 0}", "network.nodeBandwidth: must be greater than 0"),
    ("network: {targetPodStartup: 10 parsecs}",
     "network.targetPodStartup: '10 parsecs' is not a duration"),
    ("storageClasses: [{name: local, nodeLocal: true, accessMode: ReadWriteMany}]",
     "storageClasses[0].accessMode: a nodeLocal storage class cannot be ReadWriteMany"),
    ("storageClasses: [{name: ceph-rbd, accessMode: ReadOnlyMany}]",
     "storageClasses[0].accessMode: 'ReadOnlyMany' is not one of"),
    ("nodes: {name: node-1}", "nodes: must be a list"),
    ("nodes: [{name: node-1}]", "nodes[0].allocatable: required field is missing"),
    ("nodes: [{name: Node_1, allocatable: {cpu: '1', memory: 1Gi}}]",
     "nodes[0].name: 'Node_1' is not a valid node name"),
    ("nodes: [{name: node-1, allocatable: {cpu: '1', memory: 1Gi, gpus: 1}}]",
     "nodes[0].allocatable.gpus: unknown field"),
    ("nodes: [{name: node-1, allocatable: {cpu: '1', memory: 1Gi}, labels: {zone: 1}}]",
     "nodes[0].labels['zone']: must be a string"),
    ("nodes: [{name: node-1, generate: {count: 1, prefix: n-, allocatable: {cpu: 1, memory: 1}}}]",
     "nodes[0].name: not allowed next to generate"),
    ("nodes: [{generate: {count: 0, prefix: n-, allocatable: {cpu: 1, memory: 1Gi}}}]",
     "nodes[0].generate.count: must be at least 1"),
    ("nodes: [{generate: {count: 2, prefix: N-, allocatable: {cpu: 1, memory: 1Gi}}}]",
     "nodes[0].generate.prefix: generates 'N-1'"),
    ("""\
     nodes:
       - {name: node-1, allocatable: {cpu: '1', memory: 1Gi}}
       - {name: node-1, allocatable: {cpu: '1', memory: 1Gi}}
     vms: []""", "nodes[1].name: duplicate node (also at nodes[0]): node-1"),
    ("vms: [{name: db-1, node: node-1, memory: 0}]", "vms[0].memory: must be greater than 0"),
    ("vms: [{name: db-1, node: node-1, memory: -1Gi}]", "vms[0].memory: must be greater than 0"),
    ("vms: [{name: db-1, node: node-1, memory: 1Gi, cpu: true}]",
     "vms[0].cpu: must be a whole number, got the boolean true"),
    ("vms: [{name: db-1, node: node-9, memory: 1Gi}]", "vms[0].node: unknown node 'node-9'"),
    ("vms: [{name: db-1, memory: 1Gi}]", "vms[0].node: required field is missing"),
    ("vms: [{name: db-1, node: node-1, memory: 1Gi, evictionStrategy: Migrate}]",
     "vms[0].evictionStrategy: 'Migrate' is not one of None, LiveMigrate"),
    ("vms: [{name: db-1, node: node-1, memory: 100Gi}]",
     "vms[0].memory: more than the node's allocatable memory: db-1 100.0Gi > node-1 64.0Gi"),
    ("vms: [{generate: {count: 3, prefix: big-, nodes: [node-1], memory: 30Gi}}]",
     "nodes[1].generate.allocatable.memory: node-1 has 64.0Gi allocatable but its VMs need 90.0Gi"),
    ("""\
     vms:
       - {name: db-1, node: node-1, memory: 1Gi}
       - {name: db-1, node: node-2, memory: 1Gi}""",
     "vms[1].name: duplicate VM (also at vms[0]): default/db-1"),
    ("""\
     vms:
       - {generate: {count: 5, prefix: web-, nodes: [node-1], memory: 1Gi}}
       - {generate: {count: 5, prefix: web-, nodes: [node-2], memory: 1Gi}}""",
     "vms[1].generate.prefix: duplicate VM (also at vms[0].generate): default/web-1, default/web-2,"
     " default/web-3 and 2 more"),
    ("""\
     vms:
       - name: a
         node: node-1
         memory: 1Gi
         volumes: [{name: root, claimName: disk, size: 1Gi, storageClass: ceph-rbd}]
       - name: b
         node: node-1
         memory: 1Gi
         volumes: [{name: root, claimName: disk, size: 1Gi, storageClass: ceph-rbd}]""",
     "vms[1].volumes[0].claimName: duplicate claim (also at vms[0].volumes[0].claimName)"),
    ("""\
     vms:
       - name: a
         node: node-1
         memory: 1Gi
         volumes: [{name: root, claimName: disk, size: 1Gi, storageClass: nfs}]""",
     "vms[0].volumes[0].storageClass: unknown storage class 'nfs'"),
    ("vms: [{name: a, node: node-1, memory: 1Gi, volumes: [{name: root, size: 1Gi}]}]",
     "vms[0].volumes[0].claimName: required field is missing"),
    ("vms: [{generate: {count: 2, prefix: a-, nodes: [node-1, node-7], memory: 1Gi}}]",
     "vms[0].generate.nodes[1]: unknown node 'node-7'"),
    ("vms: [{generate: {count: 2, prefix: a-, nodes: [node-1], memory: [4Gi, 1Gi]}}]",
     "vms[0].generate.memory: range minimum '4Gi' is above its maximum '1Gi'"),
    ("vms: [{generate: {count: 2, prefix: a-, nodes: [node-1], memory: [1Gi, 4GB]}}]",
     "vms[0].generate.memory[1]: '4GB' is not a Kubernetes quantity"),
    ("vms: [{generate: {count: 2, prefix: a-, nodes: [node-1], memory: 1Gi, storageClass: nfs,"
     " diskSize: 1Gi}}]", "vms[0].generate.storageClass: unknown storage class 'nfs'"),
    ("vms: [{generate: {count: 2, prefix: a-, nodes: [node-1], memory: 1Gi,"
     " storageClass: ceph-rbd}}]",
     "vms[0].generate.diskSize: required when storageClass is set"),
    ("faults: [{kind: failTargetPod, vm: ghost}]", "faults[0].vm: unknown VM 'ghost'"),
    ("faults: [{kind: nodeNotReady, node: node-9}]", "faults[0].node: unknown node 'node-9'"),
    ("faults: [{kind: failTargetPod}]", "faults[0].vm: required for kind failTargetPod"),
    ("faults: [{kind: nodeNotReady, at: 5m}]", "faults[0].node: required for kind nodeNotReady"),
    ("faults: [{kind: dirtyRateSpike, vm: db-1}]",
     "faults[0].dirtyRate: required for kind dirtyRateSpike"),
    ("faults: [{kind: failTargetPod, vm: db-1, dirtyRate: 1Gi}]",
     "faults[0].dirtyRate: not used by kind failTargetPod"),
    ("faults: [{kind: crash, vm: db-1}]", "faults[0].kind: 'crash' is not one of"),
    ("faults: [{kind: nodeNotReady, node: node-1, at: -5s}]", "faults[0].at: must be 0 or more"),
    ("faults: [{kind: failTargetPod, vm: db-1, attempt: 0}]",
     "faults[0].attempt: must be at least 1"),
    ("""\
     vms:
       - {name: db-1, namespace: a, node: node-1, memory: 1Gi}
       - {name: db-1, namespace: b, node: node-1, memory: 1Gi}
     faults: [{kind: failTargetPod, vm: db-1}]""",
     "faults[0].vm: 'db-1' is ambiguous; write one of a/db-1, b/db-1"),
]


@pytest.mark.parametrize(("override", "expected"), BAD, ids=[e.split(":")[0] for _, e in BAD])
def test_bad_scenario_names_the_field(override: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_scenario(override))
    lines = str(info.value).splitlines()
    assert any(line.startswith(expected) for line in lines), lines


def test_every_problem_is_reported_one_per_line() -> None:
    data = _scenario("""\
        seed: -1
        vms: [{name: db-1, node: node-9, memory: 16GB, colour: red}]
        faults: [{kind: dirtyRateSpike}]
    """)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert isinstance(info.value, ValueError)
    assert sorted(line.split(":")[0] for line in info.value.problems) == [
        "faults[0].dirtyRate", "faults[0].vm", "seed", "vms[0].colour", "vms[0].memory",
        "vms[0].node",
    ]
    assert str(info.value) == "\n".join(info.value.problems)


def test_many_generated_problems_are_collapsed() -> None:
    data = _scenario("""\
        vms:
          - {generate: {count: 500, prefix: a-, nodes: [node-0], memory: 1Mi}}
          - {generate: {count: 500, prefix: a-, nodes: [node-0], memory: 1Mi}}
    """)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert len(info.value.problems) == 1
    assert "and 497 more" in info.value.problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: 1\nseed: 2\n", r"^yaml: line 2, column 1: duplicate key 'seed'$"),
        ("nodes: [\n", r"^yaml: line \d+, column \d+: "),
        ("- a\n- b\n", r"^scenario: must be a mapping, got a list$"),
        ("# nothing\n", r"^scenario: the document is empty$"),
    ],
)
def test_bad_yaml(text: str, expected: str) -> None:
    with pytest.raises(ScenarioError, match=expected):
        load_scenario(text)


def test_problem_lines_start_with_a_field_path() -> None:
    for override, _ in BAD:
        with pytest.raises(ScenarioError) as info:
            parse_scenario(_scenario(override))
        for line in info.value.problems:
            assert re.match(r"^[A-Za-z][\w.\[\]'/-]*: ", line), line


def test_storage_example_labels_the_namespace_the_storage_policy_selects() -> None:
    scenario = load_scenario(EXAMPLES / "storage.yaml")
    assert {ns.name: ns.labels for ns in scenario.namespaces}["legacy"] == {
        "storage": "legacy-array"}
    assert {vm.volumes[0].storage_class for vm in scenario.vms} == {"legacy-array"}
    assert len({vm.namespace for vm in scenario.vms}) >= 3


def test_volume_kinds_and_filesystems_are_checked_by_field_path() -> None:
    base = """
storageClasses: [{name: c}]
nodes: [{name: n, allocatable: {cpu: "8", memory: 8Gi}}]
vms:
  - name: v
    node: n
    memory: 1Gi
    filesystems: [fs, nope]
    volumes:
      - {name: fs, claimName: a, size: 1Gi, storageClass: c, lun: true}
      - {name: d, claimName: b, size: 1Gi, storageClass: c, shareable: "yes", hotplug: true}
"""
    with pytest.raises(ScenarioError) as err:
        load_scenario(base)
    problems = err.value.problems
    assert any(p.startswith("vms[0].filesystems[1]: unknown volume 'nope'") for p in problems)
    assert any(p.startswith("vms[0].volumes[0].lun: a filesystem volume") for p in problems)
    assert any(p.startswith("vms[0].volumes[1].shareable:") for p in problems)
    ok = load_scenario(base.replace("fs, nope", "fs").replace(", lun: true", "")
                       .replace('"yes"', "true"))
    fs, d = ok.vms[0].volumes
    assert fs.filesystem and not fs.lun and d.shareable and d.hotplug
