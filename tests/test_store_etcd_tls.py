"""The etcd store over TLS (client certificates) and with etcd's user/password auth, against a
real etcd started with ``--client-cert-auth`` and with auth enabled through ``etcdctl``.

Certificates are made with openssl in the test's tmp dir. Bad set-ups (wrong CA, no client
certificate, wrong password, no user while auth is on) must give one clear line from the
``svcnet`` command, with no traceback and no credential in it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import EtcdCluster, require_binary, sh
from watchkit import eventually

from svcnet.model import SERVICE
from svcnet.store.base import Invalid, Unavailable
from svcnet.store.etcd import EtcdClient, EtcdCredentials, EtcdStore
from svcnet.store.etcd_config import parse_etcd_url
from svcnet.store.open import open_store
from svcnet.store.redact import redact_url
from svcnet.watch import Backoff, Informer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]

T = TypeVar("T")
PASSWORD = "s3cret-Pw/with@odd:chars"
QUOTED = "s3cret-Pw%2Fwith%40odd%3Achars"


@dataclass(frozen=True)
class Pki:
    ca: str
    other_ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    require_binary("openssl")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={ca}", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out",
                 f"{name}.crt", cwd=d)
    return Pki(*(str(d / f) for f in ("ca.crt", "other-ca.crt", "server.crt", "server.key",
                                       "client.crt", "client.key")))


def _tls_cluster(tmp_path: Path, pki: Pki) -> EtcdCluster:
    cluster = EtcdCluster(tmp_path, 1)
    cluster.client_scheme = "https"
    cluster.client_args = ["--client-cert-auth", "--trusted-ca-file", pki.ca,
                           "--cert-file", pki.server_cert, "--key-file", pki.server_key]
    return cluster


@pytest.fixture
def etcd_tls(tmp_path: Path, pki: Pki) -> Iterator[EtcdCluster]:
    """One etcd member that serves only TLS and wants a client certificate from our CA."""
    cluster = _tls_cluster(tmp_path, pki)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def etcdctl(cluster: EtcdCluster, pki: Pki | None, *args: str) -> str:
    require_binary("etcdctl")
    tls = ["--cacert", pki.ca, "--cert", pki.client_cert, "--key", pki.client_key] if pki else []
    scheme = "https" if pki else "http"
    return sh("etcdctl", f"--endpoints={scheme}://{cluster.endpoints[0]}", *tls, *args,
              timeout=30).stdout


def enable_auth(cluster: EtcdCluster, pki: Pki | None) -> None:
    """etcd's own way: a root user, then auth on (from now on every request needs a token)."""
    etcdctl(cluster, pki, "user", "add", "root", f"--new-user-password={PASSWORD}")
    etcdctl(cluster, pki, "auth", "enable")


