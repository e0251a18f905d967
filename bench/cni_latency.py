"""ADD/DEL latency of svcnet-cni against the reference bridge + host-local, in one run.

Each plugin gets its own throwaway host namespace (bridge, rules) and pod namespace; cycles
alternate between the plugins so drift on the shared machine hits both alike. The plugin
processes enter the host namespace in the forked child before exec, so no ``ip netns exec``
overhead is measured. Rows:

* ``svcnet`` -- the default deployment: what ``svcnet cni install`` writes (the Perl socket
  client) with ``svcnet node --cni-server`` serving that host namespace. Its CPU column is the
  client's; ``server cpu`` is the daemon's CPU per operation (mean over the run).
* ``svcnet-inprocess`` -- ``svcnet cni install --no-fast-path`` (the Python launcher alone).
* ``svcnet-fallback`` -- the default client when no daemon listens (Perl, then the launcher).
* ``svcnet-console`` (``--console``) -- pip's console-script wrapper, for reference.

A second table times whole ``podman run --rm`` calls (Debian's podman 4.3, runc, CNI backend,
in a :class:`svcnet.lab.runtimes.Sandbox`) on three networks, alternating: ``svcnet`` (the
installed client with ``svcnet node`` serving), ``svcnet-inprocess`` and ``reference``
(bridge + host-local). ``--podman-runs 0`` skips it.

Usage (root): .venv/bin/python bench/cni_latency.py [--cycles 40] [--ip-masq] [--console]
              [--podman-runs 15]
The last line is JSON: svcnet_add_p50_ms, ref_add_p50_ms, add_ratio, svcnet_del_p50_ms,
ref_del_p50_ms, del_ratio (svcnet = the default deployment), plus the other rows' figures,
and podman_run_ms ({svcnet, svcnet_inprocess, reference}: medians) with podman_run_ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from svcnet.cni.cli import choose_python, launcher_text, socket_client
from svcnet.cni.netns import setns

REFERENCE_DIR = "/usr/lib/cni"
BUSY_DAEMON = """
import sys, threading
def spin():
    while True:
        sum(i * i for i in range(10000))
