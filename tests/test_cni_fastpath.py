"""The default ``svcnet-cni``: the node daemon's socket client with its in-process fallback.

A real ``svcnet node --cni-server`` process serves a throwaway host namespace; the in-process
launcher is wrapped in a tripwire that records every fallback, so each test knows which path
served a request. Failures in the middle of a request are driven by a fake server speaking
the protocol (accept and vanish, never accept, never answer).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_binary, require_root
from test_cni_helpers import REFERENCE_DIR, PluginError, Runtime, ip_json, links, ns_run, ping

from svcnet.cli import main as svcnet_main

pytestmark = pytest.mark.kernel

SVCNET = os.path.join(os.path.dirname(sys.executable), "svcnet")


@dataclass
class Node:
    """One host namespace with the default install and (maybe) a node daemon serving it."""

    runtime: Runtime
    bindir: Path
    sock: Path
    fallback_log: Path
    daemon: subprocess.Popen[bytes] | None = None

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.runtime.host_ns, SVCNET, "node", "--cni-server",
             "--cni-server-socket", str(self.sock)], stderr=subprocess.DEVNULL,
            start_new_session=True)
        for _ in range(300):  # up to 15 s on a loaded machine
            if _serving(self.sock):
                return
            assert self.daemon.poll() is None, "svcnet node exited"
            time.sleep(0.05)
        raise AssertionError("svcnet node did not serve its CNI socket")

    def kill_daemon(self, with_child: bool = False) -> None:
        """SIGKILL the node daemon; its serving child follows by itself (PDEATHSIG), or
        dies with it abruptly (``with_child``: the socket file stays behind)."""
        if self.daemon is not None and self.daemon.poll() is None:
            if with_child:
                os.killpg(self.daemon.pid, signal.SIGKILL)
            else:
                self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(10)
        for _ in range(100):
            if not _serving(self.sock):
                return
            time.sleep(0.05)
        raise AssertionError("the CNI socket is still served after the daemon died")

    def fallbacks(self) -> list[str]:
        return self.fallback_log.read_text().split() if self.fallback_log.exists() else []


def _serving(sock: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _install(tmp_path: Path, sock: Path) -> tuple[Path, Path]:
    """Default install, with the in-process launcher behind a tripwire logging each use."""
    bindir = tmp_path / "bin"
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", "",
                        "--socket", str(sock), "--python", sys.executable]) == 0
    assert (bindir / "svcnet-cni").read_text().startswith("#!/usr/bin/perl")
    real = bindir / "svcnet-cni-inprocess"
    real.rename(bindir / "inprocess-real")
    log = tmp_path / "fallbacks"
    real.write_text(f'#!/bin/sh\necho "$CNI_COMMAND" >> {log}\n'
                    f'exec {bindir / "inprocess-real"} "$@"\n')
    real.chmod(0o755)
    return bindir, log


@pytest.fixture
def node(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Node]:
    require_root()
    require_binary("ip", "nft", "perl")
    sock = tmp_path / "run" / "cni.sock"
    bindir, log = _install(tmp_path, sock)
    n = Node(Runtime(netns("h"), f"{bindir}:{REFERENCE_DIR}"), bindir, sock, log)
    try:
        yield n
    finally:
        if n.daemon is not None and n.daemon.poll() is None:
            n.daemon.terminate()
            try:
                n.daemon.wait(10)
            except subprocess.TimeoutExpired:
                n.kill_daemon(with_child=True)


def _conf(tmp_path: Path, ip_masq: bool = True) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": "fast", "type": "svcnet-cni", "bridge": "cnifast0",
            "isGateway": True, "isDefaultGateway": True, "ipMasq": ip_masq, "mtu": 1400,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                     "ranges": [[{"subnet": "10.82.0.0/24"}]]}}


def _kernel_state(host: str, pod: str) -> dict[str, Any]:
    """What an ADD leaves in the kernel, without what differs by chance (MACs, indexes)."""
    def link_view(link: dict[str, Any]) -> dict[str, Any]:
        slave = (link.get("linkinfo") or {}).get("info_slave_data") or {}
        return {"ifname": link["ifname"], "mtu": link["mtu"], "flags": sorted(link["flags"]),
                "master": link.get("master"), "kind": (link.get("linkinfo") or {}).get(
                    "info_kind"), "hairpin": slave.get("hairpin")}

    def addrs(ns: str) -> list[tuple[str, str]]:
        return sorted((link["ifname"], f"{a['local']}/{a['prefixlen']}")
                      for link in ip_json(ns, "addr", "show")
                      for a in link.get("addr_info", []) if a.get("scope") != "link")

    ruleset = ns_run(host, "nft", "list", "ruleset").stdout
    return {
        "pod_links": sorted((link_view(li) for li in ip_json(pod, "-d", "link", "show")),
                            key=lambda v: v["ifname"]),
        "host_links": sorted((link_view(li) for li in ip_json(host, "-d", "link", "show")),
                             key=lambda v: v["ifname"]),
        "pod_addrs": addrs(pod), "host_addrs": addrs(host),
        "pod_routes": ip_json(pod, "route", "show"),
        "arp_notify": ns_run(pod, "sysctl", "-n", "net.ipv4.conf.eth0.arp_notify").stdout,
        "ip_forward": ns_run(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout,
        "nft": re.sub(r"\s*# handle \d+", "", ruleset),
    }


def test_default_client_through_daemon_matches_in_process(
        node: Node, netns: Callable[[str], str], tmp_path: Path) -> None:
    """ADD/CHECK/DEL served by the daemon leave exactly the kernel state of in-process runs."""
    node.start_daemon()
    runtime, conf = node.runtime, _conf(tmp_path)
    pod, peer = netns("pa"), netns("pb")
    res = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod, args="IP=10.82.0.10")
    res_b = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-b", peer)
    assert res and res_b and res["ips"][0]["address"] == "10.82.0.10/24"
    assert ping(pod, res_b["ips"][0]["address"].split("/")[0])
    served = _kernel_state(runtime.host_ns, pod)
    runtime.exec_plugin("svcnet-cni", "CHECK", dict(conf, prevResult=res), "ctr-a", pod)
    with pytest.raises(PluginError) as info:  # error JSON and exit status pass through
        runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod)
    assert info.value.code == 7 and info.value.rc == 1
    with pytest.raises(PluginError) as info:
        runtime.exec_plugin("svcnet-cni", "ADD", b"{nope", "ctr-x", pod)
    assert info.value.code == 6
    version = runtime.exec_plugin("svcnet-cni", "VERSION", {"cniVersion": "1.0.0"})
    assert version == {"cniVersion": "1.0.0",
                       "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-a", pod)
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-a", pod)
    assert "eth0" not in links(pod)
    assert node.fallbacks() == []  # every request above was served by the daemon

    in_process = Runtime(runtime.host_ns, runtime.cni_path,
                         {"svcnet-cni": str(node.bindir / "inprocess-real")})
    res2 = in_process.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod, args="IP=10.82.0.10")
    assert res2 is not None and _strip_macs(res2) == _strip_macs(res)
    assert _kernel_state(runtime.host_ns, pod) == served
    in_process.exec_plugin("svcnet-cni", "DEL", conf, "ctr-a", pod)
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-b", peer)
    left = [p.name for p in (tmp_path / "ipam" / "fast").iterdir()
            if not p.name.startswith("last_reserved") and p.name != "lock"]
    assert left == []


def _strip_macs(result: dict[str, Any]) -> dict[str, Any]:
    return dict(result, interfaces=[{k: v for k, v in i.items() if k != "mac"}
                                    for i in result["interfaces"]])


def test_daemon_down_killed_and_restarted(node: Node, netns: Callable[[str], str],
                                          tmp_path: Path) -> None:
    runtime, conf = node.runtime, _conf(tmp_path)
    pod_a, pod_b = netns("pa"), netns("pb")
    res_a = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod_a)  # no daemon yet
    assert res_a and node.fallbacks() == ["ADD"]
    node.start_daemon()
    res_b = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-b", pod_b)
    assert res_b and node.fallbacks() == ["ADD"]
    assert ping(pod_a, res_b["ips"][0]["address"].split("/")[0])
    node.kill_daemon()  # the serving child exits with it and removes the socket
    assert not node.sock.exists()
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-b", pod_b)
    assert node.fallbacks() == ["ADD", "DEL"]
    assert "eth0" not in links(pod_b)
    node.start_daemon()
    runtime.exec_plugin("svcnet-cni", "CHECK", dict(conf, prevResult=res_a), "ctr-a", pod_a)
    assert node.fallbacks() == ["ADD", "DEL"]
    node.kill_daemon(with_child=True)  # both SIGKILLed: a stale socket nobody listens on
    assert node.sock.exists()
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-a", pod_a)
    assert node.fallbacks() == ["ADD", "DEL", "DEL"]
    assert "eth0" not in links(pod_a)
    node.start_daemon()  # replaces the stale socket
    assert runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-b", pod_b)
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-b", pod_b)
    assert node.fallbacks() == ["ADD", "DEL", "DEL"]
    assert not [n for n, link in links(runtime.host_ns).items()
                if link.get("master") == "cnifast0"]


def test_client_in_another_netns_runs_in_process(node: Node, netns: Callable[[str], str],
                                                 tmp_path: Path) -> None:
    """The daemon serves only its own network namespace: a client elsewhere (another lab
    node, a test namespace) must get its bridge in its own namespace, not the daemon's."""
    node.start_daemon()
    other = Runtime(netns("h2"), node.runtime.cni_path)
    pod = netns("p")
    conf = _conf(tmp_path, ip_masq=False)
    assert other.exec_plugin("svcnet-cni", "ADD", conf, "ctr", pod)
    assert node.fallbacks() == ["ADD"]
    assert "cnifast0" in links(other.host_ns) and "cnifast0" not in links(node.runtime.host_ns)
    other.exec_plugin("svcnet-cni", "DEL", conf, "ctr", pod)


