"""The lab's etcd: one member, or a three-member cluster, each in its own namespace.

Each member has its own underlay address, so a test can kill exactly the member a node is
connected to and the others keep a quorum.
"""

from __future__ import annotations

import time

from svcnet.lab.netns import Kernel, tcp_open
from svcnet.lab.procs import Procs
from svcnet.lab.state import ETCD_CLIENT_PORT, ETCD_PEER_PORT, LabConfig


def member_argv(cfg: LabConfig, i: int) -> list[str]:
    ip = cfg.etcd_ip(i)
    initial = ",".join(f"e{m}=http://{cfg.etcd_ip(m)}:{ETCD_PEER_PORT}"
                       for m in range(1, cfg.etcd_members + 1))
    return [
        "etcd", "--name", f"e{i}", "--data-dir", str(cfg.dir / "etcd" / f"e{i}"),
        "--listen-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT},http://127.0.0.1:{ETCD_CLIENT_PORT}",
        "--advertise-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT}",
        "--listen-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
        "--initial-advertise-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
        "--initial-cluster", initial, "--initial-cluster-state", "new",
        "--initial-cluster-token", f"svcnet-lab-{cfg.name}",
        "--heartbeat-interval", "50", "--election-timeout", "500",
        "--log-level", "warn",
    ]


def start_member(kernel: Kernel, procs: Procs, cfg: LabConfig, i: int) -> None:
    procs.start(kernel, f"etcd-e{i}", cfg.etcd_ns(i), member_argv(cfg, i),
                env={"ETCD_UNSUPPORTED_ARCH": "amd64"})


def wait_member(cfg: LabConfig, i: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not tcp_open(cfg.etcd_ns(i), cfg.etcd_ip(i), ETCD_CLIENT_PORT, 0.2):
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd member e{i} did not start; see {cfg.log(f'etcd-e{i}')}")
        time.sleep(0.05)
