"""A small asyncio etcd v3 client over gRPC, with fail-over between cluster members.

Only what svcnet needs: single-key reads and writes, compare-and-swap, paginated prefix
ranges, prefix watches that resume where they stopped, and leases.

Fail-over rules (the same split as etcd's own clientv3 retry interceptor):

- Reads, watches and lease keep-alives are safe to repeat: on a transient failure the client
  moves to the next endpoint and tries again, a bounded number of times.
- Writes are repeated only when the failed attempt provably never reached raft (the connection
  could not be made, or the member said it has no leader). Otherwise the outcome is unknown
  and ``Unavailable`` says so; the caller decides.
- Every request carries etcd's ``hasleader`` metadata, so a member cut off from the quorum
  fails fast instead of serving stale reads or holding watches that will never fire.

A watch remembers the revision after the last response it delivered and, when its stream
breaks, re-creates itself on the next member from exactly there: nothing lost, nothing twice.

Security (``EtcdCredentials``): TLS with a CA and an optional client certificate, and etcd's
user/password authentication. The password buys a token (``Auth.Authenticate``) that rides
along as the ``token`` metadata of every request; when a member says the token is no longer
valid (expired, auth disabled and re-enabled, password changed) the client authenticates
again and repeats the request once. Errors never show the password or the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

# gRPC's C core would log a failed TLS handshake itself, on stderr, unformatted and twice;
# our errors already say it once, clearly. GRPC_VERBOSITY set by the user still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # after GRPC_VERBOSITY, which grpc reads when imported
import grpc.aio

from svcnet.store.base import Expired, Invalid, NotFound, StoreError, Unavailable
from svcnet.store.etcd_config import NO_CREDENTIALS, EtcdCredentials
from svcnet.store.etcdpb import etcd_pb2 as pb
from svcnet.store.etcdpb import etcd_pb2_grpc

pb_grpc: Any = etcd_pb2_grpc  # generated without type hints

log = logging.getLogger(__name__)

T = TypeVar("T")

_REQUIRE_LEADER: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # A restarted member must be usable again within a second or two, not grpc's default
    # reconnect backoff of up to two minutes.
    # (Not min_reconnect_backoff_ms: grpc also uses it as the connect timeout.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a silently dead peer (partition, not a reset) on long-lived watch streams.
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.enable_retries", 0),
]
# gRPC codes that mean "this member cannot serve you right now": try another.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
})
# Error texts proving a write never reached raft, so repeating it elsewhere is safe.
_NOT_SENT = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "socket closed",
    "DNS resolution failed",
)
_PAGE = 1000
_RETIRE_AFTER = 30.0  # seconds a replaced channel lives on for calls still queued on it
# etcd answers a WatchProgressRequest with watch_id -1: it belongs to no single watcher.
_PROBE_ANSWER = -1


class KvEventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class KvEvent:
    """One change to one key. ``mod_revision`` of a DELETE is the deletion's revision."""

    type: KvEventType
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    prev_value: bytes | None = None
    prev_mod_revision: int = 0


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """A progress notification: every change up to ``revision`` has been delivered."""

    revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _channel_credentials(credentials: EtcdCredentials) -> grpc.ChannelCredentials | None:
    """gRPC credentials from the PEM files, read now: a bad path fails at start-up."""
    if not credentials.uses_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(credentials.cafile, "--etcd-cafile"),
        private_key=_read_pem(credentials.keyfile, "--etcd-keyfile"),
        certificate_chain=_read_pem(credentials.certfile, "--etcd-certfile"))


