"""A fake kube-apiserver speaking the real wire protocol, for tests of anything that talks to
Kubernetes (the ``kubernetes`` store, the lab).

What it reproduces, from the API concepts documentation and kube-apiserver's behaviour:

- HTTPS with a throwaway CA; bearer-token and client-certificate authentication; 401/403 as
  ``Status`` objects.
- LIST of a collection (all namespaces or one) as ``{"kind": "ServiceList", "apiVersion": "v1",
  "metadata": {"resourceVersion", "continue", "remainingItemCount"}, "items": [...]}``, items
  without ``kind``/``apiVersion`` as the real server sends them; ``limit``/``continue``
  pagination over one consistent snapshot; an expired continue token -> 410 ``Expired``; an
  all-namespaces list pinned to one namespace by its field selector stops after one page (a
  v1.28.7 quirk).
- WATCH (``watch=1|true``) as a chunked stream of ``{"type", "object"}`` lines; events after
  ``resourceVersion``; ``""``/``"0"`` start with synthetic ADDED events; a compacted revision ->
  410 either as HTTP status or as an ``ERROR`` event (``expire_as``); BOOKMARK events when
  ``allowWatchBookmarks=true``; ``timeoutSeconds`` ends the stream; label and field selectors,
  with objects leaving/entering the selection seen as DELETED/ADDED.
- POST (create, 201; 409 ``AlreadyExists``), PUT (replace; 409 ``Conflict`` on a stale
  ``resourceVersion``), DELETE (200 ``Status`` Success; 404 ``NotFound``), GET of one object.
- Service create allocates a given ``clusterIP``/``nodePort`` before it checks whether the
  name exists, as the real registry does: re-creating a Service that fixes either answers
  422 ``provided IP/port is already allocated``, not 409.
- Server-side apply: PATCH with ``application/apply-patch+yaml`` and a ``fieldManager``
  creates the object (201) or updates it (200). Simplified: the applied fields are merged
  over the stored object (maps recursively, lists replaced), fields this manager applied
  before and no longer applies are dropped, and conflicts with other managers are not
  reported (as with ``force=true``, which svcnet sends). ``managedFields`` is not kept.
- Objects come back as Go serialises them after the round trip through etcd: an empty or
  missing list without ``omitempty`` (EndpointSlice ``endpoints``/``ports``, an endpoint's
  ``addresses``) is ``null``; an empty ``omitempty`` list or map is left out.

Test controls (``create``/``update``/``delete`` write straight into storage, as a write into
etcd would, without the registry's allocation): ``compact()``, ``drop_watches()``,
``inject(status, ...)`` for 429/5xx faults, and ``requests`` recording every request for
protocol assertions. Certificates come from ``make_certs`` (the ``openssl`` command line).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from svcnet.model.kinds import KINDS
from svcnet.store.base import Invalid, Selector, SelectorMatcher

T = TypeVar("T")

# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_ca_crt: Path
    """A CA that signed nothing here: trusting it instead of ``ca_crt`` must fail."""

    @staticmethod
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()


def make_certs(directory: Path, *, client_cn: str = "system:node:node-1") -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    d = directory
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec, "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.crt"),
            "-days", "2", "-subj", f"/CN=svcnet-test-{ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    leaves = {
        "server": ("/CN=kube-apiserver",
                   "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
                   "extendedKeyUsage=serverAuth\n"),
        "client": (f"/O=system:nodes/CN={client_cn}", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, ext) in leaves.items():
        (d / f"{name}.ext").write_text(
            ext + "keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        run("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
            "-subj", subject)
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))
    return Certs(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key",
                 d / "client.crt", d / "client.key", d / "other-ca.crt")


# --- running it beside synchronous code --------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(certs: Certs, **options: Any) -> Iterator[ThreadedKubeAPI]:
    """A ``FakeKubeAPI`` on its own event loop in a daemon thread, for code that runs its own
    loop (the CLI's ``asyncio.run``) or another process (the lab's daemons)."""
    loop = asyncio.new_event_loop()
    api = FakeKubeAPI(certs, **options)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(api.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake-kube-apiserver", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("fake kube-apiserver did not start")
    threaded = ThreadedKubeAPI(api, loop)
    try:
        yield threaded
    finally:
        asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class ThreadedKubeAPI:
    """Thread-safe handle on a ``FakeKubeAPI`` running in another thread's loop."""

    def __init__(self, api: FakeKubeAPI, loop: asyncio.AbstractEventLoop) -> None:
        self.api = api
        self.loop = loop
        self.url = api.url
        self.port = api.port

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (e.g. ``api.create``) on the server's loop and return its result."""

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


