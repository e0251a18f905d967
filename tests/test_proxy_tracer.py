"""The packet tracers themselves, on small hand-written dumps."""

from __future__ import annotations

from typing import Any

import pytest
from svcnet.proxy.tracer import IptablesTracer, NftTracer, Packet, Unsupported

SAVE = """
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreach
-A KUBE-SERVICES -d 10.96.0.3/32 -p udp -m udp --dport 53 -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:SVC - [0:0]
:SEP1 - [0:0]
:SEP2 - [0:0]
:SEP3 - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j SVC
-A SVC ! -s 10.1.0.0/16 -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ
-A SVC -m recent --rcheck --seconds 10 --reap --name SEP1 --mask 255.255.255.255 --rsource -j SEP1
-A SVC -m statistic --mode random --probability 0.3333333333 -j SEP1
-A SVC -m statistic --mode random --probability 0.5000000000 -j SEP2
-A SVC -j SEP3
-A SEP1 -s 10.1.0.1/32 -j KUBE-MARK-MASQ
-A SEP1 -p tcp -m tcp -j DNAT --to-destination 10.1.0.1:8080
-A SEP2 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080
-A SEP3 -p tcp -m tcp -j DNAT --to-destination 10.1.0.3:8080
COMMIT
"""

EPS = ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]


@pytest.mark.parametrize(("pkt", "expected"), [
    (Packet("10.1.0.9", "10.96.0.1", 80), (EPS, False)),
    (Packet("192.168.0.5", "10.96.0.1", 80), (EPS, True)),
    (Packet("10.1.0.9", "10.96.0.1", 81), ("ACCEPT",)),
    (Packet("10.1.0.9", "10.96.0.2", 80), ("REJECT",)),
    (Packet("10.1.0.9", "10.96.0.3", 53, "UDP"), ("DROP",)),
    (Packet("10.1.0.9", "10.96.0.3", 53, "TCP"), ("ACCEPT",)),
    (Packet("192.168.0.1", "10.96.0.2", 80, from_node=True), ("REJECT",)),
])
def test_iptables_tracer(pkt: Packet, expected: tuple[Any, ...]) -> None:
    assert IptablesTracer(SAVE).trace(pkt).summary() == expected


def test_iptables_tracer_hairpin_masquerades_only_the_self_branch() -> None:
    trace = IptablesTracer(SAVE).trace(Packet("10.1.0.1", "10.96.0.1", 80))
    assert {(o.destination, o.masquerade) for o in trace.outcomes} == {
        ("10.1.0.1:8080", True), ("10.1.0.2:8080", False), ("10.1.0.3:8080", False)}
    assert trace.summary()[1] == "mixed"


def test_iptables_tracer_refuses_unknown_constructs() -> None:
    with pytest.raises(Unsupported):
        IptablesTracer("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING --frobnicate 1 -j ACCEPT\n")


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
KEY = {"concat": [DADDR, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th",
                                                                    "field": "dport"}}]}
MARK = {"meta": {"key": "mark"}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "ip", "table": "t", "chain": chain, "expr": list(expr)}}


