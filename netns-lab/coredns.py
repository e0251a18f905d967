"""The real CoreDNS 1.11.3 beside ``svcnet dns``, for the comparison test and the benchmarks.

The binary is ``$SVCNET_COREDNS_BIN``, else ``shared/coredns/coredns-1.11.3-linux-amd64.xz``
beside a parent of this checkout, unpacked once into the cache directory the control plane
uses (outside any checkout, sha256 checked). ``corefile`` writes a kubeadm-style Corefile
(plain data in, text out); ``CoreDNS`` runs one on free loopback ports, waits for ``/ready``
(the kubernetes plugin has listed everything) and stops it by pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from svcnet.lab.controlplane import (
    ControlPlaneError,
    MissingBinaries,
    _die_with_parent,
    _sha256,
    cache_root,
    find_shared,
    free_port,
    tail,
)

COREDNS_VERSION = "1.11.3"
COREDNS_XZ = f"coredns-{COREDNS_VERSION}-linux-amd64.xz"
COREDNS_SHA256 = "2fabce23de3d9cdf3b03708354753c70d05955c2f7a92680ac3cbb507ee070cb"


def find_xz() -> Path | None:
    """``coredns/`` in the shared directory (``find_shared``)."""
    return find_shared(f"coredns/{COREDNS_XZ}")


def unpack_coredns(xz: Path, dest: Path) -> Path:
    """Decompress ``xz`` to ``dest/coredns`` once, under a lock, sum checked; later calls find
    the checked binary and return at once."""
    binary = dest / "coredns"
    stamp = dest / ".verified"
    if stamp.is_file() and binary.is_file():
        return binary
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and binary.is_file():
            return binary
        fd, tmp_name = tempfile.mkstemp(prefix=".coredns.", dir=dest)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, lzma.open(xz) as src:
                while block := src.read(1 << 20):
                    out.write(block)
            if (got := _sha256(tmp)) != COREDNS_SHA256:
                raise MissingBinaries(f"{xz} unpacks to sha256 {got}, expected {COREDNS_SHA256}")
            tmp.chmod(0o755)
            tmp.rename(binary)
            stamp.write_text(COREDNS_VERSION + "\n")
        finally:
            tmp.unlink(missing_ok=True)
    return binary


def find_coredns() -> Path:
    """``$SVCNET_COREDNS_BIN``, else the shared archive unpacked into the cache."""
    if env := os.environ.get("SVCNET_COREDNS_BIN"):
        if not os.access(env, os.X_OK):
            raise MissingBinaries(f"$SVCNET_COREDNS_BIN={env} is not an executable")
        return Path(env)
    xz = find_xz()
    if xz is None:
        raise MissingBinaries(f"needs CoreDNS {COREDNS_VERSION}: set $SVCNET_COREDNS_BIN or put "
                              f"{COREDNS_XZ} in ../shared/coredns")
    return unpack_coredns(xz, cache_root() / f"coredns-{COREDNS_VERSION}")


@dataclass(frozen=True)
class Config:
    """What one CoreDNS serves and where: every port on ``host``."""

    kubeconfig: Path
    upstream: str
    """``IP:PORT`` of the resolver ``forward .`` uses."""
    port: int
    health_port: int
    ready_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    zone: str = "cluster.local"
    ttl: int = 30
    cache: int | None = 30
    """``cache N`` (kubeadm's default 30), or None for no cache plugin (answers then carry
    the kubernetes plugin's TTL exactly, which the comparison test needs)."""
    pods: str = "insecure"

    @classmethod
    def on_loopback(cls, kubeconfig: Path, upstream: str, **kw: object) -> Config:
        return cls(kubeconfig, upstream, port=free_udp_tcp_port(), health_port=free_port(),
                   ready_port=free_port(), metrics_port=free_port(), **kw)  # type: ignore[arg-type]


def corefile(c: Config) -> str:
    """kubeadm's Corefile with loopback addresses, the given kubeconfig and upstream."""
    cache = f"    cache {c.cache}\n" if c.cache is not None else ""
    return (
        f".:{c.port} {{\n"
        f"    bind {c.host}\n"
        "    errors\n"
        f"    health {c.host}:{c.health_port}\n"
        f"    ready {c.host}:{c.ready_port}\n"
        f"    kubernetes {c.zone} in-addr.arpa ip6.arpa {{\n"
        f"        kubeconfig {c.kubeconfig}\n"
        f"        pods {c.pods}\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        f"        ttl {c.ttl}\n"
        "    }\n"
        f"    prometheus {c.host}:{c.metrics_port}\n"
        f"    forward . {c.upstream}\n"
        f"{cache}"
        "    loop\n"
        "    loadbalance\n"
        "}\n")


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP (a DNS server binds both)."""
    import socket

    for _ in range(50):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for UDP and TCP")


class CoreDNS:
    """One CoreDNS child process. ``start()`` waits for ``/ready``; ``stop()``."""

    def __init__(self, config: Config, workdir: Path, *, binary: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.binary = binary or find_coredns()
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def log_path(self) -> Path:
        return self.workdir / "coredns.log"

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "Corefile"
        path.write_text(corefile(self.config))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-conf", str(path)], cwd=self.workdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, **self.env}, preexec_fn=_die_with_parent)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Until ``/ready`` answers 200: every plugin, the kubernetes one included (it has
        listed Services, EndpointSlices and Namespaces), is ready."""
        url = f"http://{self.config.host}:{self.config.ready_port}/ready"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise ControlPlaneError(f"coredns exited; see {self.log_path}:\n"
                                        + tail(self.log_path))
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"coredns not ready after {timeout:.0f}s; see "
                                        f"{self.log_path}:\n" + tail(self.log_path))
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory (one process: RSS and PSS are nearly the same)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> CoreDNS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The ClusterRole kubeadm gives CoreDNS (system:coredns): what its kubernetes plugin reads.
COREDNS_RULES: tuple[dict[str, object], ...] = (
    {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
     "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
)