def test_parallel_adds_and_ipam_role_through_daemon(node: Node, netns: Callable[[str], str],
                                                   tmp_path: Path) -> None:
    node.start_daemon()
    runtime, conf = node.runtime, _conf(tmp_path)
    pods = [netns("p") for _ in range(12)]
    client = runtime.find("svcnet-cni")
    procs = []
    for i, pod in enumerate(pods):
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"par-{i}", "CNI_IFNAME": "eth0",
               "CNI_NETNS": f"/var/run/netns/{pod}", "CNI_PATH": runtime.cni_path,
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        procs.append(subprocess.Popen(["ip", "netns", "exec", runtime.host_ns, client],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(json.dumps(conf).encode(), timeout=120)
            assert proc.returncode == 0, out
            outs.append(json.loads(out)["ips"][0]["address"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert len(set(outs)) == 12
    runtime.exec_plugin("svcnet-cni", "GC", dict(conf, **{"cni.dev/valid-attachments": []}))
    assert not [n for n, link in links(runtime.host_ns).items()
                if link.get("master") == "cnifast0"]
    # the reference bridge delegating IPAM to the client, invoked as svcnet-ipam
    pod = netns("p")
    delegated = {"cniVersion": "1.0.0", "name": "fastipam", "type": "bridge",
                 "bridge": "cnifast1", "isGateway": True,
                 "ipam": {"type": "svcnet-ipam", "dataDir": str(tmp_path / "ipam"),
                          "ranges": [[{"subnet": "10.83.0.0/24"}]]}}
    res = runtime.exec_plugin("bridge", "ADD", delegated, "deleg", pod)
    assert res and res["ips"][0]["address"] == "10.83.0.2/24"
    runtime.exec_plugin("bridge", "DEL", delegated, "deleg", pod)
    assert node.fallbacks() == []


class FakeDaemon:
    """Speaks the server side of the protocol up to a chosen failure."""

    def __init__(self, path: Path, mode: str) -> None:
        self.mode = mode
        self.stdin = b""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(20)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if mode != "never-accepts":
            self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(20)
            (size,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            conn.recv(size, socket.MSG_WAITALL)
            if self.mode == "closes-before-accepting":
                return
            conn.sendall(b"1")
            (size,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            self.stdin = conn.recv(size, socket.MSG_WAITALL)
            if self.mode == "never-answers":
                time.sleep(3)

    def close(self) -> None:
        self.listener.close()
        if self.thread.is_alive():
            self.thread.join(10)


@pytest.mark.parametrize("mode", ["closes-before-accepting", "never-accepts", "dies-mid-request",
                                  "never-answers"])
def test_daemon_failing_mid_request(mode: str, netns: Callable[[str], str],
                                    tmp_path: Path) -> None:
    """Before the accept byte the client falls back with stdin intact; after it, ADD is never
    repeated (code 11, the runtime will DEL) and the idempotent DEL re-runs in-process."""
    from svcnet.cni.cli import socket_client

    require_root()
    require_binary("ip", "perl")
    sock = tmp_path / "cni.sock"
    bindir, log = _install(tmp_path, sock)
    (bindir / "svcnet-cni").write_text(socket_client(
        str(bindir / "svcnet-cni-inprocess"), str(sock), accept_timeout=1, answer_timeout=2))
    runtime = Runtime(netns("h"), str(bindir))
    pod = netns("p")
    conf = _conf(tmp_path, ip_masq=False)
    before_accept = mode in ("closes-before-accepting", "never-accepts")
    fake = FakeDaemon(sock, mode)
    try:
        if before_accept:
            res = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr", pod)
            assert res and res["ips"][0]["address"] == "10.82.0.2/24"
            assert log.read_text().split() == ["ADD"]
        else:
            with pytest.raises(PluginError) as info:
                runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr", pod)
            assert info.value.code == 11 and info.value.rc == 1
            assert info.value.doc["cniVersion"] == "1.1.0"
            assert "not repeated" in info.value.doc["msg"]
            assert json.loads(fake.stdin) == conf  # the daemon got the whole request ...
            assert not log.exists() and "eth0" not in links(pod)  # ... nobody else did
    finally:
        fake.close()
    if not before_accept:  # the daemon is gone, its socket file stays: connection refused
        assert runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr", pod)
        assert log.read_text().split() == ["ADD"]
    assert "eth0" in links(pod)
    sock.unlink()
    fake = FakeDaemon(sock, mode)
    try:
        assert runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr", pod) is None
    finally:
        fake.close()
    assert log.read_text().split() == ["ADD", "DEL"]
    assert "eth0" not in links(pod)


def test_node_serves_cni_socket_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import svcnet.node
    from svcnet.cli import build_parser

    seen: list[list[str]] = []

    async def fake_run_node(args: object, wanted: list[str]) -> None:
        seen.append(wanted)

    monkeypatch.setattr(svcnet.node, "run_node", fake_run_node)
    for argv in (["node", "--dns"], ["node", "--dns", "--no-cni-server"],
                 ["node", "--cni-server"]):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 0
    assert seen == [["dns", "cni-server"], ["dns"], ["cni-server"]]
    # in another network namespace (a test, a lab node) only a named socket is served
    server = svcnet.node.importlib.import_module("svcnet.cni.server")
    monkeypatch.setattr(server, "_in_host_netns", lambda: False)
    for argv in (["node", "--dns"], ["node", "--dns", "--cni-server-socket", "/tmp/x.sock"]):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 0
    assert seen[3:] == [["dns"], ["dns", "cni-server"]]
    args = build_parser().parse_args(["node", "--dns"])
    assert not svcnet.node.importlib.import_module("svcnet.cni.server").node_component(
        args).required


def test_server_component_waits_for_a_busy_socket(tmp_path: Path) -> None:
    """A second server never steals a live socket: required, it fails; by default it waits
    and takes over (as a child process) once the owner stops. Requests go through the real
    client (VERSION)."""
    import asyncio

    from svcnet.cni.cli import socket_client
    from svcnet.cni.server import ServerComponent, serve

    require_binary("perl")
    sock = tmp_path / "node.sock"
    client = tmp_path / "svcnet-cni"
    client.write_text(socket_client("/bin/false", str(sock)))
    client.chmod(0o755)
    ready, stop_first = threading.Event(), threading.Event()
    first = threading.Thread(target=serve, args=(str(sock), ready, stop_first), daemon=True)
    first.start()
    assert ready.wait(10)

    def version() -> dict[str, Any]:
        out = subprocess.run([str(client)], input=b'{"cniVersion": "1.1.0"}', timeout=20,
                             env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="served by another process"):
            await ServerComponent(str(sock)).run(None, None)
        second = asyncio.create_task(ServerComponent(str(sock), required=False,
                                                     retry_s=0.1).run(None, None))
        await asyncio.sleep(0.3)
        assert not second.done()
        assert (await asyncio.to_thread(version))["supportedVersions"][-1] == "1.1.0"
        stop_first.set()
        await asyncio.to_thread(first.join, 5)
        for _ in range(100):
            if _serving(sock):
                break
            await asyncio.sleep(0.05)
        assert (await asyncio.to_thread(version))["cniVersion"] == "1.1.0"
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second

    try:
        asyncio.run(scenario())
    finally:
        stop_first.set()
    for _ in range(40):  # the serving thread notices the stop within 0.5 s
        if not sock.exists():
            break
        time.sleep(0.05)
    assert not sock.exists()


def test_host_netns_is_told_from_a_named_one(netns: Callable[[str], str]) -> None:
    """The default-on CNI server keys off this: in a test's or a lab node's namespace it
    must not take the host's /run/svcnet/cni.sock."""
    probe = [sys.executable, "-c",
             "from svcnet.cni.server import _in_host_netns; print(_in_host_netns())"]
    inside = subprocess.run(["ip", "netns", "exec", netns("h"), *probe],
                            capture_output=True, text=True, check=True).stdout.strip()
    here = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert (inside, here) == ("False", "True")


def _run_client(node: Node, command: str, conf: dict[str, Any], cid: str, pod: str
                ) -> subprocess.CompletedProcess[bytes]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/var/run/netns/{pod}", "CNI_PATH": node.runtime.cni_path,
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["ip", "netns", "exec", node.runtime.host_ns,
                           str(node.bindir / "svcnet-cni")], input=json.dumps(conf).encode(),
                          env=env, capture_output=True, timeout=60, check=False)


def _wait_serving(node: Node, daemon: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):  # up to 15 s on a loaded machine
        if _serving(node.sock):
            return
        assert daemon.poll() is None, f"svcnet node exited: {log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"svcnet node did not serve its CNI socket: {log.read_text()}")


def test_fast_path_is_visible_in_the_logs(node: Node, netns: Callable[[str], str],
                                          tmp_path: Path) -> None:
    """`svcnet node` says it serves the socket; the client notes each fallback on stderr,
    at most once a minute (a runtime calls VERSION for every plugin of every command)."""
    conf = _conf(tmp_path, ip_masq=False)
    pod_a, pod_b = netns("p"), netns("p")
    first = _run_client(node, "ADD", conf, "ctr-a", pod_a)
    assert first.returncode == 0, first.stdout
    note = first.stderr.decode()
    assert "svcnet-cni: ADD runs in-process: cannot connect:" in note, note
    assert str(node.sock) in note
    second = _run_client(node, "DEL", conf, "ctr-a", pod_a)
    assert second.returncode == 0 and second.stderr == b""  # noted a moment ago
    assert node.fallbacks() == ["ADD", "DEL"]
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        node.daemon = subprocess.Popen(
            ["ip", "netns", "exec", node.runtime.host_ns, SVCNET, "-v", "node",
             "--cni-server", "--cni-server-socket", str(node.sock)], stderr=out,
            start_new_session=True)
    _wait_serving(node, node.daemon, log)
    for _ in range(100):  # the line is written just before the socket accepts
        if "serving svcnet-cni requests on" in log.read_text():
            break
        time.sleep(0.05)
    assert f"serving svcnet-cni requests on {node.sock}" in log.read_text()
    served = _run_client(node, "ADD", conf, "ctr-b", pod_b)
    assert served.returncode == 0 and served.stderr == b""
    assert node.fallbacks() == ["ADD", "DEL"]
    node.runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-b", pod_b)


def test_daemon_in_another_mount_namespace(node: Node, netns: Callable[[str], str],
                                           tmp_path: Path) -> None:
    """A daemon that sees another /run/netns than the runtime declines ADD and CHECK before
    accepting them (nothing done), so the client runs them in-process: whether the path is
    missing for the daemon or names another namespace there (here the daemon's own)."""
    require_binary("unshare", "mount")
    hidden, decoy = netns("p"), netns("p")
    log = tmp_path / "node.log"
    script = (f"mount -t tmpfs none /run/netns && touch /run/netns/{decoy} && "
              f"mount --bind /proc/self/ns/net /run/netns/{decoy} && "
              f"exec {SVCNET} node --cni-server --cni-server-socket {node.sock}")
    with open(log, "wb") as out:
        node.daemon = subprocess.Popen(
            ["ip", "netns", "exec", node.runtime.host_ns, "unshare", "--mount",
             "--propagation", "private", "sh", "-c", script], stderr=out,
            start_new_session=True)
    _wait_serving(node, node.daemon, log)
    runtime, conf = node.runtime, _conf(tmp_path, ip_masq=False)
    res_h = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-h", hidden)
    res_d = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-d", decoy)
    assert node.fallbacks() == ["ADD", "ADD"]
    assert "eth0" in links(hidden) and "eth0" in links(decoy)
    assert "eth0" not in links(runtime.host_ns)  # the daemon did not use its own view
    assert res_h and res_d and ping(hidden, res_d["ips"][0]["address"].split("/")[0])
    runtime.exec_plugin("svcnet-cni", "CHECK", dict(conf, prevResult=res_d), "ctr-d", decoy)
    assert node.fallbacks() == ["ADD", "ADD", "CHECK"]
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-h", hidden)  # needs no netns: served
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-d", decoy)
    assert node.fallbacks() == ["ADD", "ADD", "CHECK"]
    assert "eth0" not in links(hidden) and "eth0" not in links(decoy)
    warnings = [line for line in log.read_text().splitlines()
                if "another mount namespace" in line]
    assert len(warnings) == 1, log.read_text()  # rate-limited