def client_tls(pki: Pki) -> EtcdCredentials:
    return EtcdCredentials(cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def svc(name: str, ip: str = "10.0.0.1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


async def _retry(op: Callable[[], Awaitable[T]], attempts: int = 100) -> T:
    for _ in range(attempts - 1):
        try:
            return await op()
        except Unavailable:
            await asyncio.sleep(0.1)
    return await op()


def svcnet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "svcnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, no traceback, no secret."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for secret in (PASSWORD, QUOTED, "wrong-password"):
        assert secret not in proc.stderr
    return lines[0]


# ---- URL and flags (no etcd needed) -----------------------------------------------------


def test_store_url_carries_user_password_and_tls_files() -> None:
    target = parse_etcd_url(f"etcds://root:{QUOTED}@h1:2379,h2:2379/reg?cafile=/c.pem"
                            "&certfile=/crt.pem&keyfile=/k.pem")
    assert target.endpoints == ("h1:2379", "h2:2379") and target.prefix == "/reg"
    creds = target.credentials
    assert (creds.tls, creds.cafile, creds.certfile, creds.keyfile, creds.username,
            creds.password) == (True, "/c.pem", "/crt.pem", "/k.pem", "root", PASSWORD)
    assert PASSWORD not in repr(creds)
    # Flags win over the URL.
    flags = EtcdCredentials(cafile="/flag.pem", username="u", password="p")
    merged = parse_etcd_url(f"etcd://root:{QUOTED}@h:1?cafile=/c.pem", flags).credentials
    assert (merged.cafile, merged.username, merged.password) == ("/flag.pem", "u", "p")
    assert parse_etcd_url("etcd://h:1").credentials == EtcdCredentials()
    assert parse_etcd_url("etcd://h:1/").prefix == "/registry"
    assert redact_url(f"etcd://root:{QUOTED}@h:1/p") == "etcd://***@h:1/p"
    with pytest.raises(Invalid, match="unknown setting 'capath'") as err:
        parse_etcd_url(f"etcd://root:{QUOTED}@h:1?capath=/x")
    assert QUOTED not in str(err.value) and PASSWORD not in str(err.value)
    with pytest.raises(Invalid, match="both a certificate file and a key file"):
        parse_etcd_url("etcd://h:1?certfile=/crt.pem")
    # The user in the URL, the password from a flag (or file): kept out of the URL.
    split = parse_etcd_url("etcd://root@h:1", EtcdCredentials(password=PASSWORD)).credentials
    assert (split.username, split.password) == ("root", PASSWORD)
    with pytest.raises(Invalid, match="password was given without a user name"):
        parse_etcd_url("etcd://h:1", EtcdCredentials(password=PASSWORD))


def test_unreadable_tls_file_is_one_line(tmp_path: Path) -> None:
    proc = svcnet("get", "services", "--store", "etcd://127.0.0.1:1",
                  "--etcd-cafile", str(tmp_path / "missing.pem"), timeout=30)
    line = one_line_error(proc)
    assert "cannot read --etcd-cafile" in line and "No such file" in line, line
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(Invalid, match="is not a PEM file"):
        open_store("etcd://127.0.0.1:1", etcd=EtcdCredentials(cafile=str(tmp_path / "junk.pem")))


# ---- TLS with client certificates -------------------------------------------------------


def test_tls_store_list_watch_and_resume_after_restart(etcd_tls: EtcdCluster, pki: Pki) -> None:
    """Over TLS with a client certificate: CRUD, an informer's list + watch, and the watch
    resuming after etcd is killed and restarted. A plaintext client gets nothing."""

    async def body() -> None:
        store = EtcdStore(etcd_tls.endpoints, timeout=2, credentials=client_tls(pki))
        inf = Informer(store, SERVICE, backoff=Backoff(base=0.05, cap=0.5))
        try:
            await _retry(lambda: store.put(SERVICE, svc("a")))
            inf.start()
            await inf.wait_synced(20)
            await _retry(lambda: store.put(SERVICE, svc("b")))
            await eventually(lambda: inf.cache.keys_snapshot() == ["default/a", "default/b"],
                             timeout=20)
            etcd_tls.kill("m0")
            etcd_tls.start("m0")
            await _retry(lambda: store.put(SERVICE, svc("c")))
            await _retry(lambda: store.delete(SERVICE, "default", "a"))
            await eventually(lambda: inf.cache.keys_snapshot() == ["default/b", "default/c"],
                             timeout=20)
            assert store.client.credentials.uses_tls
        finally:
            await inf.stop()
            await store.close()
        async with EtcdClient(etcd_tls.endpoints, timeout=1) as plain:
            with pytest.raises(Unavailable):
                await plain.get(b"/registry/services/default/b")

    run(body)


def test_tls_wrong_ca_or_missing_client_cert_is_one_clear_line(
        etcd_tls: EtcdCluster, pki: Pki) -> None:
    store = f"etcd://{etcd_tls.endpoints[0]}"
    wrong_ca = svcnet("get", "services", "--store", store, "--etcd-cafile", pki.other_ca,
                      "--etcd-certfile", pki.client_cert, "--etcd-keyfile", pki.client_key)
    line = one_line_error(wrong_ca)
    assert "not trusted" in line and "--etcd-cafile" in line, line
    no_cert = svcnet("get", "services", "--store", store, "--etcd-cafile", pki.ca)
    line = one_line_error(no_cert)
    assert "rejected our client certificate" in line and "--etcd-certfile" in line, line
    good = svcnet("get", "services", "--store", f"etcds://{etcd_tls.endpoints[0]}?cafile="
                  f"{pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}")
    assert good.returncode == 0 and good.stderr == "", good.stderr


# ---- authentication ---------------------------------------------------------------------


def test_auth_over_tls_renews_token_and_watch_resumes(etcd_tls: EtcdCluster, pki: Pki) -> None:
    """TLS and auth together, all in the URL. Every token etcd issued is then revoked (auth
    disabled and enabled again): the next write authenticates again by itself, and after an
    etcd restart the watch (refused as "permission denied" with the old token) does too."""
    enable_auth(etcd_tls, pki)
    url = (f"etcds://root:{QUOTED}@{etcd_tls.endpoints[0]}?cafile={pki.ca}"
           f"&certfile={pki.client_cert}&keyfile={pki.client_key}")

    async def body() -> None:
        store = open_store(url)
        assert isinstance(store, EtcdStore)
        inf = Informer(store, SERVICE, backoff=Backoff(base=0.05, cap=0.5))
        try:
            await _retry(lambda: store.put(SERVICE, svc("a")))
            first = store.client._token
            assert first
            inf.start()
            await inf.wait_synced(20)
            await _retry(lambda: store.put(SERVICE, svc("b")))
            await eventually(lambda: len(inf.cache) == 2, timeout=20)
            etcdctl(etcd_tls, pki, "--user", f"root:{PASSWORD}", "auth", "disable")
            etcdctl(etcd_tls, pki, "auth", "enable")
            await _retry(lambda: store.put(SERVICE, svc("c")))  # refused token -> new one
            second = store.client._token
            assert second and second != first
            await eventually(lambda: len(inf.cache) == 3, timeout=20)
            etcdctl(etcd_tls, pki, "--user", f"root:{PASSWORD}", "auth", "disable")
            etcdctl(etcd_tls, pki, "auth", "enable")
            etcd_tls.kill("m0")  # the watch must come back with a new token
            etcd_tls.start("m0")
            await _retry(lambda: store.delete(SERVICE, "default", "a"))
            await eventually(lambda: inf.cache.keys_snapshot() == ["default/b", "default/c"],
                             timeout=20)
            assert store.client._token not in (first, second)
        finally:
            await inf.stop()
            await store.close()

    run(body)


@pytest.fixture
def etcd_auth(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One plain-HTTP etcd member with authentication enabled."""
    cluster = EtcdCluster(tmp_path, 1)
    cluster.start()
    try:
        enable_auth(cluster, None)
        yield cluster
    finally:
        cluster.stop()


def test_auth_wrong_password_or_no_user_is_one_clear_line(
        etcd_auth: EtcdCluster, tmp_path: Path) -> None:
    endpoint = etcd_auth.endpoints[0]
    wrong = svcnet("get", "services", "--store", f"etcd://root:wrong-password@{endpoint}")
    line = one_line_error(wrong)
    assert "authentication failed for user 'root'" in line, line
    anonymous = svcnet("get", "services", "--store", f"etcd://{endpoint}")
    line = one_line_error(anonymous)
    assert "authentication enabled" in line and "--etcd-username" in line, line
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    good = svcnet("get", "services", "--store", f"etcd://{endpoint}", "--etcd-username",
                  "root", "--etcd-password-file", str(secret))
    assert good.returncode == 0 and good.stderr == "", good.stderr

    async def watch_without_user() -> None:
        async with EtcdClient([endpoint], timeout=2) as anon:
            with pytest.raises(Invalid, match="etcd has authentication enabled"):
                async for _ in anon.watch_prefix(b"/x/", start_revision=1):
                    pass

    run(watch_without_user)


def test_every_command_with_a_store_takes_the_etcd_options() -> None:
    """One place adds the options; every command that opens a store (and the overlay's own
    etcd client) ends up with the same endpoints and credentials."""
    from svcnet.cni.overlay.daemon import options_from_args

    from svcnet.cli import build_parser
    from svcnet.store.open import etcd_target_from_args

    parser = build_parser()
    flags = ["--store", "etcds://root@h1:2379,h2:2379/reg", "--etcd-cafile", "/ca.pem",
             "--etcd-certfile", "/c.pem", "--etcd-keyfile", "/k.pem", "--etcd-password", "pw"]
    want = EtcdCredentials(tls=True, cafile="/ca.pem", certfile="/c.pem", keyfile="/k.pem",
                           username="root", password="pw")
    commands = [["node", "--proxy"], ["get", "services"], ["apply", "-f", "-"],
                ["delete", "svc", "x"], ["watch"], ["dns"], ["proxy"], ["proxy", "check"]]
    for argv in commands:
        args = parser.parse_args([*argv, *flags])
        target = etcd_target_from_args(args)
        assert target is not None, argv
        assert (target.endpoints, target.prefix, target.credentials) == (
            ("h1:2379", "h2:2379"), "/reg", want), argv
    overlay = options_from_args(parser.parse_args(["node", "--overlay", *flags]))
    assert overlay.etcd_endpoints == ("h1:2379", "h2:2379")
    assert overlay.etcd_credentials == want