def _read_pem(path: str, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise Invalid(f"etcd: cannot read {flag} {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise Invalid(f"etcd: {flag} {path} is not a PEM file")
    return data


def _details(err: grpc.aio.AioRpcError) -> str:
    text = err.details() or ""
    return _tls_problem(text) or f"{err.code().name}: {text}"


def _tls_problem(text: str) -> str:
    """A one-line explanation of a failed TLS handshake in gRPC's error text, else ''."""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        why = text.partition("CERTIFICATE_VERIFY_FAILED")[2].strip(": ").split(":")[0]
        return ("TLS: the member's certificate is not trusted (not signed by the CA in "
                f"--etcd-cafile){f': {why}' if why else ''}")
    if "Peer name" in text and "not in peer certificate" in text:
        return ("TLS: the member's certificate is not valid for the address used to reach "
                "it (its subjectAltName lacks it)")
    if "TSI_DATA_CORRUPTED" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return ("TLS: the member rejected our client certificate (missing, or not signed by "
                "its trusted CA): check --etcd-certfile/--etcd-keyfile")
    if "WRONG_VERSION_NUMBER" in text or "Tls handshake failed" in text or (
            "Handshake failed" in text):
        return "TLS handshake failed (is this member serving TLS on this port?)"
    return ""


_GIVE_USER = ("give a user name and password (--etcd-username and --etcd-password[-file], "
              "or etcd://USER:PASSWORD@...)")


def map_error(err: grpc.aio.AioRpcError, what: str) -> StoreError:
    """Turn a gRPC failure into the store error that tells the caller what to do next."""
    code, text = err.code(), err.details() or ""
    if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in text:
        return Expired(f"{what}: {text}")
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {text}")
    if "user name is empty" in text:
        return Invalid(f"{what}: etcd has authentication enabled: {_GIVE_USER}")
    if code in _TRANSIENT or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return Unavailable(f"{what}: {_details(err)}")
    return Invalid(f"{what}: {_details(err)}")


def _token_rejected(code: grpc.StatusCode, text: str) -> bool:
    """The member refused our token (expired, revoked, auth store changed): get a new one."""
    return code is grpc.StatusCode.UNAUTHENTICATED or (
        code is grpc.StatusCode.INVALID_ARGUMENT
        and ("user name is empty" in text or "revision of auth store is old" in text))


# Cancel reasons of a watch refused for its token (or for want of one).
_WATCH_AUTH_REFUSALS = ("permission denied", "auth token", "user name is empty",
                        "revision of auth store is old")


class _TokenRejected(Exception):
    """A watch was refused for want of a valid token (etcd says "permission denied")."""


def _never_sent(err: grpc.aio.AioRpcError) -> bool:
    text = (err.details() or "").lower()
    return err.code() is grpc.StatusCode.UNAVAILABLE and any(
        marker.lower() in text for marker in _NOT_SENT
    )


class _Member:
    """One endpoint's channel and stubs, created on first use."""

    def __init__(self, endpoint: str, credentials: grpc.ChannelCredentials | None = None
                 ) -> None:
        self.endpoint = endpoint
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch: Any = None
        self._lease: Any = None
        self._maintenance: Any = None
        self._auth: Any = None
        self._retired: set[grpc.aio.Channel] = set()
        self._closing: set[asyncio.Future[None]] = set()

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.endpoint,
                                                          options=_CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self.endpoint, self._credentials,
                                                        options=_CHANNEL_OPTIONS)
        return self._channel

    @property
    def kv(self) -> Any:
        if self._kv is None:
            self._kv = pb_grpc.KVStub(self.channel())
        return self._kv

    @property
    def watch(self) -> Any:
        if self._watch is None:
            self._watch = pb_grpc.WatchStub(self.channel())
        return self._watch

    @property
    def lease(self) -> Any:
        if self._lease is None:
            self._lease = pb_grpc.LeaseStub(self.channel())
        return self._lease

    @property
    def maintenance(self) -> Any:
        if self._maintenance is None:
            self._maintenance = pb_grpc.MaintenanceStub(self.channel())
        return self._maintenance

    @property
    def auth(self) -> Any:
        if self._auth is None:
            self._auth = pb_grpc.AuthStub(self.channel())
        return self._auth

    def refresh_if_failing(self) -> None:
        """Replace a channel stuck in reconnect backoff, so the next call connects now.

        The old channel is closed only after a grace period: closing it at once would
        cancel calls other tasks still have queued on it, and a cancelled write has an
        unknown outcome, where a failed one is known not to have been sent.
        """
        channel = self._channel
        if channel is None or channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return
        self._channel = None
        self._kv = self._watch = self._lease = self._maintenance = self._auth = None
        self._retired.add(channel)
        asyncio.get_running_loop().call_later(_RETIRE_AFTER, self._close_retired, channel)

    def _close_retired(self, channel: grpc.aio.Channel) -> None:
        if channel in self._retired:
            self._retired.discard(channel)
            task = asyncio.ensure_future(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._kv = self._watch = self._lease = self._maintenance = self._auth = None
        retired, self._retired = self._retired, set()
        for old in [*retired, *([channel] if channel is not None else [])]:
            await old.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class EtcdClient:
    """etcd v3 over one gRPC channel per member; requests go to the current member.

    ``endpoints`` are ``host:port`` strings of members of one cluster. ``timeout`` bounds each
    request; a watch idle for ``probe_interval`` checks that its member still answers.
    ``credentials`` turn on TLS and/or authentication (unreadable files raise ``Invalid`` here).
    Failures raise ``svcnet.store.base`` errors: ``Unavailable`` when no
    member could answer, ``Expired`` for a compacted revision, ``NotFound``, ``Invalid``
    (also for a wrong user name or password).
    """

    def __init__(self, endpoints: list[str], *, timeout: float = 5.0,
                 probe_interval: float = 2.0,
                 credentials: EtcdCredentials = NO_CREDENTIALS) -> None:
        if not endpoints:
            raise Invalid("etcd: no endpoints given")
        channel_credentials = _channel_credentials(credentials.check())
        self._members = [_Member(e, channel_credentials) for e in endpoints]
        self._current = 0
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.credentials = credentials
        self._closed = False
        # None: not authenticated yet; "": authentication is off in etcd; else the token.
        self._token: str | None = None
        self._auth_lock: asyncio.Lock | None = None

    # ---- authentication --------------------------------------------------------------

    def _md(self, *, leader: bool = True) -> tuple[tuple[str, str], ...]:
        """Metadata for one request: ``hasleader`` and, once authenticated, the token."""
        md = _REQUIRE_LEADER if leader else ()
        return (*md, ("token", self._token)) if self._token else md

    async def _ensure_token(self) -> None:
        if self.credentials.username and self._token is None:
            await self._authenticate(None)

    async def _authenticate(self, stale: str | None) -> None:
        """Trade the password for a new token, unless another task already replaced
        ``stale`` (the token a failed request carried) meanwhile."""
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._token != stale:
                return
            name = self.credentials.username
            request = pb.AuthenticateRequest(name=name, password=self.credentials.password)
            try:
                resp = await self._call("authenticate", lambda m, t: m.auth.Authenticate(
                    request, timeout=t), repeatable=True, authenticated=False)
            except Invalid as err:
                if "authentication is not enabled" in str(err):
                    self._token = ""  # etcd does not check users: go on without a token
                    return
                if "authentication failed" in str(err):
                    raise Invalid(f"etcd: authentication failed for user {name!r}: wrong "
                                  "user name or password") from None
                raise
            self._token = resp.token
            log.debug("etcd: authenticated as %r", name)

    @property
    def endpoint(self) -> str:
        """The member requests and new watches go to now."""
        return self._members[self._current].endpoint

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self._members]

    # ---- key/value -------------------------------------------------------------------

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        """The value and mod_revision of ``key``, or None if it does not exist."""
        resp = await self._read("get", lambda m, t: m.kv.Range(
            pb.RangeRequest(key=key), timeout=t, metadata=self._md()))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return kv.value, kv.mod_revision

    async def get_prefix(self, prefix: bytes, *, page: int = _PAGE
                         ) -> tuple[list[tuple[bytes, bytes, int]], int]:
        """Every (key, value, mod_revision) under ``prefix``, all read at one revision.

        Big ranges are fetched ``page`` keys at a time, each page pinned to the revision of
        the first, so the result is one consistent snapshot; that revision is returned too.
        """
        end = prefix_end(prefix)
        items: list[tuple[bytes, bytes, int]] = []
        start, revision = prefix, 0
        while True:
            request = pb.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
            resp = await self._range(request)
            if revision == 0:
                revision = resp.header.revision
            items.extend((kv.key, kv.value, kv.mod_revision) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return items, revision
            start = resp.kvs[-1].key + b"\0"

    async def _range(self, request: Any) -> Any:
        return await self._read("range", lambda m, t: m.kv.Range(
            request, timeout=t, metadata=self._md()))

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write ``key`` unconditionally; returns the new revision."""
        resp = await self._write("put", lambda m, t: m.kv.Put(
            pb.PutRequest(key=key, value=value, lease=lease),
            timeout=t, metadata=self._md()))
        return int(resp.header.revision)

    async def create(self, key: bytes, value: bytes, *, lease: int = 0) -> bool:
        """Write ``key`` only if it does not exist; False if it already did."""
        return await self.create_revision(key, value, lease=lease) is not None

    async def create_revision(self, key: bytes, value: bytes, *, lease: int = 0) -> int | None:
        """Like ``create``, returning the new revision (None if the key existed)."""
        txn = pb.TxnRequest(
            compare=[pb.Compare(key=key, target=pb.Compare.CREATE,
                                result=pb.Compare.EQUAL, create_revision=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))],
        )
        resp = await self._txn("create", txn)
        return int(resp.header.revision) if resp.succeeded else None

    async def replace(self, key: bytes, value: bytes, *, expect_mod_revision: int,
                      lease: int = 0) -> bool:
        """Write ``key`` only if its mod_revision is still ``expect_mod_revision`` (CAS)."""
        return await self.replace_revision(
            key, value, expect_mod_revision=expect_mod_revision, lease=lease) is not None

    async def replace_revision(self, key: bytes, value: bytes, *, expect_mod_revision: int,
                               lease: int = 0) -> int | None:
        """Like ``replace``, returning the new revision (None if the key had changed)."""
        txn = pb.TxnRequest(
            compare=[pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL,
                                mod_revision=expect_mod_revision)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))],
        )
        resp = await self._txn("replace", txn)
        return int(resp.header.revision) if resp.succeeded else None

    async def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it did not exist."""
        return await self.delete_revision(key) is not None

    async def delete_revision(self, key: bytes) -> int | None:
        """Delete ``key``; the deletion's revision, or None if it did not exist."""
        resp = await self._write("delete", lambda m, t: m.kv.DeleteRange(
            pb.DeleteRangeRequest(key=key), timeout=t, metadata=self._md()))
        return int(resp.header.revision) if resp.deleted else None

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drop history before ``revision``; watches from older revisions then expire.

        Compacting a revision that is already compacted is a no-op, not an error.
        """
        with contextlib.suppress(Expired):
            await self._write("compact", lambda m, t: m.kv.Compact(
                pb.CompactionRequest(revision=revision, physical=physical),
                timeout=t, metadata=self._md()))

    async def revision(self) -> int:
        """The cluster's current revision."""
        resp = await self._read("revision", lambda m, t: m.kv.Range(
            pb.RangeRequest(key=b"\0", count_only=True), timeout=t,
            metadata=self._md()))
        return int(resp.header.revision)

    async def member_status(self) -> Any:
        """The current member's ``StatusResponse`` (leader, raft index, version)."""
        return await self._read("status", lambda m, t: m.maintenance.Status(
            pb.StatusRequest(), timeout=t, metadata=self._md(leader=False)))

    async def _txn(self, what: str, txn: Any) -> Any:
        return await self._write(what, lambda m, t: m.kv.Txn(
            txn, timeout=t, metadata=self._md()))

    # ---- leases ----------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; keys written with it vanish when it expires."""
        # Granting twice after an unknown outcome only leaks a lease that expires by itself.
        resp = await self._read("grant lease", lambda m, t: m.lease.LeaseGrant(
            pb.LeaseGrantRequest(TTL=ttl), timeout=t, metadata=self._md()))
        if resp.error:
            raise Invalid(f"grant lease: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease_id: int) -> int:
        """Renew a lease once; its TTL in seconds, or 0 if the lease is gone."""

        async def once(member: _Member, t: float) -> int:
            call = member.lease.LeaseKeepAlive(timeout=t, metadata=self._md())
            try:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise Unavailable("keepalive: stream closed without an answer")
                return max(0, int(resp.TTL))
            finally:
                call.cancel()

        return await self._read("keepalive", once)

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of a lease without renewing it; 0 if it is gone."""
        resp = await self._read("lease ttl", lambda m, t: m.lease.LeaseTimeToLive(
            pb.LeaseTimeToLiveRequest(ID=lease_id), timeout=t,
            metadata=self._md()))
        return max(0, int(resp.TTL))

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys; a lease already gone is not an error."""
        with contextlib.suppress(NotFound):
            await self._read("revoke lease", lambda m, t: m.lease.LeaseRevoke(
                pb.LeaseRevokeRequest(ID=lease_id), timeout=t,
                metadata=self._md()))

    # ---- watch -----------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, *, start_revision: int
                           ) -> AsyncIterator[KvEvent]:
        """Every change under ``prefix`` from ``start_revision`` (inclusive), in order.

        Survives member failures by resuming on another member. Raises ``Expired`` when
        ``start_revision`` is compacted, ``Unavailable`` when no member can be reached.
        """
        async for item in self.watch_events(prefix, start_revision=start_revision):
            if isinstance(item, KvEvent):
                yield item

    async def watch_events(self, prefix: bytes, *, start_revision: int,
                           progress_notify: bool = False
                           ) -> AsyncIterator[KvEvent | WatchProgress]:
        """``watch_prefix`` plus ``WatchProgress`` items from etcd's progress notifications.

        Only progress sent by the server for this watcher (``progress_notify``) is reported:
        etcd 3.4 can answer an explicit progress request with a revision ahead of events it
        has not yet sent, and resuming from such a revision would lose those events.
        """
        next_revision = start_revision
        failures = 0
        renewed = False
        while True:
            if self._closed:
                raise Unavailable("etcd client closed")
            await self._ensure_token()
            index = self._current
            member = self._members[index]
            if failures >= len(self._members):
                member.refresh_if_failing()
            token = self._token
            try:
                async for batch in self._watch_stream(member, prefix, next_revision,
                                                      progress_notify):
                    failures = 0
                    renewed = False
                    if isinstance(batch, WatchProgress):
                        if batch.revision >= next_revision:
                            next_revision = batch.revision + 1
                            yield batch
                        continue
                    fresh = [e for e in batch if e.mod_revision >= next_revision]
                    if len(fresh) < len(batch):
                        # Delivered already. etcd 3.4 before 3.4.25/3.4.38 can send them
                        # again from a member that just restored a snapshot (etcd pull
                        # 15520, issue 20221); applied, they would roll objects back.
                        log.warning("etcd: %s sent %d event(s) older than revision %d, "
                                    "already delivered; dropped", member.endpoint,
                                    len(batch) - len(fresh), next_revision)
                    for event in fresh:
                        yield event
                    next_revision = max(next_revision, batch[-1].mod_revision + 1)
                raise Unavailable(f"watch on {member.endpoint}: stream ended")
            except _TokenRejected as err:
                # etcd 3.4 refuses a watch whose token is missing or stale as "permission
                # denied": one new token; refused again, it really is not allowed.
                user = self.credentials.username
                if not user:
                    raise Invalid(f"watch {prefix!r}: {err}: etcd has authentication "
                                  f"enabled: {_GIVE_USER}") from None
                if renewed:
                    raise Invalid(f"watch {prefix!r}: {err} for etcd user {user!r}") from None
                renewed = True
                await self._authenticate(token)
                continue
            except grpc.aio.AioRpcError as err:
                if (not renewed and self.credentials.username
                        and _token_rejected(err.code(), err.details() or "")):
                    renewed = True
                    await self._authenticate(token)
                    continue
                if err.code() not in _TRANSIENT and err.code() is not grpc.StatusCode.UNKNOWN:
                    raise map_error(err, f"watch {prefix!r}") from None
                reason = _details(err)
            except Unavailable as err:
                reason = str(err)
            failures += 1
            self._failed(index)
            log.info("etcd watch on %s broke (%s); resuming at revision %d on %s",
                     member.endpoint, reason, next_revision, self.endpoint)
            if failures > 2 * len(self._members):
                raise Unavailable(f"watch {prefix!r}: no etcd member answers: {reason}")
            if failures >= len(self._members):
                await asyncio.sleep(_jitter(0.05 * 2 ** (failures - len(self._members))))

    async def _watch_stream(self, member: _Member, prefix: bytes, start: int,
                            progress_notify: bool
                            ) -> AsyncIterator[list[KvEvent] | WatchProgress]:
        """One watch stream on one member: yields each response's events as a batch.

        A stream silent for ``probe_interval`` gets a progress request; a member that does
        not answer it within ``timeout`` is taken for dead (frozen process, black-holed
        network), which TCP and gRPC keepalives would notice only much later. The answer
        only proves liveness: its revision is not used (see ``watch_events``).
        """
        call = member.watch.Watch(metadata=self._md())
        read: asyncio.Future[Any] | None = None
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that arrives as the write completes, and the watch would then never stop.
            async with asyncio.timeout(self.timeout):
                await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                    key=prefix, range_end=prefix_end(prefix), start_revision=start,
                    prev_kv=True, progress_notify=progress_notify)))
            created = probing = False
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                wait = self.probe_interval if created and not probing else self.timeout
                done, _ = await asyncio.wait({read}, timeout=wait)
                if not done:
                    if not created or probing:
                        raise Unavailable(f"watch on {member.endpoint}: no answer in "
                                          f"{self.timeout}s")
                    async with asyncio.timeout(self.timeout):
                        await call.write(pb.WatchRequest(
                            progress_request=pb.WatchProgressRequest()))
                    probing = True
                    continue
                resp, read, probing = read.result(), None, False
                if resp is grpc.aio.EOF:
                    return
                if resp.compact_revision:
                    raise Expired(f"watch from revision {start}: compacted at "
                                  f"{resp.compact_revision}")
                if resp.canceled:
                    why = resp.cancel_reason or "no reason given"
                    if any(m in why for m in _WATCH_AUTH_REFUSALS):
                        raise _TokenRejected(
                            why.rpartition("desc = ")[2].removeprefix("etcdserver: "))
                    raise Unavailable(f"watch canceled by {member.endpoint}: {why}")
                if resp.created:
                    created = True
                if resp.events:
                    yield [_kv_event(e) for e in resp.events]
                elif not resp.created and progress_notify and resp.watch_id != _PROBE_ANSWER:
                    yield WatchProgress(int(resp.header.revision))
        except TimeoutError:
            raise Unavailable(f"watch on {member.endpoint}: no answer in {self.timeout}s"
                              ) from None
        except asyncio.CancelledError:
            if _task_cancelled():
                raise
            raise Unavailable(f"watch on {member.endpoint}: connection closed") from None
        finally:
            call.cancel()
            if read is not None:
                if read.done() and not read.cancelled():
                    read.exception()  # retrieved: it is the stream's failure, handled above
                read.cancel()

    # ---- plumbing --------------------------------------------------------------------

    async def _read(self, what: str, request: Callable[[_Member, float], Awaitable[T]]) -> T:
        return await self._call(what, request, repeatable=True)

    async def _write(self, what: str, request: Callable[[_Member, float], Awaitable[T]]) -> T:
        return await self._call(what, request, repeatable=False)

    async def _call(self, what: str, request: Callable[[_Member, float], Awaitable[T]], *,
                    repeatable: bool, authenticated: bool = True) -> T:
        """Send to the current member; on a transient failure move on and maybe retry.

        ``request`` gets the member and the seconds left: the whole call, retries included,
        takes at most ``timeout``. After every member failed once, a member whose channel is
        in reconnect backoff gets a fresh channel, so a restarted etcd is used at once.
        A request refused for its token is repeated once with a new token (the check
        happens before raft, so even a write was not applied).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        reason = "no attempt made"
        attempt = 0
        renewed = False
        while not self._closed:
            if authenticated:
                await self._ensure_token()
            index = self._current
            member = self._members[index]
            if attempt >= len(self._members):
                member.refresh_if_failing()
            token = self._token
            try:
                return await request(member, max(0.01, deadline - loop.time()))
            except grpc.aio.AioRpcError as err:
                if (authenticated and not renewed and self.credentials.username
                        and _token_rejected(err.code(), err.details() or "")):
                    log.info("etcd: %s refused our token (%s); authenticating again",
                             member.endpoint, err.details())
                    renewed = True
                    await self._authenticate(token)
                    continue
                if err.code() not in _TRANSIENT:
                    raise map_error(err, what) from None
                if err.code() is not grpc.StatusCode.DEADLINE_EXCEEDED or not attempt:
                    # A last try cut short by the deadline would hide why the others
                    # failed (a TLS handshake refused, say): keep the earlier reason.
                    reason = f"{member.endpoint}: {_details(err)}"
                self._failed(index)
                if not repeatable and not _never_sent(err):
                    raise Unavailable(f"{what}: outcome unknown ({reason})") from None
            except asyncio.CancelledError:
                # grpc.aio reports a call cut by a closed channel as a cancellation.
                if _task_cancelled():
                    raise
                reason = f"{member.endpoint}: connection closed"
                if not repeatable:
                    raise Unavailable(f"{what}: outcome unknown ({reason})") from None
            except Unavailable as err:
                reason = str(err)
                self._failed(index)
            attempt += 1
            left = deadline - loop.time()
            if left <= 0:
                break
            if attempt >= len(self._members):
                await asyncio.sleep(min(left, _jitter(0.05 * 2 ** (attempt - len(self._members)))))
        if self._closed:
            raise Unavailable("etcd client closed")
        raise Unavailable(f"{what}: no etcd member answered within {self.timeout}s "
                          f"(last: {reason})")

    def _failed(self, index: int) -> None:
        """Move to the next member, unless a concurrent request already moved on."""
        if self._current == index:
            self._current = (index + 1) % len(self._members)
            if len(self._members) > 1:
                log.info("etcd: %s failed; switching to %s",
                         self._members[index].endpoint, self.endpoint)

    async def reconnect(self) -> None:
        """Drop every connection (in-flight requests fail, watches resume on new ones).

        For operators and tests: the same thing a load balancer resetting idle connections
        or a NAT timeout would do.
        """
        for member in self._members:
            await member.close()

    async def close(self) -> None:
        self._closed = True
        for member in self._members:
            await member.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _kv_event(event: Any) -> KvEvent:
    kv = event.kv
    prev = event.prev_kv if event.HasField("prev_kv") else None
    return KvEvent(
        type=KvEventType.DELETE if event.type == pb.Event.DELETE else KvEventType.PUT,
        key=kv.key,
        value=kv.value,
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        prev_value=prev.value if prev is not None else None,
        prev_mod_revision=prev.mod_revision if prev is not None else 0,
    )


def _task_cancelled() -> bool:
    """True when the running task itself is being cancelled (not just a gRPC call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _jitter(delay: float) -> float:
    delay = min(delay, 1.0)
    return random.uniform(delay / 2, delay)
