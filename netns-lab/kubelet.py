"""A kubelet stand-in: runs the pods bound to one node, as containerd + kubelet would.

Per pod: a network namespace, ``svcnet-cni`` executed from the lab's net.d (env + stdin,
result cached, DEL on removal), ``/etc/netns/<pod-ns>/resolv.conf`` pointing at kube-dns with
the Kubernetes search path, the pod's process, readiness probes, and the Pod's status in the
store. It runs in the node's network namespace but the root mount namespace, so the pod
namespaces it creates are visible to everybody. Sandboxes are recorded on disk and adopted
after a restart of the kubelet; pods keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from svcnet.lab.cnirun import Attachment, CNIRunner, first_ipv4
from svcnet.lab.netns import NETNS_DIR, Kernel, alive, in_netns_thread, kill_pids
from svcnet.lab.podrun import Liveness, PodRunner, cni_runner, mountexec_argv, runs_from_manifests
from svcnet.lab.procs import start_time_of
from svcnet.lab.state import DNS_SERVICE_IP, LabConfig, Ledger

from svcnet.model import NODE, POD
from svcnet.store.base import NotFound, Selector, Store, StoreError
from svcnet.store.kubernetes import KubernetesStore
from svcnet.watch import Listed, changes

log = logging.getLogger(__name__)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
HEARTBEAT_S = 10.0
ECHO_LAMEDUCK_S = 2.0
ECHO_IMAGE = "svcnet/echo"
DNS_IMAGE = "svcnet/dns"
DNS_HEALTH_PORT = 8181
DEFAULT_GRACE_S = 1.0
PROBE_PERIOD_S = 1.0
PROCESS_CHECK_S = 0.1
FIRST_PROBE_RETRY_S = 0.05


@dataclass(frozen=True)
class Sandbox:
    """What the kubelet made for one pod; on disk so a restarted kubelet adopts it."""

    key: str
    uid: str
    netns: str
    container_id: str
    ip: str
    pid: int
    start_time: str
    host_network: bool
    restarts: int = 0


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolv_conf(namespace: str, zone: str) -> str:
    return (f"nameserver {DNS_SERVICE_IP}\n"
            f"search {namespace}.svc.{zone} svc.{zone} {zone}\n"
            "options ndots:5\n")


def pod_resolv_conf(pod: dict[str, Any], zone: str, node_ns: str) -> str:
    """``dnsPolicy: Default`` (the DNS server's own pods): the node's resolver, as kubelet's
    ``--resolv-conf``; pointing them at kube-dns would make the DNS forward to itself.
    A lab node's resolver is ``/etc/netns/<node>/resolv.conf`` when an operator gives one;
    never the host's: it is outside the lab, so forwarding there would send traffic out of
    the lab's namespaces (or, unreachable, make every miss wait out the forward timeout).
    Without one the DNS pods have no upstream and refuse names outside the cluster at once.
    Anything else: kube-dns with the search path (``ClusterFirst``)."""
    if pod.get("spec", {}).get("dnsPolicy") == "Default":
        with contextlib.suppress(OSError):
            return (Path("/etc/netns") / node_ns / "resolv.conf").read_text()
        return ""
    return resolv_conf(pod.get("metadata", {}).get("namespace", "default"), zone)


def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod.get("spec", {}).get("containers") or [{}]
    first: dict[str, Any] = containers[0]
    return first


def pod_ports(pod: dict[str, Any]) -> list[tuple[int, str]]:
    return [(int(p["containerPort"]), str(p.get("protocol", "TCP")))
            for p in container(pod).get("ports", []) if "containerPort" in p]


def is_echo(pod: dict[str, Any]) -> bool:
    c = container(pod)
    return not c.get("command") and not c.get("args") and c.get("image") != DNS_IMAGE


def pod_command(cfg: LabConfig, pod: dict[str, Any]) -> list[str]:
    """The pod's process: its ``command`` + ``args``, or what its image stands for."""
    c = container(pod)
    subst = {"{store}": cfg.store_url, "{python}": cfg.python, "{zone}": cfg.zone}
    cmd = [*c.get("command", []), *c.get("args", [])]
    if cmd:
        return [subst.get(part, part) for part in cmd]
    if c.get("image") == DNS_IMAGE:
        kubeconfig = None
        if cfg.real_control_plane:
            from svcnet.lab.k8s import dns_kubeconfig

            kubeconfig = dns_kubeconfig(cfg)
        return [*cfg.svcnet_argv, "dns", *cfg.store_args(kubeconfig), "--zone", cfg.zone,
                "--listen", "0.0.0.0:53", "--workers", "1", "--health-port", str(DNS_HEALTH_PORT),
                "--lameduck", "0.5"]
    ports = pod_ports(pod)
    argv = [cfg.python, "-m", "svcnet.lab.echo", "serve",
            "--name", pod["metadata"]["name"]]
    for port, proto in ports:
        argv += [{"UDP": "--udp", "SCTP": "--sctp"}.get(proto, "--tcp"), str(port)]
    if cfg.real_control_plane:
        # Real pods get terminationGracePeriodSeconds 30: drain like an application does.
        argv += ["--lameduck", str(ECHO_LAMEDUCK_S)]
    return argv


class Kubelet:
    def __init__(self, cfg: LabConfig, node: str, store: Store, kernel: Kernel) -> None:
        self.cfg = cfg
        self.node = node
        self.store = store
        self.kernel = kernel
        self.dir = cfg.node_dir(node)
        self.sandbox_dir = self.dir / "pods"
        self.ledger = Ledger(cfg.dir)
        self.cni = CNIRunner(self.dir / "net.d",
                             [str(self.dir / "cni-bin")], self.dir / "cni-results")
        self.pods: dict[str, dict[str, Any]] = {}
        self.sandboxes: dict[str, Sandbox] = {}
        self.ready: dict[str, bool] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.synced = False
        # ``--deploy manifests``: svcnet's own pods run from the local install with their
        # volumes, and CNI plugins run in the node's mapped filesystem (svcnet.lab.podrun).
        self.podrun: PodRunner | None = None
        self.liveness: dict[str, tuple[int, Liveness]] = {}
        if cfg.deploy:
            self.podrun = PodRunner(cfg, node, store)
            self.cni = cni_runner(cfg, node)

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def real(self) -> bool:
        """Speaking to a real kube-apiserver: status through the ``/status`` subresources,
        heartbeats through a Lease, deletion finished with grace period 0, as a kubelet."""
        return self.cfg.real_control_plane and isinstance(self.store, KubernetesStore)

    async def run(self) -> None:
        self.sandbox_dir.mkdir(parents=True, exist_ok=True)
        self._adopt()
        if self.real:
            await self._register_real_node()
            heartbeat = asyncio.create_task(self._heartbeat())
        else:
            await self._register_node()
            heartbeat = asyncio.create_task(asyncio.sleep(0))
        watcher = asyncio.create_task(self._watch())
        liveness = asyncio.create_task(self._watch_processes())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), PROBE_PERIOD_S)
                self.wake.clear()
                if self.synced:
                    self._reconcile()
        finally:
            watcher.cancel()
            liveness.cancel()
            heartbeat.cancel()
            for task in self.workers.values():
                task.cancel()

    async def _watch_processes(self) -> None:
        """Notice a pod's process exiting within a fraction of a second, not at the next
        probe: its endpoint must stop receiving traffic at once."""
        while True:
            await asyncio.sleep(PROCESS_CHECK_S)
            if any(not (alive(sb.pid) and start_time_of(sb.pid) == sb.start_time)
                   for sb in list(self.sandboxes.values())):
                self.wake.set()

    async def _register_node(self) -> None:
        cfg, node = self.cfg, self.node
        obj: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": cfg.node_zone(node)}},
            "spec": ({"podCIDR": cfg.node_subnet(node), "podCIDRs": [cfg.node_subnet(node)]}
                     if cfg.overlay == "static" or cfg.store == "kubernetes" else {}),
            "status": {
                "addresses": [{"type": "InternalIP", "address": cfg.node_ip(node)},
                              {"type": "Hostname", "address": node}],
                "conditions": [{"type": "Ready", "status": "True",
                                "lastHeartbeatTime": now_rfc3339()}]},
        }
        for attempt in range(100):
            try:
                # Keep what others wrote on our Node (the overlay's VTEP annotations).
                listing = await self.store.list(NODE, selector=Selector(
                    fields=f"metadata.name={node}"))
                for raw in listing.items:
                    old = json.loads(raw.data)
                    obj["metadata"]["annotations"] = old["metadata"].get("annotations", {})
                    obj["spec"] = {**old.get("spec", {}), **obj["spec"]}
                await self.store.put(NODE, obj)
                return
            except StoreError as err:
                log.warning("registering node %s: %s", node, err)
                await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))
        raise RuntimeError(f"could not register node {node}")

    # --- a real apiserver: registration and heartbeats ---------------------------------
    def _node_status(self) -> dict[str, Any]:
        stamp = now_rfc3339()
        resources = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        return {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": self.cfg.node_ip(self.node)},
                          {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "svcnet lab node agent is posting ready status",
                            "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
            "nodeInfo": {"kubeletVersion": "v1.28.7-svcnet-lab", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "svcnet-lab://0",
                         "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        }

    async def _register_real_node(self) -> None:
        """Create our Node (no podCIDR: the controller-manager's node IPAM allocates it),
        or just post our status if it exists (a restarted agent)."""
        assert isinstance(self.store, KubernetesStore)
        cfg, node = self.cfg, self.node
        obj = {"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": node, "labels": {
                   "kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                   "kubernetes.io/arch": "amd64",
                   "topology.kubernetes.io/zone": cfg.node_zone(node)}},
               "status": self._node_status()}
        for attempt in range(100):
            try:
                status, body = await self.store.call("POST", "/api/v1/nodes", obj)
                if status == 409:
                    status, body = await self._patch_node_status()
                if status in (200, 201):
                    return
                log.warning("registering node %s: %s %s", node, status, body)
            except StoreError as err:
                log.warning("registering node %s: %s", node, err)
            await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))
        raise RuntimeError(f"could not register node {node}")

    async def _patch_node_status(self) -> tuple[int, Any]:
        assert isinstance(self.store, KubernetesStore)
        return await self.store.call(
            "PATCH", f"/api/v1/nodes/{self.node}/status",
            {"status": {k: v for k, v in self._node_status().items() if k != "nodeInfo"}},
            content_type=STRATEGIC_MERGE)

    async def _heartbeat(self) -> None:
        """Renew the node's Lease and post Ready every ``HEARTBEAT_S``: without them the node
        controller marks the node Unknown after 40 s and its pods' endpoints not ready; after
        an outage, posting Ready again is our job."""
        assert isinstance(self.store, KubernetesStore)
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        while True:
            try:
                renew = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40,
                        "renewTime": renew}
                status, body = await self.store.call("PATCH", path, {"spec": spec},
                                                     content_type=MERGE)
                if status == 404:
                    status, body = await self.store.call(
                        "POST", path.rpartition("/")[0],
                        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                         "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                         "spec": spec})
                if status not in (200, 201):
                    log.warning("renewing lease of %s: %s %s", self.node, status, body)
                status, body = await self._patch_node_status()
                if status != 200:
                    log.warning("posting status of %s: %s %s", self.node, status, body)
            except StoreError as err:
                log.warning("heartbeat of %s: %s", self.node, err)
            await asyncio.sleep(HEARTBEAT_S)

    async def _watch(self) -> None:
        selector = Selector(fields=f"spec.nodeName={self.node}")
        async for change in changes(self.store, POD, selector=selector):
            if isinstance(change, Listed):
                self.pods = {}
                for raw in change.items:
                    self.pods[raw.key] = json.loads(raw.data)
                self.synced = True
            elif change.obj is not None:
                key = change.obj.key
                if change.type.value == "DELETED":
                    self.pods.pop(key, None)
                elif change.type.value in ("ADDED", "MODIFIED"):
                    self.pods[key] = json.loads(change.obj.data)
            self.wake.set()

    def _adopt(self) -> None:
        for path in self.sandbox_dir.glob("*.json"):
            try:
                sb = Sandbox(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            self.sandboxes[sb.key] = sb
            log.info("adopted sandbox of %s (pid %d)", sb.key, sb.pid)

    def _save(self, sb: Sandbox) -> None:
        path = self.sandbox_dir / f"{sb.uid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(sb)))
        tmp.replace(path)
        self.sandboxes[sb.key] = sb

    # --- reconcile ---------------------------------------------------------------------
    def _reconcile(self) -> None:
        for key in set(self.pods) | set(self.sandboxes):
            task = self.workers.get(key)
            if task is not None and not task.done():
                continue
            self.workers[key] = asyncio.create_task(self._sync_pod(key), name=f"pod-{key}")

    async def _sync_pod(self, key: str) -> None:
        try:
            pod = self.pods.get(key)
            sb = self.sandboxes.get(key)
            if sb is not None and (pod is None or pod["metadata"].get("uid", "") != sb.uid):
                await self._teardown(sb, pod=None)
                return
            if pod is None:
                return
            if pod["metadata"].get("deletionTimestamp"):
                if sb is not None:
                    await self._terminate(pod, sb)
                await self._delete_pod_object(pod)
                return
            if sb is None:
                sb = await self._create(pod)
            elif not (alive(sb.pid) and start_time_of(sb.pid) == sb.start_time):
                log.warning("pod %s process exited; restarting", key)
                if self.ready.get(key):
                    self.ready[key] = False
                    await self._put_status(pod, sb, ready=False)
                if not sb.host_network:
                    # Like a container runtime stopping the container's cgroup: whatever
                    # the dead process left behind (worker children) goes with it.
                    kill_pids(self.kernel.pids_in(sb.netns))
                sb = self._start_process(pod, sb.netns, sb.ip, sb.host_network,
                                         sb.container_id, sb.restarts + 1)
            await self._probe_and_report(pod, sb)
            if self.podrun is not None and runs_from_manifests(self.cfg, pod):
                await self.podrun.refresh(pod, sb.ip)
                await self._check_liveness(pod, sb)
        except Exception:
            log.exception("syncing pod %s", key)
            await asyncio.sleep(0.5)
            self.wake.set()

    async def _create(self, pod: dict[str, Any]) -> Sandbox:
        meta = pod["metadata"]
        namespace, name, uid = meta.get("namespace", "default"), meta["name"], meta.get("uid", "")
        host_network = bool(pod.get("spec", {}).get("hostNetwork"))
        container_id = (uid or f"{namespace}-{name}").replace("-", "")[:32]
        if host_network:
            node_ns, node_ip = self.cfg.node_ns(self.node), self.cfg.node_ip(self.node)
            await self._prepare_manifest_pod(pod, node_ns, node_ip)
            return self._start_process(pod, node_ns, node_ip, True, container_id, 0)
        netns = self.cfg.pod_ns(namespace, name)
        self.ledger.record("netns", netns)
        self.ledger.record("etc", netns)
        if self.kernel.netns_exists(netns):
            await self._cni_del(netns, container_id, namespace, name)
            self.kernel.delete_netns(netns)
        await asyncio.to_thread(self.kernel.add_netns, netns)
        try:
            result = await self.cni.add(Attachment(
                container_id, str(NETNS_DIR / netns), "eth0", self._cni_args(namespace, name)))
            ip = first_ipv4(result)
            etc = Path("/etc/netns") / netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                pod_resolv_conf(pod, self.cfg.zone, self.cfg.node_ns(self.node)))
            (etc / "hostname").write_text(pod.get("spec", {}).get("hostname") or name)
            await asyncio.to_thread(_pod_sysctls, netns, pod)
            await self._prepare_manifest_pod(pod, netns, ip)
            return self._start_process(pod, netns, ip, False, container_id, 0)
        except BaseException:
            await self._cni_del(netns, container_id, namespace, name)
            self.kernel.delete_netns(netns)
            raise

    async def _prepare_manifest_pod(self, pod: dict[str, Any], netns: str, ip: str) -> None:
        """Volumes, init containers to completion, then the container's spec."""
        if self.podrun is None or not runs_from_manifests(self.cfg, pod):
            return
        resolv = pod_resolv_conf(pod, self.cfg.zone, self.cfg.node_ns(self.node))
        await self.podrun.write_volumes(pod, ip)
        await self.podrun.run_init_containers(pod, netns, ip, resolv)
        await self.podrun.container_argv(pod, container(pod), ip, resolv)

    async def _check_liveness(self, pod: dict[str, Any], sb: Sandbox) -> None:
        """An httpGet liveness probe; after ``failureThreshold`` failures in a row the
        container is stopped (grace period) and the dead-process path restarts it."""
        probe = container(pod).get("livenessProbe") or {}
        if "httpGet" not in probe or not (alive(sb.pid)
                                          and start_time_of(sb.pid) == sb.start_time):
            return
        pid, state = self.liveness.get(sb.key, (0, None))
        if state is None or pid != sb.pid:
            state = Liveness(started=time.monotonic())
            self.liveness[sb.key] = (sb.pid, state)
        now = time.monotonic()
        if not state.due(probe, now):
            return
        http = probe["httpGet"]
        host = "127.0.0.1" if sb.host_network else sb.ip
        ok = await http_ok(host, int(http.get("port", 80)), http.get("path", "/"),
                           float(probe.get("timeoutSeconds", 1)))
        if state.record(probe, ok, time.monotonic()):
            log.warning("pod %s failed its liveness probe %d times; restarting it", sb.key,
                        state.failures)
            grace = float(pod.get("spec", {}).get("terminationGracePeriodSeconds",
                                                  DEFAULT_GRACE_S))
            await asyncio.to_thread(kill_pids, [sb.pid], grace=max(grace, 0.01))
            self.wake.set()

    def _cni_args(self, namespace: str, name: str) -> str:
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
                f"K8S_POD_INFRA_CONTAINER_ID={namespace}-{name}")

    async def _cni_del(self, netns: str, container_id: str, namespace: str, name: str) -> None:
        try:
            await self.cni.delete(Attachment(container_id, str(NETNS_DIR / netns), "eth0",
                                             self._cni_args(namespace, name)))
        except Exception as err:
            log.warning("CNI DEL of %s/%s: %s", namespace, name, err)

    def _start_process(self, pod: dict[str, Any], netns: str, ip: str, host_network: bool,
                       container_id: str, restarts: int) -> Sandbox:
        meta = pod["metadata"]
        env = {"POD_NAME": meta["name"], "POD_NAMESPACE": meta.get("namespace", "default"),
               "POD_IP": ip, "NODE_NAME": self.node}
        key = f"{env['POD_NAMESPACE']}/{env['POD_NAME']}"
        argv = pod_command(self.cfg, pod)
        if self.podrun is not None and runs_from_manifests(self.cfg, pod):
            # The spec (command, its env, mounts) that _prepare_manifest_pod wrote.
            argv = mountexec_argv(self.cfg, self.podrun.spec_path(pod, container(pod)))
        pid = self.kernel.spawn(netns, argv,
                                self.cfg.log(f"pod-{env['POD_NAMESPACE']}.{env['POD_NAME']}"),
                                env=env, mount_ns=True)
        sb = Sandbox(key, meta.get("uid", ""), netns, container_id, ip, pid,
                     start_time_of(pid), host_network, restarts)
        self._save(sb)
        self.ready[key] = False
        return sb

    async def _terminate(self, pod: dict[str, Any], sb: Sandbox) -> None:
        """Graceful stop: not ready at once, SIGTERM, SIGKILL after the grace period."""
        if self.ready.get(sb.key, True):
            self.ready[sb.key] = False
            await self._put_status(pod, sb, ready=False)
        grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or pod.get(
            "spec", {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        await asyncio.to_thread(kill_pids, [sb.pid], grace=max(grace, 0.01))
        await self._teardown(sb, pod)

    async def _teardown(self, sb: Sandbox, pod: dict[str, Any] | None) -> None:
        if alive(sb.pid) and start_time_of(sb.pid) == sb.start_time:
            await asyncio.to_thread(kill_pids, [sb.pid], grace=0.5)
        if not sb.host_network:
            namespace, _, name = sb.key.partition("/")
            await self._cni_del(sb.netns, sb.container_id, namespace, name)
            for pid in self.kernel.pids_in(sb.netns):
                kill_pids([pid])
            await asyncio.to_thread(self.kernel.delete_netns, sb.netns)
            import shutil

            shutil.rmtree(Path("/etc/netns") / sb.netns, ignore_errors=True)
            self.ledger.forget("etc", sb.netns)
            self.ledger.forget("netns", sb.netns)
        (self.sandbox_dir / f"{sb.uid}.json").unlink(missing_ok=True)
        if self.podrun is not None:
            self.podrun.forget(sb.uid)
        self.liveness.pop(sb.key, None)
        self.sandboxes.pop(sb.key, None)
        self.ready.pop(sb.key, None)
        log.info("pod %s torn down", sb.key)

    async def _delete_pod_object(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if self.real:
            # The last step of a graceful deletion: grace 0, only this incarnation (uid).
            assert isinstance(self.store, KubernetesStore)
            ns = meta.get("namespace", "default")
            status, body = await self.store.call(
                "DELETE", f"/api/v1/namespaces/{ns}/pods/{meta['name']}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": meta.get("uid", "")}})
            if status not in (200, 404, 409):
                raise StoreError(f"deleting pod {ns}/{meta['name']}: {status} {body}")
            return
        with contextlib.suppress(NotFound):
            await self.store.delete(POD, meta.get("namespace", "default"), meta["name"])

    # --- readiness and status ----------------------------------------------------------
    async def _probe_and_report(self, pod: dict[str, Any], sb: Sandbox) -> None:
        was = self.ready.get(sb.key)
        ready = await self._probe(pod, sb)
        if not ready and not was:
            # Probe quickly until first ready, so a new pod serves within a fraction of a s.
            for _ in range(40):
                await asyncio.sleep(FIRST_PROBE_RETRY_S)
                if (ready := await self._probe(pod, sb)) or self.pods.get(sb.key) is not pod:
                    break
        status = pod.get("status", {})
        reported = any(c.get("type") == "Ready" and c.get("status") == str(ready)
                       for c in status.get("conditions", ()))
        if was != ready or not reported or status.get("podIP") != sb.ip:
            self.ready[sb.key] = ready
            await self._put_status(pod, sb, ready=ready)

    async def _probe(self, pod: dict[str, Any], sb: Sandbox) -> bool:
        if not (alive(sb.pid) and start_time_of(sb.pid) == sb.start_time):
            return False
        probe = container(pod).get("readinessProbe")
        tcp_ports = [p for p, proto in pod_ports(pod) if proto == "TCP"]
        port: int | None = None
        path = ""
        if probe and "httpGet" in probe:
            port, path = int(probe["httpGet"].get("port", 80)), probe["httpGet"].get("path", "/")
        elif probe and "tcpSocket" in probe:
            port = int(probe["tcpSocket"]["port"])
        elif probe and "exec" in probe:
            return await self._exec_probe(sb, [
                {"{python}": self.cfg.python}.get(a, a) for a in probe["exec"]["command"]])
        elif tcp_ports:
            port = tcp_ports[0]
        elif not pod_ports(pod) and is_echo(pod):
            port = 8080
        if port is None:
            return True
        # The kubelet shares a hostNetwork pod's namespace: probe it on loopback, where
        # daemons often keep their health endpoints.
        host = "127.0.0.1" if sb.host_network else sb.ip
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            return False
        try:
            if not path:
                return True
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {sb.ip}\r\n\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), 1.0)
            parts = line.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def _exec_probe(self, sb: Sandbox, argv: list[str]) -> bool:
        """An exec probe: the command runs inside the pod's namespaces; exit 0 = ready."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", sb.netns, *argv, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            return await asyncio.wait_for(proc.wait(), 2.0) == 0
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return False

    async def _put_status(self, pod: dict[str, Any], sb: Sandbox, *, ready: bool) -> None:
        flag = "True" if ready else "False"
        stamp = now_rfc3339()
        if self.real:
            await self._patch_pod_status(pod, sb, ready=ready, stamp=stamp)
            return
        obj = {**pod, "status": {
            "phase": "Running", "podIP": sb.ip, "podIPs": [{"ip": sb.ip}],
            "hostIP": self.cfg.node_ip(self.node), "startTime": pod.get("status", {}).get(
                "startTime", stamp),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
                {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
            ],
            "containerStatuses": [{"name": container(pod).get("name", "main"), "ready": ready,
                                   "restartCount": sb.restarts, "started": True}],
        }}
        meta = dict(obj["metadata"])
        meta.pop("resourceVersion", None)
        obj["metadata"] = meta
        latest = self.pods.get(sb.key)
        if latest is not None and latest["metadata"].get("deletionTimestamp"):
            meta["deletionTimestamp"] = latest["metadata"]["deletionTimestamp"]
        await self.store.put(POD, obj)

    async def _patch_pod_status(self, pod: dict[str, Any], sb: Sandbox, *, ready: bool,
                                stamp: str) -> None:
        assert isinstance(self.store, KubernetesStore)
        meta = pod["metadata"]
        flag = "True" if ready else "False"
        c = container(pod)
        started = pod.get("status", {}).get("startTime") or stamp
        status = {
            "phase": "Running", "podIP": sb.ip, "podIPs": [{"ip": sb.ip}],
            "hostIP": self.cfg.node_ip(self.node), "startTime": started,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
                {"type": "Ready", "status": flag, "lastTransitionTime": stamp}],
            "containerStatuses": [{
                "name": c.get("name", "main"), "ready": ready, "restartCount": sb.restarts,
                "started": True, "image": c.get("image", ""), "imageID": "",
                "containerID": f"svcnet-lab://{sb.container_id}",
                "state": {"running": {"startedAt": started}}}],
        }
        inits = pod.get("spec", {}).get("initContainers") or []
        if inits:  # the container runs only after every init container completed
            status["initContainerStatuses"] = [{
                "name": i.get("name", "init"), "ready": True, "restartCount": 0,
                "image": i.get("image", ""), "imageID": "",
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
                for i in inits]
        ns = meta.get("namespace", "default")
        code, body = await self.store.call(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/{meta['name']}/status",
            {"metadata": {"uid": meta.get("uid", "")}, "status": status},
            content_type=STRATEGIC_MERGE)
        if code == 404:
            return
        if code != 200:
            raise StoreError(f"status of pod {ns}/{meta['name']}: {code} {body}")


async def http_ok(host: str, port: int, path: str, timeout: float) -> bool:
    """An httpGet probe: connected and a 2xx/3xx status line within ``timeout``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _pod_sysctls(netns: str, pod: dict[str, Any]) -> None:
    """The pod's namespaced sysctls (``securityContext.sysctls``), in its namespace."""
    sysctls = pod.get("spec", {}).get("securityContext", {}).get("sysctls") or []
    if not sysctls:
        return

    def write() -> None:
        for item in sysctls:
            Path("/proc/sys", *str(item["name"]).split(".")).write_text(str(item["value"]))

    in_netns_thread(netns, write)


async def run_kubelet(cfg: LabConfig, node: str) -> None:
    from svcnet.lab.netns import RealKernel

    from svcnet.store.open import open_store

    kubeconfig = cfg.kubeconfig
    if cfg.real_control_plane:
        from svcnet.lab.k8s import node_agent_kubeconfig

        kubeconfig = node_agent_kubeconfig(cfg, node)
    store = open_store(cfg.store_url, kubeconfig=kubeconfig)
    kubelet = Kubelet(cfg, node, store, RealKernel())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(kubelet.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopper.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    await store.close()


def heartbeat_age(node: dict[str, Any]) -> float | None:
    for cond in node.get("status", {}).get("conditions", ()):
        if cond.get("type") == "Ready" and cond.get("lastHeartbeatTime"):
            t = datetime.datetime.strptime(cond["lastHeartbeatTime"], "%Y-%m-%dT%H:%M:%SZ")
            return time.time() - t.replace(tzinfo=datetime.UTC).timestamp()
    return None
