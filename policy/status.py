"""Kernel vs desired: both sides reduced to comparable items (chains, maps, elements with
their addresses, protocols and ports as integer ranges, verdicts), whatever spelling ``nft``
prints back (prefixes for ranges, protocol names for numbers)."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

from svcnet.policy.nftables import TABLE, Rendered, parse_address

Item = tuple[str, ...]


def desired_items(r: Rendered) -> set[Item]:
    items: set[Item] = {("chain", n) for n in r.chains} | {("map", n) for n in r.maps}
    items |= {("counter", n) for n in r.counters}
    for name, elems in r.elements.items():
        for key, verdict in elems.items():
            items.add(("element", name, _norm_text_key(key), verdict))
    return items


def _norm_text_key(key: str) -> str:
    fields = key.split(" . ")
    if len(fields) == 1:
        return str(ipaddress.ip_address(fields[0]))
    fam, lo, hi = parse_address(fields[0])
    out = [f"{fam}:{lo}-{hi}"]
    for f in fields[1:]:
        a, _, b = f.partition("-")
        out.append(f"{a}-{b or a}")
    return " . ".join(out)


def kernel_items(commands: Any) -> set[Item]:
    dump = json.loads(commands.run(["nft", "-j", "list", "table", "inet", TABLE]))
    items: set[Item] = set()
    for obj in dump.get("nftables", []):
        if "chain" in obj:
            items.add(("chain", obj["chain"]["name"]))
        elif "counter" in obj:
            items.add(("counter", obj["counter"]["name"]))
        elif "map" in obj:
            m = obj["map"]
            items.add(("map", m["name"]))
            for key, verdict in m.get("elem", []):
                items.add(("element", m["name"], _norm_json_key(key), _verdict(verdict)))
    return items


def _verdict(v: dict[str, Any]) -> str:
    (kind, body), = v.items()
    return f"{kind} {body['target']}"


def _norm_json_key(key: Any) -> str:
    if isinstance(key, str):
        return str(ipaddress.ip_address(key))
    fields = key["concat"]
    out = []
    addr = fields[0]
    if isinstance(addr, str):
        a = ipaddress.ip_address(addr)
        out.append(f"{a.version}:{int(a)}-{int(a)}")
    elif "prefix" in addr:
        net = ipaddress.ip_network(f"{addr['prefix']['addr']}/{addr['prefix']['len']}")
        out.append(f"{net.version}:{int(net.network_address)}-{int(net.broadcast_address)}")
    else:
        lo, hi = (ipaddress.ip_address(x) for x in addr["range"])
        out.append(f"{lo.version}:{int(lo)}-{int(hi)}")
    for f in fields[1:]:
        if isinstance(f, dict):
            first, last = (_number(x) for x in f["range"])
        else:
            first = last = _number(f)
        out.append(f"{first}-{last}")
    return " . ".join(out)


def _number(v: Any) -> int:
    if isinstance(v, int):
        return v
    if str(v).isdigit():
        return int(v)
    return socket.getprotobyname(str(v))


def compare(desired: Rendered, kernel: set[Item]) -> tuple[set[Item], set[Item]]:
    """(missing from the kernel, extra in the kernel)."""
    want = desired_items(desired)
    return want - kernel, kernel - want
