"""Slim, immutable records of the Kubernetes objects svcnet consumes.

The records keep the Kubernetes JSON shape (``metadata`` / ``spec`` / ``status``) but only the
fields some component reads, so msgspec can decode API bytes straight into them in C: 100k
EndpointSlice endpoints decode in tens of milliseconds, where building dataclasses from
``json.loads`` dicts takes about a second (``bench/watch_decode.py`` measures both).
Unknown fields are ignored, so newer API servers stay compatible. Records are ``gc=False``:
they hold only strings, numbers, tuples and string dicts, so they can never form a reference
cycle, and untracked objects spare the cyclic collector a pass over every decoded endpoint.
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar

from msgspec import Meta as Constraint
from msgspec import Struct, field
from msgspec.structs import force_setattr

from svcnet.model import validation

Port = Annotated[int, Constraint(ge=1, le=65535)]
OptionalPort = Annotated[int, Constraint(ge=0, le=65535)]
Protocol = Literal["TCP", "UDP", "SCTP"]
IPFamily = Literal["IPv4", "IPv6"]

T = TypeVar("T")
if TYPE_CHECKING:
    ListOf: TypeAlias = tuple[T, ...]
else:
    class ListOf:
        """A JSON list that may arrive as ``null``: records hold it as a tuple, empty for null.

        kube-apiserver writes a Go nil slice as ``null`` wherever the field has no
        ``omitempty`` (EndpointSlice ``endpoints`` and ``ports``: an empty list comes back as
        ``null`` after its round trip through etcd), and writers that bypass it may send
        ``null`` for any list. msgspec decodes ``tuple[T, ...] | None``; the record's
        ``__post_init__`` turns ``None`` into ``()`` (``_empty_nulls``), so consumers always
        see a tuple, as the type checker is told.
        """

        def __class_getitem__(cls, item: Any) -> Any:
            return tuple[item, ...] | None


def _empty_nulls(obj: Struct, *names: str) -> None:
    for name in names:
        if getattr(obj, name) is None:
            force_setattr(obj, name, ())


def _check(problem: str | None, path: str) -> None:
    if problem is not None:
        raise ValueError(f"{path}: {problem}")


class ObjectMeta(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    deletion_timestamp: str | None = None

    def __post_init__(self) -> None:
        if self.namespace:
            _check(validation.dns1123_label(self.namespace), "namespace")


# --- Service -----------------------------------------------------------------------------


class ServicePort(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    port: Port
    name: str = ""
    protocol: Protocol = "TCP"
    target_port: int | str = 0
    node_port: OptionalPort = 0
    app_protocol: str | None = None

    @property
    def effective_target_port(self) -> int | str:
        """Kubernetes defaults targetPort to port when it is unset."""
        return self.target_port or self.port


class ClientIPConfig(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    timeout_seconds: Annotated[int, Constraint(ge=1, le=86400)] = 10800


class SessionAffinityConfig(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    client_ip: ClientIPConfig | None = field(default=None, name="clientIP")


class ServiceSpec(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str = field(default="", name="clusterIP")
    cluster_ips: ListOf[str] = field(default=(), name="clusterIPs")
    ip_families: ListOf[IPFamily] = ()
    ip_family_policy: str | None = None
    ports: ListOf[ServicePort] = ()
    selector: dict[str, str] | None = None
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: Literal["Cluster", "Local", ""] = ""
    internal_traffic_policy: Literal["Cluster", "Local", ""] = ""
    external_ips: ListOf[str] = field(default=(), name="externalIPs")
    load_balancer_ip: str = field(default="", name="loadBalancerIP")
    load_balancer_source_ranges: ListOf[str] = ()
    health_check_node_port: OptionalPort = 0
    publish_not_ready_addresses: bool = False
    external_name: str = ""
    allocate_load_balancer_node_ports: bool | None = None
    load_balancer_class: str | None = None

    def __post_init__(self) -> None:
        _empty_nulls(self, "cluster_ips", "ip_families", "ports", "external_ips",
                     "load_balancer_source_ranges")


class LoadBalancerIngress(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    ip: str = ""
    hostname: str = ""
    ip_mode: Literal["VIP", "Proxy"] | None = None


class LoadBalancerStatus(Struct, frozen=True, gc=False, omit_defaults=True):
    ingress: ListOf[LoadBalancerIngress] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "ingress")


class ServiceStatus(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    load_balancer: LoadBalancerStatus = LoadBalancerStatus()


class Service(Struct, frozen=True, gc=False, omit_defaults=True):
    metadata: ObjectMeta
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus = ServiceStatus()

    def __post_init__(self) -> None:
        _check(validation.dns1035_label(self.metadata.name), "metadata.name")
        for path, ip in _service_ips(self.spec):
            _check_ip(ip, path)
        for i, cidr in enumerate(self.spec.load_balancer_source_ranges):
            _check_cidr(cidr, f"spec.loadBalancerSourceRanges[{i}]")
        _check_service_ports(self.spec.ports)
        if self.spec.type == "ExternalName":
            _check(validation.dns1123_subdomain(self.spec.external_name.removesuffix(".")),
                   "spec.externalName")

    @property
    def cluster_ips(self) -> tuple[str, ...]:
        """All cluster IPs, primary first; empty for headless and ExternalName services."""
        ips = self.spec.cluster_ips or ((self.spec.cluster_ip,) if self.spec.cluster_ip else ())
        return tuple(ip for ip in ips if ip and ip != "None")

    @property
    def is_headless(self) -> bool:
        return self.spec.cluster_ip == "None"

    @property
    def affinity_timeout(self) -> int:
        """ClientIP affinity timeout in seconds, 0 when affinity is off."""
        if self.spec.session_affinity != "ClientIP":
            return 0
        cfg = self.spec.session_affinity_config
        return cfg.client_ip.timeout_seconds if cfg and cfg.client_ip else 10800


# --- EndpointSlice -----------------------------------------------------------------------


class EndpointConditions(Struct, frozen=True, gc=False, omit_defaults=True):
    """Nil ready/serving mean "unknown": consumers treat them as true, as Kubernetes does."""

    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(Struct, frozen=True, gc=False):
    name: str


class ForNode(Struct, frozen=True, gc=False):
    name: str


class EndpointHints(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    for_zones: ListOf[ForZone] = ()
    for_nodes: ListOf[ForNode] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "for_zones", "for_nodes")


class ObjectReference(Struct, frozen=True, gc=False, omit_defaults=True):
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class Endpoint(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    addresses: tuple[str, ...]
    conditions: EndpointConditions = EndpointConditions()
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None
    target_ref: ObjectReference | None = None

    @property
    def ready(self) -> bool:
        return self.conditions.ready is not False

    @property
    def serving(self) -> bool:
        c = self.conditions
        return c.serving is not False if c.serving is not None else c.ready is not False

    @property
    def terminating(self) -> bool:
        return self.conditions.terminating is True


class EndpointPort(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    name: str = ""
    protocol: Protocol = "TCP"
    port: OptionalPort = 0
    app_protocol: str | None = None


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class EndpointSlice(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: ListOf[Endpoint] = ()
    ports: ListOf[EndpointPort] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "endpoints", "ports")
        _check(validation.dns1123_subdomain(self.metadata.name), "metadata.name")
        check_endpoint_slice_names(self.endpoints, self.ports)
        if self.address_type == "FQDN":
            return
        family = socket.AF_INET if self.address_type == "IPv4" else socket.AF_INET6
        pton = socket.inet_pton
        for i, ep in enumerate(self.endpoints):
            for j, addr in enumerate(ep.addresses):
                try:
                    pton(family, addr)
                except (OSError, ValueError):
                    raise ValueError(
                        f"endpoints[{i}].addresses[{j}]: {addr!r} is not an "
                        f"{self.address_type} address"
                    ) from None

    @property
    def service_name(self) -> str:
        return self.metadata.labels.get(SERVICE_NAME_LABEL, "")


# --- Node --------------------------------------------------------------------------------


class NodeAddress(Struct, frozen=True, gc=False):
    type: str
    address: str


class Taint(Struct, frozen=True, gc=False, omit_defaults=True):
    key: str
    effect: str
    value: str = ""


class NodeSpec(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    pod_cidr: str = field(default="", name="podCIDR")
    pod_cidrs: ListOf[str] = field(default=(), name="podCIDRs")
    taints: ListOf[Taint] = ()
    unschedulable: bool = False

    def __post_init__(self) -> None:
        _empty_nulls(self, "pod_cidrs", "taints")


class NodeStatus(Struct, frozen=True, gc=False, omit_defaults=True):
    addresses: ListOf[NodeAddress] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "addresses")


class Node(Struct, frozen=True, gc=False, omit_defaults=True):
    metadata: ObjectMeta
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()

    def __post_init__(self) -> None:
        _check(validation.dns1123_subdomain(self.metadata.name), "metadata.name")
        for i, cidr in enumerate(self.spec.pod_cidrs):
            _check_cidr(cidr, f"spec.podCIDRs[{i}]")
        if self.spec.pod_cidr:
            _check_cidr(self.spec.pod_cidr, "spec.podCIDR")

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return self.spec.pod_cidrs or ((self.spec.pod_cidr,) if self.spec.pod_cidr else ())

    def address(self, kind: str = "InternalIP") -> str:
        return next((a.address for a in self.status.addresses if a.type == kind), "")


# --- Pod ---------------------------------------------------------------------------------


class PodIP(Struct, frozen=True, gc=False):
    ip: str


class PodCondition(Struct, frozen=True, gc=False):
    type: str
    status: str


class ContainerPort(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    """A named container port is what a NetworkPolicy's named port resolves to."""

    container_port: Port
    name: str = ""
    protocol: Protocol = "TCP"