threading.Thread(target=spin, daemon=True).start()
from svcnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Subject:
    def __init__(self, label: str, binary: str, ipam_type: str, tag: str, tmp: Path,
                 ip_masq: bool, index: int) -> None:
        self.label = label
        self.binary = binary
        self.host = f"bench{os.getpid()}h{tag}"
        self.pod = f"bench{os.getpid()}p{tag}"
        self.conf = json.dumps({
            "cniVersion": "1.0.0", "name": f"bench{tag}", "type": os.path.basename(binary),
            "bridge": "cni0", "isGateway": True, "ipMasq": ip_masq,
            "ipam": {"type": ipam_type, "dataDir": str(tmp / f"ipam-{tag}"),
                     "ranges": [[{"subnet": f"10.{200 + index}.0.0/16"}]]}}).encode()
        self.add_ms: list[float] = []
        self.del_ms: list[float] = []
        self.add_cpu: list[float] = []
        self.del_cpu: list[float] = []
        self.path = f"{REFERENCE_DIR}:{os.path.dirname(binary)}"

    server_socket = ""
    busy_daemon = False
    _server: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        for ns in (self.host, self.pod):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        self._host_fd = os.open(f"/var/run/netns/{self.host}", os.O_RDONLY)
        if self.server_socket:
            node = ["node", "--cni-server", "--cni-server-socket", self.server_socket]
            if self.busy_daemon:  # a component hogging the GIL in the same daemon process
                command = [sys.executable, "-c", BUSY_DAEMON, *node]
            else:
                command = [os.path.join(os.path.dirname(sys.executable), "svcnet"), *node]
            self._server = subprocess.Popen(["ip", "netns", "exec", self.host, *command])
            for _ in range(400):
                if os.path.exists(self.server_socket):
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("svcnet node did not create its CNI socket")

    def server_cpu_ms(self) -> float:
        """CPU time the daemon and its serving child have used so far (user + system, all
        threads, and the ``nft`` processes they waited for)."""
        if self._server is None:
            return 0.0
        pid = self._server.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [pid, *(int(p) for p in f.read().split())]
        ticks = 0
        for p in pids:
            with open(f"/proc/{p}/stat") as f:
                ticks += sum(int(v) for v in f.read().rpartition(")")[2].split()[11:15])
        return ticks * 1000 / os.sysconf("SC_CLK_TCK")

    def teardown(self) -> None:
        if self._server is not None:
            self._server.terminate()
            self._server.wait(10)
        for ns in (self.host, self.pod):
            subprocess.run(["ip", "netns", "delete", ns], check=False)

    def invoke(self, command: str, cid: str) -> tuple[float, float]:
        """(wall ms, CPU ms of the plugin and its children)."""
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
               "CNI_NETNS": f"/var/run/netns/{self.pod}", "CNI_PATH": self.path,
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        fd = self._host_fd
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([self.binary], input=self.conf, env=env, capture_output=True,
                              preexec_fn=lambda: setns(fd), check=False)
        elapsed = (time.perf_counter() - start) * 1000
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = ((cpu_after.ru_utime - cpu_before.ru_utime)
               + (cpu_after.ru_stime - cpu_before.ru_stime)) * 1000
        if proc.returncode:
            raise SystemExit(f"{self.label} {command} failed: {proc.stdout!r} {proc.stderr!r}")
        return elapsed, cpu

    def cycle(self, n: int) -> None:
        cid = f"bench{n:05d}"
        wall, cpu = self.invoke("ADD", cid)
        self.add_ms.append(wall)
        self.add_cpu.append(cpu)
        wall, cpu = self.invoke("DEL", cid)
        self.del_ms.append(wall)
        self.del_cpu.append(cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ip-masq", action="store_true")
    parser.add_argument("--console", action="store_true",
                        help="also measure pip's console-script wrapper (slow)")
    parser.add_argument("--busy-daemon", action="store_true",
                        help="run a CPU-bound Python thread inside the serving daemon (worst "
                             "case of a busy proxy/DNS sharing its GIL)")
    parser.add_argument("--podman-runs", type=int, default=15,
                        help="podman run --rm per network (0: skip the podman table)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    for tool in ("ip", "nft", "perl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}")
    with tempfile.TemporaryDirectory(prefix="cni-bench-") as tmpdir:
        tmp = Path(tmpdir)
        python = choose_python()

        def install(name: str, text: str) -> str:
            directory = tmp / name
            directory.mkdir()
            binary = directory / "svcnet-cni"
            binary.write_text(text)
            binary.chmod(0o755)
            return str(binary)

        launcher = install("inprocess", launcher_text(python))
        default = Subject("svcnet", install("default", socket_client(
            launcher, str(tmp / "cni.sock"))), "host-local", "s", tmp, args.ip_masq, 0)
        default.server_socket = str(tmp / "cni.sock")
        default.busy_daemon = args.busy_daemon
        subjects = [default,
                    Subject("reference", f"{REFERENCE_DIR}/bridge", "host-local", "r", tmp,
                            args.ip_masq, 1),
                    Subject("svcnet-inprocess", launcher, "host-local", "i", tmp, args.ip_masq,
                            2),
                    Subject("svcnet-fallback", install("fallback", socket_client(
                        launcher, str(tmp / "absent.sock"))), "host-local", "f", tmp,
                        args.ip_masq, 3)]
        console = shutil.which("svcnet-cni", path=os.path.dirname(sys.executable))
        if args.console and console:
            subjects.append(Subject("svcnet-console", console, "host-local", "c", tmp,
                                    args.ip_masq, 4))
        server_cpu = 0.0
        try:
            for s in subjects:
                s.setup()
            for n in range(args.warmup + args.cycles):
                if n == args.warmup:
                    server_cpu = -default.server_cpu_ms()
                order = subjects if n % 2 == 0 else list(reversed(subjects))
                for s in order:
                    s.cycle(n)
            server_cpu += default.server_cpu_ms()
            for s in subjects:
                for series in (s.add_ms, s.del_ms, s.add_cpu, s.del_cpu):
                    del series[:args.warmup]
        finally:
            for s in subjects:
                s.teardown()
    server_cpu_per_op = server_cpu / (2 * args.cycles)
    load = os.getloadavg()[0]
    print(f"svcnet launcher interpreter: {python}; svcnet = socket client + svcnet node")
    print(f"{'plugin':17} {'ADD p50':>8} {'ADD p95':>8} {'DEL p50':>8} {'DEL p95':>8} "
          f"{'ADD cpu':>8} {'DEL cpu':>8}  (ms, {args.cycles} cycles, ipMasq={args.ip_masq}, "
          f"load {load:.1f})")
    stats = {}
    for s in subjects:
        stats[s.label] = {"add50": statistics.median(s.add_ms),
                          "add95": percentile(s.add_ms, 0.95),
                          "del50": statistics.median(s.del_ms),
                          "del95": percentile(s.del_ms, 0.95),
                          "addcpu": statistics.median(s.add_cpu),
                          "delcpu": statistics.median(s.del_cpu)}
        st = stats[s.label]
        print(f"{s.label:17} {st['add50']:8.1f} {st['add95']:8.1f} {st['del50']:8.1f} "
              f"{st['del95']:8.1f} {st['addcpu']:8.1f} {st['delcpu']:8.1f}")
    print(f"server cpu per ADD or DEL (svcnet node, mean): {server_cpu_per_op:.1f} ms")
    ours, ref = stats["svcnet"], stats["reference"]
    result: dict[str, object] = {
        "svcnet_add_p50_ms": round(ours["add50"], 2), "ref_add_p50_ms": round(ref["add50"], 2),
        "add_ratio": round(ours["add50"] / ref["add50"], 3),
        "svcnet_del_p50_ms": round(ours["del50"], 2), "ref_del_p50_ms": round(ref["del50"], 2),
        "del_ratio": round(ours["del50"] / ref["del50"], 3),
        "svcnet_add_p95_ms": round(ours["add95"], 2), "ref_add_p95_ms": round(ref["add95"], 2),
        "svcnet_del_p95_ms": round(ours["del95"], 2), "ref_del_p95_ms": round(ref["del95"], 2),
        "svcnet_add_cpu_ms": round(ours["addcpu"], 2), "ref_add_cpu_ms": round(ref["addcpu"], 2),
        "svcnet_del_cpu_ms": round(ours["delcpu"], 2), "ref_del_cpu_ms": round(ref["delcpu"], 2),
        "server_cpu_per_op_ms": round(server_cpu_per_op, 2),
        "load": round(load, 2), "ip_masq": args.ip_masq, "busy_daemon": args.busy_daemon,
        "cycles": args.cycles,
        "python": python,
    }
    for label, key in (("svcnet-inprocess", "inprocess"), ("svcnet-fallback", "fallback"),
                       ("svcnet-console", "console_script")):
        if label in stats:
            st = stats[label]
            result[f"{key}_add_p50_ms"] = round(st["add50"], 2)
            result[f"{key}_add_ratio"] = round(st["add50"] / ref["add50"], 3)
            result[f"{key}_del_p50_ms"] = round(st["del50"], 2)
            result[f"{key}_del_ratio"] = round(st["del50"] / ref["del50"], 3)
    print(f"ratio svcnet/reference: ADD {result['add_ratio']:.2f}x, DEL "
          f"{result['del_ratio']:.2f}x (in-process: ADD {result['inprocess_add_ratio']:.2f}x, "
          f"DEL {result['inprocess_del_ratio']:.2f}x)")
    if args.podman_runs > 0:
        if shutil.which("podman") is None:
            raise SystemExit("needs podman (or --podman-runs 0)")
        runs = podman_runs(args.podman_runs, python)
        print(f"{'podman run --rm':17} {'p50':>8} {'p95':>8}  (ms, {args.podman_runs} runs)")
        for label, values in runs.items():
            print(f"{label:17} {statistics.median(values):8.1f} {percentile(values, 0.95):8.1f}")
        result["podman_run_ms"] = {label.replace("-", "_"): round(statistics.median(v), 1)
                                   for label, v in runs.items()}
        result["podman_run_ratio"] = round(
            statistics.median(runs["svcnet"]) / statistics.median(runs["reference"]), 3)
        result["podman_runs"] = args.podman_runs
    print(json.dumps(result))
    return 0


def podman_runs(runs: int, python: str) -> dict[str, list[float]]:
    """Wall time of ``podman run --rm IMAGE true`` per network, alternating networks."""
    from svcnet.lab.runtimes import Podman, Sandbox

    from svcnet.cli import main as svcnet_main

    with tempfile.TemporaryDirectory(prefix="cni-bench-podman-") as tmpdir:
        tmp = Path(tmpdir)
        bindir, confdir, sock = tmp / "bin", tmp / "net.d", tmp / "cni.sock"
        with contextlib.redirect_stdout(io.StringIO()):
            svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", "",
                         "--socket", str(sock), "--python", python])
        confdir.mkdir()
        ipam = {"type": "host-local", "dataDir": str(tmp / "ipam")}
        networks = {
            "svcnet": ("svcnet-cni", "cnib0", "10.89.70.0/24"),
            "svcnet-inprocess": ("svcnet-cni-inprocess", "cnib1", "10.89.71.0/24"),
            "reference": ("bridge", "cnib2", "10.89.72.0/24")}
        for name, (kind, bridge, subnet) in networks.items():
            conflist = {"cniVersion": "1.0.0", "name": name, "plugins": [
                {"type": kind, "bridge": bridge, "isGateway": True, "isDefaultGateway": True,
                 "ipam": dict(ipam, ranges=[[{"subnet": subnet}]])}]}
            (confdir / f"{name}.conflist").write_text(json.dumps(conflist))
        box = Sandbox(f"bench{os.getpid()}podman", tmp / "box")
        box.start()
        try:
            podman = Podman(box, tmp / "podman", [str(bindir), REFERENCE_DIR], confdir)
            podman.import_busybox()
            daemon = box.popen(os.path.join(os.path.dirname(sys.executable), "svcnet"), "node",
                               "--cni-server", "--cni-server-socket", str(sock))
            deadline = time.monotonic() + 20
            while box.run("test", "-S", str(sock), check=False).returncode != 0:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("svcnet node did not serve its CNI socket")
                time.sleep(0.1)
            times: dict[str, list[float]] = {name: [] for name in networks}
            for n in range(runs + 1):  # the first round warms caches and makes the bridges
                order = list(networks) if n % 2 == 0 else list(reversed(networks))
                for name in order:
                    start = time.perf_counter()
                    podman("run", "--rm", "--network", name, Podman.IMAGE, "true")
                    if n:
                        times[name].append((time.perf_counter() - start) * 1000)
            return times
        finally:
            box.close()


if __name__ == "__main__":
    sys.exit(main())
