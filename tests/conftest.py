"""Shared fixtures: throwaway network namespaces, a real etcd, and the no-skip-in-CI rule."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from svcnet.lab import etcdfault
from svcnet.lab.etcdfault import free_port as free_port  # re-exported for the tests
from svcnet.lab.state import LabConfig

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_ns_counter = itertools.count()


def until(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``check`` until truthy or ``timeout``; return its last value (for the assert)."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """``until``, failing the test with ``what`` when ``check`` stays falsy."""
    value = until(check, timeout, interval)
    assert value, f"timed out after {timeout:g} s waiting for {what}"
    return value


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except under CI=true, where that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_binary(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"needs the {name!r} binary")


def sh(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout,
                          input=input)


def ns_sh(ns: str, *cmd: str, check: bool = True, timeout: float = 30
          ) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory of network namespaces that are always deleted, named ``snt<pid>-<tag><n>``.

    Loopback is brought up in each; nothing is done in the root namespace.
    """
    require_root()
    require_binary("ip")
    made: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"snt{os.getpid()}-{tag}{next(_ns_counter)}"[:40]
        sh("ip", "netns", "add", name)
        made.append(name)
        ns_sh(name, "ip", "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            _kill_ns_processes(name)
            sh("ip", "netns", "delete", name, check=False)


def _kill_ns_processes(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


class EtcdCluster(etcdfault.EtcdCluster):
    """Real etcd members on loopback (svcnet.lab.etcdfault), failing the test without etcd."""

    def __init__(self, base: Path, members: int) -> None:
        require_binary("etcd")
        super().__init__(base, members)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One real etcd member on loopback."""
    cluster = EtcdCluster(tmp_path, 1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A real three-member etcd cluster on loopback."""
    cluster = EtcdCluster(tmp_path, 3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# --- a real Kubernetes control plane, one per test session --------------------------------------


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """etcd 3.5, kube-apiserver, kube-controller-manager and kube-scheduler v1.28.7 on loopback
    (svcnet.lab.controlplane), shared by every test of the session: it takes ~20 s to start.
    Tests isolate themselves by namespace (``control_plane.namespace(...)``) and unique names."""
    from svcnet.lab.controlplane import ControlPlane, MissingBinaries

    require_binary("openssl")
    try:
        cp = ControlPlane.on_loopback(tmp_path_factory.mktemp("k8s"))
    except MissingBinaries as err:
        require(False, str(err))
        raise
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


# --- a whole lab (svcnet.lab: namespaces, node agents, daemons) for a module ----------------


LAB_PARTS: dict[str, Callable[[LabConfig], bool]] = {
    "overlay": lambda cfg: cfg.overlay == "vxlan",
    "proxy": lambda cfg: cfg.proxy,
    "dns": lambda cfg: cfg.dns,
}
"""What ``running_lab(needs=...)`` can ask for, as seen in the config ``up`` returns."""


@contextlib.contextmanager
def running_lab(base: Path, prefix: str, *, nodes: int, control_plane: str = "kubernetes",
                binaries: tuple[str, ...] = (), needs: tuple[str, ...] = ("overlay", "proxy"),
                **options: Any) -> Iterator[LabConfig]:
    """A lab named ``<prefix><pid>`` in ``base``, up (on the real control plane unless told
    otherwise) for the ``with`` block and always torn down.

    Every lab module's fixture shares these prerequisites and this teardown. ``needs`` names
    the parts (``LAB_PARTS``) its tests judge: ``up`` quietly leaves out what is not
    installed (``resolve_choices``), and a lab without them must not pass for one with them.
    """
    from svcnet.lab.cluster import down, up
    from svcnet.lab.netns import RealKernel

    require_root()
    require_binary("ip", "nsenter", *binaries)
    if control_plane == "kubernetes":
        from svcnet.lab.controlplane import MissingBinaries, find_binaries

        require_binary("openssl")
        try:
            find_binaries()
        except MissingBinaries as err:
            require(False, str(err))
    name = f"{prefix}{os.getpid() % 10_000_000}"
    cfg = LabConfig(name=name, nodes=nodes, lab_dir=str(base / name), python=sys.executable,
                    control_plane=control_plane, cni="auto", overlay="auto", **options)
    started = time.monotonic()
    try:
        cfg = up(cfg, RealKernel(), lambda msg: print(msg, file=sys.stderr))
        print(f"lab {name} up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        missing = [part for part in needs if not LAB_PARTS[part](cfg)]
        require(not missing, f"needs {', '.join(missing)} installed")
        yield cfg
    finally:
        down(Path(cfg.lab_dir), RealKernel(), lambda msg: None)


def lab_in_sync(cfg: LabConfig, timeout: float) -> list[dict[str, Any]]:
    """Until every node's kernel equals the desired state recomputed from the store
    (``svcnet lab verify``): the reports, for further checks; fails the test on timeout."""
    from svcnet.lab.verify import format_report, verify_nodes

    reports: list[dict[str, Any]] = []

    def in_sync() -> bool:
        nonlocal reports
        reports = verify_nodes(cfg, cfg.node_names)
        return all(r["in_sync"] for r in reports)

    assert until(in_sync, timeout, 0.5), [format_report(r) for r in reports]
    return reports


# --- tests marked `vm` run inside svcnet.lab.vm's guest only ---------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside the VM, deselect `vm` tests (counted as deselected, never as skipped).

    tests/test_vm_*.py run them inside the guest through ``svcnet.lab.vm`` (which sets
    SVCNET_IN_VM=1) and fail if any of them fails or skips there.
    """
    if os.environ.get("SVCNET_IN_VM") == "1":
        return
    in_vm_only = [item for item in items if item.get_closest_marker("vm")]
    if in_vm_only:
        config.hook.pytest_deselected(items=in_vm_only)
        items[:] = [item for item in items if not item.get_closest_marker("vm")]


class RequestLoop:
    """At most ``count`` HTTP requests from a lab pod (``svcnet.lab.echo call``), in the
    background, until stopped."""

    def __init__(self, cfg: LabConfig, pod: str, target: str, *, count: int = 3000,
                 interval: float = 0.01, timeout: float = 3.0) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", cfg.pod_ns("default", pod), cfg.python, "-m",
             "svcnet.lab.echo", "call", target, "--count", str(count), "--interval",
             str(interval), "--timeout", str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.out = b""  # read from the pipe's fd directly: no buffer that communicate skips
        # The loop must be running before the test disrupts anything: on a quiet machine a
        # heal can finish before a new Python process has sent its first request.
        assert self._read(1, 30), "the request loop printed nothing in 30 s"

    def _read(self, n: int, timeout: float) -> bool:
        """Until ``n`` more answers (True), ``timeout`` seconds or the loop's end."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        want, deadline = self.out.count(b"\n") + n, time.monotonic() + timeout
        while self.out.count(b"\n") < want:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return False
            self.out += chunk
        return True

    def stop(self, more: int = 60, timeout: float = 15) -> list[str]:
        """All answers, once ``more`` have come after this call (or ``timeout``): requests
        in flight across a disruption finish (TCP retransmits) before the loop ends."""
        self._read(more, timeout)
        self.proc.send_signal(signal.SIGTERM)
        rest, _ = self.proc.communicate(timeout=10)
        return (self.out + rest).decode().splitlines()
