"""Restarting the proxy daemon, or a full resync, breaks no connection and fails no request.

The real ``svcnet proxy`` runs against a real etcd and programs the lab's node namespace;
a client pod keeps one TCP connection open and makes 1000 new connections while the
daemon is killed and restarted (each start is a full sync), runs a periodic full resync
every second, and endpoints change.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EtcdCluster, free_port
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from test_proxy_flows import PODS, Lab, build_lab

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.open import open_store

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

LOOP = r'''
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failures, answers = [], set()
held = socket.create_connection((host, port), timeout=3)
held_name = None
held_checks = 0
deadline = time.monotonic() + 120
for i in range(n):
    if time.monotonic() > deadline:
        failures.append("loop deadline")
        break
    try:
        c = socket.create_connection((host, port), timeout=3)
        c.sendall(b"x")
        data = c.recv(100).decode()
        c.close()
        if not data:
            failures.append(f"{i}: empty answer")
        answers.add(data.split()[0] if data else "")
    except OSError as e:
        failures.append(f"{i} at {time.time():.3f}: {e!r}")
    if i % 20 == 0:
        try:
            held.sendall(b"p")
            data = held.recv(100).decode()
            name = data.split()[0] if data else ""
            if held_name is None:
                held_name = name
            if not data or name != held_name:
                failures.append(f"held connection broke at {i}: {data!r}")
            held_checks += 1
        except OSError as e:
            failures.append(f"held connection: {e!r}")
    time.sleep(0.004)
print(json.dumps({"failures": failures, "answers": sorted(answers), "held": held_checks}))
'''


@pytest.fixture
def lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    yield from build_lab(netns, tmp_path)


def put_all(store_url: str, objects: list[tuple[Any, dict[str, Any]]]) -> None:
    async def go() -> None:
        store = open_store(store_url)
        try:
            for kind, obj in objects:
                await store.put(kind, obj)
        finally:
            await store.close()

    asyncio.run(go())


class Daemon:
    def __init__(self, lab: Lab, store: str, mode: str, log: Path) -> None:
        self.lab, self.store, self.mode, self.log = lab, store, mode, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[tuple[str, float]] = []

    def start(self) -> None:
        self.events.append(("start", time.time()))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "svcnet.cli", "proxy", "--store", self.store,
                 "--proxy-mode", self.mode, "--proxy-netns", self.lab.node,
                 "--proxy-node-name", "n1", "--proxy-cluster-cidr", "10.1.0.0/16",
                 "--proxy-ip-families", "4", "--proxy-min-sync-period", "0.1",
                 # periodic full resyncs every second while the loop runs, too
                 "--proxy-sync-period", "0.5", "--proxy-full-sync-period", "1",
                 "--proxy-healthz-bind-address", f"127.0.0.1:{self.port}",
                 "--proxy-metrics-bind-address", "", "--proxy-nodeport-addresses",
                 "192.168.1.0/24"],
                stdout=log, stderr=log)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.port}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        self.events.append(("healthy", time.time()))
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"proxy never became healthy: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.events.append(("stop", time.time()))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_restart_and_resync_drop_nothing(mode: str, lab: Lab, etcd: EtcdCluster,
                                         tmp_path: Path) -> None:
    store = f"etcd://{etcd.endpoints[0]}"
    p1, p2, p3 = PODS["pod1"], PODS["pod2"], PODS["pod3"]
    put_all(store, [
        (SERVICE, service("web", "10.96.0.10", port(80, target=8080))),
        (ENDPOINT_SLICE, endpoint_slice("web", endpoint(p1), endpoint(p2), endpoint(p3))),
    ])
    daemon = Daemon(lab, store, mode, tmp_path / "proxy.log")
    daemon.start()
    (tmp_path / "loop.py").write_text(LOOP)
    loop = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns["cpod"], sys.executable, str(tmp_path / "loop.py"),
         "10.96.0.10", "80", "1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        time.sleep(0.5)
        for _ in range(2):
            daemon.stop()
            time.sleep(0.2)
            daemon.start()
            time.sleep(0.5)
        # Live changes while connections flow: a partial sync, then another restart.
        daemon.events.append(("remove pod3", time.time()))
        put_all(store, [(ENDPOINT_SLICE, endpoint_slice("web", endpoint(p1), endpoint(p2)))])
        time.sleep(0.3)
        daemon.events.append(("re-add pod3", time.time()))
        put_all(store, [(ENDPOINT_SLICE, endpoint_slice(
            "web", endpoint(p1), endpoint(p2), endpoint(p3)))])
        daemon.stop()
        daemon.start()
        out, _ = loop.communicate(timeout=150)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait(5)
        daemon.stop()
    assert out.strip(), "loop printed nothing"
    result = json.loads(out.strip().splitlines()[-1]) if out.strip().startswith("{") else out
    assert isinstance(result, dict), out
    if result["failures"]:  # keep what a post-mortem needs: when, and what the node held
        events = "\n".join(f"{what} {when:.3f}" for what, when in daemon.events)
        conntrack = subprocess.run(["ip", "netns", "exec", lab.node, "conntrack", "-L"],
                                   capture_output=True, text=True).stdout
        conntrack = "\n".join(ln for ln in conntrack.splitlines() if "TIME_WAIT" not in ln)
        rules = subprocess.run(["ip", "netns", "exec", lab.node, "nft", "list", "ruleset"],
                               capture_output=True, text=True).stdout
        pytest.fail(f"failures {result['failures']}\ndaemon events:\n{events}\n"
                    f"conntrack:\n{conntrack}\nrules:\n{rules}\n"
                    f"log:\n{(tmp_path / 'proxy.log').read_text()}")
    assert result["held"] == 50
    assert set(result["answers"]) == {"pod1", "pod2", "pod3"}
    # the daemon logged no failure
    text = (tmp_path / "proxy.log").read_text()
    assert "Traceback" not in text, text
    assert "full=False" not in text  # no sync failed
