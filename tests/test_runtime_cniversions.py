"""#14 defect 6: the conflist ``svcnet cni install`` writes loads in the runtimes and chained
reference plugins in use today, and svcnet-cni answers every version a runtime asks for.

podman 4.3 (libcni 1.1), containerd 1.6/1.7 and the reference plugins 1.1.1 know CNI versions
up to 1.0.0: a 1.1.0 conflist is refused by all of them. The podman and containerd suites
(test_runtime_podman.py, test_runtime_containerd.py) load the same conflist in the real
runtimes; here every plugin of it is asked directly, the way libcni validates a conflist
(VERSION, then ADD/DEL with the conflist's version and the previous plugin's result).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_binary, require_root
from test_cni_helpers import REFERENCE_DIR, Runtime, ns_run, ping

from svcnet.cli import main as svcnet_main

CHAINED = ("portmap", "firewall", "tuning")
ALL_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


def _install(tmp_path: Path, chain: tuple[str, ...] = CHAINED
             ) -> tuple[Path, dict[str, Any]]:
    bindir, confdir = tmp_path / "bin", tmp_path / "net.d"
    chain_args = [arg for kind in chain for arg in ("--chain", kind)]
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", str(confdir),
                        "--subnet", "10.89.40.0/24", "--python", sys.executable, "--socket",
                        str(tmp_path / "no-daemon.sock"), "--no-fast-path", *chain_args]) == 0
    return bindir, json.loads((confdir / "10-svcnet.conflist").read_text())


def _version_info(binary: Path, asked: str) -> dict[str, Any]:
    out = subprocess.run([str(binary)], input=json.dumps({"cniVersion": asked}).encode(),
                         env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                         capture_output=True, check=True, timeout=30)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_installed_conflist_version_is_loadable_by_every_plugin(tmp_path: Path) -> None:
    """What libcni's ValidateNetworkList does: each plugin's VERSION must list the
    conflist's ``cniVersion``; newer runtimes pick from ``cniVersions``."""
    for kind in CHAINED:
        require(Path(REFERENCE_DIR, kind).exists(), f"needs the reference {kind} plugin")
    bindir, conflist = _install(tmp_path)
    assert conflist["cniVersion"] == "1.0.0"
    assert [p["type"] for p in conflist["plugins"]] == ["svcnet-cni", *CHAINED]
    ours = _version_info(bindir / "svcnet-cni", "1.0.0")
    assert set(ALL_VERSIONS) <= set(ours["supportedVersions"])
    for kind in CHAINED:
        info = _version_info(Path(REFERENCE_DIR, kind), "1.0.0")
        for version in (conflist["cniVersion"], *conflist["cniVersions"]):
            assert version in info["supportedVersions"], (kind, version, info)
    _, alone = _install(tmp_path / "alone", chain=())
    assert alone["cniVersion"] == "1.0.0" and alone["cniVersions"] == ["1.0.0", "1.1.0"]


def test_cni_versions_leave_out_what_a_chained_plugin_refuses(tmp_path: Path) -> None:
    """A runtime with libcni 1.2+ runs every plugin at the newest version in ``cniVersions``
    it knows: 1.1.0 is listed only when every chained plugin found supports it."""
    from svcnet.cni.cli import conflist_versions

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, versions in (("new", '"1.0.0", "1.1.0"'), ("old", '"0.4.0", "1.0.0"')):
        (fake / name).write_text(f"#!/bin/sh\necho '{{\"cniVersion\": \"1.0.0\", "
                                 f"\"supportedVersions\": [{versions}]}}'\n")
        (fake / name).chmod(0o755)
    assert conflist_versions(["new"], str(fake)) == ("1.0.0", "1.1.0")
    assert conflist_versions(["new", "old"], str(fake)) == ("1.0.0",)
    assert conflist_versions(["not-installed"], str(fake)) == ("1.0.0", "1.1.0")


@pytest.mark.parametrize("asked", ALL_VERSIONS)
def test_version_answers_the_version_asked(tmp_path: Path, asked: str) -> None:
    bindir, _ = _install(tmp_path)
    info = _version_info(bindir / "svcnet-cni", asked)
    assert info["cniVersion"] == asked
    assert asked in info["supportedVersions"]


def _check_shape(result: dict[str, Any], version: str) -> None:
    """The result layout of ``version`` (SPEC.md of that release)."""
    assert result["cniVersion"] == version
    legacy = version in ("0.3.0", "0.3.1", "0.4.0")
    assert result["ips"], result
    for entry in result["ips"]:
        assert ("version" in entry) == legacy, (version, entry)
        if legacy:
            assert entry["version"] == "4"
        assert isinstance(entry["interface"], int)
        assert result["interfaces"][entry["interface"]]["sandbox"]
    for iface in result["interfaces"]:
        if version != "1.1.0":
            assert not {"mtu", "socketPath", "pciID"} & set(iface), (version, iface)


@pytest.mark.kernel
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_installed_conflist_at_every_version(netns: Callable[[str], str], tmp_path: Path,
                                             version: str) -> None:
    """The installed conflist driven at each version: svcnet-cni's result has that version's
    shape, the chained reference plugins (up to 1.0.0) take it as prevResult, DEL cleans."""
    require_root()
    require_binary("ip", "iptables", "nft")
    for kind in CHAINED:
        require(Path(REFERENCE_DIR, kind).exists(), f"needs the reference {kind} plugin")
    bindir, conflist = _install(tmp_path)
    # the chained plugins that take this version (reference 1.1.1: none takes 1.1.0, the
    # firewall plugin nothing before 0.4.0), as a runtime's validation would require
    plugins = conflist["plugins"][:1] + [
        p for p in conflist["plugins"][1:]
        if version in _version_info(Path(REFERENCE_DIR, p["type"]), version)["supportedVersions"]]
    conflist = dict(conflist, cniVersion=version, plugins=plugins)
    conflist["plugins"][0]["bridge"] = "cniver0"
    conflist["plugins"][0]["ipam"]["dataDir"] = str(tmp_path / "ipam")
    runtime = Runtime(netns("h"), f"{bindir}:{REFERENCE_DIR}")
    pod = netns("p")
    rc = {"portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}]}
    result = runtime.add_list(conflist, "ctr-ver", pod, runtime_config=rc)
    _check_shape(result, version)
    gateway = result["ips"][0]["gateway"]
    assert ping(pod, gateway)
    runtime.del_list(conflist, result, "ctr-ver", pod, runtime_config=rc)
    assert "eth0" not in ns_run(pod, "ip", "-o", "link").stdout
    runtime.del_list(conflist, None, "ctr-ver", pod, runtime_config=rc)  # DEL is idempotent