# --- the API server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def qualified(self) -> str:
        """The name in API messages: ``services``, ``endpointslices.discovery.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    user: str

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class _Fault:
    status: int
    count: int
    retry_after: int | None
    when: Callable[[Recorded], bool]


@dataclass
class _Change:
    rv: int
    resource: Resource
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(eq=False)
class _Watch:
    writer: asyncio.StreamWriter
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class _Respond(Exception):
    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            415: "Unsupported Media Type",
            410: "Gone", 422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
_STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 422: "Invalid",
                   429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                   504: "Timeout"}


def status_object(code: int, message: str, reason: str | None = None,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``metav1.Status`` failure exactly as kube-apiserver serialises it."""
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message,
                            "reason": reason or _STATUS_REASONS.get(code, "")}
    if details:
        body["details"] = details
    body["code"] = code
    return body


class FakeKubeAPI:
    """See the module docstring. Start with ``await api.start()``; stop with ``stop()``."""

    def __init__(
        self, certs: Certs, *, tokens: dict[str, str] | None = None,
        expire_as: str = "event", bookmark_interval: float | None = None,
        fragment: bool = False, first_rv: int = 1000, tls: bool = True, prefix: str = "",
    ) -> None:
        self.certs = certs
        self.tls = tls
        self.prefix = prefix
        """A path prefix in front of /api and /apis, as behind Rancher's or a proxy's URL."""
        self.tokens = {"good-token": "alice"} if tokens is None else tokens
        """Bearer token -> user name."""
        self.forbidden_users: set[str] = set()
        self.expire_as = expire_as
        self.bookmark_interval = bookmark_interval
        self.fragment = fragment
        """Split watch events across chunk boundaries and join several into one chunk."""
        self.rv = first_rv
        self.compacted = 0
        """Revisions at or below this are gone: older watches and continue tokens get 410."""
        self.requests: list[Recorded] = []
        self.delay = 0.0
        """Seconds to wait before answering each request (a slow server)."""
        self.hooks: list[Callable[[Recorded], None]] = []
        """Called with every request before it is handled (to change state mid-protocol)."""
        self.resources = {
            k.plural: Resource(k.name, k.api_version, k.plural, k.namespaced)
            for k in KINDS.values()
        }
        # Namespaces, which DNS watches (existing ones answer NODATA), with the four a new
        # cluster has. Unlike the real server, objects may be created in a namespace that
        # does not exist (no NamespaceLifecycle admission).
        self.resources["namespaces"] = Resource("Namespace", "v1", "namespaces", False)
        self._current: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in self.resources}
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._current["namespaces"][ns] = {
                "kind": "Namespace", "apiVersion": "v1",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()),
                             "resourceVersion": str(first_rv),
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        self._history: list[_Change] = []
        self._applied: dict[tuple[str, str, str], dict[str, Any]] = {}
        """(plural, key, field manager) -> what that manager applied last."""
        self._faults: list[_Fault] = []
        self._watches: set[_Watch] = set()
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    # lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self.prefix}"

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certs.server_crt, self.certs.server_key)
        ctx.load_verify_locations(self.certs.ca_crt)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port or 0,
                                                  ssl=ctx if self.tls else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    # test controls ---------------------------------------------------------------------------

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object as if POSTed; returns it as stored."""
        res = self.resources[plural]
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        return self._create(res, meta.get("namespace", ""), obj)

    def update(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        res = self.resources[plural]
        meta = obj["metadata"]
        ns = meta.get("namespace", "default") if res.namespaced else ""
        meta.pop("resourceVersion", None)
        return self._replace(res, ns, meta["name"], obj)

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self._delete(self.resources[plural], namespace, name)

    def objects(self, plural: str) -> dict[str, dict[str, Any]]:
        return dict(self._current[plural])

    def compact(self) -> None:
        """Forget all history: every watch or continue token older than now gets 410."""
        self.compacted = self.rv
        self._history.clear()

    def drop_watches(self) -> int:
        """Abort every open watch connection mid-stream (no terminating chunk)."""
        dropped = len(self._watches)
        for w in list(self._watches):
            w.writer.transport.abort()
        return dropped

    def error_watches(self, code: int, message: str) -> int:
        """Send an ``ERROR`` event with a ``Status`` of ``code`` on every open watch."""
        line = json.dumps({"type": "ERROR", "object": status_object(code, message)}).encode()
        for w in self._watches:
            w.writer.write(b"%x\r\n%s\n\r\n" % (len(line) + 1, line))
        return len(self._watches)

    def inject(self, status: int, *, count: int = 1, retry_after: int | None = None,
               when: Callable[[Recorded], bool] = lambda r: True) -> None:
        """Answer the next ``count`` matching requests with ``status`` (a Status object)."""
        self._faults.append(_Fault(status, count, retry_after, when))

    def watch_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.param("watch") in ("1", "true")]

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # storage ---------------------------------------------------------------------------------

    @staticmethod
    def _key(namespace: str, name: str) -> str:
        return f"{namespace}/{name}" if namespace else name

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _create(self, res: Resource, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        key = self._key(namespace, name)
        if key in self._current[res.plural]:
            raise _Respond(409, status_object(
                409, f'{res.qualified} "{name}" already exists', "AlreadyExists",
                _details(res, name)))
        rv = self._next_rv()
        stored = {
            **obj, "kind": res.kind, "apiVersion": res.api_version,
            "metadata": {**meta, "uid": str(uuid.uuid4()), "resourceVersion": str(rv),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
        }
        stored = as_go_serialises(res.kind, stored)
        if res.namespaced:
            stored["metadata"]["namespace"] = namespace
        self._current[res.plural][key] = stored
        self._record(_Change(rv, res, "ADDED", stored, None))
        return stored

    def _replace(self, res: Resource, namespace: str, name: str,
                 obj: dict[str, Any]) -> dict[str, Any]:
        key = self._key(namespace, name)
        old = self._current[res.plural].get(key)
        if old is None:
            raise _Respond(404, status_object(404, f'{res.qualified} "{name}" not found',
                                              details=_details(res, name)))
        meta = obj.get("metadata") or {}
        given = meta.get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise _Respond(409, status_object(
                409, f'Operation cannot be fulfilled on {res.qualified} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try "
                "again", "Conflict", _details(res, name)))
        rv = self._next_rv()
        stored = {
            **obj, "kind": res.kind, "apiVersion": res.api_version,
            "metadata": {**meta, "uid": old["metadata"]["uid"], "resourceVersion": str(rv),
                         "creationTimestamp": old["metadata"]["creationTimestamp"]},
        }
        stored = as_go_serialises(res.kind, stored)
        if res.namespaced:
            stored["metadata"]["namespace"] = namespace
        self._current[res.plural][key] = stored
        self._record(_Change(rv, res, "MODIFIED", stored, old))
        return stored

    def _delete(self, res: Resource, namespace: str, name: str) -> dict[str, Any]:
        key = self._key(namespace, name)
        old = self._current[res.plural].pop(key, None)
        if old is None:
            raise _Respond(404, status_object(404, f'{res.qualified} "{name}" not found',
                                              details=_details(res, name)))
        rv = self._next_rv()
        gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(rv)}}
        self._record(_Change(rv, res, "DELETED", gone, old))
        return old

    def _allocate(self, obj: dict[str, Any], name: str) -> None:
        """The Service registry allocates the IPs and node ports a create asks for first, so
        a taken one is a 422 even when the Service itself already exists."""
        spec = obj.get("spec") or {}
        taken_ips: set[str] = set()
        taken_ports: set[int] = set()
        for svc in self._current["services"].values():
            other = svc.get("spec") or {}
            taken_ips.update(other.get("clusterIPs") or [other.get("clusterIP")])
            taken_ports.update(p.get("nodePort") for p in other.get("ports") or [])
        ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
               if ip and ip != "None"]
        for ip in ips:
            if ip in taken_ips:
                quoted = ", ".join(f'"{i}"' for i in ips)
                _invalid("Service", name, "spec.clusterIPs", f"[]string{{{quoted}}}",
                         f"failed to allocate IP {ip}: provided IP is already allocated")
        for i, port in enumerate(spec.get("ports") or []):
            if port.get("nodePort") and port["nodePort"] in taken_ports:
                _invalid("Service", name, f"spec.ports[{i}].nodePort", str(port["nodePort"]),
                         "provided port is already allocated")

    def _record(self, change: _Change) -> None:
        self._history.append(change)
        for w in self._watches:
            w.wake.set()

    def _snapshot(self, res: Resource, rv: int) -> dict[str, dict[str, Any]]:
        """The collection as it was at ``rv``: undo later history from the current state."""
        state = dict(self._current[res.plural])
        for change in reversed(self._history):
            if change.rv <= rv:
                break
            if change.resource != res:
                continue
            meta = change.obj["metadata"]
            key = self._key(meta.get("namespace", ""), meta["name"])
            if change.old is None:
                state.pop(key, None)
            else:
                state[key] = change.old
        return state

    # HTTP ------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the connection ends with the server
        finally:
            self._tasks.discard(task)
            self._conns.discard(writer)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line:
            return False
        method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: dict[str, str] = {}
        while (h := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        parts = urlsplit(target)
        if not parts.path.startswith(self.prefix + "/"):
            await _write_json(writer, 404, status_object(404, "404 page not found"))
            return True
        req = Recorded(method, unquote(parts.path.removeprefix(self.prefix)),
                       parse_qs(parts.query, keep_blank_values=True), headers, body,
                       self._user(headers, writer))
        self.requests.append(req)
        try:
            await self._handle(req, writer)
        except _Respond as r:
            await _write_json(writer, r.status, r.body, r.headers)
        return True

    def _user(self, headers: dict[str, str], writer: asyncio.StreamWriter) -> str:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return self.tokens.get(auth.removeprefix("Bearer "), "")
        cert = writer.get_extra_info("peercert")
        if cert:
            for rdn in cert.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        return str(v)
        return ""

    async def _handle(self, req: Recorded, writer: asyncio.StreamWriter) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        for hook in list(self.hooks):
            hook(req)
        for fault in self._faults:
            if fault.count > 0 and fault.when(req):
                fault.count -= 1
                extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                message = ("Too many requests, please try again later."
                           if fault.status == 429 else "injected failure")
                raise _Respond(fault.status, status_object(fault.status, message), extra)
        if not req.user:
            raise _Respond(401, status_object(401, "Unauthorized"))
        path, status_patch = req.path, False
        if req.method == "PATCH" and req.path.endswith("/status"):
            # The status subresource with a JSON merge patch, as Flannel and kubelets send it.
            path, status_patch = req.path.removesuffix("/status"), True
        res, namespace, name = self._route(path)
        verb = self._verb(req, name)
        if req.user in self.forbidden_users:
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            raise _Respond(403, status_object(
                403, f'{res.qualified} is forbidden: User "{req.user}" cannot {verb} resource '
                f'"{res.plural}" in API group "{res.group}" {scope}', "Forbidden",
                {"kind": res.plural} | ({"group": res.group} if res.group else {})))
        if verb == "watch":
            await self._watch(req, res, namespace, writer)
        elif verb == "list":
            await _write_json(writer, 200, self._list(req, res, namespace))
        elif verb == "get":
            obj = self._current[res.plural].get(self._key(namespace, name))
            if obj is None:
                raise _Respond(404, status_object(404, f'{res.qualified} "{name}" not found',
                                                  details=_details(res, name)))
            await _write_json(writer, 200, obj)
        elif verb == "create":
            obj = self._body(req, res)
            meta = obj.setdefault("metadata", {})
            if res.namespaced and meta.setdefault("namespace", namespace) != namespace:
                raise _Respond(400, status_object(
                    400, "the namespace of the provided object does not match the namespace "
                    "sent on the request"))
            if not meta.get("name"):
                raise _Respond(422, status_object(
                    422, f"{res.kind} \"\" is invalid: metadata.name: Required value: name or "
                    "generateName is required", "Invalid"))
            if meta.get("resourceVersion"):
                raise _Respond(500, status_object(
                    500, "resourceVersion should not be set on objects to be created"))
            if res.kind == "Service":
                self._allocate(obj, meta["name"])
            await _write_json(writer, 201, self._create(res, namespace, obj))
        elif verb == "update":
            obj = self._body(req, res)
            meta = obj.setdefault("metadata", {})
            if meta.get("name") != name:
                raise _Respond(400, status_object(
                    400, f"the name of the object ({meta.get('name')}) does not match the name "
                    f"on the URL ({name})"))
            await _write_json(writer, 200, self._replace(res, namespace, name, obj))
        elif verb == "patch" and status_patch:
            await _write_json(writer, 200, self._merge_patch(req, res, namespace, name))
        elif verb == "patch":
            await _write_json(writer, *self._server_side_apply(req, res, namespace, name))
        elif verb == "delete":
            old = self._delete(res, namespace, name)
            await _write_json(writer, 200, {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": res.plural, "uid": old["metadata"]["uid"]}})
        else:
            raise _Respond(405, status_object(405, "the server does not allow this method on "
                                                   "the requested resource"))

    def _route(self, path: str) -> tuple[Resource, str, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            rest = parts[3:]
        else:
            raise _Respond(404, status_object(404, "the server could not find the requested "
                                                   "resource"))
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        res = self.resources.get(rest[0]) if rest else None
        group_version = "/".join(parts[1:2] if parts[0] == "api" else parts[1:3])
        if res is None or res.api_version != group_version or len(rest) > 2 or (
            namespace and not res.namespaced
        ):
            raise _Respond(404, status_object(404, "the server could not find the requested "
                                                   "resource"))
        return res, namespace, rest[1] if len(rest) == 2 else ""

    @staticmethod
    def _verb(req: Recorded, name: str) -> str:
        if req.method == "GET":
            if name:
                return "get"
            return "watch" if req.param("watch") in ("1", "true") else "list"
        return {("POST", False): "create", ("PUT", True): "update", ("PATCH", True): "patch",
                ("DELETE", True): "delete"}.get((req.method, bool(name)), "unsupported")

    @staticmethod
    def _body(req: Recorded, res: Resource) -> dict[str, Any]:
        if req.headers.get("content-type", "").split(";")[0] != "application/json":
            raise _Respond(415, status_object(415, "the body of the request was in an unknown "
                                                   "format", "UnsupportedMediaType"))
        try:
            obj = json.loads(req.body)
        except ValueError as err:
            raise _Respond(400, status_object(400, f"invalid JSON: {err}")) from None
        if obj.get("kind") != res.kind or obj.get("apiVersion") != res.api_version:
            raise _Respond(400, status_object(
                400, f"the API version in the data ({obj.get('apiVersion')}) does not match "
                f"the expected API version ({res.api_version})"))
        return dict(obj)

    def _merge_patch(self, req: Recorded, res: Resource, namespace: str, name: str
                     ) -> dict[str, Any]:
        """RFC 7386 merge patch of an existing object (the fake keeps no separate status)."""
        ctype = req.headers.get("content-type", "").split(";")[0]
        if ctype != "application/merge-patch+json":
            raise _Respond(415, status_object(
                415, f"the body of the request was in an unknown format (this fake: merge "
                f"patch only, got {ctype})", "UnsupportedMediaType"))
        current = self._current[res.plural].get(self._key(namespace, name))
        if current is None:
            raise _Respond(404, status_object(404, f'{res.qualified} "{name}" not found',
                                              details=_details(res, name)))
        try:
            patch = json.loads(req.body)
        except ValueError as err:
            raise _Respond(400, status_object(400, f"invalid JSON: {err}")) from None

        def merge(target: Any, change: Any) -> Any:
            if not isinstance(change, dict):
                return change
            out = dict(target) if isinstance(target, dict) else {}
            for k, v in change.items():
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = merge(out.get(k), v)
            return out

        merged = merge(json.loads(json.dumps(current)), patch)
        merged["metadata"].pop("resourceVersion", None)
        return self._replace(res, namespace, name, merged)

    def _server_side_apply(self, req: Recorded, res: Resource, namespace: str, name: str
                           ) -> tuple[int, dict[str, Any]]:
        ctype = req.headers.get("content-type", "").split(";")[0]
        if ctype != "application/apply-patch+yaml":
            raise _Respond(415, status_object(
                415, f"the body of the request was in an unknown format - accepted media "
                f"types include: application/apply-patch+yaml (this fake: got {ctype})",
                "UnsupportedMediaType"))
        manager = req.param("fieldManager")
        if not manager:
            raise _Respond(400, status_object(
                400, "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: "
                "is required for apply patch"))
        try:
            obj = yaml.safe_load(req.body)
        except yaml.YAMLError as err:
            raise _Respond(400, status_object(400, f"error decoding YAML: {err}")) from None
        if not isinstance(obj, dict) or obj.get("kind") != res.kind or (
                obj.get("apiVersion") != res.api_version):
            raise _Respond(400, status_object(
                400, "the API version in the data does not match the expected API version"))
        meta = obj.setdefault("metadata", {})
        if meta.get("name") != name:
            raise _Respond(400, status_object(
                400, f"the name of the object ({meta.get('name')}) does not match the name on "
                f"the URL ({name})"))
        if res.namespaced and meta.setdefault("namespace", namespace) != namespace:
            raise _Respond(400, status_object(
                400, "the namespace of the provided object does not match the namespace sent "
                "on the request"))
        if meta.get("managedFields") is not None:
            raise _Respond(400, status_object(400, "metadata.managedFields must be nil"))
        key = self._key(namespace, name)
        applied_key = (res.plural, key, manager)
        current = self._current[res.plural].get(key)
        if current is None:
            if res.kind == "Service":
                self._allocate(obj, name)
            stored = self._create(res, namespace, json.loads(json.dumps(obj)))
            self._applied[applied_key] = obj
            return 201, stored
        given = meta.pop("resourceVersion", None)
        if given and given != current["metadata"]["resourceVersion"]:
            raise _Respond(409, status_object(
                409, f'Operation cannot be fulfilled on {res.qualified} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try "
                "again", "Conflict", _details(res, name)))
        merged = _apply_merge(current, self._applied.get(applied_key, {}), obj)
        merged["metadata"].pop("resourceVersion", None)
        stored = self._replace(res, namespace, name, merged)
        self._applied[applied_key] = obj
        return 200, stored

    def _matcher(self, req: Recorded) -> SelectorMatcher:
        try:
            return SelectorMatcher(Selector(req.param("labelSelector") or "",
                                            req.param("fieldSelector") or ""))
        except Invalid as err:
            raise _Respond(400, status_object(400, str(err))) from None

    def _list(self, req: Recorded, res: Resource, namespace: str) -> dict[str, Any]:
        matcher = self._matcher(req)
        limit = int(req.param("limit") or 0)
        token = req.param("continue")
        start = ""
        rv = self.rv
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token))
                rv, start = int(decoded["rv"]), str(decoded["start"])
            except (ValueError, KeyError, TypeError):
                raise _Respond(400, status_object(400, "continue key is not valid")) from None
            if rv < self.compacted:
                raise _Respond(410, status_object(
                    410, "The provided continue parameter is too old to display a consistent "
                    "list result. You can start a new list without the continue parameter."))
        if token and not namespace and _pins_namespace(req.param("fieldSelector") or ""):
            # kube-apiserver v1.28.7: an all-namespaces list whose field selector pins one
            # namespace pages its first page correctly and then answers the continue token
            # with no items and no further token (seen with kubectl --chunk-size too).
            return {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(rv)}, "items": []}
        state = self._snapshot(res, rv)
        keys = sorted(k for k in state if k >= start and (
            not namespace or state[k]["metadata"].get("namespace") == namespace))
        items: list[dict[str, Any]] = []
        next_key = ""
        remaining = 0
        for i, key in enumerate(keys):
            if not matcher.matches(state[key]):
                continue
            if limit and len(items) == limit:
                next_key = key
                remaining = sum(1 for k in keys[i:] if matcher.matches(state[k]))
                break
            items.append({k: v for k, v in state[key].items() if k not in ("kind", "apiVersion")})
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if next_key:
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"v": "meta.k8s.io/v1", "rv": rv, "start": next_key}).encode()).decode()
            if not req.param("labelSelector") and not req.param("fieldSelector"):
                meta["remainingItemCount"] = remaining
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
                "items": items}

    async def _watch(self, req: Recorded, res: Resource, namespace: str,
                     writer: asyncio.StreamWriter) -> None:
        matcher = self._matcher(req)
        rv_param = req.param("resourceVersion") or ""
        timeout = float(req.param("timeoutSeconds") or 1800)
        bookmarks = req.param("allowWatchBookmarks") == "true"
        expired = rv_param not in ("", "0") and int(rv_param) < self.compacted
        if expired and self.expire_as == "status":
            raise _Respond(410, status_object(
                410, f"too old resource version: {rv_param} ({self.compacted})", "Expired"))
        writer.write(_head(200, {"Content-Type": "application/json",
                                 "Transfer-Encoding": "chunked"}))
        watch = _Watch(writer)
        self._watches.add(watch)
        pending = bytearray()

        async def emit(event_type: str, obj: dict[str, Any]) -> None:
            pending.extend(json.dumps({"type": event_type, "object": obj},
                                      separators=(",", ":")).encode() + b"\n")
            if self.fragment and random.random() < 0.5:
                return  # joined with the next event into one chunk
            await flush()

        async def flush() -> None:
            data = bytes(pending)
            pending.clear()
            cut = random.randrange(1, len(data)) if self.fragment and len(data) > 1 else 0
            for piece in (data[:cut], data[cut:]) if cut else (data,):
                if piece:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()

        try:
            if expired:
                await emit("ERROR", status_object(
                    410, f"too old resource version: {rv_param} ({self.compacted})", "Expired"))
                await flush()
                writer.write(b"0\r\n\r\n")
                return
            if rv_param in ("", "0"):
                since = self.rv
                for key in sorted(self._current[res.plural]):
                    obj = self._current[res.plural][key]
                    if _in_namespace(obj, namespace) and matcher.matches(obj):
                        await emit("ADDED", obj)
            else:
                since = int(rv_param)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                for change in [c for c in self._history if c.rv > since]:
                    since = change.rv
                    if change.resource != res or not _in_namespace(change.obj, namespace):
                        continue
                    translated = _filter(change, matcher)
                    if translated is not None:
                        await emit(*translated)
                since = max(since, self.rv)
                if pending:
                    await flush()
                watch.wake.clear()
                wait = left if self.bookmark_interval is None else min(
                    left, self.bookmark_interval)
                try:
                    async with asyncio.timeout(wait):
                        await watch.wake.wait()
                except TimeoutError:
                    if bookmarks and self.bookmark_interval is not None and (
                        deadline - loop.time() > 0
                    ):
                        await emit("BOOKMARK", _bookmark(res, self.rv))
                        await flush()
            if pending:
                await flush()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self._watches.discard(watch)


def _invalid(kind: str, name: str, field: str, value: str, problem: str) -> None:
    """Raise kube-apiserver's 422 for one invalid field."""
    message = f"Invalid value: {value}: {problem}"
    raise _Respond(422, status_object(
        422, f'{kind} "{name}" is invalid: {field}: {message}', "Invalid",
        {"name": name, "kind": kind.lower() + "s",
         "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}]}))


# Lists without ``omitempty`` in the Go API types of the kinds served here: a nil (empty or
# missing) one is written as ``null``. Every other list and map we serve is ``omitempty``.
_NULLABLE_LISTS = {"EndpointSlice": (("endpoints",), ("ports",), ("endpoints", "*", "addresses"))}
_MAPS = ("labels", "annotations", "selector")


def as_go_serialises(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as kube-apiserver returns it once stored (see the module docstring)."""

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, list):
            return [walk(v, (*path, "*")) for v in value]
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            here = (*path, key)
            if item == [] and here not in nullable:
                continue
            if item == {} and key in _MAPS:
                continue
            out[key] = None if item == [] else walk(item, here)
        for here in nullable:
            if here[:-1] == path:
                out.setdefault(here[-1], None)
        return out

    nullable = set(_NULLABLE_LISTS.get(kind, ()))
    return dict(walk(obj, ()))


def _apply_merge(current: dict[str, Any], last: dict[str, Any], applied: dict[str, Any]
                 ) -> dict[str, Any]:
    """Server-side apply, simplified: ``applied`` over ``current``; what the same manager
    applied ``last`` time but no longer does is removed."""
    out = dict(current)
    for key in last:
        if key not in applied:
            out.pop(key, None)
    for key, value in applied.items():
        before = out.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            prev = last.get(key)
            out[key] = _apply_merge(before, prev if isinstance(prev, dict) else {}, value)
        else:
            out[key] = value
    return out


def _details(res: Resource, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if res.group:
        details["group"] = res.group
    details["kind"] = res.plural
    return details


def _pins_namespace(fields: str) -> bool:
    return any(t.partition("=")[0].strip() == "metadata.namespace" and "=" in t
               for t in fields.split(","))


def _in_namespace(obj: dict[str, Any], namespace: str) -> bool:
    return not namespace or obj["metadata"].get("namespace") == namespace


def _filter(change: _Change, matcher: SelectorMatcher) -> tuple[str, dict[str, Any]] | None:
    """How a selected watch sees a change: objects entering/leaving the selection are
    ADDED/DELETED, as kube-apiserver's watch cache reports them."""
    new_match = matcher.matches(change.obj)
    old_match = change.old is not None and matcher.matches(change.old)
    if change.type == "DELETED":
        return ("DELETED", change.obj) if old_match else None
    if change.type == "ADDED":
        return ("ADDED", change.obj) if new_match else None
    if new_match and old_match:
        return ("MODIFIED", change.obj)
    if new_match:
        return ("ADDED", change.obj)
    if old_match and change.old is not None:
        return ("DELETED", {**change.old, "metadata": {
            **change.old["metadata"], "resourceVersion": str(change.rv)}})
    return None


def _bookmark(res: Resource, rv: int) -> dict[str, Any]:
    """An empty object of the watched kind with only its resourceVersion set, as Go
    serialises it (zero-valued ``creationTimestamp`` and empty ``spec``/``status``)."""
    obj: dict[str, Any] = {"kind": res.kind, "apiVersion": res.api_version,
                           "metadata": {"resourceVersion": str(rv), "creationTimestamp": None}}
    if res.kind in ("Service", "Pod", "Node"):
        obj["spec"], obj["status"] = {}, {}
    else:
        obj["endpoints"] = None
    return obj


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
             f"Audit-Id: {uuid.uuid4()}", "Cache-Control: no-cache, private",
             f"Date: {formatdate(usegmt=True)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_json(writer: asyncio.StreamWriter, status: int, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    if len(data) <= CHUNK_ABOVE:
        writer.write(_head(status, {"Content-Type": "application/json", **(headers or {}),
                                    "Content-Length": str(len(data))}) + data)
    else:
        # Go's net/http switches to chunked encoding once a handler without Content-Length
        # writes more than 2 KiB, which is how kube-apiserver sends big lists.
        writer.write(_head(status, {"Content-Type": "application/json", **(headers or {}),
                                    "Transfer-Encoding": "chunked"}))
        for i in range(0, len(data), 4096):
            piece = data[i:i + 4096]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
    await writer.drain()


CHUNK_ABOVE = 2048
