"""The fast path: the shell client of ``svcnet cni install --fast-path`` talking to ``svcnet cni
serve`` in the host namespace, and its fallback to the in-process plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_binary, require_root
from test_cni_helpers import REFERENCE_DIR, PluginError, Runtime, links, ping

from svcnet.cli import main as svcnet_main

pytestmark = pytest.mark.kernel


@pytest.fixture
def fast(netns: Callable[[str], str], tmp_path: Path) -> Iterator[tuple[Runtime, Path]]:
    require_root()
    require_binary("ip", "socat", "nft")
    host = netns("h")
    sock = tmp_path / "run" / "cni.sock"
    bindir = tmp_path / "bin"
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", "",
                        "--fast-path", "--socket", str(sock), "--python",
                        sys.executable]) == 0
    svcnet = os.path.join(os.path.dirname(sys.executable), "svcnet")
    server = subprocess.Popen(["ip", "netns", "exec", host, svcnet, "cni", "serve", "--socket",
                               str(sock)])
    try:
        for _ in range(200):  # up to 10 s for the server to listen
            if sock.exists():
                break
            time.sleep(0.05)
        assert sock.exists(), "svcnet cni serve did not create its socket"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        yield Runtime(host, f"{bindir}:{REFERENCE_DIR}"), sock
    finally:
        server.terminate()
        server.wait(10)


def _conf(tmp_path: Path) -> dict[str, object]:
    return {"cniVersion": "1.1.0", "name": "fast", "type": "svcnet-cni", "bridge": "cnifast0",
            "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                     "ranges": [[{"subnet": "10.82.0.0/24"}]]}}


def test_fast_path_add_check_del_and_errors(fast: tuple[Runtime, Path],
                                            netns: Callable[[str], str],
                                            tmp_path: Path) -> None:
    runtime, _sock = fast
    pod_a, pod_b = netns("pa"), netns("pb")
    conf = _conf(tmp_path)
    res_a = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod_a)
    res_b = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-b", pod_b)
    assert res_a and res_b and res_a["cniVersion"] == "1.1.0"
    assert ping(pod_a, res_b["ips"][0]["address"].split("/")[0])
    runtime.exec_plugin("svcnet-cni", "CHECK", dict(conf, prevResult=res_a), "ctr-a", pod_a)
    with pytest.raises(PluginError) as info:  # error JSON and exit status pass through
        runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr-a", pod_a)
    assert info.value.code == 7 and info.value.rc == 1
    with pytest.raises(PluginError) as info:
        runtime.exec_plugin("svcnet-cni", "ADD", b"{nope", "ctr-x", pod_a)
    assert info.value.code == 6
    version = runtime.exec_plugin("svcnet-cni", "VERSION", {"cniVersion": "1.0.0"})
    assert version == {"cniVersion": "1.0.0",
                       "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-a", pod_a)
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr-b", pod_b)
    assert "eth0" not in links(pod_a)
    left = [p.name for p in (tmp_path / "ipam" / "fast").iterdir()
            if not p.name.startswith("last_reserved")]
    assert left == []


def test_fast_path_parallel_and_ipam_role(fast: tuple[Runtime, Path],
                                          netns: Callable[[str], str], tmp_path: Path) -> None:
    runtime, _sock = fast
    conf = _conf(tmp_path)
    pods = [netns("p") for _ in range(16)]
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
    assert len(set(outs)) == 16
    runtime.exec_plugin("svcnet-cni", "GC", dict(conf, **{"cni.dev/valid-attachments": []}))
    assert not [n for n, link in links(runtime.host_ns).items()
                if link.get("master") == "cnifast0"]
    # the reference bridge delegating IPAM to the client (invoked as svcnet-ipam)
    pod = netns("p")
    delegated = {"cniVersion": "1.0.0", "name": "fastipam", "type": "bridge",
                 "bridge": "cnifast1", "isGateway": True,
                 "ipam": {"type": "svcnet-ipam", "dataDir": str(tmp_path / "ipam"),
                          "ranges": [[{"subnet": "10.83.0.0/24"}]]}}
    res = runtime.exec_plugin("bridge", "ADD", delegated, "deleg", pod)
    assert res and res["ips"][0]["address"] == "10.83.0.2/24"
    runtime.exec_plugin("bridge", "DEL", delegated, "deleg", pod)


def test_client_falls_back_without_server(netns: Callable[[str], str], tmp_path: Path) -> None:
    require_root()
    require_binary("ip", "socat")
    bindir = tmp_path / "bin"
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", "",
                        "--fast-path", "--socket", str(tmp_path / "absent.sock"),
                        "--python", sys.executable]) == 0
    runtime = Runtime(netns("h"), str(bindir))
    pod = netns("p")
    conf = _conf(tmp_path)
    res = runtime.exec_plugin("svcnet-cni", "ADD", conf, "ctr", pod)
    assert res and res["ips"][0]["address"] == "10.82.0.2/24"
    runtime.exec_plugin("svcnet-cni", "DEL", conf, "ctr", pod)
    assert "eth0" not in links(pod)


def test_node_component_serves_until_cancelled(tmp_path: Path) -> None:
    """Only VERSION goes through it: this server runs in the test's own namespace."""
    import asyncio

    from svcnet.cni.server import ServerComponent

    require_binary("socat")
    sock = tmp_path / "node.sock"

    async def scenario() -> bytes:
        task = asyncio.create_task(ServerComponent(str(sock)).run(None, None))
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        proc = await asyncio.create_subprocess_exec(
            "socat", "-t", "10", "-", f"UNIX-CONNECT:{sock}", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={"CNI_COMMAND": "VERSION"})
        out, _ = await asyncio.wait_for(proc.communicate(b'{"cniVersion": "1.1.0"}'), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return out

    out = asyncio.run(scenario())
    assert out[:1] == b"0"
    assert json.loads(out[1:])["supportedVersions"][-1] == "1.1.0"
    for _ in range(40):  # the serving thread notices the stop within 0.5 s
        if not sock.exists():
            break
        time.sleep(0.05)
    assert not sock.exists()
