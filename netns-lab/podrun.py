"""Running Pods from ``svcnet manifests`` in the lab, as kubelet + a container runtime would.

``svcnet lab up --control-plane kubernetes --deploy manifests`` starts no svcnet daemon of its
own: the DaemonSet and Deployment controllers create the pods and the lab's node agent
(kubelet.py) runs them through this module. No image registry is reachable, so the image's
command runs from the local install (the venv's ``svcnet`` first on ``PATH``), inside a
mount namespace of its own built by ``mountexec``:

- volumes: ``hostPath`` mapped to the node's own directory (``/etc/cni/net.d`` ->
  ``<lab>/nodes/<node>/etc/cni/net.d``; the host's ``/run/netns`` and ``/lib/modules``,
  which a lab node shares with the machine, as they are); ``configMap`` and ``projected``
  written by the kubelet's atomic ``..data`` swap, the ServiceAccount token from the
  TokenRequest API bound to the pod and rewritten at 80% of its lifetime; ``emptyDir``;
- env: values, ``fieldRef`` (downward API), ``configMapKeyRef``; ``KUBERNETES_SERVICE_HOST/
  PORT`` = the ``kubernetes`` Service, as a kubelet sets them; ``$(VAR)`` in command/args;
- init containers run one after the other to completion before the containers start.

The node agent runs CNI plugins through the same mount mapping (``cni_runner``), so the
conflist and binaries the init container installed, and the node daemon's socket under
``/run/svcnet``, are where the plugin expects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svcnet.lab.cnirun import CNIRunner
from svcnet.lab.state import SERVICE_NETWORK, LabConfig

from svcnet.store.base import Store

log = logging.getLogger(__name__)

# What a lab node shares with the machine (one kernel): used as they are (when the machine
# has them: a CI container may have no /lib/modules, then the node gets an empty one).
SHARED_HOST_PATHS = ("/run/netns", "/lib/modules")
# The node's own directories every CNI plugin call sees (what a runtime's host has).
NODE_CNI_PATHS = ("/etc/cni/net.d", "/opt/cni/bin", "/run/svcnet", "/var/lib/cni")
REFERENCE_CNI_DIR = Path("/usr/lib/cni")
TOKEN_SECONDS = 3607
"""What the ServiceAccount admission plugin puts in the projected token source."""
INIT_TIMEOUT_S = 300.0
KUBERNETES_SERVICE_IP = str(SERVICE_NETWORK.network_address + 1)
FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class PodError(RuntimeError):
    """A pod the lab cannot run as asked (a volume type it lacks, an init container that
    failed); the message is put in the pod's log and the kubelet retries."""


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    read_only: bool = False
    recursive: bool = True
    """False for a path bound back over a volume covering it: a recursive bind would copy
    the covering mount along (it sits on the same path)."""


