"""The etcd subnet manager against a real etcd: Flannel's layout, reuse, TTLs, exhaustion."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator

import pytest
from conftest import EtcdCluster
from svcnet.cni.overlay.config import ConfigError, parse_network_config
from svcnet.cni.overlay.lease import (
    EtcdSubnetManager,
    LeaseAttrs,
    LeaseLost,
    OutOfSubnets,
    Snapshot,
)

from svcnet.store.etcd import EtcdClient

pytestmark = pytest.mark.etcd

SMALL = b'{"Network": "10.10.0.0/22", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 4}}'


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(public_ip=f"192.168.1.{n}", vni=4, vtep_mac=f"02:00:00:00:00:0{n}",
                      node_name=f"node{n}")


async def next_matching(snapshots: AsyncIterator[Snapshot], want: int, timeout: float
                        ) -> Snapshot:
    async def scan() -> Snapshot:
        async for snap in snapshots:
            if len(snap) == want:
                return snap
        raise AssertionError("watch ended")

    return await asyncio.wait_for(scan(), timeout)


def test_allocation_layout_reuse_and_exhaustion(etcd: EtcdCluster) -> None:
    async def main() -> None:
        client = EtcdClient(etcd.endpoints)
        try:
            mgr = EtcdSubnetManager(client, prefix="/coreos.com/network", ttl=60)
            with pytest.raises(ConfigError, match="no network config"):
                await mgr.network_config()
            await client.put(b"/coreos.com/network/config", SMALL)
            config = await mgr.network_config()
            assert config == parse_network_config(SMALL)
            leases = [await mgr.acquire(config, attrs(i)) for i in (1, 2, 3)]
            assert len({le.subnet for le in leases}) == 3
            items, _ = await client.get_prefix(b"/coreos.com/network/subnets/")
            keys = sorted(k.decode() for k, _, _ in items)
            assert keys == sorted(f"/coreos.com/network/subnets/{le.key}" for le in leases)
            doc = json.loads(items[0][1])
            assert set(doc) >= {"PublicIP", "BackendType", "BackendData"}
            assert set(doc["BackendData"]) == {"VNI", "VtepMAC"}
            with pytest.raises(OutOfSubnets, match=r"out of subnets: all 3 /24 subnets of "
                                                   r"10\.10\.0\.0/22"):
                await mgr.acquire(config, attrs(4))
            # A restarted node gets its own lease back (matched by node name) ...
            again = await mgr.acquire(config, attrs(2))
            assert again.subnet == leases[1].subnet and again.lease_id != leases[1].lease_id
            # ... and a node whose record is gone gets its previous subnet if still free.
            await mgr.release(leases[0])
            assert leases[0].subnet is not None
            fresh = await mgr.acquire(config, attrs(5), previous=(leases[0].subnet,))
            assert fresh.subnet == leases[0].subnet
            await mgr.renew(fresh)
        finally:
            await client.close()

    asyncio.run(main())


def test_ttl_expiry_watch_and_lease_lost(etcd: EtcdCluster) -> None:
    async def main() -> None:
        client = EtcdClient(etcd.endpoints)
        config = parse_network_config(SMALL)
        try:
            mgr = EtcdSubnetManager(client, ttl=2, config=config)
            assert mgr.renew_interval == 1.0
            watch = mgr.watch()
            assert await next_matching(watch, 0, 5) == ()
            keep = await mgr.acquire(config, attrs(1))
            drop = await mgr.acquire(config, attrs(2))
            snap = await next_matching(watch, 2, 5)
            assert {le.subnet for le in snap} == {keep.subnet, drop.subnet}
            for _ in range(4):
                await asyncio.sleep(0.8)
                await mgr.renew(keep)
            snap = await next_matching(watch, 1, 5)
            assert snap[0].subnet == keep.subnet and snap[0].attrs == keep.attrs
            with pytest.raises(LeaseLost):
                await mgr.renew(drop)
            await client.delete(b"/coreos.com/network/subnets/" + keep.key.encode())
            with pytest.raises(LeaseLost):
                await mgr.renew(keep)
            assert isinstance(keep.subnet, ipaddress.IPv4Network)
            back = await mgr.acquire(config, keep.attrs, previous=keep.subnets)
            assert back.subnet == keep.subnet
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            await client.close()

    asyncio.run(main())