class Container(Struct, frozen=True, gc=False, omit_defaults=True):
    name: str = ""
    ports: ListOf[ContainerPort] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "ports")


class PodSpec(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    node_name: str = ""
    hostname: str = ""
    subdomain: str = ""
    host_network: bool = False
    containers: ListOf[Container] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "containers")
        for i, c in enumerate(self.containers):
            for j, p in enumerate(c.ports):
                if p.name:
                    _check(validation.iana_svc_name(p.name), f"containers[{i}].ports[{j}].name")


class PodStatus(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    phase: str = "Pending"
    pod_ip: str = field(default="", name="podIP")
    pod_ips: ListOf[PodIP] = field(default=(), name="podIPs")
    host_ip: str = field(default="", name="hostIP")
    conditions: ListOf[PodCondition] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "pod_ips", "conditions")


class Pod(Struct, frozen=True, gc=False, omit_defaults=True):
    metadata: ObjectMeta
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    def __post_init__(self) -> None:
        _check(validation.dns1123_subdomain(self.metadata.name), "metadata.name")
        for i, pip in enumerate(self.status.pod_ips):
            _check_ip(pip.ip, f"status.podIPs[{i}].ip")

    @property
    def ips(self) -> tuple[str, ...]:
        if self.status.pod_ips:
            return tuple(p.ip for p in self.status.pod_ips)
        return (self.status.pod_ip,) if self.status.pod_ip else ()

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in self.status.conditions)


