"""The lab's long-running processes (etcd, node daemons, kubelets, controller), by name.

Each is recorded as ``procs/<name>.json`` with its namespace, argv and the kernel's start
time of its pid, so a restart reuses the same command line and a stale pid (reused by
another program after a crash) is never signalled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from svcnet.lab.netns import Kernel, alive, kill_pids


@dataclass(frozen=True)
class ProcRecord:
    name: str
    ns: str
    argv: tuple[str, ...]
    pid: int
    start_time: str
    mount_ns: bool
    env: dict[str, str]


def start_time_of(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


class Procs:
    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.dir = lab_dir / "procs"

    def start(self, kernel: Kernel, name: str, ns: str, argv: list[str], *,
              env: dict[str, str] | None = None, mount_ns: bool = True) -> ProcRecord:
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = kernel.spawn(ns, argv, self.lab_dir / "logs" / f"{name}.log", env=env,
                           mount_ns=mount_ns)
        rec = ProcRecord(name, ns, tuple(argv), pid, start_time_of(pid), mount_ns, env or {})
        tmp = self.dir / f"{name}.json.tmp"
        tmp.write_text(json.dumps(asdict(rec)))
        tmp.replace(self.dir / f"{name}.json")
        return rec

    def get(self, name: str) -> ProcRecord | None:
        try:
            data = json.loads((self.dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        data["argv"] = tuple(data["argv"])
        return ProcRecord(**data)

    def all(self) -> list[ProcRecord]:
        if not self.dir.is_dir():
            return []
        recs = [self.get(p.name.removesuffix(".json")) for p in sorted(self.dir.glob("*.json"))]
        return [r for r in recs if r is not None]

    def running(self, rec: ProcRecord) -> bool:
        return alive(rec.pid) and start_time_of(rec.pid) == rec.start_time

    def stop(self, name: str, *, grace: float = 2.0, signal_kill: bool = False) -> None:
        """Stop a process (SIGTERM then SIGKILL after ``grace``; SIGKILL at once if asked)."""
        rec = self.get(name)
        if rec is not None and self.running(rec):
            kill_pids([rec.pid], grace=0.0 if signal_kill else grace)

    def restart(self, kernel: Kernel, name: str, *, signal_kill: bool = False) -> ProcRecord:
        rec = self.get(name)
        if rec is None:
            raise KeyError(f"no process named {name}")
        self.stop(name, signal_kill=signal_kill)
        return self.start(kernel, name, rec.ns, list(rec.argv), env=rec.env,
                          mount_ns=rec.mount_ns)
