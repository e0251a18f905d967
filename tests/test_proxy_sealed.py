"""A writer killed while streaming a script into nft leaves the kernel untouched.

Against a real nft in a throwaway namespace: the writer process SIGKILLs itself after a
prefix of the script. Unsealed, nft commits that prefix (the hazard, shown so the test can
fail); sealed, it commits nothing. Also checked: sealing is lossless and every write is
small enough for the kernel to deliver whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ns_sh, require_binary
from hypothesis import given, settings
from hypothesis import strategies as st
from svcnet.proxy.sealed_input import Seal, sealed_pieces

pytestmark = [pytest.mark.kernel]

SEAL = Seal(b"<", b">\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab{} \n", max_size=300), max_size=20),
       st.integers(min_value=40, max_value=120))
def test_sealing_is_lossless_and_writes_are_small(chunks: list[str], limit: int) -> None:
    pieces = list(sealed_pieces(chunks, SEAL, limit))
    assert all(len(p) <= limit for p in pieces)
    text = b"".join(pieces).replace(b"<>\n", b"").decode()
    expected = "".join(chunks)
    assert text == (expected + "\n" if expected and not expected.endswith("\n") else expected)
    # every prefix the reader can see ends sealed, or inside a line (never right after one)
    seen = b""
    for piece in pieces[:-1]:
        seen += piece
        assert seen.endswith(b"<") or not seen.endswith(b"\n")
    assert pieces[-1].endswith(b">\n") or pieces[-1] == b""


WRITER = r"""
import os, signal, subprocess, sys
from svcnet.proxy.sealed_input import NFT_SEAL, sealed_pieces, write_pieces
netns, sealed, stop_at = sys.argv[1], sys.argv[2] == "sealed", float(sys.argv[3])
lines = ["add table ip t\n", "add chain ip t c\n",
         "add map ip t m { type ipv4_addr : ipv4_addr ; }\n"]
lines += [f"add rule ip t c ip daddr 10.{i // 250}.{i % 250}.1 accept\n" for i in range(400)]
lines.append("add element ip t m { " + ", ".join(
    f"10.9.{i // 250}.{i % 250} : 10.8.0.1" for i in range(600)) + " }\n")
lines += [f"add rule ip t c ip saddr 10.{i // 250}.{i % 250}.2 accept\n" for i in range(400)]
proc = subprocess.Popen(["ip", "netns", "exec", netns, "nft", "-f", "/proc/self/fd/0"],
                        stdin=subprocess.PIPE)
fd = proc.stdin.fileno()
if sealed:
    pieces = list(sealed_pieces(["".join(lines[i:i + 20]) for i in range(0, len(lines), 20)],
                                NFT_SEAL))
else:
    pieces = [line.encode() for line in lines]
stop_after = int(stop_at * len(pieces))
print(proc.pid, len(pieces), stop_after, flush=True)
if stop_at < 0:
    write_pieces(fd, pieces)
    proc.stdin.close()
    sys.exit(proc.wait())
write_pieces(fd, pieces[:stop_after])
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_writer(tmp_path: Path, ns: str, mode: str, stop_at: float) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.run([sys.executable, str(script), ns, mode, str(stop_at)],
                          capture_output=True, text=True, timeout=60)
    nft_pid, count, stop_after = map(int, proc.stdout.split()[:3])
    assert count > 10 and (stop_at < 0 or 0 < stop_after < count), proc.stdout
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{nft_pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{nft_pid}"), "nft never finished"
    if stop_at < 0:
        assert proc.returncode == 0, proc.stderr


def _tables(ns: str) -> str:
    return ns_sh(ns, "nft", "list", "tables").stdout


# kill points before, inside and after the long element line
@pytest.mark.parametrize("stop_at", [0.1, 0.4, 0.5, 0.6, 0.95])
def test_killed_writer_commits_nothing_when_sealed(
        netns: Callable[[str], str], tmp_path: Path, stop_at: float) -> None:
    require_binary("nft")
    ns = netns("seal")
    _run_writer(tmp_path, ns, "sealed", stop_at)
    assert "table ip t" not in _tables(ns)


def test_unsealed_prefix_is_committed_and_sealed_whole_works(
        netns: Callable[[str], str], tmp_path: Path) -> None:
    require_binary("nft")
    ns = netns("seal")
    _run_writer(tmp_path, ns, "plain", 0.5)  # the hazard: a prefix got committed
    assert "table ip t" in _tables(ns)
    ns_sh(ns, "nft", "delete", "table", "ip", "t")
    _run_writer(tmp_path, ns, "sealed", -1)  # a complete sealed stream applies in full
    listing = ns_sh(ns, "nft", "list", "table", "ip", "t").stdout
    assert listing.count("accept") == 800
    assert "10.9.2.99 : 10.8.0.1" in listing


BACKEND_WRITER = r"""
import os, signal, sys
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.state import ChangeTracker, NodeConfig

netns, count, die_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
svcs, slices = {}, {}
tracker = ChangeTracker(NodeConfig("n1"))
for i in range(count):
    # ClientIP affinity: each service gets its own chains and set, written as it comes
    s = to_service(service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}", port(80, target=8080),
                           sessionAffinity="ClientIP"))
    key = f"default/s{i}"
    svcs[key] = s
    slices[key] = [to_slice(endpoint_slice(f"s{i}", endpoint(f"10.1.{i // 250}.{i % 250 + 2}")))]
    tracker.service_changed(None, s)
changes = tracker.drain(svcs.get, lambda k: slices.get(k, []), lambda: list(svcs))
states = list(changes.state.values())
backend = NftablesBackend(SubprocessCommands(netns), BackendConfig(
    families=(4,), detect_local=LocalDetector("ClusterCIDR", ("10.1.0.0/16",))))

def ports():
    for n, state in enumerate(states):
        if n == die_after:  # the daemon dies (kill -9, OOM) in the middle of a full sync
            os.kill(os.getpid(), signal.SIGKILL)
        yield state

backend.sync_full(ports())
"""


def _cluster_ips(ns: str) -> int:
    out = ns_sh(ns, "nft", "-j", "list", "set", "ip", "svcnet", "cluster-ips", check=False)
    if out.returncode != 0:
        return -1
    import json
    doc = json.loads(out.stdout)
    return sum(len(o["set"].get("elem", [])) for o in doc["nftables"] if "set" in o)


def test_proxy_killed_mid_full_sync_leaves_the_previous_table(
        netns: Callable[[str], str], tmp_path: Path) -> None:
    """The nftables backend's full sync of 3000 services, killed at 15 points while it
    streams: the kernel keeps the previous complete table (200 services), never a
    half-written one."""
    require_binary("nft")
    ns = netns("node")
    script = tmp_path / "backend.py"
    script.write_text(BACKEND_WRITER)

    def run(count: int, die_after: int) -> int:
        return subprocess.run([sys.executable, str(script), ns, str(count), str(die_after)],
                              capture_output=True, text=True, timeout=120).returncode

    assert run(200, -1) == 0
    assert _cluster_ips(ns) == 200
    for die_after in range(100, 3000, 197):
        assert run(3000, die_after) == -signal.SIGKILL
        deadline = time.monotonic() + 20  # nft may still be reading what it got
        while time.monotonic() < deadline and subprocess.run(
                ["pgrep", "-f", "nft -f /proc/self/fd/0"], capture_output=True).returncode == 0:
            time.sleep(0.05)
        assert _cluster_ips(ns) == 200, die_after
    assert run(3000, -1) == 0
    assert _cluster_ips(ns) == 3000
