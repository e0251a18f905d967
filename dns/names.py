"""Names in the cluster zone: building them from objects and parsing queries back.

Pure string functions, like CoreDNS's parse.go. Everything is lower-case with a trailing dot.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

VERSION_LABEL = "dns-version"
SCHEMA_VERSION = "1.1.0"


def fqdn(*parts: str) -> str:
    return ".".join(p.strip(".").lower() for p in parts if p.strip(".")) + "."


def normalize_zone(zone: str) -> str:
    return fqdn(zone) if zone.strip(".") else "."


def service_name(name: str, namespace: str, zone: str) -> str:
    return fqdn(name, namespace, "svc", zone)


def srv_name(port: str, protocol: str, service: str) -> str:
    return fqdn(f"_{port}", f"_{protocol.lower()}", service)


def dashed(ip: str) -> str:
    """10.0.0.1 -> 10-0-0-1; 5678:abcd::1 -> 5678-abcd--1 (CoreDNS's endpoint hostnames)."""
    return ip.replace(".", "-").replace(":", "-").lower()


def undashed(label: str) -> str | None:
    """Inverse of ``dashed`` for pod names: the IP, or None when the label is not one.
    As CoreDNS: three dashes and no ``--`` is IPv4, anything else is tried as IPv6."""
    if label.count("-") == 3 and "--" not in label and ":" not in label:
        candidate = label.replace("-", ".")
        try:
            return str(ipaddress.IPv4Address(candidate))
        except ValueError:
            return None
    if "-" in label:
        try:
            return str(ipaddress.IPv6Address(label.replace("-", ":")))
        except ValueError:
            return None
    return None


def is_label(text: str) -> bool:
    """A valid DNS-1123 label (used to accept pod names as endpoint hostnames)."""
    return 0 < len(text) <= 63 and text.replace("-", "a").isalnum() and text.isascii() and \
        text[0] != "-" and text[-1] != "-"


def endpoint_hostname(endpoint: Any, address: str, *, pod_names: bool) -> str:
    """The endpoint's own hostname, else (endpoint_pod_names) its pod's name, else its dashed IP."""
    if endpoint.hostname:
        return str(endpoint.hostname).lower()
    ref = endpoint.target_ref
    if pod_names and ref is not None and ref.kind in ("Pod", "") and is_label(ref.name.lower()):
        return str(ref.name).lower()
    return dashed(address)


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer.lower() + "."


# --- parsing queries -----------------------------------------------------------------------

Where = Literal["apex", "version", "svc", "pod", "other"]


@dataclass(frozen=True, slots=True)
class ZoneName:
    """A name inside a cluster zone, split into the part before ``svc``/``pod``.

    For ``_http._tcp.web.shop.svc.cluster.local.``: where="svc", labels=("_http", "_tcp",
    "web", "shop"). ``labels`` is empty for ``svc.<zone>`` itself.
    """

    zone: str
    where: Where
    labels: tuple[str, ...]

    @property
    def namespace(self) -> str:
        return self.labels[-1] if self.labels else ""


def split_zone(qname: str, zones: tuple[str, ...]) -> ZoneName | None:
    """Which of our zones holds ``qname`` (longest first) and where in it; None if none."""
    for zone in zones:
        if qname == zone:
            return ZoneName(zone, "apex", ())
        if zone == "." or qname.endswith("." + zone):
            rel = qname[: len(qname) - len(zone)].rstrip(".") if zone != "." else \
                qname.rstrip(".")
            labels = tuple(rel.split("."))
            if labels == (VERSION_LABEL,):
                return ZoneName(zone, "version", ())
            if labels[-1] in ("svc", "pod"):
                where: Where = "svc" if labels[-1] == "svc" else "pod"
                return ZoneName(zone, where, labels[:-1])
            return ZoneName(zone, "other", labels)
    return None


def reverse_to_ip(qname: str) -> str | None:
    """``1.0.0.10.in-addr.arpa.`` -> ``10.0.0.1`` (and ip6.arpa nibbles); None for a name
    that is not one whole address."""
    if qname.endswith(".in-addr.arpa."):
        parts = qname[: -len(".in-addr.arpa.")].split(".")
        if len(parts) != 4:
            return None
        return str(ipaddress.IPv4Address(".".join(reversed(parts))))
    if qname.endswith(".ip6.arpa."):
        nibbles = qname[: -len(".ip6.arpa.")].split(".")
        if len(nibbles) != 32 or any(len(n) != 1 for n in nibbles):
            return None
        text = "".join(reversed(nibbles))
        return str(ipaddress.IPv6Address(":".join(text[i:i + 4] for i in range(0, 32, 4))))
    return None


def in_reverse_zone(qname: str) -> bool:
    return qname.endswith(".in-addr.arpa.") or qname.endswith(".ip6.arpa.")
