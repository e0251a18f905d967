"""Operability: SERVFAIL until synced, /ready and /health (lame duck), metrics under CoreDNS's
names, the query log, config file and flags, and the real CLI / node daemon against etcd."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import dns.rcode
import pytest
from conftest import EtcdCluster, free_port, require_binary, stop
from dnskit import query, serve, wait_for
from svcnet.dns.daemon import DNSOptions

from svcnet.model import SERVICE, Kind
from svcnet.store.base import NO_SELECTOR, Listing, Selector
from svcnet.store.memory import MemoryStore


class GatedStore(MemoryStore):
    """A store whose first listing waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        if self.gate is None:
            self.gate = asyncio.Event()
        await self.gate.wait()
        return await super().list(kind, selector=selector)

    async def open(self) -> None:
        if self.gate is None:
            self.gate = asyncio.Event()
        self.gate.set()


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def http_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return str(resp.read().decode())


async def one_service(store: MemoryStore) -> None:
    await store.put(SERVICE, {"metadata": {"name": "web", "namespace": "shop"},
                              "spec": {"clusterIP": "10.0.0.10"}})


def test_servfail_and_not_ready_until_synced() -> None:
    store = GatedStore()
    health = free_port()
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=1, health_port=health),
               one_service, store=store, wait_ready=False) as srv:
        assert wait_for(lambda: _status_or_zero(health, "/health") == 200, 5)
        assert http_status(health, "/ready") == 503
        for tcp in (False, True):
            msg = query(srv.port, "web.shop.svc.cluster.local.", "A", tcp=tcp)
            assert msg.rcode() == dns.rcode.SERVFAIL
        srv.call(store.open())
        assert wait_for(lambda: query(srv.port, "web.shop.svc.cluster.local.", "A").rcode()
                        == dns.rcode.NOERROR, 5)
        assert http_status(health, "/ready") == 200


def _status_or_zero(port: int, path: str) -> int:
    try:
        return http_status(port, path)
    except OSError:
        return 0


def test_metrics_have_coredns_names() -> None:
    metrics_port = free_port()
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=2, metrics_port=metrics_port),
               one_service) as srv:
        for _ in range(20):
            query(srv.port, "web.shop.svc.cluster.local.", "A")
        query(srv.port, "nope.shop.svc.cluster.local.", "A", tcp=True)

        def folded() -> bool:
            text = http_text(metrics_port, "/metrics")
            return _sample(text, 'coredns_dns_requests_total{', 'type="A"') >= 21
        assert wait_for(folded, 5), "worker counts are folded into the main process"
        text = http_text(metrics_port, "/metrics")
        assert _sample(text, "coredns_dns_responses_total{", 'rcode="NOERROR"') >= 20
        assert _sample(text, "coredns_dns_responses_total{", 'rcode="NXDOMAIN"') >= 1
        assert 'coredns_dns_request_duration_seconds_bucket{' in text
        for name in ("coredns_cache_entries", "coredns_forward_requests_total",
                     "coredns_kubernetes_dns_programming_duration_seconds"):
            assert f"# TYPE {name.removesuffix('_total')}" in text, name


def _sample(text: str, prefix: str, label: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_lame_duck_keeps_serving_with_health_failing() -> None:
    health = free_port()
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=1, health_port=health,
                          lameduck=1.5), one_service) as srv:
        assert http_status(health, "/health") == 200
        task = next(t for t in asyncio.all_tasks(srv.loop)
                    if t.get_coro().__qualname__.startswith("DNSComponent.run"))  # type: ignore[union-attr]
        srv.loop.call_soon_threadsafe(task.cancel)
        assert wait_for(lambda: http_status(health, "/health") == 503, 1)
        msg = query(srv.port, "web.shop.svc.cluster.local.", "A")
        assert msg.rcode() == dns.rcode.NOERROR, "still answering during lame duck"


def test_query_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="svcnet.dns.query"), \
            serve(DNSOptions(listen=("127.0.0.1", 0), workers=1, query_log=True),
                  one_service) as srv:
        query(srv.port, "web.shop.svc.cluster.local.", "A")
        assert wait_for(lambda: any('"name": "web.shop.svc.cluster.local."' in r.getMessage()
                                    for r in caplog.records), 2)
        line = next(r.getMessage() for r in caplog.records if "web.shop" in r.getMessage())
        assert '"rcode": 0' in line and '"type": 1' in line


