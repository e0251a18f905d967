"""Where the API server is and how to prove who we are: kubeconfig files and in-cluster config.

The lookup order is kubectl's: an explicit ``--kubeconfig``, then ``$KUBECONFIG`` (a
colon-separated list, merged first-wins like kubectl), then ``~/.kube/config``, then the pod's
service account. Relative file paths in a kubeconfig are relative to that file. Anything wrong
raises ``Invalid`` with a message naming the file and the entry, because a node agent started
with a broken config should say why once and exit, not retry forever.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from svcnet.store.base import Invalid
from svcnet.store.redact import redact_url, yaml_problem

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_RELOAD_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything needed to reach one API server as one user; plain data, no open files."""

    server: str
    """Base URL, ``https://host:port`` plus an optional path prefix (no trailing slash)."""
    ca_pem: str | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    exec_plugin: ExecPlugin | None = None
    namespace: str = "default"
    source: str = ""
    """Where this came from (file and context, or in-cluster), for error messages."""

    @property
    def host(self) -> str:
        return urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return urlsplit(self.server).scheme == "https"

    @property
    def path_prefix(self) -> str:
        return urlsplit(self.server).path.rstrip("/")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context: our CA (or the system's), and the client certificate if any."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(cadata=self.ca_pem)
        except ssl.SSLError as err:
            raise Invalid(f"{self.source}: certificate authority not usable: {err}") from None
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        if self.client_cert_pem is not None and self.client_key_pem is not None:
            _load_client_cert(ctx, self.client_cert_pem, self.client_key_pem, self.source)
        return ctx


@dataclass(frozen=True, slots=True)
class ExecPlugin:
    """A kubeconfig ``user.exec`` credential plugin (``aws eks get-token``, ``gke-gcloud-auth-
    plugin``, ``kubelogin``): a command printing an ``ExecCredential`` with a bearer token."""

    command: str
    args: tuple[str, ...] = field(default=(), repr=False)
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    api_version: str = "client.authentication.k8s.io/v1"
    timeout: float = 60.0


@dataclass(slots=True)
class TokenSource:
    """The bearer token, kept fresh.

    A token file is re-read every minute: the kubelet rotates bound service-account tokens,
    and a token cached forever stops working after about an hour. An exec plugin runs again
    when its token is about to expire. ``invalidate`` (after a 401) forces both.
    """

    token: str | None = field(default=None, repr=False)
    path: str | None = None
    plugin: ExecPlugin | None = None
    _read_at: float = field(default=0.0, init=False)
    _expires_at: float | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    @property
    def refreshable(self) -> bool:
        return self.path is not None or self.plugin is not None

    def invalidate(self) -> None:
        if self.refreshable:
            self._read_at = float("-inf")
            self._expires_at = float("-inf")

    async def get(self) -> str | None:
        if self.plugin is not None:
            async with self._lock:
                if self.token is None or (
                    self._expires_at is not None and time.time() >= self._expires_at - 10
                ):
                    self.token, self._expires_at = await run_exec_plugin(self.plugin)
            return self.token
        if self.path is None:
            return self.token
        now = time.monotonic()
        if self.token is None or now - self._read_at >= TOKEN_RELOAD_SECONDS:
            try:
                self.token = Path(self.path).read_text().strip()
            except OSError as err:
                if self.token is None:
                    raise Invalid(f"cannot read token file {self.path}: {err}") from None
            self._read_at = now
        return self.token


async def run_exec_plugin(plugin: ExecPlugin) -> tuple[str, float | None]:
    """Run the plugin as client-go does; return its token and when it expires (epoch s)."""
    info = {"apiVersion": plugin.api_version, "kind": "ExecCredential",
            "spec": {"interactive": False}}
    env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
    what = f"exec credential plugin {plugin.command!r}"
    try:
        proc = await asyncio.create_subprocess_exec(
            plugin.command, *plugin.args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        raise Invalid(f"{what} cannot run: {err.strerror or err}") from None
    try:
        async with asyncio.timeout(plugin.timeout):
            out, err_out = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Invalid(f"{what} did not finish within {plugin.timeout:.0f}s") from None
    if proc.returncode != 0:
        detail = err_out.decode(errors="replace").strip()[-300:]
        raise Invalid(f"{what} exited with {proc.returncode}: {detail}")
    try:
        cred = json.loads(out)
        status = cred.get("status") or {}
        token = status.get("token")
    except (ValueError, AttributeError):
        raise Invalid(f"{what} printed no ExecCredential JSON") from None
    if cred.get("kind") != "ExecCredential" or not isinstance(token, str) or not token:
        if status.get("clientCertificateData"):
            raise Invalid(f"{what} returned a client certificate; only tokens are supported")
        raise Invalid(f"{what} printed no ExecCredential with status.token")
    expiry = status.get("expirationTimestamp")
    if not expiry:
        return token, None
    try:
        return token, datetime.fromisoformat(str(expiry).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise Invalid(f"{what}: bad expirationTimestamp {expiry!r}") from None


def load(
    kubeconfig: str | None = None, context: str | None = None, *,
    environ: Mapping[str, str] | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> ClusterConfig:
    """Resolve the config the way kubectl and client-go do (see the module docstring)."""
    env = os.environ if environ is None else environ
    if kubeconfig:
        return from_kubeconfig([kubeconfig], context)
    if env.get("KUBECONFIG"):
        paths = [p for p in env["KUBECONFIG"].split(os.pathsep) if p]
        existing = [p for p in paths if Path(p).exists()]
        if not existing:
            raise Invalid(f"$KUBECONFIG names no existing file: {env['KUBECONFIG']}")
        return from_kubeconfig(existing, context)
    home = env.get("HOME") or str(Path.home())
    default = Path(home) / ".kube" / "config"
    if default.exists():
        return from_kubeconfig([str(default)], context)
    if env.get("KUBERNETES_SERVICE_HOST"):
        if context:
            raise Invalid(f"--context {context!r} given but no kubeconfig found (in-cluster)")
        return in_cluster(environ=env, service_account_dir=service_account_dir)
    raise Invalid(
        "no Kubernetes config: pass --kubeconfig, set $KUBECONFIG, create ~/.kube/config, "
        "or run in a pod (KUBERNETES_SERVICE_HOST is not set)"
    )


def in_cluster(
    *, environ: Mapping[str, str] | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> ClusterConfig:
    """The pod's service account: API address from the environment, token and CA from files."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise Invalid("in-cluster config: KUBERNETES_SERVICE_HOST is not set")
    sa = Path(service_account_dir)
    token_path, ca_path = sa / "token", sa / "ca.crt"
    if not token_path.is_file():
        raise Invalid(f"in-cluster config: no service account token at {token_path}")
    ca_pem = _read_text(ca_path, "in-cluster config", "ca.crt") if ca_path.is_file() else None
    ns_path = sa / "namespace"
    namespace = ns_path.read_text().strip() if ns_path.is_file() else "default"
    netloc = f"[{host}]" if ":" in host else host
    return ClusterConfig(
        server=f"https://{netloc}:{port}", ca_pem=ca_pem, token_file=str(token_path),
        namespace=namespace or "default", source="in-cluster service account",
    )


def from_kubeconfig(paths: list[str], context: str | None = None) -> ClusterConfig:
    """Merge kubeconfig files (first definition of a name wins) and resolve one context."""
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    contexts: dict[str, dict[str, Any]] = {}
    current = ""
    for path in paths:
        doc = _read_yaml(path)
        base = Path(path).resolve().parent
        for section, into in (("clusters", clusters), ("users", users)):
            for entry in _named_entries(doc, section, path):
                into.setdefault(entry[0], (entry[1], base))
        for name, body in _named_entries(doc, "contexts", path):
            contexts.setdefault(name, body)
        current = current or str(doc.get("current-context") or "")
    where = ":".join(paths)
    name = context or current
    if not name:
        raise Invalid(f"kubeconfig {where}: no current-context set and no --context given")
    if name not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise Invalid(f"kubeconfig {where}: context {name!r} not found (known: {known})")
    ctx = contexts[name]
    cluster_name, user_name = str(ctx.get("cluster") or ""), str(ctx.get("user") or "")
    if cluster_name not in clusters:
        raise Invalid(f"kubeconfig {where}: context {name!r} names unknown cluster "
                      f"{cluster_name!r}")
    if user_name and user_name not in users:
        raise Invalid(f"kubeconfig {where}: context {name!r} names unknown user {user_name!r}")
    cluster, cluster_base = clusters[cluster_name]
    user, user_base = users.get(user_name, ({}, cluster_base))
    source = f"kubeconfig {where} context {name!r}"
    _check_user(user, source)
    return ClusterConfig(
        server=_server(cluster, source),
        ca_pem=_pem_text(cluster, "certificate-authority", cluster_base, source),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        tls_server_name=cluster.get("tls-server-name") or None,
        client_cert_pem=_pem(user, "client-certificate", user_base, source),
        client_key_pem=_pem(user, "client-key", user_base, source),
        token=user.get("token") or None,
        token_file=str(user_base / user["tokenFile"]) if user.get("tokenFile") else None,
        exec_plugin=_exec_plugin(user.get("exec"), user_base, source),
        namespace=str(ctx.get("namespace") or "default"),
        source=source,
    )


def _exec_plugin(spec: Any, base: Path, source: str) -> ExecPlugin | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec.get("command"):
        raise Invalid(f"{source}: user exec has no command")
    command = str(spec["command"])
    if "/" in command and not command.startswith("/"):
        command = str(base / command)  # relative to the kubeconfig, as client-go resolves it
    env = spec.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, dict) and "name" in e for e in env):
        raise Invalid(f"{source}: user exec env must be a list of {{name, value}}")
    return ExecPlugin(
        command=command, args=tuple(str(a) for a in spec.get("args") or ()),
        env=tuple((str(e["name"]), str(e.get("value", ""))) for e in env),
        api_version=str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
    )


def _check_user(user: dict[str, Any], source: str) -> None:
    if "auth-provider" in user:
        raise Invalid(f"{source}: user credential plugin 'auth-provider' is not supported "
                      "(removed from kubectl too); use exec, a token or a client certificate")
    if ("client-certificate" in user or "client-certificate-data" in user) != (
        "client-key" in user or "client-key-data" in user
    ):
        raise Invalid(f"{source}: client certificate and client key must both be given")
    if "username" in user or "password" in user:
        raise Invalid(f"{source}: basic auth (username/password) is not supported")


def _server(cluster: dict[str, Any], source: str) -> str:
    server = str(cluster.get("server") or "")
    try:
        parts = urlsplit(server)
        hostname = parts.hostname
    except ValueError:
        raise Invalid(f"{source}: cluster server {redact_url(server)!r} is not a URL") from None
    if parts.scheme not in ("https", "http") or not hostname:
        raise Invalid(f"{source}: cluster server {redact_url(server)!r} is not an http(s) URL")
    if "@" in parts.netloc:
        raise Invalid(f"{source}: cluster server {redact_url(server)!r} carries credentials; "
                      "put a token or client certificate in the user entry instead")
    return server.rstrip("/")


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise Invalid(f"cannot read kubeconfig {path}: {err.strerror or err}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise Invalid(f"kubeconfig {path} is not valid YAML: {yaml_problem(err)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise Invalid(f"kubeconfig {path}: top level is not a mapping")
    return doc


def _named_entries(doc: dict[str, Any], section: str, path: str
                   ) -> list[tuple[str, dict[str, Any]]]:
    """``clusters: [{name: x, cluster: {...}}]`` -> ``[(x, {...})]``."""
    inner = section[:-1]
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise Invalid(f"kubeconfig {path}: {section} is not a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise Invalid(f"kubeconfig {path}: {section}[{i}] has no name")
        body = entry.get(inner) or {}
        if not isinstance(body, dict):
            raise Invalid(f"kubeconfig {path}: {section}[{i}].{inner} is not a mapping")
        out.append((str(entry["name"]), body))
    return out


def _pem(entry: dict[str, Any], key: str, base: Path, source: str) -> bytes | None:
    """``key-data`` (base64 PEM) or ``key`` (a file path) -> PEM bytes."""
    data = entry.get(f"{key}-data")
    if data and entry.get(key):
        raise Invalid(f"{source}: both {key} and {key}-data are given; keep one")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(f"{source}: {key}-data is not valid base64") from None
    path = entry.get(key)
    if path:
        return _read_text(base / str(path), source, key).encode()
    return None


def _pem_text(entry: dict[str, Any], key: str, base: Path, source: str) -> str | None:
    pem = _pem(entry, key, base, source)
    if pem is None:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise Invalid(f"{source}: {key} holds no PEM certificate")
    return pem.decode("ascii", "replace")


def _read_text(path: Path, source: str, what: str) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise Invalid(f"{source}: cannot read {what} {path}: {err.strerror or err}") from None


def _load_client_cert(ctx: ssl.SSLContext, cert: bytes, key: bytes, source: str) -> None:
    """``ssl`` loads certificates only from files: write them to a private temporary
    directory for the duration of the call."""
    with tempfile.TemporaryDirectory(prefix="svcnet-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "client.crt", Path(tmp) / "client.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        cert_path.write_bytes(cert)
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        except ssl.SSLError as err:
            raise Invalid(f"{source}: client certificate/key rejected: {err}") from None
