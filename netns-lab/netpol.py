"""The NetworkPolicy reachability matrix of Kubernetes' e2e suite, rebuilt for the lab.

The model: namespaces x, y, z (label ``ns: <name>``; the apiserver adds
``kubernetes.io/metadata.name``), pods a, b, c in each (label ``pod: <name>``), spread over the
lab's nodes, each serving ports 80 and 81 on TCP, UDP and SCTP through named container ports
(``serve-80-tcp``, ``serve-81-udp``, ...), and a Service ``s-<pod>`` per pod (the same ports).

A test applies policies, states the expected truth table per port and protocol
(``Reachability``) and asks the ``Prober`` to probe every ordered pod pair. The prober opens
its sockets inside the source pods' network namespaces from one process (a short-lived
thread per namespace that ``setns``es, creates the sockets and exits), then drives every
probe of the round at once on one asyncio loop with a bounded timeout, so a 9x9 matrix on
several ports and protocols takes about one timeout. Source ports come from a counter, never
reused within a run, so a probe never rides on a conntrack entry an earlier probe (made under
another policy) left behind.

Pod-to-itself cells are probed but not judged: that traffic never leaves the pod's network
namespace here, and upstream's suite ignores loopback too (its semantics differ between
CNIs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from svcnet.lab import sctpraw

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP", "SCTP")
NS_LABEL = "ns"
POD_LABEL = "pod"
SOURCE_PORTS = (20000, 60000)


@dataclass(frozen=True, order=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


ALL_PODS = tuple(PodRef(ns, pod) for ns in NAMESPACES for pod in PODS)
Probe = tuple[int, str]
"""(port, protocol)."""
Cell = tuple[PodRef, PodRef]


def port_name(port: int, protocol: str) -> str:
    return f"serve-{port}-{protocol.lower()}"


def service_name(pod: PodRef) -> str:
    return f"s-{pod.name}"


# --- the model as Kubernetes objects ------------------------------------------------------


def manifests(nodes: Sequence[str], protocols: Sequence[str] = PROTOCOLS) -> list[dict[str, Any]]:
    """Namespaces, pods (round-robin over ``nodes``) and one Service per pod."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": ns, "labels": {NS_LABEL: ns}}} for ns in NAMESPACES]
    for i, pod in enumerate(ALL_PODS):
        ports = [{"name": port_name(port, proto), "containerPort": port, "protocol": proto}
                 for proto in protocols for port in PORTS]
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace,
                         "labels": {POD_LABEL: pod.name}},
            "spec": {"nodeName": nodes[i % len(nodes)], "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "cont", "image": "svcnet/echo",
                                     "ports": ports}]}})
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service_name(pod), "namespace": pod.namespace},
            "spec": {"selector": {POD_LABEL: pod.name},
                     "ports": [{"name": port_name(port, proto), "port": port,
                                "targetPort": port, "protocol": proto}
                               for proto in protocols for port in PORTS]}})
    return docs


# --- the truth table ------------------------------------------------------------------------


@dataclass
class Reachability:
    """Expected and observed connectivity for one port and protocol, from row to column."""

    pods: tuple[PodRef, ...] = ALL_PODS
    expected: dict[Cell, bool] = field(default_factory=dict)
    observed: dict[Cell, bool] = field(default_factory=dict)
    reasons: dict[Cell, str] = field(default_factory=dict)

    @classmethod
    def where(cls, allowed: Callable[[PodRef, PodRef], bool],
              pods: tuple[PodRef, ...] = ALL_PODS) -> Reachability:
        """The table whose cell (src, dst) is ``allowed(src, dst)``."""
        return cls(pods, {(s, d): bool(allowed(s, d)) for s in pods for d in pods})

    @classmethod
    def all(cls, allowed: bool = True) -> Reachability:
        return cls.where(lambda _s, _d: allowed)

    def expect(self, src: PodRef, dst: PodRef, allowed: bool) -> None:
        self.expected[(src, dst)] = allowed

    def expect_all_ingress(self, dst: PodRef, allowed: bool) -> None:
        for src in self.pods:
            self.expected[(src, dst)] = allowed

    def expect_all_egress(self, src: PodRef, allowed: bool) -> None:
        for dst in self.pods:
            self.expected[(src, dst)] = allowed

    def judged(self) -> list[Cell]:
        return [(s, d) for s in self.pods for d in self.pods if s != d]

    def wrong(self) -> list[Cell]:
        return [c for c in self.judged() if self.observed.get(c) != self.expected.get(c)]

    def grid(self, which: str) -> str:
        """One table as upstream prints it: ``.`` connected, ``X`` blocked; ``comparison``
        marks a wrong cell ``X``. Self cells (not judged) are ``-``."""
        head = "-\t" + "\t".join(str(p) for p in self.pods)
        rows = [head]
        for s in self.pods:
            cells = []
            for d in self.pods:
                exp, obs = self.expected.get((s, d)), self.observed.get((s, d))
                if which == "comparison":
                    cells.append("-" if s == d else ("." if exp == obs else "X"))
                else:
                    value = exp if which == "expected" else obs
                    cells.append("?" if value is None else ("." if value else "X"))
            rows.append(f"{s}\t" + "\t".join(cells))
        return "\n".join(rows)

    def report(self, title: str) -> str:
        wrong = self.wrong()
        lines = [f"{title}: {len(wrong)} of {len(self.judged())} cells wrong",
                 "expected:", self.grid("expected"), "observed:", self.grid("observed"),
                 "comparison:", self.grid("comparison")]
        for s, d in wrong[:20]:
            lines.append(f"  {s} -> {d}: expected "
                         f"{'connected' if self.expected.get((s, d)) else 'blocked'}, "
                         f"observed {self.reasons.get((s, d), '?')}")
        return "\n".join(lines)


