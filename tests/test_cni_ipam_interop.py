"""svcnet's IPAM and the reference host-local 1.1.1 share a data directory safely: the same
lock (``<dataDir>/<network>/lock``), the same files, read and released by either (a node
moving from one plugin to the other with pods running)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from svcnet.cni import ipam
from svcnet.cni.spec import ERR_TRY_AGAIN, CniError
from test_cni_helpers import REFERENCE_DIR, svcnet_bin

__all__ = ["svcnet_bin"]

HOST_LOCAL = Path(REFERENCE_DIR, "host-local")
NETWORK = "interop"


def _conf(data_dir: Path, **range_opts: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": NETWORK,
            "ipam": {"type": "host-local", "dataDir": str(data_dir),
                     "ranges": [[{"subnet": "10.91.0.0/24", **range_opts}]]}}


def _start(binary: Path, command: str, conf: dict[str, Any], cid: str,
           prev: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/proc/self/ns/net", "CNI_PATH": str(binary.parent),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen([str(binary)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    doc = dict(conf, prevResult=prev) if prev is not None else conf
    proc.stdin.write(json.dumps(doc).encode())
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.stdout is not None
    out = proc.stdout.read().decode().strip()
    assert proc.returncode == 0, out
    return json.loads(out) if out else None


def _run(binary: Path, command: str, conf: dict[str, Any], cid: str,
         prev: dict[str, Any] | None = None) -> dict[str, Any] | None:
    return _finish(_start(binary, command, conf, cid, prev))


def _reservations(data_dir: Path) -> dict[str, str]:
    d = data_dir / NETWORK
    return {p.name: p.read_bytes().decode() for p in d.iterdir()
            if not p.name.startswith("last_reserved") and p.name != "lock"}


@pytest.fixture
def host_local() -> Path:
    require(HOST_LOCAL.exists(), "needs containernetworking-plugins (host-local)")
    return HOST_LOCAL


def test_host_local_waits_for_svcnets_lock(host_local: Path, tmp_path: Path) -> None:
    """While svcnet holds its IPAM lock, a real host-local ADD blocks on the same file."""
    conf = _conf(tmp_path)
    with ipam.Store(str(tmp_path / NETWORK)):
        lock_inode = os.stat(tmp_path / NETWORK / "lock").st_ino
        proc = _start(host_local, "ADD", conf, "hl-waiting")
        try:
            deadline = time.monotonic() + 30
            while not _waits_on(proc.pid, lock_inode):
                assert proc.poll() is None, "host-local allocated while svcnet held the lock"
                assert time.monotonic() < deadline, "host-local neither waited nor finished"
                time.sleep(0.02)
        except BaseException:
            proc.kill()
            raise
        assert _reservations(tmp_path) == {}
    res = _finish(proc)
    assert res is not None and res["ips"][0]["address"] == "10.91.0.2/24"


def _waits_on(pid: int, inode: int) -> bool:
    """``/proc/locks`` lists a process blocked in flock as ``-> FLOCK ... <pid> <dev>:<ino>``."""
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid) and \
                    fields[6].rsplit(":", 1)[-1] == str(inode):
                return True
    return False


def test_svcnet_waits_for_host_locals_lock(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The other way round: holding ``<dir>/lock`` as host-local does keeps svcnet out."""
    directory = tmp_path / NETWORK
    directory.mkdir()
    fd = os.open(directory / "lock", os.O_RDONLY | os.O_CREAT, 0o750)  # host-local's open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setattr(ipam, "LOCK_TIMEOUT_S", 0.3)
        with pytest.raises(CniError) as info, ipam.Store(str(directory)):
            pass
        assert info.value.code == ERR_TRY_AGAIN
    finally:
        os.close(fd)
    with ipam.Store(str(directory)):  # free again
        pass


def test_parallel_allocation_into_one_directory(host_local: Path, svcnet_bin: Path,
                                                tmp_path: Path) -> None:
    """20 svcnet and 20 host-local ADDs at once into a 40-address range: 40 distinct
    addresses; each reads and releases the other's reservations; the 41st ADD of either
    finds the range full."""
    conf = _conf(tmp_path, rangeStart="10.91.0.10", rangeEnd="10.91.0.49")
    svcnet_ipam = svcnet_bin.parent / "svcnet-ipam"
    plugins = {"sv": svcnet_ipam, "hl": host_local}
    procs = {f"{tag}-{i}": _start(binary, "ADD", conf, f"{tag}-{i}")
             for i in range(20) for tag, binary in plugins.items()}
    results = {cid: _finish(proc) for cid, proc in procs.items()}
    ips = {cid: res["ips"][0]["address"].split("/")[0]
           for cid, res in results.items() if res is not None}
    assert len(ips) == 40 and len(set(ips.values())) == 40
    held = _reservations(tmp_path)
    assert {ip: text.split("\r\n")[0] for ip, text in held.items()} == {
        ip: cid for cid, ip in ips.items()}
    assert all(text.endswith("\r\neth0") for text in held.values())  # the same format
    for tag, binary in plugins.items():
        proc = _start(binary, "ADD", conf, f"{tag}-extra")
        proc.wait(60)
        assert proc.returncode != 0
    # each CHECKs and releases the other's reservations
    for cid, res in results.items():
        other = host_local if cid.startswith("sv") else svcnet_ipam
        _run(other, "CHECK", conf, cid, prev=res)
        _run(other, "DEL", conf, cid)
    assert _reservations(tmp_path) == {}
