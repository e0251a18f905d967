"""``svcnet node --cleanup`` (kube-proxy's ``--cleanup``): what removing the DaemonSet leaves
to undo on a node, run against real rules, devices and files in a test namespace."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ns_sh, require_binary, stop, wait_for

SVCNET = [sys.executable, "-m", "svcnet.cli"]


def _run_proxy(ns: str, mode: str, log: Path, present: Callable[[], bool]) -> None:
    """The real proxy on an empty memory store, until its rules are in the kernel."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*SVCNET, "node", "--proxy", "--no-cni-server", "--store",
                                 "memory", "--proxy-netns", ns, "--proxy-mode", mode,
                                 "--proxy-healthz-bind-address", "",
                                 "--proxy-metrics-bind-address", ""],
                                stdout=out, stderr=out)
    try:
        wait_for(lambda: present() or proc.poll() is not None, 30, f"{mode} rules")
        assert proc.poll() is None, log.read_text()
    finally:
        stop(proc)


def test_cleanup_removes_what_svcnet_put_and_nothing_else(netns: Callable[[str], str],
                                                          tmp_path: Path) -> None:
    require_binary("nft", "iptables-save")
    ns = netns("clean")

    def nft_tables() -> str:
        return ns_sh(ns, "nft", "list", "tables").stdout

    def iptables_chains() -> str:
        return ns_sh(ns, "iptables-save", "-t", "nat").stdout

    _run_proxy(ns, "nftables", tmp_path / "nft.log", lambda: "svcnet" in nft_tables())
    _run_proxy(ns, "iptables", tmp_path / "ipt.log",
               lambda: "KUBE-SERVICES" in iptables_chains())
    # the overlay's datapath as `svcnet node --overlay` leaves it, and neighbours' things
    ns_sh(ns, "ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472",
          "nolearning")
    ns_sh(ns, "ip", "link", "set", "flannel.1", "up")
    ns_sh(ns, "ip", "route", "add", "10.244.1.0/24", "via", "10.244.1.0", "dev", "flannel.1",
          "onlink")
    ns_sh(ns, "ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep1")
    ns_sh(ns, "nft", "add", "table", "inet", "keep")
    ns_sh(ns, "nft", "add", "table", "inet", "svcnet-policy")  # as `svcnet node --policy`
    bin_dir, conf_dir, run_dir = tmp_path / "bin", tmp_path / "net.d", tmp_path / "run"
    run_dir.mkdir()
    subprocess.run([*SVCNET, "cni", "install", "--bin-dir", str(bin_dir), "--conf-dir",
                    str(conf_dir), "--subnet-file", str(run_dir / "subnet.env"),
                    "--socket", str(run_dir / "cni.sock"), "--python", sys.executable],
                   check=True, capture_output=True)
    (run_dir / "subnet.env").write_text("FLANNEL_SUBNET=10.244.0.1/24\n")
    (bin_dir / "portmap").write_text("#!/bin/sh\n")
    (conf_dir / "99-other.conflist").write_text("{}")
    assert {p.name for p in bin_dir.iterdir()} >= {"svcnet-cni", "svcnet-ipam"}

    result = subprocess.run(
        [*SVCNET, "node", "--cleanup", "--proxy-netns", ns, "--cni-bin-dir", str(bin_dir),
         "--cni-conf-dir", str(conf_dir), "--overlay-subnet-file", str(run_dir / "subnet.env"),
         "--cni-server-socket", str(run_dir / "cni.sock")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    assert "svcnet" not in nft_tables()
    assert "table inet keep" in nft_tables()
    assert "KUBE-" not in iptables_chains()
    links = ns_sh(ns, "ip", "-o", "link").stdout
    assert "flannel.1" not in links and "keep0" in links
    assert "10.244.1.0/24" not in ns_sh(ns, "ip", "route").stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["portmap"]
    assert sorted(p.name for p in conf_dir.iterdir()) == ["99-other.conflist"]
    assert list(run_dir.iterdir()) == []
