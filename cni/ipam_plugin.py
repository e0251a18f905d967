"""``svcnet-cni`` acting as a delegated IPAM plugin (``"ipam": {"type": "svcnet-cni"}`` under
another plugin, e.g. the reference ``bridge``): host-local's verbs on our IPAM module."""

from __future__ import annotations

from . import ipam
from .spec import ERR_INVALID_CONFIG, CniError, result_from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .bridge import Env


def run_ipam(command: str, conf: dict[str, Any], env: Env) -> dict[str, Any] | None:
    if command == "ADD":
        cfg = ipam.parse_config(conf, env.args)
        with ipam.Store(cfg.directory) as store:
            allocations = ipam.allocate(cfg, store, env.container_id, env.ifname)
        dns = conf.get("dns") if isinstance(conf.get("dns"), dict) else {}
        return ipam.result(cfg, allocations, dns)
    if command == "DEL":
        try:
            cfg = ipam.parse_config(conf, env.args)
        except CniError:
            name = ipam.safe_name("network name", conf.get("name"))
            data_dir = (conf.get("ipam") or {}).get("dataDir") or ipam.DEFAULT_DATA_DIR
            cfg = ipam.IpamConfig(name, str(data_dir), [], [], [])
        ipam.release(cfg, env.container_id, env.ifname)
        return None
    if command == "CHECK":
        cfg = ipam.parse_config(conf, env.args)
        prev = conf.get("prevResult")
        ips = []
        if isinstance(prev, dict):
            ips = [e["address"].split("/")[0] for e in result_from_wire(prev)["ips"]]
        ipam.check(cfg, env.container_id, env.ifname, ips)
        return None
    if command == "GC":
        cfg = ipam.parse_config(conf, env.args)
        valid = conf.get("cni.dev/valid-attachments")
        if not isinstance(valid, list):
            return None
        ipam.collect_garbage(cfg, {(str(a.get("containerID")), str(a.get("ifname")))
                                   for a in valid if isinstance(a, dict)})
        return None
    if command == "STATUS":
        ipam.parse_config(conf, env.args)
        return None
    raise CniError(ERR_INVALID_CONFIG, f"unsupported command {command}")
