"""A small CRI client: start and stop pod sandboxes on a container runtime as a kubelet does.

It speaks the Kubernetes Container Runtime Interface (``runtime.v1.RuntimeService`` over gRPC
on a unix socket) with the few messages in ``cripb/cri.proto``. This is the kubelet's path
into the network plugin: RunPodSandbox makes the runtime create the pod's network namespace
and run CNI ADD (with ``K8S_POD_*`` CNI_ARGS and port mappings as runtimeConfig);
StopPodSandbox runs CNI DEL; RemovePodSandbox forgets the pod.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from .cripb import cri_pb2 as pb

SERVICE = "/runtime.v1.RuntimeService/"


@dataclass(frozen=True)
class PortMapping:
    container_port: int
    host_port: int
    protocol: str = "TCP"
    host_ip: str = ""


@dataclass(frozen=True)
class PodSpec:
    """What a kubelet puts in a PodSandboxConfig, reduced to what networking looks at."""

    name: str
    namespace: str = "default"
    uid: str = ""
    attempt: int = 0
    hostname: str = ""
    ports: Sequence[PortMapping] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    dns_servers: Sequence[str] = ()
    dns_searches: Sequence[str] = ()
    log_directory: str = ""
    cgroup_parent: str = ""


@dataclass(frozen=True)
class SandboxStatus:
    id: str
    ready: bool
    ip: str
    additional_ips: tuple[str, ...]
    info: dict[str, Any]  # the runtime's verbose details (JSON), e.g. containerd's netns path


def sandbox_config(spec: PodSpec) -> pb.PodSandboxConfig:
    uid = spec.uid or f"uid-{spec.namespace}-{spec.name}"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=spec.name, uid=uid, namespace=spec.namespace,
                                       attempt=spec.attempt),
        hostname=spec.hostname or spec.name,
        log_directory=spec.log_directory,
        dns_config=pb.DNSConfig(servers=list(spec.dns_servers),
                                searches=list(spec.dns_searches)),
        port_mappings=[pb.PortMapping(protocol=p.protocol,
                                      container_port=p.container_port, host_port=p.host_port,
                                      host_ip=p.host_ip) for p in spec.ports],
        labels=dict(spec.labels), annotations=dict(spec.annotations),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=spec.cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.POD, ipc=pb.POD))))


class CriClient:
    """``RuntimeService`` calls on ``socket_path``; ``timeout`` bounds each call."""

    def __init__(self, socket_path: str, timeout: float = 60) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")

    def _call(self, method: str, request: Any, response_type: Any) -> Any:
        call: Callable[..., Any] = self.channel.unary_unary(
            SERVICE + method, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString)
        return call(request, timeout=self.timeout)

    def version(self) -> pb.VersionResponse:
        response: pb.VersionResponse = self._call("Version", pb.VersionRequest(version="v1"),
                                                  pb.VersionResponse)
        return response

    def wait_ready(self, timeout: float = 30) -> pb.VersionResponse:
        """Version, retried until the runtime answers (it is starting) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.version()
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def run_pod_sandbox(self, spec: PodSpec, runtime_handler: str = "") -> str:
        request = pb.RunPodSandboxRequest(config=sandbox_config(spec),
                                          runtime_handler=runtime_handler)
        response = self._call("RunPodSandbox", request, pb.RunPodSandboxResponse)
        return str(response.pod_sandbox_id)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                   pb.StopPodSandboxResponse)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                   pb.RemovePodSandboxResponse)

    def pod_sandbox_status(self, sandbox_id: str, verbose: bool = True) -> SandboxStatus:
        response = self._call("PodSandboxStatus",
                              pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                         verbose=verbose),
                              pb.PodSandboxStatusResponse)
        status = response.status
        info: dict[str, Any] = {}
        for key, text in response.info.items():
            try:
                info[key] = json.loads(text)
            except ValueError:
                info[key] = text
        return SandboxStatus(id=status.id, ready=status.state == pb.SANDBOX_READY,
                             ip=status.network.ip,
                             additional_ips=tuple(p.ip for p in status.network.additional_ips),
                             info=info)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
