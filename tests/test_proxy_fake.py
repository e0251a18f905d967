"""The packet-flow tables without root: the iptables backend programs the stateful fake
(``proxy/fake_iptables.py``) and the tracer answers every row from the fake's dump. The
same tables run against the real kernel in ``test_proxy_flows.py``."""

from __future__ import annotations

from typing import Any

import pytest
from svcnet.proxy.commands import CommandFailed
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.drift import iptables_items
from svcnet.proxy.fake_iptables import FakeIptables
from svcnet.proxy.iptables import IptablesBackend
from test_proxy_flows import (
    DETECT_FLOWS,
    FLOWS,
    NODE_IP,
    OBJECTS,
    TWO_CIDR_FLOWS,
    program,
    traced,
    tracer,
)

FlowRows = list[tuple[str, str, str, int, Any]]


def backend_on_fake(detect: LocalDetector, fake: FakeIptables | None = None
                    ) -> IptablesBackend:
    return IptablesBackend(fake or FakeIptables(), BackendConfig(families=(4,),
                                                                 detect_local=detect),
                           legacy=False, node_addresses={4: (NODE_IP,)})


def flow_table(backend: IptablesBackend, flows: FlowRows) -> tuple[dict[Any, Any], dict[Any, Any]]:
    tr = tracer("iptables", backend)
    got = {(s, p, d, port): traced(tr, s, p, d, port) for s, p, d, port, _ in flows}
    return got, {(s, p, d, port): e for s, p, d, port, e in flows}


@pytest.mark.parametrize(("detect", "objects", "flows"), [
    (LocalDetector("ClusterCIDR", ("10.1.0.0/16",)), OBJECTS, FLOWS),
    (LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16")), OBJECTS[:2],
     TWO_CIDR_FLOWS),
    (LocalDetector("BridgeInterface", (), "br0"), OBJECTS[:2], DETECT_FLOWS),
    (LocalDetector("InterfaceNamePrefix", (), "br"), OBJECTS[:2], DETECT_FLOWS),
], ids=["every-feature", "two-cluster-cidrs", "bridge", "interface-prefix"])
def test_flow_tables_on_the_fake(detect: LocalDetector, objects: Any, flows: FlowRows
                                 ) -> None:
    """Loaded as a full sync then a partial one, as the kernel tests do."""
    backend = backend_on_fake(detect)
    program(backend, objects)
    got, want = flow_table(backend, flows)
    assert got == want


def test_the_fake_sees_the_old_two_cidr_bug() -> None:
    """A fake that could not show the detect-local bug would prove nothing: rendering only
    the first CIDR (the old code) masquerades the second CIDR's pods here too."""
    backend = backend_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)))
    program(backend, OBJECTS[:2])
    got, want = flow_table(backend, TWO_CIDR_FLOWS)
    assert got[("pod-net2", "TCP", "10.96.0.10", 80)] != want[
        ("pod-net2", "TCP", "10.96.0.10", 80)]


def test_restore_is_all_or_nothing_like_the_real_tool() -> None:
    fake = FakeIptables()
    fake.run(["iptables-nft-restore", "--noflush"], input="*nat\n:KUBE-A - [0:0]\n"
             "-A KUBE-A -j RETURN\nCOMMIT\n")
    before = fake.save(4)
    for bad in ("*nat\n-A KUBE-A -j RETURN\n-D KUBE-A -j DROP\nCOMMIT\n",  # no such rule
                "*nat\n-A KUBE-B -j RETURN\nCOMMIT\n",                    # no such chain
                "*nat\n-A KUBE-A -j KUBE-NOPE\nCOMMIT\n",                 # no such target
                "*nat\n-N KUBE-A\nCOMMIT\n",                              # exists
                "*nat\n:KUBE-C - [0:0]\n-A PREROUTING -j KUBE-C\n-X KUBE-C\nCOMMIT\n"):
        with pytest.raises(CommandFailed):
            fake.run(["iptables-nft-restore", "--noflush"], input=bad)
        assert fake.save(4) == before, bad
    fake.run(["iptables-nft-restore", "--noflush"], input="*nat\n-A KUBE-A -j DROP\n")
    assert fake.save(4) == before  # no COMMIT: nothing applied


def test_drift_items_and_canary_read_the_fake() -> None:
    fake = FakeIptables()
    backend = backend_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)), fake)
    program(backend, OBJECTS[:2])
    assert backend.healthy()
    items = backend.kernel_items()
    assert items == iptables_items(fake.save(4), 4) and any("KUBE-SVC-" in i for i in items)
    backend.cleanup()
    assert not backend.healthy()
    assert "KUBE-" not in fake.save(4)
