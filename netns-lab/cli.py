"""``svcnet lab ...``: build, use and remove a cluster made of network namespaces.

User commands: up, down, status, verify, exec, apply, delete, scale, kubectl, demo. Internal
ones, run by the lab itself inside its namespaces: kubelet, controller, bootstrap, wait-ready.
Commands that talk to the store re-run themselves inside the lab's control namespace, since
the store is reachable only on the lab's underlay.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

INTERNAL = argparse.SUPPRESS


def register(sub: Any) -> None:
    lab: argparse.ArgumentParser = sub.add_parser(
        "lab", help="a whole cluster in network namespaces (up, demo, status, down ...)")
    cmds = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    def named(name: str, help: str | None) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = (cmds.add_parser(name, help=help) if help
                                      else cmds.add_parser(name))
        p.add_argument("--name", default=os.environ.get("SVCNET_LAB", "lab"),
                       help="lab name (prefixes every namespace; default: lab)")
        p.add_argument("--lab-root", default=None, help="parent of lab dirs "
                       "(default: /run/svcnet-lab or $SVCNET_LAB_ROOT)")
        p.add_argument("--lab-dir", default=None, help=INTERNAL)
        return p

    p = named("up", "build a lab: underlay, etcd, N nodes with svcnet daemons, DNS")
    _add_up_arguments(p)
    p.set_defaults(func=_up)

    p = named("down", "remove a lab and everything it made (also after a crash)")
    p.set_defaults(func=_down)

    p = named("status", "nodes, pods, services and daemon health of a lab")
    p.set_defaults(func=_status)

    p = named("verify", "every node's kernel state against desired state recomputed from the "
              "store (exit 1 if any differs)")
    p.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON report per node")
    p.set_defaults(func=_verify)

    p = named("exec", "run a command in a pod's or node's namespace")
    p.add_argument("target", help="POD, NAMESPACE/POD, or a node name (n1, n2 ...)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command (after --)")
    p.set_defaults(func=_exec)

    p = named("apply", "apply Pod/Deployment/Service manifests (YAML or JSON)")
    p.add_argument("-f", "--filename", required=True, help="file, or - for stdin")
    p.set_defaults(func=_apply)

    p = named("delete", "delete a pod (gracefully), service or deployment")
    p.add_argument("kind")
    p.add_argument("object_name", metavar="NAME")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=_delete)

    p = named("scale", "set a deployment's replicas")
    p.add_argument("kind", choices=["deployment", "deploy"])
    p.add_argument("object_name", metavar="NAME")
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=_scale)

    p = named("kubectl", "kubectl as the lab's admin (--control-plane kubernetes labs)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="kubectl arguments (after --)")
    p.set_defaults(func=_kubectl)

    p = named("matrix", "probe the NetworkPolicy reachability matrix (x/y/z x a/b/c on "
              "80/81 TCP/UDP/SCTP) and print it; --deploy applies the model first")
    p.add_argument("--deploy", action="store_true", help="apply the model and wait for it")
    p.add_argument("--probe", action="append", default=[], metavar="PORT/PROTO",
                   help="e.g. 80/TCP (repeatable; default: 80 and 81 on every protocol)")
    p.add_argument("--services", action="store_true", help="through each pod's Service")
    p.add_argument("--timeout", type=float, default=0.5, help="seconds per probe")
    p.set_defaults(func=_matrix)

    p = named("demo", "3 nodes, a 3-replica web service and a client: DNS, ClusterIP, "
              "NodePort, load balancing; torn down unless --keep")
    _add_up_arguments(p, nodes=3)
    p.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    p.add_argument("--calls", type=int, default=12, help="calls per path")
    p.set_defaults(func=_demo)

    p = named("kubelet", None)
    p.add_argument("--node", required=True)
    p.set_defaults(func=_kubelet)
    p = named("controller", None)
    p.set_defaults(func=_controller)
    p = named("bootstrap", None)
    p.set_defaults(func=_bootstrap)
    p = named("wait-ready", None)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--pods", action="store_true", help="also wait for every pod to be Ready")
    p.set_defaults(func=_wait_ready)


def _add_up_arguments(p: argparse.ArgumentParser, nodes: int = 3) -> None:
    p.add_argument("--nodes", type=int, default=nodes)
    p.add_argument("--etcd-members", type=int, choices=[1, 3], default=1)
    p.add_argument("--control-plane", choices=["etcd", "kubernetes"], default="etcd",
                   help="etcd and the lab's own controllers (default: starts in ~1 s, small), "
                        "or a real one: etcd 3.5, kube-apiserver, kube-controller-manager, "
                        "kube-scheduler v1.28.7 in the lab's control namespace")
    p.add_argument("--store", choices=["etcd", "kubernetes"], default="etcd")
    p.add_argument("--kubeconfig", default=None,
                   help="with --store kubernetes: its server must be reachable from the lab")
    p.add_argument("--apiserver-cmd", default="", metavar="CMD",
                   help="with --store kubernetes: start this API server command inside the "
                        "lab's control namespace (10.250.0.2)")
    p.add_argument("--cni", choices=["auto", "svcnet", "reference"], default="auto",
                   help="svcnet-cni, or the reference bridge plugin (auto: svcnet if installed)")
    p.add_argument("--overlay", choices=["auto", "vxlan", "host-gw", "static"], default="auto",
                   help="svcnet overlay backend, or static routes set by the lab")
    p.add_argument("--no-proxy", action="store_true")
    p.add_argument("--proxy-mode", choices=["", "nftables", "iptables"], default="",
                   help="svcnet proxy backend (default: the proxy's)")
    p.add_argument("--no-dns", action="store_true")
    p.add_argument("--dns-replicas", type=int, default=2,
                   help="kube-dns server pods, one per node from n1 (default 2, as CoreDNS)")
    p.add_argument("--policy", action="store_true",
                   help="enforce NetworkPolicy: `svcnet node --policy` on every node")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every `svcnet node` (repeatable)")
    p.add_argument("--deploy", choices=["manifests"], default=None,
                   help="with --control-plane kubernetes: start no svcnet daemons; apply "
                        "`svcnet manifests` with kubectl and let the node agents run its "
                        "DaemonSet and Deployment pods (docs/deploy.md)")


# --- helpers -----------------------------------------------------------------------------


def _lab_dir(args: argparse.Namespace) -> Path:
    from svcnet.lab.state import check_name, lab_dir_for

    if args.lab_dir:
        return Path(args.lab_dir)
    try:
        check_name(args.name)
    except ValueError as err:
        from svcnet.cli import UsageError

        raise UsageError(str(err)) from None
    return lab_dir_for(args.name, Path(args.lab_root) if args.lab_root else None)


def _config(args: argparse.Namespace) -> Any:
    from svcnet.lab.state import LabConfig

    from svcnet.cli import UsageError

    d = _lab_dir(args)
    try:
        return LabConfig.load(d)
    except OSError:
        raise UsageError(f"no lab in {d}; create one with: svcnet lab up --name "
                         f"{args.name}") from None


def _inside_lab(cfg: Any) -> int | None:
    """Re-run this command inside the control namespace; None when already there."""
    if os.environ.get("SVCNET_LAB_NS") == cfg.control_ns:
        return None
    args = sys.argv[1:]
    if "--lab-dir" not in args:
        # Right after ``lab COMMAND``: anything later may be another program's arguments.
        at = args.index("lab") + 2 if "lab" in args else len(args)
        args = [*args[:at], "--lab-dir", str(cfg.dir), *args[at:]]
    argv = ["nsenter", f"--net=/var/run/netns/{cfg.control_ns}", *cfg.svcnet_argv, *args]
    env = {**os.environ, "SVCNET_LAB_NS": cfg.control_ns}
    return subprocess.run(argv, env=env, check=False).returncode


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _store(cfg: Any) -> Any:
    from svcnet.store.open import open_store

    return open_store(cfg.store_url, kubeconfig=cfg.kubeconfig)


# --- user commands -----------------------------------------------------------------------


def _make_config(args: argparse.Namespace, name: str | None = None) -> Any:
    from svcnet.lab.cluster import default_python
    from svcnet.lab.state import LabConfig, check_name, lab_dir_for

    from svcnet.cli import UsageError

    name = name or args.name
    try:
        check_name(name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not 1 <= args.nodes <= 200:
        raise UsageError("--nodes must be between 1 and 200")
    if not 1 <= args.dns_replicas <= 10:
        raise UsageError("--dns-replicas must be between 1 and 10")
    if args.control_plane == "kubernetes" and (args.store != "etcd" or args.kubeconfig):
        raise UsageError("--control-plane kubernetes brings its own apiserver: leave out "
                         "--store and --kubeconfig")
    if args.store == "kubernetes" and not args.kubeconfig:
        raise UsageError("--store kubernetes needs --kubeconfig")
    kubeconfig = str(Path(args.kubeconfig).resolve()) if args.kubeconfig else None
    lab_dir = Path(args.lab_dir) if args.lab_dir else lab_dir_for(
        name, Path(args.lab_root) if args.lab_root else None)
    return LabConfig(
        name=name, nodes=args.nodes, lab_dir=str(lab_dir), etcd_members=args.etcd_members,
        store=args.store, kubeconfig=kubeconfig, cni=args.cni, overlay=args.overlay,
        proxy=not args.no_proxy, proxy_mode=args.proxy_mode, dns=not args.no_dns,
        dns_replicas=args.dns_replicas,
        python=default_python(),
        extra_node_args=tuple(args.node_arg), apiserver_argv=tuple(shlex.split(args.apiserver_cmd)),
        control_plane=args.control_plane, deploy=_deploy_choice(args), policy=args.policy,
    )


def _deploy_choice(args: argparse.Namespace) -> str:
    from svcnet.cli import UsageError

    deploy = getattr(args, "deploy", None) or ""
    if deploy and args.control_plane != "kubernetes":
        raise UsageError("--deploy manifests needs --control-plane kubernetes (the DaemonSet "
                         "and Deployment controllers create its pods)")
    return str(deploy)


def _up(args: argparse.Namespace) -> int:
    from svcnet.lab.cluster import LabError, up
    from svcnet.lab.netns import RealKernel

    from svcnet.cli import UsageError

    if os.geteuid() != 0:
        raise UsageError("svcnet lab needs root (it creates network namespaces)")
    cfg = _make_config(args)
    try:
        up(cfg, RealKernel(), _progress)
    except LabError as err:
        raise UsageError(str(err)) from None
    return 0


def _down(args: argparse.Namespace) -> int:
    from svcnet.lab.cluster import down
    from svcnet.lab.netns import RealKernel

    d = _lab_dir(args)
    if not d.exists():
        print(f"no lab in {d}; nothing to do", file=sys.stderr)
        return 0
    down(d, RealKernel(), _progress)
    return 0


def _exec(args: argparse.Namespace) -> int:
    from svcnet.lab.netns import NETNS_DIR

    from svcnet.cli import UsageError

    cfg = _config(args)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("svcnet lab exec TARGET -- COMMAND ...")
    ns = target_namespace(cfg, args.target)
    if not (NETNS_DIR / ns).exists():
        raise UsageError(f"{args.target}: no such pod or node in lab {cfg.name}")
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False).returncode


def target_namespace(cfg: Any, target: str) -> str:
    """A node name, NAMESPACE/POD or POD (default namespace) to its network namespace."""
    import json

    if target in cfg.node_names:
        return str(cfg.node_ns(target))
    namespace, _, pod = target.rpartition("/")
    namespace = namespace or "default"
    for rec in (cfg.dir / "nodes").glob("*/pods/*.json"):
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if data.get("key") == f"{namespace}/{pod}":
            return str(data["netns"])
    return str(cfg.pod_ns(namespace, pod))


def _apply(args: argparse.Namespace) -> int:
    cfg = _config(args)
    code = _inside_lab(cfg)
    if code is not None:
        return code
    if cfg.real_control_plane:
        return _run_kubectl(cfg, "apply", "-f", args.filename)
    from svcnet.objects_cli import load_documents

    docs = load_documents(args.filename)
    return _with_applier(cfg, lambda a: a.apply(docs))


def _delete(args: argparse.Namespace) -> int:
    cfg = _config(args)
    code = _inside_lab(cfg)
    if code is not None:
        return code
    if cfg.real_control_plane:
        return _run_kubectl(cfg, "delete", "-n", args.namespace, args.kind, args.object_name,
                            "--wait=false")
    return _with_applier(cfg, lambda a: a.delete(args.kind, args.namespace, args.object_name))


def _scale(args: argparse.Namespace) -> int:
    cfg = _config(args)
    code = _inside_lab(cfg)
    if code is not None:
        return code
    if cfg.real_control_plane:
        return _run_kubectl(cfg, "scale", "-n", args.namespace, "deployment", args.object_name,
                            f"--replicas={args.replicas}")
    return _with_applier(cfg, lambda a: a.scale(args.namespace, args.object_name,
                                                args.replicas))


def _run_kubectl(cfg: Any, *args: str) -> int:
    """On a real control plane the lab's apply/scale/delete are kubectl's."""
    from svcnet.lab.k8s import kubectl_argv

    return subprocess.run(kubectl_argv(cfg, *args), check=False).returncode


def _kubectl(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    cfg = _config(args)
    if not cfg.real_control_plane:
        raise UsageError(f"lab {cfg.name} has no Kubernetes control plane "
                         "(up --control-plane kubernetes)")
    code = _inside_lab(cfg)
    if code is not None:
        return code
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return _run_kubectl(cfg, *cmd)


def _with_applier(cfg: Any, action: Any) -> int:
    import asyncio

    from svcnet.lab.manifests import Applier, ManifestError

    from svcnet.cli import UsageError
    from svcnet.store.base import StoreError

    async def run() -> list[str]:
        store = _store(cfg)
        try:
            applier = Applier(cfg, store)
            await action(applier)
            return applier.messages
        finally:
            await store.close()

    try:
        for line in asyncio.run(run()):
            print(line)
    except (ManifestError, StoreError) as err:
        raise UsageError(str(err)) from None
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    code = _inside_lab(cfg)
    if code is not None:
        return code
    import asyncio

    from svcnet.lab.status import render_status

    print(asyncio.run(render_status(cfg)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """From outside: run one check per node inside its namespace. Inside (the lab sets
    ``SVCNET_LAB_NS`` to the node's namespace): check that node."""
    import asyncio
    import json

    from svcnet.lab.verify import format_report, verify_node, verify_nodes

    from svcnet.cli import UsageError

    cfg = _config(args)
    unknown = [n for n in args.node if n not in cfg.node_names]
    if unknown:
        raise UsageError(f"no node {', '.join(unknown)} in lab {cfg.name}")
    nodes = args.node or cfg.node_names
    inside = [n for n in nodes if os.environ.get("SVCNET_LAB_NS") == cfg.node_ns(n)]
    reports = ([asyncio.run(verify_node(cfg, inside[0]))] if inside
               else verify_nodes(cfg, nodes))
    for report in reports:
        if args.json:
            print(json.dumps(report))
        else:
            print("\n".join(format_report(report)))
    return 0 if all(r["in_sync"] for r in reports) else 1


def _demo(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    if os.geteuid() != 0:
        raise UsageError("svcnet lab demo needs root (it creates network namespaces)")
    from svcnet.lab.demo import run_demo

    name = args.name if args.name != "lab" else "demo"
    return run_demo(_make_config(args, name), keep=args.keep, calls=args.calls,
                    progress=_progress)


def _matrix(args: argparse.Namespace) -> int:
    from svcnet.lab import netpol

    from svcnet.cli import UsageError

    cfg = _config(args)
    if os.geteuid() != 0 or not cfg.real_control_plane:
        raise UsageError("svcnet lab matrix needs root and a lab on --control-plane kubernetes")
    try:
        probes = [netpol.parse_probe(p) for p in args.probe] or [
            (port, proto) for proto in netpol.PROTOCOLS for port in netpol.PORTS]
        print(netpol.show(cfg, deploy_model=args.deploy, probes=probes,
                          services=args.services, timeout=args.timeout))
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from None
    return 0


# --- internal commands (run by the lab inside its namespaces) ----------------------------


def _kubelet(args: argparse.Namespace) -> int:
    import asyncio

    from svcnet.lab.kubelet import run_kubelet

    asyncio.run(run_kubelet(_config(args), args.node))
    return 0


def _controller(args: argparse.Namespace) -> int:
    import asyncio

    from svcnet.lab.controller import run_controller

    asyncio.run(run_controller(_config(args)))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    import asyncio

    from svcnet.lab.controller import bootstrap

    asyncio.run(bootstrap(_config(args)))
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    import asyncio

    from svcnet.lab.controller import wait_ready

    cfg = _config(args)
    code = _inside_lab(cfg)
    if code is not None:
        return code
    problem = asyncio.run(wait_ready(cfg, args.timeout, all_pods=args.pods))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0
