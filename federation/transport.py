"""A lean asyncio HTTP/1.1 client pool for the fan-out hot path (issue 4).

Theory of operation
-------------------
Why this exists. A fan-out posts one small signed envelope to each of up to
500 cities and reads one small signed reply from each; the coordinator's CPU
per request on the event loop is what bounds it. ``bench/fanout.py`` measured
aiohttp's ``ClientSession`` at about 54 µs per request warm and 100 µs cold on
the development machine, against 10 / 26 µs for a bare asyncio reader: most
of the cost is aiohttp's generality (a ``Task`` per connect, yarl URLs,
multidict headers, the stream reader, tracing hooks), none of which a client
that speaks to Hansa nodes needs. ``bench/transport.py`` measures this module
against aiohttp in one run (figures below).

Measured (``bench/transport.py``: N = 500 concurrent POSTs of 300 bytes, one
port per peer, 400-byte replies, a lean server in a subprocess, client on
uvloop, Python 3.11, the shared 2-core development machine under a load
average of 3 to 4, medians of 15 alternating runs, two runs): client CPU per
request, this pool / aiohttp / a bare ``asyncio.Protocol`` reader with no
bounds and no pool (``RawHttp`` of ``bench/fanout.py``):

* warm (keep-alive connections): 11.7-12.8 / 51.5-58.0 / 8.8-9.7 µs,
  pool/aiohttp 0.22-0.23;
* cold (a TCP connect per request, pool closed after each round):
  28.5-28.9 / 102.9-107.8 / 23.3 µs, pool/aiohttp 0.27-0.28.

Wall time per request: 27-38 µs against 94-124 µs warm, 42-61 against
116-183 µs cold. On the plain asyncio loop the CPU ratios are 0.31 warm and
0.44 cold; with an aiohttp server 0.29 and 0.32.

What a request costs here. :meth:`HttpPool.post` takes an :class:`Endpoint`
parsed once per target (:meth:`HttpPool.endpoint`), so no URL is parsed per
request. The request head up to ``Content-Length:`` is built once per
(endpoint, path, content type) and cached on the endpoint; a request is one
``%``-format into one ``bytes`` and one ``transport.write``. The connection is
an :class:`asyncio.Protocol` feeding llhttp (``httptools.HttpResponseParser``)
straight from ``data_received``; the caller awaits one future per request that
the parser's ``on_message_complete`` resolves. No ``Task`` is created per
request, nothing is logged, and headers other than the four that matter
(``Content-Length``, ``Content-Type``, ``Transfer-Encoding``,
``Content-Encoding``) are counted and dropped.

Connections. Keep-alive connections are kept per origin (scheme, host, port)
on an idle stack (last in, first out: the most recently used connection is
the least likely to have been closed by its server). A global ``limit``
counts every open connection, idle ones and those still connecting included.
When the limit is reached a request that needs a new connection first closes
the least recently used idle connection of any origin; when none is idle it
waits in a FIFO queue and is handed, as soon as one is released, either that
connection (same origin) or its slot (the connection is closed and the waiter
opens its own). One request at a time per connection: no pipelining.

Framing (RFC 9112 §6). ``Content-Length`` and ``chunked`` bodies are framed
by llhttp; a final response with neither is read until the server closes
(HTTP/1.0 style, §6.3 rule 8) and the connection is not reused. A reply with
``Connection: close``, any HTTP/1.0 reply, bytes after a complete reply, and
any error leave the connection closed rather than pooled. Interim ``1xx``
responses are skipped (at most :data:`MAX_INTERIM_RESPONSES`); ``101`` is
refused since no upgrade is ever requested. The header block is bounded by
``max_head`` bytes (interim responses included) and ``max_headers`` fields,
the body by the ``max_body`` of each call: a declared ``Content-Length`` over
it fails as soon as the header block ends, and a chunked or close-delimited
body fails as soon as it crosses it, so the pool never holds more than the
bound plus one read.

Errors. Everything raised is a :class:`TransportError`, a
:class:`~hansa.protocol.errors.HansaError` carrying an ``ErrorCode``::

    TransportError       UNAVAILABLE
    ├── InvalidEndpoint  INVALID_FIELD  a bad URL, path or content type (before any I/O)
    ├── ConnectFailed    UNAVAILABLE    no response started: retry
    ├── BadResponse      MALFORMED, or TOO_LARGE over a bound: do not retry
    └── PoolClosed       UNAVAILABLE    the pool was closed

Third-party exceptions (``OSError``, ``ssl.SSLError``, ``httptools``'
parser errors) are translated where they arise and kept as ``__cause__``.
The fan-out must tell two kinds apart: :class:`ConnectFailed` (refused,
reset, DNS, TLS handshake, connect timeout, or a connection closed by the
server before any response byte: on a reused keep-alive connection almost
always the server timing it out as the request crossed it, on a fresh one a
server that dropped the request; the fan-out retries these, as it did under
aiohttp, and a Hansa node answers a re-sent envelope with the answer it
already released rather than twice, spec §8.3) and :class:`BadResponse` (a reply that is
malformed, truncated or too large; not retried). Stale keep-alive connections whose close the
event loop has already seen are skipped when a connection is taken from the
idle stack, so the usual case of a server's idle timeout is transparent;
only the race in which the server closes while the request is on its way
surfaces, as :class:`ConnectFailed`.

Cancellation. The fan-out cancels the tasks still pending at its deadline. A
request cancelled while it waits for a slot leaves the queue; one cancelled
while connecting or awaiting its reply closes that connection (it is never
returned to the pool, its state being unknown) and frees the slot. A
connection the pool gives up is aborted, never closed gracefully: its socket
is gone at once even if the peer never reads or never answers a TLS
``close_notify``, so ``limit`` bounds the sockets really open.
:meth:`HttpPool.close` closes every connection, fails in-flight requests and
queued waiters with :class:`PoolClosed`, and is idempotent.

Limits (deliberate). No proxies, no redirects (a 3xx is returned as is), no
compression (``Accept-Encoding: identity`` is sent and a reply with another
``Content-Encoding`` or a ``Transfer-Encoding`` other than ``chunked`` is a
:class:`BadResponse`), no cookies, no authentication, no request streaming
and no HTTP/2: a Hansa node answers plain msgpack envelopes over HTTP/1.1
(spec §10). URLs
must be ASCII (IDNs in punycode). There is no per-request read timeout: the
caller bounds a request (the fan-out's deadline cancels it). A pool belongs
to one event loop.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from hansa.protocol.errors import ConfigError, ErrorCode, HansaError

__all__ = [
    "DEFAULT_KEEPALIVE_S",
    "DEFAULT_LIMIT",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_INTERIM_RESPONSES",
    "BadResponse",
    "ConnectFailed",
    "Endpoint",
    "HttpPool",
    "InvalidEndpoint",
    "PoolClosed",
    "Response",
    "TransportError",
]

DEFAULT_LIMIT: Final = 512
"""Most open connections of a pool (idle, busy and connecting), by default."""
DEFAULT_KEEPALIVE_S: Final = 15.0
"""An idle connection older than this is closed instead of reused (aiohttp's
client default; servers commonly time idle connections out after 15 to 75 s)."""
MAX_HEAD_BYTES: Final = 64 * 1024
"""Default bound on the bytes of a reply's header block, interim replies included."""
MAX_HEADERS: Final = 100
"""Default bound on the header fields of a reply, interim replies included."""
MAX_INTERIM_RESPONSES: Final = 8
"""Most ``1xx`` interim responses skipped before a final one."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_FRAMING_PER_BODY_BYTE: Final = 8
"""Chunk framing allowed per body byte (a 1-byte chunk costs 6 bytes: ``1\r\nX\r\n``)."""
_BODY_PIECES: Final = 32
"""Body pieces kept as they came; any further ones are gathered into one ``bytearray``."""
_HEAD_CACHE_MAX: Final = 64
"""Request heads cached per endpoint (distinct path and content type pairs)."""
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_TARGET_CHARS: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"#"}
"""A request target is visible ASCII: no space, CR, LF or other control (no header injection)."""

# Header names (lowercased) the connection looks at; every other field is only counted.
_CONTENT_LENGTH: Final = 1
_CONTENT_TYPE: Final = 2
_TRANSFER_ENCODING: Final = 3
_CONTENT_ENCODING: Final = 4
_WATCHED: Final = {
    b"content-length": _CONTENT_LENGTH,
    b"content-type": _CONTENT_TYPE,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-encoding": _CONTENT_ENCODING,
}


class TransportError(HansaError):
    """An HTTP exchange with a peer failed; the subclass says how."""

    default_code = ErrorCode.UNAVAILABLE


class InvalidEndpoint(TransportError):
    """An endpoint URL, request path or content type is not acceptable."""

    default_code = ErrorCode.INVALID_FIELD


class ConnectFailed(TransportError):
    """No response could be started: safe for the caller to retry.

    Refused, reset, DNS failure, TLS handshake failure, connect timeout, or a
    connection closed by the server before any response byte.
    """

    default_code = ErrorCode.UNAVAILABLE


class BadResponse(TransportError):
    """The server replied with something that is not an acceptable HTTP response.

    Malformed, truncated, or over a size bound (``code`` is then
    :attr:`~hansa.protocol.errors.ErrorCode.TOO_LARGE`). Not retried.
    """

    default_code = ErrorCode.MALFORMED


class PoolClosed(TransportError):
    """The pool was closed before or while the request ran."""

    default_code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Response:
    """A final HTTP response, body complete.

    Attributes:
        status: the status code (200..999; interim 1xx responses are skipped).
        body: the whole body (never more than the request's ``max_body``).
        content_type: the ``Content-Type`` field value, or None when absent.
    """

    status: int
    body: bytes
    content_type: str | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a peer listens: ``scheme://host[:port][/base]``, validated once.

    Build one with :meth:`parse` (or :meth:`HttpPool.endpoint`, which caches);
    constructing it directly validates the fields the same way.

    Attributes:
        scheme: ``"http"`` or ``"https"``.
        host: the host name (lowercase ASCII) or IP address literal, no brackets.
        port: the TCP port (1..65535).
        base_path: a prefix of every request path, ``""`` or ``"/..."`` without a
            trailing slash.
    """

    scheme: str
    host: str
    port: int
    base_path: str = ""
    origin: str = field(init=False, repr=False)
    """The pool key: connections are shared by endpoints of one origin."""
    host_header: bytes = field(init=False, repr=False)
    """The ``Host`` field value (RFC 9112 §3.2): host, with the port when not the default."""
    _post_heads: dict[tuple[str, str], bytes] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _get_heads: dict[str, bytes] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.scheme not in _DEFAULT_PORTS:
            raise InvalidEndpoint(f"endpoint scheme must be http or https, not {self.scheme!r}")
        literal = _host_literal(self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidEndpoint(f"endpoint port must be an integer, not {self.port!r}")
        if not 0 < self.port < 65536:
            raise InvalidEndpoint(f"endpoint port {self.port} is not in 1..65535")
        if self.base_path and (
            not self.base_path.startswith("/")
            or self.base_path.endswith("/")
            or not _TARGET_CHARS.issuperset(self.base_path)
            or "?" in self.base_path
        ):
            raise InvalidEndpoint(f"endpoint base path {self.base_path!r} is not a plain /path")
        hostport = literal if self.port == _DEFAULT_PORTS[self.scheme] else f"{literal}:{self.port}"
        object.__setattr__(self, "origin", f"{self.scheme}://{literal}:{self.port}")
        object.__setattr__(self, "host_header", hostport.encode("ascii"))

    @property
    def tls(self) -> bool:
        """Whether the endpoint is reached over TLS (``https``)."""
        return self.scheme == "https"

    @property
    def url(self) -> str:
        """The endpoint as a URL (normalised: lowercase host, no default port)."""
        return f"{self.scheme}://{self.host_header.decode('ascii')}{self.base_path}"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse and validate an endpoint URL such as ``https://city.example:8443/hansa``.

        Args:
            url: ``http`` or ``https`` URL with a host, an optional port and an
                optional base path; no user info, query or fragment; ASCII only.

        Returns:
            The validated endpoint.

        Raises:
            InvalidEndpoint: the URL is not of that form.
        """
        if not url:
            raise InvalidEndpoint("endpoint URL is empty")
        # urlsplit silently drops tabs and newlines and strips spaces: refuse them first.
        if not _TARGET_CHARS.issuperset(url.replace("#", "")):
            raise InvalidEndpoint(f"endpoint URL {url!r} has spaces, controls or non-ASCII")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidEndpoint(f"endpoint URL {url!r} is malformed: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise InvalidEndpoint(f"endpoint URL {url!r}: scheme must be http or https")
        if parts.username is not None or parts.password is not None:
            raise InvalidEndpoint(f"endpoint URL {url!r}: user info is not supported")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise InvalidEndpoint(f"endpoint URL {url!r}: no query or fragment allowed")
        host = parts.hostname
        if not host:
            raise InvalidEndpoint(f"endpoint URL {url!r} has no host")
        return cls(
            scheme,
            host,
            port if port is not None else _DEFAULT_PORTS[scheme],
            parts.path.rstrip("/"),
        )


_ENDPOINT_CACHE_SIZE: Final = 4096
_parse_cached = functools.lru_cache(maxsize=_ENDPOINT_CACHE_SIZE)(Endpoint.parse)


def _host_literal(host: str) -> str:
    """Return ``host`` as written in a Host field (IPv6 in brackets), or raise."""
    if not host:
        raise InvalidEndpoint("endpoint host is empty")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != host.lower() or not _HOST_CHARS.issuperset(host) or host.startswith((".", "-")):
            raise InvalidEndpoint(
                f"endpoint host {host!r} is not a lowercase ASCII name or an IP address"
            ) from None
        return host
    if address.version == 6:
        if "%" in host:  # a zone id has no meaning to a peer
            raise InvalidEndpoint(f"endpoint host {host!r}: IPv6 zone ids are not supported")
        return f"[{host}]"
    return host


def _check_target(path: str) -> None:
    if not path.startswith("/") or not _TARGET_CHARS.issuperset(path):
        raise InvalidEndpoint(f"request path {path!r} must start with / and be visible ASCII")


def _post_head(endpoint: Endpoint, path: str, content_type: str) -> bytes:
    """Build (and cache on the endpoint) a POST head up to the ``Content-Length`` value."""
    _check_target(path)
    if not content_type or not (content_type.isascii() and content_type.isprintable()):
        raise InvalidEndpoint(f"content type {content_type!r} must be printable ASCII")
    head = (
        f"POST {endpoint.base_path}{path} HTTP/1.1\r\n"
        f"Host: {endpoint.host_header.decode('ascii')}\r\n"
        f"Accept-Encoding: identity\r\nContent-Type: {content_type}\r\nContent-Length: "
    ).encode("ascii")
    if len(endpoint._post_heads) < _HEAD_CACHE_MAX:
        endpoint._post_heads[(path, content_type)] = head
    return head


def _get_head(endpoint: Endpoint, path: str) -> bytes:
    """Build (and cache on the endpoint) a whole GET request."""
    _check_target(path)
    head = (
        f"GET {endpoint.base_path}{path} HTTP/1.1\r\n"
        f"Host: {endpoint.host_header.decode('ascii')}\r\nAccept-Encoding: identity\r\n\r\n"
    ).encode("ascii")
    if len(endpoint._get_heads) < _HEAD_CACHE_MAX:
        endpoint._get_heads[path] = head
    return head


class _Halt(Exception):
    """Raised inside a parser callback to stop llhttp; the reason is in ``_Connection.error``."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response with llhttp.

    Per-response state is reset by :meth:`send`. The pool decides what happens
    to the connection once the request's future is done (``keep_alive``).
    """

    __slots__ = (
        "chunks",
        "complete",
        "content_type",
        "declared",
        "discarded",
        "error",
        "fed",
        "framed",
        "got_bytes",
        "head_done",
        "head_left",
        "headers",
        "idle",
        "idle_since",
        "interim",
        "keep_alive",
        "lost",
        "max_body",
        "origin",
        "parser",
        "pool",
        "reused",
        "size",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: HttpPool, origin: str) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.lost = False
        self.idle = False
        self.idle_since = 0.0
        self.discarded = False
        self.keep_alive = False
        self.reused = False
        self.max_body = 0
        self._reset()

    def _reset(self) -> None:
        self.chunks: list[bytes | bytearray] = []
        self.size = 0
        self.fed = 0
        self.status = 0
        self.content_type: bytes | None = None
        self.declared = -1
        self.framed = False
        self.head_done = False
        self.head_left = self.pool._max_head
        self.headers = 0
        self.interim = 0
        self.complete = False
        self.got_bytes = False
        self.error: TransportError | None = None

    # --- driven by the pool ------------------------------------------------------------

    def send(self, data: bytes, max_body: int, reused: bool) -> asyncio.Future[Response]:
        """Write one request; return the future of its response."""
        waiter: asyncio.Future[Response] = self.pool._loop_now().create_future()
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            # Nothing was sent: the caller may safely try again.
            waiter.set_exception(ConnectFailed("the connection closed before the request was sent"))
            return waiter
        self._reset()
        self.max_body = max_body
        self.reused = reused
        self.keep_alive = False
        self.waiter = waiter
        transport.write(data)
        return waiter

    def shut(self, error: TransportError | None = None) -> None:
        """Close now; fail the request in flight with ``error`` (when given)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if error is not None and not waiter.done():
                waiter.set_exception(error)
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; resolve or fail the request's future."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for (an idle connection, or a cancelled request): the
            # stream is out of step, so the connection can never be reused.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
            return
        try:
            if not self.got_bytes:
                self.got_bytes = True
                # llhttp's response parser also accepts RTSP/ and ICE/ status lines.
                if data[:5] != b"HTTP/"[: len(data)]:
                    self.error = BadResponse(f"not an HTTP response: {bytes(data[:40])!r}")
                    raise _Halt
            if self.head_done:
                self.parser.feed_data(data)
                self._check_framing(len(data))
            else:
                self._feed_head(data)
        except (_Halt, httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self.complete:
                error = self.error
                if error is None:
                    error = BadResponse(f"malformed HTTP response: {exc}")
                    error.__cause__ = exc
                self._fail(error)
                return
            # Bytes after a complete response (see on_message_begin): deliver it, drop the link.
            self.keep_alive = False
        if self.complete:
            self.waiter = None
            waiter.set_result(
                Response(
                    self.status,
                    b"".join(self.chunks),
                    None if self.content_type is None else self.content_type.decode("latin-1"),
                )
            )

    def _check_framing(self, fed: int) -> None:
        """Bound what a reply sends after its head besides body bytes.

        Chunk framing and trailer fields are not body, so ``max_body`` does not bound
        them, and llhttp (through httptools) gathers a trailer field's value in memory
        until it ends: without this a 200 MB trailer was held whole. Framing may take
        up to :data:`_FRAMING_PER_BODY_BYTE` bytes per body byte (tiny chunks) plus the
        head bound for trailers; checked after each read, so at most one read more.
        """
        self.fed += fed
        if self.fed - self.size > self.pool._max_head + _FRAMING_PER_BODY_BYTE * self.size:
            self.error = BadResponse(
                "response chunk framing or trailers over the limit", ErrorCode.TOO_LARGE
            )
            raise _Halt

    def _feed_head(self, data: bytes) -> None:
        """Feed bytes while the header block is incomplete, never more than ``head_left``."""
        left = self.head_left
        if len(data) <= left:
            self.head_left = left - len(data)
            self.parser.feed_data(data)
            return
        view = memoryview(data)
        self.head_left = 0
        self.parser.feed_data(view[:left])
        if not self.head_done:
            self.error = BadResponse(
                f"response header block over {self.pool._max_head} bytes", ErrorCode.TOO_LARGE
            )
            raise _Halt
        self.parser.feed_data(view[left:])

    def eof_received(self) -> bool | None:
        """Let the transport close (a half-closed HTTP/1.1 connection is useless)."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Complete a close-delimited body, or fail the request in flight."""
        self.lost = True
        self.keep_alive = False
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if waiter.done():
                return
            if self.head_done and not self.framed and not self.complete and exc is None:
                # RFC 9112 §6.3 rule 8: no Content-Length, not chunked: the body ends at close.
                waiter.set_result(
                    Response(
                        self.status,
                        b"".join(self.chunks),
                        None if self.content_type is None else self.content_type.decode("latin-1"),
                    )
                )
                return
            error: TransportError
            if not self.got_bytes and self.reused:
                error = ConnectFailed(
                    "the server closed the reused keep-alive connection before responding"
                )
            elif not self.got_bytes:
                # Reset before any reply byte: a connection failure (the fan-out retries
                # those). The request may have reached a handler; a Hansa node answers
                # a byte-identical resend with the answer it already released (§8.3).
                error = ConnectFailed("the server closed the connection without responding")
            else:
                error = BadResponse("the server closed the connection mid-response")
            error.__cause__ = exc
            waiter.set_exception(error)
        elif self.idle:
            self.pool._drop_idle(self)

    def _fail(self, error: TransportError) -> None:
        waiter = self.waiter
        self.waiter = None
        self.keep_alive = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """Refuse a second message after the final one (no pipelining was asked)."""
        if self.complete:
            raise _Halt

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count the field; keep the framing and content fields."""
        self.headers += 1
        if self.headers > self.pool._max_headers:
            self.error = BadResponse(
                f"response has more than {self.pool._max_headers} header fields",
                ErrorCode.TOO_LARGE,
            )
            raise _Halt
        kind = _WATCHED.get(name.lower())
        if kind is None:
            return
        if kind == _CONTENT_LENGTH:
            self.declared = int(value)  # llhttp has checked the digits and duplicates
            self.framed = True
        elif kind == _CONTENT_TYPE:
            self.content_type = value
        elif kind == _TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                self.error = BadResponse(f"unsupported Transfer-Encoding {value[:40]!r}")
                raise _Halt
            self.framed = True
        elif value.strip().lower() not in (b"identity", b""):
            self.error = BadResponse(f"unsupported Content-Encoding {value[:40]!r}")
            raise _Halt

    def on_headers_complete(self) -> None:
        """Check the status and the declared length before any body byte."""
        status = self.parser.get_status_code()
        if status < 100:
            # RFC 9110 §15: status codes are 100..599. llhttp accepts any three digits and
            # frames 000..099 like a final response (its Content-Length body is read), so
            # skipping it as an interim reply would prepend that body to the final one.
            self.error = BadResponse(f"invalid status code {status:03d}")
            raise _Halt
        if status < 200:
            if status == 101:
                self.error = BadResponse("101 Switching Protocols, but no upgrade was asked")
                raise _Halt
            self.interim += 1
            if self.interim > MAX_INTERIM_RESPONSES:
                self.error = BadResponse(
                    f"more than {MAX_INTERIM_RESPONSES} interim responses", ErrorCode.TOO_LARGE
                )
                raise _Halt
            # An interim response has no body; the fields were its own.
            self.content_type = None
            self.declared = -1
            self.framed = False
            return
        # 204 and 304 never have a body, whatever Content-Length says (RFC 9110 §8.6).
        if self.declared > self.max_body and status != 204 and status != 304:
            self.error = BadResponse(
                f"response declares {self.declared} body bytes, over the limit of {self.max_body}",
                ErrorCode.TOO_LARGE,
            )
            raise _Halt
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        """Collect a body piece, never past ``max_body``."""
        size = self.size + len(body)
        if size > self.max_body:
            self.error = BadResponse(
                f"response body over the limit of {self.max_body} bytes", ErrorCode.TOO_LARGE
            )
            raise _Halt
        self.size = size
        chunks = self.chunks
        if len(chunks) < _BODY_PIECES:
            chunks.append(body)  # the usual reply: one or a few pieces, joined once
        elif len(chunks) == _BODY_PIECES:
            chunks.append(bytearray(body))
        else:
            # Tiny chunks or a byte-by-byte trickle: every piece kept as its own bytes
            # object costs ~40 bytes besides its content (a 256 KiB body in 2-byte chunks
            # peaked at 16 MB, tests/test_transport_hostile.py; 0.6 MB so), so later
            # pieces go into one buffer and memory stays near max_body.
            chunks[-1] += body

    def on_message_complete(self) -> None:
        """Mark the final response complete and decide whether the connection is reusable."""
        if not self.head_done:
            return  # the end of an interim 1xx response
        self.complete = True
        parser = self.parser
        transport = self.transport
        # Reusable only if HTTP/1.1 without Connection: close, and the server did not answer
        # before taking the whole request (what it would read next is the rest of our body).
        self.keep_alive = (
            parser.should_keep_alive()
            and parser.get_http_version() == "1.1"
            and transport is not None
            and not transport.get_write_buffer_size()
        )


class HttpPool:
    """A bounded pool of keep-alive HTTP/1.1 connections (see the module docstring).

    Use it as an async context manager, or call :meth:`close`. A pool belongs
    to the event loop that first uses it.

    Args:
        limit: most open connections, idle, busy and connecting (>= 1).
        ssl: the TLS context for ``https`` endpoints; None uses
            :func:`ssl.create_default_context` (the system trust store).
            ``http`` endpoints never use TLS.
        connect_timeout: seconds for the TCP connect and TLS handshake
            together (None: the operating system's and asyncio's own bounds).
        keepalive_s: idle connections older than this are not reused.
        max_head: bound on a reply's header block, in bytes.
        max_headers: bound on a reply's header fields.

    Raises:
        ConfigError: a bound is not positive.
    """

    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_conns",
        "_idle",
        "_idle_lru",
        "_keepalive_s",
        "_limit",
        "_loop",
        "_max_head",
        "_max_headers",
        "_open",
        "_ssl",
        "_waiters",
    )

    def __init__(
        self,
        *,
        limit: int = DEFAULT_LIMIT,
        ssl: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        max_head: int = MAX_HEAD_BYTES,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        if limit < 1 or max_head < 1 or max_headers < 1 or keepalive_s <= 0:
            raise ConfigError("HttpPool limits must be positive")
        if connect_timeout is not None and connect_timeout <= 0:
            raise ConfigError("HttpPool connect_timeout must be positive or None")
        self._limit = limit
        self._ssl = ssl
        self._connect_timeout = connect_timeout
        self._keepalive_s = keepalive_s
        self._max_head = max_head
        self._max_headers = max_headers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = 0
        """Slots in use: open connections plus connects under way (and slots handed over)."""
        self._idle: dict[str, list[_Connection]] = {}
        self._idle_lru: dict[_Connection, None] = {}
        """Every idle connection, oldest first (dicts keep insertion order)."""
        self._conns: set[_Connection] = set()
        self._waiters: deque[tuple[str, asyncio.Future[_Connection | None]]] = deque()
        self._closed = False

    async def __aenter__(self) -> HttpPool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # --- public ------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Open connections plus connects under way (what ``limit`` bounds)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        """Keep-alive connections waiting for a request."""
        return len(self._idle_lru)

    @property
    def waiting(self) -> int:
        """Requests queued for a connection slot."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def endpoint(self, url: str) -> Endpoint:
        """Return the parsed :class:`Endpoint` of ``url``.

        Parsed endpoints are cached process-wide (:data:`_ENDPOINT_CACHE_SIZE`
        URLs, least recently used dropped), so a pool made per fan-out does not
        parse its cities' URLs again; endpoints are immutable values (their
        request-head caches are derived data), so sharing them is safe.

        Args:
            url: see :meth:`Endpoint.parse`.

        Returns:
            The endpoint (the same object for the same string while cached).

        Raises:
            InvalidEndpoint: the URL is not an acceptable endpoint.
        """
        return _parse_cached(url)

    async def post(
        self, endpoint: Endpoint, path: str, body: bytes, content_type: str, *, max_body: int
    ) -> Response:
        """POST ``body`` to ``endpoint.base_path + path``; return the final response.

        Args:
            endpoint: where to send it.
            path: the path under the endpoint's base path, starting with ``/``
                (a query string may follow); visible ASCII.
            body: the request body, sent with a ``Content-Length``.
            content_type: the ``Content-Type`` of ``body``.
            max_body: most response body bytes accepted.

        Returns:
            The response (any status: the caller judges it).

        Raises:
            InvalidEndpoint: ``path`` or ``content_type`` is not acceptable.
            ConnectFailed: no response could be started (retry is safe).
            BadResponse: the response is malformed, truncated or too large.
            PoolClosed: the pool is or was closed meanwhile.
        """
        head = endpoint._post_heads.get((path, content_type))
        if head is None:
            head = _post_head(endpoint, path, content_type)
        return await self._exchange(endpoint, b"%b%d\r\n\r\n%b" % (head, len(body), body), max_body)

    async def get(self, endpoint: Endpoint, path: str, *, max_body: int) -> Response:
        """GET ``endpoint.base_path + path``; return the final response.

        Args:
            endpoint: where to send it.
            path: as for :meth:`post`.
            max_body: most response body bytes accepted.

        Returns:
            The response (any status).

        Raises:
            InvalidEndpoint: ``path`` is not acceptable.
            ConnectFailed: no response could be started (retry is safe).
            BadResponse: the response is malformed, truncated or too large.
            PoolClosed: the pool is or was closed meanwhile.
        """
        request = endpoint._get_heads.get(path)
        if request is None:
            request = _get_head(endpoint, path)
        return await self._exchange(endpoint, request, max_body)

    async def close(self) -> None:
        """Close every connection; fail in-flight and queued requests with PoolClosed.

        Idempotent. Requests made afterwards raise :class:`PoolClosed`.
        """
        if self._closed:
            return
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(PoolClosed("the connection pool was closed"))
        self._idle.clear()
        self._idle_lru.clear()
        conns, self._conns = self._conns, set()
        for conn in conns:
            conn.idle = False
            if not conn.discarded:
                conn.discarded = True
                self._open -= 1
            conn.shut(PoolClosed("the connection pool was closed during the request"))
        if conns:
            await asyncio.sleep(0)  # let the transports report connection_lost

    # --- the request path ---------------------------------------------------------------

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _check_open(self) -> None:
        # A call, not an inline test: the pool may close across an await.
        if self._closed:
            raise PoolClosed("the connection pool is closed")

    async def _exchange(self, endpoint: Endpoint, request: bytes, max_body: int) -> Response:
        self._check_open()
        conn = None
        stack = self._idle.get(endpoint.origin)
        if stack:
            conn = self._pop_idle(stack)
        reused = conn is not None
        if conn is None:
            conn, reused = await self._acquire(endpoint)
            if self._closed:  # closed while this request waited or connected
                self._discard(conn)
                raise PoolClosed("the connection pool was closed")
        try:
            response = await conn.send(request, max_body, reused)
        except BaseException:
            # Failed, or cancelled mid-request: the connection's state is unknown.
            self._discard(conn)
            raise
        if conn.keep_alive and not self._closed:
            self._release(conn)
        else:
            self._discard(conn)
        return response

    def _pop_idle(self, stack: list[_Connection]) -> _Connection | None:
        """Take the most recent usable idle connection of one origin, closing stale ones."""
        cutoff = self._loop_now().time() - self._keepalive_s
        while stack:
            conn = stack.pop()
            del self._idle_lru[conn]
            conn.idle = False
            transport = conn.transport
            if (
                not conn.lost
                and conn.idle_since >= cutoff
                and transport is not None
                and not transport.is_closing()
            ):
                return conn
            self._discard(conn)
        return None

    async def _acquire(self, endpoint: Endpoint) -> tuple[_Connection, bool]:
        """Get a slot (or a handed-over connection) and open a connection in it."""
        if self._open < self._limit:
            self._open += 1
        elif self._idle_lru:
            # At the limit: the least recently used idle connection gives up its slot.
            self._evict(next(iter(self._idle_lru)))
        else:
            fut: asyncio.Future[_Connection | None] = self._loop_now().create_future()
            self._waiters.append((endpoint.origin, fut))
            try:
                handed = await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # Granted, then cancelled before running: give it back.
                    granted = fut.result()
                    if granted is None:
                        self._free_slot()
                    else:
                        self._release(granted)
                raise
            if handed is not None:
                return handed, True
        return await self._connect(endpoint), False

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        """Open a connection in a slot already counted; free the slot on failure."""
        try:
            self._check_open()
        except PoolClosed:
            self._free_slot()
            raise
        loop = self._loop_now()
        conn = _Connection(self, endpoint.origin)
        context: ssl.SSLContext | None = None
        if endpoint.tls:
            context = self._ssl
            if context is None:
                context = self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout):  # None: no limit
                await loop.create_connection(
                    lambda: conn,
                    endpoint.host,
                    endpoint.port,
                    ssl=context,
                    server_hostname=endpoint.host if context is not None else None,
                )
        except (OSError, ValueError) as exc:
            # OSError covers refused, reset, DNS (gaierror), TLS (SSLError) and timeouts.
            self._free_slot()
            if conn.transport is not None:
                conn.transport.abort()
            reason = str(exc) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {endpoint.url}: {reason}") from exc
        except BaseException:
            self._free_slot()
            if conn.transport is not None:
                conn.transport.abort()
            raise
        if self._closed:
            self._free_slot()
            conn.shut()
            raise PoolClosed("the connection pool was closed while connecting")
        self._conns.add(conn)
        return conn

    # --- slots and idle connections -----------------------------------------------------

    def _release(self, conn: _Connection) -> None:
        """Return a reusable connection: to the first waiter, or to its idle stack."""
        if self._closed:
            self._discard(conn)
            return
        waiters = self._waiters
        while waiters:
            origin, fut = waiters.popleft()
            if fut.done():
                continue  # cancelled while queued
            if origin == conn.origin:
                fut.set_result(conn)
            else:
                # FIFO: the first waiter wants another origin; it gets this slot.
                self._forget(conn)
                fut.set_result(None)
            return
        conn.idle = True
        conn.idle_since = self._loop_now().time()
        stack = self._idle.get(conn.origin)
        if stack is None:
            self._idle[conn.origin] = [conn]
        else:
            stack.append(conn)
        self._idle_lru[conn] = None

    def _drop_idle(self, conn: _Connection) -> None:
        """An idle connection was closed by its server: forget it, free its slot."""
        conn.idle = False
        self._idle_lru.pop(conn, None)
        stack = self._idle.get(conn.origin)
        if stack is not None and conn in stack:
            stack.remove(conn)
            if not stack:
                del self._idle[conn.origin]
        self._discard(conn)

    def _evict(self, conn: _Connection) -> None:
        """Close an idle connection whose slot the caller takes over."""
        del self._idle_lru[conn]
        conn.idle = False
        stack = self._idle[conn.origin]
        stack.remove(conn)
        if not stack:
            del self._idle[conn.origin]
        self._forget(conn)

    def _forget(self, conn: _Connection) -> bool:
        """Close a connection and stop tracking it; True if it still held a slot."""
        if conn.discarded:
            return False
        conn.discarded = True
        self._conns.discard(conn)
        # abort(), not close(): a graceful close keeps the socket open until the peer has
        # read our unsent request bytes (a peer that never reads: forever) and, over TLS,
        # until the peer answers our close_notify (asyncio waits up to 30 s). A hostile
        # peer could so hold any number of sockets the pool no longer counts against
        # ``limit`` (and that close() no longer reaches). HTTP framing is explicit, so
        # dropping a connection we are done with loses nothing.
        if conn.transport is not None:
            conn.transport.abort()
        return True

    def _discard(self, conn: _Connection) -> None:
        """Close a connection that is not idle and free its slot (once)."""
        if self._forget(conn):
            self._free_slot()

    def _free_slot(self) -> None:
        """A slot is free: hand it to the first live waiter, or count it free."""
        waiters = self._waiters
        while waiters:
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._open -= 1
