"""Executing a CNI network configuration list the way libcni (containerd, CRI-O) does.

For ADD each plugin runs in order with the previous plugin's result injected as
``prevResult``; the final result is cached, and DEL runs the plugins in reverse with that
cached result, so DEL works after a restart of the caller. Plugins are found on CNI_PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CNIError(RuntimeError):
    def __init__(self, plugin: str, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"CNI plugin {plugin} failed (code {code}): {msg}"
                         + (f": {details}" if details else ""))
        self.code = code


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str
    ifname: str
    args: str


class CNIRunner:
    def __init__(self, conf_dir: Path, cni_path: list[str], cache_dir: Path, *,
                 launcher: list[str] | None = None, exec_path: list[str] | None = None
                 ) -> None:
        """``launcher`` + ``exec_path``: plugins are found in ``cni_path`` but run as
        ``launcher + [exec_path/plugin]`` with ``CNI_PATH=exec_path``, for a node whose
        filesystem the lab maps into a mount namespace (svcnet.lab.podrun)."""
        self.conf_dir = conf_dir
        self.cni_path = cni_path
        self.cache_dir = cache_dir
        self.launcher = launcher or []
        self.exec_path = exec_path

    def conflist(self) -> dict[str, Any]:
        """The first ``*.conflist`` in lexical order, as containerd picks it."""
        files = sorted(self.conf_dir.glob("*.conflist"))
        if not files:
            raise CNIError("-", 7, f"no network config in {self.conf_dir}")
        data: dict[str, Any] = json.loads(files[0].read_text())
        return data

    def _find(self, plugin: str) -> str:
        for d in self.cni_path:
            path = Path(d) / plugin
            if path.exists():
                return str(path)
        raise CNIError(plugin, 7, f"plugin {plugin!r} not found in {':'.join(self.cni_path)}")

    async def _exec(self, command: str, conf: dict[str, Any], att: Attachment) -> dict[str, Any]:
        plugin = str(conf["type"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command, "CNI_CONTAINERID": att.container_id,
            "CNI_NETNS": att.netns, "CNI_IFNAME": att.ifname, "CNI_ARGS": att.args,
            "CNI_PATH": ":".join(self.exec_path or self.cni_path),
        }
        found = self._find(plugin)
        argv = ([*self.launcher, str(Path(self.exec_path[0]) / plugin)]
                if self.launcher and self.exec_path else [found])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(conf).encode()), 30)
        if proc.returncode != 0:
            try:
                error = json.loads(out)
            except ValueError:
                error = {"code": 999, "msg": (out or err).decode(errors="replace").strip()}
            raise CNIError(plugin, int(error.get("code", 999)), str(error.get("msg", "")),
                           str(error.get("details", "")))
        if not out.strip():
            return {}
        result: dict[str, Any] = json.loads(out)
        return result

    def _plugin_conf(self, lst: dict[str, Any], plugin: dict[str, Any],
                     prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {**plugin, "cniVersion": lst["cniVersion"], "name": lst["name"]}
        ipam = plugin.get("ipam") or {}
        if plugin.get("type") != "svcnet-cni" and "subnetFile" in ipam and "ranges" not in ipam:
            conf["ipam"] = {**ipam, "ranges": [[{"subnet": subnet_from_file(
                Path(ipam["subnetFile"]))}]]}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _cache_file(self, att: Attachment) -> Path:
        return self.cache_dir / f"{att.container_id}-{att.ifname}.json"

    async def add(self, att: Attachment) -> dict[str, Any]:
        lst = self.conflist()
        prev: dict[str, Any] | None = None
        for plugin in lst["plugins"]:
            prev = await self._exec("ADD", self._plugin_conf(lst, plugin, prev), att)
        result = prev or {}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._cache_file(att).with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": lst, "result": result}))
        tmp.replace(self._cache_file(att))
        return result

    async def delete(self, att: Attachment) -> None:
        """DEL with the cached config and result; succeeds when there is nothing to undo."""
        try:
            cached = json.loads(self._cache_file(att).read_text())
            lst, result = cached["config"], cached["result"]
        except (OSError, ValueError, KeyError):
            lst, result = self.conflist(), None
        for plugin in reversed(lst["plugins"]):
            await self._exec("DEL", self._plugin_conf(lst, plugin, result), att)
        self._cache_file(att).unlink(missing_ok=True)


def subnet_from_file(path: Path) -> str:
    """The node subnet from a Flannel ``subnet.env`` (FLANNEL_SUBNET=10.244.3.1/24)."""
    try:
        text = path.read_text()
    except OSError:
        raise CNIError("-", 11, f"{path} does not exist yet (overlay not ready); "
                       "try again") from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "FLANNEL_SUBNET":
            import ipaddress

            return str(ipaddress.ip_interface(value.strip()).network)
    raise CNIError("-", 11, f"{path} has no FLANNEL_SUBNET")


def first_ipv4(result: dict[str, Any]) -> str:
    for ip in result.get("ips", ()):
        address = str(ip.get("address", ""))
        if address and ":" not in address:
            return address.partition("/")[0]
    raise CNIError("-", 999, f"CNI result has no IPv4 address: {result}")
