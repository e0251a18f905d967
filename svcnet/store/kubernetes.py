"""The ``kubernetes`` store: a Kubernetes API server over HTTP/1.1 + TLS, with asyncio streams.

Wire protocol (https://kubernetes.io/docs/reference/using-api/api-concepts/):

- LIST ``GET {collection}?limit=N[&continue=TOKEN]`` pages through one consistent snapshot;
  the list's ``metadata.resourceVersion`` is where the watch starts. A continue token that
  expired (410) falls back to one unpaginated list, as client-go's pager does.
- WATCH ``GET {collection}?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N``
  answers with a chunked stream of newline-separated ``{"type": ..., "object": ...}`` events.
  The envelope is decoded with the object kept as ``msgspec.Raw``, so the object's bytes are
  passed on untouched and parsed into a record once, by the informer.
- A too-old revision comes back as HTTP 410 or, more often, as an ``ERROR`` event carrying a
  ``Status`` with code 410: both raise ``Expired`` and the informer relists.

No HTTP library: the four requests we make and one streaming response are ~150 lines over
``asyncio.open_connection``, which keeps the node agent's dependencies and import time small.
One keep-alive connection carries LIST/GET/POST/PUT/DELETE; every watch has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import msgspec

from svcnet.model import Kind
from svcnet.store.base import (
    NO_SELECTOR,
    Conflict,
    Event,
    EventType,
    Expired,
    Invalid,
    Listing,
    NotFound,
    RawObject,
    Selector,
    StoreError,
    Unavailable,
)
from svcnet.store.kubeconfig import ClusterConfig, TokenSource
from svcnet.store.kubeconfig import load as load_config

log = logging.getLogger(__name__)

USER_AGENT = "svcnet/0.1.0"
MAX_RETRY_AFTER = 30.0
"""Longest wait honoured from a 429's Retry-After; beyond it we report Unavailable."""


# --- wire shapes ----------------------------------------------------------------------------

class _Meta(msgspec.Struct, rename="camel"):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""


class _Head(msgspec.Struct):
    """Just the identity of an object; everything else is skipped, not parsed."""

    kind: str = ""
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw = msgspec.Raw(b"{}")


class _ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")
    remaining_item_count: int | None = None


class _List(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


class _Status(msgspec.Struct):
    kind: str = ""
    status: str = ""
    message: str = ""
    reason: str = ""
    code: int = 0


_HEAD = msgspec.json.Decoder(_Head)
_EVENT = msgspec.json.Decoder(_WatchEvent)
_LIST = msgspec.json.Decoder(_List)
_STATUS = msgspec.json.Decoder(_Status)
_ENCODE = msgspec.json.Encoder()


def _raw_object(data: bytes) -> RawObject:
    meta = _HEAD.decode(data).metadata
    return RawObject(meta.namespace, meta.name, meta.resource_version, data)


def _list_item(raw: msgspec.Raw | bytes, type_meta: bytes) -> RawObject:
    """A list item as a complete object: the API server leaves ``kind``/``apiVersion`` out of
    list items, watch events and GETs carry them; every ``RawObject`` carries them here.
    The splice copies the item's bytes once, straight out of the page."""
    head = _HEAD.decode(raw)
    view = memoryview(raw)
    if head.kind or view[:1].tobytes() != b"{":
        data = bytes(view)
    elif bytes(view[1:64]).lstrip()[:1] == b"}":
        data = type_meta[:-1] + b"}"
    else:
        data = type_meta + view[1:]
    meta = head.metadata
    return RawObject(meta.namespace, meta.name, meta.resource_version, data)


# --- HTTP/1.1 ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _ProtocolError(Exception):
    """The peer did not speak HTTP/1.1 as expected; treated as a dropped connection."""


class _Connection:
    """One HTTP/1.1 connection: write a request, read a response head, then its body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    @classmethod
    async def open(cls, config: ClusterConfig, tls: ssl.SSLContext | None,
                   timeout: float) -> _Connection:
        server_hostname = (config.tls_server_name or config.host) if tls else None
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
        # arrives as the connection completes, and a stopped informer would run on.
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                config.host, config.port, ssl=tls, server_hostname=server_hostname,
                limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return cls(reader, writer)

    async def send(self, request: bytes) -> None:
        self.writer.write(request)
        await self.writer.drain()

    async def read_head(self) -> tuple[int, dict[str, str]]:
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("connection closed before a response")
        parts = line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError(f"bad status line {line[:80]!r}")
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionResetError("connection closed inside response headers")
            key, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _ProtocolError(f"bad header line {line[:80]!r}")
            headers[key.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return int(parts[1]), headers

    async def body_chunks(self, headers: Mapping[str, str]) -> AsyncGenerator[bytes, None]:
        """The body as it arrives: chunked, Content-Length, or up to EOF."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    raise asyncio.IncompleteReadError(b"", None)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                chunk = await self.reader.readexactly(size)
                await self.reader.readexactly(2)
                yield chunk
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining > 0:
                chunk = await self.reader.read(min(remaining, 1 << 16))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(chunk)
                yield chunk
        else:
            self.reusable = False
            while chunk := await self.reader.read(1 << 16):
                yield chunk

    async def read_body(self, headers: Mapping[str, str]) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks(headers)])

    def close(self) -> None:
        self.reusable = False
        self.writer.close()


_CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, _ProtocolError, ssl.SSLError)


# --- the store --------------------------------------------------------------------------------

class KubernetesStore:
    """``Store`` over a Kubernetes API server. See the module docstring for the protocol."""

    def __init__(
        self, config: ClusterConfig, *, page_size: int = 500, watch_timeout: int = 300,
        connect_timeout: float = 10.0, request_timeout: float = 60.0, retries: int = 5,
    ) -> None:
        self.config = config
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.retries = retries
        self._tls = config.ssl_context()
        self._token = TokenSource(config.token, config.token_file, config.exec_plugin)
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._watches: set[_Connection] = set()
        host = f"[{config.host}]" if ":" in config.host else config.host
        default_port = 443 if config.tls else 80
        self._host_header = host if config.port == default_port else f"{host}:{config.port}"

    @classmethod
    def from_config(cls, *, kubeconfig: str | None, context: str | None) -> KubernetesStore:
        """kubeconfig given -> $KUBECONFIG -> ~/.kube/config -> in-cluster service account."""
        return cls(load_config(kubeconfig, context))

    # Store protocol ------------------------------------------------------------------------

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        path = self._list_path(kind, selector)
        type_meta = b'{"kind":%s,"apiVersion":%s,' % (
            _ENCODE.encode(kind.name), _ENCODE.encode(kind.api_version))
        try:
            return await self._list_pages(path, type_meta, selector, self.page_size)
        except Expired:
            log.info("list %s: continue token expired; listing in one request", kind.name)
            return await self._list_pages(path, type_meta, selector, 0)

    async def watch(
        self, kind: Kind[Any], *, revision: str, selector: Selector = NO_SELECTOR
    ) -> AsyncIterator[Event]:
        timeout = int(self.watch_timeout * (1 + random.random()))
        params: dict[str, str] = {"allowWatchBookmarks": "true"}
        params.update(_selector_params(selector))
        if revision:
            params["resourceVersion"] = revision
        params["timeoutSeconds"] = str(timeout)
        params["watch"] = "1"
        target = self._list_path(kind, selector) + "?" + _query(params)
        conn, headers = await self._open_watch(target, kind)
        self._watches.add(conn)
        # The server ends the stream after ``timeout``; silence well beyond that means a
        # half-open connection, which only a read deadline detects.
        idle_limit = timeout + 30.0
        chunks = conn.body_chunks(headers)
        try:
            pending = bytearray()
            while True:
                try:
                    async with asyncio.timeout(idle_limit):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise Unavailable(f"watch {kind.name}: no data for {idle_limit:.0f}s") from None
                except _CONNECTION_ERRORS as err:
                    raise Unavailable(f"watch {kind.name}: connection lost: {err!r}") from None
                pending += chunk
                if b"\n" not in chunk:
                    continue
                *lines, rest = pending.split(b"\n")
                pending = rest
                for line in lines:
                    if line.strip():
                        yield _watch_event(line, kind)
            if pending.strip():
                yield _watch_event(pending, kind)
        finally:
            self._watches.discard(conn)
            conn.close()
            with contextlib.suppress(Exception):
                await chunks.aclose()

    async def put(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject:
        meta = dict(obj.get("metadata") or {})
        name = meta.get("name")
        if not name:
            raise Invalid(f"{kind.name} has no metadata.name")
        namespace = str(meta.get("namespace") or "default") if kind.namespaced else ""
        if kind.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        meta.pop("resourceVersion", None)
        body = {**obj, "apiVersion": kind.api_version, "kind": kind.name, "metadata": meta}
        collection = self._collection_path(kind, namespace)
        item = f"{collection}/{quote(str(name), safe='')}"
        resp = await self._request("POST", collection, body=_ENCODE.encode(body))
        if resp.status in (200, 201, 202):
            return _raw_object(resp.body)
        if resp.status != 409:
            _raise_for(resp, f"create {kind.name} {namespace}/{name}", self.config)
        for _ in range(self.retries):
            current = await self._request("GET", item)
            if current.status == 404:
                resp = await self._request("POST", collection, body=_ENCODE.encode(body))
            else:
                if current.status != 200:
                    _raise_for(current, f"get {kind.name} {namespace}/{name}", self.config)
                meta["resourceVersion"] = _raw_object(current.body).revision
                resp = await self._request("PUT", item, body=_ENCODE.encode(body))
            if resp.status in (200, 201):
                return _raw_object(resp.body)
            if resp.status != 409:
                _raise_for(resp, f"replace {kind.name} {namespace}/{name}", self.config)
        raise Conflict(f"replace {kind.name} {namespace}/{name}: still conflicting after "
                       f"{self.retries} attempts")

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        ns = (namespace or "default") if kind.namespaced else ""
        path = f"{self._collection_path(kind, ns)}/{quote(name, safe='')}"
        resp = await self._request("DELETE", path)
        if resp.status not in (200, 202):
            _raise_for(resp, f"delete {kind.name} {ns + '/' if ns else ''}{name}", self.config)

    async def call(self, method: str, path: str, body: Any = None, *,
                   content_type: str = "application/json") -> tuple[int, Any]:
        """One request to any API path (``/apis/coordination.k8s.io/v1/...``, a ``/status``
        subresource, a merge patch): (HTTP status, decoded JSON body or None). For what a
        node agent does beyond the kinds svcnet reads: leases, status, deletion options."""
        data = None if body is None else _ENCODE.encode(body)
        resp = await self._request(method, self.config.path_prefix + path, body=data,
                                   content_type=content_type)
        try:
            decoded = msgspec.json.decode(resp.body) if resp.body else None
        except msgspec.DecodeError:
            decoded = None
        return resp.status, decoded

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for conn in list(self._watches):
            conn.close()

    # internals -------------------------------------------------------------------------------

    def _list_path(self, kind: Kind[Any], selector: Selector) -> str:
        """The namespace's own collection when the field selector pins one namespace.

        kube-apiserver v1.28 answers a paged all-namespaces list with
        ``fieldSelector=metadata.namespace=X`` with its first page and then an empty one
        (``kubectl get -A --field-selector metadata.namespace=X --chunk-size=N`` shows only N
        objects); the namespaced collection pages correctly and is what kubectl -n asks for.
        """
        namespace = _pinned_namespace(selector) if kind.namespaced else ""
        if namespace:
            return self._collection_path(kind, namespace)
        return self.config.path_prefix + kind.api_path

    def _collection_path(self, kind: Kind[Any], namespace: str) -> str:
        if not kind.namespaced:
            return self.config.path_prefix + kind.api_path
        group_version = kind.api_path.rsplit("/", 1)[0]
        return (f"{self.config.path_prefix}{group_version}/namespaces/"
                f"{quote(namespace, safe='')}/{kind.plural}")

    async def _list_pages(self, path: str, type_meta: bytes, selector: Selector, limit: int
                          ) -> Listing:
        items: list[RawObject] = []
        revision = ""
        token = ""
        while True:
            params = _selector_params(selector)
            if limit:
                params["limit"] = str(limit)
            if token:
                params["continue"] = token
            resp = await self._request("GET", path + ("?" + _query(params) if params else ""))
            if resp.status != 200:
                _raise_for(resp, f"list {path}", self.config)
            try:
                page = _LIST.decode(resp.body)
                items.extend(_list_item(raw, type_meta) for raw in page.items or ())
            except msgspec.DecodeError as err:
                raise Unavailable(f"list {path}: undecodable response: {err}") from None
            revision = revision or page.metadata.resource_version
            token = page.metadata.continue_
            if not token:
                return Listing(items, revision)

    async def _request_bytes(self, method: str, target: str, body: bytes | None,
                             content_type: str = "application/json") -> bytes:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self._host_header}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json",
        ]
        token = await self._token.get()
        if token:
            lines.append(f"Authorization: Bearer {token}")
        if body is not None:
            lines.append(f"Content-Type: {content_type}")
            lines.append(f"Content-Length: {len(body)}")
        elif method in ("POST", "PUT"):
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def _request(self, method: str, target: str, *, body: bytes | None = None,
                       content_type: str = "application/json") -> _Response:
        """One request on the shared keep-alive connection, honouring 429 Retry-After and
        fetching a fresh token once after a 401 (a rotated token file, an expired plugin
        token)."""
        refreshed = False
        for _ in range(self.retries):
            resp = await self._exchange(method, target, body, content_type)
            if resp.status == 401 and self._token.refreshable and not refreshed:
                self._token.invalidate()
                refreshed = True
                continue
            if resp.status != 429:
                return resp
            await self._wait_retry_after(resp.headers, f"{method} {target}")
        raise Unavailable(f"{method} {target}: still throttled (429) after {self.retries} tries")

    async def _exchange(self, method: str, target: str, body: bytes | None,
                        content_type: str = "application/json") -> _Response:
        request = await self._request_bytes(method, target, body, content_type)
        async with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = await _Connection.open(
                            self.config, self._tls, self.connect_timeout)
                    conn = self._conn
                    try:
                        async with asyncio.timeout(self.request_timeout):
                            await conn.send(request)
                            status, headers = await conn.read_head()
                            data = await conn.read_body(headers)
                    except asyncio.CancelledError:
                        # Half a response may be unread: this connection is unusable now.
                        conn.close()
                        self._conn = None
                        raise
                    if not conn.reusable:
                        conn.close()
                        self._conn = None
                    return _Response(status, headers, data)
                except (*_CONNECTION_ERRORS, TimeoutError) as err:
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    if isinstance(err, ssl.SSLCertVerificationError):
                        raise Invalid(f"{self.config.server}: TLS verification failed: "
                                      f"{err.verify_message} ({self.config.source})") from None
                    # A keep-alive connection the server closed while idle: retry once, fresh.
                    if reused and attempt == 1 and not isinstance(err, TimeoutError):
                        continue
                    raise Unavailable(f"{method} {self.config.server}{target}: {err!r}") from None
        raise AssertionError("unreachable")

    async def _open_watch(self, target: str, kind: Kind[Any]
                          ) -> tuple[_Connection, dict[str, str]]:
        """Send the watch request on a new connection; return it once the server said 200."""
        refreshed = False
        for _ in range(self.retries):
            try:
                conn = await _Connection.open(self.config, self._tls, self.connect_timeout)
            except ssl.SSLCertVerificationError as err:
                raise Invalid(f"{self.config.server}: TLS verification failed: "
                              f"{err.verify_message} ({self.config.source})") from None
            except (*_CONNECTION_ERRORS, TimeoutError) as err:
                raise Unavailable(f"watch {kind.name}: cannot connect to "
                                  f"{self.config.server}: {err!r}") from None
            try:
                async with asyncio.timeout(self.request_timeout):
                    await conn.send(await self._request_bytes("GET", target, None))
                    status, headers = await conn.read_head()
                    if status == 200:
                        return conn, headers
                    data = await conn.read_body(headers)
            except (*_CONNECTION_ERRORS, TimeoutError) as err:
                conn.close()
                raise Unavailable(f"watch {kind.name}: {err!r}") from None
            except asyncio.CancelledError:
                conn.close()
                raise
            conn.close()
            resp = _Response(status, headers, data)
            if status == 401 and self._token.refreshable and not refreshed:
                self._token.invalidate()
                refreshed = True
                continue
            if status != 429:
                _raise_for(resp, f"watch {kind.name}", self.config)
            await self._wait_retry_after(headers, f"watch {kind.name}")
        raise Unavailable(f"watch {kind.name}: still throttled (429) after {self.retries} tries")

    async def _wait_retry_after(self, headers: Mapping[str, str], what: str) -> None:
        try:
            delay = float(headers.get("retry-after", "1"))
        except ValueError:
            delay = 1.0
        if delay > MAX_RETRY_AFTER:
            raise Unavailable(f"{what}: throttled (429), Retry-After {delay:.0f}s")
        log.info("%s: throttled (429); retrying after %.1fs", what, delay)
        await asyncio.sleep(max(delay, 0.0))


