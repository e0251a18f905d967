"""The enforcer's sync policy with the recording command runner: full first, then only
what changed, full again after a failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from svcnet.policy.daemon import PolicyEnforcer, PolicyOptions
from svcnet.proxy.commands import CommandFailed, FakeCommands
from test_policy_state import NAMESPACE_OBJECTS, make_pod, pod_sel, policy


class Source:
    def __init__(self, objects: list[Any]) -> None:
        self.objects = objects
        self.cache = SimpleNamespace(values=lambda: list(self.objects))


async def test_full_then_incremental_then_full_after_a_failure() -> None:
    failing = {"on": False}

    def respond(argv: Sequence[str], text: str | None) -> str:
        if failing["on"] and text and "add element" in text:
            raise CommandFailed(argv, 1, "Error: Could not process rule")
        return ""

    nft = FakeCommands(respond)
    enforcer = PolicyEnforcer(PolicyOptions(node_name="n1"), nft)
    pols = Source([policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
        {"podSelector": pod_sel("b")}]}])])
    pods = Source([make_pod("x/a"), make_pod("x/b"), make_pod("x/c")])
    enforcer._sources = (pols, pods, Source(NAMESPACE_OBJECTS))

    assert await enforcer.sync_once()
    assert "delete table inet svcnet-policy" in (nft.calls[-1][1] or "")

    pods.objects[2] = make_pod("x/c", pod="b")  # now a peer
    assert await enforcer.sync_once()
    script = nft.calls[-1][1] or ""
    assert "delete table" not in script
    assert all(ln.startswith(("add element", "delete element")) for ln in script.splitlines())

    assert await enforcer.sync_once()  # nothing changed: nothing sent
    calls = len(nft.calls)
    assert await enforcer.sync_once() and len(nft.calls) == calls

    failing["on"] = True
    pods.objects[1] = make_pod("x/b", pod="z")
    assert not await enforcer.sync_once()
    failing["on"] = False
    assert await enforcer.sync_once()
    assert "delete table inet svcnet-policy" in (nft.calls[-1][1] or "")
    assert enforcer.full_syncs == 2


async def test_a_change_after_a_quiet_spell_syncs_at_once_a_burst_waits_the_period() -> None:
    """min_sync_period bounds the rate of syncs (kube-proxy's minSyncPeriod); it is not a
    delay added to every change."""
    nft = FakeCommands(lambda argv, text: "")
    enforcer = PolicyEnforcer(PolicyOptions(node_name="n1", min_sync_period=4.0), nft)
    pols = Source([policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
        {"podSelector": pod_sel("b")}]}])])
    pods = Source([make_pod("x/a"), make_pod("x/b"), make_pod("x/c")])
    enforcer._sources = (pols, pods, Source(NAMESPACE_OBJECTS))
    task = asyncio.create_task(enforcer.loop())
    try:
        started = time.monotonic()
        await asyncio.wait_for(enforcer.synced.wait(), 3.0)  # well before the 4 s period
        assert enforcer.syncs == 1 and time.monotonic() - started < 3.0
        pods.objects[2] = make_pod("x/c", pod="b")
        enforcer._changed(None, pods.objects[2])
        await asyncio.sleep(1.0)
        assert enforcer.syncs == 1  # within the period of the first sync: gathered
        deadline = time.monotonic() + 15
        while enforcer.syncs < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert enforcer.syncs == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
