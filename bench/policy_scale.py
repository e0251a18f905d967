"""NetworkPolicy at scale: sync time against the bare ``nft -f``, one label change, memory,
and the datapath cost of 1,000 policies (issue 17).

Workload: ``policy_gen.generate`` -- 10,000 pods over 100 namespaces, 1,000 policies of the
shapes operators write (default deny, same app, tier to tier, namespace selectors, ipBlock
with except, named ports, port ranges, egress to DNS and the internet).

Sync (in a fresh network namespace: the process re-executes itself inside it, as the
daemon runs inside its node's namespace; every pod is on this node, the worst case):
- ``full_sync_s``: the real enforcer of the node component (``svcnet.policy.daemon``),
  fed from an in-memory store through the real informers: one sync (desired state,
  rendering, the ``nft`` transaction) into a namespace without the table. The first at
  start, then ``--repeat`` cold rounds, each on a new enforcer (nothing reused) into a
  fresh namespace. ``floor_s``: the bare ``nft -f`` of exactly the script the first sync
  streamed, into a fresh namespace, right after each sync (same load).
  ``full_sync_ratio``: median of the pairs' ratios (``full_sync_cpu_ratio``: the same with
  CPU seconds, Python + nft against nft, which other jobs disturb less).
  ``warm_full_sync_ratio``: the same for the periodic full sync (the enforcer keeps its
  caches; the whole table goes to a fresh namespace), one per round with its own floor;
- ``one_change_ms``: store write of one pod label change -> the pod's element in
  ``ingress-pods4`` points at its new group in the kernel (polled over netlink every
  0.5 ms: ``nft get element`` loads the whole table first, ~1 s here), run by the
  enforcer's own loop with its default gathering delay; median of ``--changes``;
- ``rss_mb``: peak RSS of that process (enforcer + informers + the memory store holding
  every object; a real node talks to the API server instead); ``store_rss_mb`` once the
  store was filled.

Datapath: two simulated nodes (namespaces on a bridge underlay) running ``svcnet node
--overlay`` (VXLAN) against etcd, one pod each, as ``bench/overlay.py`` builds them. The
cluster gets the two real pods (client on n0, server on n1, allowed by policies on named
ports) and the synthetic pods spread over n0/n1; each node loads the table rendered for
its own pods. Rounds alternate table / no table (A/B, B/A, ...), each measuring:
- iperf3 throughput, one TCP stream, client pod -> server pod (``throughput_ratio`` =
  median of per-round table/no-table ratios);
- new TCP connections per second: one Python client connecting and closing in a loop
  against a listener in the server pod, each connection a new conntrack entry judged by
  the policy (``conn_rate_ratio``, same pairing); ``conn_cpu_efficiency_ratio``: the same
  per CPU second of the client, which carries most of the datapath's work.
Before the rounds it checks that the table enforces: a port no policy allows is refused.

Usage (root): .venv/bin/python bench/policy_scale.py [--quick] [--pods 10000 --policies 1000]
(``--profile FILE``: a cProfile of the label changes' and the cold rounds' syncs, and the
cyclic collections during the changes; ``peak_rss_mb_by_step`` says where the peak was.)
The last line is one JSON object: full_sync_ratio, one_change_ms, rss_mb, throughput_ratio,
conn_rate_ratio, plus the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import errno
import gc
import ipaddress
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import policy_gen
from overlay import NICE, iperf, two_nodes
from svcnet.cni.overlay.testbed import NamespacePool, in_ns

TABLE = ("inet", "svcnet-policy")
IPERF_PORT = 5201
CONN_PORT = 8080
DENIED_PORT = 9099
SERVER_PORTS = (("iperf", IPERF_PORT, "TCP"), ("http", CONN_PORT, "TCP"))


# --- rendering (the real renderer, or a stand-in while it is not there) -----------------------

def render_table(cluster: policy_gen.Cluster, node: str | None) -> str:
    """The ``nft -f`` script for ``node``'s pods (None: every pod)."""
    try:
        from svcnet.policy import nftables, state
    except ImportError:
        return placeholder_table(cluster, node)

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD  # type: ignore[attr-defined]

    desired = state.compute([NETWORK_POLICY.convert(o) for o in cluster.policies],
                            [POD.convert(o) for o in cluster.pods],
                            [NAMESPACE.convert(o) for o in cluster.namespaces], node_name=node)
    return str(nftables.render_full(desired))


