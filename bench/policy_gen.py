"""Realistic NetworkPolicy workloads: namespaces, pods and policies as Kubernetes JSON.

A cluster operator's policies are not random selectors: they are a handful of shapes
repeated per namespace and per app (default deny, same-app, tier to tier, from the ingress
controller's namespace, from monitoring, egress to DNS, egress to the internet except the
private ranges). This module builds such a cluster deterministically (seeded), in the JSON
the API server serves, so the same objects go into a memory store, etcd or the tracer.

Shapes covered: default-deny ingress and egress, allow-all, empty and non-empty
podSelector, namespaceSelector alone and together with podSelector, matchExpressions (In,
NotIn, Exists, DoesNotExist), ipBlock with except (v4 and v6), ports by number and by
name (named container ports that map to different numbers in different apps), endPort
ranges, TCP/UDP/SCTP, several policies selecting the same pod (union).

Usage: ``generate(pods=10_000, namespaces=100, policies=1_000)``; ``with_pair`` adds two
pods with fixed addresses (the datapath bench's real pods) and the policies that let the
first reach the second, keeping the policy count; ``relabel`` is one pod label change.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

TEAMS = ("payments", "search", "identity", "checkout", "catalog", "ads", "ml", "data",
         "media", "web")
ENVS = ("prod", "staging", "dev")
TIERS = ("frontend", "backend", "db", "cache", "worker")
APP_WORDS = ("api", "gateway", "auth", "cart", "orders", "billing", "profile", "index",
             "ranker", "feed", "upload", "render", "notify", "ledger", "quote", "report")
SYSTEM = ("kube-system", "ingress-nginx", "monitoring", "cert-manager")
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.169.254/32")

POD_NET4 = ipaddress.IPv4Network("10.128.0.0/14")
POD_NET6 = ipaddress.IPv6Network("fd00:128::/64")
"""Synthetic pods' addresses: outside the overlay bench's 10.244.0.0/16, so the two real
pods of ``with_pair`` never collide with them."""


@dataclass
class Cluster:
    namespaces: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    policies: list[Obj] = field(default_factory=list)

    def objects(self) -> Iterator[tuple[str, Obj]]:
        """(kind name, object): namespaces first, then pods, then policies."""
        for ns in self.namespaces:
            yield "Namespace", ns
        for pod in self.pods:
            yield "Pod", pod
        for pol in self.policies:
            yield "NetworkPolicy", pol


@dataclass(frozen=True)
class App:
    name: str
    tier: str
    team: str
    ports: tuple[tuple[str, int, str], ...]
    """(name, containerPort, protocol) of its container."""


def tier_ports(tier: str, rng: random.Random) -> tuple[tuple[str, int, str], ...]:
    """Named ports as images declare them: the same name maps to different numbers."""
    http = ("http", rng.choice((8080, 8000, 3000, 80)), "TCP")
    metrics = ("metrics", rng.choice((9090, 9100, 8081)), "TCP")
    if tier == "frontend":
        return (http, metrics)
    if tier == "backend":
        return (http, ("grpc", rng.choice((50051, 9000)), "TCP"), metrics)
    if tier == "db":
        return (rng.choice((("postgres", 5432, "TCP"), ("mysql", 3306, "TCP"))),
                ("metrics", 9187, "TCP"))
    if tier == "cache":
        return (("redis", 6379, "TCP"), ("metrics", 9121, "TCP"))
    return (metrics, ("stats", 8125, "UDP"))


def namespace(name: str, labels: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": f"ns-{name}",
                         "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def pod(ns: str, name: str, labels: dict[str, str], ips: Sequence[str], node: str,
        ports: Sequence[tuple[str, int, str]]) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"pod-{ns}-{name}",
                     "labels": dict(labels)},
        "spec": {"nodeName": node, "containers": [{
            "name": "main", "image": f"registry.example/{labels.get('app', 'x')}:1",
            "ports": [{"name": n, "containerPort": p, "protocol": proto}
                      for n, p, proto in ports]}]},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
                   "hostIP": "192.0.2.1"},
    }


def policy(ns: str, name: str, spec: Obj) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": f"np-{ns}-{name}"},
            "spec": spec}


def ns_is(name: str) -> Obj:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def tcp(port: int | str, end: int | None = None) -> Obj:
    out: Obj = {"protocol": "TCP", "port": port}
    if end is not None:
        out["endPort"] = end
    return out


DNS_EGRESS = {"to": [{"namespaceSelector": ns_is("kube-system"),
                      "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
              "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def namespace_policies(ns: str, team: str, env: str, apps: Sequence[App],
                       rng: random.Random) -> list[Obj]:
    """This namespace's policies, most important first (a truncated list stays coherent)."""
    out = [policy(ns, "default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    if env == "prod":
        out.append(policy(ns, "default-deny-egress",
                          {"podSelector": {}, "policyTypes": ["Egress"]}))
        out.append(policy(ns, "allow-dns", {"podSelector": {}, "policyTypes": ["Egress"],
                                            "egress": [DNS_EGRESS]}))
        out.append(policy(ns, "allow-egress-same-namespace", {
            "podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
                {"podSelector": {}}]}]}))
    elif env == "dev" and rng.random() < 0.3:
        out.append(policy(ns, "allow-all-ingress", {"podSelector": {}, "ingress": [{}]}))
    out.append(policy(ns, "allow-prometheus", {
        "podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}},
                               "podSelector": {"matchLabels": {
                                   "app.kubernetes.io/name": "prometheus"}}}],
                     "ports": [{"port": "metrics"}]}]}))
    for app in apps:
        sel = {"matchLabels": {"app": app.name}}
        out.append(policy(ns, f"{app.name}-same-app", {
            "podSelector": sel, "ingress": [{"from": [{"podSelector": sel}]}]}))
        if app.tier == "frontend":
            out.append(policy(ns, f"{app.name}-from-ingress", {
                "podSelector": sel, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": ns_is("ingress-nginx")}],
                             "ports": [{"port": "http"}]},
                            {"from": [{"ipBlock": {"cidr": "203.0.113.0/24",
                                                   "except": ["203.0.113.128/25"]}},
                                      {"ipBlock": {"cidr": "2001:db8:100::/48",
                                                   "except": ["2001:db8:100:ff::/64"]}}],
                             "ports": [tcp(443)]}]}))
        elif app.tier == "backend":
            out.append(policy(ns, f"{app.name}-from-frontends", {
                "podSelector": sel,
                "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"tier": "frontend"}}},
                    {"namespaceSelector": {"matchLabels": {"team": team}},
                     "podSelector": {"matchExpressions": [
                         {"key": "tier", "operator": "In", "values": ["frontend", "backend"]}]}}],
                    "ports": [{"port": "http"}, {"port": "grpc"}]}]}))
            out.append(policy(ns, f"{app.name}-egress-internet", {
                "podSelector": sel, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_V4)}},
                                   {"ipBlock": {"cidr": "::/0", "except": ["fc00::/7"]}}],
                            "ports": [tcp(443), tcp(8443, 8449)]}]}))
        elif app.tier == "db":
            out.append(policy(ns, f"{app.name}-from-backends", {
                "podSelector": sel,
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["backend", "worker"]},
                    {"key": "quarantine", "operator": "DoesNotExist"}]}}],
                    "ports": [{"port": app.ports[0][0]}]}]}))
        elif app.tier == "cache":
            out.append(policy(ns, f"{app.name}-from-team", {
                "podSelector": sel,
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "team", "operator": "In", "values": [team]},
                    {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}],
                    "ports": [tcp(6379)]}]}))
        else:  # worker: callbacks on a port range, stats over UDP, a legacy SCTP feed
            out.append(policy(ns, f"{app.name}-ports", {
                "podSelector": sel,
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                    {"key": "team", "operator": "Exists"}]}}],
                    "ports": [tcp(30000, 32767), {"protocol": "UDP", "port": "stats"},
                              {"protocol": "SCTP", "port": 9899}]}]}))
    return out