def test_config_file_and_flags(tmp_path: Any) -> None:
    from svcnet.dns.cli import load_config
    from svcnet.dns.daemon import add_dns_arguments, options_from_args

    from svcnet.cli import build_parser

    cfg = tmp_path / "dns.yaml"
    cfg.write_text("zone: corp.local\nupstream: 10.0.0.5:5353\nstub-domain:\n"
                   "  - example.org=10.0.0.6\nworkers: 3\n")
    args = build_parser().parse_args(["dns", "--config", str(cfg), "--workers", "4"])
    import argparse

    defaults_parser = argparse.ArgumentParser()
    add_dns_arguments(defaults_parser)
    load_config(str(cfg), vars(defaults_parser.parse_args([])), args)
    opts = options_from_args(args)
    assert opts.zone == "corp.local"
    assert opts.upstreams == [("10.0.0.5", 5353)]
    assert opts.stub_domains == {"example.org.": [("10.0.0.6", 53)]}
    assert opts.workers == 4, "flags win over the file"
    node_args = build_parser().parse_args(["node", "--dns", "--dns-listen", "127.0.0.1:5300",
                                           "--dns-pods", "verified"])
    from svcnet.dns.daemon import node_component

    component = node_component(node_args)
    assert component.name == "dns"
    assert component.options.listen == ("127.0.0.1", 5300)
    assert component.options.pods == "verified"


@pytest.mark.etcd
# in the host's namespace: --no-cni-server, or the node daemon would serve /run/svcnet
@pytest.mark.parametrize("command", [["dns"], ["node", "--dns", "--no-cni-server"]])
def test_cli_against_real_etcd(etcd: EtcdCluster, command: list[str]) -> None:
    """``svcnet dns`` / ``svcnet node --dns`` as processes, watching a real etcd, asked by dig."""
    require_binary("dig")
    from svcnet.store.etcd import EtcdStore

    async def put() -> None:
        store = EtcdStore(etcd.endpoints)
        try:
            await store.put(SERVICE, {"metadata": {"name": "api", "namespace": "prod"},
                                      "spec": {"clusterIP": "10.0.3.3"}})
        finally:
            await store.close()

    asyncio.run(put())
    port = free_port()
    prefix = "--dns-" if command[0] == "node" else "--"
    proc = subprocess.Popen(
        [sys.executable, "-m", "svcnet.cli", *command, "--store", f"etcd://{etcd.endpoints[0]}",
         f"{prefix}listen", f"127.0.0.1:{port}", f"{prefix}workers", "1",
         f"{prefix}upstream", "127.0.0.1:9"], cwd="/", stderr=subprocess.PIPE)
    try:
        def answered() -> bool:
            out = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "-p", str(port),
                                  "@127.0.0.1", "api.prod.svc.cluster.local"],
                                 capture_output=True, text=True, timeout=5).stdout.split()
            return out == ["10.0.3.3"]
        assert wait_for(answered, 20, 0.2), proc.stderr.read1(10000) if proc.poll() else ""  # type: ignore[union-attr]

        async def add() -> None:
            store = EtcdStore(etcd.endpoints)
            try:
                await store.put(SERVICE, {"metadata": {"name": "db", "namespace": "prod"},
                                          "spec": {"clusterIP": "10.0.3.4"}})
            finally:
                await store.close()

        asyncio.run(add())
        assert wait_for(lambda: subprocess.run(
            ["dig", "+short", "+time=1", "+tries=1", "-p", str(port), "@127.0.0.1",
             "db.prod.svc.cluster.local"], capture_output=True, text=True,
            timeout=5).stdout.split() == ["10.0.3.4"], 10, 0.1)
    finally:
        stop(proc)
    time.sleep(0)


def test_workers_default_to_usable_cpus() -> None:
    import os

    from svcnet.dns.daemon import options_from_args, usable_cpus

    from svcnet.cli import build_parser

    opts = options_from_args(build_parser().parse_args(["dns", "--upstream", "127.0.0.1:9"]))
    assert opts.workers == usable_cpus() == len(os.sched_getaffinity(0))
    opts = options_from_args(build_parser().parse_args(
        ["dns", "--upstream", "127.0.0.1:9", "--workers", "0"]))
    assert opts.workers == 0
