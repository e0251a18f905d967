"""Concurrency and crash safety: 50 parallel ADDs get 50 distinct addresses; ADDs killed with
SIGKILL at random points, followed by GC, leave no reservation, veth or rule behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_binary, require_root
from svcnet.cni.masq import network_tag
from test_cni_helpers import Runtime, links, ns_run, svcnet_bin

__all__ = ["svcnet_bin"]

pytestmark = pytest.mark.kernel

NETWORK = "concurrent"


def _conf(tmp_path: Path, version: str = "1.1.0") -> dict[str, Any]:
    return {"cniVersion": version, "name": NETWORK, "type": "svcnet-cni",
            "bridge": "cniconc0", "isGateway": True, "isDefaultGateway": True,
            "ipMasq": True, "macspoofchk": True,
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                     "ranges": [[{"subnet": "10.80.0.0/24"}]]}}


def _spawn(host: str, binary: Path, command: str, conf: dict[str, Any], cid: str, pod: str
           ) -> subprocess.Popen[bytes]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/var/run/netns/{pod}", "CNI_PATH": str(binary.parent),
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    conf_file = binary.parent / f"conf-{cid}.json"
    conf_file.write_text(json.dumps(conf))
    with open(conf_file, "rb") as stdin:
        return subprocess.Popen(["ip", "netns", "exec", host, str(binary)], env=env,
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _reservations(tmp_path: Path) -> list[str]:
    d = tmp_path / "ipam" / NETWORK
    return [p.name for p in d.iterdir()
            if not p.name.startswith("last_reserved") and p.name != "lock"] if d.is_dir() else []


def _ports(host: str) -> list[str]:
    return [name for name, link in links(host).items() if link.get("master") == "cniconc0"]


def _masq_members(host: str) -> set[str]:
    """Pod addresses in the network's masquerade set (read as nft JSON)."""
    out = ns_run(host, "nft", "-j", "list", "set", "inet", "svcnet-cni",
                 f"pods4-{network_tag(NETWORK)}", check=False).stdout
    members: set[str] = set()
    for item in json.loads(out or "{}").get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            members.add(elem["elem"]["val"] if isinstance(elem, dict) else elem)
    return members


def _gc(runtime: Runtime, conf: dict[str, Any], valid: list[tuple[str, str]]) -> None:
    gc_conf = dict(conf, **{"cni.dev/valid-attachments": [
        {"containerID": cid, "ifname": ifname} for cid, ifname in valid]})
    runtime.exec_plugin("svcnet-cni", "GC", gc_conf)


def test_fifty_parallel_adds_get_distinct_addresses_then_gc(
        netns: Callable[[str], str], tmp_path: Path, svcnet_bin: Path) -> None:
    require_root()
    require_binary("ip", "nft")
    host = netns("h")
    runtime = Runtime(host, str(svcnet_bin.parent))
    pods = [netns("p") for _ in range(50)]
    conf = _conf(tmp_path)
    procs = [_spawn(host, svcnet_bin, "ADD", conf, f"ctr-{i}", pod)
             for i, pod in enumerate(pods)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (out, err)
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    ips = [r["ips"][0]["address"] for r in results]
    assert len(set(ips)) == 50
    assert len(_reservations(tmp_path)) == 50
    assert len(_ports(host)) == 50
    keep = [(f"ctr-{i}", "eth0") for i in range(25)]
    _gc(runtime, conf, keep)
    assert len(_reservations(tmp_path)) == 25
    assert len(_ports(host)) == 25
    assert _masq_members(host) == {address.split("/")[0] for address in ips[:25]}
    for i in range(25, 50):
        assert "eth0" not in links(pods[i])
    runtime.exec_plugin("svcnet-cni", "STATUS", conf)
    _gc(runtime, conf, [])
    assert _reservations(tmp_path) == []
    assert _ports(host) == []
    assert _masq_members(host) == set()


def test_sigkill_during_add_then_gc_leaves_nothing(
        netns: Callable[[str], str], tmp_path: Path, svcnet_bin: Path) -> None:
    require_root()
    require_binary("ip", "nft")
    seed = int(time.time())
    rng = random.Random(seed)
    host = netns("h")
    runtime = Runtime(host, str(svcnet_bin.parent))
    conf = _conf(tmp_path)
    # a surviving attachment GC must keep
    survivor_pod = netns("s")
    started = time.monotonic()
    survivor = runtime.exec_plugin("svcnet-cni", "ADD", conf, "survivor", survivor_pod)
    add_s = time.monotonic() - started  # one whole ADD: kill points are spread over it
    assert survivor is not None
    pods = [netns("p") for _ in range(24)]
    procs = []
    try:
        for i, pod in enumerate(pods):
            proc = _spawn(host, svcnet_bin, "ADD", conf, f"killed-{i}", pod)
            procs.append(proc)
            time.sleep(rng.uniform(0, 1.2 * add_s))
            proc.send_signal(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=30)
    killed = [p.returncode for p in procs]
    assert any(rc == -signal.SIGKILL for rc in killed), f"seed {seed}: nothing was killed"
    leftovers = len(_reservations(tmp_path)) + len(_ports(host)) - 2
    assert leftovers > 0, f"seed {seed}: every ADD died before acquiring anything"
    _gc(runtime, conf, [("survivor", "eth0")])
    survivor_ip = survivor["ips"][0]["address"].split("/")[0]
    assert _reservations(tmp_path) == [survivor_ip], f"seed {seed}"
    assert _ports(host) == [survivor["interfaces"][1]["name"]], f"seed {seed}"
    assert _masq_members(host) == {survivor_ip}, f"seed {seed}"
    spoof = ns_run(host, "nft", "list", "table", "bridge", "svcnet-cni").stdout
    assert spoof.count('"veth') == 2, (seed, spoof)  # the survivor's port and port . MAC
    for pod in pods:
        assert "eth0" not in links(pod), f"seed {seed}"
    runtime.exec_plugin("svcnet-cni", "CHECK", dict(conf, prevResult=survivor), "survivor",
                        survivor_pod)
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "survivor", survivor_pod)
    assert _reservations(tmp_path) == []


