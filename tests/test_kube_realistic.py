"""What a real kube-apiserver does that a naive client trips over, against the corrected fake.

- Empty lists come back as ``null`` after the round trip through etcd (Go nil slices): an
  EndpointSlice scaled to zero is ``"endpoints": null``; the proxy and DNS must drop the old
  backends, through the kubernetes store and through the memory store alike.
- Re-creating a Service that fixes its clusterIP or nodePort is a 422 ("provided IP is
  already allocated"), not a 409: ``svcnet apply`` must still replace it, as kubectl does,
  including ``svcnet get svc X -o json | svcnet apply -f -``.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml
from conftest import require_binary
from dnskit import query
from kubeapi import Certs, FakeKubeAPI, make_certs, serve_in_thread
from svcnet.dns.daemon import DNSComponent, DNSOptions
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.state import Change, Changes, Family, NodeConfig, ServicePortState

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.base import Invalid, Store
from svcnet.store.kubeconfig import ClusterConfig
from svcnet.store.kubernetes import KubernetesStore
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory


@pytest.fixture(scope="module")
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


def kube_store(api: FakeKubeAPI) -> KubernetesStore:
    return KubernetesStore(ClusterConfig(server=api.url, ca_pem=api.certs.ca_crt.read_text(),
                                         token="good-token", source="test"), watch_timeout=30)


def service(name: str, cluster_ip: str, node_port: int = 0) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort" if node_port else "ClusterIP",
                     "clusterIP": cluster_ip, "ports": [port]}}


def endpoint_slice(service: str, *ips: str, empty: Any = ()) -> dict[str, Any]:
    """The slice kube-controller-manager keeps for ``service``; with no ``ips`` it is the
    empty placeholder it leaves on scale to zero (``empty`` is how the list is written)."""
    endpoints = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints or empty,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ips else empty}


# --- null lists -------------------------------------------------------------------------------


async def test_the_fake_sends_null_for_empty_lists_as_kube_apiserver_does(
    api: FakeKubeAPI,
) -> None:
    store = kube_store(api)
    try:
        raw = await store.put(ENDPOINT_SLICE, endpoint_slice("web"))
        assert json.loads(raw.data)["endpoints"] is None  # the create's answer
        listed = (await store.list(ENDPOINT_SLICE)).items[0]
        obj = json.loads(listed.data)
        assert obj["endpoints"] is None and obj["ports"] is None
        assert b'"endpoints":null' in listed.data
        decoded = ENDPOINT_SLICE.decode(listed.data)
        assert decoded.endpoints == () and decoded.ports == ()
        # omitempty lists and maps are left out instead
        raw = await store.put(SERVICE, {**service("hl", "None"), "spec": {
            "clusterIP": "None", "ports": [], "selector": {}}})
        assert "ports" not in json.loads(raw.data)["spec"]
    finally:
        await store.close()


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.last: Changes | None = None

    def sync(self, changes: Changes, *, full: bool) -> None:
        self.last = changes

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        state = {p.key: p for p in ports}
        self.sync(Changes({k: Change(None, p) for k, p in state.items()}, state), full=True)

    def healthy(self) -> bool:
        return True

    def cleanup(self) -> None:
        pass

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        pass

    def rules_total(self) -> Mapping[str, int]:
        return {}

    def kernel_items(self) -> frozenset[str] | None:
        return None

    def record_failure(self, *, full: bool) -> None:
        pass

    def endpoints(self, service: str) -> list[str]:
        state = self.last.state if self.last is not None else {}
        return sorted(b.ip for key, port in state.items() if key.name == service
                      for b in port.cluster_endpoints)


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def run_scale_to_zero(store: Store, empty: Any) -> None:
    """Proxy and DNS on one store; the Services' slices go from two endpoints to none."""
    await store.put(SERVICE, service("web", "10.96.7.7"))
    await store.put(SERVICE, service("hl", "None"))
    for name in ("web", "hl"):
        await store.put(ENDPOINT_SLICE, endpoint_slice(name, "10.1.0.1", "10.1.0.2"))
    factory = InformerFactory(store)
    backend = RecordingBackend()
    proxier = Proxier(backend, NodeConfig("n1"),  # type: ignore[arg-type]
                      settings=SyncSettings(min_sync_period=0.0))
    dns_server = DNSComponent(DNSOptions(listen=("127.0.0.1", 0), workers=1))
    tasks = [asyncio.create_task(proxier.run(factory)),
             asyncio.create_task(dns_server.run(factory, store))]

    async def headless_ips() -> list[str]:
        msg = await asyncio.to_thread(query, dns_server.server.port,
                                      "hl.default.svc.cluster.local.", "A")
        return sorted(rr.address for rrset in msg.answer for rr in rrset)

    try:
        async with asyncio.timeout(15):
            await dns_server.ready.wait()

        async def before() -> bool:
            return (backend.endpoints("web") == ["10.1.0.1", "10.1.0.2"]
                    and await headless_ips() == ["10.1.0.1", "10.1.0.2"])

        await eventually(before)
        for name in ("web", "hl"):
            await store.put(ENDPOINT_SLICE, endpoint_slice(name, empty=empty))

        async def after() -> bool:
            return backend.endpoints("web") == [] and await headless_ips() == []

        await eventually(after)
        msg = await asyncio.to_thread(query, dns_server.server.port,
                                      "hl.default.svc.cluster.local.", "A")
        assert msg.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) and not msg.answer
        assert not factory.failed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await factory.stop()


