"""Start the whole simulator: populate the scenario, drive KubeVirt, intercept evictions."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtshift.k8s.rest import KubeClient
from virtshift.sim.clock import SimClock
from virtshift.sim.kubevirt import KubeVirtSim
from virtshift.sim.metrics import VirtHandlerMetrics
from virtshift.sim.populate import World, ensure_kubevirt, populate
from virtshift.sim.scenario import Scenario, load_scenario
from virtshift.sim.webhook import EvictionWebhook


@dataclass
class Simulator:
    kube: KubeClient
    scenario: Scenario
    clock: SimClock
    world: World
    kubevirt: KubeVirtSim
    webhook: EvictionWebhook | None
    metrics: VirtHandlerMetrics

    def stop(self) -> None:
        if self.webhook:
            self.webhook.stop()
        self.metrics.stop()
        self.kubevirt.stop()


def start(kube: KubeClient, scenario: Scenario | str | Path, webhook: bool = True,
          log: Callable[[str], None] = print, metrics_port: int = 0) -> Simulator:
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    clock = SimClock(scenario.time_scale, epoch=ensure_kubevirt(kube, scenario))
    world = populate(kube, scenario, clock, log)
    sim = KubeVirtSim(kube, world, clock).start()
    hook = EvictionWebhook(kube, sim).start() if webhook else None
    metrics = VirtHandlerMetrics(sim, metrics_port)
    log(f"simulating KubeVirt at {scenario.time_scale:g}x time"
        + (f"; eviction webhook on 127.0.0.1:{hook.port}" if hook else "")
        + f"; virt-handler metrics at {metrics.url}")
    return Simulator(kube, scenario, clock, world, sim, hook, metrics)


def run_forever(scenario_path: str, kubeconfig: str | None, webhook: bool,
                metrics_port: int = 0) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sim = start(KubeClient.from_kubeconfig(kubeconfig), scenario_path, webhook,
                metrics_port=metrics_port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    sim.stop()
    return 0
