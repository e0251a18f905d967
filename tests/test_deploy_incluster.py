"""In-cluster config against a real kube-apiserver: the pod's service-account directory (a
bound token, ca.crt, namespace) and ``KUBERNETES_SERVICE_HOST/PORT``, with the token rotated
on disk and the old one revoked while an informer watches."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from svcnet.model import SERVICE
from svcnet.store import kubeconfig
from svcnet.store.base import StoreError
from svcnet.store.kubernetes import KubernetesStore
from svcnet.watch import Informer

NS = "svcnet-incluster"
ACCOUNT = "svcnet-rotor"


def write_like_kubelet(sa_dir: Path, token: str) -> None:
    """The kubelet's AtomicWriter: a new timestamped directory, ``..data`` swapped by rename,
    ``token`` a symlink through ``..data``."""
    stamp = sa_dir / f"..{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / "token").write_text(token)
    tmp = sa_dir / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp.name)
    old = (sa_dir / "..data").resolve() if (sa_dir / "..data").exists() else None
    os.replace(tmp, sa_dir / "..data")
    if not (sa_dir / "token").is_symlink():
        (sa_dir / "token").symlink_to("..data/token")
    if old is not None:
        shutil.rmtree(old)


@pytest.fixture(scope="module")
def account(control_plane: Any) -> Any:
    cp = control_plane
    role = f"svcnet:{NS}:{ACCOUNT}"
    with cp.namespace(NS):
        cp.apply([
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": ACCOUNT, "namespace": NS}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": role},
             "rules": [{"apiGroups": [""], "resources": ["services"],
                        "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": role},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": role},
             "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NS}]}])
        try:
            yield cp
        finally:
            cp.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)


def bound_token(cp: Any, secret: str) -> str:
    """A token from the TokenRequest API bound to a Secret: deleting the Secret revokes it at
    once (bound tokens cannot be shorter than 10 minutes, so expiry is not testable here)."""
    cp.kubectl("create", "secret", "generic", secret, "-n", NS, check=False)
    return str(cp.kubectl("create", "token", ACCOUNT, "-n", NS, "--duration=10m",
                          "--bound-object-kind=Secret",
                          f"--bound-object-name={secret}").stdout.strip())


def revoke(cp: Any, secret: str, token: str) -> None:
    cp.kubectl("delete", "secret", secret, "-n", NS)
    deadline = time.monotonic() + 30
    while cp.api_get("/api/v1/services", token=token)[0] != 401:
        assert time.monotonic() < deadline, "the old token still works"
        time.sleep(0.2)


def in_cluster_store(cp: Any, sa_dir: Path, home: Path) -> KubernetesStore:
    shutil.copy(cp.layout.ca_crt, sa_dir / "ca.crt")
    (sa_dir / "namespace").write_text(NS)
    env = {"KUBERNETES_SERVICE_HOST": cp.layout.host,
           "KUBERNETES_SERVICE_PORT": str(cp.layout.apiserver_port), "HOME": str(home)}
    config = kubeconfig.load(environ=env, service_account_dir=str(sa_dir))
    assert config.source == "in-cluster service account"
    assert config.token is None and config.token_file == str(sa_dir / "token")
    assert config.ca_pem is not None and config.namespace == NS
    store = KubernetesStore(config)
    store.watch_timeout = 2.0  # the server ends each watch within 2-4 s: re-auth often
    return store


async def wait_for_service(informer: Informer[Any], name: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while informer.cache.get(f"{NS}/{name}") is None:
            await asyncio.sleep(0.1)


def test_rotated_token_keeps_list_and_watch_working(account: Any, tmp_path: Path) -> None:
    cp = account
    sa_dir, home = tmp_path / "sa", tmp_path / "home"
    sa_dir.mkdir()
    home.mkdir()
    old = bound_token(cp, "rotor-1")
    write_like_kubelet(sa_dir, old)
    store = in_cluster_store(cp, sa_dir, home)

    async def run() -> None:
        informer: Informer[Any] = Informer(store, SERVICE)
        informer.start()
        try:
            await informer.wait_synced(30)
            cp.kubectl("create", "service", "clusterip", "before", "--tcp=80:80", "-n", NS)
            await wait_for_service(informer, "before")
            write_like_kubelet(sa_dir, bound_token(cp, "rotor-2"))
            await asyncio.to_thread(revoke, cp, "rotor-1", old)
            # a new request with the cached (revoked) token: 401, re-read, retried
            listing = await store.list(SERVICE)
            assert any(r.name == "before" for r in listing.items)
            # the watch is re-opened every few seconds, each time with a valid token
            cp.kubectl("create", "service", "clusterip", "after", "--tcp=80:80", "-n", NS)
            await wait_for_service(informer, "after")
            await asyncio.sleep(5)  # outlive at least one more watch timeout
            cp.kubectl("create", "service", "clusterip", "later", "--tcp=80:80", "-n", NS)
            await wait_for_service(informer, "later")
        finally:
            await informer.stop()
            await store.close()

    asyncio.run(run())


def test_without_reread_a_revoked_token_fails(account: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: a client that keeps its first token (no re-read on 401, and
    the periodic re-read a minute away) is refused once that token is revoked."""
    cp = account
    monkeypatch.setattr(kubeconfig.TokenSource, "invalidate", lambda self: None)
    sa_dir, home = tmp_path / "sa", tmp_path / "home"
    sa_dir.mkdir()
    home.mkdir()
    old = bound_token(cp, "rotor-3")
    write_like_kubelet(sa_dir, old)
    store = in_cluster_store(cp, sa_dir, home)

    async def run() -> None:
        try:
            await store.list(SERVICE)
            write_like_kubelet(sa_dir, bound_token(cp, "rotor-4"))
            await asyncio.to_thread(revoke, cp, "rotor-3", old)
            with pytest.raises(StoreError, match=r"not accepted|401|Unauthorized"):
                await store.list(SERVICE)
        finally:
            await store.close()

    asyncio.run(run())