# --- Namespace ---------------------------------------------------------------------------

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class Namespace(Struct, frozen=True, gc=False, omit_defaults=True):
    """Only its labels matter (NetworkPolicy namespaceSelectors)."""

    metadata: ObjectMeta

    def __post_init__(self) -> None:
        _check(validation.dns1123_label(self.metadata.name), "metadata.name")

    @property
    def labels(self) -> dict[str, str]:
        """The labels, with the name label kube-apiserver (1.21+) always sets, so a selector
        on it works for namespaces written by other stores too."""
        labels = self.metadata.labels
        if labels.get(NAMESPACE_NAME_LABEL) == self.metadata.name:
            return labels
        return {**labels, NAMESPACE_NAME_LABEL: self.metadata.name}


# --- NetworkPolicy (networking.k8s.io/v1) ----------------------------------------------------

SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class LabelSelectorRequirement(Struct, frozen=True, gc=False, omit_defaults=True):
    key: str
    operator: str
    values: ListOf[str] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "values")


class LabelSelector(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    """A label selector; empty selects everything. ``matchLabels`` may arrive as ``null``."""

    match_labels: dict[str, str] | None = None
    match_expressions: ListOf[LabelSelectorRequirement] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "match_expressions")
        check_label_selector(self)

    @property
    def labels(self) -> dict[str, str]:
        return self.match_labels or {}

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in self.labels.items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions:
            op = req.operator
            if op == "In":
                if labels.get(req.key) not in req.values:
                    return False
            elif op == "NotIn":
                if req.key in labels and labels[req.key] in req.values:
                    return False
            elif op == "Exists":
                if req.key not in labels:
                    return False
            elif req.key in labels:  # DoesNotExist
                return False
        return True


