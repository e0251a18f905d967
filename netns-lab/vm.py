"""Run commands (usually a pytest selection) inside a QEMU VM booting a stock Debian kernel.

Why: the host kernel has no IP_VS (and no ``dummy``), so the IPVS backend is tested in a guest
whose kernel has them. virtme-ng boots that kernel with the host's own filesystem as a
read-only root (writable overlays on /tmp, /etc, /var ...), so the guest sees this checkout
and its ``.venv`` at the same paths and nothing has to be installed into an image.

Kernel: Debian's ``linux-image-<version>-amd64`` fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` into ``CACHE_DIR/<version>`` (plus ``depmod``). Nothing is written
to the host's ``/lib/modules``: virtme-ng finds the modules next to the unpacked vmlinuz, and
inside the guest only it mounts a tmpfs on ``/lib/modules`` with a symlink
``/lib/modules/<version>`` -> the cache, so ``modprobe`` works in the guest while the host
stays untouched. The cache lives under /var/lib, not /var/cache, because virtme-ng masks
/var/cache with an empty tmpfs in the guest.

Results: the guest's console drops the first bytes of output now and then, so the command's
output and exit code are written to a per-run directory shared read-write with the guest
(``--rwdir``) and read back from there, never parsed from the console.

Acceleration: KVM is tried first when ``/dev/kvm`` exists; if the guest never started (under
nested virtualisation QEMU aborts on an MSR write) the run is repeated with software emulation.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SVCNET_VM_CACHE", "/var/lib/svcnet-vm"))
META_PACKAGE = "linux-image-amd64"
IN_VM_ENV = "SVCNET_IN_VM"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 600.0
# KVM under nested virtualisation may hang instead of failing: fall back if no start by then.
KVM_BOOT_TIMEOUT = 45.0
FORWARDED_ENV = ("CI", "PYTEST_ADDOPTS", "SVCNET_DEBUG")


class VmError(RuntimeError):
    """The VM could not be prepared or booted (as opposed to the command failing inside)."""


def in_vm() -> bool:
    """True inside a guest started by this runner (the runner sets ``SVCNET_IN_VM=1``)."""
    return os.environ.get(IN_VM_ENV) == "1"


@dataclass(frozen=True)
class VmKernel:
    """An unpacked Debian kernel package: ``root`` holds boot/ and lib/modules/<version>."""

    version: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


@dataclass(frozen=True)
class VmResult:
    """What happened in the guest: the command's exit code and combined output."""

    returncode: int
    output: str
    accelerator: str
    seconds: float
    console: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def resolve_kernel_version(meta: str = META_PACKAGE) -> str:
    """The kernel version Debian's meta package currently points at, e.g. ``6.1.0-56-amd64``."""
    out = _run(["apt-cache", "depends", meta])
    match = re.search(r"Depends:\s+linux-image-(\S+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise VmError(f"cannot resolve {meta} with apt-cache (run apt-get update?): "
                      f"{out.stderr.strip()}")
    return match.group(1)


def cached_kernels(cache: Path = CACHE_DIR) -> list[VmKernel]:
    found = [VmKernel(p.name, p) for p in sorted(cache.glob("*-amd64")) if p.is_dir()]
    return [k for k in found if k.vmlinuz.exists() and (k.moddir / "modules.dep").exists()]


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Serialises fetches: several test processes may ask for the same kernel at once."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_kernel(version: str | None = None, cache: Path = CACHE_DIR) -> VmKernel:
    """Return an unpacked kernel, downloading it once. Without a version: Debian's current one,
    or the newest cached one when apt cannot answer (offline)."""
    if version is None:
        try:
            try:
                version = resolve_kernel_version()
            except VmError:  # no package lists yet (fresh machine): fetch them once
                _run(["apt-get", "update", "-qq"])
                version = resolve_kernel_version()
        except VmError:
            cached = cached_kernels(cache)
            if not cached:
                raise
            return cached[-1]
    kernel = VmKernel(version, cache / version)
    if kernel.vmlinuz.exists() and (kernel.moddir / "modules.dep").exists():
        return kernel
    with _cache_lock(cache):
        if kernel.vmlinuz.exists() and (kernel.moddir / "modules.dep").exists():
            return kernel
        package = f"linux-image-{version}"
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            work = Path(tmp)
            got = _run(["apt-get", "download", "-q", package], cwd=work)
            if got.returncode != 0:  # stale package lists: refresh once and retry
                _run(["apt-get", "update", "-qq"])
                got = _run(["apt-get", "download", "-q", package], cwd=work)
            debs = list(work.glob(f"{package}_*.deb"))
            if got.returncode != 0 or not debs:
                raise VmError(f"apt-get download {package} failed: {got.stderr.strip()}")
            unpacked = work / "root"
            _check(_run(["dpkg", "-x", str(debs[0]), str(unpacked)]), "dpkg -x")
            _check(_run(["depmod", "-a", "-b", str(unpacked), version]), "depmod")
            if kernel.root.exists():
                shutil.rmtree(kernel.root)
            unpacked.rename(kernel.root)
    return kernel


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        raise VmError(f"{what} failed ({done.returncode}): {done.stderr.strip()}")


