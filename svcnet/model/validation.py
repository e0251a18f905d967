"""The name rules kube-apiserver enforces, so objects that bypass it cannot reach a consumer.

Any pod can write straight into etcd in the lab, and the memory store has no API server: an
object the API server would have refused (a Service named ``wéb``, an endpoint hostname that
is not a DNS label) must be refused at decode, not crash the DNS handler that turns it into
names. The rules and their limits are apimachinery's (``k8s.io/apimachinery/pkg/util/
validation``); each function returns what is wrong, or ``None``.
"""

from __future__ import annotations

import re

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+")
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253
_IANA_SVC_NAME_MAX = 15


def dns1123_label(value: str) -> str | None:
    """Namespaces, endpoint hostnames, Service and EndpointSlice port names."""
    if len(value) > _LABEL_MAX:
        return f"{value[:80]!r} is longer than {_LABEL_MAX} characters"
    if not _DNS1123_LABEL.fullmatch(value):
        return (f"{value!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
                "starting and ending with a letter or digit)")
    return None


def dns1035_label(value: str) -> str | None:
    """Service names: they become DNS labels and (in env vars) must start with a letter."""
    if len(value) > _LABEL_MAX:
        return f"{value[:80]!r} is longer than {_LABEL_MAX} characters"
    if not _DNS1035_LABEL.fullmatch(value):
        return (f"{value!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit)")
    return None


def dns1123_subdomain(value: str) -> str | None:
    """Names of most objects, and ExternalName targets: dot-separated DNS-1123 labels, 253
    characters at most (like kube-apiserver, no limit per label)."""
    if len(value) > _SUBDOMAIN_MAX:
        return f"{value[:80]!r}... is longer than {_SUBDOMAIN_MAX} characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (f"{value!r} is not a DNS-1123 subdomain (dot-separated lower-case labels of "
                "letters, digits and '-')")
    return None


def iana_svc_name(value: str) -> str | None:
    """A named target port (RFC 6335 service name), as a container port is named."""
    if len(value) > _IANA_SVC_NAME_MAX:
        return f"{value[:80]!r} is longer than {_IANA_SVC_NAME_MAX} characters"
    if not _IANA_SVC_NAME.fullmatch(value):
        return f"{value!r} may contain only lower-case letters, digits and '-'"
    if not any("a" <= c <= "z" for c in value):
        return f"{value!r} must contain at least one letter"
    if value.startswith("-") or value.endswith("-") or "--" in value:
        return f"{value!r} must not begin or end with '-' or contain '--'"
    return None


_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_QUALIFIED_NAME_MAX = 63


def label_key(value: str) -> str | None:
    """A label key (a qualified name): an optional DNS-1123 subdomain prefix and '/', then a
    name of at most 63 letters, digits, '-', '_' and '.', starting and ending alphanumeric."""
    prefix, slash, name = value.rpartition("/")
    if slash:
        if not prefix:
            return f"{value!r} has an empty prefix before '/'"
        problem = dns1123_subdomain(prefix)
        if problem is not None:
            return f"prefix of {value!r}: {problem}"
    if not name:
        return f"{value!r} has an empty name"
    if len(name) > _QUALIFIED_NAME_MAX:
        return f"{value[:80]!r}: name part longer than {_QUALIFIED_NAME_MAX} characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (f"{value!r} is not a label key (letters, digits, '-', '_' and '.', starting "
                "and ending with a letter or digit, with an optional DNS subdomain prefix and '/')")
    return None


def label_value(value: str) -> str | None:
    """A label value: empty, or like the name part of a label key."""
    if not value:
        return None
    if len(value) > _QUALIFIED_NAME_MAX:
        return f"{value[:80]!r} is longer than {_QUALIFIED_NAME_MAX} characters"
    if not _QUALIFIED_NAME.fullmatch(value):
        return (f"{value!r} is not a label value (letters, digits, '-', '_' and '.', starting "
                "and ending with a letter or digit)")
    return None