def check_label_selector(sel: LabelSelector) -> None:
    """apimachinery's ValidateLabelSelector: keys, values, operators and their values."""
    for key, value in sel.labels.items():
        _check(validation.label_key(key), "matchLabels")
        _check(validation.label_value(value), f"matchLabels.{key}")
    for i, req in enumerate(sel.match_expressions):
        path = f"matchExpressions[{i}]"
        _check(validation.label_key(req.key), f"{path}.key")
        if req.operator in ("In", "NotIn"):
            if not req.values:
                raise ValueError(f"{path}.values: must be non-empty for operator {req.operator}")
            for j, v in enumerate(req.values):
                _check(validation.label_value(v), f"{path}.values[{j}]")
        elif req.operator in ("Exists", "DoesNotExist"):
            if req.values:
                raise ValueError(f"{path}.values: must be empty for operator {req.operator}")
        else:
            raise ValueError(f"{path}.operator: {req.operator!r} is not a valid selector "
                             "operator (In, NotIn, Exists, DoesNotExist)")


class IPBlock(Struct, frozen=True, gc=False, omit_defaults=True):
    cidr: str
    except_: ListOf[str] = field(default=(), name="except")

    def __post_init__(self) -> None:
        _empty_nulls(self, "except_")
        _check_cidr(self.cidr, "cidr")
        outer = ipaddress.ip_network(self.cidr, strict=False)
        for i, text in enumerate(self.except_):
            _check_cidr(text, f"except[{i}]")
            inner = ipaddress.ip_network(text, strict=False)
            if (inner.version != outer.version or not inner.subnet_of(outer)  # type: ignore[arg-type]
                    or inner.prefixlen <= outer.prefixlen):
                raise ValueError(f"except[{i}]: {text!r} is not a strict subset of cidr "
                                 f"{self.cidr!r}")


class NetworkPolicyPeer(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def __post_init__(self) -> None:
        if self.ip_block is not None:
            if self.pod_selector is not None or self.namespace_selector is not None:
                raise ValueError("ipBlock: may not be combined with podSelector or "
                                 "namespaceSelector in one peer")
        elif self.pod_selector is None and self.namespace_selector is None:
            raise ValueError("must specify a peer (podSelector, namespaceSelector or ipBlock)")


class NetworkPolicyPort(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    """``port`` unset: every port of the protocol; a string is a named container port."""

    protocol: Protocol | None = None
    port: int | str | None = None
    end_port: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, str):
            _check(validation.iana_svc_name(self.port), "port")
        elif self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a port number (1-65535)")
        if self.end_port is None:
            return
        if self.port is None:
            raise ValueError("endPort: may not be specified when port is not specified")
        if isinstance(self.port, str):
            raise ValueError("endPort: may not be specified when port is a named port")
        if not 1 <= self.end_port <= 65535:
            raise ValueError(f"endPort: {self.end_port} is not a port number (1-65535)")
        if self.end_port < self.port:
            raise ValueError(f"endPort: {self.end_port} is less than port {self.port}")

    @property
    def proto(self) -> str:
        return self.protocol or "TCP"


class NetworkPolicyIngressRule(Struct, frozen=True, gc=False, omit_defaults=True):
    """``from`` empty or unset: every source; ``ports`` empty or unset: every port."""

    ports: ListOf[NetworkPolicyPort] = ()
    from_: ListOf[NetworkPolicyPeer] = field(default=(), name="from")

    def __post_init__(self) -> None:
        _empty_nulls(self, "ports", "from_")


class NetworkPolicyEgressRule(Struct, frozen=True, gc=False, omit_defaults=True):
    """``to`` empty or unset: every destination; ``ports`` empty or unset: every port."""

    ports: ListOf[NetworkPolicyPort] = ()
    to: ListOf[NetworkPolicyPeer] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "ports", "to")


PolicyType = Literal["Ingress", "Egress"]


