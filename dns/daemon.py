"""Running the DNS server against the watch client, standalone or inside ``svcnet node``.

``DNSComponent.run`` wires informer handlers to ``ClusterZone`` (a change to a Service or to
an EndpointSlice recomputes that one Service), marks the zone synced once every informer it
uses has listed, serves DNS, and exposes /health (lame duck on shutdown), /ready and
/metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from svcnet.httpserve import HTTPServer, Response, metrics_route
from svcnet.model import ENDPOINT_SLICE, SERVICE, SERVICE_NAME_LABEL, Kind, Service
from svcnet.store.base import Store
from svcnet.watch import Callbacks, Informer, InformerFactory, by_service_name

log = logging.getLogger(__name__)

TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

# The slim records below are gc=False: they hold only strings, numbers and tuples or dicts of
# those (no cycles possible), so they need no collector header and no collector scans.


class _PodMeta(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    namespace: str = ""
    resource_version: str = ""

    def __post_init__(self) -> None:
        # A few namespaces shared by 100k pods: one string each, not one per pod.
        msgspec.structs.force_setattr(self, "namespace", sys.intern(self.namespace))


class _PodIP(msgspec.Struct, frozen=True, gc=False):
    ip: str


class _PodStatus(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    pod_ip: str = msgspec.field(default="", name="podIP")
    pod_ips: tuple[_PodIP, ...] = msgspec.field(default=(), name="podIPs")

    def __post_init__(self) -> None:
        if len(self.pod_ips) == 1 and self.pod_ips[0].ip == self.pod_ip:
            msgspec.structs.force_setattr(self, "pod_ips", ())  # single-stack: podIP says it


class PodAddresses(msgspec.Struct, frozen=True, gc=False):
    """The only part of a Pod ``pods verified`` needs: namespace and IPs. DNS watches Pods
    through its own informer of these, as CoreDNS slims objects on arrival; no other
    component watches Pods. The name is not kept (the informer keys by the store's key),
    namespaces are interned and a single-stack pod keeps one IP string: 5 small objects
    per pod instead of the full record's hundreds."""

    metadata: _PodMeta
    status: _PodStatus = _PodStatus()

    @property
    def ips(self) -> tuple[str, ...]:
        if self.status.pod_ips:
            return tuple(p.ip for p in self.status.pod_ips)
        return (self.status.pod_ip,) if self.status.pod_ip else ()


POD_ADDRESSES: Kind[Any] = Kind("Pod", "v1", "pods", True, PodAddresses)  # type: ignore[type-var]


class _NamespaceMeta(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    name: str = ""
    namespace: str = ""  # always empty (cluster-scoped); the watch cache indexes by it
    resource_version: str = ""


class NamespaceName(msgspec.Struct, frozen=True, gc=False):
    """A Namespace is only its name to DNS: existing namespaces answer NODATA
    (``<ns>.svc.<zone>``) and hold pod names, as in CoreDNS."""

    metadata: _NamespaceMeta


NAMESPACE_NAMES: Kind[Any] = Kind(  # type: ignore[type-var]
    "Namespace", "v1", "namespaces", False, NamespaceName)


def local_addresses(host: str) -> list[str]:
    """Our non-loopback addresses, as CoreDNS's: the listen address, or with a wildcard
    every local address of this network namespace (IPv4 from /proc/net/fib_trie, IPv6 from
    /proc/net/if_inet6)."""
    import ipaddress

    if host not in ("0.0.0.0", "::", ""):
        return [] if ipaddress.ip_address(host).is_loopback else [host]
    out: list[str] = []
    with contextlib.suppress(OSError), open("/proc/net/fib_trie") as f:
        last = ""
        for line in f:
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text == "/32 host LOCAL" and last and last not in out and \
                    not ipaddress.ip_address(last).is_loopback:
                out.append(last)
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            raw = line.split()[0]
            ip = ipaddress.IPv6Address(bytes.fromhex(raw))
            if not (ip.is_loopback or ip.is_link_local) and str(ip) not in out:
                out.append(str(ip))
    return out


class _SliceMeta(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    name: str
    namespace: str = ""
    resource_version: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class _Conditions(msgspec.Struct, frozen=True, gc=False):
    ready: bool | None = None


class _Ref(msgspec.Struct, frozen=True, gc=False):
    kind: str = ""
    name: str = ""


class _Endpoint(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    addresses: tuple[str, ...]
    conditions: _Conditions = _Conditions()
    hostname: str | None = None
    target_ref: _Ref | None = None

    @property
    def ready(self) -> bool:
        return self.conditions.ready is not False


class _Port(msgspec.Struct, frozen=True, gc=False):
    name: str = ""
    protocol: str = "TCP"
    port: int = 0


class SliceAddresses(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """The part of an EndpointSlice DNS reads, with its endpoints kept packed.

    Only headless Services' endpoints are ever read (ClusterIP answers do not depend on
    them), so the endpoints array is validated on arrival, then kept as one bytes object
    (msgpack arrays of just the fields DNS reads) and decoded on access: at 10k slices of 10
    endpoints that is ~0.4 KB per slice instead of ~4 KB of small objects (or ~1.4 KB of
    JSON text). Standalone ``svcnet dns`` watches these, as CoreDNS slims objects on arrival;
    inside ``svcnet node`` the DNS shares the node's full EndpointSlice informer instead of
    opening a second watch.
    """

    metadata: _SliceMeta
    address_type: str
    # JSON as received; after __post_init__ the packed form (see _pack_endpoints).
    raw_endpoints: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"[]"), name="endpoints")
    ports: tuple[_Port, ...] | None = ()

    def __post_init__(self) -> None:
        # A real apiserver sends an empty list as null (an emptied slice, a portless one).
        if self.ports is None:
            msgspec.structs.force_setattr(self, "ports", ())
        endpoints = _ENDPOINTS.decode(self.raw_endpoints) or ()  # rejects a malformed slice now
        msgspec.structs.force_setattr(self, "raw_endpoints", _pack_endpoints(endpoints))

    @property
    def endpoints(self) -> tuple[_Endpoint, ...]:
        return _unpack_endpoints(self.raw_endpoints)

    @property
    def service_name(self) -> str:
        return self.metadata.labels.get(SERVICE_NAME_LABEL, "")


_ENDPOINTS = msgspec.json.Decoder(tuple[_Endpoint, ...] | None)
_Packed = tuple[tuple[str, ...], bool | None, str | None, tuple[str, str] | None]
_PACKED = msgspec.msgpack.Decoder(tuple[_Packed, ...])
_PACK = msgspec.msgpack.Encoder()


def _pack_endpoints(endpoints: tuple[_Endpoint, ...]) -> msgspec.Raw:
    return msgspec.Raw(_PACK.encode([
        (e.addresses, e.conditions.ready, e.hostname,
         (e.target_ref.kind, e.target_ref.name) if e.target_ref is not None else None)
        for e in endpoints]))


def _unpack_endpoints(packed: msgspec.Raw) -> tuple[_Endpoint, ...]:
    return tuple(
        _Endpoint(addresses, _Conditions(ready) if ready is not None else _NO_CONDITIONS,
                  hostname, _Ref(*ref) if ref is not None else None)
        for addresses, ready, hostname, ref in _PACKED.decode(packed))


_NO_CONDITIONS = _Conditions()


SLICE_ADDRESSES: Kind[Any] = Kind(  # type: ignore[type-var]
    "EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True, SliceAddresses)


@dataclass
class DNSOptions:
    listen: tuple[str, int] = ("127.0.0.1", 53)
    zone: str = "cluster.local"
    ttl: int = 5
    pods: str = "insecure"
    endpoint_pod_names: bool = False
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    stub_domains: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    workers: int = field(default_factory=lambda: usable_cpus())
    health_port: int = 0  # 0: no HTTP health server; -1 is never used
    metrics_port: int = 0
    health_host: str = "127.0.0.1"  # CoreDNS's health/ready plugins listen on all addresses
    metrics_host: str = "127.0.0.1"
    query_log: bool = False
    cache_size: int = 9984
    cache_min_ttl: int = 5
    max_concurrent: int = 1000
    forward_timeout: float = 2.0
    lameduck: float = 0.0
    tcp_idle_timeout: float = 10.0  # CoreDNS's defaults: idle 10 s, read and write 5 s
    tcp_write_timeout: float = 5.0
    tcp_max_connections: int = 1000
    loop_probe_interval: float = 30.0  # seconds between forwarding-loop probes per upstream
    slim_informers: bool = True  # own slim EndpointSlice informer (standalone), else shared


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_listen(text: str) -> tuple[str, int]:
    from svcnet.dns.forward import parse_hostport

    return parse_hostport(text)


def options_from_args(args: argparse.Namespace, prefix: str = "") -> DNSOptions:
    """Build options from ``svcnet dns`` flags (prefix "") or ``svcnet node`` ones ("dns_")."""
    from svcnet.dns.forward import parse_hostport, resolv_conf_upstreams

    def get(name: str) -> Any:
        return getattr(args, prefix + name)

    upstream = get("upstream")
    upstreams = [parse_hostport(u) for item in upstream for u in item.split(",")] if upstream \
        else resolv_conf_upstreams()
    stubs: dict[str, list[tuple[str, int]]] = {}
    for item in get("stub_domain") or []:
        domain, sep, servers = item.partition("=")
        if not sep or not domain or not servers:
            from svcnet.cli import UsageError

            raise UsageError(f"--stub-domain {item!r}: expected DOMAIN=IP[:PORT][,IP...]")
        stubs[domain.strip(".").lower() + "."] = [parse_hostport(s) for s in servers.split(",")]
    return DNSOptions(
        listen=parse_hostport(get("listen")), zone=get("zone"), ttl=get("ttl"), pods=get("pods"),
        endpoint_pod_names=get("endpoint_pod_names"), upstreams=upstreams, stub_domains=stubs,
        workers=usable_cpus() if get("workers") is None else get("workers"),
        health_port=get("health_port"), metrics_port=get("metrics_port"),
        health_host=get("health_host"), metrics_host=get("metrics_host"),
        query_log=get("query_log"), cache_size=get("cache_size"),
        cache_min_ttl=get("cache_min_ttl"), forward_timeout=get("forward_timeout"),
        max_concurrent=get("max_concurrent"), lameduck=get("lameduck"))


def add_dns_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The DNS flags; ``svcnet node`` adds them with prefix "dns-"."""
    p = "--" + prefix
    parser.add_argument(p + "listen", default="127.0.0.1:53", help="UDP+TCP address")
    parser.add_argument(p + "zone", default="cluster.local")
    parser.add_argument(p + "ttl", type=int, default=5, help="TTL of cluster answers")
    parser.add_argument(p + "pods", choices=("insecure", "verified", "disabled"),
                        default="insecure")
    parser.add_argument(p + "endpoint-pod-names", action="store_true",
                        help="name headless endpoints after their pod")
    parser.add_argument(p + "upstream", action="append", default=None,
                        help="IP[:PORT], repeatable (default: /etc/resolv.conf)")
    parser.add_argument(p + "stub-domain", action="append", default=None,
                        help="DOMAIN=IP[:PORT][,IP...], repeatable")
    parser.add_argument(p + "workers", type=int, default=None,
                        help="UDP worker processes (default: one per usable CPU; 0: serve UDP "
                             "in the main process)")
    parser.add_argument(p + "health-port", type=int, default=0, help="/health and /ready")
    parser.add_argument(p + "metrics-port", type=int, default=0, help="/metrics")
    parser.add_argument(p + "health-host", default="127.0.0.1",
                        help="address of /health and /ready (0.0.0.0 or :: for all)")
    parser.add_argument(p + "metrics-host", default="127.0.0.1",
                        help="address of /metrics (0.0.0.0 or :: for all)")
    parser.add_argument(p + "query-log", action="store_true", help="log every query")
    parser.add_argument(p + "cache-size", type=int, default=9984)
    parser.add_argument(p + "cache-min-ttl", type=int, default=5)
    parser.add_argument(p + "max-concurrent", type=int, default=1000,
                        help="forwarded queries in flight before answering REFUSED")
    parser.add_argument(p + "forward-timeout", type=float, default=2.0,
                        help="seconds before trying the next upstream")
    parser.add_argument(p + "lameduck", type=float, default=0.0,
                        help="seconds to keep serving with /health failing at shutdown")


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    add_dns_arguments(parser.add_argument_group("dns"), prefix="dns-")  # type: ignore[arg-type]


def node_component(args: argparse.Namespace) -> DNSComponent:
    options = options_from_args(args, prefix="dns_")
    options.slim_informers = False  # share the node's EndpointSlice informer with the proxy
    return DNSComponent(options)


def release_free_memory() -> None:
    """Hand the first listing's freed buffers back to the OS (glibc keeps them otherwise)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class DNSComponent:
    name = "dns"

    def __init__(self, options: DNSOptions) -> None:
        self.options = options
        self.ready = asyncio.Event()
        self.healthy = True
        self.server: Any = None
        self.zone: Any = None

    async def run(self, factory: InformerFactory, store: Store) -> None:
        from svcnet.dns import metrics
        from svcnet.dns.cache import ResponseCache
        from svcnet.dns.forward import Forwarder, drop_self
        from svcnet.dns.handler import Handler
        from svcnet.dns.server import DNSServer
        from svcnet.dns.zone import ClusterZone

        o = self.options
        zone = ClusterZone(o.zone, ttl=o.ttl, pods=o.pods,  # type: ignore[arg-type]
                           endpoint_pod_names=o.endpoint_pod_names)
        self.zone = zone
        services = factory.informer(SERVICE)
        slices: Informer[Any]
        if o.slim_informers:
            slices = Informer(store, SLICE_ADDRESSES)
            slices.cache.add_index("service", by_service_name)  # type: ignore[arg-type]
        else:
            slices = factory.informer(ENDPOINT_SLICE)
        pods: Informer[Any] | None = Informer(store, POD_ADDRESSES) if o.pods == "verified" \
            else None
        namespaces: Informer[Any] = Informer(store, NAMESPACE_NAMES)
        local = local_addresses(o.listen[0])

        def endpoints_of(key: str) -> list[tuple[str, str]] | None:
            """A ClusterIP Service's ready endpoints as (hostname, IP), for the slow path."""
            from svcnet.dns.names import endpoint_hostname

            svc = services.cache.get(key)
            if svc is None or svc.is_headless or svc.spec.type == "ExternalName":
                return None
            publish_all = svc.spec.publish_not_ready_addresses
            out = []
            for sl in slices.cache.by_index("service", key):
                if sl.address_type == "FQDN":
                    continue
                for ep in sl.endpoints:
                    if ep.ready or publish_all:
                        out += [(endpoint_hostname(ep, a, pod_names=o.endpoint_pod_names), a)
                                for a in ep.addresses]
            return out

        def update_ns() -> None:
            zone.set_ns_addresses(zone.dns_service_ips(local) or local)

        zone.endpoints_of = endpoints_of

        def recompute(key: str, trigger: str = "") -> None:
            svc = services.cache.get(key)
            eps = slices.cache.by_index("service", key) if svc is None or svc.is_headless \
                else []
            zone.set_service(key, svc, eps)
            if trigger and svc is not None and zone.synced:
                with contextlib.suppress(ValueError):
                    at = datetime.fromisoformat(trigger.replace("Z", "+00:00")).timestamp()
                    kind = "headless_with_selector" if svc.spec.selector else \
                        "headless_without_selector"
                    metrics.PROGRAMMING.labels(kind if svc.is_headless else "cluster_ip"
                                               ).observe(max(0.0, time.time() - at))

        def on_service(old: Service | None, new: Service | None) -> None:
            obj = new or old
            assert obj is not None
            recompute(f"{obj.metadata.namespace}/{obj.metadata.name}")
            if zone.synced:
                update_ns()

        def addresses(sl: Any) -> list[str]:
            if sl is None or not sl.service_name or sl.address_type == "FQDN":
                return []
            return [a for ep in sl.endpoints for a in ep.addresses]

        def on_slice(old: Any, new: Any) -> None:
            obj = new or old
            if obj.service_name:
                zone.index_endpoints(f"{obj.metadata.namespace}/{obj.service_name}",
                                     addresses(old), addresses(new))
                if zone.synced:
                    update_ns()
            keys = {f"{o.metadata.namespace}/{o.service_name}" for o in (old, new)
                    if o is not None and o.service_name}
            for key in keys:
                svc = services.cache.get(key)
                if svc is None or svc.is_headless:
                    trigger = new.metadata.annotations.get(TRIGGER_ANNOTATION, "") if new else ""
                    recompute(key, trigger)

        def on_pod(old: Any, new: Any) -> None:
            zone.set_pod(old, new)

        def on_namespace(old: Any, new: Any) -> None:
            if old is not None:
                zone.set_namespace(old.metadata.name, False)
            if new is not None:
                zone.set_namespace(new.metadata.name, True)

        services.add_handler(Callbacks(on_service))
        slices.add_handler(Callbacks(on_slice))
        if pods is not None:
            pods.add_handler(Callbacks(on_pod))
        namespaces.add_handler(Callbacks(on_namespace))

        stats = metrics.DNSStats(f"dns://{o.listen[0]}:{o.listen[1]}", zone.zone)
        metrics.register(stats)
        upstreams = drop_self(o.upstreams, o.listen)
        forwarder = Forwarder(upstreams, timeout=o.forward_timeout,
                              max_concurrent=o.max_concurrent,
                              loop_interval=o.loop_probe_interval) if upstreams else None
        stubs = {d: Forwarder(drop_self(s, o.listen), timeout=o.forward_timeout,
                              max_concurrent=o.max_concurrent,
                              loop_interval=o.loop_probe_interval)
                 for d, s in o.stub_domains.items()}
        handler = Handler(zone, forwarder=forwarder, stubs=stubs,
                          cache=ResponseCache(o.cache_size, min_ttl=o.cache_min_ttl), stats=stats,
                          log_queries=o.query_log)
        server = DNSServer(zone, handler, host=o.listen[0], port=o.listen[1],
                           workers=o.workers, slow_only=o.query_log,
                           tcp_idle=o.tcp_idle_timeout, tcp_write=o.tcp_write_timeout,
                           tcp_max=o.tcp_max_connections)
        self.server = server
        http: list[HTTPServer] = []
        try:
            await server.start()
            log.info("dns listening on %s:%d (udp+tcp), %d workers", o.listen[0], server.port,
                     o.workers)
            if o.health_port:
                http.append(HTTPServer({"/health": self._health, "/ready": self._ready},
                                       o.health_host, o.health_port))
            if o.metrics_port:
                http.append(HTTPServer({"/metrics": metrics_route}, o.metrics_host,
                                       o.metrics_port))
            for h in http:
                await h.start()
            wanted: list[Any] = [services, slices, namespaces] + (
                [pods] if pods is not None else [])
            for inf in wanted:
                inf.start()
            await asyncio.gather(*(inf.synced.wait() for inf in wanted))
            update_ns()
            zone.mark_synced()
            release_free_memory()
            self.ready.set()
            log.info("dns synced: %d prepared answers", len(zone.table))
            for fwd in handler.forwarders():
                fwd.start_loop_checks()
            await asyncio.Event().wait()
        finally:
            if pods is not None:
                await pods.stop()
            await namespaces.stop()
            if o.slim_informers:
                await slices.stop()
            await self._shutdown(server, http, handler)

    async def _shutdown(self, server: Any, http: list[HTTPServer], handler: Any) -> None:
        self.healthy = False
        if self.options.lameduck > 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(self.options.lameduck)
        await server.stop()
        for fwd in handler.forwarders():
            fwd.close()
        for h in http:
            await h.stop()

    def _health(self) -> Response:
        return Response(200, b"OK") if self.healthy else Response(503, b"lame duck\n")

    def _ready(self) -> Response:
        return Response(200, b"OK") if self.ready.is_set() else Response(503, b"not synced\n")