def system_namespaces(rng: random.Random) -> list[tuple[Obj, list[App], list[Obj]]]:
    """kube-system (DNS), ingress-nginx, monitoring, cert-manager with their own policies."""
    dns = App("kube-dns", "dns", "platform", (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"),
                                              ("metrics", 9153, "TCP")))
    ingress = App("ingress-nginx", "edge", "platform", (("http", 80, "TCP"),
                                                        ("https", 443, "TCP")))
    prom = App("prometheus", "monitoring", "platform", (("web", 9090, "TCP"),))
    certs = App("cert-manager", "backend", "platform", (("webhook", 10250, "TCP"),))
    kube_system = [
        policy("kube-system", "dns-from-everyone", {
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "ingress": [{"from": [{"namespaceSelector": {}}],
                         "ports": [{"protocol": "UDP", "port": "dns"},
                                   {"protocol": "TCP", "port": "dns-tcp"}]}]})]
    edge = [
        policy("ingress-nginx", "from-internet", {
            "podSelector": {}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                "ports": [{"port": "http"}, {"port": "https"}]}]})]
    mon = [
        policy("monitoring", "default-deny-ingress",
               {"podSelector": {}, "policyTypes": ["Ingress"]}),
        policy("monitoring", "grafana-to-prometheus", {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "grafana"}}}],
                         "ports": [{"port": "web"}]}]})]
    return [
        (namespace("kube-system", {"team": "platform"}), [dns], kube_system),
        (namespace("ingress-nginx", {"team": "platform", "purpose": "edge"}), [ingress], edge),
        (namespace("monitoring", {"team": "platform", "purpose": "monitoring"}), [prom], mon),
        (namespace("cert-manager", {"team": "platform"}), [certs], []),
    ]


