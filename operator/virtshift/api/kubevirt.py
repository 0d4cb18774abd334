"""Names from KubeVirt's API that virtshift reads and writes (labels, phases, finalizers)."""

from __future__ import annotations

CPU_MODEL_LABEL = "cpu-model-migration.node.kubevirt.io/"
HOST_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
LAUNCHER_LABEL = "kubevirt.io"  # = "virt-launcher" on launcher pods
CREATED_BY_LABEL = "kubevirt.io/created-by"

MIGRATION_PHASES = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady",
                    "Running", "Succeeded", "Failed")
IN_FLIGHT_PHASES = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
FINAL_PHASES = ("Succeeded", "Failed")
