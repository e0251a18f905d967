"""The real control-plane fixture (svcnet.lab.controlplane): binaries, identities."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import wait_for
from svcnet.lab.controlplane import (
    K8S_SHA256,
    ControlPlane,
    ControlPlaneError,
    MissingBinaries,
    unpack_k8s,
)


def test_unpack_checks_every_sum_and_leaves_nothing_behind(tmp_path: Path) -> None:
    tarball = tmp_path / "k8s.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        for name in K8S_SHA256:
            data = b"#!/bin/sh\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "cache" / "k8s"
    with pytest.raises(MissingBinaries, match=r"kube-apiserver has sha256 .* expected 0b436c"):
        unpack_k8s(tarball, dest)
    assert not dest.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".k8s.lock"]


def test_service_account_kubeconfig_is_least_privilege(control_plane: ControlPlane) -> None:
    cp = control_plane
    reader = cp.service_account_kubeconfig(
        "svc-reader", namespace="kube-system",
        rules=[{"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]}])
    assert cp.kubectl("get", "services", "-A", kubeconfig=reader).returncode == 0
    denied = cp.kubectl("get", "secrets", "-A", kubeconfig=reader, check=False)
    assert denied.returncode != 0
    assert ('User "system:serviceaccount:kube-system:svc-reader" cannot list resource "secrets"'
            in denied.stderr)
    nobody = cp.service_account_kubeconfig("nobody", namespace="kube-system", bind=False)
    assert cp.kubectl("get", "services", "-A", kubeconfig=nobody, check=False).returncode != 0


def test_node_identity_registers_its_node_and_gets_a_pod_cidr(control_plane: ControlPlane
                                                              ) -> None:
    """What a node agent does first: as ``system:node:<name>`` (the Node authorizer and the
    NodeRestriction admission plugin confine it to its own Node) it creates its Node, and the
    controller-manager's node IPAM allocates ``spec.podCIDR``."""
    cp = control_plane
    config = cp.client_kubeconfig("node-cpt1", "system:node:cpt1", ["system:nodes"])
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cpt1"}}
    try:
        cp.kubectl("create", "-f", "-", input=json.dumps(node), kubeconfig=config)
        other = cp.kubectl("create", "-f", "-", kubeconfig=config, check=False,
                           input=json.dumps({**node, "metadata": {"name": "cpt2"}}))
        assert other.returncode != 0, other.stdout
        assert 'node "cpt1" is not allowed to modify node "cpt2"' in other.stderr

        def pod_cidr() -> str:
            got = cp.kubectl("get", "node", "cpt1", "-o", "jsonpath={.spec.podCIDR}",
                             kubeconfig=config)
            return got.stdout.strip()

        assert wait_for(pod_cidr, 60, "podCIDR").startswith("10.244.")
    finally:
        cp.kubectl("delete", "node", "cpt1", "--wait=false", check=False)


def test_a_dead_component_is_reported_with_its_log(control_plane: ControlPlane) -> None:
    cp = ControlPlane(control_plane.layout, control_plane.bins)
    cp.procs = dict(control_plane.procs)
    cp.procs.pop("kube-scheduler")
    with pytest.raises(ControlPlaneError, match=r"kube-scheduler exited; see .*kube-scheduler"):
        cp.wait_ready(1)