def _tool_path() -> str:
    """PATH for vng: it runs ``virtme-run`` from PATH, which lives next to our interpreter."""
    bindir = str(Path(sys.executable).parent)
    return os.pathsep.join([bindir, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])


def prerequisites() -> list[str]:
    """What is missing to boot a VM here (empty when everything is in place)."""
    missing = []
    path = _tool_path()
    for tool in ("vng", "virtme-run", "qemu-system-x86_64", "apt-get", "dpkg", "depmod"):
        if shutil.which(tool, path=path) is None:
            missing.append(tool)
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _guest_script(command: str, rundir: Path, cwd: Path, env: Mapping[str, str]) -> str:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return "\n".join([
        "#!/bin/sh",
        f"R={shlex.quote(str(rundir))}",
        'echo started > "$R/started"',
        f"export {exports}",
        f"cd {shlex.quote(str(cwd))} || exit 90",
        f'( {command} ) > "$R/output" 2>&1',
        'echo $? > "$R/rc"',
        "sync",
        "",
    ])


def _kvm_memo(cache: Path = CACHE_DIR) -> Path:
    """Where we remember that KVM failed on this host kernel, to skip the attempt next time."""
    return cache / f".kvm-broken-{os.uname().release}"


def _kvm_candidate() -> bool:
    if _kvm_memo().exists():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def run_in_vm(command: str, *, kernel: VmKernel | None = None, kvm: bool | None = None,
              timeout: float = DEFAULT_TIMEOUT, memory: str = "2G", cpus: int = 2,
              cwd: Path = PROJECT_ROOT, env: Mapping[str, str] | None = None) -> VmResult:
    """Boot the kernel, run ``command`` with /bin/sh in ``cwd`` as root, return its result.

    ``kvm=None`` tries KVM and falls back to software emulation if the guest never started.
    Raises VmError when no guest could be booted at all, or on timeout.
    """
    missing = prerequisites()
    if missing:
        raise VmError(f"VM runner needs: {', '.join(missing)}")
    kernel = kernel or ensure_kernel()
    guest_env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    guest_env.update({IN_VM_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1",
                      "PYTHONUNBUFFERED": "1", "HOME": "/tmp"})
    guest_env.update(env or {})
    fallback = kvm is None and _kvm_candidate()
    attempts = [True, False] if fallback else [bool(kvm)]
    # One more try when the guest never started: QEMU's emulation occasionally aborts
    # during boot (seen once under TCG: an assertion in hw/pci/msix.c), which says
    # nothing about the command. A command that ran and failed is never retried.
    attempts.append(attempts[-1])
    deadline = time.monotonic() + timeout
    consoles = []
    for use_kvm in attempts:
        with tempfile.TemporaryDirectory(prefix="svcnet-vm-") as tmp:
            rundir = Path(tmp)
            script = rundir / "run.sh"
            script.write_text(_guest_script(command, rundir, cwd, guest_env))
            started = time.monotonic()
            console = _boot(kernel, script, rundir, use_kvm=use_kvm, memory=memory, cpus=cpus,
                            timeout=max(1.0, deadline - started),
                            boot_timeout=KVM_BOOT_TIMEOUT if use_kvm and fallback
                            else None)
            consoles.append(console)
            if not (rundir / "started").exists():
                if use_kvm and fallback:
                    with contextlib.suppress(OSError):
                        _kvm_memo().write_text(console[-2000:])
                continue
            rc_file = rundir / "rc"
            output = (rundir / "output").read_text(errors="replace") if (
                rundir / "output").exists() else ""
            if not rc_file.exists():
                raise VmError(f"guest started but the command did not finish:\n{output}\n"
                              f"{console[-4000:]}")
            return VmResult(int(rc_file.read_text().strip() or 99), output,
                            "kvm" if use_kvm else "tcg", time.monotonic() - started, console)
    raise VmError("the VM did not boot:\n" + "\n---\n".join(c[-4000:] for c in consoles))


