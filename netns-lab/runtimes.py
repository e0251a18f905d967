"""Real container runtimes (podman, containerd) confined to a throwaway sandbox.

podman and containerd create bridges, firewall rules, network namespaces and mounts in the
namespaces they run in, and keep storage, state and locks under fixed system paths. A
:class:`Sandbox` gives them a network namespace of their own plus a private mount namespace
in which ``/run``, ``/var/lib``, ``/var/tmp`` and ``/dev/shm`` are fresh tmpfs mounts and
``/sys`` is that network namespace's sysfs (with the host's cgroup hierarchies bound back,
which runc needs). A sleeping holder process keeps both namespaces; every command runs in
them through ``nsenter``. Closing the sandbox kills every process in or below it, which
drops all of its mounts; nothing is created in the root namespaces.

Images are built offline from busybox-static: :func:`busybox_rootfs_tar` (for ``podman
import``) and :func:`busybox_docker_archive` (for ``ctr images import``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ping", "nc", "sleep", "ip", "cat", "true", "echo", "ls", "httpd", "hostname",
           "arping", "wget", "ifconfig", "kill", "timeout", "seq")
TMPFS_DIRS = ("/run", "/var/lib", "/var/tmp", "/dev/shm")
# where the runtimes keep state by default: a confined runtime must not create any of them
RUNTIME_PATHS = ("/var/lib/cni", "/var/lib/containers", "/var/lib/containerd", "/run/containers",
                 "/run/containerd", "/run/libpod", "/run/cni", "/opt/containerd",
                 "/etc/cni/net.d", "/var/run/containers", "/dev/shm/libpod_lock")
RUNTIME_PROCESSES = ("podman", "conmon", "containerd", "containerd-shim-runc-v2", "runc", "ctr")

_HOLDER = """
set -e
mount --rbind /sys/fs/cgroup "$SANDBOX_CG"
exec nsenter --net="$SANDBOX_NETNS" sh -c '
set -e
mount -t sysfs sysfs /sys
mount --rbind "$SANDBOX_CG" /sys/fs/cgroup
umount -l "$SANDBOX_CG"
for d in $SANDBOX_TMPFS; do mount -t tmpfs -o mode=755 tmpfs "$d"; done
echo ready > "$SANDBOX_READY"
exec sleep infinity'
"""


class SandboxError(RuntimeError):
    """A command in the sandbox failed; the message carries its output."""


class Sandbox:
    """A network namespace ``name`` and a private mount namespace, both held by one process.

    ``base`` is a directory for the sandbox's own files (it stays visible inside)."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.holder: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        ready = self.base / ".sandbox-ready"
        cgroup = self.base / ".sandbox-cgroup"
        cgroup.mkdir(exist_ok=True)
        env = {**os.environ, "SANDBOX_CG": str(cgroup), "SANDBOX_READY": str(ready),
               "SANDBOX_NETNS": f"/run/netns/{self.name}", "SANDBOX_TMPFS": " ".join(TMPFS_DIRS)}
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", _HOLDER], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                err = self.holder.stderr.read().decode() if self.holder.stderr else ""
                self.close()
                raise SandboxError(f"sandbox {self.name} did not start: {err}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.holder is not None, "sandbox not started"
        return self.holder.pid

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--wd=/", "--", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, check=False,
                              env={**os.environ, **(env or {})})
        if check and proc.returncode != 0:
            raise SandboxError(f"{' '.join(cmd)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()} {proc.stdout.strip()}")
        return proc

    def popen(self, *cmd: str, env: Mapping[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        try:
            return subprocess.Popen(self.argv(cmd), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, env={**os.environ, **(env or {})},
                                    start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def processes(self) -> list[int]:
        """Every process in the sandbox's namespaces, and all their descendants (containers
        run in namespaces of their own, below conmon or the containerd shim)."""
        if self.holder is None:
            return []
        try:
            mine = {os.readlink(f"/proc/{self.pid}/ns/{kind}") for kind in ("mnt", "net")}
        except OSError:
            return []
        parents: dict[int, int] = {}
        inside: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                    parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
                if any(os.readlink(f"/proc/{pid}/ns/{k}") in mine for k in ("mnt", "net")):
                    inside.add(pid)
            except (OSError, IndexError, ValueError):
                continue
        found = set(inside)
        for _ in range(64):  # bounded: process trees are not deeper than this
            more = {p for p, parent in parents.items() if parent in found} - found
            if not more:
                break
            found |= more
        found.discard(os.getpid())
        return sorted(found)

    def close(self) -> None:
        """Kill everything in or below the sandbox, then delete its network namespace."""
        for _ in range(5):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self.holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.holder.wait(10)
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)


@contextlib.contextmanager
def sandbox(name: str, base: Path) -> Iterator[Sandbox]:
    box = Sandbox(name, base)
    box.start()
    try:
        yield box
    finally:
        box.close()


# --- images built offline ---------------------------------------------------------------------


def _rootfs_tar(applets: Iterable[str] = APPLETS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in ("bin", "etc", "tmp", "proc", "sys", "dev", "www"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
        for name in applets:
            info = tarfile.TarInfo(f"bin/{name}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n"), ("www/index.html", "svcnet\n")):
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, 0
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def busybox_rootfs_tar(path: Path) -> Path:
    """A root filesystem tarball: /bin/busybox with its applet links (``podman import``)."""
    path.write_bytes(_rootfs_tar())
    return path


def busybox_docker_archive(path: Path, ref: str, cmd: Sequence[str] = ("sleep", "86400")
                           ) -> Path:
    """A one-layer image in the ``docker save`` layout, named ``ref``, whose default command
    is ``cmd`` (so it can also be a pod's sandbox/pause image): ``ctr images import``."""
    layer = _rootfs_tar()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "svcnet.lab.runtimes"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref],
                            "Layers": ["layer/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, blob in ((config_name, config), ("layer/layer.tar", layer),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, 0
            tar.addfile(info, io.BytesIO(blob))
    return path


# --- podman -----------------------------------------------------------------------------------


class Podman:
    """podman 4.x with the CNI backend, its storage/state/config under ``base``, in ``box``."""

    IMAGE = "localhost/busybox:svcnet"

    def __init__(self, box: Sandbox, base: Path, plugin_dirs: Sequence[str],
                 conf_dir: Path) -> None:
        self.box = box
        self.base = base
        self.conf_dir = conf_dir
        base.mkdir(parents=True, exist_ok=True)
        (base / "tmp").mkdir(exist_ok=True)
        self.conf = base / "containers.conf"
        # podman's default limits (2^20 files, 2^22 processes for root) are above what a
        # confined host (no CAP_SYS_RESOURCE) lets runc set
        nofile = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
        self.conf.write_text(
            "[containers]\n"
            "pids_limit = 0\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f"cni_plugin_dirs = {json.dumps(list(plugin_dirs))}\n"
            f'network_config_dir = "{conf_dir}"\n'
            'default_network = "none"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{base}/events.log"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{base}/tmp"\n'
            f'static_dir = "{base}/storage/libpod"\n'
            f'volume_path = "{base}/storage/volumes"\n'
            "num_locks = 256\n")

    def argv(self, *args: str) -> list[str]:
        # the run root must be short (< 50 characters): the sandbox's private /run
        return ["podman", "--root", str(self.base / "storage"), "--runroot",
                "/run/containers/storage", "--storage-driver", "vfs",
                "--cni-config-dir", str(self.conf_dir), *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 60
                 ) -> subprocess.CompletedProcess[str]:
        return self.box.run(*self.argv(*args), check=check, timeout=timeout,
                            env={"CONTAINERS_CONF": str(self.conf)})

    def import_busybox(self) -> str:
        tar = busybox_rootfs_tar(self.base / "busybox-rootfs.tar")
        self("import", "--change", "CMD=/bin/sh", str(tar), self.IMAGE)
        return self.IMAGE


def root_state() -> dict[str, list[str]]:
    """What a runtime could leave behind in the root namespaces: links, addresses, firewall
    rules, mounts (other than network namespaces other tests name), the runtimes' default
    state paths and runtime processes."""

    def out(*cmd: str) -> list[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        return sorted(line for line in proc.stdout.splitlines()
                      if line.strip() and not line.startswith("#"))

    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = sorted(" ".join(line.split()[3:5]) for line in f
                        if not _test_netns_mount(line.split()[4]))
    files = sorted(f"{path}: {sorted(os.listdir(path)) if os.path.isdir(path) else 'file'}"
                   for path in RUNTIME_PATHS if os.path.lexists(path))
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat",
                                                                encoding="utf-8") as f:
                head, tail = f.read().rsplit(")", 1)
                comm = head.split("(", 1)[1]
                zombie = tail.split()[0] == "Z"  # dead, waiting for init to reap it
                if not zombie and (comm in RUNTIME_PROCESSES or comm.startswith("containerd")):
                    procs.append(f"{entry} {comm}")
    return {"links": [line.split(":", 2)[1].strip() + " " + line.split("link/", 1)[-1]
                      for line in out("ip", "-o", "link")],
            "addrs": [line.replace(" tentative", "") for line in out("ip", "-o", "addr")],
            "nft": [line for line in out("nft", "list", "ruleset") if line.strip() != "}"],
            "iptables": [line for line in out("iptables-save") if not line.startswith(":")],
            "mounts": mounts, "files": files, "processes": sorted(procs)}


def _test_netns_mount(mount_point: str) -> bool:
    """A named network namespace some test made (they come and go), unlike the ones podman
    (``netns-*``) and containerd (``cni-*``) name."""
    for directory in ("/run/netns/", "/var/run/netns/"):
        if mount_point.startswith(directory):
            return not mount_point[len(directory):].startswith(("cni-", "netns-"))
    return False


# --- containerd -------------------------------------------------------------------------------


class Containerd:
    """A containerd daemon (CRI plugin, runc, ``native`` snapshotter) with its root, state and
    sockets under ``base``, in ``box``; CNI from ``cni_bin_dir`` and ``cni_conf_dir``.

    containerd 1.6 takes one CNI binary directory: put every plugin the conflist names in it
    (:meth:`link_plugins`), including ``loopback``, which the CRI plugin runs for ``lo``."""

    SANDBOX_IMAGE = "localhost/busybox:svcnet"
    NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
    DISABLED = ("io.containerd.internal.v1.opt",  # would create /opt/containerd
                "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                "io.containerd.tracing.processor.v1.otlp")

    def __init__(self, box: Sandbox, base: Path, cni_bin_dir: Path, cni_conf_dir: Path) -> None:
        self.box = box
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.address = str(base / "containerd.sock")
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        self.config.write_text(
            "version = 2\n"
            f'root = "{base}/root"\n'
            f'state = "{base}/state"\n'
            f"disabled_plugins = {json.dumps(list(self.DISABLED))}\n"
            f'[grpc]\naddress = "{self.address}"\n'
            f'[ttrpc]\naddress = "{self.address}.ttrpc"\n'
            '[metrics]\naddress = ""\n'
            f"{cri}]\n"
            f'sandbox_image = "{self.SANDBOX_IMAGE}"\n'
            "disable_apparmor = true\n"
            # not below containerd's own: lowering oom_score_adj needs CAP_SYS_RESOURCE
            "restrict_oom_score_adj = true\n"
            "enable_selinux = false\n"
            'stream_server_address = "127.0.0.1"\n'
            'stream_server_port = "0"\n'
            f"{cri}.containerd]\n"
            'snapshotter = "native"\n'
            'default_runtime_name = "runc"\n'
            f"{cri}.containerd.runtimes.runc]\n"
            'runtime_type = "io.containerd.runc.v2"\n'
            f"{cri}.containerd.runtimes.runc.options]\n"
            "SystemdCgroup = false\n"
            f"{cri}.cni]\n"
            f'bin_dir = "{cni_bin_dir}"\n'
            f'conf_dir = "{cni_conf_dir}"\n'
            "max_conf_num = 1\n")

    @staticmethod
    def link_plugins(bin_dir: Path, source: str, names: Iterable[str]) -> None:
        for name in names:
            target = bin_dir / name
            if not target.exists():
                target.symlink_to(os.path.join(source, name))

    def start(self, timeout: float = 60) -> None:
        from .cri import CriClient

        self.proc = self.box.popen("containerd", "--config", str(self.config), log=self.log)
        with CriClient(self.address, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise SandboxError(f"containerd exited: {self.log.read_text()[-2000:]}")
                try:
                    client.version()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise SandboxError(
                            f"containerd did not answer: {self.log.read_text()[-2000:]}"
                        ) from None
                    time.sleep(0.2)

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.box.run("ctr", "--address", self.address, "-n", self.NAMESPACE, *args,
                            timeout=timeout)

    def import_busybox(self) -> str:
        archive = busybox_docker_archive(self.base / "busybox.tar", self.SANDBOX_IMAGE)
        self.ctr("images", "import", "--snapshotter", "native", str(archive))
        return self.SANDBOX_IMAGE

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
