"""Deleting stale UDP conntrack entries, so UDP clients (DNS!) fail over at once.

UDP has no connection to break: without this, a client that keeps sending from the same
source port keeps hitting a removed endpoint through its old NAT entry until the entry
times out. Same rule as kube-proxy: after a sync, delete UDP entries from each frontend to
each endpoint it lost, and every UDP entry of a frontend that just gained its first
endpoint (packets rejected before were tracked without NAT).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from svcnet.proxy.state import Changes, Family

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class StaleFlow:
    """UDP flows to ``frontend_ip:frontend_port`` NATed to ``endpoint_ip`` (any, if empty)."""

    family: Family
    frontend_ip: str
    frontend_port: int
    endpoint_ip: str = ""


def stale_flows(changes: Changes) -> list[StaleFlow]:
    flows: set[StaleFlow] = set()
    for key, change in changes.changed.items():
        if key.protocol != "UDP":
            continue
        before = change.previous
        after = change.current
        old = {(fe.ip, fe.port): {b.ip for b in before.endpoints_for(fe)}
               for fe in before.frontends} if before else {}
        new = {(fe.ip, fe.port): {b.ip for b in after.endpoints_for(fe)}
               for fe in after.frontends} if after else {}
        for (ip, port), eps in old.items():
            for ep in eps - new.get((ip, port), set()):
                flows.add(StaleFlow(key.family, ip, port, ep))
        for (ip, port), eps in new.items():
            if eps and not old.get((ip, port)):
                flows.add(StaleFlow(key.family, ip, port))
    return sorted(flows)


class ConntrackTable(Protocol):
    def delete(self, flows: Sequence[StaleFlow]) -> int:
        """Delete the matching UDP entries; return how many were deleted."""
        ...


@dataclass(slots=True)
class NetlinkConntrack:
    """Deletes entries over ctnetlink with pyroute2, in ``netns`` if given."""

    netns: str | None = None

    def delete(self, flows: Sequence[StaleFlow]) -> int:
        if not flows:
            return 0
        from pyroute2.conntrack import Conntrack, NFCTAttrTuple
        from pyroute2.netlink.exceptions import NetlinkError

        deleted = 0
        for family in {f.family for f in flows}:
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            kwargs = {"netns": self.netns} if self.netns else {}
            ct = Conntrack(nfgen_family=af, **kwargs)
            try:
                for flow in (f for f in flows if f.family == family):
                    match = NFCTAttrTuple(family=af, proto=socket.IPPROTO_UDP,
                                          daddr=flow.frontend_ip, dport=flow.frontend_port)
                    for entry in list(ct.dump_entries(tuple_orig=match)):
                        reply = entry.tuple_reply
                        if flow.endpoint_ip and reply.saddr != flow.endpoint_ip:
                            continue
                        try:
                            ct.entry("del", tuple_orig=entry.tuple_orig)
                            deleted += 1
                        except (OSError, NetlinkError) as err:  # gone since the dump
                            log.debug("conntrack delete: %s", err)
            finally:
                ct.close()
        return deleted


@dataclass(slots=True)
class FakeConntrack:
    deleted: list[StaleFlow] = field(default_factory=list)

    def delete(self, flows: Sequence[StaleFlow]) -> int:
        self.deleted += flows
        return len(flows)
