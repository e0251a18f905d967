"""A wildcard-bound server answers from the address each query was sent to.

Server netns: veth ``10.77.1.1/24`` towards the client, another interface holds ``10.77.2.1``.
The client (``10.77.1.2``) reaches ``10.77.2.1`` through a route, so a reply routed by
default to the client would leave from ``10.77.1.1``; the client must see it come from the
queried address, else its socket (and conntrack) drops it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from conftest import free_port, ns_sh, require_binary, stop

SERVER = """
import asyncio, sys
from svcnet.dns.daemon import DNSComponent, DNSOptions
from svcnet.model import SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory

async def main() -> None:
    store = MemoryStore()
    await store.put(SERVICE, {"metadata": {"name": "web", "namespace": "shop"},
                              "spec": {"clusterIP": "10.0.0.10"}})
    options = DNSOptions(listen=("0.0.0.0", int(sys.argv[1])), workers=int(sys.argv[2]),
                         upstreams=[], health_port=int(sys.argv[3]), health_host="0.0.0.0")
    await DNSComponent(options).run(InformerFactory(store), store)

asyncio.run(main())
"""

# One query with an unconnected socket; prints where the reply came from and its rcode/answer.
CLIENT = """
import json, socket, struct, sys
server, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
q += b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\\x00\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(q, (server, port))
try:
    data, src = s.recvfrom(4096)
except TimeoutError:
    print(json.dumps(None))
else:
    print(json.dumps({"src": src[0], "id": data[:2].hex(), "rcode": data[3] & 15,
                      "tail": data[-4:].hex()}))
"""


def _topology(netns: Callable[[str], str]) -> tuple[str, str]:
    server, client = netns("dsrv"), netns("dcli")
    ns_sh(server, "ip", "link", "add", "vsrv", "type", "veth", "peer", "name", "vcli")
    ns_sh(server, "ip", "link", "set", "vcli", "netns", client)
    ns_sh(server, "ip", "addr", "add", "10.77.1.1/24", "dev", "vsrv")
    ns_sh(server, "ip", "link", "set", "vsrv", "up")
    # A second interface (a veth pair kept inside the server; no dummy module needed).
    ns_sh(server, "ip", "link", "add", "dsvc", "type", "veth", "peer", "name", "dsvc1")
    ns_sh(server, "ip", "addr", "add", "10.77.2.1/32", "dev", "dsvc")
    ns_sh(server, "ip", "link", "set", "dsvc1", "up")
    ns_sh(server, "ip", "link", "set", "dsvc", "up")
    ns_sh(client, "ip", "addr", "add", "10.77.1.2/24", "dev", "vcli")
    ns_sh(client, "ip", "link", "set", "vcli", "up")
    ns_sh(client, "ip", "route", "add", "10.77.2.1/32", "via", "10.77.1.1")
    return server, client


def _ask(client: str, server_ip: str, port: int, name: str) -> dict[str, object] | None:
    out = ns_sh(client, sys.executable, "-c", CLIENT, server_ip, str(port), name,
                timeout=10).stdout
    result: dict[str, object] | None = json.loads(out)
    return result


@pytest.mark.parametrize("workers", [0, 1])
def test_wildcard_replies_from_queried_address(netns: Callable[[str], str],
                                               workers: int) -> None:
    require_binary("ip")
    server, client = _topology(netns)
    port, health = free_port(), free_port()
    proc = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c", SERVER,
                             str(port), str(workers), str(health)],
                            cwd="/", stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        first = None
        while time.monotonic() < deadline and proc.poll() is None:
            first = _ask(client, "10.77.1.1", port, "web.shop.svc.cluster.local")
            if first is not None and first["rcode"] == 0:
                break
            time.sleep(0.2)
        assert first is not None and first["rcode"] == 0, \
            proc.stderr.read1(10000) if proc.poll() is not None else first  # type: ignore[union-attr]
        # Alternating, so a worker's per-address reply control is reused and not confused.
        for address in ("10.77.1.1", "10.77.2.1") * 3:
            # A prepared answer (the worker's or main's fast path) ...
            fast = _ask(client, address, port, "web.shop.svc.cluster.local")
            assert fast is not None, f"no reply accepted from {address}"
            assert fast["src"] == address
            assert fast["id"] == "1234" and fast["rcode"] == 0
            assert fast["tail"] == "0a00000a"  # 10.0.0.10
            # ... and one from the main process's slow path (NXDOMAIN).
            slow = _ask(client, address, port, "nope.shop.svc.cluster.local")
            assert slow is not None, f"no slow-path reply accepted from {address}"
            assert slow["src"] == address and slow["rcode"] == 3
        # /health listens where --health-host says, reachable from the client.
        status = ns_sh(client, sys.executable, "-c",
                       "import urllib.request,sys;print(urllib.request.urlopen("
                       f"'http://10.77.2.1:{health}/health',timeout=3).status)",
                       timeout=10).stdout.strip()
        assert status == "200"
    finally:
        stop(proc)


def test_health_and_metrics_host_flags() -> None:
    import argparse

    from svcnet.dns.daemon import add_dns_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_dns_arguments(parser)
    defaults = options_from_args(parser.parse_args(["--upstream", "127.0.0.1:9"]))
    assert (defaults.health_host, defaults.metrics_host) == ("127.0.0.1", "127.0.0.1")
    chosen = options_from_args(parser.parse_args(
        ["--upstream", "127.0.0.1:9", "--health-host", "0.0.0.0", "--metrics-host", "::"]))
    assert (chosen.health_host, chosen.metrics_host) == ("0.0.0.0", "::")
