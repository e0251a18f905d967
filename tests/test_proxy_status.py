"""``svcnet proxy status``: the running proxy reports kernel drift from what it applied.

A real ``svcnet proxy`` programs a throwaway namespace from a real etcd; a rule is removed by
hand, ``status`` names it and exits 1, and the periodic check's full sync restores it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EtcdCluster, free_port, ns_sh, require_binary, stop
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from test_proxy_restart import put_all

from svcnet.model import ENDPOINT_SLICE, SERVICE

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]


def status(url: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run([sys.executable, "-m", "svcnet.cli", "proxy", "status", "--url", url,
                           "--json"], capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip(), proc.stderr
    body: dict[str, object] = json.loads(proc.stdout)
    return proc.returncode, body


def wait_status(url: str, in_sync: bool, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: tuple[int, dict[str, object]] | None = None
    while time.monotonic() < deadline:
        try:
            last = status(url)
        except (AssertionError, json.JSONDecodeError):
            last = None
        if last is not None and last[1].get("in_sync") is in_sync:
            assert last[0] == (0 if in_sync else 1), last
            return last[1]
        time.sleep(0.2)
    raise AssertionError(f"status never became in_sync={in_sync}: {last}")


def break_rule(mode: str, node: str) -> tuple[str, str]:
    """Remove one of the proxy's kernel objects by hand; returns words naming the item."""
    if mode == "nftables":
        ns_sh(node, "nft", "delete", "element", "ip", "svcnet", "service-ips",
              "{ 10.96.0.10 . tcp . 80 }")
        return "service-ips", "10.96.0.10"
    save = ns_sh(node, "iptables-save", "-t", "nat").stdout
    found = [line.split()[1] for line in save.splitlines() if line.startswith("-A KUBE-SVC-")]
    assert found, save
    ns_sh(node, "iptables", "-w", "5", "-t", "nat", "-F", found[0])
    return found[0], "-A"


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_status_reports_and_repairs_drift(mode: str, netns: Callable[[str], str],
                                         etcd: EtcdCluster, tmp_path: Path) -> None:
    require_binary("nft", "iptables-restore")
    node = netns("node")
    ns_sh(node, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns_sh(node, "ip", "addr", "add", "192.168.1.10/24", "dev", "eth0")
    ns_sh(node, "ip", "link", "set", "eth0", "up")
    store = f"etcd://{etcd.endpoints[0]}"
    put_all(store, [
        (SERVICE, service("web", "10.96.0.10", port(80, target=8080))),
        (ENDPOINT_SLICE, endpoint_slice("web", endpoint("10.1.0.11"), endpoint("10.1.0.12"))),
    ])
    hp = free_port()
    url = f"http://127.0.0.1:{hp}"
    log = tmp_path / "proxy.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "svcnet.cli", "proxy", "--store", store,
             "--proxy-mode", mode, "--proxy-netns", node, "--proxy-node-name", "n1",
             "--proxy-cluster-cidr", "10.1.0.0/16", "--proxy-ip-families", "4",
             "--proxy-min-sync-period", "0.1", "--proxy-sync-period", "20",
             "--proxy-full-sync-period", "3600",
             "--proxy-healthz-bind-address", "", "--proxy-drift-check",
             "--proxy-metrics-bind-address", f"127.0.0.1:{hp}", "--proxy-nodeport-addresses",
             "192.168.1.0/24"], stdout=out, stderr=out)
    try:
        wait_status(url, True)
        name, detail = break_rule(mode, node)
        # Caught before the periodic check repairs it: its first run is 20 s after the
        # start, and the start (Python, the first sync, one `svcnet proxy status` process)
        # took up to ~7 s at a load of 18 on this machine; each status probe up to 5 s.
        code, body = 0, {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, body = status(url)
            if body.get("in_sync") is False:
                break
        assert code == 1, body
        missing = body["missing"]
        assert isinstance(missing, list) and any(name in m and detail in m for m in missing), body
        assert body["extra"] == [], body
        # the periodic check notices the drift and its full sync repairs it
        wait_status(url, True, timeout=40)
        text = log.read_text()
        assert "differ from the last applied" in text, text
        assert "Traceback" not in text, text
    finally:
        stop(proc)


def test_normalisation_ignores_counters_and_handles_but_not_rules() -> None:
    from svcnet.proxy.drift import iptables_items, nft_items

    def dump(packets: int, handle: int, verdict: str) -> dict[str, object]:
        return {"nftables": [
            {"chain": {"family": "ip", "table": "svcnet", "name": "lb-1", "handle": handle}},
            {"rule": {"family": "ip", "table": "svcnet", "chain": "lb-1", "handle": handle,
                      "expr": [{"counter": {"packets": packets, "bytes": packets * 60}},
                               {verdict: None}]}},
        ]}

    assert nft_items(dump(1, 5, "accept")) == nft_items(dump(900, 7, "accept"))
    assert nft_items(dump(1, 5, "accept")) != nft_items(dump(1, 5, "drop"))
    save = ("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:OTHER - [0:0]\n"
            "-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j OTHER\n"
            "-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-X\nCOMMIT\n")
    assert iptables_items(save, 4) == {
        "ip4 nat chain KUBE-SERVICES", "ip4 nat -A PREROUTING -j KUBE-SERVICES",
        "ip4 nat -A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-X"}