class NetworkPolicySpec(Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    pod_selector: LabelSelector = LabelSelector()
    ingress: ListOf[NetworkPolicyIngressRule] = ()
    egress: ListOf[NetworkPolicyEgressRule] = ()
    policy_types: ListOf[PolicyType] = ()

    def __post_init__(self) -> None:
        _empty_nulls(self, "ingress", "egress", "policy_types")
        if len(set(self.policy_types)) != len(self.policy_types):
            raise ValueError(f"policyTypes: duplicate entries in {list(self.policy_types)}")


class NetworkPolicy(Struct, frozen=True, gc=False, omit_defaults=True):
    metadata: ObjectMeta
    spec: NetworkPolicySpec = NetworkPolicySpec()

    def __post_init__(self) -> None:
        _check(validation.dns1123_subdomain(self.metadata.name), "metadata.name")

    @property
    def policy_types(self) -> tuple[PolicyType, ...]:
        """As kube-apiserver defaults them: Ingress always, Egress when egress rules exist."""
        if self.spec.policy_types:
            return self.spec.policy_types
        return ("Ingress", "Egress") if self.spec.egress else ("Ingress",)

    @property
    def isolates_ingress(self) -> bool:
        return "Ingress" in self.policy_types

    @property
    def isolates_egress(self) -> bool:
        return "Egress" in self.policy_types


Record = Service | EndpointSlice | Node | Pod | Namespace | NetworkPolicy


def _service_ips(spec: ServiceSpec) -> list[tuple[str, str]]:
    ips: list[tuple[str, str]] = []
    if spec.cluster_ip not in ("", "None"):
        ips.append(("spec.clusterIP", spec.cluster_ip))
    ips += [(f"spec.clusterIPs[{i}]", ip) for i, ip in enumerate(spec.cluster_ips) if ip != "None"]
    ips += [(f"spec.externalIPs[{i}]", ip) for i, ip in enumerate(spec.external_ips)]
    return ips


def _check_ip(ip: str, path: str) -> None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, ip)
            return
        except OSError:
            continue
    raise ValueError(f"{path}: {ip!r} is not an IP address")


def _check_service_ports(ports: tuple[ServicePort, ...]) -> None:
    """Port names as kube-apiserver checks them: DNS-1123 labels, unique on the Service (two
    unnamed ports collide too: proxy rules and SRV records are keyed by the name)."""
    seen: set[str] = set()
    for i, p in enumerate(ports):
        path = f"spec.ports[{i}]"
        if p.name:
            _check(validation.dns1123_label(p.name), f"{path}.name")
        if p.name in seen:
            raise ValueError(f"{path}.name: duplicate port name {p.name!r}")
        seen.add(p.name)
        if isinstance(p.target_port, str):
            _check(validation.iana_svc_name(p.target_port), f"{path}.targetPort")
        elif not 0 <= p.target_port <= 65535:
            raise ValueError(f"{path}.targetPort: {p.target_port} is not a port number")


class _HasHostname(typing.Protocol):
    @property
    def hostname(self) -> str | None: ...


class _HasName(typing.Protocol):
    @property
    def name(self) -> str: ...


def check_endpoint_slice_names(endpoints: Sequence[_HasHostname], ports: Sequence[_HasName]
                               ) -> None:
    """EndpointSlice names as kube-apiserver checks them (hostnames become DNS names, port
    names SRV labels); shared with DNS's slim slice record."""
    for i, ep in enumerate(endpoints):
        if ep.hostname is not None:
            _check(validation.dns1123_label(ep.hostname), f"endpoints[{i}].hostname")
    seen: set[str] = set()
    for i, p in enumerate(ports):
        if p.name:
            _check(validation.dns1123_label(p.name), f"ports[{i}].name")
        if p.name in seen:
            raise ValueError(f"ports[{i}].name: duplicate port name {p.name!r}")
        seen.add(p.name)


def _check_cidr(cidr: str, path: str) -> None:
    ip, sep, bits = cidr.partition("/")
    if not sep or not bits.isdigit():
        raise ValueError(f"{path}: {cidr!r} is not a CIDR")
    _check_ip(ip, path)
    limit = 32 if ":" not in ip else 128
    if int(bits) > limit:
        raise ValueError(f"{path}: {cidr!r} has a prefix longer than {limit}")


__all__ = [
    "NAMESPACE_NAME_LABEL",
    "SERVICE_NAME_LABEL",
    "ClientIPConfig",
    "Container",
    "ContainerPort",
    "Endpoint",
    "EndpointConditions",
    "EndpointHints",
    "EndpointPort",
    "EndpointSlice",
    "ForNode",
    "ForZone",
    "IPBlock",
    "LabelSelector",
    "LabelSelectorRequirement",
    "LoadBalancerIngress",
    "Namespace",
    "NetworkPolicy",
    "NetworkPolicyEgressRule",
    "NetworkPolicyIngressRule",
    "NetworkPolicyPeer",
    "NetworkPolicyPort",
    "NetworkPolicySpec",
    "Node",
    "NodeAddress",
    "ObjectMeta",
    "ObjectReference",
    "Pod",
    "PodCondition",
    "PodIP",
    "PolicyType",
    "Record",
    "Service",
    "ServicePort",
    "Taint",
]