def addresses(index: int, dual_stack: bool) -> list[str]:
    ips = [str(POD_NET4.network_address + 10 + index)]
    if dual_stack:
        ips.append(str(POD_NET6.network_address + 10 + index))
    return ips


def generate(pods: int = 10_000, namespaces: int = 100, policies: int = 1_000, *,
             nodes: Sequence[str] = ("node-0",), seed: int = 17,
             dual_stack: bool = False) -> Cluster:
    """A cluster of ``pods`` pods over ``namespaces`` namespaces (4 of them system ones)
    and exactly ``policies`` NetworkPolicies (fewer only if the shapes run out, i.e. for
    tiny clusters). Pods are spread round-robin over ``nodes``."""
    if namespaces < len(SYSTEM) + 1 or pods < namespaces:
        raise ValueError(f"need at least {len(SYSTEM) + 1} namespaces and one pod each")
    rng = random.Random(seed)
    spaces: list[tuple[Obj, list[App], list[Obj]]] = system_namespaces(rng)
    for i in range(namespaces - len(spaces)):
        team, env = TEAMS[i % len(TEAMS)], ENVS[i // len(TEAMS) % len(ENVS)]
        name = f"{team}-{env}-{i // (len(TEAMS) * len(ENVS))}"
        labels = {"team": team, "env": env}
        if rng.random() < 0.3:
            labels["istio-injection"] = "enabled"
        apps = []
        words = rng.sample(APP_WORDS, rng.randint(3, 8))
        for j, word in enumerate(words):
            tier = TIERS[0] if j == 0 else TIERS[1] if j == 1 else rng.choice(TIERS)
            apps.append(App(word, tier, team, tier_ports(tier, rng)))
        spaces.append((namespace(name, labels), apps,
                       namespace_policies(name, team, env, apps, rng)))
    cluster = Cluster(namespaces=[ns for ns, _, _ in spaces])
    # Pods: a skewed share per namespace (some big, some small), at least one each.
    weights = [rng.uniform(0.3, 2.5) for _ in spaces]
    total = sum(weights)
    counts = [max(1, int(pods * w / total)) for w in weights]
    for k in range(pods - sum(counts)):
        counts[k % len(counts)] += 1
    while sum(counts) > pods:
        counts[counts.index(max(counts))] -= 1
    index = 0
    for (ns, apps, _), count in zip(spaces, counts, strict=True):
        ns_name = ns["metadata"]["name"]
        team = ns["metadata"]["labels"]["team"]
        for k in range(count):
            app = apps[k % len(apps)]
            labels = {"app": app.name, "app.kubernetes.io/name": app.name, "tier": app.tier,
                      "team": team, "version": rng.choice(("v1", "v1", "v2")),
                      "pod-template-hash": f"{rng.getrandbits(32):08x}"[:10]}
            if app.name == "kube-dns":
                labels["k8s-app"] = "kube-dns"
            cluster.pods.append(pod(ns_name, f"{app.name}-{k}", labels,
                                    addresses(index, dual_stack), nodes[index % len(nodes)],
                                    app.ports))
            index += 1
    # Policies: round-robin over namespaces by rank, so truncation keeps every namespace's
    # default deny before any namespace's last per-app rule.
    ranked = [pols for _, _, pols in spaces]
    rank = 0
    while len(cluster.policies) < policies and any(rank < len(p) for p in ranked):
        for pols in ranked:
            if rank < len(pols) and len(cluster.policies) < policies:
                cluster.policies.append(pols[rank])
        rank += 1
    extra = 0
    while len(cluster.policies) < policies:  # more per-app variants, like teams add over time
        ns, apps, _ = spaces[len(SYSTEM) + extra % (len(spaces) - len(SYSTEM))]
        app = apps[extra % len(apps)]
        cluster.policies.append(policy(ns["metadata"]["name"], f"{app.name}-extra-{extra}", {
            "podSelector": {"matchLabels": {"app": app.name, "version": "v2"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"team": app.team}}}],
                         "ports": [tcp(7000 + extra % 1000)]}]}))
        extra += 1
    return cluster


