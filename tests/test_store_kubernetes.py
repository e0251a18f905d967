"""The ``kubernetes`` store against a fake kube-apiserver speaking the real wire protocol
(tests/kubeapi.py), the informer on top of it, and kubeconfig / in-cluster configuration."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_binary
from kubeapi import Certs, FakeKubeAPI, Recorded, make_certs, serve_in_thread

from svcnet.model import ENDPOINT_SLICE, NODE, POD, SERVICE
from svcnet.store.base import (
    Event,
    EventType,
    Expired,
    Invalid,
    NotFound,
    Selector,
    Unavailable,
)
from svcnet.store.kubeconfig import ClusterConfig, from_kubeconfig, in_cluster, load
from svcnet.store.kubernetes import KubernetesStore
from svcnet.watch import Backoff, Callbacks, Informer

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require_binary("openssl")
    return make_certs(tmp_path_factory.mktemp("kubeapi-certs"))


@pytest.fixture
async def api(certs: Certs) -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI(certs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config_for(api: FakeKubeAPI, **overrides: Any) -> ClusterConfig:
    fields: dict[str, Any] = {"server": api.url, "ca_pem": api.certs.ca_crt.read_text(),
                              "token": "good-token", "source": "test config"}
    fields.update(overrides)
    return ClusterConfig(**fields)


@pytest.fixture
async def store(api: FakeKubeAPI) -> AsyncIterator[KubernetesStore]:
    s = KubernetesStore(config_for(api), watch_timeout=30)
    try:
        yield s
    finally:
        await s.close()


def service(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    """A Service with a clusterIP of its own (the API server refuses one already taken)."""
    n = zlib.crc32(f"{namespace}/{name}".encode()) % 65000
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"clusterIP": f"10.96.{n // 250}.{n % 250 + 1}",
                     "ports": [{"port": 80, "protocol": "TCP"}]}}


async def next_events(it: AsyncIterator[Event], count: int, timeout: float = 5.0
                      ) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            out.append(await anext(it))
    return out


# --- LIST ---------------------------------------------------------------------------------------


async def test_list_sends_what_kube_apiserver_expects(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    api.create("services", service("web", app="web"))
    sel = Selector(labels="app=web,!service.kubernetes.io/service-proxy-name",
                   fields="metadata.namespace!=kube-system")
    listing = await store.list(SERVICE, selector=sel)
    assert [o.key for o in listing.items] == ["default/web"]
    [req] = api.requests
    assert (req.method, req.path) == ("GET", "/api/v1/services")
    assert req.query == {
        "labelSelector": ["app=web,!service.kubernetes.io/service-proxy-name"],
        "fieldSelector": ["metadata.namespace!=kube-system"],
        "limit": ["500"],
    }
    assert req.headers["accept"] == "application/json"
    assert req.headers["authorization"] == "Bearer good-token"
    assert req.headers["host"] == f"127.0.0.1:{api.port}"
    assert req.headers["user-agent"].startswith("svcnet/")
    assert "content-length" not in req.headers and req.body == b""


async def test_list_items_keep_server_bytes_and_revisions(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    stored = api.create("services", service("web"))
    api.create("endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.5"]}], "ports": []})
    listing = await store.list(SERVICE)
    assert listing.revision == str(api.rv)
    [raw] = listing.items
    assert raw.revision == stored["metadata"]["resourceVersion"]
    # kube-apiserver sends list items without kind/apiVersion (the fake does too); the store
    # puts them back so that list and watch objects look alike.
    sent = api._list(api.requests[-1], api.resources["services"], "")["items"][0]
    assert "kind" not in sent and "apiVersion" not in sent
    assert json.loads(raw.data) == stored
    assert raw.data.startswith(b'{"kind":"Service","apiVersion":"v1","metadata":')
    assert SERVICE.decode(raw.data).spec.cluster_ip == stored["spec"]["clusterIP"]
    slices = await store.list(ENDPOINT_SLICE)
    assert api.requests[-1].path == "/apis/discovery.k8s.io/v1/endpointslices"
    assert ENDPOINT_SLICE.decode(slices.items[0].data).endpoints[0].addresses == ("10.1.0.5",)


async def test_list_paginates_one_consistent_snapshot(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    for i in range(1200):
        api.create("services", service(f"svc-{i:04d}"))
    revision = api.rv

    def change_between_pages(req: Recorded) -> None:
        if req.param("continue") and "svc-new" not in str(api.objects("services")):
            api.create("services", service("svc-new"))
            api.delete("services", "default", "svc-0000")

    api.hooks.append(change_between_pages)
    listing = await store.list(SERVICE)
    assert len(listing.items) == 1200
    assert listing.items[0].name == "svc-0000" and listing.revision == str(revision)
    assert len({o.key for o in listing.items}) == 1200
    pages = api.requests
    assert [r.param("limit") for r in pages] == ["500", "500", "500"]
    assert pages[0].param("continue") is None
    assert all(r.param("continue") for r in pages[1:])
    # The watch from the list's revision then delivers what changed meanwhile.
    it = store.watch(SERVICE, revision=listing.revision).__aiter__()
    events = await next_events(it, 2)
    assert [(e.type, e.obj and e.obj.name) for e in events] == [
        (EventType.ADDED, "svc-new"), (EventType.DELETED, "svc-0000")]
    await it.aclose()  # type: ignore[attr-defined]


async def test_list_with_expired_continue_token_relists_in_one_request(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    for i in range(7):
        api.create("services", service(f"svc-{i}"))
    store.page_size = 3

    def compact_once(req: Recorded) -> None:
        if req.param("continue") and not api.compacted:
            api.delete("services", "default", "svc-6")
            api.compact()

    api.hooks.append(compact_once)
    listing = await store.list(SERVICE)
    assert [o.name for o in listing.items] == [f"svc-{i}" for i in range(6)]
    assert listing.revision == str(api.rv)
    assert [(r.param("limit"), bool(r.param("continue"))) for r in api.requests] == [
        ("3", False), ("3", True), (None, False)]


# --- WATCH --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fragment", [False, True], ids=["chunk-per-event", "fragmented"])
async def test_watch_streams_events_after_revision(certs: Certs, fragment: bool) -> None:
    api = FakeKubeAPI(certs, fragment=fragment)
    await api.start()
    store = KubernetesStore(config_for(api), watch_timeout=30)
    try:
        api.create("services", service("before"))
        listing = await store.list(SERVICE)
        it = store.watch(SERVICE, revision=listing.revision).__aiter__()
        first = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.05)
        added = api.create("services", service("web"))
        updated = api.update("services", service("web", tier="front"))
        api.delete("services", "default", "before")
        for i in range(20):
            api.create("services", service(f"bulk-{i}"))
        events = [await asyncio.wait_for(first, 5), *await next_events(it, 22)]
        assert [(e.type, e.obj and e.obj.key) for e in events[:3]] == [
            (EventType.ADDED, "default/web"), (EventType.MODIFIED, "default/web"),
            (EventType.DELETED, "default/before")]
        assert [e.revision for e in events] == [str(r) for r in range(
            int(listing.revision) + 1, int(listing.revision) + 24)]
        assert events[0].obj is not None and json.loads(events[0].obj.data) == added
        assert events[1].obj is not None and json.loads(events[1].obj.data) == updated
        assert events[1].obj.revision == updated["metadata"]["resourceVersion"]
        await it.aclose()  # type: ignore[attr-defined]
        [req] = api.watch_requests()
        assert req.path == "/api/v1/services"
        assert {k: v for k, v in req.query.items() if k != "timeoutSeconds"} == {
            "watch": ["1"], "resourceVersion": [listing.revision],
            "allowWatchBookmarks": ["true"]}
        assert 30 <= int(req.param("timeoutSeconds") or 0) <= 60
        assert req.headers["accept"] == "application/json"
        assert req.headers["authorization"] == "Bearer good-token"
    finally:
        await store.close()
        await api.stop()


async def test_watch_bookmark_carries_only_a_revision(certs: Certs) -> None:
    api = FakeKubeAPI(certs, bookmark_interval=0.05)
    await api.start()
    store = KubernetesStore(config_for(api), watch_timeout=30)
    try:
        listing = await store.list(NODE)
        api.create("services", service("elsewhere"))  # moves the revision, not a Node event
        it = store.watch(NODE, revision=listing.revision).__aiter__()
        [event] = await next_events(it, 1)
        assert event == Event(EventType.BOOKMARK, str(api.rv), None)
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await store.close()
        await api.stop()


async def test_watch_ends_when_server_timeout_passes(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    store.watch_timeout = 1
    started = time.monotonic()
    events = [e async for e in store.watch(SERVICE, revision=str(api.rv))]
    assert events == []
    assert 1.0 <= time.monotonic() - started < 4.0
    assert api.open_watches == 0


@pytest.mark.parametrize("expire_as", ["event", "status"])
async def test_watch_from_compacted_revision_raises_expired(
    certs: Certs, expire_as: str
) -> None:
    api = FakeKubeAPI(certs, expire_as=expire_as)
    await api.start()
    store = KubernetesStore(config_for(api), watch_timeout=30)
    try:
        old = str(api.rv)
        api.create("services", service("web"))
        api.compact()
        with pytest.raises(Expired, match=r"410.*too old resource version"):
            async for _ in store.watch(SERVICE, revision=old):
                pass
    finally:
        await store.close()
        await api.stop()


async def test_watch_selectors_are_sent_and_leaving_objects_are_deleted(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    sel = Selector(labels="app=web")
    it = store.watch(SERVICE, revision=str(api.rv), selector=sel).__aiter__()
    first = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.05)
    api.create("services", service("a", app="web"))
    api.create("services", service("b", app="db"))
    api.update("services", service("a", app="other"))
    events = [await asyncio.wait_for(first, 5), *await next_events(it, 1)]
    assert [(e.type, e.obj and e.obj.name) for e in events] == [
        (EventType.ADDED, "a"), (EventType.DELETED, "a")]
    await it.aclose()  # type: ignore[attr-defined]
    assert api.watch_requests()[0].param("labelSelector") == "app=web"


async def test_dropped_watch_raises_unavailable(api: FakeKubeAPI, store: KubernetesStore
                                                ) -> None:
    it = store.watch(SERVICE, revision=str(api.rv)).__aiter__()
    pending = asyncio.ensure_future(anext(it))
    async with asyncio.timeout(5):
        while not api.open_watches:
            await asyncio.sleep(0.01)
    assert api.drop_watches() == 1
    with pytest.raises(Unavailable, match="connection lost"):
        await asyncio.wait_for(pending, 5)


async def test_watch_error_event_other_than_410_is_unavailable(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    it = store.watch(SERVICE, revision=str(api.rv)).__aiter__()
    pending = asyncio.ensure_future(anext(it))
    await wait_for(lambda: api.open_watches == 1)
    api.error_watches(500, "Internal error occurred: etcdserver: request timed out")
    with pytest.raises(Unavailable, match="500 InternalError: Internal error occurred"):
        await asyncio.wait_for(pending, 5)


# --- put / delete -------------------------------------------------------------------------------


async def test_put_creates_then_replaces_and_delete_removes(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    created = await store.put(SERVICE, service("web", namespace="prod"))
    assert created.key == "prod/web" and created.revision == str(api.rv)
    apply = api.requests[-1]  # server-side apply: one PATCH creates or updates
    assert (apply.method, apply.path) == ("PATCH", "/api/v1/namespaces/prod/services/web")
    assert apply.query == {"fieldManager": ["svcnet"], "force": ["true"]}
    assert apply.headers["content-type"] == "application/apply-patch+yaml"
    assert int(apply.headers["content-length"]) == len(apply.body)
    assert json.loads(apply.body)["kind"] == "Service"

    mark = len(api.requests)
    changed = service("web", namespace="prod", tier="front")
    changed["metadata"]["resourceVersion"] = "1"  # not sent: put applies unconditionally
    replaced = await store.put(SERVICE, changed)
    assert replaced.revision == str(api.rv)
    assert [(r.method, r.path) for r in api.requests[mark:]] == [
        ("PATCH", "/api/v1/namespaces/prod/services/web")]
    assert "resourceVersion" not in json.loads(api.requests[-1].body)["metadata"]
    assert api.objects("services")["prod/web"]["metadata"]["labels"] == {"tier": "front"}

    await store.delete(SERVICE, "prod", "web")
    assert (api.requests[-1].method, api.requests[-1].path) == (
        "DELETE", "/api/v1/namespaces/prod/services/web")
    with pytest.raises(NotFound, match='services "web" not found'):
        await store.delete(SERVICE, "prod", "web")


async def test_put_paths_for_group_and_cluster_scoped_kinds(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    await store.put(ENDPOINT_SLICE, {"metadata": {"name": "web-1", "namespace": "ns1"},
                                     "addressType": "IPv4", "endpoints": []})
    await store.put(NODE, {"metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.1.0.0/24"}})
    await store.delete(NODE, "", "node-1")
    assert [(r.method, r.path) for r in api.requests] == [
        ("PATCH", "/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices/web-1"),
        ("PATCH", "/api/v1/nodes/node-1"), ("DELETE", "/api/v1/nodes/node-1")]
    assert json.loads(api.requests[0].body)["apiVersion"] == "discovery.k8s.io/v1"


async def test_put_applies_over_another_writer_and_drops_what_it_no_longer_sets(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    first = service("web", by="us", old="yes")
    await store.put(SERVICE, first)
    other = api.objects("services")["default/web"]
    api.update("services", {**other, "metadata": {**other["metadata"], "labels": {
        **other["metadata"]["labels"], "by": "someone-else", "theirs": "1"}}})
    raw = await store.put(SERVICE, service("web", by="us"))
    assert [r.method for r in api.requests] == ["PATCH", "PATCH"]
    # ours wins (force), the label we stopped applying goes, theirs stays
    assert json.loads(raw.data)["metadata"]["labels"] == {"by": "us", "theirs": "1"}


# --- errors -------------------------------------------------------------------------------------


async def test_unauthorized_and_forbidden_are_invalid_with_a_clear_message(
    api: FakeKubeAPI
) -> None:
    for token, pattern in ((None, "401 Unauthorized"), ("wrong", "401 Unauthorized")):
        s = KubernetesStore(config_for(api, token=token))
        with pytest.raises(Invalid, match=f"{pattern}.*token or client certificate"):
            await s.list(SERVICE)
        await s.close()
    api.forbidden_users.add("alice")
    s = KubernetesStore(config_for(api))
    with pytest.raises(Invalid, match='403 Forbidden: services is forbidden: User "alice" '
                                      "cannot list"):
        await s.list(SERVICE)
    with pytest.raises(Invalid, match="403"):
        async for _ in s.watch(SERVICE, revision="1"):
            pass
    await s.close()


async def test_server_errors_and_refused_connections_are_unavailable(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    api.inject(500)
    with pytest.raises(Unavailable, match="500 InternalError"):
        await store.list(SERVICE)
    api.inject(503, when=lambda r: r.param("watch") == "1")
    with pytest.raises(Unavailable, match="503"):
        async for _ in store.watch(SERVICE, revision="1"):
            pass
    await api.stop()
    with pytest.raises(Unavailable):
        await store.list(SERVICE)
    with pytest.raises(Unavailable, match="cannot connect"):
        async for _ in store.watch(SERVICE, revision="1"):
            pass


async def test_throttling_honours_retry_after(api: FakeKubeAPI, store: KubernetesStore) -> None:
    api.create("services", service("web"))
    api.inject(429, retry_after=1)
    started = time.monotonic()
    listing = await store.list(SERVICE)
    assert len(listing.items) == 1 and time.monotonic() - started >= 1.0
    api.inject(429, retry_after=1, when=lambda r: r.param("watch") == "1")
    store.watch_timeout = 1
    started = time.monotonic()
    assert [e async for e in store.watch(SERVICE, revision=listing.revision)] == []
    assert len(api.watch_requests()) == 2 and time.monotonic() - started >= 2.0
    api.inject(429, retry_after=3600)
    with pytest.raises(Unavailable, match="Retry-After 3600s"):
        await store.list(SERVICE)


async def test_keep_alive_connection_is_reused_and_recovers_when_closed(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    await store.list(SERVICE)
    await store.list(SERVICE)
    assert len(api._conns) == 1
    for w in list(api._conns):
        w.transport.abort()  # the server drops the idle keep-alive connection
    await asyncio.sleep(0.05)
    assert (await store.list(SERVICE)).revision == str(api.rv)
    assert len(api.requests) == 3


async def test_cancelled_request_does_not_poison_the_shared_connection(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    api.create("services", service("web"))
    api.delay = 0.3
    slow = asyncio.ensure_future(store.list(SERVICE))
    await asyncio.sleep(0.1)
    slow.cancel()
    api.delay = 0.0
    raw = await store.put(SERVICE, service("other"))
    assert raw.key == "default/other"


# --- TLS and credentials ------------------------------------------------------------------------


async def test_client_certificate_authentication(api: FakeKubeAPI, certs: Certs) -> None:
    s = KubernetesStore(config_for(api, token=None,
                                   client_cert_pem=certs.client_crt.read_bytes(),
                                   client_key_pem=certs.client_key.read_bytes()))
    await s.list(SERVICE)
    await s.close()
    assert api.requests[-1].user == "system:node:node-1"
    assert "authorization" not in api.requests[-1].headers


async def test_server_certificate_is_verified(api: FakeKubeAPI, certs: Certs) -> None:
    s = KubernetesStore(config_for(api, ca_pem=certs.other_ca_crt.read_text()))
    with pytest.raises(Invalid, match="TLS verification failed"):
        await s.list(SERVICE)
    with pytest.raises(Invalid, match="TLS verification failed"):
        async for _ in s.watch(SERVICE, revision="1"):
            pass
    await s.close()
    s = KubernetesStore(config_for(api, ca_pem=None, insecure_skip_tls_verify=True))
    await s.list(SERVICE)
    await s.close()
    s = KubernetesStore(config_for(api, server=f"https://localhost:{api.port}",
                                   tls_server_name="kubernetes.default.svc"))
    await s.list(SERVICE)
    await s.close()
    assert api.requests[-1].headers["host"] == f"localhost:{api.port}"


async def test_plain_http_and_a_path_prefix(certs: Certs) -> None:
    """``kubectl proxy`` serves plain HTTP; Rancher-style URLs put a prefix before /api."""
    api = FakeKubeAPI(certs, tls=False, prefix="/k8s/clusters/c-1")
    await api.start()
    s = KubernetesStore(config_for(api, ca_pem=None), watch_timeout=1)
    try:
        assert s.config.server.startswith("http://") and s.config.path_prefix
        await s.put(SERVICE, service("web"))
        assert [o.name for o in (await s.list(SERVICE)).items] == ["web"]
        assert [e async for e in s.watch(SERVICE, revision=str(api.rv))] == []
        assert [(r.method, r.path) for r in api.requests] == [
            ("PATCH", "/api/v1/namespaces/default/services/web"), ("GET", "/api/v1/services"),
            ("GET", "/api/v1/services")]
        assert api.requests[0].headers["host"] == f"127.0.0.1:{api.port}"
    finally:
        await s.close()
        await api.stop()


# --- kubeconfig ---------------------------------------------------------------------------------


def write_kubeconfig(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def kubeconfig_doc(api: FakeKubeAPI, user: dict[str, Any], *, cluster: dict[str, Any] | None = None,
                   current: str = "main") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [
            {"name": "fake", "cluster": cluster or {
                "server": api.url,
                "certificate-authority-data": Certs.b64(api.certs.ca_crt)}},
            {"name": "elsewhere", "cluster": {"server": "https://192.0.2.1:6443"}},
        ],
        "users": [{"name": "u", "user": user}, {"name": "nobody", "user": {}}],
        "contexts": [
            {"name": "main", "context": {"cluster": "fake", "user": "u", "namespace": "apps"}},
            {"name": "other", "context": {"cluster": "elsewhere", "user": "nobody"}},
        ],
    }


async def test_kubeconfig_with_token_and_inline_ca_drives_the_store(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    path = write_kubeconfig(tmp_path / "config", kubeconfig_doc(api, {"token": "good-token"}))
    s = KubernetesStore.from_config(kubeconfig=path, context=None)
    assert s.config.namespace == "apps" and s.config.server == api.url
    await s.put(SERVICE, service("web"))
    assert [o.key for o in (await s.list(SERVICE)).items] == ["default/web"]
    await s.close()


async def test_kubeconfig_client_certificate_files_relative_to_the_config(
    api: FakeKubeAPI, certs: Certs, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    for src, dst in ((certs.ca_crt, "ca.crt"), (certs.client_crt, "me.crt"),
                     (certs.client_key, "me.key")):
        (tmp_path / "pki" / dst).write_bytes(src.read_bytes())
    doc = kubeconfig_doc(api, {"client-certificate": "pki/me.crt", "client-key": "pki/me.key"},
                         cluster={"server": api.url, "certificate-authority": "pki/ca.crt"})
    path = write_kubeconfig(tmp_path / "config", doc)
    s = KubernetesStore.from_config(kubeconfig=path, context="main")
    await s.list(SERVICE)
    await s.close()
    assert api.requests[-1].user == "system:node:node-1"


async def test_kubeconfig_client_certificate_data(api: FakeKubeAPI, certs: Certs,
                                                  tmp_path: Path) -> None:
    doc = kubeconfig_doc(api, {"client-certificate-data": Certs.b64(certs.client_crt),
                               "client-key-data": Certs.b64(certs.client_key)})
    s = KubernetesStore.from_config(
        kubeconfig=write_kubeconfig(tmp_path / "config", doc), context=None)
    await s.list(SERVICE)
    await s.close()
    assert api.requests[-1].user == "system:node:node-1"


async def test_token_file_is_reread_after_rotation(api: FakeKubeAPI, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("good-token\n")
    doc = kubeconfig_doc(api, {"tokenFile": "token"})
    cfg = from_kubeconfig([write_kubeconfig(tmp_path / "config", doc)])
    assert cfg.token_file == str(tmp_path / "token")
    s = KubernetesStore(cfg)
    await s.list(SERVICE)
    api.tokens = {"rotated": "alice"}
    token.write_text("rotated")
    monkeypatch.setattr("svcnet.store.kubeconfig.TOKEN_RELOAD_SECONDS", 0.0)
    await s.list(SERVICE)
    await s.close()
    assert [r.headers["authorization"] for r in api.requests] == [
        "Bearer good-token", "Bearer rotated"]


async def test_token_file_is_reread_at_once_after_a_401(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("good-token")
    s = KubernetesStore(config_for(api, token=None, token_file=str(token)))
    await s.list(SERVICE)
    api.tokens = {"rotated": "alice"}
    token.write_text("rotated")
    await s.list(SERVICE)
    await s.close()
    assert [r.headers["authorization"] for r in api.requests[:3]] == [
        "Bearer good-token", "Bearer good-token", "Bearer rotated"]


PLUGIN = """#!/bin/sh
echo ran >> "$COUNT_FILE"
[ -n "$KUBERNETES_EXEC_INFO" ] || { echo "no exec info" >&2; exit 3; }
[ "$1" = "get-token" ] || { echo "bad args: $*" >&2; exit 4; }
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
printf '"status":{"token":"%s","expirationTimestamp":"2099-01-01T00:00:00Z"}}' "$(cat "$SRC")"
"""


async def test_exec_credential_plugin(api: FakeKubeAPI, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    plugin = tmp_path / "bin" / "get-token.sh"
    plugin.write_text(PLUGIN)
    plugin.chmod(0o755)
    (tmp_path / "src").write_text("good-token")
    runs = tmp_path / "runs"
    doc = kubeconfig_doc(api, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "./bin/get-token.sh",
        "args": ["get-token"], "interactiveMode": "Never",
        "env": [{"name": "COUNT_FILE", "value": str(runs)},
                {"name": "SRC", "value": str(tmp_path / "src")}]}})
    s = KubernetesStore.from_config(
        kubeconfig=write_kubeconfig(tmp_path / "config", doc), context=None)
    await s.list(SERVICE)
    await s.list(SERVICE)
    assert runs.read_text().count("ran") == 1  # cached until it expires
    api.tokens = {"next": "alice"}
    (tmp_path / "src").write_text("next")
    await s.list(SERVICE)  # 401 -> the plugin runs again
    assert runs.read_text().count("ran") == 2
    assert api.requests[-1].headers["authorization"] == "Bearer next"
    await s.close()
    doc["users"][0]["user"]["exec"]["args"] = ["oops"]
    s = KubernetesStore.from_config(
        kubeconfig=write_kubeconfig(tmp_path / "config", doc), context=None)
    with pytest.raises(Invalid, match=r"get-token\.sh' exited with 4: bad args: oops"):
        await s.list(SERVICE)
    await s.close()


def test_kubeconfig_contexts_and_merging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         certs: Certs) -> None:
    api = FakeKubeAPI(certs)
    api.port = 6443
    first = write_kubeconfig(tmp_path / "a", kubeconfig_doc(api, {"token": "t1"}))
    second = write_kubeconfig(tmp_path / "b", {
        "current-context": "ignored-second",
        "clusters": [{"name": "fake", "cluster": {"server": "https://ignored:1"}},
                     {"name": "extra", "cluster": {"server": "https://198.51.100.7"}}],
        "users": [{"name": "x", "user": {"token": "tx"}}],
        "contexts": [{"name": "extra", "context": {"cluster": "extra", "user": "x"}}],
    })
    env = {"KUBECONFIG": f"{first}:{tmp_path / 'missing'}:{second}", "HOME": str(tmp_path)}
    main = load(None, None, environ=env)
    assert (main.server, main.token, main.namespace) == (api.url, "t1", "apps")
    extra = load(None, "extra", environ=env)
    assert (extra.server, extra.token, extra.port, extra.namespace) == (
        "https://198.51.100.7", "tx", 443, "default")
    other = load(first, "other", environ=env)
    assert other.server == "https://192.0.2.1:6443" and other.token is None
    with pytest.raises(Invalid, match=r"context 'nope' not found \(known: extra, main, other\)"):
        load(None, "nope", environ=env)
    # ~/.kube/config when nothing else is given
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(Path(second).read_text())
    home = load(None, "extra", environ={"HOME": str(tmp_path)})
    assert home.server == "https://198.51.100.7"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update({"current-context": ""}), "no current-context"),
    (lambda d: d["contexts"][0]["context"].update({"cluster": "gone"}), "unknown cluster 'gone'"),
    (lambda d: d["contexts"][0]["context"].update({"user": "gone"}), "unknown user 'gone'"),
    (lambda d: d["clusters"][0]["cluster"].update({"server": "ftp://x"}), "not an http"),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": "@@"}),
     "certificate-authority-data is not valid base64"),
    (lambda d: d["clusters"][0]["cluster"].update({
        "certificate-authority-data": base64.b64encode(b"junk").decode()}),
     "holds no PEM certificate"),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority": "/nonexistent"}),
     "both certificate-authority and certificate-authority-data are given"),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": base64.b64encode(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").decode()}),
     "certificate authority not usable"),
    (lambda d: d["clusters"][0].update({"cluster": {"server": "https://h",
                                                    "certificate-authority": "/nonexistent"}}),
     "cannot read certificate-authority /nonexistent"),
    (lambda d: d["users"][0]["user"].update({"auth-provider": {"name": "gcp"}}),
     "plugin 'auth-provider' is not supported"),
    (lambda d: d["users"][0]["user"].update({"exec": {"args": ["x"]}}),
     "user exec has no command"),
    (lambda d: d["users"][0]["user"].update({"client-key-data": "AAAA"}),
     "client certificate and client key must both be given"),
    (lambda d: d.update({"clusters": {"fake": {}}}), "clusters is not a list"),
])
def test_bad_kubeconfig_is_invalid_with_a_clear_message(
    tmp_path: Path, certs: Certs, mutate: Any, message: str
) -> None:
    api = FakeKubeAPI(certs)
    doc = kubeconfig_doc(api, {"token": "t"})
    mutate(doc)
    path = write_kubeconfig(tmp_path / "config", doc)
    with pytest.raises(Invalid, match=message) as err:
        KubernetesStore.from_config(kubeconfig=path, context=None)
    assert str(tmp_path / "config") in str(err.value) or "/nonexistent" in str(err.value)


def test_unreadable_kubeconfigs(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match=r"cannot read kubeconfig .*/nope"):
        load(str(tmp_path / "nope"))
    (tmp_path / "bad").write_text("clusters: [\n")
    with pytest.raises(Invalid, match="is not valid YAML"):
        load(str(tmp_path / "bad"))
    with pytest.raises(Invalid, match=r"\$KUBECONFIG names no existing file"):
        load(environ={"KUBECONFIG": str(tmp_path / "nope")})
    with pytest.raises(Invalid, match="no Kubernetes config"):
        load(environ={"HOME": str(tmp_path)})


async def test_in_cluster_service_account(api: FakeKubeAPI, tmp_path: Path) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("good-token")
    (sa / "ca.crt").write_bytes(api.certs.ca_crt.read_bytes())
    (sa / "namespace").write_text("kube-system\n")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port),
           "HOME": str(tmp_path)}
    cfg = load(None, None, environ=env, service_account_dir=str(sa))
    assert (cfg.server, cfg.namespace, cfg.token_file) == (
        api.url, "kube-system", str(sa / "token"))
    s = KubernetesStore(cfg)
    await s.list(SERVICE)
    await s.close()
    assert api.requests[-1].headers["authorization"] == "Bearer good-token"
    v6 = in_cluster(environ={"KUBERNETES_SERVICE_HOST": "fd00::1",
                             "KUBERNETES_SERVICE_PORT": "443"}, service_account_dir=str(sa))
    assert (v6.server, v6.host, v6.port) == ("https://[fd00::1]:443", "fd00::1", 443)
    with pytest.raises(Invalid, match="no service account token"):
        in_cluster(environ=env, service_account_dir=str(tmp_path / "missing"))


# --- the CLI against it -------------------------------------------------------------------------


def test_cli_apply_get_delete_with_store_kubernetes(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from svcnet.cli import main

    with serve_in_thread(certs) as server:
        config = write_kubeconfig(tmp_path / "config", kubeconfig_doc(server.api, {
            "token": "good-token"}))
        manifest = tmp_path / "web.yaml"
        manifest.write_text(yaml.safe_dump(service("web")))
        store_args = ["--store", "kubernetes", "--kubeconfig", config, "--context", "main"]
        assert main(["apply", "-f", str(manifest), *store_args]) == 0
        assert "service/default/web applied" in capsys.readouterr().out
        server.call(server.api.create, "services", service("db", namespace="prod"))
        assert main(["get", "services", "-A", "-o", "json", *store_args]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(o["kind"], o["metadata"]["name"]) for o in printed] == [
            ("Service", "web"), ("Service", "db")]
        assert main(["delete", "service", "web", *store_args]) == 0
        assert main(["delete", "service", "web", *store_args]) == 2
        assert 'services "web" not found' in capsys.readouterr().err
        assert sorted(server.call(server.api.objects, "services")) == ["prod/db"]


# --- the informer on the kubernetes store -------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str | None]] = []

    def __call__(self, old: Any, new: Any) -> None:
        self.changes.append((old and old.metadata.name, new and new.metadata.name))


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_informer_relists_after_410_and_delivers_deletes_missed_while_away(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    for name in ("a", "b", "c"):
        api.create("services", service(name))
    informer = Informer(store, SERVICE, backoff=Backoff(0.01, 0.05))
    seen = Recorder()
    informer.add_handler(Callbacks(seen))
    informer.start()
    try:
        await informer.wait_synced(5)
        await wait_for(lambda: api.open_watches == 1)
        # Away: the next watch attempts fail, and meanwhile b goes, d comes, history is lost.
        api.inject(503, count=2, when=lambda r: r.param("watch") == "1")
        api.drop_watches()
        api.delete("services", "default", "b")
        api.create("services", service("d"))
        api.compact()
        await wait_for(lambda: ("b", None) in seen.changes and (None, "d") in seen.changes)
        assert sorted(informer.cache.keys_snapshot()) == ["default/a", "default/c", "default/d"]
        lists = [r for r in api.requests if r.param("watch") is None]
        assert len(lists) == 2
        expired = [r for r in api.watch_requests() if r.param("resourceVersion") ==
                   api.watch_requests()[0].param("resourceVersion")]
        assert len(expired) >= 2  # the failed retries and the one answered with ERROR 410
    finally:
        await informer.stop()


async def test_informer_resumes_from_last_revision_after_dropped_connection(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    api.create("services", service("a"))
    informer = Informer(store, SERVICE, backoff=Backoff(0.01, 0.05))
    seen = Recorder()
    informer.add_handler(Callbacks(seen))
    informer.start()
    try:
        await informer.wait_synced(5)
        await wait_for(lambda: api.open_watches == 1)
        api.create("services", service("b"))
        await wait_for(lambda: (None, "b") in seen.changes)
        last = informer.revision
        api.inject(503, when=lambda r: r.param("watch") == "1")
        api.drop_watches()
        api.update("services", service("a", v="2"))
        api.delete("services", "default", "b")
        api.create("services", service("c"))
        await wait_for(lambda: (None, "c") in seen.changes)
        assert seen.changes == [(None, "a"), (None, "b"), ("a", "a"), ("b", None), (None, "c")]
        watches = api.watch_requests()
        assert [r.param("resourceVersion") for r in watches[1:]] == [last, last]
        assert sum(r.param("watch") is None for r in api.requests) == 1  # no relist
        assert informer.revision == str(api.rv)
    finally:
        await informer.stop()


async def test_informer_stops_promptly_while_reconnecting(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    """A cancellation must never be lost in the connect/request path (Python 3.11's
    ``wait_for`` drops one that arrives as the connection completes)."""
    api.inject(503, count=10**6, when=lambda r: r.param("watch") == "1")
    for i in range(15):
        informer = Informer(store, SERVICE, backoff=Backoff(0.0005, 0.001))
        informer.start()
        await informer.wait_synced(5)
        await asyncio.sleep(0.001 * (i % 7))
        async with asyncio.timeout(5):
            await informer.stop()


async def test_informer_with_selectors_follows_objects_leaving_the_selection(
    api: FakeKubeAPI, store: KubernetesStore
) -> None:
    """kube-proxy's selector: a Service that gains ``service-proxy-name`` is no longer ours."""
    proxy_label = "service.kubernetes.io/service-proxy-name"
    api.create("services", service("web"))
    api.create("services", service("mesh", **{proxy_label: "other-proxy"}))
    api.create("pods", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "p1", "namespace": "default"},
                        "spec": {"nodeName": "node-1"}})
    api.create("pods", {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "p2", "namespace": "default"},
                        "spec": {"nodeName": "node-2"}})
    services = Informer(store, SERVICE, selector=Selector(labels=f"!{proxy_label}"),
                        backoff=Backoff(0.01, 0.05))
    pods = Informer(store, POD, selector=Selector(fields="spec.nodeName=node-1"),
                    backoff=Backoff(0.01, 0.05))
    seen = Recorder()
    services.add_handler(Callbacks(seen))
    services.start()
    pods.start()
    try:
        await services.wait_synced(5)
        await pods.wait_synced(5)
        assert services.cache.keys_snapshot() == ["default/web"]
        assert pods.cache.keys_snapshot() == ["default/p1"]
        await wait_for(lambda: api.open_watches == 2)
        api.update("services", service("web", **{proxy_label: "other-proxy"}))
        api.update("services", service("mesh"))
        await wait_for(lambda: ("web", None) in seen.changes and (None, "mesh") in seen.changes)
        assert services.cache.keys_snapshot() == ["default/mesh"]
        pod_queries = {r.param("fieldSelector") for r in api.requests if "pods" in r.path}
        assert pod_queries == {"spec.nodeName=node-1"}
    finally:
        await services.stop()
        await pods.stop()
