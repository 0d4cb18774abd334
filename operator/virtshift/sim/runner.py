"""Start the whole simulator: KubeVirt's identities and CR, virt-api's admission webhooks, the
scenario's objects, and the simulated virt-controller/virt-handler.

The simulator acts as KubeVirt's own ServiceAccounts (``virtshift.sim.identity``): it writes as
``kubevirt-controller``, and the webhooks read and mark as ``kubevirt-apiserver``; the client it
is given (an admin's) only sets those up and installs the KubeVirt CR and the webhook
configurations. The webhooks are registered before the scenario's objects are created, so those
are admitted as KubeVirt would admit them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from virtshift.k8s.rest import KubeClient
from virtshift.sim import objects
from virtshift.sim.clock import SimClock
from virtshift.sim.identity import Identities, ensure_identities
from virtshift.sim.kubevirt import KubeVirtSim
from virtshift.sim.metrics import VirtHandlerMetrics
from virtshift.sim.populate import World, ensure_kubevirt, populate
from virtshift.sim.scenario import Scenario, load_scenario
from virtshift.sim.webhook import AdmissionWebhooks

# For ``virtshift run --downtime-source``: the simulator measures each migration's switch-over
# downtime and writes it on the VMIM, as real KubeVirt does not. The demo and the tests
# configure it explicitly; the operator has no default source.
DOWNTIME_SOURCE = f"annotation={objects.DOWNTIME_ANNOTATION}"


@dataclass
class Simulator:
    kube: KubeClient  # the admin client the simulator was started with
    scenario: Scenario
    clock: SimClock
    world: World
    kubevirt: KubeVirtSim
    webhook: AdmissionWebhooks | None
    metrics: VirtHandlerMetrics
    identities: Identities
    stopped: bool = False

    def stop(self) -> None:
        """Remove the webhook configurations and stop every part (once; later calls return)."""
        if self.stopped:
            return
        self.stopped = True
        if self.webhook:
            self.webhook.stop()
        self.metrics.stop()
        self.kubevirt.stop()


def start(kube: KubeClient, scenario: Scenario | str | Path, webhook: bool = True,
          log: Callable[[str], None] = print, metrics_port: int = 0) -> Simulator:
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    ids = ensure_identities(kube)
    clock = SimClock(scenario.time_scale, epoch=ensure_kubevirt(kube, scenario))
    hooks = AdmissionWebhooks(kube, ids.api).start() if webhook else None
    try:
        world = populate(ids.controller, scenario, clock, log)
        sim = KubeVirtSim(ids.controller, world, clock).start()
    except BaseException:
        if hooks:
            hooks.stop()
        raise
    if hooks:
        # The webhook only marks the VMI (status.evacuationNodeName), which the evacuation
        # controller reads; this wakes it at once instead of at its next resync.
        hooks.on_marked = sim.request_evacuation
    metrics = VirtHandlerMetrics(sim, metrics_port)
    log(f"simulating KubeVirt {scenario.kubevirt.release} at {scenario.time_scale:g}x time"
        + (f"; virt-api webhooks on 127.0.0.1:{hooks.port}" if hooks else "")
        + f"; virt-handler metrics at {metrics.url}")
    return Simulator(kube, scenario, clock, world, sim, hooks, metrics, ids)


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