def _watch_event(line: bytes | bytearray, kind: Kind[Any]) -> Event:
    try:
        env = _EVENT.decode(line)
        if env.type == "ERROR":
            _raise_status(_STATUS.decode(env.object), f"watch {kind.name}")
        head = _HEAD.decode(env.object).metadata
    except msgspec.DecodeError as err:
        raise Unavailable(f"watch {kind.name}: undecodable event {line[:80]!r}: {err}") from None
    if env.type == "BOOKMARK":
        return Event(EventType.BOOKMARK, head.resource_version)
    try:
        etype = EventType(env.type)
    except ValueError:
        raise Unavailable(f"watch {kind.name}: unknown event type {env.type!r}") from None
    raw = RawObject(head.namespace, head.name, head.resource_version, bytes(env.object))
    return Event(etype, head.resource_version, raw)


def _selector_params(selector: Selector) -> dict[str, str]:
    params = {}
    if selector.labels:
        params["labelSelector"] = selector.labels
    if selector.fields:
        params["fieldSelector"] = selector.fields
    return params


def _pinned_namespace(selector: Selector) -> str:
    """X if the field selector requires ``metadata.namespace=X`` (or ``==X``), else ""."""
    for term in selector.fields.split(","):
        key, op, value = term.partition("=")
        if op and key.strip() == "metadata.namespace":
            return value.removeprefix("=").strip()
    return ""