NFT = {"nftables": [
    {"map": {"name": "svc", "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
             "elem": [[{"concat": ["10.96.0.1", "tcp", 80]}, {"goto": {"target": "lb"}}],
                      [{"concat": ["10.96.0.1", "udp", 80]}, {"goto": {"target": "lb"}}],
                      [{"concat": ["10.96.0.2", "tcp", 80]}, {"goto": {"target": "rej"}}]]}},
    {"map": {"name": "backends", "type": ["ipv4_addr", "inet_proto", "inet_service", "integer"],
             "map": "ipv4_addr . inet_service",
             "elem": [[{"concat": ["10.96.0.1", "tcp", 80, 0]}, {"concat": ["10.1.0.1", 8080]}],
                      [{"concat": ["10.96.0.1", "tcp", 80, 1]}, {"concat": ["10.1.0.2", 8080]}]]}},
    {"set": {"name": "allow", "type": ["ipv4_addr"], "flags": ["interval"],
             "elem": [{"prefix": {"addr": "10.1.0.0", "len": 16}}]}},
    {"chain": {"name": "pre", "type": "nat", "hook": "prerouting", "prio": -100}},
    {"chain": {"name": "out", "type": "nat", "hook": "output", "prio": -100}},
    {"chain": {"name": "post", "type": "nat", "hook": "postrouting", "prio": 100}},
    {"chain": {"name": "fwd", "type": "filter", "hook": "forward", "prio": 0}},
    {"chain": {"name": "lb"}}, {"chain": {"name": "rej"}}, {"chain": {"name": "mark"}},
    _rule("pre", _match(SADDR, "@allow", "!="), {"jump": {"target": "mark"}}),
    _rule("pre", {"vmap": {"key": KEY, "data": "@svc"}}),
    _rule("out", {"vmap": {"key": KEY, "data": "@svc"}}),
    _rule("mark", {"mangle": {"key": MARK, "value": {"|": [MARK, 16384]}}}),
    _rule("lb", {"dnat": {"family": "ip", "addr": {"map": {"key": {"concat": [
        DADDR, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}},
        {"numgen": {"mode": "random", "mod": 2, "offset": 0}}]}, "data": "@backends"}}}}),
    _rule("rej", {"reject": {"type": "icmp", "expr": "port-unreachable"}}),
    _rule("fwd", _match(DADDR, {"prefix": {"addr": "10.1.0.2", "len": 32}}),
          _match({"meta": {"key": "l4proto"}}, "udp"), {"drop": None}),
    _rule("post", _match({"&": [MARK, 16384]}, 0), {"return": None}),
    _rule("post", {"masquerade": None}),
]}

for _item in NFT["nftables"]:  # what nft -j puts in every object
    for _body in _item.values():
        _body.setdefault("family", "ip")
        _body.setdefault("table", "t")

NFT_EPS = ["10.1.0.1:8080", "10.1.0.2:8080"]


@pytest.mark.parametrize(("pkt", "expected"), [
    (Packet("10.1.0.9", "10.96.0.1", 80), (NFT_EPS, False)),
    (Packet("172.16.0.1", "10.96.0.1", 80), (NFT_EPS, True)),
    (Packet("10.1.0.9", "10.96.0.2", 80), ("REJECT",)),
    (Packet("10.1.0.9", "10.96.0.3", 80), ("ACCEPT",)),
    (Packet("10.1.0.9", "10.96.0.1", 80, from_node=True), (NFT_EPS, False)),
])
def test_nft_tracer(pkt: Packet, expected: tuple[Any, ...]) -> None:
    assert NftTracer(NFT).trace(pkt).summary() == expected


def test_nft_tracer_map_miss_drops() -> None:
    trace = NftTracer(NFT).trace(Packet("10.1.0.9", "10.96.0.1", 80, "UDP"))
    # no UDP backends element: the dnat map lookup misses and the kernel drops the packet
    assert trace.summary() == ("DROP",)


def test_nft_tracer_forward_filter_sees_translated_destination() -> None:
    fwd = {**NFT, "nftables": [*NFT["nftables"], {"map": {
        "family": "ip", "table": "t", "name": "backends", "type": [], "map": "x",
        "elem": [[{"concat": ["10.96.0.1", "udp", 80, 0]}, {"concat": ["10.1.0.1", 53]}],
                 [{"concat": ["10.96.0.1", "udp", 80, 1]}, {"concat": ["10.1.0.2", 53]}]]}}]}
    trace = NftTracer(fwd).trace(Packet("10.1.0.9", "10.96.0.1", 80, "UDP"))
    assert {(o.verdict, o.destination) for o in trace.outcomes} == {
        ("ACCEPT", "10.1.0.1:53"), ("DROP", "10.1.0.2:53")}
