"""``svcnet cni install`` and the plugin's start-up path.

The plugin process must never import heavy modules (pyroute2 alone costs ~480 ms); this is
checked on a real ADD and DEL with ``-X importtime``. The installed launcher and conflist are
used end to end with a Flannel-style subnet.env.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_binary, require_root
from svcnet.cni.cli import choose_python
from test_cni_helpers import PluginError, Runtime, addresses, ip_json, links, ping

from svcnet.cli import main as svcnet_main

FORBIDDEN = {"pyroute2", "grpc", "msgspec", "prometheus_client", "dnslib", "iptc", "yaml",
             "asyncio", "json", "re", "typing", "subprocess", "ipaddress", "ctypes",
             "dataclasses", "svcnet.model", "svcnet.store", "svcnet.watch"}


def _install(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    bindir, confdir = tmp_path / "bin", tmp_path / "net.d"
    rc = svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", str(confdir),
                      "--subnet-file", str(tmp_path / "subnet.env"), "--python",
                      sys.executable, "--socket", str(tmp_path / "no-daemon.sock"), *extra])
    assert rc == 0
    return bindir, confdir / "10-svcnet.conflist"


def _imported(stderr: str) -> set[str]:
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_install_writes_client_launcher_and_conflist(tmp_path: Path) -> None:
    bindir, conflist_path = _install(tmp_path, "--chain", "portmap")
    client, launcher = bindir / "svcnet-cni", bindir / "svcnet-cni-inprocess"
    assert os.access(client, os.X_OK) and os.access(launcher, os.X_OK)
    assert client.read_text().splitlines()[0] == "#!/usr/bin/perl"
    assert f"'{tmp_path / 'no-daemon.sock'}'" in client.read_text()
    assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    assert choose_python() in (sys.executable, f"/usr/bin/python3.{sys.version_info.minor}")
    assert os.readlink(bindir / "svcnet-ipam") == "svcnet-cni"
    conflist = json.loads(conflist_path.read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["name"] == "svcnet"
    first, portmap = conflist["plugins"]
    assert first["type"] == "svcnet-cni" and first["ipam"]["subnetFile"].endswith("subnet.env")
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    for binary in (client, launcher):  # no daemon: the client runs the launcher
        out = subprocess.run([str(binary)], input=b'{"cniVersion": "1.0.0"}',
                             env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
        assert json.loads(out.stdout)["supportedVersions"][-1] == "1.1.0"


def test_install_in_process_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import svcnet.cni.cli

    _install(tmp_path)
    bindir, _ = _install(tmp_path, "--no-fast-path")  # over the default install
    assert (bindir / "svcnet-cni").read_text().startswith(f"#!{sys.executable} -IS")
    assert not (bindir / "svcnet-cni-inprocess").exists()
    capsys.readouterr()
    monkeypatch.setattr(svcnet.cni.cli, "PERL", str(tmp_path / "no-perl"))
    bindir, _ = _install(tmp_path / "noperl")
    assert (bindir / "svcnet-cni").read_text().startswith(f"#!{sys.executable} -IS")
    assert "installing the in-process plugin only" in capsys.readouterr().err
    assert svcnet_main(["cni", "install", "--bin-dir", str(tmp_path), "--socket",
                        "rel/x.sock"]) == 2


def test_plugin_path_imports_nothing_heavy(netns: Callable[[str], str], tmp_path: Path
                                           ) -> None:
    require_root()
    require_binary("ip")
    bindir, _ = _install(tmp_path)
    host, pod = netns("h"), netns("p")
    conf = json.dumps({"cniVersion": "1.1.0", "name": "imports", "type": "svcnet-cni",
                       "bridge": "cniimp0", "isGateway": True,
                       "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                                "ranges": [[{"subnet": "10.81.0.0/24"}]]}}).encode()
    added: dict[str, object] = {}
    for command in ("ADD", "CHECK", "DEL", "VERSION"):
        stdin = conf
        if command == "CHECK":
            stdin = json.dumps(dict(json.loads(conf), prevResult=added)).encode()
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr", "CNI_IFNAME": "eth0",
               "CNI_NETNS": f"/var/run/netns/{pod}", "CNI_PATH": str(bindir)}
        proc = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-IS", "-X",
                               "importtime", str(bindir / "svcnet-cni-inprocess")], input=stdin,
                              env=env, capture_output=True, check=False, timeout=30)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr[-2000:])
        if command == "ADD":
            added = json.loads(proc.stdout)
        modules = _imported(proc.stderr.decode())
        assert "svcnet.cni.main" in modules
        heavy = {m for m in modules if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN
                 or m.startswith(tuple(f"{f}." for f in FORBIDDEN))}
        assert not heavy, f"{command} imported {sorted(heavy)}"


def test_installed_conflist_with_subnet_env(netns: Callable[[str], str], tmp_path: Path
                                            ) -> None:
    """The overlay writes subnet.env; the installed conflist needs no edit to use it."""
    require_root()
    require_binary("ip", "nft")
    bindir, conflist_path = _install(tmp_path)
    (tmp_path / "subnet.env").write_text(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\n"
        "FLANNEL_MTU=1410\nFLANNEL_IPMASQ=true\n")
    conflist = json.loads(conflist_path.read_text())
    conflist["plugins"][0]["ipam"]["dataDir"] = str(tmp_path / "ipam")
    host, pod_a, pod_b = netns("h"), netns("pa"), netns("pb")
    runtime = Runtime(host, str(bindir))
    res_a = runtime.add_list(conflist, "ctr-a", pod_a)
    res_b = runtime.add_list(conflist, "ctr-b", pod_b)
    assert res_a["cniVersion"] == "1.0.0"
    assert res_a["ips"][0] == {"address": "10.244.9.2/24", "gateway": "10.244.9.1",
                               "interface": 2}
    assert "10.244.9.2/24" in addresses(pod_a, "eth0")
    assert links(pod_a)["eth0"]["mtu"] == 1410
    routes = {r["dst"]: r for r in ip_json(pod_a, "route", "show")}
    assert routes["10.244.0.0/16"]["gateway"] == "10.244.9.1"
    assert routes["default"]["gateway"] == "10.244.9.1"
    # FLANNEL_IPMASQ=true: the overlay daemon masquerades, so the plugin adds no rule
    assert "svcnet-cni" not in subprocess.run(["ip", "netns", "exec", host, "nft", "list",
                                               "tables"], capture_output=True,
                                              text=True).stdout
    assert ping(pod_a, "10.244.9.3")
    runtime.check_list(conflist, res_a, "ctr-a", pod_a)
    status_conf = dict(conflist["plugins"][0], cniVersion="1.1.0", name="svcnet")
    runtime.exec_plugin("svcnet-cni", "STATUS", status_conf)
    subprocess.run(["ip", "-n", host, "link", "set", "cni0", "down"], check=True)
    with pytest.raises(PluginError) as info:  # pods hold addresses but their bridge is down
        runtime.exec_plugin("svcnet-cni", "STATUS", status_conf)
    assert info.value.code == 51
    subprocess.run(["ip", "-n", host, "link", "set", "cni0", "up"], check=True)
    runtime.del_list(conflist, res_a, "ctr-a", pod_a)
    runtime.del_list(conflist, res_b, "ctr-b", pod_b)
    (tmp_path / "subnet.env").unlink()  # DEL still works once the lease is gone
    runtime.del_list(conflist, res_b, "ctr-b", pod_b)
    assert sorted(p.name for p in (tmp_path / "ipam" / "svcnet").iterdir()) == [
        "last_reserved_ip.0", "lock"]
