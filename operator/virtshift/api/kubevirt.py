"""Names from KubeVirt's API that virtshift reads and writes (labels, phases, finalizers).

The node labels are virt-handler's node labeller's (staging/src/kubevirt.io/api/core/v1/types.go).
"""

from __future__ import annotations

CPU_MODEL_LABEL = "cpu-model.node.kubevirt.io/"  # a named model usable on the node
MIGRATION_CPU_MODEL_LABEL = "cpu-model-migration.node.kubevirt.io/"  # host models it accepts
HOST_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"  # the node's own host model
HOST_MODEL_FEATURE_LABEL = "host-model-required-features.node.kubevirt.io/"
CPU_FEATURE_LABEL = "cpu-feature.node.kubevirt.io/"
CPU_VENDOR_LABEL = "cpu-vendor.node.kubevirt.io/"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
MIGRATION_TARGET_LABEL = "kubevirt.io/migrationTargetNodeName"
LAUNCHER_LABEL = "kubevirt.io"  # = "virt-launcher" on launcher pods
CREATED_BY_LABEL = "kubevirt.io/created-by"
MIGRATION_JOB_LABEL = "kubevirt.io/migrationJobUID"  # on a migration's target pod

MIGRATION_PHASES = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady",
                    "Running", "Succeeded", "Failed")
IN_FLIGHT_PHASES = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
FINAL_PHASES = ("Succeeded", "Failed")
