"""podman (Debian's 4.3, runc, CNI backend) drives svcnet-cni as a user would run it.

podman runs in a :class:`svcnet.lab.runtimes.Sandbox`: its own network namespace (where it
makes the bridge and firewall rules) and a private mount namespace (its storage, state,
locks and container namespaces), with the conflist ``svcnet cni install`` writes, chained
with the reference portmap, firewall and tuning plugins. Both plugin paths are exercised:
the in-process plugin (no node daemon: the socket client falls back) and the node daemon's
socket (``svcnet node --cni-server`` in the sandbox, socket in the test's directory); a
tripwire around the in-process launcher tells which one served. The root namespaces are
compared before and after the module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_binary, require_root
from svcnet.lab.runtimes import Podman, Sandbox, root_state
from test_cni_helpers import REFERENCE_DIR

from svcnet.cli import main as svcnet_main

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

SVCNET = os.path.join(os.path.dirname(sys.executable), "svcnet")
NETWORK = "svcnet"
SUBNET = "10.89.50.0/24"
GATEWAY = "10.89.50.1"
CHAINED = ("portmap", "firewall", "tuning")
BARE, BARE_SUBNET, BARE_GATEWAY = "svcbare", "10.89.51.0/24", "10.89.51.1"
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")


@dataclass
class PodmanEnv:
    box: Sandbox
    podman: Podman
    base: Path
    bindir: Path
    sock: Path
    fallback_log: Path
    ipam_dir: Path
    daemon: subprocess.Popen[bytes] | None = None

    def fallbacks(self) -> int:
        return len(self.fallback_log.read_text().split()) if self.fallback_log.exists() else 0

    def start_daemon(self) -> None:
        self.daemon = self.box.popen(SVCNET, "node", "--cni-server", "--cni-server-socket",
                                     str(self.sock), log=self.base / "node.log")
        deadline = time.monotonic() + 20
        while self.box.run("test", "-S", str(self.sock), check=False).returncode != 0:
            assert self.daemon.poll() is None, (self.base / "node.log").read_text()
            assert time.monotonic() < deadline, "svcnet node did not serve its CNI socket"
            time.sleep(0.1)

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(5)
        self.daemon = None

    # -- containers --------------------------------------------------------------------------

    def run(self, name: str, *extra: str, cmd: tuple[str, ...] = ("sleep", "600"),
            network: str = NETWORK) -> None:
        self.podman("run", "-d", "--name", name, "--network", network, "--cap-add", "NET_RAW",
                    *extra, Podman.IMAGE, *cmd)

    def rm(self, *names: str) -> None:
        self.podman("rm", "-f", "-t", "0", *names, timeout=120)

    def ip_mac(self, name: str) -> tuple[str, str]:
        doc = json.loads(self.podman("inspect", name).stdout)[0]
        (net,) = doc["NetworkSettings"]["Networks"].values()
        return net["IPAddress"], net["MacAddress"]

    def exec(self, name: str, *cmd: str, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", name, *cmd, check=check, timeout=timeout)

    def eth0_mac(self, name: str) -> str:
        return self.exec(name, "cat", "/sys/class/net/eth0/address").stdout.strip()

    def host_veth(self, name: str) -> dict[str, Any]:
        index = int(self.exec(name, "cat", "/sys/class/net/eth0/iflink").stdout)
        links = json.loads(self.box.run("ip", "-j", "link", "show").stdout)
        found: dict[str, Any] = next(link for link in links if link["ifindex"] == index)
        return found

    def bridge_mac(self) -> str:
        doc = json.loads(self.box.run("ip", "-j", "link", "show", "cni0").stdout)
        return str(doc[0]["address"])

    def ping(self, name: str, address: str, count: int = 1) -> bool:
        proc = self.exec(name, "ping", "-c", str(count), "-W", "2", address, check=False)
        return proc.returncode == 0

    def state(self) -> dict[str, list[str]]:
        """The sandbox's network state (links, addresses, rules) and IPAM files."""
        def lines(*cmd: str) -> list[str]:
            out = self.box.run(*cmd).stdout.splitlines()
            return sorted(ln for ln in out if ln.strip() and not ln.startswith(("#", ":")))

        return {"links": [ln.split(":", 2)[1] for ln in lines("ip", "-o", "link")],
                "addrs": [ln.replace(" tentative", "") for ln in lines("ip", "-o", "addr")],
                "iptables": lines("iptables-save"),
                "nft": [ln for ln in lines("nft", "list", "ruleset") if "handle" not in ln],
                "ipam": sorted(str(p.relative_to(self.ipam_dir))
                               for p in self.ipam_dir.rglob("*") if p.is_file())}


