"""The bridge plugin: ADD/DEL/CHECK/GC/STATUS read like the reference ``bridge`` plugin's.

Every kernel resource ADD acquires registers its undo at once; one ``commit()`` at the end
drops the undos, so a failure at any step rolls back what came before (IP released, veth
removed, rules removed). DEL finds everything from (network, containerID, ifname) alone —
the host veth's name is derived from them and IPAM still knows the addresses — so it works
when the netns, the link or the allocation is already gone, and when repeated.
"""

from __future__ import annotations

import posix

from . import ipam, posixfs
from .addr import AddressError, Prefix, format_ip, parse_ip
from .netns import InNetns, NetnsError, NotANetns, open_netns, read_sysctl, write_sysctl
from .rtnl import AlreadyExists, Link, LinkNotFound, Rtnl, mac_text
from .spec import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_LIMITED_CONNECTIVITY,
    ERR_NOT_AVAILABLE,
    ERR_UNKNOWN_CONTAINER,
    CniError,
    result_from_wire,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .rtnl import RtnlApi

DEFAULT_BRIDGE = "cni0"
HOST_VETH_PREFIX = "veth"
ALIAS_PREFIX = "svcnet-cni"
EMBEDDED_IPAM = ("host-local", "svcnet-cni", "svcnet-ipam")
MAX_ALIAS = 254  # the kernel refuses a longer interface alias (IFALIASZ - 1 with the NUL)
NET_ADDR_SET = "3"  # /sys/class/net/<dev>/addr_assign_type of a MAC set by the user
_HEX = "0123456789abcdefABCDEF"


class Env:
    """The CNI_* environment of one invocation, validated."""

    __slots__ = ("args", "container_id", "ifname", "netns", "path")

    def __init__(self, container_id: str, ifname: str, netns: str, args: dict[str, str],
                 path: str) -> None:
        self.container_id = container_id
        self.ifname = ifname
        self.netns = netns
        self.args = args
        self.path = path


class NetConf:
    """The bridge options, with the reference plugin's names and defaults."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.raw = conf
        self.name = ipam.safe_name("network name", conf.get("name"), ipam.MAX_NAME)
        self.bridge = link_name("bridge", conf.get("bridge", DEFAULT_BRIDGE))
        self.is_default_gateway = _flag(conf, "isDefaultGateway")
        self.is_gateway = _flag(conf, "isGateway") or self.is_default_gateway
        self.force_address = _flag(conf, "forceAddress")
        self.ip_masq_set = "ipMasq" in conf
        self.ip_masq = _flag(conf, "ipMasq")
        self.mtu = _int(conf, "mtu")
        self.hairpin = _flag(conf, "hairpinMode")
        self.promisc = _flag(conf, "promiscMode")
        self.vlan = _int(conf, "vlan")
        if not 0 <= self.vlan <= 4094:
            raise CniError(ERR_INVALID_CONFIG, f"vlan {self.vlan} is not in 0..4094")
        if self.hairpin and self.promisc:
            raise CniError(ERR_INVALID_CONFIG, "cannot set hairpin mode and promiscuous mode "
                           "at the same time", "hairpin reflects frames on the port; promisc "
                           "makes the bridge see them all: choose one")
        self.macspoofchk = _flag(conf, "macspoofchk")
        self.enable_dad = _flag(conf, "enabledad")
        ipam_conf = conf.get("ipam")
        if ipam_conf is None or ipam_conf == {}:
            ipam_conf = {"type": ""}  # layer 2 only, as the reference bridge
        if not isinstance(ipam_conf, dict) or not isinstance(ipam_conf.get("type"), str):
            raise CniError(ERR_INVALID_CONFIG, "ipam needs a type (or leave ipam out, or "
                           "empty, for interfaces without addresses)",
                           "e.g. \"ipam\": {\"type\": \"host-local\", \"ranges\": ...}")
        self.ipam_type: str = ipam_conf["type"]
        self.dns = conf.get("dns") if isinstance(conf.get("dns"), dict) else {}

    @property
    def layer3(self) -> bool:
        """False for a layer-2-only network (no ``ipam``): interfaces without addresses."""
        return bool(self.ipam_type)

    @property
    def embedded_ipam(self) -> bool:
        return self.ipam_type in EMBEDDED_IPAM


def parse_mac(text: str) -> str:
    """A unicast Ethernet MAC (``aa:bb:..`` or ``aa-bb-..``) in the kernel's lower-case
    form; ValueError otherwise."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in _HEX for c in p) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex octets, e.g. "
                         "02:42:ac:11:00:02)")
    raw = bytes(int(p, 16) for p in parts)
    if raw[0] & 1:
        raise ValueError(f"{text!r} is a multicast MAC address; an interface needs a unicast "
                         "one (lowest bit of the first octet clear)")
    if not any(raw):
        raise ValueError(f"{text!r} is the all-zero MAC address")
    return mac_text(raw)