@dataclass(frozen=True)
class ContainerSpec:
    """What ``mountexec`` reads: the command, its whole environment, mounts and files."""

    argv: tuple[str, ...]
    env: dict[str, str] | None
    scratch: str
    binds: tuple[Bind, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


def runs_from_manifests(cfg: LabConfig, pod: dict[str, Any]) -> bool:
    """A pod whose image is svcnet's (``localhost/svcnet:0.1.0``), in a ``--deploy`` lab."""
    if not getattr(cfg, "deploy", ""):
        return False
    containers = pod.get("spec", {}).get("containers") or [{}]
    image = str(containers[0].get("image", ""))
    return image.rpartition("/")[2].partition(":")[0].partition("@")[0] == "svcnet"


def host_path(cfg: LabConfig, node: str, path: str) -> Path:
    """Where a hostPath is on a lab node: its own directory, except what it shares."""
    norm = "/" + path.strip("/")
    if any(norm == p or norm.startswith(p + "/") for p in SHARED_HOST_PATHS) and Path(
            norm).exists():
        return Path(norm)
    return cfg.node_dir(node) / norm.lstrip("/")


def venv_bin(cfg: LabConfig) -> str:
    return str(Path(cfg.python).parent)


def install_binds(cfg: LabConfig, targets: list[str]) -> list[Bind]:
    """The local install stands in for the image's files, so it must stay visible: where a
    volume covers it (an emptyDir on ``/tmp`` over a checkout in ``/tmp``), it is bound back
    on top, read-only."""
    import svcnet

    roots = sorted({Path(cfg.python).parent.parent,  # the venv (not resolved: its python
                    Path(svcnet.__file__).resolve().parents[1]})  # links out of it)
    covered = [r for r in roots if any(r == Path(t) or Path(t) in r.parents for t in targets)]
    outermost = [r for r in covered if not any(o in r.parents for o in covered)]
    return [Bind(str(r), str(r), read_only=True, recursive=False) for r in outermost]


def mountexec_argv(cfg: LabConfig, spec: Path) -> list[str]:
    return [cfg.python, "-m", "svcnet.lab.mountexec", str(spec)]


def prepare_node(cfg: LabConfig, node: str) -> None:
    """A node as the OS leaves it before svcnet is installed: empty CNI directories, with
    the reference plugins in ``/opt/cni/bin`` (Debian's containernetworking-plugins), and
    the spec every CNI plugin call runs with."""
    d = cfg.node_dir(node)
    for path in (*NODE_CNI_PATHS, *SHARED_HOST_PATHS):
        host_path(cfg, node, path).mkdir(parents=True, exist_ok=True)
    bin_dir = host_path(cfg, node, "/opt/cni/bin")
    if REFERENCE_CNI_DIR.is_dir():
        for plugin in REFERENCE_CNI_DIR.iterdir():
            link = bin_dir / plugin.name
            if not link.exists():
                link.symlink_to(plugin)
    ContainerSpec(argv=(), env=None, scratch=str(d / "cni-scratch"), binds=tuple(
        Bind(str(host_path(cfg, node, p)), p) for p in NODE_CNI_PATHS)).write(
        d / "cni-exec.json")


def cni_runner(cfg: LabConfig, node: str) -> CNIRunner:
    """libcni on a node where svcnet was installed by its manifests: the first conflist of
    the node's ``/etc/cni/net.d``, plugins from its ``/opt/cni/bin``, run in that view."""
    d = cfg.node_dir(node)
    return CNIRunner(host_path(cfg, node, "/etc/cni/net.d"),
                     [str(host_path(cfg, node, "/opt/cni/bin"))], d / "cni-results",
                     launcher=[*mountexec_argv(cfg, d / "cni-exec.json"), "--"],
                     exec_path=["/opt/cni/bin"])


def write_atomic(directory: Path, files: dict[str, bytes]) -> None:
    """The kubelet's AtomicWriter: a fresh timestamped directory, ``..data`` swapped to it
    by one rename, each top-level name a symlink through ``..data``; readers never see a
    half-written set (the token rotating while the agent reads it)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for rel, data in files.items():
        path = stamp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    data_link = directory / "..data"
    old = data_link.resolve() if data_link.is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp.name)
    tmp.replace(data_link)
    for name in {rel.split("/", 1)[0] for rel in files}:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None and old != stamp.resolve():
        shutil.rmtree(old, ignore_errors=True)


def field_value(pod: dict[str, Any], path: str, node: str, ip: str, host_ip: str) -> str:
    """A downward API ``fieldRef``, as the kubelet resolves it for env and volumes."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName") or node,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": ip, "status.podIPs": ip, "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = FIELD_LABEL.match(path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    raise PodError(f"fieldRef {path!r} is not supported")


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` in command, args and env values; ``$$`` is a literal ``$``; an unknown
    reference stays as written (Kubernetes' rules)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return VAR_REF.sub(sub, text)


def _parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class PodRunner:
    """Volumes, tokens, environment and init containers of one node's manifest pods."""

    def __init__(self, cfg: LabConfig, node: str, store: Store) -> None:
        self.cfg = cfg
        self.node = node
        self.store = store
        self.dir = cfg.node_dir(node) / "containers"
        self.refresh_at: dict[str, float] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}

    # --- API reads ----------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        call = getattr(self.store, "call", None)
        if call is None:
            raise PodError("manifest pods need the Kubernetes API (--control-plane kubernetes)")
        result: tuple[int, Any] = await call(method, path, body)
        return result

    async def config_map(self, namespace: str, name: str, *, fresh: bool = False
                         ) -> dict[str, str]:
        key = (namespace, name)
        if fresh or key not in self.config_maps:
            status, body = await self._call(
                "GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
            if status != 200:
                raise PodError(f"configmap {namespace}/{name}: {status} "
                               f"{(body or {}).get('message', '')}")
            self.config_maps[key] = dict(body.get("data") or {})
        return self.config_maps[key]

    async def token(self, pod: dict[str, Any], source: dict[str, Any]) -> tuple[str, float]:
        """A token for the pod's ServiceAccount from the TokenRequest API, bound to the pod
        (invalid once the pod or the account is deleted); (token, expiry epoch)."""
        meta = pod["metadata"]
        namespace = meta.get("namespace", "default")
        account = pod.get("spec", {}).get("serviceAccountName") or "default"
        audience = source.get("audience")
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [audience] if audience else [],
            "expirationSeconds": int(source.get("expirationSeconds", TOKEN_SECONDS)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "uid": meta.get("uid", "")}}}
        status, reply = await self._call(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body)
        if status not in (200, 201):
            raise PodError(f"token for {namespace}/{account}: {status} "
                           f"{(reply or {}).get('message', '')}")
        return reply["status"]["token"], _parse_time(reply["status"]["expirationTimestamp"])

    # --- volumes ------------------------------------------------------------------------
    def pod_dir(self, pod: dict[str, Any]) -> Path:
        return self.dir / str(pod["metadata"].get("uid") or pod["metadata"]["name"])

    def volume_path(self, pod: dict[str, Any], volume: dict[str, Any]) -> Path:
        if "hostPath" in volume:
            return host_path(self.cfg, self.node, volume["hostPath"]["path"])
        return self.pod_dir(pod) / "volumes" / str(volume["name"])

    async def write_volumes(self, pod: dict[str, Any], ip: str, *, only_tokens: bool = False
                            ) -> None:
        """Create or refresh every volume; ``only_tokens``: the projected ones (rotation)."""
        namespace = pod["metadata"].get("namespace", "default")
        expiries: list[tuple[float, float]] = []
        for volume in pod.get("spec", {}).get("volumes", []):
            path = self.volume_path(pod, volume)
            if "projected" in volume:
                files: dict[str, bytes] = {}
                for source in volume["projected"].get("sources", []):
                    files.update(await self._projected(pod, source, ip, expiries))
                write_atomic(path, files)
            elif only_tokens:
                continue
            elif "hostPath" in volume:
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                elif kind == "FileOrCreate":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch(exist_ok=True)
                elif kind in ("Directory", "File") and not path.exists():
                    raise PodError(f"hostPath {volume['hostPath']['path']} ({path}) does not "
                                   "exist")
            elif "configMap" in volume:
                ref = volume["configMap"]
                data = await self.config_map(namespace, ref["name"], fresh=True)
                write_atomic(path, _items(data, ref.get("items")))
            elif "emptyDir" in volume:
                path.mkdir(parents=True, exist_ok=True)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise PodError(f"volume {volume['name']}: {', '.join(kinds)} is not supported "
                               "by the lab")
        if expiries:
            # The kubelet rewrites a token at 80% of its lifetime.
            self.refresh_at[pod["metadata"].get("uid", "")] = min(
                issued + 0.8 * (expiry - issued) for issued, expiry in expiries)

    async def _projected(self, pod: dict[str, Any], source: dict[str, Any], ip: str,
                         expiries: list[tuple[float, float]]) -> dict[str, bytes]:
        namespace = pod["metadata"].get("namespace", "default")
        if "serviceAccountToken" in source:
            issued = time.time()
            token, expiry = await self.token(pod, source["serviceAccountToken"])
            expiries.append((issued, expiry))
            return {source["serviceAccountToken"].get("path", "token"): token.encode()}
        if "configMap" in source:
            data = await self.config_map(namespace, source["configMap"]["name"], fresh=True)
            return _items(data, source["configMap"].get("items"))
        if "downwardAPI" in source:
            return {item["path"]: field_value(pod, item["fieldRef"]["fieldPath"], self.node,
                                              ip, self.cfg.node_ip(self.node)).encode()
                    for item in source["downwardAPI"].get("items", []) if "fieldRef" in item}
        raise PodError(f"projected source {sorted(source)} is not supported by the lab")

    async def refresh(self, pod: dict[str, Any], ip: str) -> bool:
        """Rewrite the projected volumes when a token is due; True if it did."""
        due = self.refresh_at.get(pod["metadata"].get("uid", ""))
        if due is None or time.time() < due:
            return False
        await self.write_volumes(pod, ip, only_tokens=True)
        log.info("rotated the projected token of %s/%s", pod["metadata"].get("namespace"),
                 pod["metadata"]["name"])
        return True

    def forget(self, uid: str) -> None:
        self.refresh_at.pop(uid, None)
        shutil.rmtree(self.dir / uid, ignore_errors=True)

    # --- containers ---------------------------------------------------------------------
    async def environment(self, pod: dict[str, Any], c: dict[str, Any], ip: str
                          ) -> dict[str, str]:
        spec = pod.get("spec", {})
        namespace = pod["metadata"].get("namespace", "default")
        env = {"PATH": f"{venv_bin(self.cfg)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                       "/usr/bin:/sbin:/bin",
               "HOSTNAME": self.node if spec.get("hostNetwork") else pod["metadata"]["name"],
               "KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_IP,
               "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_SERVICE_PORT_HTTPS": "443",
               "KUBERNETES_PORT": f"tcp://{KUBERNETES_SERVICE_IP}:443"}
        for var in c.get("env", []):
            name = var["name"]
            if "value" in var:
                env[name] = expand(str(var["value"]), env)
                continue
            ref = var.get("valueFrom", {})
            if "fieldRef" in ref:
                env[name] = field_value(pod, ref["fieldRef"]["fieldPath"], self.node, ip,
                                        self.cfg.node_ip(self.node))
            elif "configMapKeyRef" in ref:
                key = ref["configMapKeyRef"]
                try:
                    data = await self.config_map(namespace, key["name"])
                except PodError:
                    if key.get("optional"):
                        continue
                    raise
                if key["key"] in data:
                    env[name] = data[key["key"]]
                elif not key.get("optional"):
                    raise PodError(f"env {name}: key {key['key']} not in configmap "
                                   f"{key['name']}")
            else:
                raise PodError(f"env {name}: {sorted(ref)} is not supported by the lab")
        return env

    async def spec(self, pod: dict[str, Any], c: dict[str, Any], ip: str, resolv: str
                   ) -> ContainerSpec:
        env = await self.environment(pod, c, ip)
        argv = [expand(str(a), env) for a in [*c.get("command", []), *c.get("args", [])]]
        if not argv:
            raise PodError(f"container {c.get('name')}: no command (the lab has no image "
                           "entrypoint to fall back on)")
        volumes = {v["name"]: v for v in pod.get("spec", {}).get("volumes", [])}
        binds = []
        for vm in c.get("volumeMounts", []):
            volume = volumes.get(vm["name"])
            if volume is None:
                raise PodError(f"volumeMount {vm['name']}: no such volume")
            source = self.volume_path(pod, volume)
            if vm.get("subPath"):
                source = source / vm["subPath"]
            read_only = bool(vm.get("readOnly")) or any(
                k in volume for k in ("configMap", "projected", "secret", "downwardAPI"))
            binds.append(Bind(str(source), vm["mountPath"], read_only))
        binds += install_binds(self.cfg, [b.target for b in binds])
        spec = pod.get("spec", {})
        hostname = self.node if spec.get("hostNetwork") else (
            spec.get("hostname") or pod["metadata"]["name"])
        return ContainerSpec(
            argv=tuple(argv), env=env,
            scratch=str(self.pod_dir(pod) / "scratch" / c.get("name", "main")),
            binds=tuple(binds),
            files={"/etc/resolv.conf": resolv, "/etc/hostname": hostname + "\n"},
            workdir=c.get("workingDir") or "/")

    def spec_path(self, pod: dict[str, Any], c: dict[str, Any]) -> Path:
        return self.pod_dir(pod) / "specs" / f"{c.get('name', 'main')}.json"

    async def container_argv(self, pod: dict[str, Any], c: dict[str, Any], ip: str,
                             resolv: str) -> list[str]:
        """Write container ``c``'s spec; the argv that runs it (to be started inside the
        pod's network namespace, with ``ip netns exec``). Restarts reuse the spec."""
        spec = await self.spec(pod, c, ip, resolv)
        path = self.spec_path(pod, c)
        spec.write(path)
        return mountexec_argv(self.cfg, path)

    async def run_init_containers(self, pod: dict[str, Any], netns: str, ip: str,
                                  resolv: str) -> None:
        """Each init container in order, to completion; the first failure stops the pod's
        start (the kubelet retries the whole sequence, as with restartPolicy Always)."""
        meta = pod["metadata"]
        for c in pod.get("spec", {}).get("initContainers", []):
            argv = await self.container_argv(pod, c, ip, resolv)
            logfile = self.cfg.log(f"pod-{meta.get('namespace')}.{meta['name']}."
                                   f"{c.get('name', 'init')}")
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with logfile.open("ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", netns, *argv, stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=out)
                try:
                    code = await asyncio.wait_for(proc.wait(), INIT_TIMEOUT_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    raise PodError(f"init container {c.get('name')} did not finish in "
                                   f"{INIT_TIMEOUT_S:.0f} s") from None
            if code != 0:
                raise PodError(f"init container {c.get('name')} exited with {code}; see "
                               f"{logfile}")
            log.info("init container %s of %s/%s completed", c.get("name"),
                     meta.get("namespace"), meta["name"])


def running_argv(cfg: LabConfig, node: str, pod_prefix: str) -> list[str] | None:
    """The command of the running pod ``pod_prefix*`` (e.g. ``kube-system/svcnet-node-``) on
    ``node``, its paths translated to where they are outside the container (through the
    container's bind mounts), so a check run from the node agent's view (``lab verify``)
    reads the same files the daemon does."""
    for rec in sorted(cfg.node_dir(node).glob("pods/*.json")):
        try:
            sandbox = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if not str(sandbox.get("key", "")).startswith(pod_prefix):
            continue
        for spec_file in (cfg.node_dir(node) / "containers" / sandbox["uid"] / "specs").glob(
                "*.json"):
            spec = json.loads(spec_file.read_text())
            if spec_file.stem.startswith("install"):
                continue
            binds = sorted(spec.get("binds", []), key=lambda b: -len(b["target"]))
            return [_outside(arg, binds) for arg in spec["argv"]]
    return None


def _outside(arg: str, binds: list[dict[str, Any]]) -> str:
    for b in binds:
        target = b["target"].rstrip("/")
        if arg == target or arg.startswith(target + "/"):
            return str(b["source"]) + arg[len(target):]
    return arg


def _items(data: dict[str, str], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
    if not items:
        return {k: v.encode() for k, v in data.items()}
    out = {}
    for item in items:
        if item["key"] not in data:
            raise PodError(f"key {item['key']} not in configmap")
        out[item.get("path", item["key"])] = data[item["key"]].encode()
    return out


@dataclass
class Liveness:
    """A container's liveness probe state: failures in a row, when the next check is due."""

    started: float
    failures: int = 0
    next_at: float = 0.0

    def due(self, probe: dict[str, Any], now: float) -> bool:
        return (now >= self.started + float(probe.get("initialDelaySeconds", 0))
                and now >= self.next_at)

    def record(self, probe: dict[str, Any], ok: bool, now: float) -> bool:
        """Count one result; True when the container must be restarted."""
        self.next_at = now + float(probe.get("periodSeconds", 10))
        self.failures = 0 if ok else self.failures + 1
        return self.failures >= int(probe.get("failureThreshold", 3))
