"""A small libcni for tests: run CNI plugins purely through env + stdin, like a runtime does.

The plugin's host side always runs inside a throwaway "host" namespace (``ip netns exec``),
never in the real root namespace. Also the test's own check that the helper parses errors.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from svcnet.cni.cli import launcher_text

REFERENCE_DIR = "/usr/lib/cni"


class PluginError(Exception):
    def __init__(self, code: int, doc: dict[str, Any], rc: int) -> None:
        super().__init__(f"CNI error {code}: {doc.get('msg')} ({doc.get('details', '')})")
        self.code = code
        self.doc = doc
        self.rc = rc


@dataclass
class Runtime:
    """Executes plugins in ``host_ns`` with ``CNI_PATH``; ``binaries`` maps type -> path."""

    host_ns: str
    cni_path: str
    binaries: dict[str, str] = field(default_factory=dict)

    def exec_plugin(self, plugin_type: str, command: str, conf: dict[str, Any] | bytes,
                    container_id: str = "", netns: str = "", ifname: str = "eth0",
                    args: str = "", timeout: float = 30) -> dict[str, Any] | None:
        binary = self.binaries.get(plugin_type) or self.find(plugin_type)
        env = {"CNI_COMMAND": command, "CNI_PATH": self.cni_path,
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if container_id:
            env["CNI_CONTAINERID"] = container_id
        if netns:
            env["CNI_NETNS"] = netns if netns.startswith("/") else f"/var/run/netns/{netns}"
        if ifname and command not in ("VERSION", "GC", "STATUS"):
            env["CNI_IFNAME"] = ifname
        if args:
            env["CNI_ARGS"] = args
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        proc = subprocess.run(["ip", "netns", "exec", self.host_ns, binary], input=stdin,
                              env=env, capture_output=True, timeout=timeout, check=False)
        out = proc.stdout.decode().strip()
        if proc.returncode != 0:
            try:
                doc = json.loads(out)
            except ValueError:
                raise AssertionError(f"{plugin_type} {command} failed without error JSON: "
                                     f"rc={proc.returncode} stdout={out!r} "
                                     f"stderr={proc.stderr.decode()!r}") from None
            raise PluginError(int(doc["code"]), doc, proc.returncode)
        return json.loads(out) if out else None

    def find(self, plugin_type: str) -> str:
        for directory in self.cni_path.split(":"):
            candidate = Path(directory) / plugin_type
            if candidate.exists():
                return str(candidate)
        raise AssertionError(f"plugin {plugin_type} not in {self.cni_path}")

    # -- conflists, the way libcni runs them ----------------------------------------------

    def add_list(self, conflist: dict[str, Any], container_id: str, netns: str,
                 ifname: str = "eth0", args: str = "",
                 runtime_config: dict[str, Any] | None = None) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            conf = self._plugin_conf(conflist, plugin, prev, runtime_config)
            prev = self.exec_plugin(plugin["type"], "ADD", conf, container_id, netns, ifname,
                                    args)
        assert prev is not None
        return prev

    def check_list(self, conflist: dict[str, Any], prev: dict[str, Any], container_id: str,
                   netns: str, ifname: str = "eth0",
                   runtime_config: dict[str, Any] | None = None) -> None:
        for plugin in conflist["plugins"]:
            conf = self._plugin_conf(conflist, plugin, prev, runtime_config)
            self.exec_plugin(plugin["type"], "CHECK", conf, container_id, netns, ifname)

    def del_list(self, conflist: dict[str, Any], prev: dict[str, Any] | None,
                 container_id: str, netns: str, ifname: str = "eth0",
                 runtime_config: dict[str, Any] | None = None) -> None:
        for plugin in reversed(conflist["plugins"]):
            conf = self._plugin_conf(conflist, plugin, prev, runtime_config)
            self.exec_plugin(plugin["type"], "DEL", conf, container_id, netns, ifname)

    @staticmethod
    def _plugin_conf(conflist: dict[str, Any], plugin: dict[str, Any],
                     prev: dict[str, Any] | None,
                     runtime_config: dict[str, Any] | None) -> dict[str, Any]:
        conf = dict(plugin, cniVersion=conflist["cniVersion"], name=conflist["name"])
        caps = plugin.get("capabilities") or {}
        if runtime_config:
            rc = {k: v for k, v in runtime_config.items() if caps.get(k)}
            if rc:
                conf["runtimeConfig"] = rc
        conf.pop("capabilities", None)
        if prev is not None:
            conf["prevResult"] = prev
        return conf


@pytest.fixture(scope="session")
def svcnet_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launcher ``svcnet cni install`` writes (the deployed form), plus the IPAM alias."""
    bindir = tmp_path_factory.mktemp("cni-bin")
    target = bindir / "svcnet-cni"
    target.write_text(launcher_text())
    target.chmod(0o755)
    (bindir / "svcnet-ipam").symlink_to("svcnet-cni")
    return target


def ns_run(ns: str, *cmd: str, check: bool = True, timeout: float = 20
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=check, timeout=timeout)


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(ns_run(ns, "ip", "-j", *args).stdout or "[]")


def links(ns: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}


def addresses(ns: str, ifname: str) -> set[str]:
    out = set()
    for link in ip_json(ns, "addr", "show", "dev", ifname):
        for a in link.get("addr_info", []):
            if a.get("scope") != "link":
                out.add(f"{a['local']}/{a['prefixlen']}")
    return out


def ping(ns: str, address: str, count: int = 1) -> bool:
    cmd = ["ping", "-c", str(count), "-W", "2", address]
    return ns_run(ns, *cmd, check=False, timeout=15).returncode == 0


def test_plugin_error_carries_code() -> None:
    err = PluginError(7, {"code": 7, "msg": "bad"}, 1)
    assert err.code == 7 and "bad" in str(err)
