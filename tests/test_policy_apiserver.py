"""NetworkPolicy, Namespace and Pod records against the real kube-apiserver (v1.28.7): the
objects it stores decode (its defaults and ``null`` lists included) and every policy our
validation refuses it refuses too, so the informer's rejections never differ from it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml
from test_policy_state import BAD

from svcnet.model import NAMESPACE, NETWORK_POLICY, POD, Kind

NS = "svcnet-netpol"


@pytest.fixture(scope="module")
def api(control_plane: Any) -> Any:
    with control_plane.namespace(NS):
        control_plane.kubectl("label", "namespace", NS, "team=blue")
        yield control_plane


def listed(cp: Any, kind: Kind[Any]) -> list[Any]:
    from svcnet.store.kubernetes import KubernetesStore

    async def go() -> list[Any]:
        store = KubernetesStore.from_config(kubeconfig=str(cp.admin_kubeconfig), context=None)
        try:
            return [kind.decode(raw.data) for raw in (await store.list(kind)).items
                    if raw.namespace in (NS, "") and raw.name in (NS, "web", "full", "defaults")]
        finally:
            await store.close()

    return asyncio.run(go())


def test_real_objects_decode(api: Any) -> None:
    api.apply([
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "full", "namespace": NS},
         "spec": {"podSelector": {"matchExpressions": [
             {"key": "app", "operator": "In", "values": ["web"]}]},
             "ingress": [{"from": [
                 {"namespaceSelector": {"matchLabels": {"team": "blue"}},
                  "podSelector": {"matchLabels": {"role": "client"}}},
                 {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                 "ports": [{"port": "http"}, {"port": 8000, "endPort": 8100,
                                              "protocol": "UDP"}, {"protocol": "SCTP"}]},
                 {}],
             "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/64"}}]}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "defaults", "namespace": NS},
         "spec": {"podSelector": {}, "ingress": [{"from": [], "ports": []}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": NS},
         "spec": {"containers": [{"name": "c", "image": "x", "ports": [
             {"name": "http", "containerPort": 8080}, {"containerPort": 53,
                                                      "protocol": "UDP"}]}]}},
    ])
    policies = {p.metadata.name: p for p in listed(api, NETWORK_POLICY)}
    full, defaults = policies["full"], policies["defaults"]
    # kube-apiserver fills policyTypes; protocol TCP on every port entry without one
    assert full.spec.policy_types == ("Ingress", "Egress")
    assert defaults.spec.policy_types == ("Ingress",)
    assert [p.protocol for p in full.spec.ingress[0].ports] == ["TCP", "UDP", "SCTP"]
    assert full.spec.ingress[0].from_[1].ip_block is not None
    assert full.spec.ingress[0].from_[1].ip_block.except_ == ("10.1.0.0/16",)
    assert full.spec.ingress[1].from_ == () and defaults.spec.ingress[0].ports == ()
    (pod,) = listed(api, POD)
    assert [(p.name, p.container_port, p.protocol) for p in pod.spec.containers[0].ports] == [
        ("http", 8080, "TCP"), ("", 53, "UDP")]
    (ns,) = listed(api, NAMESPACE)
    assert ns.metadata.labels == {"team": "blue", "kubernetes.io/metadata.name": NS}


@pytest.mark.parametrize("case", list(BAD))
def test_the_api_server_refuses_what_we_refuse(api: Any, case: str) -> None:
    spec, _ = BAD[case]
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "bad", "namespace": NS}, "spec": spec}
    result = api.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc),
                         check=False)
    assert result.returncode != 0, f"accepted: {yaml.safe_dump(spec)}"
