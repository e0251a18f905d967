"""The overlay's network configuration, in Flannel's ``net-conf.json`` shape.

The same JSON is accepted from a file (``--overlay-config``) or from the store (etcd key
``<prefix>/config``), so an existing Flannel configuration works unchanged::

    {"Network": "10.244.0.0/16", "SubnetLen": 24, "IPv6Network": "fd00:10:244::/56",
     "EnableIPv6": true, "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472,
     "DirectRouting": false}}
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BACKENDS = ("vxlan", "host-gw")
DEFAULT_VXLAN_PORT = 8472


class ConfigError(ValueError):
    """The network configuration is unusable; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    type: str = "vxlan"
    vni: int = 1
    port: int = DEFAULT_VXLAN_PORT
    direct_routing: bool = False
    mtu: int = 0
    """Overrides the computed device MTU when non-zero."""


@dataclass(frozen=True, slots=True)
class FamilyConfig:
    """One address family's pool: the cluster network and how it is cut into node subnets."""

    network: IPNetwork
    subnet_len: int
    subnet_min: IPNetwork
    subnet_max: IPNetwork

    @property
    def count(self) -> int:
        return (int(self.subnet_max.network_address) - int(self.subnet_min.network_address)
                ) // self.subnet_min.num_addresses + 1

    def subnet_at(self, index: int) -> IPNetwork:
        base = int(self.subnet_min.network_address) + index * self.subnet_min.num_addresses
        return ipaddress.ip_network((ipaddress.ip_address(base), self.subnet_len))

    def contains(self, subnet: IPNetwork) -> bool:
        return (subnet.version == self.network.version and subnet.prefixlen == self.subnet_len
                and int(self.subnet_min.network_address) <= int(subnet.network_address)
                <= int(self.subnet_max.network_address))


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    ipv4: FamilyConfig | None
    ipv6: FamilyConfig | None
    backend: BackendConfig

    @property
    def families(self) -> tuple[FamilyConfig, ...]:
        return tuple(f for f in (self.ipv4, self.ipv6) if f is not None)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {}
        if self.ipv4:
            doc.update(Network=str(self.ipv4.network), SubnetLen=self.ipv4.subnet_len,
                       SubnetMin=str(self.ipv4.subnet_min.network_address),
                       SubnetMax=str(self.ipv4.subnet_max.network_address))
        else:
            doc["EnableIPv4"] = False
        if self.ipv6:
            doc.update(EnableIPv6=True, IPv6Network=str(self.ipv6.network),
                       IPv6SubnetLen=self.ipv6.subnet_len)
        b = self.backend
        doc["Backend"] = {"Type": b.type, "VNI": b.vni, "Port": b.port,
                          "DirectRouting": b.direct_routing}
        return json.dumps(doc).encode()


def parse_network_config(data: bytes | str) -> NetworkConfig:
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise ConfigError(f"network config is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError("network config must be a JSON object")
    ipv4 = None
    if doc.get("EnableIPv4", True) and doc.get("Network"):
        ipv4 = _family(doc, "Network", "SubnetLen", "SubnetMin", "SubnetMax", 24, 4)
    ipv6 = None
    if doc.get("EnableIPv6") or (doc.get("IPv6Network") and not ipv4):
        ipv6 = _family(doc, "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
                       64, 6)
    if ipv4 is None and ipv6 is None:
        raise ConfigError("network config needs Network (IPv4) and/or IPv6Network")
    raw_backend = doc.get("Backend") or {}
    if not isinstance(raw_backend, dict):
        raise ConfigError("Backend must be a JSON object")
    kind = str(raw_backend.get("Type", "vxlan"))
    if kind not in BACKENDS:
        raise ConfigError(f"Backend.Type {kind!r} is not one of {', '.join(BACKENDS)}")
    try:
        backend = BackendConfig(
            type=kind, vni=int(raw_backend.get("VNI", 1)),
            port=int(raw_backend.get("Port", DEFAULT_VXLAN_PORT) or DEFAULT_VXLAN_PORT),
            direct_routing=bool(raw_backend.get("DirectRouting", False)),
            mtu=int(raw_backend.get("MTU", 0)),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Backend: {err}") from None
    if not 0 <= backend.vni < 2**24:
        raise ConfigError(f"Backend.VNI {backend.vni} is out of range 0..16777215")
    if not 0 < backend.port < 65536:
        raise ConfigError(f"Backend.Port {backend.port} is out of range")
    return NetworkConfig(ipv4=ipv4, ipv6=ipv6, backend=backend)


def _family(doc: dict[str, Any], net_key: str, len_key: str, min_key: str, max_key: str,
            default_len: int, version: int) -> FamilyConfig:
    try:
        network = ipaddress.ip_network(str(doc[net_key]))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{net_key}: {err}") from None
    if network.version != version:
        raise ConfigError(f"{net_key} {network} is not an IPv{version} network")
    subnet_len = int(doc.get(len_key) or default_len)
    if not network.prefixlen < subnet_len <= network.max_prefixlen - 2:
        raise ConfigError(f"{len_key} {subnet_len} must be longer than {net_key}'s /"
                          f"{network.prefixlen} and leave room for hosts")
    first = ipaddress.ip_network((network.network_address, subnet_len))
    # Flannel skips the first subnet by default: the .0 subnet is often confused with the
    # network address itself.
    default_min = ipaddress.ip_network((int(first.network_address) + first.num_addresses,
                                        subnet_len))
    default_max = ipaddress.ip_network(
        (int(network.broadcast_address) - first.num_addresses + 1, subnet_len))
    lo = _subnet_bound(doc.get(min_key), subnet_len, default_min, min_key)
    hi = _subnet_bound(doc.get(max_key), subnet_len, default_max, max_key)
    for name, bound in ((min_key, lo), (max_key, hi)):
        if not bound.subnet_of(network):  # type: ignore[arg-type]
            raise ConfigError(f"{name} {bound.network_address} is outside {net_key} {network}")
    if int(lo.network_address) > int(hi.network_address):
        raise ConfigError(f"{min_key} is above {max_key}")
    return FamilyConfig(network=network, subnet_len=subnet_len, subnet_min=lo, subnet_max=hi)


def _subnet_bound(value: Any, subnet_len: int, default: IPNetwork, key: str) -> IPNetwork:
    if not value:
        return default
    try:
        return ipaddress.ip_network((ipaddress.ip_address(str(value)), subnet_len), strict=False)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
