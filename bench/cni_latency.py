"""ADD/DEL latency of svcnet-cni against the reference bridge + host-local, in one run.

Each plugin gets its own throwaway host namespace (bridge, rules) and pod namespace; cycles
alternate between the plugins so drift on the shared machine hits both alike. The plugin
processes enter the host namespace in the forked child before exec, so no ``ip netns exec``
overhead is measured. Variants: ``svcnet`` is the launcher ``svcnet cni install`` writes
(the deployed form); ``svcnet-console`` is pip's console-script wrapper, shown for reference.

Usage (root): .venv/bin/python bench/cni_latency.py [--cycles 40] [--ip-masq]
The last line is JSON: svcnet_add_p50_ms, ref_add_p50_ms, add_ratio, svcnet_del_p50_ms,
ref_del_p50_ms, del_ratio (plus the console-script and p95 figures).
"""

from __future__ import annotations

import argparse
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

from svcnet.cni.cli import choose_python, fast_path_client, launcher_text
from svcnet.cni.netns import setns

REFERENCE_DIR = "/usr/lib/cni"


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
    _server: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        for ns in (self.host, self.pod):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        self._host_fd = os.open(f"/var/run/netns/{self.host}", os.O_RDONLY)
        if self.server_socket:
            svcnet = os.path.join(os.path.dirname(sys.executable), "svcnet")
            self._server = subprocess.Popen(["ip", "netns", "exec", self.host, svcnet, "cni",
                                             "serve", "--socket", self.server_socket])
            for _ in range(200):
                if os.path.exists(self.server_socket):
                    break
                time.sleep(0.05)

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
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}")
    with tempfile.TemporaryDirectory(prefix="cni-bench-") as tmpdir:
        tmp = Path(tmpdir)
        bindir = tmp / "bin"
        bindir.mkdir()
        launcher = bindir / "svcnet-cni"
        python = choose_python()
        launcher.write_text(launcher_text(python))
        launcher.chmod(0o755)
        console = shutil.which("svcnet-cni", path=os.path.dirname(sys.executable))
        subjects = [Subject("svcnet", str(launcher), "host-local", "s", tmp, args.ip_masq, 0),
                    Subject("reference", f"{REFERENCE_DIR}/bridge", "host-local", "r", tmp,
                            args.ip_masq, 1)]
        fast = Subject("svcnet-fastpath", str(bindir / "fast" / "svcnet-cni"), "host-local",
                       "f", tmp, args.ip_masq, 3)
        (bindir / "fast").mkdir()
        fast.server_socket = str(tmp / "cni.sock")
        Path(fast.binary).write_text(fast_path_client(str(launcher), fast.server_socket,
                                                      shutil.which("socat") or "socat"))
        Path(fast.binary).chmod(0o755)
        if shutil.which("socat"):
            subjects.append(fast)
        if console:
            subjects.append(Subject("svcnet-console", console, "host-local", "c", tmp,
                                    args.ip_masq, 2))
        try:
            for s in subjects:
                s.setup()
            for n in range(args.warmup + args.cycles):
                order = subjects if n % 2 == 0 else list(reversed(subjects))
                for s in order:
                    s.cycle(n)
            for s in subjects:
                for series in (s.add_ms, s.del_ms, s.add_cpu, s.del_cpu):
                    del series[:args.warmup]
        finally:
            for s in subjects:
                s.teardown()
    print(f"svcnet launcher interpreter: {python}")
    print(f"{'plugin':16} {'ADD p50':>9} {'ADD p95':>9} {'DEL p50':>9} {'DEL p95':>9} "
          f"{'ADD cpu':>9} {'DEL cpu':>9}  (ms, {args.cycles} cycles, ipMasq={args.ip_masq}, "
          f"load {os.getloadavg()[0]:.1f})")
    stats = {}
    for s in subjects:
        stats[s.label] = {"add50": statistics.median(s.add_ms),
                          "add95": percentile(s.add_ms, 0.95),
                          "del50": statistics.median(s.del_ms),
                          "del95": percentile(s.del_ms, 0.95),
                          "addcpu": statistics.median(s.add_cpu),
                          "delcpu": statistics.median(s.del_cpu)}
        st = stats[s.label]
        print(f"{s.label:16} {st['add50']:9.1f} {st['add95']:9.1f} {st['del50']:9.1f} "
              f"{st['del95']:9.1f} {st['addcpu']:9.1f} {st['delcpu']:9.1f}")
    ours, ref = stats["svcnet"], stats["reference"]
    result = {
        "svcnet_add_p50_ms": round(ours["add50"], 2), "ref_add_p50_ms": round(ref["add50"], 2),
        "add_ratio": round(ours["add50"] / ref["add50"], 3),
        "svcnet_del_p50_ms": round(ours["del50"], 2), "ref_del_p50_ms": round(ref["del50"], 2),
        "del_ratio": round(ours["del50"] / ref["del50"], 3),
        "svcnet_add_p95_ms": round(ours["add95"], 2), "ref_add_p95_ms": round(ref["add95"], 2),
        "svcnet_del_p95_ms": round(ours["del95"], 2), "ref_del_p95_ms": round(ref["del95"], 2),
        "svcnet_add_cpu_ms": round(ours["addcpu"], 2), "ref_add_cpu_ms": round(ref["addcpu"], 2),
        "svcnet_del_cpu_ms": round(ours["delcpu"], 2), "ref_del_cpu_ms": round(ref["delcpu"], 2),
        "load": round(os.getloadavg()[0], 2), "ip_masq": args.ip_masq, "cycles": args.cycles,
        "python": python,
    }
    if "svcnet-fastpath" in stats:
        fp = stats["svcnet-fastpath"]
        result["fastpath_add_p50_ms"] = round(fp["add50"], 2)
        result["fastpath_add_ratio"] = round(fp["add50"] / ref["add50"], 3)
        result["fastpath_del_p50_ms"] = round(fp["del50"], 2)
        result["fastpath_del_ratio"] = round(fp["del50"] / ref["del50"], 3)
    if "svcnet-console" in stats:
        result["console_script_add_p50_ms"] = round(stats["svcnet-console"]["add50"], 2)
    print(f"ratio svcnet/reference: ADD {result['add_ratio']:.2f}x, DEL {result['del_ratio']:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
