"""Where etcd is and how to reach it safely: the ``etcd[s]://`` URL and the credentials.

No gRPC here: command-line parsing and the overlay's options use it without loading the
client. ``EtcdCredentials`` never shows its password (``repr``), and ``redact_url`` takes the
password out of a URL before it goes into a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, unquote, urlsplit

from svcnet.store.base import Invalid
from svcnet.store.redact import redact_url

SCHEMES = ("etcd://", "etcds://")
_QUERY_KEYS = ("cafile", "certfile", "keyfile")


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """Whom to trust and who we are: TLS files (PEM) and an etcd user.

    TLS is used when ``tls`` is set (``etcds://``) or any file is given; without ``cafile``
    the system's CAs are trusted. ``certfile``/``keyfile`` are the client certificate that
    etcd's ``--client-cert-auth`` asks for. With ``username`` the client authenticates.
    """

    tls: bool = False
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = field(default="", repr=False)

    def check(self) -> EtcdCredentials:
        """These credentials, if complete (flags may complete a URL, so not at creation)."""
        if bool(self.certfile) != bool(self.keyfile):
            raise Invalid("etcd: a client certificate needs both a certificate file and "
                          "a key file (--etcd-certfile and --etcd-keyfile)")
        if self.password and not self.username:
            raise Invalid("etcd: a password was given without a user name (--etcd-username)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.cafile or self.certfile or self.keyfile)

    def over(self, base: EtcdCredentials) -> EtcdCredentials:
        """These settings where given, ``base``'s elsewhere (flags over the URL)."""
        return replace(
            base, tls=self.tls or base.tls, cafile=self.cafile or base.cafile,
            certfile=self.certfile or base.certfile, keyfile=self.keyfile or base.keyfile,
            username=self.username or base.username,
            password=self.password if self.username or self.password else base.password)


NO_CREDENTIALS = EtcdCredentials()


@dataclass(frozen=True, slots=True)
class EtcdTarget:
    """A parsed ``etcd[s]://`` store URL."""

    endpoints: tuple[str, ...]
    prefix: str
    credentials: EtcdCredentials


def parse_etcd_url(url: str, flags: EtcdCredentials = NO_CREDENTIALS) -> EtcdTarget:
    """``etcd[s]://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...][/PREFIX][?cafile=F&certfile=F
    &keyfile=F]``; settings in ``flags`` win over the URL's."""
    shown = redact_url(url)
    if not url.startswith(SCHEMES):
        raise Invalid(f"--store {shown!r}: not an etcd:// or etcds:// URL")
    try:
        parts = urlsplit(url)
    except ValueError as err:
        raise Invalid(f"--store {shown!r}: {err}") from None
    userinfo, at, hosts = parts.netloc.rpartition("@")
    endpoints = tuple(h for h in hosts.split(",") if h)
    if not endpoints:
        raise Invalid(f"--store {shown!r}: no etcd endpoint given")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(_QUERY_KEYS))
    if unknown:
        raise Invalid(f"--store {shown!r}: unknown setting {unknown[0]!r} (known: "
                      f"{', '.join(_QUERY_KEYS)})")
    files = {key: values[-1] for key, values in query.items()}
    user, _, password = userinfo.partition(":") if at else ("", "", "")
    try:
        from_url = EtcdCredentials(tls=parts.scheme == "etcds", username=unquote(user),
                                   password=unquote(password), **files)
        credentials = flags.over(from_url).check()
    except Invalid as err:
        raise Invalid(f"--store {shown!r}: {str(err).removeprefix('etcd: ')}") from None
    prefix = parts.path.rstrip("/")
    return EtcdTarget(endpoints, prefix or "/registry", credentials)