PAIR_NAMESPACE = "bench-datapath"


def with_pair(cluster: Cluster, client: tuple[str, str], server: tuple[str, str],
              server_ports: Sequence[tuple[str, int, str]]) -> Cluster:
    """``cluster`` plus a namespace holding a client pod and a server pod, (ip, node) each,
    under default deny both ways, where policies allow client -> server on the server's
    named ports only. The policy count stays the same (the last generated ones go)."""
    own = [
        policy(PAIR_NAMESPACE, "default-deny", {"podSelector": {},
                                                "policyTypes": ["Ingress", "Egress"]}),
        policy(PAIR_NAMESPACE, "allow-dns", {"podSelector": {}, "policyTypes": ["Egress"],
                                             "egress": [DNS_EGRESS]}),
        policy(PAIR_NAMESPACE, "server-from-client", {
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}],
                         "ports": [{"port": n} for n, _, _ in server_ports]}]}),
        policy(PAIR_NAMESPACE, "client-to-server", {
            "podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": "backend"}}}],
                        "ports": [{"port": n} for n, _, _ in server_ports]}]}),
    ]
    out = copy.deepcopy(cluster)
    out.namespaces.append(namespace(PAIR_NAMESPACE, {"team": "bench", "env": "prod"}))
    out.pods.append(pod(PAIR_NAMESPACE, "client", {"app": "client", "tier": "frontend",
                                                   "team": "bench"},
                        [client[0]], client[1], [("metrics", 9090, "TCP")]))
    out.pods.append(pod(PAIR_NAMESPACE, "server", {"app": "server", "tier": "backend",
                                                   "team": "bench"},
                        [server[0]], server[1], server_ports))
    out.policies = out.policies[:max(0, len(out.policies) - len(own))] + own
    return out


def relabel(cluster: Cluster, n: int) -> tuple[Obj, Obj]:
    """The ``n``-th label change: a pod moves to another app of its namespace (as a
    redeploy with a new selector does). The pod's app has a same-app policy, so the set of
    policies isolating it -- its group in the kernel -- changes. Returns (old, new) pod
    objects; ``cluster`` is updated. Deterministic in ``n``; the pod's addresses stay."""
    same_app = {(p["metadata"]["namespace"], p["metadata"]["name"][:-len("-same-app")])
                for p in cluster.policies if p["metadata"]["name"].endswith("-same-app")}
    candidates = [i for i, p in enumerate(cluster.pods)
                  if (p["metadata"]["namespace"], p["metadata"]["labels"]["app"]) in same_app]
    if not candidates:
        raise ValueError("no pod of an app with a same-app policy")
    i = candidates[(n * 7919) % len(candidates)]
    old = cluster.pods[i]
    ns = old["metadata"]["namespace"]
    apps = sorted({p["metadata"]["labels"]["app"] for p in cluster.pods
                   if p["metadata"]["namespace"] == ns} - {old["metadata"]["labels"]["app"]})
    new = copy.deepcopy(old)
    target = apps[n % len(apps)] if apps else f"moved-{n}"
    new["metadata"]["labels"]["app"] = target
    new["metadata"]["labels"]["app.kubernetes.io/name"] = target
    cluster.pods[i] = new
    return old, new


def summary(cluster: Cluster) -> dict[str, int]:
    """Counts of shapes, for the bench's table."""
    out = {"namespaces": len(cluster.namespaces), "pods": len(cluster.pods),
           "policies": len(cluster.policies), "ipBlock": 0, "namedPort": 0, "endPort": 0,
           "namespaceSelector": 0, "matchExpressions": 0, "egress": 0}
    for pol in cluster.policies:
        spec = pol["spec"]
        text = repr(spec)
        out["ipBlock"] += "ipBlock" in text
        out["endPort"] += "endPort" in text
        out["namespaceSelector"] += "namespaceSelector" in text
        out["matchExpressions"] += "matchExpressions" in text
        out["egress"] += "Egress" in spec.get("policyTypes", ())
        out["namedPort"] += any(isinstance(p.get("port"), str)
                                for rules in (spec.get("ingress", []), spec.get("egress", []))
                                for rule in rules for p in rule.get("ports", []))
    return out
