"""Protocol logic without a kernel: version gating, result conversion, error codes, CNI_ARGS,
IPAM configuration (incl. Flannel's subnet.env) and the on-disk allocator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from svcnet.cni import fastjson, ipam, main, spec
from svcnet.cni.addr import Prefix
from svcnet.cni.bridge import host_veth_name, link_name
from svcnet.cni.spec import CniError

RESULT: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "cni0", "mac": "02:00:00:00:00:01", "mtu": 1450},
                   {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/x",
                    "mtu": 1450}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
            {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "table": 100}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_ip_versions(version: str) -> None:
    out = spec.result_to_wire(RESULT, version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert "mtu" not in out["interfaces"][0] and "table" not in out["routes"][0]
    assert spec.result_from_wire(out)["ips"] == [
        {k: v for k, v in ip.items() if k != "version"} for ip in out["ips"]]


def test_1_0_drops_1_1_fields_and_1_1_keeps_them() -> None:
    v10 = spec.result_to_wire(RESULT, "1.0.0")
    assert "version" not in v10["ips"][0]
    assert "mtu" not in v10["interfaces"][0] and v10["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    v11 = spec.result_to_wire(RESULT, "1.1.0")
    assert v11["interfaces"][0]["mtu"] == 1450 and v11["routes"][0]["table"] == 100
    assert v11["dns"] == RESULT["dns"]


def _run(command: str, conf: dict[str, Any] | bytes, env: dict[str, str] | None = None
         ) -> dict[str, Any] | None:
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    return main.run(command, stdin, env or {}, "/opt/cni/bin/svcnet-cni")


@pytest.mark.parametrize(("command", "version"), [("CHECK", "0.3.1"), ("GC", "1.0.0"),
                                                  ("STATUS", "0.4.0")])
def test_verbs_gated_by_version(command: str, version: str) -> None:
    with pytest.raises(CniError) as info:
        _run(command, {"cniVersion": version, "name": "n", "type": "svcnet-cni"})
    assert info.value.code == spec.ERR_INCOMPATIBLE_VERSION


def test_error_codes() -> None:
    cases: list[tuple[str, Any, dict[str, str], int]] = [
        ("ADD", b"[1,", {}, spec.ERR_DECODE),
        ("ADD", b"[1]", {}, spec.ERR_DECODE),
        ("ADD", {"cniVersion": "0.2.0", "name": "n"}, {}, spec.ERR_INCOMPATIBLE_VERSION),
        ("ADD", {"name": "n"}, {}, spec.ERR_INVALID_CONFIG),
        ("ADD", {"cniVersion": "1.0.0", "name": "n"}, {"CNI_IFNAME": "eth0"},
         spec.ERR_INVALID_ENV),
        ("ADD", {"cniVersion": "1.0.0", "name": "n"},
         {"CNI_CONTAINERID": "../../etc", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
         spec.ERR_INVALID_ENV),
        ("ADD", {"cniVersion": "1.0.0", "name": "n"},
         {"CNI_CONTAINERID": "c", "CNI_IFNAME": "a-very-long-ifname", "CNI_NETNS": "/x"},
         spec.ERR_INVALID_ENV),
        ("ADD", {"cniVersion": "1.0.0", "name": "../n", "ipam": {"type": "host-local"}},
         {"CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
         spec.ERR_INVALID_CONFIG),
        ("ADD", {"cniVersion": "1.0.0", "name": "n"},
         {"CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x", "CNI_ARGS": "X"},
         spec.ERR_INVALID_ENV),
        ("NOPE", {"cniVersion": "1.0.0"}, {}, spec.ERR_INVALID_ENV),
    ]
    for command, conf, env, code in cases:
        with pytest.raises(CniError) as info:
            _run(command, conf, env)
        assert info.value.code == code, (command, conf, env, info.value.msg)
        doc = info.value.to_json("1.1.0")
        assert doc["code"] == code and doc["msg"] and doc["cniVersion"] == "1.1.0"


def test_version_command() -> None:
    assert _run("VERSION", b"") == {"cniVersion": "1.1.0",
                                    "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    assert _run("VERSION", {"cniVersion": "0.4.0"})["cniVersion"] == "0.4.0"  # type: ignore


def test_status_without_subnet_file_is_not_available(tmp_path: Path) -> None:
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "svcnet-cni",
            "ipam": {"type": "host-local", "dataDir": str(tmp_path),
                     "subnetFile": str(tmp_path / "missing.env")}}
    with pytest.raises(CniError) as info:
        _run("STATUS", conf)
    assert info.value.code == spec.ERR_NOT_AVAILABLE
    (tmp_path / "missing.env").write_text("FLANNEL_NETWORK=10.244.0.0/16\n"
                                          "FLANNEL_SUBNET=10.244.3.1/24\n")
    assert _run("STATUS", conf) is None


def test_cni_args_and_names() -> None:
    assert main.parse_cni_args("IgnoreUnknown=1;IP=10.0.0.5;;K8S_POD_NAME=a=b") == {
        "IgnoreUnknown": "1", "IP": "10.0.0.5", "K8S_POD_NAME": "a=b"}
    for bad in ("", ".", "..", "a/b", "a:b", "a b", "x" * 16):
        with pytest.raises(CniError):
            link_name("ifname", bad)
    for bad in ("../x", "x/y", "", ".hidden", "-x"):
        with pytest.raises(CniError):
            ipam.safe_name("network name", bad)
    name = host_veth_name("abc", "eth0")
    assert len(name) == 15 and name == host_veth_name("abc", "eth0") != host_veth_name(
        "abc", "eth1")


def test_fastjson_matches_json() -> None:
    doc = {"a": [1, 2.5, -3, True, False, None, "é\n\"x\""], "b": {"c": {}}, "d": []}
    assert fastjson.loads(json.dumps(doc)) == doc
    assert json.loads(fastjson.dumps(doc)) == doc
    assert fastjson.loads(b'  {"x": 1}\n') == {"x": 1}
    for bad in ("{", '{"a" 1}', "[1] x", "", "nul"):
        with pytest.raises(ValueError):
            fastjson.loads(bad)


# -- IPAM ----------------------------------------------------------------------------------


def _ipam_conf(tmp_path: Path, **ipam_opts: Any) -> dict[str, Any]:
    return {"name": "net1", "ipam": {"type": "host-local", "dataDir": str(tmp_path),
                                     **ipam_opts}}


def test_ipam_config_validation(tmp_path: Path) -> None:
    ok = ipam.parse_config(_ipam_conf(tmp_path, subnet="10.2.0.0/24"), {})
    (rng,) = ok.range_sets[0]
    assert (str(Prefix(4, rng.start, 32)), str(Prefix(4, rng.end, 32))) == (
        "10.2.0.1/32", "10.2.0.254/32")
    bad_cases: list[dict[str, Any]] = [
        {"ranges": [[{"subnet": "10.2.0.0/31"}]]},
        {"ranges": [[{"subnet": "10.2.0.0/24", "rangeStart": "10.3.0.1"}]]},
        {"ranges": [[{"subnet": "10.2.0.0/24", "gateway": "10.9.0.1"}]]},
        {"ranges": [[{"subnet": "10.2.0.0/24"}, {"subnet": "fd00::/64"}]]},
        {"ranges": [[{"subnet": "10.2.0.0/24"}, {"subnet": "10.2.0.0/25"}]]},
        {"ranges": [[{"subnet": "nonsense"}]]},
        {"ranges": []},
        {"subnet": "10.2.0.0/24", "routes": [{"gw": "10.2.0.1"}]},
        {"subnet": "10.2.0.0/24", "dataDir": "relative/dir"},
    ]
    for opts in bad_cases:
        with pytest.raises(CniError) as info:
            ipam.parse_config(_ipam_conf(tmp_path, **opts), {})
        assert info.value.code == spec.ERR_INVALID_CONFIG, opts


def test_subnet_file_in_flannel_format(tmp_path: Path) -> None:
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
                   "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"
                   "FLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
                   "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    cfg = ipam.parse_config(_ipam_conf(tmp_path, subnetFile=str(env)), {})
    assert [str(rs[0].subnet) for rs in cfg.range_sets] == ["10.244.7.0/24",
                                                            "fd00:10:244:7::/64"]
    assert cfg.routes == [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"}]
    assert cfg.mtu == 1450 and cfg.ipmasq is True
    with ipam.Store(cfg.directory) as store:
        got = ipam.allocate(cfg, store, "c1", "eth0")
    assert [a.to_result() for a in got] == [
        {"address": "10.244.7.2/24", "gateway": "10.244.7.1"},
        {"address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1"}]


def test_allocator_round_robin_exhaustion_release_gc(tmp_path: Path) -> None:
    cfg = ipam.parse_config(_ipam_conf(tmp_path, ranges=[[
        {"subnet": "10.3.0.0/24", "rangeStart": "10.3.0.10", "rangeEnd": "10.3.0.12"},
        {"subnet": "10.3.1.0/24", "rangeStart": "10.3.1.1", "rangeEnd": "10.3.1.2"}]]), {})
    got = []
    with ipam.Store(cfg.directory) as store:
        for i in range(4):
            got.append(ipam.allocate(cfg, store, f"c{i}", "eth0")[0].ip)
        with pytest.raises(CniError) as info:
            ipam.allocate(cfg, store, "c0", "eth0")
        assert "duplicate" in info.value.details
    # 10.3.1.1 is that range's default gateway, so it is skipped
    assert got == ["10.3.0.10", "10.3.0.11", "10.3.0.12", "10.3.1.2"]
    with ipam.Store(cfg.directory) as store, pytest.raises(CniError) as info:
        ipam.allocate(cfg, store, "c9", "eth0")
    assert info.value.code == spec.ERR_ADDRESS_EXHAUSTED
    assert (tmp_path / "net1" / "10.3.0.11").read_bytes() == b"c1\r\neth0"  # host-local layout
    assert ipam.release(cfg, "c1", "eth0") == ["10.3.0.11"]
    assert ipam.release(cfg, "c1", "eth0") == []
    with ipam.Store(cfg.directory) as store:
        # round robin resumes after the last reserved address and wraps around
        assert ipam.allocate(cfg, store, "c5", "eth0")[0].ip == "10.3.0.11"
    assert sorted(ipam.collect_garbage(cfg, {("c0", "eth0")})) == [
        "10.3.0.11", "10.3.0.12", "10.3.1.2"]
    with ipam.Store(cfg.directory) as store:
        assert store.allocations() == {"10.3.0.10": ("c0", "eth0")}


def test_requested_ips(tmp_path: Path) -> None:
    conf = _ipam_conf(tmp_path, ranges=[[{"subnet": "10.4.0.0/24"}], [{"subnet": "fd04::/64"}]])
    conf["args"] = {"cni": {"ips": ["fd04::99"]}}
    cfg = ipam.parse_config(conf, {"IP": "10.4.0.77"})
    with ipam.Store(cfg.directory) as store:
        assert [a.ip for a in ipam.allocate(cfg, store, "c", "eth0")] == ["10.4.0.77",
                                                                         "fd04::99"]
    for requested in ("10.9.9.9", "10.4.0.1"):  # outside every range; the gateway
        cfg = ipam.parse_config(_ipam_conf(tmp_path, subnet="10.4.0.0/24"), {"IP": requested})
        with ipam.Store(cfg.directory) as store, pytest.raises(CniError):
            ipam.allocate(cfg, store, "d", "eth0")


def test_rtnl_attribute_codec() -> None:
    """The netlink TLV helpers round-trip, pad to 4 bytes and parse nested link info."""
    from svcnet.cni import rtnl

    packed = (rtnl.attr_str(rtnl.IFLA_IFNAME, "veth0") + rtnl.attr_u32(rtnl.IFLA_MTU, 1400)
              + rtnl.attr(rtnl.IFLA_LINKINFO, rtnl.attr_str(rtnl.IFLA_INFO_KIND, "veth")))
    assert len(packed) % 4 == 0
    attrs = rtnl.parse_attrs(packed)
    assert attrs[rtnl.IFLA_IFNAME] == b"veth0\0"
    assert int.from_bytes(attrs[rtnl.IFLA_MTU], "little") == 1400
    assert rtnl.parse_attrs(attrs[rtnl.IFLA_LINKINFO])[rtnl.IFLA_INFO_KIND] == b"veth\0"
    body = rtnl._IFINFOMSG.pack(0, 1, 7, rtnl.IFF_UP, 0) + packed + rtnl.attr(
        rtnl.IFLA_ADDRESS, rtnl.mac_bytes("02:aa:bb:cc:dd:ee"))
    link = rtnl._parse_link(body)
    assert (link.index, link.name, link.kind, link.mtu, link.mac, link.up) == (
        7, "veth0", "veth", 1400, "02:aa:bb:cc:dd:ee", True)
    err = rtnl._error(rtnl.EEXIST, "create veth x", "File exists")
    assert isinstance(err, rtnl.AlreadyExists) and "File exists" in str(err)
    assert isinstance(rtnl._error(rtnl.ENODEV, "get link", ""), rtnl.LinkNotFound)


def test_masquerade_and_macspoof_scripts() -> None:
    from svcnet.cni import macspoof, masq

    script = masq.add_script("net1", [Prefix.parse("10.5.0.0/24"), Prefix.parse("10.5.0.0/16"),
                                      Prefix.parse("fd05::/64")],
                             [(4, "10.5.0.7"), (6, "fd05::7")], "ctr/eth0")
    tag = masq.network_tag("net1")
    assert f"ip saddr @pods4-{tag} ip daddr != {{ 10.5.0.0/16, 224.0.0.0/4 }} masquerade" \
        in script
    assert f"ip6 saddr @pods6-{tag} ip6 daddr != {{ fd05::/64, ff00::/8 }} masquerade" in script
    assert f'add element inet svcnet-cni pods4-{tag} {{ 10.5.0.7 comment "ctr/eth0" }}' in script
    delete = masq.delete_script("net1", [(4, "10.5.0.7")]).splitlines()
    assert delete[-2:] == [f"add element inet svcnet-cni pods4-{tag} {{ 10.5.0.7 }}",
                           f"delete element inet svcnet-cni pods4-{tag} {{ 10.5.0.7 }}"]
    spoof = macspoof.delete_script("net1", "vethabc", "02:00:00:00:00:01")
    assert f'delete element bridge svcnet-cni allowed-{tag} {{ "vethabc" . 02:00:00:00:00:01 }}' \
        in spoof


@pytest.mark.parametrize(("text", "mac"), [("02:AA:bb:cc:dd:01", "02:aa:bb:cc:dd:01"),
                                           ("02-aa-bb-cc-dd-01", "02:aa:bb:cc:dd:01")])
def test_parse_mac(text: str, mac: str) -> None:
    from svcnet.cni.bridge import parse_mac

    assert parse_mac(text) == mac


@pytest.mark.parametrize("text", ["02:aa:bb:cc:dd", "02:aa:bb:cc:dd:zz", "01:00:5e:00:00:01",
                                  "00:00:00:00:00:00", "0x:aa:bb:cc:dd:01", ""])
def test_parse_mac_rejects(text: str) -> None:
    from svcnet.cni.bridge import parse_mac

    with pytest.raises(ValueError):
        parse_mac(text)


def test_requested_mac_precedence() -> None:
    from svcnet.cni.bridge import Env, NetConf, requested_mac

    base = {"cniVersion": "1.0.0", "name": "n", "type": "svcnet-cni"}
    env = Env("c", "eth0", "/x", {"MAC": "02:00:00:00:00:03"}, "")
    assert requested_mac(NetConf(base), env) == "02:00:00:00:00:03"
    with_args = dict(base, args={"cni": {"mac": "02:00:00:00:00:02"}})
    assert requested_mac(NetConf(with_args), env) == "02:00:00:00:00:02"
    both = dict(with_args, runtimeConfig={"mac": "02:00:00:00:00:01"})
    assert requested_mac(NetConf(both), env) == "02:00:00:00:00:01"
    assert requested_mac(NetConf(base), Env("c", "eth0", "/x", {}, "")) == ""
    with pytest.raises(CniError) as info:
        requested_mac(NetConf(base), Env("c", "eth0", "/x", {"MAC": "nope"}, ""))
    assert info.value.code == spec.ERR_INVALID_ENV
    with pytest.raises(CniError) as info:
        requested_mac(NetConf(dict(base, runtimeConfig={"mac": "nope"})), env)
    assert info.value.code == spec.ERR_INVALID_CONFIG


def test_layer2_config_and_result() -> None:
    from svcnet.cni.bridge import NetConf

    base = {"cniVersion": "1.0.0", "name": "n", "type": "svcnet-cni"}
    assert not NetConf(base).layer3 and not NetConf(dict(base, ipam={})).layer3
    with pytest.raises(CniError):
        NetConf(dict(base, ipam={"ranges": []}))  # settings without a type
    out = spec.result_to_wire({"interfaces": [{"name": "eth0"}], "ips": []}, "1.0.0")
    assert "ips" not in out and out["interfaces"] == [{"name": "eth0"}]


@pytest.mark.parametrize(("subnet", "message"), [
    ("10.88.56.7/24", "Network has host bits set. For a subnet mask of length 24 the network "
                      "address is 10.88.56.0"),
    ("fd00::5/64", "Network has host bits set. For a subnet mask of length 64 the network "
                   "address is fd00::"),
    ("10.0.0.0/31", "Network 10.0.0.0/31 too small to allocate from"),
    ("10.0.0.x/24", "range subnet '10.0.0.x/24': ")])
def test_range_validation_like_host_local(subnet: str, message: str) -> None:
    with pytest.raises(CniError) as info:
        ipam.parse_range({"subnet": subnet})
    assert info.value.code == spec.ERR_INVALID_CONFIG and info.value.msg.startswith(message)


def test_subnet_file_gateway_keeps_host_bits(tmp_path: Path) -> None:
    """FLANNEL_SUBNET is the gateway with its prefix: host bits there are intended."""
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n")
    cfg = ipam.parse_config({"name": "n", "ipam": {"subnetFile": str(env)}}, {})
    assert str(cfg.range_sets[0][0].subnet) == "10.244.3.0/24"


def test_long_names() -> None:
    from svcnet.cni.bridge import MAX_ALIAS, attachment_alias

    alias = attachment_alias("n" * 240, "c" * 10_000, "eth0")
    assert len(alias.encode()) == MAX_ALIAS and alias.startswith("svcnet-cni/" + "n" * 240)
    with pytest.raises(CniError) as info:
        ipam.parse_config({"name": "n" * 256, "ipam": {"subnet": "10.0.0.0/24"}}, {})
    assert "longer than 255" in info.value.msg


def test_permission_errors_are_io_failures() -> None:
    assert main.unexpected_error(PermissionError(13, "Permission denied")).code == spec.ERR_IO
    assert main.unexpected_error(OSError(1, "Operation not permitted")).code == spec.ERR_IO
    assert main.unexpected_error(RuntimeError("bug")).code == spec.ERR_INTERNAL
