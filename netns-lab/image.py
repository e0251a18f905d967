"""The svcnet container image, built with no image registry: a Debian base made here with
debootstrap and ``podman import``, then ``podman build`` of the checkout's ``Containerfile``
in a runtime sandbox (its own network and mount namespaces: the build has no network, so
Python comes in as wheels built beforehand and the Debian packages are already in the base).

Both the base rootfs and the image are cached outside the checkout (``cache_root()/images``)
and keyed by what they are made from, so CI builds each once per change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from svcnet.lab.controlplane import cache_root
from svcnet.lab.runtimes import Podman, Sandbox

from svcnet import __version__

SUITE = "bookworm"
# What the node agent calls (docs/deploy.md); perl-base is Essential, so always in the base.
PACKAGES = ("python3", "python3-venv", "iptables", "nftables", "ipset", "conntrack",
            "iproute2", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("svcnet", "cni", "dns", "proxy", "netns-lab")


class ImageError(RuntimeError):
    """A build step failed; the message carries the step's output."""


def images_dir() -> Path:
    return cache_root() / "images"


def apt_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources"),
               legacy: Path = Path("/etc/apt/sources.list")) -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line format)."""
    if sources.is_file():
        for stanza in sources.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1).rstrip("/")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and fields[2] == SUITE:
                return fields[1].rstrip("/")
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], timeout: float, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ImageError(f"{what} exited {proc.returncode}: {proc.stderr[-2000:]}"
                         f"{proc.stdout[-1000:]}")
    return proc.stdout


def base_key(mirror: str) -> str:
    return hashlib.sha256(f"{SUITE} minbase {','.join(PACKAGES)} {mirror}".encode()
                          ).hexdigest()[:12]


def base_rootfs_tar(mirror: str | None = None, cache: Path | None = None) -> Path:
    """``debootstrap --variant=minbase`` with ``PACKAGES``, as a tar, built once. debootstrap
    mounts /proc and /sys in the target: it runs in a private mount namespace."""
    mirror = mirror or apt_mirror()
    cache = cache or images_dir()
    tar = cache / f"debian-{SUITE}-minbase-{base_key(mirror)}.tar"
    with _locked(cache / ".base.lock"):
        if tar.is_file():
            return tar
        with tempfile.TemporaryDirectory(dir=cache, prefix=".rootfs-") as tmp:
            root = Path(tmp) / "rootfs"
            _run(["unshare", "-m", "--propagation", "private", "debootstrap",
                  "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                  mirror], 3600, "debootstrap")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / junk).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = Path(tmp) / "rootfs.tar"
            _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], 600,
                 "tar")
            partial.replace(tar)
    return tar


def source_key() -> str:
    """What the image is made of: the Containerfile, pyproject and every source file."""
    digest = hashlib.sha256()
    files = [REPO / "Containerfile", REPO / "pyproject.toml"]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (REPO / d).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def build_wheels(dest: Path, python: str) -> None:
    """svcnet and its dependencies as wheels, with this machine's pip configuration (index,
    find-links, certificates): the build inside the sandbox has no network."""
    dest.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(REPO)],
         1800, "pip wheel")


@dataclass
class BuildResult:
    ref: str
    size_bytes: int
    built: bool
    seconds: float


class ImageBuilder:
    """podman with its storage in the image cache, run in a sandbox of its own."""

    def __init__(self, box: Sandbox, cache: Path | None = None) -> None:
        self.cache = cache or images_dir()
        conf_dir, plugin_dir = self.cache / "podman-cni", self.cache / "podman-cni-bin"
        for d in (conf_dir, plugin_dir):  # builds and runs use --network none: both stay empty
            d.mkdir(parents=True, exist_ok=True)
        self.podman = Podman(box, self.cache / "podman", [str(plugin_dir)], conf_dir)

    def exists(self, ref: str) -> bool:
        return self.podman("image", "exists", ref, check=False).returncode == 0

    def base(self, mirror: str | None = None) -> str:
        mirror = mirror or apt_mirror()
        ref = f"localhost/svcnet-base:{SUITE}-{base_key(mirror)}"
        if not self.exists(ref):
            tar = base_rootfs_tar(mirror, self.cache)
            self.podman("import", str(tar), ref, timeout=900)
        return ref

    def build(self, python: str, *, force: bool = False) -> BuildResult:
        start = time.monotonic()
        ref = f"localhost/svcnet:{__version__}-{source_key()}"
        with _locked(self.cache / ".build.lock"):
            built = False
            if force or not self.exists(ref):
                base = self.base()
                with tempfile.TemporaryDirectory(dir=self.cache, prefix=".context-") as tmp:
                    context = Path(tmp)
                    shutil.copy(REPO / "Containerfile", context / "Containerfile")
                    build_wheels(context / "wheels", python)
                    self.podman("build", "--network", "none", "--pull=never",
                                "--build-arg", f"BASE={base}", "-t", ref,
                                "-f", str(context / "Containerfile"), str(context),
                                timeout=1800)
                built = True
                self._prune(keep=ref)
            size = int(self.podman("image", "inspect", "--format", "{{.Size}}", ref
                                   ).stdout.strip())
        return BuildResult(ref, size, built, time.monotonic() - start)

    def _prune(self, keep: str) -> None:
        """Drop earlier builds: each source change makes a new tag, and with the vfs driver
        each image is a full copy (~230 MB), so the cache would grow without bound."""
        listing = self.podman("images", "--format", "{{.Repository}}:{{.Tag}}",
                              "--filter", "reference=localhost/svcnet", check=False)
        old = [r for r in listing.stdout.split()
               if r != keep and r.startswith("localhost/svcnet:")]
        if old:
            self.podman("rmi", "--force", *old, check=False, timeout=300)

    def run(self, ref: str, *cmd: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return self.podman("run", "--rm", "--network", "none", *flags, ref, *cmd,
                           check=False, timeout=120)