def _config_mac(conf: dict[str, Any]) -> str:
    """The MAC requested in the config, ``runtimeConfig.mac`` (the ``mac`` capability)
    before ``args.cni.mac``, as the reference bridge; '' if none."""
    runtime = conf.get("runtimeConfig")
    args = conf.get("args")
    cni_args = args.get("cni") if isinstance(args, dict) else None
    for where, holder in (("runtimeConfig.mac", runtime), ("args.cni.mac", cni_args)):
        value = holder.get("mac") if isinstance(holder, dict) else None
        if value:
            try:
                return parse_mac(str(value))
            except ValueError as err:
                raise CniError(ERR_INVALID_CONFIG, f"{where}: {err}") from None
    return ""


def requested_mac(conf: NetConf, env: Env) -> str:
    """The pod interface's MAC: the config's, else ``CNI_ARGS`` ``MAC=`` (podman
    ``--mac-address`` and ``network reload``), else '' (a random one). Only ADD asks, so
    DEL works whatever was requested."""
    configured = _config_mac(conf.raw)
    if configured:
        return configured
    text = env.args.get("MAC", "")
    if not text:
        return ""
    try:
        return parse_mac(text)
    except ValueError as err:
        raise CniError(ERR_INVALID_ENV, f"CNI_ARGS MAC: {err}") from None


def _flag(conf: dict[str, Any], key: str) -> bool:
    value = conf.get(key, False)
    if not isinstance(value, bool):
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be true or false, not {value!r}")
    return value


def _int(conf: dict[str, Any], key: str) -> int:
    value = conf.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be a non-negative integer")
    return value


def link_name(kind: str, value: object) -> str:
    """Linux interface name rules: 1-15 bytes, not ``.``/``..``, no ``/``, ``:`` or spaces."""
    if (not isinstance(value, str) or not value or len(value.encode()) > 15
            or value in (".", "..") or any(c in "/:" or c.isspace() for c in value)):
        raise CniError(ERR_INVALID_CONFIG, f"{kind} name {value!r} is not a valid interface "
                       "name", "1-15 characters, no '/', ':' or whitespace")
    return value


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL and GC find the host end without the pod's netns."""
    return HOST_VETH_PREFIX + ipam.short_hash(f"{container_id}/{ifname}", 11)


def attachment_alias(network: str, container_id: str, ifname: str) -> str:
    """``svcnet-cni/<network>/<containerID>/<ifname>``, cut to the kernel's 254 bytes (a
    long container ID loses its end; GC matches the network prefix and the veth name)."""
    return _cut_alias(f"{ALIAS_PREFIX}/{network}/{container_id}/{ifname}")


def _cut_alias(text: str) -> str:
    raw = text.encode()
    return text if len(raw) <= MAX_ALIAS else raw[:MAX_ALIAS].decode(errors="ignore")


