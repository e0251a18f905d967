"""Building and removing a lab: underlay, etcd, nodes, their daemons; and its status.

Order of ``up``: ledger first, then namespaces and links (``ip -batch``, one process per
namespace), etcd, then the per-node files and daemons, then the objects every cluster has
(Nodes, the kube-dns Service and its pod), written by a ``svcnet lab bootstrap`` process that
runs inside the lab, because the store is reachable only on the underlay.

``down`` needs nothing but the lab directory: it kills every process in every namespace the
ledger names, deletes those namespaces and /etc/netns entries, then the directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from svcnet.lab import etcd
from svcnet.lab.netns import NETNS_DIR, Kernel, in_netns_thread, kill_pids
from svcnet.lab.procs import Procs
from svcnet.lab.state import (
    EXTERNAL_IP_RANGE,
    POD_NETWORK,
    SERVICE_NETWORK,
    UNDERLAY,
    LabConfig,
    Ledger,
)

Progress = Callable[[str], None]
REFERENCE_CNI_DIR = Path("/usr/lib/cni")
UNDERLAY_PREFIX = UNDERLAY.prefixlen


class LabError(RuntimeError):
    """A lab cannot be built or used; the message says what to do."""


def component_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def svcnet_cni_path(cfg: LabConfig) -> str:
    return str(Path(cfg.python).parent / "svcnet-cni")


def resolve_choices(cfg: LabConfig) -> LabConfig:
    """Turn ``auto`` choices into what is installed, so the lab works while parts land."""
    from dataclasses import replace

    cni = cfg.cni
    if cni == "auto":
        cni = "svcnet" if (component_available("svcnet.cni.main")
                           and Path(svcnet_cni_path(cfg)).exists()) else "reference"
    overlay = cfg.overlay
    if overlay == "auto":
        overlay = "vxlan" if component_available("svcnet.cni.overlay.daemon") else "static"
    proxy = cfg.proxy and component_available("svcnet.proxy.daemon")
    dns = cfg.dns and component_available("svcnet.dns.cli")
    policy = cfg.policy and component_available("svcnet.policy.daemon")
    return replace(cfg, cni=cni, overlay=overlay, proxy=proxy, dns=dns, policy=policy)


def with_real_control_plane(cfg: LabConfig) -> LabConfig:
    """Find the binaries now (a clear error before anything is built) and point every
    store user at the apiserver the lab will run."""
    from dataclasses import replace

    from svcnet.lab.controlplane import MissingBinaries, find_binaries
    from svcnet.lab.k8s import admin_kubeconfig

    try:
        bins = find_binaries()
    except MissingBinaries as err:
        raise LabError(f"--control-plane kubernetes: {err}") from None
    return replace(cfg, store="kubernetes", etcd_members=1, apiserver_argv=(),
                   kubeconfig=admin_kubeconfig(cfg), k8s_bin=str(bins.dir))


def _timer() -> Callable[[], float]:
    start = time.monotonic()
    return lambda: time.monotonic() - start


def up(cfg: LabConfig, kernel: Kernel, progress: Progress, *, wait: bool = True) -> LabConfig:
    if (cfg.dir / "lab.json").exists():
        raise LabError(f"lab {cfg.name} already exists in {cfg.dir}; "
                       f"run: svcnet lab down --name {cfg.name}")
    for ns in _all_static_ns(cfg):
        if kernel.netns_exists(ns):
            raise LabError(f"namespace {ns} already exists (a lab named {cfg.name} from another "
                           f"lab dir?); remove it or choose another --name")
    cfg = resolve_choices(cfg)
    if cfg.real_control_plane:
        cfg = with_real_control_plane(cfg)
    if cfg.deploy:
        from svcnet.lab import deploy

        if problem := deploy.check(cfg):
            raise LabError(problem)
    elapsed = _timer()
    cfg.dir.mkdir(parents=True, exist_ok=True)
    cfg.save()
    ledger = Ledger(cfg.dir)
    try:
        progress(f"lab {cfg.name}: {cfg.nodes} nodes, etcd x{cfg.etcd_members}, cni={cfg.cni}, "
                 f"overlay={cfg.overlay}, proxy={'on' if cfg.proxy else 'off'}, "
                 f"dns={'on' if cfg.dns else 'off'}"
                 + (", policy=on" if cfg.policy else ""))
        _build_network(cfg, kernel, ledger)
        if cfg.deploy:
            deploy.prepare(cfg, kernel)
        progress(f"[{elapsed():5.1f}s] underlay bridge + {cfg.nodes} node namespaces")
        procs = Procs(cfg.dir)
        if cfg.apiserver_argv:
            procs.start(kernel, "apiserver", cfg.control_ns, list(cfg.apiserver_argv))
            progress(f"[{elapsed():5.1f}s] API server started in {cfg.control_ns}")
        if cfg.real_control_plane:
            from svcnet.lab.k8s import LabControlPlane

            control_plane = LabControlPlane(cfg, kernel)
            control_plane.start(timeout=180)
            control_plane.write_identities()
            control_plane.apply_rbac()
            progress(f"[{elapsed():5.1f}s] etcd, kube-apiserver, kube-controller-manager, "
                     f"kube-scheduler ready at {control_plane.url}")
        elif cfg.store == "etcd":
            for i in range(1, cfg.etcd_members + 1):
                etcd.start_member(kernel, procs, cfg, i)
            for i in range(1, cfg.etcd_members + 1):
                etcd.wait_member(cfg, i)
            progress(f"[{elapsed():5.1f}s] etcd ready at {','.join(cfg.etcd_endpoints)}")
        (cfg.dir / "net-conf.json").write_text(json.dumps(net_conf(cfg)))
        for node in cfg.node_names:
            if not cfg.deploy:  # else svcnet's init container installs the CNI files
                write_node_files(cfg, node)
        if cfg.real_control_plane:
            from svcnet.lab.manifests import system_objects

            if cfg.dns and not cfg.deploy:
                control_plane.apply(system_objects(cfg))
            progress(f"[{elapsed():5.1f}s] kube-dns applied; RBAC and kubeconfigs for the node "
                     f"agents, node daemons and DNS in {cfg.dir}")
        else:
            bootstrap(cfg)
            progress(f"[{elapsed():5.1f}s] Nodes, network config and kube-dns written to the "
                     "store")
        for node in cfg.node_names:
            if (cfg.overlay != "static" or cfg.proxy or cfg.policy) and not cfg.deploy:
                procs.start(kernel, f"node-{node}", cfg.node_ns(node), node_daemon_argv(cfg, node))
            procs.start(kernel, f"kubelet-{node}", cfg.node_ns(node), kubelet_argv(cfg, node),
                        mount_ns=False)
        if cfg.real_control_plane:
            progress(f"[{elapsed():5.1f}s] node daemons and node agents started")
        else:
            procs.start(kernel, "controller", cfg.control_ns,
                        [*cfg.svcnet_argv, "lab", "controller", "--lab-dir", str(cfg.dir)])
            progress(f"[{elapsed():5.1f}s] node daemons, kubelets and the endpointslice "
                     "controller started")
        if cfg.deploy:
            deploy.apply_manifests(cfg, control_plane, progress, elapsed)
        if wait:
            wait_ready(cfg, progress, elapsed)
        progress(f"[{elapsed():5.1f}s] lab {cfg.name} is up; try: svcnet lab status "
                 f"--name {cfg.name}")
    except BaseException:
        progress("build failed; last lines of the lab's logs:")
        for log in sorted((cfg.dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").strip().splitlines()[-6:]
            if lines:
                progress(f"--- {log.name}\n" + "\n".join(lines))
        progress("removing what was made")
        down(cfg.dir, kernel, lambda _msg: None)
        raise
    return cfg


def _all_static_ns(cfg: LabConfig) -> list[str]:
    return [cfg.underlay_ns,
            *(cfg.etcd_ns(i) for i in range(1, cfg.etcd_members + 1)),
            *(cfg.node_ns(n) for n in cfg.node_names)]


def _build_network(cfg: LabConfig, kernel: Kernel, ledger: Ledger, *,
                   sysctls: bool = True) -> None:
    namespaces = _all_static_ns(cfg)
    for ns in namespaces:
        ledger.record("netns", ns)
    for ns in namespaces:
        kernel.add_netns(ns)
    ul = ["link add br0 type bridge", "link set br0 up"]
    hosts: list[tuple[str, str, str]] = [
        (f"e{i}", cfg.etcd_ns(i), cfg.etcd_ip(i)) for i in range(1, cfg.etcd_members + 1)]
    hosts += [(node, cfg.node_ns(node), cfg.node_ip(node)) for node in cfg.node_names]
    for port, ns, _ip in hosts:
        ul += [f"link add {port} type veth peer name eth0 netns {ns}",
               f"link set {port} master br0 up"]
    kernel.ip_batch(cfg.underlay_ns, ul)
    static_routes = cfg.overlay == "static"
    for port, ns, ip in hosts:
        cmds = [f"addr add {ip}/{UNDERLAY_PREFIX} dev eth0", "link set eth0 up"]
        if static_routes:
            cmds += [f"route add {cfg.node_subnet(n)} via {cfg.node_ip(n)}"
                     for n in cfg.node_names if n != port]
        kernel.ip_batch(ns, cmds)
    for node in cfg.node_names if sysctls else ():
        _sysctls(cfg.node_ns(node))


def _sysctls(ns: str) -> None:
    def write() -> None:
        for key, value in (("net/ipv4/ip_forward", "1"),
                           ("net/ipv4/conf/all/rp_filter", "0"),
                           ("net/ipv4/conf/default/rp_filter", "0")):
            Path(f"/proc/sys/{key}").write_text(value)

    in_netns_thread(ns, write)


def write_node_files(cfg: LabConfig, node: str) -> None:
    """The node's CNI config dir (containerd's /etc/cni/net.d), CNI_PATH dir and subnet file."""
    d = cfg.node_dir(node)
    (d / "net.d").mkdir(parents=True, exist_ok=True)
    (d / "cni-results").mkdir(exist_ok=True)
    bin_dir = d / "cni-bin"
    bin_dir.mkdir(exist_ok=True)
    if REFERENCE_CNI_DIR.is_dir():
        for plugin in REFERENCE_CNI_DIR.iterdir():
            (bin_dir / plugin.name).symlink_to(plugin)
    if cfg.cni == "svcnet":
        # What ``svcnet cni install`` deploys: the client of the node daemon's socket, with
        # the lean in-process launcher as its fallback (not pip's wrapper).
        from svcnet.cni.cli import IN_PROCESS_NAME, PERL, launcher_text, socket_client

        socket = cni_socket(cfg, node)
        inprocess = bin_dir / (IN_PROCESS_NAME if socket else "svcnet-cni")
        inprocess.write_text(launcher_text(cfg.python))
        inprocess.chmod(0o755)
        if socket:
            client = bin_dir / "svcnet-cni"
            client.write_text(socket_client(str(inprocess), socket, PERL))
            client.chmod(0o755)
    if cfg.overlay == "static":
        subnet = cfg.node_subnet(node)
        gw = subnet.replace(".0/24", ".1/24")
        (d / "subnet.env").write_text(
            f"FLANNEL_NETWORK={POD_NETWORK}\nFLANNEL_SUBNET={gw}\nFLANNEL_MTU=1500\n"
            "FLANNEL_IPMASQ=false\n")
    conflist = cni_conflist(cfg, node)
    (d / "net.d" / "10-svcnet.conflist").write_text(json.dumps(conflist, indent=1))


def cni_conflist(cfg: LabConfig, node: str) -> dict[str, object]:
    d = cfg.node_dir(node)
    plugin: dict[str, object]
    if cfg.cni == "svcnet":
        plugin = {"type": "svcnet-cni", "bridge": "cni0", "isGateway": True,
                  "isDefaultGateway": True,
                  "ipMasq": False, "hairpinMode": True,
                  "ipam": {"type": "svcnet-cni", "subnetFile": str(d / "subnet.env"),
                           "dataDir": str(d / "ipam")}}
    else:
        # The reference plugins cannot read subnet.env; the kubelet fills ``ranges`` from
        # it at ADD time, as Flannel's CNI plugin does before delegating to ``bridge``.
        plugin = {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                  "hairpinMode": True,
                  "ipam": {"type": "host-local", "subnetFile": str(d / "subnet.env"),
                           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "ipam")}}
    return {"cniVersion": "1.0.0", "name": "svcnet-lab", "plugins": [plugin]}


def net_conf(cfg: LabConfig) -> dict[str, object]:
    """Flannel's net-conf.json for the overlay daemons."""
    return {"Network": str(POD_NETWORK), "SubnetLen": 24,
            "Backend": {"Type": cfg.overlay, "VNI": 1, "Port": 8472}}