SERVE = ("import sys; from svcnet.cni.cli import serve_child; "
         "sys.exit(serve_child([sys.argv[1], '0']))")


def _serve(host: str, sock: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", SERVE,
                               str(sock)], stderr=subprocess.DEVNULL)
    for _ in range(200):  # up to 10 s on a loaded machine
        if sock.exists():
            return server
        time.sleep(0.05)
    server.kill()
    raise AssertionError("svcnet cni serve did not create its socket")


def test_daemon_sigkilled_during_parallel_adds_then_gc(
        netns: Callable[[str], str], tmp_path: Path, svcnet_bin: Path) -> None:
    """The node daemon dies with ADDs in flight, at random points: every client gets an
    answer (done, or code 11 for a request it had accepted; later ones fall back), none is
    applied twice, and GC with the completed attachments leaves exactly those."""
    from svcnet.cni.cli import socket_client

    require_root()
    require_binary("ip", "nft", "perl")
    seed = time.time_ns()
    rng = random.Random(seed)
    host = netns("h")
    bindir, sock = tmp_path / "bin", tmp_path / "cni.sock"
    bindir.mkdir()
    client = bindir / "svcnet-cni"
    client.write_text(socket_client(str(svcnet_bin), str(sock)))
    client.chmod(0o755)
    runtime = Runtime(host, str(bindir))
    conf = _conf(tmp_path)
    server = _serve(host, sock)
    valid: dict[str, dict[str, Any]] = {}
    lost = 0
    try:
        started = time.monotonic()
        survivor = runtime.exec_plugin("svcnet-cni", "ADD", conf, "survivor", netns("s"))
        add_s = time.monotonic() - started
        assert survivor is not None
        valid["survivor"] = survivor
        for round_ in range(3):  # until one round kills the daemon with an ADD accepted
            pods = {f"r{round_}-{i}": netns("p") for i in range(8)}
            procs = {}
            for i, (cid, pod) in enumerate(pods.items()):
                if i == 6:  # kill while requests are being handled (a thread each) ...
                    for _ in range(400):
                        if len(os.listdir(f"/proc/{server.pid}/task")) >= 3:
                            break
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0, 0.5) * add_s)
                    server.kill()
                    server.wait(10)
                procs[cid] = _spawn(host, client, "ADD", conf, cid, pod)  # ... later: refused
            for cid, proc in procs.items():
                out, err = proc.communicate(timeout=120)
                if proc.returncode == 0:
                    valid[cid] = json.loads(out)
                    continue
                doc = json.loads(out)
                assert doc["code"] == 11 and "not repeated" in doc["msg"], (seed, out, err)
                lost += 1
            server = _serve(host, sock)
            if lost:
                break
        assert lost, f"seed {seed}: the daemon never died with an ADD in flight"
        _gc(runtime, conf, [(cid, "eth0") for cid in valid])
        ips = {res["ips"][0]["address"].split("/")[0] for res in valid.values()}
        assert sorted(_reservations(tmp_path)) == sorted(ips), f"seed {seed}"
        assert sorted(_ports(host)) == sorted(r["interfaces"][1]["name"]
                                              for r in valid.values()), f"seed {seed}"
        assert _masq_members(host) == ips, f"seed {seed}"
        _gc(runtime, conf, [])
        assert _reservations(tmp_path) == [] and _ports(host) == []
    finally:
        server.kill()
        server.wait(10)
