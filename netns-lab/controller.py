"""The lab's control plane processes: the EndpointSlice controller, bootstrap and readiness.

They run inside the lab's control namespace (``svcnet lab controller|bootstrap|wait-ready``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time

from svcnet.lab.endpointslices import EndpointSliceController
from svcnet.lab.kubelet import heartbeat_age
from svcnet.lab.manifests import Applier, system_objects
from svcnet.lab.state import LabConfig

from svcnet.model import NODE, POD
from svcnet.store.base import Store, StoreError
from svcnet.store.open import open_store

log = logging.getLogger(__name__)


def _open(cfg: LabConfig) -> Store:
    return open_store(cfg.store_url, kubeconfig=cfg.kubeconfig)


async def run_controller(cfg: LabConfig) -> None:
    store = _open(cfg)
    controller = EndpointSliceController(store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(controller.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    for t in (task, stopper):
        t.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    await store.close()


async def bootstrap(cfg: LabConfig, attempts: int = 50) -> None:
    """Write what every cluster starts with (kube-dns), retrying while etcd elects."""
    store = _open(cfg)
    try:
        for attempt in range(attempts):
            try:
                await Applier(cfg, store).apply(system_objects(cfg))
                return
            except StoreError as err:
                if attempt == attempts - 1:
                    raise
                log.info("bootstrap: %s; retrying", err)
                await asyncio.sleep(0.2)
    finally:
        await store.close()


async def wait_ready(cfg: LabConfig, timeout: float, *, all_pods: bool = False) -> str:
    """Wait for every node to register and the pods to be Ready; '' or what is missing."""
    store = _open(cfg)
    deadline = time.monotonic() + timeout
    problem = "timed out"
    try:
        while time.monotonic() < deadline:
            try:
                problem = await _not_ready(cfg, store, all_pods)
            except StoreError as err:
                problem = f"store: {err}"
            if not problem:
                return ""
            await asyncio.sleep(0.1)
        return problem
    finally:
        await store.close()


async def _not_ready(cfg: LabConfig, store: Store, all_pods: bool) -> str:
    nodes = {raw.name: json.loads(raw.data) for raw in (await store.list(NODE)).items}
    missing = [n for n in cfg.node_names if n not in nodes]
    if missing:
        return f"nodes not registered: {', '.join(missing)}"
    stale = [n for n in cfg.node_names if (heartbeat_age(nodes[n]) or 1e9) > 3600]
    if stale:
        return f"nodes without heartbeat: {', '.join(stale)}"
    pods = [json.loads(raw.data) for raw in (await store.list(POD)).items]
    wanted = [p for p in pods if all_pods or (
        p["metadata"].get("namespace") == "kube-system")]
    unready = [f"{p['metadata'].get('namespace')}/{p['metadata']['name']}" for p in wanted
               if not p["metadata"].get("deletionTimestamp") and not any(
                   c.get("type") == "Ready" and c.get("status") == "True"
                   for c in p.get("status", {}).get("conditions", ()))]
    if unready:
        return f"pods not ready: {', '.join(sorted(unready))}"
    return ""