def cni_socket(cfg: LabConfig, node: str) -> str | None:
    """The node daemon's CNI socket, inside the lab's directory (never the host's
    /run/svcnet/cni.sock); None when perl is missing or the path is too long for AF_UNIX."""
    from svcnet.cni.cli import PERL

    path = str(cfg.node_dir(node) / "cni.sock")
    return path if cfg.cni == "svcnet" and len(path) < 100 and os.access(PERL, os.X_OK) else None


def node_daemon_argv(cfg: LabConfig, node: str) -> list[str]:
    kubeconfig = None
    if cfg.real_control_plane:
        from svcnet.lab.k8s import node_daemon_kubeconfig

        kubeconfig = node_daemon_kubeconfig(cfg, node)
    argv = [*cfg.svcnet_argv, "node", *cfg.store_args(kubeconfig)]
    socket = cni_socket(cfg, node)
    argv += ["--cni-server-socket", socket] if socket else ["--no-cni-server"]
    if cfg.overlay in ("vxlan", "host-gw"):
        argv += ["--overlay", "--overlay-config", str(cfg.dir / "net-conf.json"),
                 "--overlay-node-name", node, "--overlay-iface", "eth0",
                 "--overlay-public-ip", cfg.node_ip(node),
                 "--overlay-subnet-file", str(cfg.node_dir(node) / "subnet.env")]
    if cfg.proxy:
        argv += ["--proxy", "--proxy-node-name", node, "--proxy-zone", cfg.node_zone(node),
                 "--proxy-nodeport-addresses", str(UNDERLAY),
                 "--proxy-cluster-cidr", str(POD_NETWORK), "--proxy-ip-families", "4",
                 "--proxy-min-sync-period", "0.1", "--proxy-drift-check",
                 "--proxy-service-cluster-ip-range", str(SERVICE_NETWORK),
                 "--proxy-external-ip-cidrs", str(EXTERNAL_IP_RANGE)]
        if cfg.proxy_mode:
            argv += ["--proxy-mode", cfg.proxy_mode]
    if cfg.policy:
        argv += policy_argv(cfg, node)
    return [*argv, *cfg.extra_node_args]