def placeholder_table(cluster: policy_gen.Cluster, node: str | None) -> str:
    """Until the renderer lands: a table of the same order of size (isolated pods, allowed
    (src, dst, proto, port) tuples), judged per new connection."""
    local = [p for p in cluster.pods if node is None or p["spec"]["nodeName"] == node]
    ip = lambda p: p["status"]["podIP"]  # noqa: E731
    pair = [p for p in cluster.pods if p["metadata"]["namespace"] == policy_gen.PAIR_NAMESPACE]
    allowed = [f"{ip(pair[0])} . {ip(pair[1])} . tcp . {port}" for _, port, _ in SERVER_PORTS]
    allowed += [f"{ip(a)} . {ip(b)} . tcp . 8080" for a, b in zip(
        cluster.pods, local[::-1], strict=False)][:20_000]
    return "\n".join([
        f"table {' '.join(TABLE)} {{",
        f"  set isolated {{ type ipv4_addr; elements = {{ {', '.join(map(ip, local))} }} }}",
        "  set allowed { type ipv4_addr . ipv4_addr . inet_proto . inet_service;",
        f"    elements = {{ {', '.join(allowed)} }} }}",
        "  chain forward { type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        "    ip daddr != @isolated accept",
        "    ip saddr . ip daddr . meta l4proto . th dport @allowed accept",
        "    drop", "  }", "}", ""])


