"""Status shapes of storage moves (live storage migration and shared-nothing migration),
shared by NodeDrain and MigrationPolicy."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from virtshift.api.common import Model


class VolumePhase(StrEnum):
    PENDING = "Pending"  # planned (dry run) or waiting for a slot
    COPYING = "Copying"  # the VM points at the destination; KubeVirt copies
    COMPLETED = "Completed"  # the VM runs on the destination
    REVERTED = "Reverted"  # cancelled or failed: the VM is back on the source


class VolumeEntry(Model):
    name: str = Field(description="The VM's volume.")
    source_claim: str = Field(description="The PersistentVolumeClaim it is copied from.")
    destination_claim: str = Field(description="The PersistentVolumeClaim it is copied to.")
    storage_class: str | None = Field(None, description="The destination claim's class.")
    size_bytes: int | None = Field(None, description="The source claim's size; the destination "
                                   "is at least as large.")
    phase: VolumePhase = Field(description="Pending, Copying, Completed or Reverted.")
    predicted_seconds: float | None = Field(
        None, description="Predicted copy time at the class's bandwidth (a prediction).")
    start_time: str | None = Field(None, description="When the VM was pointed at the "
                                   "destination.", json_schema_extra={"format": "date-time"})
    duration_seconds: float | None = Field(
        None, description="Observed: from startTime to the VM running on the destination, or "
        "until now while copying.")


class StorageVMPhase(StrEnum):
    PENDING = "Pending"
    COPYING = "Copying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    REFUSED = "Refused"  # KubeVirt cannot move these disks; nothing was touched


class StorageVMEntry(Model):
    namespace: str = Field(description="The VM's namespace.")
    name: str = Field(description="The VM's name.")
    phase: StorageVMPhase = Field(description="Pending, Copying, Succeeded, Failed or Refused.")
    reason: str | None = Field(None, description="Why, as a CamelCase word.")
    message: str | None = Field(None, description="Why, as a sentence.")
    volumes: list[VolumeEntry] | None = Field(None, max_length=32,
                                              description="Each volume moved.")


class StorageCounts(Model):
    pending: int = Field(0, description="VMs waiting for a copy slot.")
    copying: int = Field(0, description="VMs whose disks are being copied.")
    succeeded: int = Field(0, description="VMs running on their destination claims.")
    failed: int = Field(0, description="VMs whose move failed and was reverted, or that need "
                        "manual recovery.")
    refused: int = Field(0, description="VMs whose disks KubeVirt cannot move.")


MAX_STORAGE_ENTRIES = 200


class StorageStatus(Model):
    counts: StorageCounts = Field(default_factory=StorageCounts,
                                  description="VMs by storage move phase.")
    bytes_moved: int | None = Field(None, description="Bytes of the volumes now on their "
                                    "destination.")
    vms: list[StorageVMEntry] | None = Field(
        None, max_length=MAX_STORAGE_ENTRIES, description="Per VM, failed and copying first.")