def _install(base: Path, sock: Path) -> tuple[Path, Path, Path]:
    """``svcnet cni install`` as documented, chained; the in-process launcher behind a tripwire
    that logs each use. The IPAM data directory is moved into the test's directory."""
    bindir, confdir = base / "bin", base / "net.d"
    chain = [arg for kind in CHAINED for arg in ("--chain", kind)]
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", str(confdir),
                        "--name", NETWORK, "--subnet", SUBNET, "--socket", str(sock),
                        "--python", sys.executable, *chain]) == 0
    path = confdir / "10-svcnet.conflist"
    conflist = json.loads(path.read_text())
    conflist["plugins"][0]["ipam"]["dataDir"] = str(base / "ipam")
    path.write_text(json.dumps(conflist, indent=2))
    # svcnet-cni alone (no tuning plugin, which applies CNI_ARGS MAC=... by itself)
    bare = dict(conflist, name=BARE, plugins=[dict(conflist["plugins"][0], bridge="cni1")])
    bare["plugins"][0]["ipam"] = dict(bare["plugins"][0]["ipam"],
                                      ranges=[[{"subnet": BARE_SUBNET}]])
    (confdir / "20-bare.conflist").write_text(json.dumps(bare, indent=2))
    real = bindir / "svcnet-cni-inprocess"
    real.rename(bindir / "inprocess-real")
    log = base / "fallbacks"
    real.write_text(f'#!/bin/sh\necho "$CNI_COMMAND" >> {log}\n'
                    f'exec {bindir / "inprocess-real"} "$@"\n')
    real.chmod(0o755)
    return bindir, confdir, log


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanEnv]:
    require_root()
    require_binary("podman", "runc", "conmon", "ip", "nft", "iptables-save", "perl")
    for kind in CHAINED:
        require(Path(REFERENCE_DIR, kind).exists(), f"needs the reference {kind} plugin")
    require(os.path.exists("/bin/busybox"), "needs busybox-static")
    base = tmp_path_factory.mktemp("podman")
    before = root_state()
    box = Sandbox(f"snt{os.getpid()}-podman", base / "box")
    box.start()
    env: PodmanEnv | None = None
    try:
        sock = base / "run" / "cni.sock"
        sock.parent.mkdir()
        bindir, confdir, log = _install(base, sock)
        podman = Podman(box, base / "podman", [str(bindir), REFERENCE_DIR], confdir)
        podman.import_busybox()
        env = PodmanEnv(box, podman, base, bindir, sock, log, base / "ipam")
        yield env
    finally:
        if env is not None:
            env.podman("rm", "-a", "-f", "-t", "0", check=False, timeout=120)
            env.stop_daemon()
        box.close()
        shutil.rmtree(base / "podman", ignore_errors=True)  # vfs layers: megabytes each
    after = root_state()
    deadline = time.monotonic() + 10  # killed processes may take a moment to be reaped
    while after != before and time.monotonic() < deadline:
        time.sleep(0.2)
        after = root_state()
    assert after == before, {k: sorted(set(before[k]) ^ set(after[k])) for k in before}


@pytest.fixture(scope="module", params=["in-process", "daemon"])
def plugin_path(request: pytest.FixtureRequest, podman_env: PodmanEnv) -> Iterator[str]:
    """Which svcnet-cni path serves podman: no node daemon (the socket client runs the
    in-process plugin), or ``svcnet node`` serving the socket."""
    if request.param == "daemon":
        podman_env.start_daemon()
    try:
        yield str(request.param)
    finally:
        podman_env.stop_daemon()


@pytest.fixture
def env(podman_env: PodmanEnv) -> Iterator[PodmanEnv]:
    """The module's podman, with no container left over by the test."""
    try:
        yield podman_env
    finally:
        podman_env.podman("rm", "-a", "-f", "-t", "0", check=False, timeout=120)


def _check_path(env: PodmanEnv, plugin_path: str, fallbacks_before: int) -> None:
    used = env.fallbacks() - fallbacks_before
    if plugin_path == "daemon":
        assert used == 0, "the node daemon was up, yet the in-process plugin ran"
    else:
        assert used > 0, "no node daemon, yet the in-process plugin did not run"


def test_podman_containers_reach_each_other_and_gateway(env: PodmanEnv, plugin_path: str
                                                       ) -> None:
    fallbacks = env.fallbacks()
    env.run("a")
    env.run("b")
    ip_a, _ = env.ip_mac("a")
    ip_b, _ = env.ip_mac("b")
    assert ip_a != ip_b and ip_a.startswith("10.89.50.") and ip_b.startswith("10.89.50.")
    assert env.ping("a", ip_b) and env.ping("b", ip_a)
    assert env.ping("a", GATEWAY)
    routes = env.exec("a", "ip", "route").stdout
    assert f"default via {GATEWAY}" in routes
    _check_path(env, plugin_path, fallbacks)