# --- probing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a probe to ``pod`` goes (its IP, or a Service's ClusterIP) and who must answer."""

    ip: str
    answer: str


@dataclass(frozen=True)
class Job:
    src: PodRef
    dst: PodRef
    ip: str
    port: int
    protocol: str
    answer: str


class Prober:
    """Probes from pods' network namespaces, many at once, each bounded by a timeout."""

    def __init__(self, netns: Mapping[PodRef, str],
                 enter: Callable[[str, Callable[[], Any]], Any] | None = None) -> None:
        if enter is None:
            from svcnet.lab.netns import in_netns_thread

            enter = in_netns_thread
        self.netns = dict(netns)
        self.enter = enter
        self._ports = itertools.cycle(range(*SOURCE_PORTS))

    def probe(self, jobs: Sequence[Job], timeout: float) -> dict[Job, tuple[bool, str]]:
        """(connected, what happened) per job."""
        made: dict[Job, tuple[socket.socket, int] | str] = {}
        by_src: dict[PodRef, list[Job]] = {}
        for job in jobs:
            by_src.setdefault(job.src, []).append(job)
        for src, group in by_src.items():
            plan = [(job, next(self._ports)) for job in group]
            made.update(self.enter(self.netns[src], functools.partial(_open_all, plan)))
        try:
            return asyncio.run(_run_all(made, timeout))
        finally:
            for opened in made.values():
                if not isinstance(opened, str):
                    opened[0].close()


def _open_all(plan: list[tuple[Job, int]]) -> dict[Job, tuple[socket.socket, int] | str]:
    """Runs inside the source pod's namespace: the sockets stay there."""
    out: dict[Job, tuple[socket.socket, int] | str] = {}
    for job, sport in plan:
        try:
            out[job] = (_open(job, sport), sport)
        except OSError as err:
            out[job] = f"socket: {err}"
    return out


def _open(job: Job, sport: int) -> socket.socket:
    if job.protocol == "SCTP":
        sock = sctpraw.raw_socket()
        sock.setblocking(False)
        return sock
    kind = socket.SOCK_STREAM if job.protocol == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", sport))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _run_all(made: Mapping[Job, tuple[socket.socket, int] | str], timeout: float
                   ) -> dict[Job, tuple[bool, str]]:
    async def one(job: Job, opened: tuple[socket.socket, int] | str
                  ) -> tuple[Job, tuple[bool, str]]:
        if isinstance(opened, str):
            return job, (False, opened)
        try:
            return job, await asyncio.wait_for(_probe(job, *opened), timeout)
        except TimeoutError:
            return job, (False, "timeout")
        except OSError as err:
            return job, (False, errno.errorcode.get(err.errno or 0, str(err)))

    results = await asyncio.gather(*(one(job, opened) for job, opened in made.items()))
    return dict(results)


async def _probe(job: Job, sock: socket.socket, sport: int) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    if job.protocol == "TCP":
        await loop.sock_connect(sock, (job.ip, job.port))
        return True, "connected"
    if job.protocol == "UDP":
        await loop.sock_connect(sock, (job.ip, job.port))
        await loop.sock_sendall(sock, b"probe")
        data = await loop.sock_recv(sock, 2048)
        answer = data.decode(errors="replace").strip()
        return (True, "answered") if answer == job.answer else (False, f"answer {answer!r}")
    tag = int.from_bytes(os.urandom(4), "big") or 1
    await loop.sock_sendto(sock, sctpraw.init(sport, job.port, tag), (job.ip, 0))
    while True:
        data = await loop.sock_recv(sock, 65535)
        got = sctpraw.parse(data)
        if got is None:
            continue
        src, from_port, to_port, vtag, kind, peer_tag = got
        if (src, from_port, to_port, vtag) == (job.ip, job.port, sport, tag) \
                and kind == sctpraw.INIT_ACK:
            with contextlib.suppress(OSError):
                sock.sendto(sctpraw.abort(sport, job.port, peer_tag), (job.ip, 0))
            return True, "init-ack"
        if (src, from_port, to_port, vtag) == (job.ip, job.port, sport, tag) \
                and kind == sctpraw.ABORT:
            return False, "abort"


