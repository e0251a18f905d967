"""EndpointSlices from Services' selectors and Pods' readiness, as the Kubernetes controller
makes them.

``desired_endpoints`` and ``plan_slices`` are pure (dicts in, dicts out) and follow
pkg/controller/endpointslice: ready = publishNotReadyAddresses or (pod Ready and not
terminating), serving = pod Ready, terminating = deletionTimestamp set; nodeName, zone,
hostname (when the pod's subdomain is the service), targetRef; at most 100 endpoints per
slice, endpoints stay in the slice they are in, and a Service with a selector but no
endpoints keeps one empty placeholder slice. ``EndpointSliceController`` runs them against a
store, stamping the ``endpoints.kubernetes.io/last-change-trigger-time`` annotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from svcnet.model import ENDPOINT_SLICE, NODE, POD, SERVICE, Kind
from svcnet.store.base import NotFound, Store, StoreError
from svcnet.watch import Listed, changes

log = logging.getLogger(__name__)

MAX_ENDPOINTS_PER_SLICE = 100
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.svcnet.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"

Obj = dict[str, Any]
PortGroup = tuple[tuple[str, str, int], ...]


def _meta(obj: Obj) -> Obj:
    meta: Obj = obj.get("metadata", {})
    return meta


def pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", ()))


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _resolve_ports(service: Obj, pod: Obj) -> PortGroup | None:
    """Service ports with targetPort resolved for this pod; None if a named port is absent."""
    container_ports = [p for c in pod.get("spec", {}).get("containers", ())
                       for p in c.get("ports", ())]
    out = []
    for sp in service.get("spec", {}).get("ports", ()):
        proto = sp.get("protocol", "TCP")
        target = sp.get("targetPort") or sp["port"]
        if isinstance(target, str) and not target.isdigit():
            found = [int(p["containerPort"]) for p in container_ports
                     if p.get("name") == target and p.get("protocol", "TCP") == proto]
            if not found:
                return None
            target = found[0]
        out.append((str(sp.get("name", "")), proto, int(target)))
    return tuple(out)


def desired_endpoints(service: Obj, pods: Iterable[Obj], nodes: dict[str, Obj]
                      ) -> dict[PortGroup, dict[str, Obj]]:
    """Endpoints per port mapping, keyed by address."""
    spec = service.get("spec", {})
    selector = spec.get("selector") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    svc_meta = _meta(service)
    groups: dict[PortGroup, dict[str, Obj]] = {}
    for pod in pods:
        meta = _meta(pod)
        status = pod.get("status", {})
        ip = status.get("podIP")
        if (not ip or meta.get("namespace", "default") != svc_meta.get("namespace", "default")
                or status.get("phase") in ("Succeeded", "Failed")
                or not selector_matches(selector, meta.get("labels") or {})):
            continue
        ports = _resolve_ports(service, pod)
        if ports is None:
            continue
        serving = pod_ready(pod)
        terminating = bool(meta.get("deletionTimestamp"))
        ready = publish or (serving and not terminating)
        pspec = pod.get("spec", {})
        node_name = pspec.get("nodeName", "")
        ep: Obj = {"addresses": [ip],
                   "conditions": {"ready": ready, "serving": serving,
                                  "terminating": terminating}}
        if pspec.get("hostname") and pspec.get("subdomain") == svc_meta.get("name"):
            ep["hostname"] = pspec["hostname"]
        if node_name:
            ep["nodeName"] = node_name
            zone = (_meta(nodes[node_name]).get("labels") or {}).get(ZONE_LABEL) \
                if node_name in nodes else None
            if zone:
                ep["zone"] = zone
        ep["targetRef"] = {"kind": "Pod", "namespace": meta.get("namespace", "default"),
                           "name": meta["name"], "uid": meta.get("uid", "")}
        groups.setdefault(ports, {})[ip] = ep
    return groups


def _slice_ports(group: PortGroup) -> list[Obj]:
    return [{"name": name, "protocol": proto, "port": port} for name, proto, port in group]


def _group_of(slice_: Obj) -> PortGroup:
    return tuple((str(p.get("name", "")), p.get("protocol", "TCP"), int(p.get("port", 0)))
                 for p in slice_.get("ports") or ())


@dataclass
class SlicePlan:
    put: list[Obj] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


def _random_suffix(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def plan_slices(service: Obj, existing: list[Obj], groups: dict[PortGroup, dict[str, Obj]],
                *, trigger_time: str, rng: random.Random | None = None,
                max_per_slice: int = MAX_ENDPOINTS_PER_SLICE) -> SlicePlan:
    """The writes that turn ``existing`` slices of ``service`` into the desired ones."""
    rng = rng or random.Random()
    svc_meta = _meta(service)
    plan = SlicePlan()
    remaining = {g: dict(eps) for g, eps in groups.items()}
    result: list[tuple[Obj, list[Obj], PortGroup]] = []
    for slice_ in sorted(existing, key=lambda s: _meta(s)["name"]):
        group = _group_of(slice_)
        wanted = remaining.get(group, {})
        kept = []
        for ep in slice_.get("endpoints") or ():
            addr = (ep.get("addresses") or [""])[0]
            if addr in wanted:
                kept.append(wanted.pop(addr))
        result.append((slice_, kept, group))
    for group, eps in remaining.items():
        for ep in eps.values():
            target = next((r for r in result if r[2] == group and len(r[1]) < max_per_slice),
                          None)
            if target is None:
                target = (_new_slice(service, rng), [], group)
                result.append(target)
            target[1].append(ep)
    non_empty = [r for r in result if r[1]]
    if not non_empty and result:
        # One empty placeholder, as the Kubernetes controller keeps, with no ports.
        keep = result[0]
        non_empty = [(keep[0], [], ())]
    elif not non_empty:
        non_empty = [(_new_slice(service, rng), [], ())]
    keep_names = {_meta(r[0])["name"] for r in non_empty}
    plan.delete = [_meta(s)["name"] for s in existing if _meta(s)["name"] not in keep_names]
    labels = {**(svc_meta.get("labels") or {}), SERVICE_NAME_LABEL: svc_meta["name"],
              MANAGED_BY_LABEL: MANAGED_BY}
    if service.get("spec", {}).get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    for slice_, members, group in non_empty:
        ordered = sorted(members, key=lambda e: e["addresses"][0])
        ports = _slice_ports(group)
        old_meta = _meta(slice_)
        if (slice_.get("endpoints") or []) == ordered and (slice_.get("ports") or []) == ports \
                and old_meta.get("labels") == labels:
            continue
        meta = {"name": old_meta["name"], "namespace": svc_meta.get("namespace", "default"),
                "labels": labels,
                "annotations": {**(old_meta.get("annotations") or {}),
                                TRIGGER_TIME: trigger_time},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                     "name": svc_meta["name"], "uid": svc_meta.get("uid", ""),
                                     "controller": True, "blockOwnerDeletion": True}]}
        if old_meta.get("generateName"):
            meta["generateName"] = old_meta["generateName"]
        plan.put.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                         "metadata": meta, "addressType": "IPv4", "endpoints": ordered,
                         "ports": ports})
    return plan


def _new_slice(service: Obj, rng: random.Random) -> Obj:
    name = _meta(service)["name"]
    prefix = name[:57] + "-"
    return {"metadata": {"name": prefix + _random_suffix(rng), "generateName": prefix}}


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _service_key(obj: Obj) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


class EndpointSliceController:
    """Watches Services, Pods, Nodes and EndpointSlices; keeps every selector's slices."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.services: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        self.nodes: dict[str, Obj] = {}
        self.slices: dict[str, Obj] = {}
        self.dirty: dict[str, float] = {}
        self.wake = asyncio.Event()
        self.synced: set[str] = set()

    async def run(self) -> None:
        watchers = [asyncio.create_task(self._watch(k)) for k in (SERVICE, POD, NODE,
                                                                   ENDPOINT_SLICE)]
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if len(self.synced) < 4:
                    continue
                await self.sync_dirty()
        finally:
            for w in watchers:
                w.cancel()

    def _cache(self, kind: Kind[Any]) -> dict[str, Obj]:
        return {"Service": self.services, "Pod": self.pods, "Node": self.nodes,
                "EndpointSlice": self.slices}[kind.name]

    async def _watch(self, kind: Kind[Any]) -> None:
        cache = self._cache(kind)
        async for change in changes(self.store, kind):
            now = time.time()
            touched: list[Obj] = []
            if isinstance(change, Listed):
                touched = list(cache.values())
                cache.clear()
                for raw in change.items:
                    cache[raw.key] = json.loads(raw.data)
                touched += cache.values()
                self.synced.add(kind.name)
            elif change.obj is not None:
                key = change.obj.key
                old = cache.get(key)
                if change.type.value == "DELETED":
                    cache.pop(key, None)
                elif change.type.value in ("ADDED", "MODIFIED"):
                    cache[key] = json.loads(change.obj.data)
                touched = [o for o in (old, cache.get(key)) if o is not None]
            self._mark(kind, touched, now)
            self.wake.set()

    def _mark(self, kind: Kind[Any], objs: list[Obj], now: float) -> None:
        keys: set[str] = set()
        if kind.name == "Service":
            keys = {_service_key(o) for o in objs}
        elif kind.name == "EndpointSlice":
            keys = {f"{_meta(o).get('namespace', 'default')}/"
                    f"{(_meta(o).get('labels') or {}).get(SERVICE_NAME_LABEL, '')}"
                    for o in objs}
        elif kind.name == "Pod":
            namespaces = {_meta(o).get("namespace", "default") for o in objs}
            keys = {k for k, s in self.services.items()
                    if _meta(s).get("namespace", "default") in namespaces}
        else:
            keys = set(self.services)
        for key in keys:
            self.dirty.setdefault(key, now)

    async def sync_dirty(self) -> None:
        dirty, self.dirty = self.dirty, {}
        for key, first_change in dirty.items():
            try:
                await self.sync_service(key, first_change)
            except StoreError as err:
                log.warning("syncing slices of %s: %s; retrying", key, err)
                self.dirty.setdefault(key, first_change)
                await asyncio.sleep(0.2)
                self.wake.set()

    def slices_of(self, key: str) -> list[Obj]:
        namespace, _, name = key.partition("/")
        return [s for s in self.slices.values()
                if _meta(s).get("namespace", "default") == namespace
                and (_meta(s).get("labels") or {}).get(SERVICE_NAME_LABEL) == name
                and (_meta(s).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY]

    async def sync_service(self, key: str, first_change: float) -> None:
        namespace, _, _name = key.partition("/")
        service = self.services.get(key)
        existing = self.slices_of(key)
        if service is None or service.get("spec", {}).get("selector") is None \
                or service.get("spec", {}).get("type") == "ExternalName":
            for s in existing:
                with contextlib.suppress(NotFound):
                    await self.store.delete(ENDPOINT_SLICE, namespace, _meta(s)["name"])
            return
        groups = desired_endpoints(service, self.pods.values(), self.nodes)
        plan = plan_slices(service, existing, groups, trigger_time=rfc3339(first_change))
        for obj in plan.put:
            raw = await self.store.put(ENDPOINT_SLICE, obj)
            self.slices[raw.key] = json.loads(raw.data)
        for name in plan.delete:
            with contextlib.suppress(NotFound):
                await self.store.delete(ENDPOINT_SLICE, namespace, name)
            self.slices.pop(f"{namespace}/{name}", None)