async def test_scale_to_zero_through_the_kubernetes_store_drops_old_backends(
    api: FakeKubeAPI,
) -> None:
    store = kube_store(api)
    try:
        await run_scale_to_zero(store, empty=[])  # stored and sent back as null
    finally:
        await store.close()
    assert api.objects("endpointslices")["default/web-abcde"]["endpoints"] is None


async def test_scale_to_zero_through_the_memory_store_drops_old_backends() -> None:
    await run_scale_to_zero(MemoryStore(), empty=None)


# --- apply: 422 on re-create ------------------------------------------------------------------


@pytest.mark.parametrize(("fixed", "field"), [
    ({"cluster_ip": "10.96.0.50"}, "spec.clusterIPs"),
    ({"cluster_ip": "", "node_port": 30080}, "spec.ports[0].nodePort"),
])
async def test_recreating_a_service_with_a_fixed_ip_or_port_is_a_422(
    api: FakeKubeAPI, fixed: dict[str, Any], field: str,
) -> None:
    store = kube_store(api)
    try:
        svc = service("web", fixed["cluster_ip"], fixed.get("node_port", 0))
        await store.put(SERVICE, svc)
        post = await store._request("POST", "/api/v1/namespaces/default/services",
                                    body=json.dumps(svc).encode())
        status = json.loads(post.body)
        assert post.status == 422 and status["reason"] == "Invalid"
        assert status["details"]["causes"][0]["field"] == field
        assert "is already allocated" in status["message"]
        # put (server-side apply) updates it, as kubectl apply would
        svc["metadata"]["labels"] = {"v": "2"}
        mark = len(api.requests)
        raw = await store.put(SERVICE, svc)
        assert json.loads(raw.data)["metadata"]["labels"] == {"v": "2"}
        assert [r.method for r in api.requests[mark:]] == ["PATCH"]
        # a Service that takes another's IP or port is a real error, reported as such
        with pytest.raises(Invalid, match=r'apply Service default/other: 422 Invalid: '
                                          r'Service "other" is invalid: .*already allocated'):
            await store.put(SERVICE, service("other", fixed["cluster_ip"],
                                             fixed.get("node_port", 0)))
    finally:
        await store.close()


def test_get_json_piped_into_apply_round_trips(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from svcnet.cli import main

    with serve_in_thread(certs) as server:
        config = tmp_path / "config"
        config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "main",
            "clusters": [{"name": "fake", "cluster": {
                "server": server.url, "certificate-authority-data": Certs.b64(certs.ca_crt)}}],
            "users": [{"name": "u", "user": {"token": "good-token"}}],
            "contexts": [{"name": "main", "context": {"cluster": "fake", "user": "u"}}]}))
        store_args = ["--store", "kubernetes", "--kubeconfig", str(config)]
        manifest = tmp_path / "web.yaml"
        manifest.write_text(yaml.safe_dump_all([service("web", "10.96.0.60", 30060),
                                                endpoint_slice("web", "10.1.0.9")]))
        for _ in range(2):  # applying the same manifest twice works, as with kubectl
            assert main(["apply", "-f", str(manifest), *store_args]) == 0
            assert "service/default/web applied" in capsys.readouterr().out
        assert main(["get", "svc", "web", "-o", "json", *store_args]) == 0
        printed = capsys.readouterr().out
        assert json.loads(printed)["metadata"]["resourceVersion"]
        monkeypatch.setattr("sys.stdin", io.StringIO(printed))
        assert main(["apply", "-f", "-", *store_args]) == 0
        assert "service/default/web applied" in capsys.readouterr().out
        stored = server.call(server.api.objects, "services")["default/web"]
        assert stored["spec"]["ports"][0]["nodePort"] == 30060