def policy_argv(cfg: LabConfig, node: str) -> list[str]:
    """NetworkPolicy enforcement for the pods of ``node`` (svcnet.policy.daemon)."""
    return ["--policy", "--policy-node-name", node]


def kubelet_argv(cfg: LabConfig, node: str) -> list[str]:
    return [*cfg.svcnet_argv, "lab", "kubelet", "--lab-dir", str(cfg.dir), "--node", node]


def lab_command(cfg: LabConfig, *args: str, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``svcnet lab ARGS`` inside the lab's control namespace, where the store is."""
    proc = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / cfg.control_ns}", *cfg.svcnet_argv, "lab", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "SVCNET_LAB_NS": cfg.control_ns},
    )
    if check and proc.returncode != 0:
        raise LabError(f"svcnet lab {' '.join(args[:3])} failed: "
                       f"{proc.stderr.strip()[-2000:] or proc.returncode}")
    return proc


def bootstrap(cfg: LabConfig) -> None:
    lab_command(cfg, "bootstrap", "--lab-dir", str(cfg.dir))


def wait_ready(cfg: LabConfig, progress: Progress, elapsed: Callable[[], float],
               timeout: float = 60) -> None:
    """Wait until every kubelet registered and the DNS pod (if any) is Ready."""
    lab_command(cfg, "wait-ready", "--lab-dir", str(cfg.dir), "--timeout", str(timeout),
                timeout=timeout + 15)
    progress(f"[{elapsed():5.1f}s] every node ready" + (", DNS ready" if cfg.dns else ""))


def down(lab_dir: Path, kernel: Kernel, progress: Progress) -> None:
    """Remove everything the ledger names; works on a half-built or crashed lab."""
    elapsed = _timer()
    ledger = Ledger(lab_dir)
    procs = Procs(lab_dir)
    daemons = [r.pid for r in procs.all() if procs.running(r)]
    kill_pids(daemons)
    namespaces = ledger.entries("netns")
    pids = [pid for ns in namespaces for pid in kernel.pids_in(ns)]
    kill_pids(pids)
    progress(f"[{elapsed():5.1f}s] stopped {len(daemons)} daemons and "
             f"{len(set(pids) - set(daemons))} other processes")
    # Pods first, then nodes, then the underlay: nothing keeps a deleted namespace alive.
    order = sorted(namespaces, key=lambda n: (n.endswith("-ul"), "." not in n))
    for ns in order:
        kernel.delete_netns(ns)
        ledger.forget("netns", ns)
    for ns in ledger.entries("etc"):
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        ledger.forget("etc", ns)
    progress(f"[{elapsed():5.1f}s] deleted {len(namespaces)} namespaces")
    shutil.rmtree(lab_dir, ignore_errors=True)


def default_python() -> str:
    return sys.executable
