"""Lab lifecycle on the real kernel: two labs coexist by name, and ``down`` removes everything
a lab made even after every one of its processes was killed (a crash)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import require_binary, require_root
from svcnet.lab.cluster import LabError, down, lab_command, up
from svcnet.lab.netns import RealKernel, kill_pids
from svcnet.lab.state import LabConfig

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

POD = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p1}\n"
       "spec: {nodeName: n1, containers: [{name: c, image: svcnet/echo}]}\n")


def _names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/var/run/netns") if n.startswith(prefix + "-"))


def test_two_labs_coexist_and_down_cleans_up_after_a_crash(tmp_path: Path) -> None:
    require_root()
    require_binary("ip", "etcd", "nsenter")
    kernel = RealKernel()
    base = f"l{os.getpid() % 1_000_000}"
    labs = [LabConfig(name=f"{base}{s}", nodes=1, lab_dir=str(tmp_path / s),
                      python=sys.executable, dns=False, proxy=False, cni="auto",
                      overlay="auto") for s in "ab"]
    built: list[LabConfig] = []
    try:
        for cfg in labs:
            built.append(up(cfg, kernel, lambda msg: None))
        a, b = built
        with pytest.raises(LabError, match="already exists"):
            up(labs[0], kernel, lambda msg: None)
        for cfg in built:
            manifest = Path(cfg.lab_dir) / "p.yaml"
            manifest.write_text(POD)
            lab_command(cfg, "apply", "-f", str(manifest), "--lab-dir", cfg.lab_dir)
            lab_command(cfg, "wait-ready", "--pods", "--timeout", "30", "--lab-dir",
                        cfg.lab_dir, timeout=60)
        pod_ns = a.pod_ns("default", "p1")
        assert pod_ns in _names(a.name) and Path(f"/etc/netns/{pod_ns}/resolv.conf").exists()
        # Same underlay addresses in both labs: they never meet.
        assert a.node_ip("n1") == b.node_ip("n1")
        # Crash: every process of lab a dies at once, nothing gets to clean up.
        pids = [pid for ns in _names(a.name) for pid in kernel.pids_in(ns)]
        assert pids
        kill_pids(pids)
        down(Path(a.lab_dir), kernel, lambda msg: None)
        assert _names(a.name) == []
        assert not Path(f"/etc/netns/{pod_ns}").exists()
        assert not Path(a.lab_dir).exists()
        assert all(not Path(f"/proc/{pid}").exists() or
                   Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z" for pid in pids)
        # Lab b is untouched and still serves.
        assert len(_names(b.name)) == 4  # underlay, etcd, node, pod
        status = lab_command(b, "status", "--lab-dir", b.lab_dir).stdout
        assert "default/p1" in status and "1/1" in status
    finally:
        for cfg in built:
            down(Path(cfg.lab_dir), kernel, lambda msg: None)
    assert _names(labs[0].name) == [] and _names(labs[1].name) == []