@dataclass
class Outcome:
    """What a check saw: the tables of its last round and when it matched."""

    tables: dict[Probe, Reachability]
    rounds: int
    seconds: float
    """From the start until the last round ended."""
    matched: bool
    last_round_start: float = 0.0
    """When the last round (the matching one, if any) began: the change was in force by
    then, so this bounds the time from the change to enforcement from above."""

    def report(self, title: str) -> str:
        parts = [f"{title}: {'matched' if self.matched else 'NOT matched'} after "
                 f"{self.rounds} rounds, {self.seconds:.2f} s"]
        for (port, proto), table in self.tables.items():
            if table.wrong() or not self.matched:
                parts.append(table.report(f"{port}/{proto}"))
        return "\n".join(parts)


def check(prober: Prober, targets: Mapping[PodRef, Target],
          expected: Mapping[Probe, Reachability], *, deadline: float,
          timeout: float = 0.5, retry_timeout: float = 1.5,
          max_rounds: int = 50) -> Outcome:
    """Probe every (src, dst) pair on every probe until the observed tables equal the
    expected ones; a new round starts only before ``deadline`` seconds have passed.

    A round probes everything with ``timeout``; the cells expected connected that failed
    are probed once more with ``retry_timeout`` (longer than a SYN retransmission, so one
    lost packet on a loaded machine is not a blocked cell).
    """
    start = time.monotonic()
    rounds = 0
    tables = {p: Reachability(r.pods, dict(r.expected)) for p, r in expected.items()}
    while True:
        rounds += 1
        round_start = time.monotonic() - start
        jobs = [Job(s, d, targets[d].ip, port, proto, targets[d].answer)
                for (port, proto), table in tables.items()
                for s in table.pods for d in table.pods]
        results = prober.probe(jobs, timeout)
        retry = [j for j, (ok, _) in results.items() if not ok and j.src != j.dst
                 and tables[(j.port, j.protocol)].expected.get((j.src, j.dst))]
        if retry:
            results.update(prober.probe(retry, retry_timeout))
        for job, (ok, why) in results.items():
            table = tables[(job.port, job.protocol)]
            table.observed[(job.src, job.dst)] = ok
            table.reasons[(job.src, job.dst)] = why
        matched = not any(t.wrong() for t in tables.values())
        elapsed = time.monotonic() - start
        if matched or elapsed >= deadline or rounds >= max_rounds:
            return Outcome(tables, rounds, elapsed, matched, round_start)


def same(table: Callable[[], Reachability], probes: Iterable[Probe]) -> dict[Probe, Reachability]:
    """The same expected table on several ports/protocols."""
    return {p: table() for p in probes}


# --- the model in a lab -----------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The deployed model: where each pod lives and what answers for it."""

    netns: dict[PodRef, str]
    pod_ips: dict[PodRef, str]
    service_ips: dict[PodRef, str]
    nodes: dict[PodRef, str]

    def pod_targets(self) -> dict[PodRef, Target]:
        return {p: Target(ip, p.name) for p, ip in self.pod_ips.items()}

    def service_targets(self) -> dict[PodRef, Target]:
        return {p: Target(ip, p.name) for p, ip in self.service_ips.items()}


def kubectl(cfg: Any, *args: str, input: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """kubectl as the lab's admin, from the lab's control namespace."""
    from svcnet.lab.k8s import kubectl_argv

    proc = subprocess.run(["ip", "netns", "exec", cfg.control_ns, *kubectl_argv(cfg, *args)],
                          input=input, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {proc.stderr.strip()[-1500:]}")
    return proc


def apply(cfg: Any, docs: Sequence[Mapping[str, Any]]) -> None:
    kubectl(cfg, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                        "items": list(docs)}))