def random_mac() -> str:
    raw = bytearray(posix.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return mac_text(bytes(raw))


def open_host() -> RtnlApi:
    """The host-side netlink adapter (a seam: unit tests substitute a fake kernel)."""
    return Rtnl()


def open_pod(netns_fd: int, arp_notify: str = "") -> RtnlApi:
    """A netlink adapter bound to the pod's namespace; with ``arp_notify`` also turns that
    sysctl on for the named interface while inside (another seam for the fake)."""
    with InNetns(netns_fd):
        pod = Rtnl()
        if arp_notify:
            write_sysctl(f"net/ipv4/conf/{arp_notify}/arp_notify", "1")
    return pod


class Undo:
    """A stack of compensating actions, run in reverse unless ``commit()`` was called."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def push(self, action: Callable[[], object]) -> None:
        self._actions.append(action)

    def commit(self) -> None:
        self._actions.clear()

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._actions:
            action = self._actions.pop()
            try:  # noqa: SIM105 - contextlib costs start-up time on the plugin path
                action()
            except Exception:  # best effort: the original error is what gets reported
                pass


# -- IPAM (embedded or delegated) ------------------------------------------------------------


def ipam_add(conf: NetConf, env: Env, stdin: bytes, undo: Undo) -> tuple[dict[str, Any],
                                                                         ipam.IpamConfig | None]:
    if not conf.layer3:
        return {"ips": [], "routes": [], "dns": {}}, None
    if conf.embedded_ipam:
        cfg = ipam.parse_config(conf.raw, env.args)
        with ipam.Store(cfg.directory) as store:
            allocations = ipam.allocate(cfg, store, env.container_id, env.ifname)
        undo.push(lambda: ipam.release(cfg, env.container_id, env.ifname))
        return ipam.result(cfg, allocations, conf.dns), cfg
    from .delegate import delegate

    res = delegate(conf.ipam_type, "ADD", stdin, env)
    undo.push(lambda: delegate(conf.ipam_type, "DEL", stdin, env))
    return result_from_wire(res), None


def _ipam_config_for_release(conf: NetConf, env: Env) -> ipam.IpamConfig:
    """Enough IPAM config to find and release reservations, even when the ranges cannot be
    derived any more (e.g. the subnet file is gone)."""
    try:
        return ipam.parse_config(conf.raw, env.args)
    except CniError:
        data_dir = (conf.raw.get("ipam") or {}).get("dataDir") or ipam.DEFAULT_DATA_DIR
        return ipam.IpamConfig(conf.name, str(data_dir), [], [], [])


def _masq_enabled(conf: NetConf, cfg: ipam.IpamConfig | None) -> bool:
    if conf.ip_masq_set or cfg is None or cfg.ipmasq is None:
        return conf.ip_masq
    return not cfg.ipmasq  # FLANNEL_IPMASQ=true: the overlay daemon masquerades instead


# -- ADD ---------------------------------------------------------------------------------


def cmd_add(conf: NetConf, env: Env, stdin: bytes) -> dict[str, Any]:
    pod_mac = requested_mac(conf, env) or random_mac()
    netns_fd = _open_netns(env.netns)  # before anything is allocated
    try:
        with open_host() as host, Undo() as undo:
            ipam_result, cfg = ipam_add(conf, env, stdin, undo)
            ips = [(Prefix.parse(e["address"]), e.get("gateway", "")) for e in ipam_result["ips"]]
            mtu = conf.mtu or (cfg.mtu if cfg else 0)
            bridge = ensure_bridge(host, conf, mtu)
            if conf.is_gateway:
                ensure_gateway_addresses(host, conf, bridge.index, ips)
            host_name = host_veth_name(env.container_id, env.ifname)
            host_mac = random_mac()
            try:
                host.add_veth(host_name, host_mac, env.ifname, pod_mac, netns_fd, mtu,
                              bridge.index)
            except AlreadyExists as err:
                raise CniError(ERR_INVALID_CONFIG,
                               f"interface {env.ifname} (host end {host_name}) already exists "
                               f"for container {env.container_id}", str(err)) from None
            undo.push(lambda: host.delete_link(host_name))
            host_index = host.link(host_name).index
            host.set_link(host_index, alias=attachment_alias(conf.name, env.container_id,
                                                             env.ifname))
            if conf.hairpin:
                host.set_hairpin(host_index, True)
            if conf.vlan:
                host.bridge_vlan(host_index, 1, add=False)
                host.bridge_vlan(host_index, conf.vlan, add=True, pvid=True, untagged=True)
            routes = list(ipam_result.get("routes") or [])
            if conf.is_default_gateway:
                routes = _with_default_routes(routes, ips)
            configure_pod(netns_fd, env.ifname, ips, routes, conf.enable_dad)
            if _masq_enabled(conf, cfg) and ips:
                from . import masq

                subnets = [p.masked() for p, _gw in ips]
                owned = [(p.version, format_ip(p.version, p.address)) for p, _gw in ips]
                masq.apply(masq.add_script(conf.name, subnets, owned,
                                           f"{env.container_id}/{env.ifname}"))
                undo.push(lambda: masq.apply(masq.delete_script(conf.name, owned)))
            if conf.macspoofchk:
                from . import macspoof

                macspoof.apply(macspoof.add_script(conf.name, host_name, pod_mac))
                undo.push(lambda: macspoof.apply(macspoof.delete_script(conf.name, host_name,
                                                                        pod_mac)))
            bridge = host.link(index=bridge.index)
            undo.commit()
    finally:
        posix.close(netns_fd)
    result = dict(ipam_result)
    result["interfaces"] = [
        {"name": bridge.name, "mac": bridge.mac},
        {"name": host_name, "mac": host_mac},
        {"name": env.ifname, "mac": pod_mac, "sandbox": env.netns},
    ]
    if mtu:
        for iface in result["interfaces"]:
            iface["mtu"] = mtu
    result["ips"] = [dict(e, interface=2) for e in ipam_result["ips"]]
    if not result["ips"]:
        del result["ips"]  # layer 2 only: the reference leaves the key out
    if routes:
        result["routes"] = routes
    result["dns"] = ipam_result.get("dns") or conf.dns or {}
    return result


def _open_netns(path: str) -> int:
    try:
        return open_netns(path)
    except NotANetns as err:
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS {path} is not a network namespace",
                       err.strerror or "") from None
    except NetnsError as err:
        raise CniError(ERR_UNKNOWN_CONTAINER, f"network namespace {path} does not exist",
                       str(err)) from None


def ensure_bridge(host: RtnlApi, conf: NetConf, mtu: int) -> Link:
    """The bridge, up, with its MAC pinned: created with a MAC of its own, or an existing
    unpinned one (another tool's, an older svcnet's) pinned to its current MAC. Unpinned,
    Linux gives a bridge the lowest MAC of its ports, so it changes when pods come and go
    and running pods keep sending to the old gateway MAC until their ARP entry expires."""
    created = False
    try:
        bridge = host.link(conf.bridge)
    except LinkNotFound:
        try:
            host.add_bridge(conf.bridge, mtu, vlan_filtering=bool(conf.vlan), mac=random_mac())
            created = True
        except AlreadyExists:
            pass  # a concurrent ADD created it first
        bridge = host.link(conf.bridge)
    if bridge.kind != "bridge":
        raise CniError(ERR_INVALID_CONFIG, f"{conf.bridge} already exists but is not a bridge",
                       f"its kind is {bridge.kind or 'unknown'}")
    if not created and not _pinned(host, bridge):
        host.set_link(bridge.index, mac=bridge.mac)  # also flushes its neighbour entries
    if conf.promisc and not bridge.flags & 0x100:
        host.set_link(bridge.index, promisc=True)
    if not bridge.up:
        host.set_link(bridge.index, up=True)
    return bridge


def mac_pinned(link: Link) -> bool | None:
    """Whether the link's MAC was set explicitly (sysfs ``addr_assign_type``); None when
    this process's /sys shows another namespace (the name, index and MAC must all match)."""
    base = f"/sys/class/net/{link.name}/"
    try:
        with open(base + "ifindex", encoding="ascii") as f:
            same = int(f.read()) == link.index
        with open(base + "address", encoding="ascii") as f:
            same = same and f.read().strip() == link.mac
        if not same:
            return None
        with open(base + "addr_assign_type", encoding="ascii") as f:
            return f.read().strip() == NET_ADDR_SET
    except (OSError, ValueError):
        return None


def _pinned(host: RtnlApi, bridge: Link) -> bool:
    """sysfs's answer, or without one the kernel's rule: an unpinned bridge with ports has
    the lowest port MAC, so a bridge whose MAC no port has is pinned. Pinning when unsure
    costs a flush of the bridge's neighbour entries, so it is avoided when not needed."""
    known = mac_pinned(bridge)
    if known is not None:
        return known
    ports = {link.mac for link in host.links() if link.master == bridge.index}
    return bool(ports) and bridge.mac not in ports


def ensure_gateway_addresses(host: RtnlApi, conf: NetConf, bridge_index: int,
                             ips: list[tuple[Prefix, str]]) -> None:
    """Put each family's gateway on the bridge and turn on forwarding. Like the reference:
    one IPv4 address per bridge (any other IPv4 address is an error, which ``forceAddress``
    resolves by replacing it), while IPv6 addresses only conflict within a subnet."""
    existing = host.addresses(bridge_index)
    wanted_all = set()
    for prefix, gateway in ips:
        if gateway:
            version, gw = parse_ip(gateway)
            wanted_all.add(Prefix(version, gw, prefix.length))
    for prefix, gateway in ips:
        if not gateway:
            continue
        version, gw = parse_ip(gateway)
        wanted = Prefix(version, gw, prefix.length)
        if any(p == wanted for _i, p in existing):
            continue
        for idx, p in list(existing):
            if p.version != version or p in wanted_all:
                continue
            if version == 4 or p.overlaps(wanted):
                if not conf.force_address:
                    raise CniError(ERR_INVALID_CONFIG,
                                   f"{conf.bridge} already has an IP address different from "
                                   f"{wanted}", f"it has {p}; set forceAddress to replace it")
                host.delete_address(bridge_index, p)
                existing.remove((idx, p))
        try:  # noqa: SIM105 - no contextlib on the plugin path
            host.add_address(bridge_index, wanted, nodad=True)
        except AlreadyExists:
            pass
        existing.append((bridge_index, wanted))
        key = "net/ipv4/ip_forward" if version == 4 else "net/ipv6/conf/all/forwarding"
        if read_sysctl(key) != "1":
            write_sysctl(key, "1")


def _with_default_routes(routes: list[dict[str, Any]],
                         ips: list[tuple[Prefix, str]]) -> list[dict[str, Any]]:
    out = [r for r in routes if r.get("dst") not in ("0.0.0.0/0", "::/0")]
    for prefix, gateway in ips:
        if gateway:
            dst = "0.0.0.0/0" if prefix.version == 4 else "::/0"
            if not any(r["dst"] == dst for r in out):
                out.append({"dst": dst, "gw": gateway})
    return out


def configure_pod(netns_fd: int, ifname: str, ips: list[tuple[Prefix, str]],
                  routes: list[dict[str, Any]], enable_dad: bool) -> None:
    """Inside the pod: arp_notify, addresses, link up, routes (gateways per family)."""
    gateways = {p.version: gw for p, gw in ips if gw}
    with open_pod(netns_fd, arp_notify=ifname) as pod:
        index = pod.link(ifname).index
        for prefix, _gw in ips:
            pod.add_address(index, prefix, nodad=prefix.version == 6 and not enable_dad)
        pod.set_link(index, up=True)
        for route in routes:
            dst = Prefix.parse(route["dst"])
            gateway = route.get("gw") or gateways.get(dst.version, "")
            try:  # noqa: SIM105 - no contextlib on the plugin path
                pod.add_route(dst, gateway=gateway, oif=index,
                              priority=int(route.get("priority") or 0),
                              table=int(route.get("table") or 0),
                              mtu=int(route.get("mtu") or 0),
                              advmss=int(route.get("advmss") or 0))
            except AlreadyExists:
                pass


# -- DEL ---------------------------------------------------------------------------------


def cmd_del(conf: NetConf, env: Env, stdin: bytes) -> None:
    cfg = _ipam_config_for_release(conf, env) if conf.embedded_ipam else None
    ips: list[str] = []
    if cfg is not None and posixfs.isdir(cfg.directory):
        # Released first, like the reference bridge: the addresses are remembered for the
        # masquerade cleanup, and a crash from here on leaves only what GC removes.
        with ipam.Store(cfg.directory) as store:
            ips = store.find(env.container_id, env.ifname)
            store.release(ips)
    prev = conf.raw.get("prevResult")
    if not ips and isinstance(prev, dict):
        ips = [e["address"].split("/")[0] for e in prev.get("ips") or [] if "address" in e]
    if _masq_enabled(conf, cfg) and ips:
        from . import masq

        masq.apply(masq.delete_script(conf.name, [(6 if ":" in ip else 4, ip) for ip in ips]))
    host_name = host_veth_name(env.container_id, env.ifname)
    with open_host() as host:
        if conf.macspoofchk:
            from . import macspoof

            pod_mac = None
            if isinstance(prev, dict):
                pod_mac = next((str(i["mac"]) for i in prev.get("interfaces") or []
                                if i.get("sandbox") and i.get("name") == env.ifname
                                and i.get("mac")), None)
            macspoof.apply(macspoof.delete_script(conf.name, host_name, pod_mac))
        try:  # noqa: SIM105 - no contextlib on the plugin path
            host.delete_link(host_name)
        except LinkNotFound:
            pass
    if cfg is None and conf.layer3:
        from .delegate import delegate

        delegate(conf.ipam_type, "DEL", stdin, env)


# -- CHECK -------------------------------------------------------------------------------


def cmd_check(conf: NetConf, env: Env, stdin: bytes) -> None:
    prev_raw = conf.raw.get("prevResult")
    if not isinstance(prev_raw, dict):
        raise CniError(ERR_INVALID_CONFIG, "CHECK needs prevResult",
                       "the runtime must pass the result of the ADD")
    prev = result_from_wire(prev_raw)
    ips = [Prefix.parse(e["address"]) for e in prev.get("ips") or []]
    cfg: ipam.IpamConfig | None = None
    if conf.embedded_ipam:
        cfg = ipam.parse_config(conf.raw, env.args)
        ipam.check(cfg, env.container_id, env.ifname,
                   [format_ip(p.version, p.address) for p in ips])
    elif conf.layer3:
        from .delegate import delegate

        delegate(conf.ipam_type, "CHECK", stdin, env)
    pod_iface = next((i for i in prev.get("interfaces") or []
                      if i.get("name") == env.ifname and i.get("sandbox")), None)
    if pod_iface is None:
        raise CniError(ERR_INVALID_CONFIG, f"prevResult has no interface {env.ifname} in a "
                       "sandbox")
    host_name = host_veth_name(env.container_id, env.ifname)
    with open_host() as host:
        try:
            bridge = host.link(conf.bridge)
            veth = host.link(host_name)
        except LinkNotFound as err:
            raise CniError(ERR_INTERNAL, f"CHECK: {err.strerror}") from None
        if veth.master != bridge.index:
            raise CniError(ERR_INTERNAL, f"CHECK: {host_name} is not attached to {conf.bridge}")
        if not veth.up:
            raise CniError(ERR_INTERNAL, f"CHECK: {host_name} is down")
    netns_fd = _open_netns(env.netns)
    try:
        pod = open_pod(netns_fd)
    finally:
        posix.close(netns_fd)
    with pod:
        try:
            link = pod.link(env.ifname)
        except LinkNotFound:
            raise CniError(ERR_INTERNAL, f"CHECK: {env.ifname} is missing in the pod") from None
        if pod_iface.get("mac") and link.mac != str(pod_iface["mac"]).lower():
            raise CniError(ERR_INTERNAL, f"CHECK: {env.ifname} has MAC {link.mac}, expected "
                           f"{pod_iface['mac']}")
        present = {p for _i, p in pod.addresses(link.index)}
        for p in ips:
            if p not in present:
                raise CniError(ERR_INTERNAL, f"CHECK: address {p} is missing on {env.ifname}")
        for route in prev.get("routes") or []:
            dst = Prefix.parse(route["dst"]).masked()
            table = int(route.get("table") or 254)
            found = [r for r in pod.routes(dst.version)
                     if r.dst == dst and r.table == table
                     and (not route.get("gw") or r.gateway == route["gw"])]
            if not found:
                raise CniError(ERR_INTERNAL, f"CHECK: route to {dst} is missing in the pod")
    if _masq_enabled(conf, cfg) and ips:
        from . import masq

        members = masq.members(conf.name)
        for p in ips:
            if format_ip(p.version, p.address) not in members:
                raise CniError(ERR_INTERNAL, f"CHECK: masquerade of {p} is missing")


# -- GC and STATUS -----------------------------------------------------------------------


def cmd_gc(conf: NetConf, env: Env, stdin: bytes) -> None:
    """Release every reservation, veth and rule whose attachment is not listed valid."""
    raw_valid = conf.raw.get("cni.dev/valid-attachments")
    if raw_valid is None:
        return
    if not isinstance(raw_valid, list):
        raise CniError(ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    valid = {(str(a.get("containerID", "")), str(a.get("ifname", "")))
             for a in raw_valid if isinstance(a, dict)}
    cfg = None
    if conf.embedded_ipam:
        cfg = _ipam_config_for_release(conf, env)
        ipam.collect_garbage(cfg, valid)
    elif conf.layer3:
        from .delegate import delegate

        delegate(conf.ipam_type, "GC", stdin, env)
    valid_hosts = {host_veth_name(cid, ifname) for cid, ifname in valid}
    alias_prefix = _cut_alias(f"{ALIAS_PREFIX}/{conf.name}/")
    with open_host() as host:
        try:
            bridge_index = host.link(conf.bridge).index
        except LinkNotFound:
            bridge_index = -1
        for link in host.links():
            ours = link.alias.startswith(alias_prefix) or (
                not link.alias and link.master == bridge_index
                and link.name.startswith(HOST_VETH_PREFIX) and len(link.name) == 15)
            if link.kind == "veth" and ours and link.name not in valid_hosts:
                try:  # noqa: SIM105 - no contextlib on the plugin path
                    host.delete_link(index=link.index)
                except LinkNotFound:
                    pass
    if conf.macspoofchk:
        from . import macspoof

        script = macspoof.stale_script(conf.name, valid_hosts)
        if script:
            macspoof.apply(script)
    if _masq_enabled(conf, cfg) and cfg is not None:
        from . import masq

        with ipam.Store(cfg.directory) as store:
            kept = set(store.allocations())
        stale = [ip for ip in masq.members(conf.name) if ip not in kept]
        if stale:
            masq.apply(masq.delete_script(conf.name,
                                          [(6 if ":" in ip else 4, ip) for ip in stale]))


def cmd_status(conf: NetConf, env: Env, stdin: bytes) -> None:
    """50 when ADD cannot work (no subnet yet, IPAM directory unusable, addresses
    exhausted), 51 when the bridge of existing pods is missing or down."""
    if not conf.layer3:
        return  # nothing to allocate: ADD can always work
    if not conf.embedded_ipam:
        from .delegate import delegate

        delegate(conf.ipam_type, "STATUS", stdin, env)
        return
    try:
        cfg = ipam.parse_config(conf.raw, env.args)
    except CniError as err:
        raise CniError(ERR_NOT_AVAILABLE, f"not ready: {err.msg}", err.details) from None
    try:
        posixfs.makedirs(cfg.directory)
        if not posix.access(cfg.directory, posix.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as err:
        raise CniError(ERR_NOT_AVAILABLE, f"IPAM directory {cfg.directory} is unusable",
                       str(err)) from None
    with ipam.Store(cfg.directory) as store:
        allocated = store.allocations()
    for index, rset in enumerate(cfg.range_sets):
        capacity = sum(r.end - r.start + 1 - (r.gateway is not None
                                              and r.start <= r.gateway <= r.end)
                       for r in rset)
        used = sum(1 for ip in allocated if _in_set(ip, rset))
        if used >= capacity:
            raise CniError(ERR_NOT_AVAILABLE, f"range set {index} has no free address",
                           f"{used} of {capacity} reserved")
    if allocated:
        with open_host() as host:
            try:
                if not host.link(conf.bridge).up:
                    raise CniError(ERR_LIMITED_CONNECTIVITY, f"bridge {conf.bridge} is down")
            except LinkNotFound:
                raise CniError(ERR_LIMITED_CONNECTIVITY,
                               f"bridge {conf.bridge} is missing but pods hold addresses"
                               ) from None


def _in_set(ip: str, rset: list[ipam.Range]) -> bool:
    try:
        version, value = parse_ip(ip)
    except AddressError:
        return False
    return any(r.contains(version, value) for r in rset)
