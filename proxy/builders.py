"""Short constructors for Service and EndpointSlice objects, as Kubernetes JSON dicts.

Tests, the scale bench and the lab describe services in one line each with these; the dicts
go to a store (``put``) or through ``SERVICE.convert`` to records.
"""

from __future__ import annotations

from typing import Any

from svcnet.model import ENDPOINT_SLICE, SERVICE, EndpointSlice, Service


def service(
    name: str, cluster_ip: str | list[str], *ports: dict[str, Any], namespace: str = "default",
    type: str = "ClusterIP", labels: dict[str, str] | None = None, lb_ips: list[str] | None = None,
    lb_ip_mode: str | None = None, **spec: Any,
) -> dict[str, Any]:
    """``ports`` are dicts like ``port(80)``; extra keyword args go into ``spec`` verbatim."""
    ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"type": type, "clusterIP": ips[0], "clusterIPs": ips,
                 "ports": list(ports) or [port(80)], **spec},
    }
    if lb_ips:
        ingress = [{"ip": ip, **({"ipMode": lb_ip_mode} if lb_ip_mode else {})} for ip in lb_ips]
        obj["status"] = {"loadBalancer": {"ingress": ingress}}
    return obj


def port(number: int, name: str = "", protocol: str = "TCP", target: int | str = 0,
         node_port: int = 0) -> dict[str, Any]:
    p: dict[str, Any] = {"port": number, "name": name, "protocol": protocol}
    if target:
        p["targetPort"] = target
    if node_port:
        p["nodePort"] = node_port
    return p


def endpoint(ip: str, node: str = "", ready: bool = True, serving: bool | None = None,
             terminating: bool | None = None, zones: list[str] | None = None,
             nodes: list[str] | None = None, zone: str = "") -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [ip], "conditions": cond}
    if node:
        ep["nodeName"] = node
    if zone:
        ep["zone"] = zone
    if zones is not None or nodes is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in zones or []],
                       "forNodes": [{"name": n} for n in nodes or []]}
    return ep


def endpoint_slice(
    service_name: str, *endpoints: dict[str, Any], ports: list[tuple[str, int, str]] | None = None,
    name: str = "", namespace: str = "default", address_type: str = "",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``ports`` as (name, port, protocol); default one unnamed TCP port 8080."""
    first = endpoints[0]["addresses"][0] if endpoints else "0.0.0.0"
    return {
        "metadata": {
            "name": name or f"{service_name}-slice", "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
            "annotations": annotations or {},
        },
        "addressType": address_type or ("IPv6" if ":" in first else "IPv4"),
        "endpoints": list(endpoints),
        "ports": [{"name": n, "port": p, "protocol": proto}
                  for n, p, proto in (ports or [("", 8080, "TCP")])],
    }


def to_service(obj: dict[str, Any]) -> Service:
    return SERVICE.convert(obj)


def to_slice(obj: dict[str, Any]) -> EndpointSlice:
    return ENDPOINT_SLICE.convert(obj)
