"""virt-handler's per-VMI metrics, as Prometheus text: what an operator can learn about a
guest without asking the guest. Only the gauge virtshift uses is simulated:
``kubevirt_vmi_dirty_rate_bytes_per_second{namespace, name, node}``."""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from virtshift.sim.kubevirt import KubeVirtSim

DIRTY_RATE = "kubevirt_vmi_dirty_rate_bytes_per_second"


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


class VirtHandlerMetrics:
    def __init__(self, sim: KubeVirtSim, port: int = 0) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_DirtyRates(sim))
        self.server: WSGIServer
        self.server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
