"""bench/policy_scale.py and its workload generator: a tiny run and the generator's shapes.

The figures themselves are targets of the bench, not of a test; this checks that the bench
runs end to end on the real kernel (sync, label change, datapath with and without the
table) and reports every key with sane values, and that the generated objects are what the
bench claims (exact counts, the policy shapes, decodable by the model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_binary, require_root

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import policy_gen  # noqa: E402


def test_generator_counts_and_shapes() -> None:
    cluster = policy_gen.generate(2_000, 30, 300, nodes=("a", "b"))
    counts = policy_gen.summary(cluster)
    assert (counts["pods"], counts["namespaces"], counts["policies"]) == (2_000, 30, 300)
    for shape in ("ipBlock", "namedPort", "endPort", "namespaceSelector", "matchExpressions",
                  "egress"):
        assert counts[shape] > 0, shape
    keys = [(kind, o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for kind, o in cluster.objects()]
    assert len(keys) == len(set(keys))
    ips = [p["status"]["podIP"] for p in cluster.pods]
    assert len(set(ips)) == len(ips)
    assert {p["spec"]["nodeName"] for p in cluster.pods} == {"a", "b"}
    names = {p["metadata"]["name"] for p in cluster.policies}
    assert {"default-deny-ingress", "default-deny-egress", "allow-dns"} <= names
    assert policy_gen.generate(2_000, 30, 300, nodes=("a", "b")) == cluster  # seeded


def test_pair_and_relabel() -> None:
    base = policy_gen.generate(200, 8, 40)
    pair = policy_gen.with_pair(base, ("10.244.1.2", "n0"), ("10.244.2.2", "n1"),
                                (("http", 8080, "TCP"),))
    assert len(pair.policies) == len(base.policies) == 40
    assert len(pair.pods) == len(base.pods) + 2
    old, new = policy_gen.relabel(pair, 3)
    assert old["metadata"]["labels"]["app"] != new["metadata"]["labels"]["app"]
    assert old["status"] == new["status"]
    assert new in pair.pods and old not in pair.pods


def test_generated_objects_decode() -> None:
    """Every generated object is valid for the model the daemon decodes with."""
    model = pytest.importorskip("svcnet.model")
    cluster = policy_gen.generate(300, 12, 120, dual_stack=True)
    for kind_name, obj in cluster.objects():
        model.kind_named(kind_name).convert(obj)


def test_bench_quick_run() -> None:
    require_root()
    require_binary("nft", "iperf3", "etcd", "etcdctl")
    got = subprocess.run([sys.executable, str(BENCH / "policy_scale.py"), "--quick"],
                         capture_output=True, text=True, timeout=280)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("full_sync_ratio", "one_change_ms", "rss_mb", "throughput_ratio",
                "conn_rate_ratio"):
        assert isinstance(result[key], (int, float)), (key, result)
        assert result[key] > 0, (key, result)
    assert 0.2 < result["throughput_ratio"] < 5, result
    assert 0.2 < result["conn_rate_ratio"] < 5, result
    assert result["one_change_ms"] < 30_000, result
    assert 10 < result["rss_mb"] < 2_000, result
    assert result["full_sync_ratio"] < 50, result
    assert len(lines) > 3, "the table is missing"
