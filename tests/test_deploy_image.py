"""The container image: built with no registry (debootstrap base, ``podman build`` in a runtime
sandbox, cached outside the checkout), then the tools checked inside it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_binary, require_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    from svcnet.lab.image import ImageBuilder
    from svcnet.lab.runtimes import sandbox

    require_root()
    require_binary("podman", "runc", "debootstrap", "unshare", "tar")
    require(shutil.which("perl") is not None, "perl")
    base = tmp_path_factory.mktemp("image")
    with sandbox(f"svcimg{os.getpid() % 100000}", base) as box:
        builder = ImageBuilder(box)
        result = builder.build(sys.executable)
        print(f"image {result.ref}: {result.size_bytes / 1e6:.0f} MB, "
              f"{'built' if result.built else 'cached'} in {result.seconds:.0f} s")
        yield builder, result


CHECKS = {
    "version": "svcnet --version",
    "cni": "CNI_COMMAND=VERSION svcnet-cni </dev/null",
    "iptables": "iptables --version",
    "nft": "nft --version",
    # ipset also asks the kernel for its protocol version, which needs NET_ADMIN: exit 1
    "ipset": "ipset --version 2>/dev/null; true",
    "conntrack": "conntrack --version",
    "ip": "ip -V",
    "perl": "perl -e 'print 42'",
    "node": "svcnet node --help >/dev/null && echo ok",
    "dns": "svcnet dns --help >/dev/null && echo ok",
    "install": "svcnet cni install --help >/dev/null && echo ok",
    "venv": "readlink -f $(command -v svcnet)",
}


def test_image_has_svcnet_and_its_tools(image: tuple[Any, Any]) -> None:
    """One container for every check: with podman's vfs driver each run copies the image."""
    builder, result = image
    script = "".join(f"echo '@@{name}'; {cmd} 2>&1 || echo '@@failed'\n"
                     for name, cmd in CHECKS.items())
    proc = builder.run(result.ref, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    got = {name: text.strip() for name, _, text in (
        part.partition("\n") for part in proc.stdout.split("@@")[1:])}
    assert "failed" not in got, proc.stdout

    from svcnet import __version__

    assert got["version"] == f"svcnet {__version__}"
    assert "1.0.0" in json.loads(got["cni"])["supportedVersions"]
    assert got["iptables"].startswith("iptables v1.8") and "(nf_tables)" in got["iptables"]
    assert got["nft"].startswith("nftables v")
    assert got["ipset"].startswith("ipset v7")
    assert got["conntrack"].startswith("conntrack v1")
    assert got["ip"].startswith("ip utility, iproute2")
    assert got["perl"] == "42"
    assert got["node"] == got["dns"] == got["install"] == "ok"
    assert got["venv"] == "/opt/svcnet/bin/svcnet"
    assert result.size_bytes < 400e6


def test_image_is_cached(image: tuple[Any, Any]) -> None:
    builder, first = image
    again = builder.build(sys.executable)
    assert (again.ref, again.built) == (first.ref, False)
    # earlier builds are pruned: the cache holds one svcnet image
    names = builder.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert [n for n in names if n.startswith("localhost/svcnet:")] == [first.ref]


def test_apt_mirror_reads_both_source_formats(tmp_path: Path) -> None:
    from svcnet.lab.image import DEFAULT_MIRROR, apt_mirror

    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm "
                      "bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: "
                      "http://security.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirror(deb822, tmp_path / "none") == "http://mirror.example/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("# comment\ndeb http://old.example/debian bookworm main\n")
    assert apt_mirror(tmp_path / "none", legacy) == "http://old.example/debian"
    assert apt_mirror(tmp_path / "none", tmp_path / "none") == DEFAULT_MIRROR
