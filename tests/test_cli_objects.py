"""The object commands against a real etcd: apply, get, delete, watch, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import EtcdCluster

SVCNET = str(Path(sys.executable).parent / "svcnet")

MANIFEST = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
ports: [{name: http, port: 8080}]
"""


def svcnet(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCNET, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_apply_get_delete_roundtrip(etcd: EtcdCluster) -> None:
    store = f"etcd://{etcd.endpoints[0]}"
    applied = svcnet("apply", "--store", store, "-f", "-", stdin=MANIFEST)
    assert applied.returncode == 0, applied.stderr
    assert "service/shop/web applied" in applied.stdout
    listed = svcnet("get", "--store", store, "services", "-n", "shop")
    assert "web" in listed.stdout and "10.96.0.30 80/TCP" in listed.stdout
    slices = svcnet("get", "--store", store, "eps", "-A")
    assert "service=web ready=10.244.1.5" in slices.stdout
    assert svcnet("delete", "--store", store, "svc", "web", "-n", "shop").returncode == 0
    gone = svcnet("get", "--store", store, "svc", "web", "-n", "shop")
    assert gone.returncode == 2 and "not found" in gone.stderr


def test_watch_prints_live_events(etcd: EtcdCluster) -> None:
    store = f"etcd://{etcd.endpoints[0]}"
    watcher = subprocess.Popen([SVCNET, "watch", "--store", store, "svc", "--count", "2"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert svcnet("apply", "--store", store, "-f", "-", stdin=MANIFEST).returncode == 0
        assert svcnet("delete", "--store", store, "svc", "web", "-n", "shop").returncode == 0
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    lines = out.splitlines()
    assert lines[0].startswith("ADDED") and "shop/web" in lines[0]
    assert lines[1].startswith("DELETED") and "shop/web" in lines[1]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = [
        (["apply", "-f", str(tmp_path / "missing.yaml")], "cannot read"),
        (["apply", "-f", "-"], "not valid YAML", "a: [b"),
        (["apply", "-f", "-"], "every document needs a 'kind'", "{metadata: {name: x}}"),
        (["apply", "-f", "-"], "invalid Service default/x: spec.ports[0].port",
         "{kind: Service, metadata: {name: x, namespace: default}, "
         "spec: {ports: [{port: 99999}]}}"),
        (["get", "widgets"], "unknown kind 'widgets'"),
        (["get", "--store", "carrier-pigeon://x", "svc"], "is not one of"),
    ]
    for args, message, *stdin in cases:
        result = svcnet(*args, stdin=stdin[0] if stdin else None)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_embedded_demo_prints_the_scripted_events() -> None:
    result = svcnet("watch", "--demo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    assert any(line.startswith("DELETED") and "default/api" in line for line in lines)
    assert "NodePort 10.96.0.20 80/TCP" in lines[-1] or any(
        "NodePort" in line for line in lines)


def test_apply_refuses_names_the_api_server_refuses_and_writes_nothing(
    etcd: EtcdCluster,
) -> None:
    store = f"etcd://{etcd.endpoints[0]}"
    bad = [
        ("{kind: Service, metadata: {name: wéb, namespace: shop}}",
         "invalid Service shop/wéb: metadata.name: 'wéb' is not a DNS-1035 label"),
        ("{kind: Service, metadata: {name: api, namespace: shop}, "
         "spec: {ports: [{name: pört, port: 80}]}}",
         "invalid Service shop/api: spec.ports[0].name: 'pört' is not a DNS-1123 label"),
        ("{kind: Service, metadata: {name: api, namespace: shop}, "
         "spec: {ports: [{name: http, port: 80, targetPort: sixteen-chars-xx}]}}",
         "invalid Service shop/api: spec.ports[0].targetPort: 'sixteen-chars-xx' is longer"),
        ("{kind: Service, metadata: {name: api, namespace: shop}, "
         "spec: {ports: [{name: a, port: 80}, {name: a, port: 81}]}}",
         "invalid Service shop/api: spec.ports[1].name: duplicate port name 'a'"),
        ("{kind: EndpointSlice, addressType: IPv4, metadata: {name: e, namespace: shop}, "
         "endpoints: [{addresses: [10.0.0.1], hostname: hé}]}",
         "invalid EndpointSlice shop/e: endpoints[0].hostname: 'hé' is not a DNS-1123 label"),
    ]
    for doc, message in bad:
        result = svcnet("apply", "--store", store, "-f", "-", stdin=MANIFEST + "---\n" + doc)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # the valid objects in front of the invalid one were not written either
    gone = svcnet("get", "--store", store, "svc", "web", "-n", "shop")
    assert gone.returncode == 2 and "not found" in gone.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_cleanly() -> None:
    """``svcnet watch --demo | head -2``: no traceback, no hang once the reader is gone."""
    proc = subprocess.Popen([SVCNET, "watch", "--demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = [proc.stdout.readline() for _ in range(2)]
        assert all(line.startswith("ADDED") for line in first), first
        proc.stdout.close()
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