def test_podman_published_port_answers(env: PodmanEnv, plugin_path: str) -> None:
    """portmap chained after svcnet-cni: a published port answers from the host namespace
    (the sandbox), through the gateway address and through another container."""
    fallbacks = env.fallbacks()
    env.run("web", "-p", "18090:80", cmd=("httpd", "-f", "-p", "80", "-h", "/www"))
    env.run("client")
    ip_web, _ = env.ip_mac("web")
    deadline = time.monotonic() + 20
    while True:
        got = env.box.run(sys.executable, "-c", FETCH, f"http://{GATEWAY}:18090/index.html",
                          check=False)
        if got.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got.stdout == "svcnet\n", got
    direct = env.exec("client", "sh", "-c", "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | "
                      f"nc -w 3 {ip_web} 80")  # busybox-static's wget crashes on this host
    assert direct.stdout.endswith("\n\nsvcnet\n"), direct.stdout
    nat = env.box.run("iptables-save", "-t", "nat").stdout
    assert "CNI-HOSTPORT-DNAT" in nat and "18090" in nat
    env.rm("web")
    assert "18090" not in env.box.run("iptables-save", "-t", "nat").stdout
    _check_path(env, plugin_path, fallbacks)


MAC_NETWORKS = [pytest.param(NETWORK, id="chained"),
                pytest.param(BARE, id="bare")]


@pytest.mark.parametrize("network", MAC_NETWORKS)
def test_podman_mac_address(env: PodmanEnv, network: str) -> None:
    """``--mac-address`` reaches the plugins as ``CNI_ARGS`` MAC=... In the chained network
    the tuning plugin applies it too; in the bare one svcnet-cni must."""
    env.run("m", "--mac-address", "02:42:0a:59:32:42", network=network)
    assert env.eth0_mac("m") == "02:42:0a:59:32:42"
    assert env.ip_mac("m")[1] == "02:42:0a:59:32:42"


@pytest.mark.parametrize("network", MAC_NETWORKS)
def test_podman_network_reload_keeps_ip_and_mac(env: PodmanEnv, network: str) -> None:
    """``podman network reload`` runs DEL then ADD with ``CNI_ARGS`` IP=...;MAC=...: the
    container keeps both (the reference bridge plugin does)."""
    env.run("r", network=network)
    ip, mac = env.ip_mac("r")
    assert env.eth0_mac("r") == mac
    env.podman("network", "reload", "r")
    assert env.ip_mac("r")[0] == ip
    assert env.eth0_mac("r") == mac
    assert env.ping("r", GATEWAY if network == NETWORK else BARE_GATEWAY)


def test_podman_gateway_mac_does_not_flap(env: PodmanEnv) -> None:
    """Defect 1's scenario: the bridge would take the lowest port MAC; when the container
    whose veth MAC it took goes away, the bridge's MAC changes under a running container's
    ARP entry for the gateway. With the MAC pinned at creation, no ping is lost."""
    seen: list[tuple[str, str, str]] = []
    for _ in range(10):  # bounded: each try has 1/2 chance that the victim's MAC is lower
        env.run("victim")
        env.run("pinger")
        bridge = env.bridge_mac()
        ports = (env.host_veth("pinger")["address"], env.host_veth("victim")["address"])
        seen.append((bridge, *ports))
        if bridge == ports[1]:
            break  # unpinned: the bridge took the victim's veth MAC, the flap is set up
        if bridge not in ports:
            break  # pinned: the bridge's MAC is none of its ports'
        env.rm("pinger", "victim")
    else:
        pytest.fail(f"the bridge never took the victim's MAC: {seen}")
    assert env.ping("pinger", GATEWAY)  # the pinger's ARP entry holds the current MAC
    before = env.bridge_mac()
    pinging = subprocess.Popen(
        env.box.argv(env.podman.argv("exec", "pinger", "ping", "-c", "30", "-i", "0.2", "-W",
                                     "1", GATEWAY)),
        env={**os.environ, "CONTAINERS_CONF": str(env.podman.conf)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    env.rm("victim")  # while pinging: a stale ARP entry loses pings for ~30 s
    out, _ = pinging.communicate(timeout=60)
    assert " 0% packet loss" in out, (out, seen, env.bridge_mac())
    assert env.bridge_mac() == before, "the gateway's MAC changed"


def test_podman_twenty_containers_leak_nothing(env: PodmanEnv, plugin_path: str) -> None:
    """20 containers up, then all removed: the sandbox's links, addresses, firewall rules and
    IPAM files are as before (the bridge stays, as with the reference plugin)."""
    env.run("warm")  # the bridge and the firewall plugin's base chains exist from here on
    env.rm("warm")
    before = env.state()
    fallbacks = env.fallbacks()
    names = [f"c{i}" for i in range(20)]
    for name in names:
        env.run(name)
    ips = {env.ip_mac(name)[0] for name in names}
    assert len(ips) == 20
    assert len([p for p in env.ipam_dir.rglob("10.89.50.*")]) == 20
    env.rm(*names)
    assert env.state() == before
    _check_path(env, plugin_path, fallbacks)
