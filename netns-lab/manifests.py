"""``svcnet lab apply``: Kubernetes-shaped manifests in, store objects out.

Plays the API server's and controller-manager's parts the lab needs: ClusterIP and NodePort
allocation, uids, the scheduler (a Deployment's replicas spread over nodes, fewest pods
first) and the Deployment controller (replicas kept, extra pods gracefully deleted).
Deployments live in the lab directory, because the store only carries the kinds svcnet reads.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svcnet.lab.kubelet import DNS_HEALTH_PORT, now_rfc3339
from svcnet.lab.state import DNS_SERVICE_IP, SERVICE_NETWORK, LabConfig

from svcnet.model import POD, SERVICE
from svcnet.store.base import NotFound, Store

Obj = dict[str, Any]
NODE_PORT_RANGE = range(30000, 32768)
FIRST_ALLOCATED_OFFSET = 100
DEPLOYMENT_LABEL = "lab.svcnet.io/deployment"


class ManifestError(ValueError):
    """A manifest the lab cannot apply; the message names the object."""


@dataclass
class Cluster:
    """What apply needs to know about the cluster right now."""

    services: dict[str, Obj] = field(default_factory=dict)
    pods: dict[str, Obj] = field(default_factory=dict)

    @staticmethod
    async def read(store: Store) -> Cluster:
        c = Cluster()
        for raw in (await store.list(SERVICE)).items:
            c.services[raw.key] = json.loads(raw.data)
        for raw in (await store.list(POD)).items:
            c.pods[raw.key] = json.loads(raw.data)
        return c


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"


def allocate_service(svc: Obj, cluster: Cluster) -> Obj:
    """Fill clusterIP(s) and nodePorts, keeping what an existing service of that name has."""
    svc = dict(json.loads(json.dumps(svc)))
    meta = svc.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    if not meta.get("name"):
        raise ManifestError("Service without metadata.name")
    spec = svc.setdefault("spec", {})
    old = cluster.services.get(_key(svc))
    old_spec = (old or {}).get("spec", {})
    meta["uid"] = (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
    kind = spec.get("type", "ClusterIP")
    if kind != "ExternalName" and not spec.get("clusterIP"):
        if old_spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
        elif meta["name"] == "kube-dns" and meta["namespace"] == "kube-system":
            spec["clusterIP"] = DNS_SERVICE_IP
        else:
            spec["clusterIP"] = _free_cluster_ip(cluster)
    if spec.get("clusterIP") and spec["clusterIP"] != "None":
        spec["clusterIPs"] = [spec["clusterIP"]]
    if kind in ("NodePort", "LoadBalancer"):
        used = {p.get("nodePort") for s in cluster.services.values() if _key(s) != _key(svc)
                for p in s.get("spec", {}).get("ports", ())}
        old_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                     for p in old_spec.get("ports", ())}
        for port in spec.get("ports", ()):
            if not port.get("nodePort"):
                keep = old_ports.get((port.get("port"), port.get("protocol", "TCP")))
                port["nodePort"] = keep or next(p for p in NODE_PORT_RANGE if p not in used)
            used.add(port["nodePort"])
    for port in spec.get("ports", ()):
        port.setdefault("protocol", "TCP")
    return svc


def _free_cluster_ip(cluster: Cluster) -> str:
    used = {s.get("spec", {}).get("clusterIP") for s in cluster.services.values()}
    for offset in range(FIRST_ALLOCATED_OFFSET, SERVICE_NETWORK.num_addresses - 1):
        ip = str(SERVICE_NETWORK.network_address + offset)
        if ip not in used:
            return ip
    raise ManifestError(f"service network {SERVICE_NETWORK} is full")


def pick_node(nodes: list[str], pods: list[Obj], same_app: list[Obj]) -> str:
    """Fewest pods of this workload, then fewest pods overall, then node order."""
    mine = Counter(p.get("spec", {}).get("nodeName") for p in same_app)
    total = Counter(p.get("spec", {}).get("nodeName") for p in pods)
    return min(nodes, key=lambda n: (mine[n], total[n], nodes.index(n)))


def make_pod(template: Obj, *, name: str, namespace: str, node: str,
             extra_labels: dict[str, str] | None = None) -> Obj:
    pod: Obj = json.loads(json.dumps(template))
    meta = pod.setdefault("metadata", {})
    meta.update(name=name, namespace=namespace, uid=str(uuid.uuid4()))
    meta["labels"] = {**(meta.get("labels") or {}), **(extra_labels or {})}
    meta["creationTimestamp"] = now_rfc3339()
    spec = pod.setdefault("spec", {})
    spec.setdefault("containers", [{"name": "main", "image": "svcnet/echo"}])
    spec["nodeName"] = spec.get("nodeName") or node
    pod.update(apiVersion="v1", kind="Pod")
    pod["status"] = {"phase": "Pending"}
    return pod


def _suffix(n: int = 5) -> str:
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


@dataclass
class Applier:
    cfg: LabConfig
    store: Store
    messages: list[str] = field(default_factory=list)

    @property
    def deployments_dir(self) -> Path:
        return self.cfg.dir / "deployments"

    async def apply(self, docs: list[Obj]) -> list[str]:
        for doc in docs:
            kind = doc.get("kind")
            cluster = await Cluster.read(self.store)
            if kind == "Service":
                svc = allocate_service(doc, cluster)
                await self.store.put(SERVICE, svc)
                self.messages.append(f"service/{svc['metadata']['name']} "
                                     f"{svc['spec'].get('clusterIP', '')} applied")
            elif kind == "Pod":
                await self._apply_pod(doc, cluster)
            elif kind == "Deployment":
                await self._apply_deployment(doc)
            else:
                raise ManifestError(f"kind {kind!r} is not supported by the lab "
                                    "(Service, Pod, Deployment)")
        return self.messages

    async def _apply_pod(self, doc: Obj, cluster: Cluster) -> None:
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            raise ManifestError("Pod without metadata.name")
        namespace = meta.get("namespace") or "default"
        if f"{namespace}/{meta['name']}" in cluster.pods:
            self.messages.append(f"pod/{meta['name']} unchanged (pods are immutable)")
            return
        node = (doc.get("spec") or {}).get("nodeName") or pick_node(
            self.cfg.node_names, list(cluster.pods.values()), [])
        if node not in self.cfg.node_names:
            raise ManifestError(f"pod/{meta['name']}: node {node!r} is not in the lab")
        pod = make_pod(doc, name=meta["name"], namespace=namespace, node=node)
        await self.store.put(POD, pod)
        self.messages.append(f"pod/{meta['name']} scheduled to {node}")

    async def _apply_deployment(self, doc: Obj) -> None:
        meta = doc.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise ManifestError("Deployment without metadata.name")
        namespace = meta.get("namespace") or "default"
        spec = doc.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        match = (spec.get("selector") or {}).get("matchLabels") or labels
        if any(labels.get(k) != v for k, v in match.items()):
            raise ManifestError(f"deployment/{name}: selector does not match template labels")
        record = {"namespace": namespace, "name": name, "replicas": int(spec.get("replicas", 1)),
                  "template": template}
        self.deployments_dir.mkdir(parents=True, exist_ok=True)
        (self.deployments_dir / f"{namespace}.{name}.json").write_text(json.dumps(record))
        await self.reconcile_deployment(namespace, name)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        path = self.deployments_dir / f"{namespace}.{name}.json"
        try:
            record = json.loads(path.read_text())
        except OSError:
            raise ManifestError(f"deployment/{name} not found in namespace {namespace}"
                                ) from None
        record["replicas"] = replicas
        path.write_text(json.dumps(record))
        await self.reconcile_deployment(namespace, name)

    async def reconcile_deployment(self, namespace: str, name: str) -> None:
        record = json.loads((self.deployments_dir / f"{namespace}.{name}.json").read_text())
        template = record["template"]
        digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
        template_hash = format(int(digest[:8], 16), "x")[:10]
        cluster = await Cluster.read(self.store)
        owned = [p for p in cluster.pods.values()
                 if (p["metadata"].get("namespace") == namespace
                     and (p["metadata"].get("labels") or {}).get(DEPLOYMENT_LABEL) == name
                     and not p["metadata"].get("deletionTimestamp"))]
        want = record["replicas"]
        all_pods = list(cluster.pods.values())
        created = 0
        while len(owned) < want:
            node = pick_node(self.cfg.node_names, all_pods, owned)
            pod = make_pod(template, name=f"{name}-{template_hash}-{_suffix()}",
                           namespace=namespace, node=node,
                           extra_labels={DEPLOYMENT_LABEL: name,
                                         "pod-template-hash": template_hash})
            await self.store.put(POD, pod)
            owned.append(pod)
            all_pods.append(pod)
            created += 1
        removed = 0
        if len(owned) > want:
            # Newest first, like the ReplicaSet controller's preference for young pods.
            owned.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
            for pod in owned[: len(owned) - want]:
                await self.delete_pod(pod)
                removed += 1
        self.messages.append(f"deployment/{name} {want} replicas"
                             f" ({created} created, {removed} terminating)")

    async def delete_pod(self, pod: Obj) -> None:
        """Graceful delete: the kubelet sees deletionTimestamp, stops the pod, removes it."""
        pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": now_rfc3339()}}
        pod["metadata"].pop("resourceVersion", None)
        await self.store.put(POD, pod)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        kind = kind.lower()
        if kind in ("deployment", "deploy", "deployments"):
            path = self.deployments_dir / f"{namespace}.{name}.json"
            if not path.exists():
                raise ManifestError(f"deployment/{name} not found")
            await self.scale(namespace, name, 0)
            path.unlink()
        elif kind in ("pod", "pods", "po"):
            cluster = await Cluster.read(self.store)
            pod = cluster.pods.get(f"{namespace}/{name}")
            if pod is None:
                raise ManifestError(f"pod/{name} not found")
            await self.delete_pod(pod)
        elif kind in ("service", "services", "svc"):
            try:
                await self.store.delete(SERVICE, namespace, name)
            except NotFound:
                raise ManifestError(f"service/{name} not found") from None
        else:
            raise ManifestError(f"cannot delete kind {kind!r}")
        self.messages.append(f"{kind}/{name} deleted")


def dns_pod_names(cfg: LabConfig) -> list[str]:
    """``svcnet-dns`` on n1, ``svcnet-dns-2`` on n2 ...: one replica per node, wrapping."""
    return [f"svcnet-dns-{i + 1}" if i else "svcnet-dns" for i in range(cfg.dns_replicas)]


def system_objects(cfg: LabConfig) -> list[Obj]:
    """What every lab cluster has: the kube-dns Service and its DNS server pods."""
    if not cfg.dns:
        return []
    labels = {"k8s-app": "kube-dns"}
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"selector": labels, "clusterIP": DNS_SERVICE_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ] + [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": "kube-system", "labels": labels},
         "spec": {"nodeName": cfg.node_names[i % len(cfg.node_names)],
                  "dnsPolicy": "Default",  # the node's resolver as upstream, not itself
                  "containers": [{"name": "dns", "image": "svcnet/dns",
                                  "ports": [{"containerPort": 53, "protocol": "UDP"},
                                            {"containerPort": 53, "protocol": "TCP"}],
                                  # svcnet dns serves /ready on loopback only.
                                  "readinessProbe": {"exec": {"command": [
                                      "{python}", "-m", "svcnet.lab.echo", "call",
                                      f"http://127.0.0.1:{DNS_HEALTH_PORT}/ready",
                                      "--timeout", "1"]}}}]}}
        for i, name in enumerate(dns_pod_names(cfg))
    ]