def deploy(cfg: Any, *, timeout: float = 120, protocols: Sequence[str] = PROTOCOLS) -> Model:
    """Apply the model to a lab on the real control plane and wait until every pod is
    Ready and every Service has its endpoint."""
    if not cfg.real_control_plane:
        raise ValueError("the reachability matrix needs a lab on the real control plane "
                         "(--control-plane kubernetes)")
    apply(cfg, manifests(cfg.node_names, protocols))
    deadline = time.monotonic() + timeout
    for ns in NAMESPACES:
        left = max(1.0, deadline - time.monotonic())
        kubectl(cfg, "wait", "-n", ns, "--for=condition=Ready", "pod", "--all",
                f"--timeout={int(left)}s", timeout=left + 15)
    return discover(cfg)


def discover(cfg: Any) -> Model:
    """The deployed model's pods (IPs, nodes, network namespaces) and Service IPs."""
    pods = json.loads(kubectl(cfg, "get", "pods", "-A", "-o", "json").stdout)["items"]
    svcs = json.loads(kubectl(cfg, "get", "services", "-A", "-o", "json").stdout)["items"]
    wanted = set(ALL_PODS)
    ips, nodes = {}, {}
    for pod in pods:
        ref = PodRef(pod["metadata"]["namespace"], pod["metadata"]["name"])
        if ref in wanted and pod.get("status", {}).get("podIP"):
            ips[ref] = pod["status"]["podIP"]
            nodes[ref] = pod["spec"]["nodeName"]
    service_ips = {}
    for svc in svcs:
        for ref in wanted:
            if (svc["metadata"]["namespace"], svc["metadata"]["name"]) == (
                    ref.namespace, service_name(ref)):
                service_ips[ref] = svc["spec"]["clusterIP"]
    from svcnet.lab.cli import target_namespace

    missing = sorted(str(p) for p in wanted if p not in ips or p not in service_ips)
    if missing:
        raise RuntimeError(f"the model is not (fully) deployed: no IP for {missing}; "
                           "run with --deploy")
    netns = {ref: target_namespace(cfg, str(ref)) for ref in ALL_PODS}
    return Model(netns, ips, service_ips, nodes)


def remove_policies(cfg: Any) -> None:
    kubectl(cfg, "delete", "networkpolicies", "--all", "--all-namespaces", "--wait=false")


def policy(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": dict(spec)}


def parse_probe(text: str) -> Probe:
    port, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if not port.isdigit() or proto not in PROTOCOLS:
        raise ValueError(f"{text!r}: expected PORT/PROTOCOL, e.g. 80/TCP, 81/UDP, 80/SCTP")
    return int(port), proto


def show(cfg: Any, *, deploy_model: bool, probes: Sequence[Probe], services: bool,
         timeout: float) -> str:
    """``svcnet lab matrix``: the observed matrix of the model, per port and protocol."""
    model = deploy(cfg) if deploy_model else discover(cfg)
    targets = model.service_targets() if services else model.pod_targets()
    tables = {p: Reachability.all() for p in probes}
    outcome = check(Prober(model.netns), targets, tables, deadline=0, timeout=timeout)
    lines = [f"{len(ALL_PODS)}x{len(ALL_PODS)} pairs x {len(probes)} probes in "
             f"{outcome.seconds:.2f} s ({'Service ClusterIPs' if services else 'pod IPs'}; "
             "rows: from, columns: to; . connected, X blocked)"]
    for (port, proto), table in outcome.tables.items():
        lines += [f"{port}/{proto}:", table.grid("observed")]
    return "\n".join(lines)


def traced(cfg: Any, model: Model, probes: Iterable[Probe]) -> dict[Probe, Reachability]:
    """The verdicts ``svcnet policy trace`` gives for every cell, from the same objects the
    node daemons enforce (listed now), as tables whose ``observed`` is the tracer's answer:
    a test can hold the tracer to what the datapath did."""
    from svcnet.policy.state import compute
    from svcnet.policy.trace import trace

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD

    listed = json.loads(kubectl(cfg, "get", "networkpolicies,pods,namespaces", "-A", "-o",
                                "json").stdout)["items"]
    kinds: dict[str, tuple[Any, list[Any]]] = {
        "NetworkPolicy": (NETWORK_POLICY, []), "Pod": (POD, []), "Namespace": (NAMESPACE, [])}
    for item in listed:
        kind, out = kinds[item["kind"]]
        out.append(kind.convert(item))
    state = compute(kinds["NetworkPolicy"][1], kinds["Pod"][1], kinds["Namespace"][1],
                    node_name=None)
    tables = {}
    for port, proto in probes:
        table = Reachability()
        for s in ALL_PODS:
            for d in ALL_PODS:
                verdict = trace(state, model.pod_ips[s], model.pod_ips[d], proto, port)
                table.observed[(s, d)] = verdict.allowed
                table.reasons[(s, d)] = " / ".join(verdict.explain().splitlines())
        tables[(port, proto)] = table
    return tables
