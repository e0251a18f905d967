"""The reachability matrix's logic without root: the truth table, the model's objects, the
echo pods' protocols and the raw SCTP packets (tests/test_policy_matrix.py runs it for real)."""

from __future__ import annotations

from collections.abc import Sequence

from svcnet.lab import netpol, sctpraw
from svcnet.lab.netpol import ALL_PODS, PodRef, Reachability
from svcnet.lab.state import LabConfig


def P(ref: str) -> PodRef:
    ns, _, name = ref.partition("/")
    return PodRef(ns, name)


def test_reachability_reports_wrong_cells_as_upstream_prints_them() -> None:
    table = Reachability.where(lambda _s, d: d.namespace != "x")
    for s in ALL_PODS:
        for d in ALL_PODS:
            table.observed[(s, d)] = d.namespace != "x"
    assert table.wrong() == []
    table.observed[(P("y/a"), P("x/b"))] = True
    table.reasons[(P("y/a"), P("x/b"))] = "connected"
    table.observed[(P("x/a"), P("x/a"))] = True  # self: not judged
    assert table.wrong() == [(P("y/a"), P("x/b"))]
    report = table.report("80/TCP")
    assert "1 of 72 cells wrong" in report
    comparison = report.split("comparison:\n")[1].splitlines()
    assert comparison[0].split("\t") == ["-", *map(str, ALL_PODS)]
    row = comparison[4].split("\t")  # y/a
    assert row[0] == "y/a" and row[1:] == [".", "X", ".", "-", ".", ".", ".", ".", "."]
    assert "y/a -> x/b: expected blocked, observed connected" in report


def test_model_manifests_have_named_ports_labels_and_spread() -> None:
    docs = netpol.manifests(["n1", "n2"])
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert [n["metadata"]["labels"] for n in namespaces] == [{"ns": "x"}, {"ns": "y"},
                                                              {"ns": "z"}]
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert len(pods) == 9 and {p["spec"]["nodeName"] for p in pods} == {"n1", "n2"}
    ports = pods[0]["spec"]["containers"][0]["ports"]
    assert {(p["name"], p["containerPort"], p["protocol"]) for p in ports} == {
        (f"serve-{port}-{proto.lower()}", port, proto)
        for port in (80, 81) for proto in ("TCP", "UDP", "SCTP")}
    services = [d for d in docs if d["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services[:3]] == ["s-a", "s-b", "s-c"]


def test_echo_pods_serve_each_container_port_on_its_own_protocol() -> None:
    """SCTP container ports are answered by the raw INIT responder, not served as TCP (a
    second TCP listener on 80 would make the pod crash-loop)."""
    from svcnet.lab.kubelet import pod_command

    cfg = LabConfig(name="u", nodes=2, lab_dir="/nonexistent", python="python3")
    pod = next(d for d in netpol.manifests(["n1"]) if d["kind"] == "Pod")
    argv = pod_command(cfg, pod)
    pairs = sorted(zip(argv[6::2], argv[7::2], strict=True))
    assert pairs == sorted((f"--{proto}", str(port)) for proto in ("tcp", "udp", "sctp")
                           for port in (80, 81)), argv


def test_sctp_packets_carry_a_valid_crc32c_and_parse_back() -> None:
    assert sctpraw.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    ip = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    init = sctpraw.init(20001, 80, 0x1234)
    assert sctpraw.parse(ip + init) == ("10.0.0.1", 20001, 80, 0, sctpraw.INIT, 0x1234)
    ack = sctpraw.init_ack(80, 20001, 0x1234, 0x5678)
    assert sctpraw.parse(ip + ack) == ("10.0.0.1", 80, 20001, 0x1234, sctpraw.INIT_ACK, 0x5678)
    corrupt = ip + init[:-1] + bytes([init[-1] ^ 1])
    assert sctpraw.parse(corrupt) is None


class ScriptedProber(netpol.Prober):
    """Answers as a datapath that blocks x/a's ingress until ``flip_after`` rounds have run,
    and drops the first probe of y/b -> z/c (a lost packet)."""

    def __init__(self, flip_after: int) -> None:
        super().__init__({}, enter=lambda _ns, fn: fn())
        self.calls: list[tuple[int, float]] = []
        self.rounds = 0
        self.flip_after = flip_after
        self.lost = False

    def probe(self, jobs: Sequence[netpol.Job], timeout: float
              ) -> dict[netpol.Job, tuple[bool, str]]:
        self.calls.append((len(jobs), timeout))
        if timeout == 0.5:
            self.rounds += 1
        out = {}
        for job in jobs:
            ok = job.dst != P("x/a") or self.rounds > self.flip_after
            if (job.src, job.dst) == (P("y/b"), P("z/c")) and not self.lost:
                self.lost, ok = True, False
            out[job] = (ok, "connected" if ok else "timeout")
        return out


def test_check_polls_until_the_tables_match_and_retries_a_lost_probe_once() -> None:
    prober = ScriptedProber(flip_after=2)
    targets = {p: netpol.Target(f"10.0.0.{i}", p.name) for i, p in enumerate(ALL_PODS)}
    outcome = netpol.check(prober, targets, {(80, "TCP"): Reachability.all()}, deadline=5)
    assert outcome.matched and outcome.rounds == 3, outcome.report("t")
    # Round 1: 81 probes, then with the longer timeout the 8 failed cells into x/a (not
    # x/a -> x/a: self cells are probed, never retried) and the lost one.
    assert prober.calls[:2] == [(81, 0.5), (8 + 1, 1.5)]


def test_check_gives_up_once_the_deadline_passed_and_reports_the_cells() -> None:
    prober = ScriptedProber(flip_after=1000)
    targets = {p: netpol.Target(f"10.0.0.{i}", p.name) for i, p in enumerate(ALL_PODS)}
    outcome = netpol.check(prober, targets, {(80, "TCP"): Reachability.all()}, deadline=0)
    assert not outcome.matched and outcome.rounds == 1
    assert "80/TCP: 8 of 72 cells wrong" in outcome.report("t")