def _query(params: Mapping[str, str]) -> str:
    return urlencode(params, quote_via=quote, safe="")


def _raise_for(resp: _Response, what: str, config: ClusterConfig) -> None:
    """Turn a non-success response into the ``StoreError`` that says what to do next."""
    try:
        status = _STATUS.decode(resp.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        status = _Status(message=resp.body[:200].decode("utf-8", "replace").strip())
    if not status.code:
        status = _Status(kind=status.kind, status=status.status, message=status.message,
                         reason=status.reason, code=resp.status)
    if resp.status in (401, 403):
        hint = ("the token or client certificate was not accepted"
                if resp.status == 401 else "the credentials lack RBAC permission")
        raise Invalid(f"{what}: {resp.status} {status.reason or 'denied'}: "
                      f"{status.message or hint} ({hint}; {config.source})")
    _raise_status(status, what)


def _raise_status(status: _Status, what: str) -> None:
    message = f"{what}: {status.code} {status.reason}: {status.message}".rstrip(": ")
    error: type[StoreError]
    if status.code == 410 or status.reason in ("Expired", "Gone"):
        error = Expired
    elif status.code == 404:
        error = NotFound
    elif status.code == 409:
        error = Conflict
    elif status.code in (401, 403) or (400 <= status.code < 500 and status.code != 429):
        error = Invalid
    else:
        error = Unavailable
    raise error(message)
