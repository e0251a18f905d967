"""The incremental computation and render give what computing from scratch gives.

Random sequences of pod, namespace and policy changes (labels, addresses, named ports,
node, phase, hostNetwork; namespace labels; policies of every shape the state knows:
pod and namespace selectors, ipBlock with except, named ports both ways, egress named ports
to every pod, policyTypes) are applied step by step, through ``compute_changes`` (the
changed keys only) and through ``compute`` with the memo (the whole snapshot, diffed by
identity); after each step both must equal ``compute`` from scratch, the render patched
from the previous one must equal a fresh render, and the incremental script it yields must
equal the one computed without the render's hint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svcnet.policy.nftables import ElementCache, render, update_script
from svcnet.policy.state import Memo, compute, compute_changes

from svcnet.model import NAMESPACE, NETWORK_POLICY, POD, Namespace, NetworkPolicy, Pod

SPACES = ("x", "y", "z")
NAMES = ("p0", "p1", "p2", "p3")
APPS = ("a", "b", "c")


def make_pod(ns: str, name: str, app: str, tier: str | None, node: str, variant: int,
             port: int, phase: str, host: bool, address: bool) -> Pod:
    """Each pod has addresses of its own (two variants), so no two live pods share one."""
    i, j = SPACES.index(ns) + 1, NAMES.index(name) + 1
    ips = (f"10.{i}.{j}.{variant + 1}", f"fd00::{i}:{j}:{variant + 1}")
    labels = {"app": app, **({"tier": tier} if tier else {})}
    status: dict[str, Any] = {"phase": phase}
    if address:
        status.update(podIP=ips[0], podIPs=[{"ip": ip} for ip in ips])
    return POD.convert({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "hostNetwork": host, "containers": [{"name": "c", "ports": [
            {"name": "web", "containerPort": port, "protocol": "TCP"},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
        "status": status})


def make_ns(name: str, team: str, env: str | None) -> Namespace:
    labels = {"team": team, **({"env": env} if env else {})}
    return NAMESPACE.convert({"metadata": {"name": name, "labels": labels}})


def app(name: str) -> dict[str, Any]:
    return {"matchLabels": {"app": name}}


SHAPES: list[dict[str, Any]] = [
    {"policyTypes": ["Ingress"]},
    {"podSelector": app("a"), "ingress": [{"from": [{"podSelector": app("b")}]}]},
    {"podSelector": app("b"), "ingress": [{"from": [{"namespaceSelector": {
        "matchLabels": {"team": "t1"}}, "podSelector": {"matchExpressions": [
            {"key": "tier", "operator": "Exists"}]}}], "ports": [{"port": "web"}]}]},
    {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
     "ingress": [{"from": [{"namespaceSelector": {}}, {"ipBlock": {
         "cidr": "10.0.0.0/8", "except": ["10.2.0.0/16"]}}]}]},
    {"podSelector": app("c"), "policyTypes": ["Egress"],
     "egress": [{"to": [{"podSelector": app("a")}], "ports": [{"port": "web"}]}]},
    {"policyTypes": ["Egress"], "egress": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]},
    {"podSelector": app("a"), "policyTypes": ["Ingress", "Egress"],
     "ingress": [{"ports": [{"port": "web"}, {"port": 81, "endPort": 90}]}],
     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]}]},
    {"podSelector": {"matchLabels": {"tier": "web"}}, "ingress": [{"from": [
        {"podSelector": {}}]}]},
]


def make_policy(ns: str, shape: int, name: str) -> NetworkPolicy:
    return NETWORK_POLICY.convert({"metadata": {"name": name, "namespace": ns},
                                   "spec": {"podSelector": {}, **SHAPES[shape]}})


pods = st.builds(
    make_pod, st.sampled_from(SPACES), st.sampled_from(NAMES), st.sampled_from(APPS),
    st.sampled_from([None, "web", "db"]), st.sampled_from(["n1", "n2"]), st.integers(0, 1),
    st.sampled_from([80, 8080]), st.sampled_from(["Running", "Running", "Succeeded"]),
    st.sampled_from([False, False, False, True]), st.sampled_from([True, True, True, False]))
operation = st.one_of(
    st.tuples(st.just("pod"), pods),
    st.tuples(st.just("pod-"), st.sampled_from(SPACES), st.sampled_from(NAMES)),
    st.tuples(st.just("status"), st.sampled_from(SPACES), st.sampled_from(NAMES)),
    st.tuples(st.just("move"), st.sampled_from(SPACES), st.sampled_from(NAMES),
              st.integers(0, 1), st.sampled_from([80, 8080]), st.sampled_from(["n1", "n2"])),
    st.tuples(st.just("ns"), st.builds(make_ns, st.sampled_from(SPACES),
                                       st.sampled_from(["t1", "t2"]),
                                       st.sampled_from([None, "prod"]))),
    st.tuples(st.just("ns-"), st.sampled_from(SPACES)),
    st.tuples(st.just("policy"), st.builds(
        lambda ns, shape, name: make_policy(ns, shape, name), st.sampled_from(SPACES),
        st.integers(0, len(SHAPES) - 1), st.sampled_from(["q0", "q1", "q2"]))),
    st.tuples(st.just("policy-"), st.sampled_from(SPACES), st.sampled_from(["q0", "q1", "q2"])),
)


def moved(pod: Pod, variant: int, port: int, node: str) -> Pod:
    """The same labels with other addresses, named port number or node."""
    labels = pod.metadata.labels
    return make_pod(pod.metadata.namespace, pod.metadata.name, labels["app"],
                    labels.get("tier"), node, variant, port, pod.status.phase,
                    pod.spec.host_network, bool(pod.ips))


def status_update(pod: Pod) -> Pod:
    """A new object that policy sees the same way (readiness flipped)."""
    import msgspec

    raw = msgspec.to_builtins(pod)
    ready = "False" if pod.ready else "True"
    raw.setdefault("status", {})["conditions"] = [{"type": "Ready", "status": ready}]
    return POD.convert(raw)


policies = st.builds(make_policy, st.sampled_from(SPACES), st.integers(0, len(SHAPES) - 1),
                     st.sampled_from(["q0", "q1", "q2"]))


def statements(script: str) -> list[str]:
    """A script's statements, one element each (a batch's element order is free)."""
    out: list[str] = []
    for line in script.splitlines():
        head, brace, items = line.partition(" { ")
        if " element " in head and brace:
            out += [f"{head} {item}" for item in items.removesuffix(" }").split(", ")]
        else:
            out.append(line)
    return sorted(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first_pods=st.lists(pods, max_size=16), first_policies=st.lists(policies, max_size=8),
       steps=st.lists(st.lists(operation, min_size=1, max_size=3), min_size=1, max_size=15),
       node=st.sampled_from(["n1", None]), sweep=st.booleans())
def test_incremental_equals_from_scratch(first_pods: list[Pod],
                                         first_policies: list[NetworkPolicy],
                                         steps: list[list[tuple[Any, ...]]],
                                         node: str | None, sweep: bool) -> None:
    """``sweep``: the memo forgets what nothing reads after every step (as it does once
    it grows), which must not change any result."""
    world: dict[str, dict[str, Any]] = {
        "pods": {f"{p.metadata.namespace}/{p.metadata.name}": p for p in first_pods},
        "ns": {n: make_ns(n, "t1" if n != "z" else "t2", "prod" if n == "y" else None)
               for n in SPACES},
        "policies": {f"{p.metadata.namespace}/{p.metadata.name}": p for p in first_policies}}
    by_changes, by_snapshot = Memo(), Memo()
    snapshot = lambda: (list(world["policies"].values()), list(world["pods"].values()),  # noqa: E731
                        list(world["ns"].values()))
    assert compute(*snapshot(), node_name=node, memo=by_changes) == compute(
        *snapshot(), node_name=node, memo=by_snapshot)
    cache = ElementCache()
    rendered = render(compute(*snapshot(), node_name=node), cache=cache)
    for step in steps:
        changed: dict[str, dict[str, Any]] = {"pods": {}, "ns": {}, "policies": {}}

        def put(kind: str, key: str, obj: Any, changed: dict[str, dict[str, Any]] = changed
                ) -> None:
            if obj is None:
                world[kind].pop(key, None)
            else:
                world[kind][key] = obj
            changed[kind][key] = obj

        for op in step:
            if op[0] == "pod":
                pod = op[1]
                put("pods", f"{pod.metadata.namespace}/{pod.metadata.name}", pod)
            elif op[0] == "pod-":
                put("pods", f"{op[1]}/{op[2]}", None)
            elif op[0] == "status" and f"{op[1]}/{op[2]}" in world["pods"]:
                key = f"{op[1]}/{op[2]}"
                put("pods", key, status_update(world["pods"][key]))
            elif op[0] == "move" and f"{op[1]}/{op[2]}" in world["pods"]:
                key = f"{op[1]}/{op[2]}"
                put("pods", key, moved(world["pods"][key], *op[3:]))
            elif op[0] == "ns":
                put("ns", op[1].metadata.name, op[1])
            elif op[0] == "ns-":
                put("ns", op[1], None)
            elif op[0] == "policy":
                p = op[1]
                put("policies", f"{p.metadata.namespace}/{p.metadata.name}", p)
            elif op[0] == "policy-":
                put("policies", f"{op[1]}/{op[2]}", None)
        expected = compute(*snapshot(), node_name=node)
        if sweep:
            by_changes.sweep_at = by_snapshot.sweep_at = -1
        incremental = compute_changes(by_changes, node_name=node, policies=changed["policies"],
                                      pods=changed["pods"], namespaces=changed["ns"])
        assert incremental == expected, step
        assert compute(*snapshot(), node_name=node, memo=by_snapshot) == expected, step
        patched = render(incremental, cache=cache)
        assert patched == render(expected), step
        script = update_script(rendered, patched)
        unhinted = update_script(rendered, dataclasses.replace(patched, base=None))
        assert statements(script) == statements(unhinted), step
        rendered = patched


def test_memo_stays_bounded_under_policy_churn(monkeypatch: Any) -> None:
    """Policies that come and go, each with selectors of its own, leave nothing behind
    for ever: the memo's selections and peers are swept once they outgrow the bound."""
    from svcnet.policy import state as state_module

    monkeypatch.setattr(state_module, "SWEEP_MIN", 50)
    memo = Memo()
    pods = {f"x/{n}": make_pod("x", n, "a", "web", "n1", 0, 80, "Running", False, True)
            for n in NAMES}
    compute([], list(pods.values()), [make_ns(n, "t1", None) for n in SPACES],
            node_name="n1", memo=memo)
    sizes = []
    for i in range(200):
        p = NETWORK_POLICY.convert({"metadata": {"name": f"q{i}", "namespace": "x"}, "spec": {
            "podSelector": {"matchLabels": {"app": "a"}, "matchExpressions": [
                {"key": f"k{i}", "operator": "DoesNotExist"}]},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": str(i)}}},
                                  {"namespaceSelector": {"matchLabels": {"team": str(i)}}}]}]}})
        compute_changes(memo, node_name="n1", policies={f"x/q{i}": p})
        compute_changes(memo, node_name="n1", policies={f"x/q{i}": None})
        sizes.append(len(memo.selected) + len(memo.peer_ranges) + len(memo.peers_of)
                     + len(memo.dependents))
    assert max(sizes) <= 4 * 50 + 10, sizes[-5:]
