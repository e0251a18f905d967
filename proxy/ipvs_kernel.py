"""The one adapter between the IPVS backend and the kernel's IP Virtual Server table.

``NetlinkIpvs`` talks generic netlink through pyroute2 (``IPVS(netns=...)``, so the caller's
thread never changes namespace); ``FakeIpvs`` keeps the same table in dicts and counts every
write, which lets unit tests check that a sync touched only what changed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
PERSISTENT_FLAG = 0x1
MASQ_FORWARDING = 0  # IP_VS_CONN_F_MASQ: IPVS rewrites the destination (NAT mode)


@dataclass(frozen=True, slots=True, order=True)
class VirtualServer:
    """What a client connects to: one IPVS service."""

    ip: str
    protocol: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.protocol.lower()}/{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """Scheduler and ClientIP persistence (0 = none) of a virtual server."""

    scheduler: str = "rr"
    persistence_timeout: int = 0


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class DestState:
    weight: int
    active_connections: int = 0


class IpvsTable(Protocol):
    def services(self) -> dict[VirtualServer, ServiceOptions]: ...

    def add_service(self, vs: VirtualServer, options: ServiceOptions) -> None: ...

    def update_service(self, vs: VirtualServer, options: ServiceOptions) -> None: ...

    def delete_service(self, vs: VirtualServer) -> None: ...

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestState]: ...

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None: ...

    def set_weight(self, vs: VirtualServer, rs: RealServer, weight: int) -> None: ...

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...


class NetlinkIpvs:
    """The kernel's IPVS table in one network namespace (None: ours).

    pyroute2's synchronous sockets run their own asyncio loop, which cannot start inside a
    running one: the socket is opened on first use, i.e. in the worker thread the proxier
    syncs from, never on the daemon's event loop. ``probe()`` opens it at once.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._socket: Any = None

    @property
    def _ipvs(self) -> Any:
        if self._socket is None:
            from pyroute2 import IPVS

            self._socket = IPVS(netns=self._netns) if self._netns else IPVS()
        return self._socket

    def probe(self) -> None:
        """Open the socket now: raises if this kernel has no IPVS."""
        _ = self._ipvs

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # pyroute2's request objects, built only here.
    @staticmethod
    def _svc(vs: VirtualServer, options: ServiceOptions | None = None) -> Any:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {"addr": vs.ip, "port": vs.port,
                                  "protocol": PROTOCOLS[vs.protocol]}
        if options is not None:
            persistent = options.persistence_timeout > 0
            fields.update(
                sched_name=options.scheduler,
                timeout=options.persistence_timeout if persistent else 0,
                flags={"flags": PERSISTENT_FLAG if persistent else 0, "mask": 0xFFFFFFFF},
            )
            if ":" not in vs.ip:
                fields["netmask"] = "255.255.255.255"
        return IPVSService(**fields)

    @staticmethod
    def _dest(rs: RealServer, weight: int) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=rs.ip, port=rs.port, weight=weight, fwd_method=MASQ_FORWARDING)

    def services(self) -> dict[VirtualServer, ServiceOptions]:
        out: dict[VirtualServer, ServiceOptions] = {}
        for msg in self._ipvs.service("dump"):
            a = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
            if "IPVS_SVC_ATTR_ADDR" not in a:  # fwmark services are not ours
                continue
            flags = a.get("IPVS_SVC_ATTR_FLAGS", {}).get("flags", 0)
            vs = VirtualServer(str(a["IPVS_SVC_ATTR_ADDR"]),
                               PROTOCOL_NAMES.get(a["IPVS_SVC_ATTR_PROTOCOL"], "?"),
                               int(a["IPVS_SVC_ATTR_PORT"]))
            timeout = int(a.get("IPVS_SVC_ATTR_TIMEOUT", 0)) if flags & PERSISTENT_FLAG else 0
            out[vs] = ServiceOptions(str(a.get("IPVS_SVC_ATTR_SCHED_NAME", "")), timeout)
        return out

    def add_service(self, vs: VirtualServer, options: ServiceOptions) -> None:
        self._ipvs.service("add", service=self._svc(vs, options))

    def update_service(self, vs: VirtualServer, options: ServiceOptions) -> None:
        self._ipvs.service("set", service=self._svc(vs, options))

    def delete_service(self, vs: VirtualServer) -> None:
        self._ipvs.service("del", service=self._svc(vs))

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestState]:
        out: dict[RealServer, DestState] = {}
        for msg in self._ipvs.dest("dump", service=self._svc(vs)):
            a = _attrs(msg, "IPVS_CMD_ATTR_DEST")
            rs = RealServer(str(a["IPVS_DEST_ATTR_ADDR"]), int(a["IPVS_DEST_ATTR_PORT"]))
            out[rs] = DestState(int(a.get("IPVS_DEST_ATTR_WEIGHT", 0)),
                                int(a.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)))
        return out

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        self._ipvs.dest("add", service=self._svc(vs), dest=self._dest(rs, weight))

    def set_weight(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        self._ipvs.dest("set", service=self._svc(vs), dest=self._dest(rs, weight))

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs.dest("del", service=self._svc(vs), dest=self._dest(rs, 0))


def _attrs(msg: Any, name: str) -> dict[str, Any]:
    nested = msg.get(name)
    return dict(nested["attrs"]) if nested is not None else {}


class FakeIpvs:
    """IPVS in dicts; ``writes`` lists every change as (verb, virtual server, real server)."""

    def __init__(self) -> None:
        self.table: dict[VirtualServer, ServiceOptions] = {}
        self.real: dict[VirtualServer, dict[RealServer, DestState]] = {}
        self.writes: list[tuple[str, VirtualServer, RealServer | None]] = []

    def services(self) -> dict[VirtualServer, ServiceOptions]:
        return dict(self.table)

    def add_service(self, vs: VirtualServer, options: ServiceOptions) -> None:
        if vs in self.table:
            raise FileExistsError(str(vs))
        self.table[vs] = options
        self.real[vs] = {}
        self.writes.append(("add-service", vs, None))

    def update_service(self, vs: VirtualServer, options: ServiceOptions) -> None:
        self._need(vs)
        self.table[vs] = options
        self.writes.append(("update-service", vs, None))

    def delete_service(self, vs: VirtualServer) -> None:
        self._need(vs)
        del self.table[vs], self.real[vs]
        self.writes.append(("delete-service", vs, None))

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestState]:
        self._need(vs)
        return dict(self.real[vs])

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        self._need(vs)
        if rs in self.real[vs]:
            raise FileExistsError(f"{vs} {rs}")
        self.real[vs][rs] = DestState(weight)
        self.writes.append(("add-dest", vs, rs))

    def set_weight(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        old = self.real[vs][rs]
        self.real[vs][rs] = DestState(weight, old.active_connections)
        self.writes.append(("set-weight", vs, rs))

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        del self.real[vs][rs]
        self.writes.append(("delete-dest", vs, rs))

    def set_active(self, vs: VirtualServer, rs: RealServer, count: int) -> None:
        """Test hook: pretend ``count`` connections are still open to ``rs``."""
        self.real[vs][rs] = DestState(self.real[vs][rs].weight, count)

    def _need(self, vs: VirtualServer) -> None:
        if vs not in self.table:
            raise FileNotFoundError(str(vs))

    def __iter__(self) -> Iterator[VirtualServer]:
        return iter(sorted(self.table))
