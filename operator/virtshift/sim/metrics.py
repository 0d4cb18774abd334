"""virt-handler's per-VMI metrics, as Prometheus text: what an operator can learn about a
guest without asking the guest. Only the gauges virtshift uses are simulated:

* ``kubevirt_vmi_dirty_rate_bytes_per_second{namespace, name, node}``;
* ``kubevirt_vmi_migration_data_remaining_bytes{namespace, name, node}`` while a VMI's migration
  transfers (pkg/monitoring/metrics/virt-handler/migrationdomainstats: libvirt's job
  DataRemaining, reported from the migration's start until ``migrationState.completed``; the
  node is the VMI's, the source). KubeVirt samples it every 5 s and hands each sample out
  once, with its timestamp; the simulator reports the value at the scrape, without one."""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from virtshift.sim.kubevirt import KubeVirtSim

DIRTY_RATE = "kubevirt_vmi_dirty_rate_bytes_per_second"
DATA_REMAINING = "kubevirt_vmi_migration_data_remaining_bytes"


class _DirtyRates(Collector):
    def __init__(self, sim: KubeVirtSim) -> None:
        self.sim = sim

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(DIRTY_RATE, "Guest dirty-rate in bytes per second.",
                                   labels=["namespace", "name", "node"])
        for vm in list(self.sim.world.vms.values()):
            if vm.running:
                family.add_metric([vm.spec.namespace, vm.spec.name, vm.node], vm.dirty_rate)
        yield family
        remaining = GaugeMetricFamily(DATA_REMAINING, "The remaining guest OS data to be "
                                      "migrated to the new VM.",
                                      labels=["namespace", "name", "node"])
        for f in list(self.sim.flights.values()):
            if f.phase == "Running" and f.run is not None and f.vm is not None \
                    and not f.run.done:
                # libvirt's DataRemaining covers the disks a block migration still copies.
                remaining.add_metric([f.vm.spec.namespace, f.vm.spec.name, f.source],
                                     f.run.remaining + f.disk_bytes_left)
        yield remaining


class VirtHandlerMetrics:
    def __init__(self, sim: KubeVirtSim, port: int = 0) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_DirtyRates(sim))
        self.server: WSGIServer
        self.server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