def _boot(kernel: VmKernel, script: Path, rundir: Path, *, use_kvm: bool, memory: str,
          cpus: int, timeout: float, boot_timeout: float | None) -> str:
    """Run vng; give up early (return) if ``boot_timeout`` passes before the guest started."""
    cmd = ["vng", "--run", str(kernel.vmlinuz), "--user", "root", "--memory", memory,
           "--cpus", str(cpus), "--rwdir", str(rundir), "--exec", f"sh {shlex.quote(str(script))}"]
    if not use_kvm:
        cmd.insert(1, "--disable-kvm")
    log_path = rundir / "console"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, "PATH": _tool_path()},
                                start_new_session=True)
        try:
            if boot_timeout is not None:
                boot_deadline = time.monotonic() + boot_timeout
                while proc.poll() is None and not (rundir / "started").exists():
                    if time.monotonic() > boot_deadline:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        break
                    time.sleep(0.2)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise VmError(f"VM run exceeded {timeout:.0f} s:\n"
                          f"{log_path.read_text(errors='replace')[-4000:]}") from None
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    return log_path.read_text(errors="replace")


def pytest_command(args: Sequence[str], python: Path | None = None) -> str:
    """The in-guest pytest command: the project's venv, no cache writes to the read-only tree,
    and no plugin auto-loading (hypothesis, asyncio, timeout): under software emulation every
    import costs seconds, and the runner's own timeout bounds the run."""
    py = python or PROJECT_ROOT / ".venv" / "bin" / "python"
    cmd = [str(py), "-m", "pytest", "-p", "no:cacheprovider", "-W",
           "ignore::pytest.PytestConfigWarning", *args]
    return "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 " + " ".join(shlex.quote(a) for a in cmd)


def run_pytest_in_vm(args: Sequence[str], **kwargs: object) -> VmResult:
    """Run ``pytest ARGS`` inside the VM (see run_in_vm for keyword arguments)."""
    return run_in_vm(pytest_command(args), **kwargs)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m svcnet.lab.vm",
        description="Run a pytest selection (default) or a shell command inside a QEMU VM "
                    "booting Debian's stock kernel, with this host's filesystem.")
    parser.add_argument("--kernel-version", help="e.g. 6.1.0-56-amd64 (default: Debian's "
                        "current linux-image-amd64)")
    parser.add_argument("--shell", metavar="CMD", help="run CMD with /bin/sh instead of pytest")
    parser.add_argument("--kvm", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--fetch-only", action="store_true",
                        help="download and unpack the kernel, print its directory, exit")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest in the guest")
    args = parser.parse_args(argv)
    try:
        kernel = ensure_kernel(args.kernel_version)
        if args.fetch_only:
            print(kernel.root)
            return 0
        command = args.shell if args.shell else pytest_command(args.pytest_args)
        kvm = {"auto": None, "yes": True, "no": False}[args.kvm]
        result = run_in_vm(command, kernel=kernel, kvm=kvm, timeout=args.timeout,
                           memory=args.memory, cpus=args.cpus)
    except VmError as err:
        print(f"svcnet-vm: {err}", file=sys.stderr)
        return 125
    sys.stdout.write(result.output)
    print(f"svcnet-vm: kernel {kernel.version}, {result.accelerator}, "
          f"{result.seconds:.1f} s, exit {result.returncode}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