# --- the kernel, read over netlink (nft's own "get element" loads the whole table first:
# about a second at this size, too slow to poll) ----------------------------------------------

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFT = 10 << 8  # NFNL_SUBSYS_NFTABLES
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_GETGEN = 12, 13, 16
NLA_F_NESTED = 0x8000
NFPROTO_INET = 1


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind) + payload
    return head + b"\0" * (-len(head) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


class Nfnl:
    """Single nf_tables requests over a netlink socket in this process's namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, msg_type: int, family: int, body: bytes) -> tuple[int, bytes]:
        """(message type, or -errno; attributes after the nfgenmsg header)."""
        self.seq += 1
        payload = struct.pack("=BBH", family, 0, 0) + body
        self.sock.send(struct.pack("=IHHII", 16 + len(payload), NFT | msg_type,
                                   NLM_F_REQUEST, self.seq, 0) + payload)
        for _ in range(1000):
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                if seq == self.seq:
                    if kind == NLMSG_ERROR:
                        return struct.unpack_from("=i", data, off + 16)[0], b""
                    return kind, data[off + 20:off + length]
                off += (length + 3) & ~3
        raise RuntimeError("no netlink reply")

    def genid(self) -> int:
        """The ruleset generation: it changes with every committed transaction."""
        kind, body = self._request(NFT_MSG_GETGEN, 0, b"")
        if kind < 0:
            raise OSError(-kind, os.strerror(-kind))
        return int(struct.unpack(">I", _attrs(body)[1])[0])

    def verdict(self, table: str, map_name: str, key: bytes) -> str | None:
        """The verdict an element of a verdict map holds ("goto CHAIN", "accept", ...),
        or None if there is no such element."""
        elem = _attr(1 | NLA_F_NESTED, _attr(1 | NLA_F_NESTED, _attr(1, key)))
        body = (_attr(1, table.encode() + b"\0") + _attr(2, map_name.encode() + b"\0")
                + _attr(3 | NLA_F_NESTED, elem))
        kind, reply = self._request(NFT_MSG_GETSETELEM, NFPROTO_INET, body)
        if kind == -errno.ENOENT:
            return None
        if kind != NFT | NFT_MSG_NEWSETELEM:
            raise OSError(-kind, os.strerror(-kind)) if kind < 0 else RuntimeError(kind)
        elem_attrs = _attrs(_attrs(_attrs(reply)[3])[1])  # LIST_ELEMENTS > LIST_ELEM
        data = _attrs(_attrs(elem_attrs.get(2, b"")).get(2, b""))  # DATA > DATA_VERDICT
        if not data:
            return ""
        code = struct.unpack(">i", data[1])[0]
        chain = data.get(2, b"").rstrip(b"\0").decode()
        return {-3: f"jump {chain}", -4: f"goto {chain}", 1: "accept", 0: "drop",
                -5: "return"}.get(code, str(code))


def ip_key(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


# --- sync: the real enforcer fed by the real informers from a memory store ------------------

NODE = "node-0"


async def inside(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh namespace (see ``main``); every pod is on this node."""
    from proxy_scale import FileRecordingCommands, floor_once, fresh_netns, rss_mb
    from svcnet.policy.daemon import PolicyEnforcer, PolicyOptions
    from svcnet.proxy.commands import SubprocessCommands

    from svcnet.model import POD, kind_named
    from svcnet.store.memory import MemoryStore
    from svcnet.watch import InformerFactory

    cluster = policy_gen.generate(args.pods, args.namespaces, args.policies, nodes=(NODE,),
                                  dual_stack=args.dual_stack)
    shapes = policy_gen.summary(cluster)
    future = copy.deepcopy(cluster)  # relabel() updates the cluster it is given
    changes = [policy_gen.relabel(future, n) for n in range(args.changes)]
    del future
    store = MemoryStore(history=1000)
    for kind_name, obj in cluster.objects():
        await store.put(kind_named(kind_name), obj)
    del cluster  # the store holds the objects, as the API server would
    result: dict[str, Any] = {"store_rss_mb": rss_mb(), "shapes": shapes}
    tmp = tempfile.mkdtemp(prefix="policy-bench-")
    commands = FileRecordingCommands(tmp, args.timeout)

    async def start() -> tuple[PolicyEnforcer, InformerFactory]:
        """A new enforcer (no caches) on new informers, synced with the store."""
        enforcer = PolicyEnforcer(PolicyOptions(
            node_name=NODE, min_sync_period=args.min_sync_period), commands)
        factory = InformerFactory(store)
        enforcer.attach(factory)
        factory.start()
        await factory.wait_for_sync(600)
        return enforcer, factory

    started = time.monotonic()
    enforcer, factory = await start()
    result["informers_synced_s"] = time.monotonic() - started
    nfnl = Nfnl()
    try:
        # 1. The first sync, into this fresh namespace: desired state, rendering, loading.
        first, cpu = await timed_sync(enforcer)
        result["cold_start_s"] = time.monotonic() - started
        result["peak_rss_mb_by_step"] = peaks = {"first sync": rss_mb()}
        full_inputs = list(commands.inputs)
        commands.record_streams = False
        result["state"] = {"isolated_ingress": len(enforcer.state.ingress),
                           "isolated_egress": len(enforcer.state.egress),
                           "groups": len(enforcer.state.groups)}
        result["script_kib"] = sum(os.path.getsize(f) for _, f in full_inputs) >> 10
        floors = [floor_once(full_inputs, "stdin", args.timeout)]
        syncs, cpus = [first], [cpu]
        warm: list[float] = []
        warm_cpus: list[tuple[float, float]] = []
        warm_floors: list[tuple[float | None, float]] = []
        # 2. Rounds of (cold full sync into a fresh namespace, floor), back to back. Cold:
        # a new enforcer, so nothing computed or rendered before is reused.
        for r in range(args.repeat):
            await factory.stop()
            del enforcer, factory
            await asyncio.sleep(0.1)  # the stopped informers' tasks finish unwinding
            gc.collect()  # so the last enforcer's garbage is gone before the next one
            enforcer, factory = await start()
            with fresh_netns("sync") as ns, profiled(
                    f"{args.profile}.cold{r + 1}" if args.profile else "", enforcer):
                commands.inner = SubprocessCommands(netns=ns, timeout=args.timeout)
                took, cpu = await timed_sync(enforcer)
                syncs.append(took)
                cpus.append(cpu)
            peaks[f"cold sync {r + 1}"] = rss_mb()
            floors.append(floor_once(full_inputs, "file" if r % 2 == 0 else "stdin",
                                     args.timeout))
            # ... and a warm one (a periodic full sync: the enforcer keeps its caches, the
            # kernel gets the whole table) into another fresh namespace, with its own floor.
            with fresh_netns("warm") as ns:
                commands.inner = SubprocessCommands(netns=ns, timeout=args.timeout)
                enforcer.applied = None
                took, cpu = await timed_sync(enforcer)
                warm.append(took)
                warm_cpus.append(cpu)
            warm_floors.append(floor_once(full_inputs, "stdin" if r % 2 == 0 else "file",
                                          args.timeout))
        result["full_syncs_s"] = syncs
        result["full_syncs_cpu_s"] = cpus
        result["floors_s"] = [f for f, _ in floors]
        result["floors_cpu_s"] = [c for _, c in floors]
        result["warm_syncs_s"] = warm
        result["warm_syncs_cpu_s"] = warm_cpus
        result["warm_floors_s"] = [f for f, _ in warm_floors]
        result["warm_floors_cpu_s"] = [c for _, c in warm_floors]
        # 3. Back in our namespace, whose table is the first sync's: a periodic full re-sync
        # (caches kept, the table replaced in one transaction).
        commands.inner = SubprocessCommands(timeout=args.timeout)
        enforcer.applied = None
        result["resync_s"], _ = await timed_sync(enforcer)
        # 4. One pod label change at a time: store write -> the pod's element in the kernel
        # points at its new group (polled over netlink every 0.5 ms).
        with profiled(args.profile, enforcer) as collections:
            (result["one_change_all_ms"], result["one_change_tool_ms"],
             result["one_change_cpu_ms"]) = await one_changes(
                args, store, enforcer, commands.returned, changes, nfnl, POD)
        result["one_change_gc"] = collections
        result["rss_mb"] = rss_mb()
        result["breakdown_s"] = breakdown(enforcer)  # after the RSS: it holds a 2nd state
    finally:
        nfnl.close()
        await factory.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@contextlib.contextmanager
def profiled(path: str, enforcer: Any) -> Iterator[dict[str, float]]:
    """With ``path``: cProfile the enforcer's syncs (they run in a worker thread, which a
    profiler enabled on the event loop does not see) and the event loop (informers, store),
    into one file; always: count the cyclic collections meanwhile and their seconds."""
    import cProfile
    import pstats

    collections = {"count": 0, "seconds": 0.0, "gen2": 0}
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections["count"] += 1
            collections["seconds"] += time.perf_counter() - started.pop()
            collections["gen2"] += info.get("generation") == 2

    gc.callbacks.append(on_gc)
    loop_prof = cProfile.Profile() if path else None
    sync_prof = cProfile.Profile() if path else None
    real = enforcer._sync, enforcer._sync_changes

    def wrap(step: Callable[..., None]) -> Callable[..., None]:
        def profiled_step(*a: Any) -> None:
            assert sync_prof is not None
            sync_prof.enable()
            try:
                step(*a)
            finally:
                sync_prof.disable()
        return profiled_step

    if path:
        enforcer._sync, enforcer._sync_changes = (wrap(step) for step in real)
        assert loop_prof is not None
        loop_prof.enable()
    try:
        yield collections
    finally:
        gc.callbacks.remove(on_gc)
        if loop_prof is not None and sync_prof is not None:
            loop_prof.disable()
            enforcer._sync, enforcer._sync_changes = real
            with open(f"{path}.txt", "w") as text:
                stats = pstats.Stats(sync_prof, stream=text)
                stats.add(loop_prof)
                stats.dump_stats(path)
                stats.sort_stats("cumulative").print_stats(50)
                stats.sort_stats("tottime").print_stats(30)


def breakdown(enforcer: Any) -> dict[str, float]:
    """Where a sync's Python time goes (CPU seconds of each step, run once more here)."""
    from svcnet.policy.nftables import full_script, render, update_script
    from svcnet.policy.state import compute

    out: dict[str, float] = {}
    objects = enforcer.snapshot()
    t = time.process_time()
    compute(*objects, node_name=NODE)
    out["compute_cold"] = time.process_time() - t
    t = time.process_time()
    state = enforcer.desired(objects)
    out["compute_memo"] = time.process_time() - t
    t = time.process_time()
    rendered = render(state)
    out["render_cold"] = time.process_time() - t
    t = time.process_time()
    "".join(full_script(rendered))
    out["full_script"] = time.process_time() - t
    t = time.process_time()
    update_script(enforcer.applied, rendered)
    out["update_script_no_change"] = time.process_time() - t
    return out


async def timed_sync(enforcer: Any) -> tuple[float, tuple[float, float]]:
    """(wall seconds, (CPU seconds of this process, of the tools it ran)) of one sync."""
    from proxy_scale import cpu_now

    started, cpu = time.monotonic(), cpu_now()
    if not await enforcer.sync_once():
        raise RuntimeError("policy sync failed (see the log above)")
    after = cpu_now()
    return time.monotonic() - started, (after[0] - cpu[0], after[1] - cpu[1])


async def one_changes(args: argparse.Namespace, store: Any, enforcer: Any,
                      returned: list[float], changes: list[tuple[dict[str, Any], dict[str, Any]]],
                      nfnl: Nfnl, pod_kind: Any, timeout: float = 30
                      ) -> tuple[list[float], list[float], list[float]]:
    """For each (old, new) pod: write it, and have a separate process (``poll_elements``:
    polling here would take the GIL from the enforcer's worker thread every 0.5 ms) poll the
    kernel until the pod's element in ``ingress-pods4`` points at another group; the
    enforcer's own loop does the work. Returns the times (ms) until the kernel had it, until
    nft returned, and the CPU ms of this process and nft meanwhile."""
    from proxy_scale import cpu_now

    poller = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--poll-elements", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert poller.stdin is not None and poller.stdout is not None
    loop_task = asyncio.create_task(enforcer.loop())
    seen: list[float] = []
    tool: list[float] = []
    cpu_ms: list[float] = []
    try:
        first = enforcer.syncs
        deadline = time.monotonic() + timeout
        while enforcer.syncs == first and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the loop's own first sync, before any change
        for old, new in changes:
            await asyncio.sleep(args.min_sync_period + 0.1)
            key = ip_key(new["status"]["podIP"])
            before = nfnl.verdict("svcnet-policy", "ingress-pods4", key)
            if before is None:
                raise RuntimeError(f"pod {old['metadata']['name']} is not isolated")
            poller.stdin.write(json.dumps(
                {"key": key.hex(), "before": before, "timeout": timeout}).encode() + b"\n")
            await poller.stdin.drain()
            if (await poller.stdout.readline()).strip() != b"polling":
                raise RuntimeError("the element poller did not start")
            calls, syncs = len(returned), enforcer.syncs
            cpu = cpu_now()
            wrote = time.monotonic()
            await store.put(pod_kind, new)
            line = await asyncio.wait_for(poller.stdout.readline(), timeout + 10)
            after = cpu_now()
            answer = json.loads(line)
            if answer.get("at") is None:
                raise RuntimeError("the label change never reached the kernel")
            seen.append((answer["at"] - wrote) * 1000)
            cpu_ms.append((after[0] - cpu[0] + after[1] - cpu[1]) * 1000)
            while enforcer.syncs == syncs and time.monotonic() < deadline + timeout:
                await asyncio.sleep(0.001)  # the sync's bookkeeping, after nft returned
            if len(returned) > calls:
                tool.append((returned[calls] - wrote) * 1000)
            want = f"goto {enforcer.state.ingress[new['status']['podIP']]}"
            got = nfnl.verdict("svcnet-policy", "ingress-pods4", key)
            if got != want or answer["verdict"] != want:
                raise RuntimeError(f"kernel has {got!r} for the relabelled pod (first seen "
                                   f"{answer['verdict']!r}), want {want!r} (before: {before!r})")
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        poller.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            poller.kill()
        await poller.wait()
    return seen, tool, cpu_ms


def poll_elements() -> None:
    """``--poll-elements``: per request line (key, verdict before, timeout), say "polling",
    poll every 0.5 ms until the element's verdict differs, and answer with the monotonic
    time it was first seen (CLOCK_MONOTONIC is shared between processes)."""
    nfnl = Nfnl()
    for line in sys.stdin:
        req = json.loads(line)
        key = bytes.fromhex(req["key"])
        deadline = time.monotonic() + req["timeout"]
        print("polling", flush=True)
        answer: dict[str, Any] = {"at": None, "verdict": None}
        while time.monotonic() < deadline:
            got = nfnl.verdict("svcnet-policy", "ingress-pods4", key)
            if got != req["before"]:
                answer = {"at": time.monotonic(), "verdict": got}
                break
            time.sleep(0.0005)
        print(json.dumps(answer), flush=True)


# --- datapath ---------------------------------------------------------------------------------

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

CLIENT = """
import resource, socket, sys, time
address, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
done = failed = 0
start = time.monotonic()
while done < count and time.monotonic() - start < limit:
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect((address, port))
        done += 1
    except OSError:
        failed += 1
        if failed > 20:
            break
    finally:
        c.close()
took = time.monotonic() - start
use = resource.getrusage(resource.RUSAGE_SELF)
print(done, failed, took, use.ru_utime + use.ru_stime)
"""
"""New connections, one after another: connect (SYN, SYN-ACK, ACK: a new conntrack entry,
the policy's verdict), close. Python's per-connection cost is the same in both runs."""


def conn_rate(client: str, address: str, count: int, limit: float) -> tuple[float, float]:
    """Connections per second of one bounded client run, and per CPU second of the client
    (which carries most of the datapath's work: on veths the packets' softirq processing
    runs in the sender's context, see bench/overlay.py), far less disturbed by other jobs."""
    got = in_ns(client, *NICE, sys.executable, "-c", CLIENT, address,
                str(CONN_PORT), str(count), str(limit), timeout=limit + 30)
    done, failed, took, cpu = got.stdout.split()
    if int(failed) > 20 or int(done) == 0:
        raise RuntimeError(f"connection loop failed: {done} made, {failed} failed")
    return int(done) / float(took), int(done) / max(float(cpu), 1e-3)


def reachable(client: str, address: str, port: int, timeout: float = 1.0) -> bool:
    probe = ("import socket, sys\n"
             "try:\n"
             f"    socket.create_connection(('{address}', {port}), timeout={timeout}).close()\n"
             "except OSError:\n    sys.exit(1)\n")
    return in_ns(client, sys.executable, "-c", probe, check=False,
                 timeout=timeout + 20).returncode == 0


@contextlib.contextmanager
def listener(ns: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *NICE, sys.executable, "-c", SERVER,
                             str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"listener on {port} did not start")
        yield
    finally:
        proc.kill()
        proc.wait(10)


def datapath(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    pool = NamespacePool(f"pbd{os.getpid()}")
    tb = None
    try:
        workdir = Path(tempfile.mkdtemp(prefix="policy-bench-"))
        tb, nodes, pods = two_nodes(pool, workdir, "vxlan")
        for p in pods:  # the loop's connections must not run out of local ports
            in_ns(p, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
            in_ns(p, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        client_ip, server_ip = tb.pod_ips[pods[0]], tb.pod_ips[pods[1]]
        cluster = policy_gen.with_pair(
            policy_gen.generate(args.pods, args.namespaces, args.policies,
                                nodes=[n.name for n in nodes]),
            (client_ip, nodes[0].name), (server_ip, nodes[1].name), SERVER_PORTS)
        started = time.monotonic()
        scripts = {n.ns: render_table(cluster, n.name) for n in nodes}
        log(f"datapath: tables rendered for {len(nodes)} nodes in "
            f"{time.monotonic() - started:.1f} s ({sum(map(len, scripts.values())) >> 10} KiB)")

        def table(on: bool) -> float:
            took = 0.0
            for ns, script in scripts.items():
                in_ns(ns, "nft", "delete", "table", *TABLE, check=False)
                if on:
                    t = time.monotonic()
                    got = in_ns(ns, "nft", "-f", "-", input=script, timeout=600, check=False)
                    if got.returncode:
                        raise RuntimeError(f"nft -f of the table failed: {got.stderr[-2000:]}")
                    took += time.monotonic() - t
            return took

        result: dict[str, Any] = {"table_load_s": []}
        with listener(pods[1], CONN_PORT), listener(pods[1], DENIED_PORT):
            result["table_load_s"].append(table(True))
            if not reachable(pods[0], server_ip, CONN_PORT):
                raise RuntimeError("the policies allow client -> server:http, yet it fails")
            if reachable(pods[0], server_ip, DENIED_PORT):
                raise RuntimeError(f"port {DENIED_PORT} is allowed by no policy, yet reachable:"
                                   " the table does not enforce")
            table(False)
            if not reachable(pods[0], server_ip, DENIED_PORT):
                raise RuntimeError("without the table every port must be reachable")
            iperf(pods[0], pods[1], server_ip, 1.0)  # warm-up (neighbours, caches): discarded
            conn_rate(pods[0], server_ip, args.connections, 0.5)
            loaded = False
            samples: dict[bool, dict[str, list[float]]] = {
                on: {"gbps": [], "cpu_s_per_gbit": [], "conn_per_s": [], "conn_per_cpu_s": []}
                for on in (True, False)}
            for i in range(args.rounds):
                for on in ((True, False) if i % 2 == 0 else (False, True)):
                    if on != loaded:  # A/B, B/A: every other switch is none
                        load = table(on)
                        loaded = on
                        if on:
                            result["table_load_s"].append(load)
                    s = iperf(pods[0], pods[1], server_ip, args.seconds)
                    rate, per_cpu = conn_rate(pods[0], server_ip, args.connections,
                                              args.conn_seconds)
                    samples[on]["gbps"].append(s.gbps)
                    samples[on]["cpu_s_per_gbit"].append(s.cpu_s_per_gbit)
                    samples[on]["conn_per_s"].append(rate)
                    samples[on]["conn_per_cpu_s"].append(per_cpu)
                    log(f"  round {i + 1} {'table' if on else 'none '}: {s.gbps:6.2f} Gbit/s "
                        f"{rate:7.0f} conn/s {per_cpu:7.0f} conn/CPU s")
            table(False)
        result["with"] = samples[True]
        result["without"] = samples[False]
        return result
    finally:
        if tb is not None:
            tb.close()
        pool.close()


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y]


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke size: 300 pods, 12 namespaces, 80 policies, short runs")
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of (cold full sync, floor) after the first sync")
    p.add_argument("--changes", type=int, default=7, help="pod label changes timed")
    p.add_argument("--min-sync-period", type=float, default=0.05,
                   help="the enforcer's gathering delay (the daemon's default)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="limit for each kernel tool run, seconds")
    p.add_argument("--rounds", type=int, default=10, help="datapath rounds (A/B each)")
    p.add_argument("--seconds", type=float, default=2.0, help="iperf3 run length")
    p.add_argument("--conn-seconds", type=float, default=2.0,
                   help="length of a connection-rate run")
    p.add_argument("--connections", type=int, default=40_000,
                   help="at most this many connections per connection-rate run")
    p.add_argument("--dual-stack", action="store_true",
                   help="synthetic pods get an IPv6 address too (sync part only)")
    p.add_argument("--profile", default="",
                   help="write a cProfile of the label changes' syncs (worker thread) and the "
                        "event loop meanwhile to this file (the cold rounds' to FILE.coldN), "
                        "with the top functions in FILE.txt")
    p.add_argument("--skip-datapath", action="store_true")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--poll-elements", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.poll_elements:
        poll_elements()
        return 0
    if args.quick:
        args.pods, args.namespaces, args.policies = 300, 12, 80
        args.repeat, args.changes = 1, 3
        args.rounds, args.seconds, args.conn_seconds = 2, 1.0, 0.5
    if os.geteuid() != 0:
        print("bench/policy_scale.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.inside:
        print(json.dumps(asyncio.run(inside(args))))
        return 0
    out: dict[str, Any] = {}
    load = [os.getloadavg()[0]]
    if not args.skip_sync:
        ns = f"svcnet-polbench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, __file__, *sys.argv[1:],
                 "--inside"], capture_output=True, text=True, check=False,
                timeout=args.timeout * (2 * args.repeat + 4) + 600)
        finally:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        out["sync"] = json.loads(proc.stdout.strip().splitlines()[-1])
        load.append(os.getloadavg()[0])
    if not args.skip_datapath:
        out["datapath"] = datapath(args, print)
        load.append(os.getloadavg()[0])
    result = report(args, out)
    result["load_average_max"] = round(max(load), 1)
    print(json.dumps(result))
    return 0


def med(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.median(values), digits) if values else None


def report(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """Print the tables; return the JSON summary (ratios are medians of paired ratios)."""
    result: dict[str, Any] = {
        "pods": args.pods, "namespaces": args.namespaces, "policies": args.policies,
        "full_sync_ratio": None, "one_change_ms": None, "rss_mb": None,
        "throughput_ratio": None, "conn_rate_ratio": None}
    sy = out.get("sync")
    if sy:
        syncs, floors = sy["full_syncs_s"], sy["floors_s"]
        paired = [a / b for a, b in zip(syncs, floors, strict=True) if b]
        cpu_paired = [sum(a) / b for a, b in zip(sy["full_syncs_cpu_s"], sy["floors_cpu_s"],
                                                   strict=True) if b]
        result.update(
            full_sync_ratio=med(paired), full_sync_s=med(syncs), floor_s=med(
                [f for f in floors if f is not None]),
            full_sync_cpu_ratio=med(cpu_paired),
            warm_full_sync_ratio=med([a / b for a, b in zip(
                sy["warm_syncs_s"], sy["warm_floors_s"], strict=True) if b]),
            warm_full_sync_s=med(sy["warm_syncs_s"]),
            one_change_ms=med(sy["one_change_all_ms"], 1), rss_mb=round(sy["rss_mb"], 1),
            store_rss_mb=round(sy["store_rss_mb"], 1),
            one_change_tool_ms=med(sy["one_change_tool_ms"], 1),
            one_change_cpu_ms=med(sy["one_change_cpu_ms"], 1),
            cold_start_s=round(sy["cold_start_s"], 3), resync_s=round(sy["resync_s"], 3),
            script_kib=sy["script_kib"], **sy["state"],
            peak_rss_mb_by_step={k: round(v, 1) for k, v in sy["peak_rss_mb_by_step"].items()})
        print(f"workload: {json.dumps(sy['shapes'])}")
        print(f"desired state for one node holding every pod: {json.dumps(sy['state'])}, "
              f"nft script {sy['script_kib']} KiB")
        print(f"{'cold sync':>10} {'floor':>8} {'ratio':>6} {'warm ratio':>10} {'1 change':>9} "
              f"{'RSS':>7} {'(store)':>8}")
        print(f"{result['full_sync_s']:>9.2f}s {result['floor_s'] or 0:>7.2f}s "
              f"{result['full_sync_ratio'] or 0:>6.2f} "
              f"{result['warm_full_sync_ratio'] or 0:>10.2f} {result['one_change_ms']:>7.1f}ms "
              f"{result['rss_mb']:>5.0f}MB {result['store_rss_mb']:>6.0f}MB")
        print("cold full syncs (a new enforcer: desired state + rendering + nft, into a "
              "namespace without the table), each with the floor (bare nft -f of the same "
              "script) right after:")
        for i, (a, b) in enumerate(zip(syncs, floors, strict=True)):
            ours, tools = sy["full_syncs_cpu_s"][i]
            print(f"  full sync {a:6.2f}s (CPU: Python {ours:5.2f}s + nft {tools:5.2f}s)   "
                  f"floor {b or 0:6.2f}s (CPU {sy['floors_cpu_s'][i]:5.2f}s)   "
                  f"ratio {a / b if b else 0:.2f}")
        print("warm full syncs (a periodic full sync: the enforcer's caches kept, the whole "
              "table into a fresh namespace), each with its own floor:")
        for i, (a, b) in enumerate(zip(sy["warm_syncs_s"], sy["warm_floors_s"], strict=True)):
            ours, tools = sy["warm_syncs_cpu_s"][i]
            print(f"  warm sync {a:6.2f}s (CPU: Python {ours:5.2f}s + nft {tools:5.2f}s)   "
                  f"floor {b or 0:6.2f}s (CPU {sy['warm_floors_cpu_s'][i]:5.2f}s)   "
                  f"ratio {a / b if b else 0:.2f}")
        print(f"informers' initial list {sy['informers_synced_s']:.2f}s; store -> table from a "
              f"cold start {sy['cold_start_s']:.2f}s; periodic full re-sync "
              f"{sy['resync_s']:.2f}s")
        print("Python CPU of a sync's steps (s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sy["breakdown_s"].items()))
        print(f"one label change -> element in the kernel (ms): "
              f"{[round(c, 1) for c in sy['one_change_all_ms']]}; -> nft returned: "
              f"{[round(c, 1) for c in sy['one_change_tool_ms']]}; CPU meanwhile: "
              f"{[round(c, 1) for c in sy['one_change_cpu_ms']]}; cyclic collections "
              f"meanwhile: {sy.get('one_change_gc')}")
    dp = out.get("datapath")
    if dp:
        w, wo = dp["with"], dp["without"]
        result.update(
            throughput_ratio=med(ratios(w["gbps"], wo["gbps"])),
            conn_rate_ratio=med(ratios(w["conn_per_s"], wo["conn_per_s"])),
            gbps_with=med(w["gbps"], 2), gbps_without=med(wo["gbps"], 2),
            conn_per_s_with=med(w["conn_per_s"], 0),
            conn_per_s_without=med(wo["conn_per_s"], 0),
            conn_cpu_efficiency_ratio=med(ratios(w["conn_per_cpu_s"], wo["conn_per_cpu_s"])),
            cpu_efficiency_ratio=med(ratios(wo["cpu_s_per_gbit"], w["cpu_s_per_gbit"])),
            datapath_table_load_s=med(dp["table_load_s"], 2))
        print(f"datapath, pod to pod across VXLAN, {args.rounds} rounds alternating table / "
              f"none; medians (ratio: median of per-round ratios):")
        print(f"{'':14} {'Gbit/s':>8} {'CPU s/Gbit':>11} {'conn/s':>8} {'conn/CPU s':>11}")
        for name, d in ((f"{args.policies} policies", w), ("no table", wo)):
            print(f"{name:14} {med(d['gbps'], 2):>8} {med(d['cpu_s_per_gbit'], 3):>11} "
                  f"{med(d['conn_per_s'], 0):>8.0f} {med(d['conn_per_cpu_s'], 0):>11.0f}")
        print(f"{'ratio':14} {result['throughput_ratio']:>8} "
              f"{result['cpu_efficiency_ratio']:>11} {result['conn_rate_ratio']:>8} "
              f"{result['conn_cpu_efficiency_ratio']:>11}")
        print("(CPU columns: iperf3's own CPU per Gbit, the connecting client's CPU per "
              "connection; ratios > 1 mean the table costs nothing there)")
    return result


if __name__ == "__main__":
    sys.exit(main())
