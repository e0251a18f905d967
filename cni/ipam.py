"""Host-local IPAM: the reference ``host-local`` plugin's semantics and on-disk layout.

Layout under ``<dataDir>/<network>/`` (the same as host-local's, so a node can switch between
the two plugins with pods running): one file per reserved address, named by the address and
holding ``<containerID>\\r\\n<ifname>``; ``last_reserved_ip.<set>`` per range set for round-robin;
and an exclusive ``flock`` on the file ``lock`` in it around every allocate/release (the file
host-local 1.x locks, so the two also exclude each other). Reserving is an
``O_CREAT|O_EXCL`` create, so a process killed at any point leaves either a complete
reservation (which DEL or GC releases) or nothing.
"""

from __future__ import annotations

import fcntl
import posix
import time

from . import posixfs
from .addr import AddressError, Prefix, format_ip, parse_ip
from .spec import (
    ERR_ADDRESS_EXHAUSTED,
    ERR_INVALID_CONFIG,
    ERR_IO,
    ERR_TRY_AGAIN,
    CniError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_RESERVED = "last_reserved_ip."
LOCK_TIMEOUT_S = 20.0
LINE_BREAK = "\r\n"
LOCK_FILE = "lock"  # host-local's lock: <dataDir>/<network>/lock
MAX_NAME = 255  # the network name is a directory name (NAME_MAX)


def _invalid(msg: str, details: str = "") -> CniError:
    return CniError(ERR_INVALID_CONFIG, msg, details)


def safe_name(kind: str, value: object, max_len: int = 0) -> str:
    """Validate a string that becomes a path component or link name: starts alphanumeric,
    then alphanumerics and ``_.-`` only (the spec's container-ID rule), never ``.``/``..``."""
    if not isinstance(value, str) or not value:
        raise _invalid(f"{kind} is missing or not a string")
    if not value[0].isascii() or not value[0].isalnum() or not all(
            c.isascii() and (c.isalnum() or c in "_.-") for c in value):
        raise _invalid(f"{kind} {value!r} has invalid characters",
                       "allowed: letters, digits, '_', '.', '-', starting alphanumeric")
    if max_len and len(value) > max_len:
        raise _invalid(f"{kind} {value!r} is longer than {max_len} characters")
    return value


def short_hash(text: str, length: int) -> str:
    """Hex digest prefix for names derived from identifiers (``_sha256`` avoids hashlib's
    OpenSSL load, ~4 ms)."""
    import _sha256  # type: ignore[import-not-found]

    return str(_sha256.sha256(text.encode()).hexdigest())[:length]


class Range:
    """One contiguous allocatable range inside a subnet."""

    __slots__ = ("end", "gateway", "start", "subnet")

    def __init__(self, subnet: Prefix, start: int, end: int, gateway: int | None) -> None:
        self.subnet = subnet
        self.start = start
        self.end = end
        self.gateway = gateway

    @property
    def version(self) -> int:
        return self.subnet.version

    def contains(self, version: int, value: int) -> bool:
        return version == self.subnet.version and self.start <= value <= self.end

    def describe(self) -> str:
        v = self.version
        return f"{format_ip(v, self.start)}-{format_ip(v, self.end)}"


def _range_field(doc: dict[str, Any], key: str) -> tuple[int, int] | None:
    value = doc.get(key)
    if not value:
        return None
    try:
        return parse_ip(value)
    except AddressError as err:
        raise _invalid(f"range {key} {value!r}: {err}") from None


def parse_range(doc: object) -> Range:
    """One range of a range set, validated like host-local (its messages where it has
    one): the subnet must be a network address, not an address with host bits set."""
    if not isinstance(doc, dict) or "subnet" not in doc:
        raise _invalid("every range needs a 'subnet'")
    try:
        given = Prefix.parse(doc["subnet"])
    except AddressError as err:
        raise _invalid(f"range subnet {doc['subnet']!r}: {err}") from None
    subnet = given.masked()
    v = subnet.version
    if subnet.length > subnet.bits - 2:
        raise _invalid(f"Network {subnet} too small to allocate from")
    if given.address != subnet.network:
        raise _invalid(f"Network has host bits set. For a subnet mask of length "
                       f"{subnet.length} the network address is {format_ip(v, subnet.network)}",
                       f"range subnet {doc['subnet']!r}: use {subnet}")
    first = subnet.network + 1
    last = subnet.broadcast - 1 if v == 4 else subnet.broadcast
    start = _range_field(doc, "rangeStart") or (v, first)
    end = _range_field(doc, "rangeEnd") or (v, last)
    gateway = _range_field(doc, "gateway") or (v, first)
    for label, (ver, value) in (("rangeStart", start), ("rangeEnd", end)):
        if not subnet.contains(ver, value) or not first <= value <= last:
            raise _invalid(f"{label} {format_ip(ver, value)} is not a usable address of {subnet}")
    if start[1] > end[1]:
        raise _invalid(f"rangeStart is after rangeEnd in {subnet}")
    if not subnet.contains(*gateway):
        raise _invalid(f"gateway {format_ip(*gateway)} is not in {subnet}")
    return Range(subnet, start[1], end[1], gateway[1])


def parse_subnet_file(path: str) -> dict[str, str]:
    """A Flannel ``subnet.env``: ``KEY=value`` lines (FLANNEL_NETWORK, FLANNEL_SUBNET,
    FLANNEL_MTU, FLANNEL_IPMASQ and the FLANNEL_IPV6_* pair)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CniError(ERR_TRY_AGAIN, f"subnetFile {path} does not exist yet",
                       "the overlay daemon writes it once this node has a subnet lease"
                       ) from None
    except OSError as err:
        raise CniError(ERR_IO, f"cannot read subnetFile {path}: {err.strerror}") from None
    env = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            env[key.strip()] = value.strip()
    if "FLANNEL_SUBNET" not in env and "FLANNEL_IPV6_SUBNET" not in env:
        raise _invalid(f"subnetFile {path} has no FLANNEL_SUBNET")
    return env


class IpamConfig:
    """Everything IPAM needs, computed once from the config, the subnet file and CNI_ARGS."""

    __slots__ = ("data_dir", "ipmasq", "mtu", "network", "range_sets", "requested", "routes")

    def __init__(self, network: str, data_dir: str, range_sets: list[list[Range]],
                 routes: list[dict[str, Any]], requested: list[tuple[int, int]],
                 mtu: int = 0, ipmasq: bool | None = None) -> None:
        self.network = network
        self.data_dir = data_dir
        self.range_sets = range_sets
        self.routes = routes
        self.requested = requested
        self.mtu = mtu
        self.ipmasq = ipmasq

    @property
    def directory(self) -> str:
        return posixfs.join(self.data_dir, self.network)


def parse_config(conf: dict[str, Any], cni_args: dict[str, str]) -> IpamConfig:
    """The ``ipam`` section (plus ``args``/``runtimeConfig``) -> :class:`IpamConfig`."""
    network = safe_name("network name", conf.get("name"), MAX_NAME)
    ipam = conf.get("ipam")
    if not isinstance(ipam, dict):
        raise _invalid("the configuration has no 'ipam' object")
    data_dir = ipam.get("dataDir") or DEFAULT_DATA_DIR
    if not isinstance(data_dir, str) or not data_dir.startswith("/"):
        raise _invalid(f"ipam.dataDir {data_dir!r} must be an absolute path")
    raw_sets: Any = ipam.get("ranges")
    runtime = conf.get("runtimeConfig") or {}
    if isinstance(runtime, dict) and runtime.get("ipRanges"):
        raw_sets = runtime["ipRanges"]
    routes = ipam.get("routes") or []
    mtu = 0
    ipmasq = None
    if ipam.get("subnetFile") and not raw_sets and not ipam.get("subnet"):
        env = parse_subnet_file(str(ipam["subnetFile"]))
        raw_sets = []
        derived_routes = []
        for subnet_key, network_key in (("FLANNEL_SUBNET", "FLANNEL_NETWORK"),
                                        ("FLANNEL_IPV6_SUBNET", "FLANNEL_IPV6_NETWORK")):
            if not env.get(subnet_key):
                continue
            try:
                node_subnet = Prefix.parse(env[subnet_key])
            except AddressError as err:
                raise _invalid(f"subnetFile {subnet_key}: {err}") from None
            entry = {"subnet": str(node_subnet.masked())}
            if node_subnet.address != node_subnet.network:
                entry["gateway"] = format_ip(node_subnet.version, node_subnet.address)
            raw_sets.append([entry])
            if env.get(network_key):
                derived_routes.append({"dst": env[network_key]})
        if not routes:
            routes = derived_routes
        if env.get("FLANNEL_MTU", "").isdigit():
            mtu = int(env["FLANNEL_MTU"])
        if "FLANNEL_IPMASQ" in env:
            ipmasq = env["FLANNEL_IPMASQ"].lower() == "true"
    if not raw_sets and ipam.get("subnet"):
        raw_sets = [[{k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway")
                      if ipam.get(k)}]]
    if not raw_sets or not isinstance(raw_sets, list):
        raise _invalid("ipam needs 'ranges' (or 'subnet', or 'subnetFile')")
    range_sets: list[list[Range]] = []
    for raw in raw_sets:
        if not isinstance(raw, list) or not raw:
            raise _invalid("each entry of ipam.ranges must be a non-empty list of ranges")
        rset = [parse_range(r) for r in raw]
        if len({r.version for r in rset}) != 1:
            raise _invalid("a range set mixes IPv4 and IPv6")
        for i, a in enumerate(rset):
            for b in rset[i + 1:]:
                if a.version == b.version and a.start <= b.end and b.start <= a.end:
                    raise _invalid(f"ranges {a.describe()} and {b.describe()} overlap")
        range_sets.append(rset)
    if not isinstance(routes, list) or not all(isinstance(r, dict) and "dst" in r
                                               for r in routes):
        raise _invalid("ipam.routes must be a list of objects with 'dst'")
    for route in routes:
        for key in ("dst", "gw"):
            try:
                if key == "dst":
                    Prefix.parse(route["dst"])
                elif route.get("gw"):
                    parse_ip(route["gw"])
            except AddressError as err:
                raise _invalid(f"route {key} {route.get(key)!r}: {err}") from None
    return IpamConfig(network, data_dir, range_sets, list(routes),
                      _requested_ips(conf, cni_args), mtu, ipmasq)


def _requested_ips(conf: dict[str, Any], cni_args: dict[str, str]) -> list[tuple[int, int]]:
    texts: list[str] = []
    if cni_args.get("IP"):
        texts += cni_args["IP"].split(",")
    args = conf.get("args")
    if isinstance(args, dict) and isinstance(args.get("cni"), dict):
        texts += [str(ip) for ip in args["cni"].get("ips") or []]
    runtime = conf.get("runtimeConfig")
    if isinstance(runtime, dict):
        texts += [str(ip) for ip in runtime.get("ips") or []]
    out = []
    for text in texts:
        try:
            out.append(parse_ip(text.strip().split("/", 1)[0]))
        except AddressError as err:
            raise _invalid(f"requested IP: {err}") from None
    return out


class Store:
    """The on-disk reservations of one network; use as a context manager to hold the lock.

    The lock is an exclusive ``flock`` on ``<directory>/lock``, the file host-local 1.x
    locks, so the two plugins exclude each other on a shared data directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fd = -1

    def __enter__(self) -> Store:
        try:
            posixfs.makedirs(self.directory)
            self._fd = posix.open(posixfs.join(self.directory, LOCK_FILE),
                                  posix.O_RDONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o644)
        except OSError as err:
            raise CniError(ERR_IO, f"cannot open IPAM lock {self.directory}/{LOCK_FILE}: "
                           f"{err.strerror}") from None
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    posix.close(self._fd)
                    raise CniError(ERR_TRY_AGAIN, f"IPAM lock on {self.directory} is busy",
                                   f"held for more than {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        posix.close(self._fd)  # closing drops the flock
        self._fd = -1

    def _path(self, name: str) -> str:
        return posixfs.join(self.directory, name)

    def reserve(self, ip: str, container_id: str, ifname: str) -> bool:
        """Reserve ``ip``; False when someone holds it already."""
        try:
            fd = posix.open(self._path(ip),
                            posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise CniError(ERR_IO, f"cannot reserve {ip} in {self.directory}: "
                           f"{err.strerror}") from None
        try:
            posix.write(fd, f"{container_id}{LINE_BREAK}{ifname}".encode())
        except OSError as err:
            posix.close(fd)
            posix.unlink(self._path(ip))
            raise CniError(ERR_IO, f"cannot write reservation {ip} in {self.directory}: "
                           f"{err.strerror}") from None
        posix.close(fd)
        return True

    def last_reserved(self, set_index: int) -> str:
        try:
            with open(self._path(f"{LAST_RESERVED}{set_index}"), encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, ValueError):
            return ""

    def set_last_reserved(self, set_index: int, ip: str) -> None:
        """Written in place like host-local: a torn write only makes the next allocation
        start from the range's beginning, and a crash leaves no temporary file behind."""
        try:
            fd = posix.open(self._path(f"{LAST_RESERVED}{set_index}"),
                            posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC,
                            0o644)
            try:
                posix.write(fd, ip.encode())
            finally:
                posix.close(fd)
        except OSError as err:
            raise CniError(ERR_IO, f"cannot write {LAST_RESERVED}{set_index} in "
                           f"{self.directory}: {err.strerror}") from None

    def allocations(self) -> dict[str, tuple[str, str]]:
        """Every reservation: address -> (containerID, ifname)."""
        out = {}
        for name in posix.listdir(self.directory):
            if name.startswith((".", LAST_RESERVED)) or name == LOCK_FILE:
                continue
            try:
                with open(self._path(name), "rb") as f:
                    content = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            cid, _, ifname = content.strip().partition("\n")
            out[name] = (cid.strip(), ifname.strip())
        return out

    def find(self, container_id: str, ifname: str) -> list[str]:
        return [ip for ip, owner in self.allocations().items()
                if owner == (container_id, ifname) or owner == (container_id, "")]

    def release(self, ips: list[str]) -> None:
        for ip in ips:
            try:  # noqa: SIM105 - no contextlib on the plugin path
                posix.unlink(self._path(ip))
            except FileNotFoundError:
                pass


class Allocation:
    """One address handed to an attachment, with the range it came from."""

    __slots__ = ("address", "range")

    def __init__(self, address: int, rng: Range) -> None:
        self.address = address
        self.range = rng

    @property
    def ip(self) -> str:
        return format_ip(self.range.version, self.address)

    def to_result(self) -> dict[str, str]:
        rng = self.range
        entry = {"address": f"{self.ip}/{rng.subnet.length}"}
        if rng.gateway is not None:
            entry["gateway"] = format_ip(rng.version, rng.gateway)
        return entry


def allocate(cfg: IpamConfig, store: Store, container_id: str, ifname: str) -> list[Allocation]:
    """One address per range set: the requested one if any, else round-robin after the last
    reserved address. Caller holds the lock and releases on failure."""
    if store.find(container_id, ifname):
        raise CniError(ERR_INVALID_CONFIG,
                       f"{container_id}/{ifname} already has an address in network "
                       f"{cfg.network}", "duplicate allocation is not allowed; DEL it first")
    requested = list(cfg.requested)
    out: list[Allocation] = []
    try:
        for index, rset in enumerate(cfg.range_sets):
            wanted = next((ip for ip in requested
                           if any(r.contains(*ip) for r in rset)), None)
            if wanted is not None:
                requested.remove(wanted)
                rng = next(r for r in rset if r.contains(*wanted))
                text = format_ip(*wanted)
                if wanted[1] == rng.gateway or not store.reserve(text, container_id, ifname):
                    raise CniError(ERR_INVALID_CONFIG,
                                   f"requested IP {text} is not available in network "
                                   f"{cfg.network}")
                out.append(Allocation(wanted[1], rng))
                store.set_last_reserved(index, text)
                continue
            out.append(_next_free(index, rset, store, container_id, ifname))
            store.set_last_reserved(index, out[-1].ip)
        if requested:
            raise CniError(ERR_INVALID_CONFIG,
                           f"requested IP {format_ip(*requested[0])} is not in any range "
                           f"of network {cfg.network}")
    except BaseException:
        store.release([a.ip for a in out])
        raise
    return out


def _next_free(index: int, rset: list[Range], store: Store, container_id: str,
               ifname: str) -> Allocation:
    last = store.last_reserved(index)
    start_range, start_at = 0, rset[0].start
    if last:
        try:
            version, value = parse_ip(last)
        except AddressError:
            version, value = 0, 0
        for i, rng in enumerate(rset):
            if rng.contains(version, value):
                start_range, start_at = i, value + 1
                if start_at > rng.end:
                    start_range = (i + 1) % len(rset)
                    start_at = rset[start_range].start
                break
    order = rset[start_range:] + rset[:start_range]
    for n, rng in enumerate(order):
        first = start_at if n == 0 else rng.start
        for value in _wrapped(first, rng.start, rng.end):
            if value == rng.gateway:
                continue
            if store.reserve(format_ip(rng.version, value), container_id, ifname):
                return Allocation(value, rng)
    raise CniError(ERR_ADDRESS_EXHAUSTED,
                   f"no IP addresses available in range set "
                   f"{', '.join(r.describe() for r in rset)}",
                   "every address is reserved; DEL or GC stale attachments")


def _wrapped(first: int, start: int, end: int) -> Iterator[int]:
    """first..end then start..first-1, lazily (IPv6 ranges have 2**64 addresses)."""
    value = first
    while value <= end:
        yield value
        value += 1
    value = start
    while value < first:
        yield value
        value += 1


def result(cfg: IpamConfig, allocations: list[Allocation],
           dns: dict[str, Any] | None) -> dict[str, Any]:
    """The IPAM result (1.1.0 shape): ips, routes, dns."""
    return {"cniVersion": "1.1.0", "ips": [a.to_result() for a in allocations],
            "routes": [dict(r) for r in cfg.routes], "dns": dns or {}}


def release(cfg: IpamConfig, container_id: str, ifname: str) -> list[str]:
    """Release everything held by the attachment; returns the addresses released."""
    with Store(cfg.directory) as store:
        ips = store.find(container_id, ifname)
        store.release(ips)
    return ips


def collect_garbage(cfg: IpamConfig, valid: set[tuple[str, str]]) -> list[str]:
    """Release every reservation whose (containerID, ifname) is not in ``valid``."""
    if not posixfs.isdir(cfg.directory):
        return []
    with Store(cfg.directory) as store:
        stale = [ip for ip, owner in store.allocations().items()
                 if owner not in valid and (owner[0], "") not in valid]
        store.release(stale)
    return stale


def check(cfg: IpamConfig, container_id: str, ifname: str, ips: list[str]) -> None:
    """Every address of ``ips`` must still be reserved for this attachment."""
    with Store(cfg.directory) as store:
        mine = set(store.find(container_id, ifname))
    missing = [ip for ip in ips if ip not in mine]
    if missing or not mine:
        raise CniError(ERR_INVALID_CONFIG,
                       f"IPAM holds no reservation for {container_id}/{ifname} of "
                       f"{', '.join(missing) or 'any address'}")
