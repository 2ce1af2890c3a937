"""httpx on anyio-asyncssl: an httpcore network backend, a transport, a client factory.

Needs the ``httpx`` extra (``pip install 'anyio-asyncssl[httpx]'``): httpx,
httpcore and h2 are imported by this module only.

Theory of operation
-------------------
httpx sends every request through an httpcore connection pool, and the pool
does its I/O through a *network backend*: ``connect_tcp`` or
``connect_unix_socket`` give a network stream, and for ``https://`` the pool
calls ``stream.start_tls(ssl_context, server_hostname, timeout)``.
:class:`AsyncTLSBackend` is such a backend on anyio (so it runs on asyncio
and on trio); its ``start_tls`` does the handshake with
:meth:`AsyncTLSStream.wrap() <anyio_asyncssl.stream.AsyncTLSStream.wrap>`,
so OpenSSL's async mode, the native socket path and private-key offload all
apply to httpx's connections.

*Why httpcore's ``ssl_context`` is ignored.*  httpcore hands ``start_tls`` a
stdlib :class:`ssl.SSLContext`, which cannot drive our connections (its
``SSL_CTX`` is not reachable).  The backend is configured instead with a
:class:`~anyio_asyncssl.TLSContext` for origins (``verify=``/``cert=``) and,
optionally, one for HTTPS proxies (``proxy_verify=``).  To tell the two
apart, the backend owns two tiny stdlib contexts, :attr:`AsyncTLSBackend.ssl_context`
and :attr:`AsyncTLSBackend.proxy_ssl_context`, that carry no settings: they
only mark which of our contexts a ``start_tls`` call is for.
:class:`AsyncTLSTransport` passes them to httpcore as its ``ssl_context``
and ``proxy_ssl_context``; any other stdlib context (httpcore's default, or
one given to httpcore directly) means the origin context.  Nothing of the
stdlib context (CAs, ALPN, ciphers) is used.

*How ALPN is set.*  httpcore chooses HTTP/2 when
``get_extra_info("ssl_object").selected_alpn_protocol() == "h2"``, after it
has set ALPN on its stdlib context.  We set ALPN on *our* context instead:
``["h2", "http/1.1"]`` with HTTP/2 and HTTP/1.1 on, ``["h2"]`` with HTTP/2
only, ``["http/1.1"]`` without HTTP/2.  An HTTPS proxy is always offered
``["http/1.1"]`` (httpcore talks to proxies over HTTP/1.1 only).  This is
the one change made to a :class:`~anyio_asyncssl.TLSContext` you pass in:
the list is set when the backend is made, and again before a connection if
something else changed it (the last setter wins for a context shared by
clients with different HTTP versions; ALPN is read from the context when a
connection is created).

*How errors map.*  As httpcore's own anyio backend maps them, so that
httpx raises the exceptions it raises with the stdlib:

* ``connect_tcp``/``connect_unix_socket``: a timeout is ``ConnectTimeout``;
  ``OSError`` and ``anyio.BrokenResourceError`` are ``ConnectError``.
* ``start_tls``: a timeout is ``ConnectTimeout``; any ``ssl.SSLError`` (our
  :class:`~anyio_asyncssl.TLSError`, including
  :class:`~anyio_asyncssl.CertificateVerifyError`, whose message reads
  ``certificate verify failed: ...``), ``anyio.BrokenResourceError``,
  ``anyio.EndOfStream``, ``anyio.ClosedResourceError`` and ``OSError`` are
  ``ConnectError``; the transport stream is closed.
* ``read``/``write``: a timeout is ``ReadTimeout``/``WriteTimeout``;
  ``anyio.BrokenResourceError``, ``anyio.ClosedResourceError``,
  ``anyio.EndOfStream`` (write) and ``OSError`` (which includes a TLS alert
  received mid-stream) are ``ReadError``/``WriteError``.  A clean end of
  stream reads as ``b""``.  (httpcore's own backend does not map
  ``ssl.SSLError`` here: with the stdlib on asyncio, an alert read after the
  handshake, e.g. a TLS 1.3 server refusing the client certificate, escapes
  httpx as a bare ``ssl.SSLError``; here it is ``httpx.ReadError``.)

httpx's transport turns each httpcore exception into its httpx namesake
(``httpx.ConnectError`` etc.) with the same message.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import ssl
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute

try:
    import httpcore
    import httpx
except ImportError as exc:  # pragma: no cover - tested in a child process
    raise ImportError(
        "anyio_asyncssl.httpx needs httpx and httpcore: "
        "pip install 'anyio-asyncssl[httpx]'") from exc

from .context import TLSContext, create_default_context, require_tls_context
from .offload import Offload
from .stream import AsyncTLSStream

__all__ = [
    "AsyncTLSBackend",
    "AsyncTLSNetworkStream",
    "AsyncTLSTransport",
    "CertTypes",
    "VerifyTypes",
    "create_async_client",
]

#: what ``verify=`` (and ``proxy_verify=``) accept
VerifyTypes = TLSContext | str | os.PathLike[str] | bool
#: a PEM file with the key and chain, or ``(certfile, keyfile)``
CertTypes = str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]
#: as httpcore's ``SOCKET_OPTION``
SocketOption = (tuple[int, int, int] | tuple[int, int, bytes | bytearray]
                | tuple[int, int, None, int])
ProxyTypes = str | httpx.URL | httpx.Proxy

_HTTP11 = ("http/1.1",)


def _alpn_for(http1: bool, http2: bool) -> tuple[str, ...]:
    if http2:
        return ("h2", "http/1.1") if http1 else ("h2",)
    return _HTTP11


def _ensure_alpn(ctx: TLSContext, protocols: tuple[str, ...]) -> None:
    # set only when it differs: every set is recorded by the context
    wanted = tuple(p.encode("ascii") for p in protocols)
    if ctx.alpn_protocols != wanted:
        ctx.set_alpn_protocols(protocols)


@contextlib.contextmanager
def _map_exceptions(mapping: Mapping[type[BaseException], type[Exception]]) -> Iterator[None]:
    """httpcore's ``map_exceptions``: the first matching entry (in order) wins."""
    try:
        yield
    except Exception as exc:
        for from_exc, to_exc in mapping.items():
            if isinstance(exc, from_exc):
                raise to_exc(exc) from exc
        raise


def _is_socket_readable(sock: Any) -> bool:
    """Whether ``sock`` has data or EOF waiting (httpcore's check, for idle connections).

    ``None`` or a closed socket counts as readable: the connection is gone.
    """
    if sock is None:
        return True
    fd = sock.fileno()
    if fd == -1:
        return True
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        ready, _, _ = select.select([fd], [], [], 0)
        return bool(ready)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class AsyncTLSNetworkStream(httpcore.AsyncNetworkStream):
    """An httpcore network stream over an anyio byte stream (plain or TLS).

    Made by :class:`AsyncTLSBackend`; ``start_tls`` wraps it with
    :class:`~anyio_asyncssl.stream.AsyncTLSStream`.  Errors: see the module's
    theory of operation.
    """

    def __init__(self, stream: anyio.abc.ByteStream, backend: AsyncTLSBackend) -> None:
        self._stream = stream
        self._backend = backend

    @property
    def stream(self) -> anyio.abc.ByteStream:
        """The anyio stream underneath (an ``AsyncTLSStream`` after ``start_tls``)."""
        return self._stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at the end of the stream.

        Raises ``httpcore.ReadTimeout`` after ``timeout`` seconds and
        ``httpcore.ReadError`` if the connection (or its TLS) broke.
        """
        exc_map: dict[type[BaseException], type[Exception]] = {
            TimeoutError: httpcore.ReadTimeout,
            anyio.BrokenResourceError: httpcore.ReadError,
            anyio.ClosedResourceError: httpcore.ReadError,
            anyio.EndOfStream: httpcore.ReadError,
            OSError: httpcore.ReadError,
        }
        with _map_exceptions(exc_map), anyio.fail_after(timeout):
            try:
                return await self._stream.receive(max_bytes=max_bytes)
            except anyio.EndOfStream:
                return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send all of ``buffer``.

        Raises ``httpcore.WriteTimeout`` after ``timeout`` seconds and
        ``httpcore.WriteError`` if the connection (or its TLS) broke.
        """
        if not buffer:
            return
        exc_map: dict[type[BaseException], type[Exception]] = {
            TimeoutError: httpcore.WriteTimeout,
            anyio.BrokenResourceError: httpcore.WriteError,
            anyio.ClosedResourceError: httpcore.WriteError,
            anyio.EndOfStream: httpcore.WriteError,
            OSError: httpcore.WriteError,
        }
        with _map_exceptions(exc_map), anyio.fail_after(timeout):
            await self._stream.send(bytes(buffer))

    async def aclose(self) -> None:
        """Close the stream (without a TLS close_notify: ``standard_compatible=False``)."""
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncTLSNetworkStream:
        """Do a TLS handshake over this stream with the backend's :class:`TLSContext`.

        ``ssl_context`` only selects the context: the backend's
        :attr:`~AsyncTLSBackend.proxy_ssl_context` means the proxy context,
        anything else the origin context (see the module docstring).
        ``server_hostname`` is verified and sent as SNI.  Works over a TLS
        stream too (TLS in TLS, for HTTPS proxies).

        Raises ``httpcore.ConnectTimeout`` after ``timeout`` seconds and
        ``httpcore.ConnectError`` for any TLS failure (certificate
        verification included) or a broken transport; this stream is then
        closed.
        """
        ctx, alpn = self._backend._context_for(ssl_context)
        exc_map: dict[type[BaseException], type[Exception]] = {
            TimeoutError: httpcore.ConnectTimeout,
            anyio.BrokenResourceError: httpcore.ConnectError,
            anyio.ClosedResourceError: httpcore.ConnectError,
            anyio.EndOfStream: httpcore.ConnectError,
            OSError: httpcore.ConnectError,  # ssl.SSLError, so our TLSError, is one
        }
        with _map_exceptions(exc_map):
            try:
                with anyio.fail_after(timeout):
                    # no await between these two: the SSL object takes the
                    # context's ALPN list when wrap() creates it
                    _ensure_alpn(ctx, alpn)
                    tls = await AsyncTLSStream.wrap(
                        self._stream, context=ctx, server_side=False,
                        hostname=server_hostname, standard_compatible=False)
            except BaseException:
                await anyio.aclose_forcefully(self._stream)
                raise
        return AsyncTLSNetworkStream(tls, self._backend)

    def get_extra_info(self, info: str) -> Any:
        """What httpcore asks for, as its anyio backend answers it.

        ``"ssl_object"`` (our :class:`~anyio_asyncssl.TLSConnection`, with
        ``selected_alpn_protocol()``, ``version()``, ``cipher()``,
        ``getpeercert()``; ``None`` before ``start_tls``), ``"client_addr"``,
        ``"server_addr"``, ``"socket"`` (the kernel socket underneath, also
        in TLS in TLS), ``"is_readable"``; ``None`` for anything else.
        """
        s = self._stream
        if info == "ssl_object":
            return s.extra(TLSAttribute.ssl_object, None)
        if info == "client_addr":
            return s.extra(anyio.abc.SocketAttribute.local_address, None)
        if info == "server_addr":
            return s.extra(anyio.abc.SocketAttribute.remote_address, None)
        if info == "socket":
            return s.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if info == "is_readable":
            return _is_socket_readable(s.extra(anyio.abc.SocketAttribute.raw_socket, None))
        return None


class AsyncTLSBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend on anyio whose TLS is anyio-asyncssl's.

    ``context`` verifies origins (and carries the client certificate, if
    any); ``proxy_context`` verifies HTTPS proxies (without one, ``context``
    does, which works only with ``http2=False``: one context cannot hold
    two ALPN lists, so an HTTPS proxy's ``start_tls`` then raises
    ``httpcore.ConnectError``).  ALPN is set
    on both as the module docstring says.  Use it with httpcore directly as
    ``httpcore.AsyncConnectionPool(network_backend=backend,
    ssl_context=backend.ssl_context)`` (and ``proxy_ssl_context=
    backend.proxy_ssl_context`` for an HTTPS proxy), or through
    :class:`AsyncTLSTransport`.

    Raises ``ValueError`` if a context is a server-only one
    (``PROTOCOL_TLS_SERVER``) or if one context would need two ALPN lists,
    ``TypeError`` if one is not a :class:`TLSContext`.
    """

    def __init__(
        self,
        context: TLSContext,
        *,
        http1: bool = True,
        http2: bool = False,
        proxy_context: TLSContext | None = None,
    ) -> None:
        for name, c in (("context", context), ("proxy_context", proxy_context)):
            if c is None:
                continue
            _check_tls_context(c, name)
        if not (http1 or http2):
            raise ValueError("at least one of http1 and http2 must be enabled")
        self.context = context
        self.proxy_context = proxy_context
        self.alpn_protocols = _alpn_for(http1, http2)
        if proxy_context is context and self.alpn_protocols != _HTTP11:
            raise ValueError(
                "an HTTPS proxy is offered ALPN ['http/1.1'] and origins "
                f"{list(self.alpn_protocols)}: give the proxy its own TLSContext")
        #: marks start_tls calls for origins (pass as httpcore's ssl_context)
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        #: marks start_tls calls for an HTTPS proxy (httpcore's proxy_ssl_context)
        self.proxy_ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _ensure_alpn(self.context, self.alpn_protocols)
        if proxy_context is not None:
            _ensure_alpn(proxy_context, _HTTP11)

    def _context_for(self, marker: object) -> tuple[TLSContext, tuple[str, ...]]:
        if marker is not self.proxy_ssl_context:
            return self.context, self.alpn_protocols
        if self.proxy_context is not None:
            return self.proxy_context, _HTTP11
        if self.alpn_protocols == _HTTP11:
            return self.context, _HTTP11
        raise httpcore.ConnectError(
            "an HTTPS proxy needs AsyncTLSBackend(proxy_context=...) when HTTP/2 is on "
            "(the proxy is offered ALPN ['http/1.1'], origins ['h2', ...])")

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncTLSNetworkStream:
        """Open a TCP connection (anyio's happy eyeballs).

        Raises ``httpcore.ConnectTimeout`` after ``timeout`` seconds and
        ``httpcore.ConnectError`` if the connection cannot be made.
        """
        with _map_exceptions(_CONNECT_ERRORS), anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(host, port, local_host=local_address)
            _apply_socket_options(stream, socket_options)
        return AsyncTLSNetworkStream(stream, self)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncTLSNetworkStream:
        """Open a connection to a Unix socket (httpx's ``uds=``).

        Raises ``httpcore.ConnectTimeout`` after ``timeout`` seconds and
        ``httpcore.ConnectError`` if the connection cannot be made.
        """
        with _map_exceptions(_CONNECT_ERRORS), anyio.fail_after(timeout):
            stream = await anyio.connect_unix(path)
            _apply_socket_options(stream, socket_options)
        return AsyncTLSNetworkStream(stream, self)

    async def sleep(self, seconds: float) -> None:
        """``anyio.sleep`` (httpcore's retry back-off)."""
        await anyio.sleep(seconds)


_CONNECT_ERRORS: dict[type[BaseException], type[Exception]] = {
    TimeoutError: httpcore.ConnectTimeout,
    OSError: httpcore.ConnectError,
    anyio.BrokenResourceError: httpcore.ConnectError,
}


def _apply_socket_options(stream: anyio.abc.ByteStream,
                          options: Iterable[SocketOption] | None) -> None:
    if not options:
        return
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    for option in options:
        sock.setsockopt(*option)


def _check_tls_context(ctx: object, name: str) -> None:
    try:
        ctx = require_tls_context(ctx, name)
    except TypeError as exc:
        raise TypeError(f"{exc}; {name}= also takes a CA file or directory path, True "
                        "(the system CAs) or False (no verification)") from None
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ValueError(f"{name} is a server context (PROTOCOL_TLS_SERVER); "
                         "a client needs PROTOCOL_TLS_CLIENT (create_default_context())")


def _build_context(
    verify: VerifyTypes,
    cert: CertTypes | None,
    offload: Offload | None,
    trust_env: bool,
    name: str = "verify",
) -> TLSContext:
    """The client TLSContext for ``verify=``/``cert=``/``offload=`` (see create_async_client)."""
    if isinstance(verify, ssl.SSLContext) or not isinstance(
            verify, (TLSContext, str, os.PathLike, bool)):
        _check_tls_context(verify, name)
    if isinstance(verify, TLSContext):
        _check_tls_context(verify, name)
        if cert is not None:
            raise ValueError(
                "cert= cannot be combined with a TLSContext (it would change your "
                "context): call ctx.load_cert_chain(certfile, keyfile) yourself")
        if offload is not None and verify.offload is not offload:
            raise ValueError(
                "offload= applies to contexts this module builds; create your "
                "TLSContext with offload= instead")
        return verify
    ctx: TLSContext
    if verify is True:
        if trust_env and os.environ.get("SSL_CERT_FILE"):
            ctx = create_default_context(cafile=os.environ["SSL_CERT_FILE"], offload=offload)
        elif trust_env and os.environ.get("SSL_CERT_DIR"):
            ctx = create_default_context(capath=os.environ["SSL_CERT_DIR"], offload=offload)
        else:
            ctx = create_default_context(offload=offload)
    elif verify is False:
        ctx = TLSContext(ssl.PROTOCOL_TLS_CLIENT, offload=offload)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif os.path.isdir(verify):
        ctx = create_default_context(capath=verify, offload=offload)
    else:
        ctx = create_default_context(cafile=verify, offload=offload)
    if cert is not None:
        if isinstance(cert, tuple):
            certfile, keyfile = cert
            ctx.load_cert_chain(certfile, keyfile)
        elif isinstance(cert, (str, os.PathLike)):
            ctx.load_cert_chain(cert)
        else:
            raise TypeError("cert= must be a path (key and chain in one PEM file) "
                            "or a (certfile, keyfile) tuple")
    return ctx


def _as_proxy(proxy: ProxyTypes | None) -> httpx.Proxy | None:
    if proxy is None:
        return None
    p = httpx.Proxy(url=proxy) if isinstance(proxy, (str, httpx.URL)) else proxy
    if not isinstance(p, httpx.Proxy):
        raise TypeError(f"proxy must be a str, httpx.URL or httpx.Proxy, not {type(p).__name__}")
    if p.ssl_context is not None:
        raise TypeError(
            "httpx.Proxy(ssl_context=...) is a stdlib ssl.SSLContext, which cannot be used "
            "here: pass proxy_verify= (a TLSContext, a CA path or a bool) instead")
    return p


class AsyncTLSTransport(httpx.AsyncHTTPTransport):
    """httpx's ``AsyncHTTPTransport`` with its pool on :class:`AsyncTLSBackend`.

    Takes ``AsyncHTTPTransport``'s arguments, with these differences:

    * ``verify``: a :class:`~anyio_asyncssl.TLSContext` (used as is, except
      for its ALPN list), a CA file or directory path, ``True`` (system CAs;
      with ``trust_env``, ``SSL_CERT_FILE``/``SSL_CERT_DIR`` as httpx reads
      them) or ``False`` (no verification).  A stdlib ``ssl.SSLContext`` is
      refused with ``TypeError``.
    * ``cert``: a client certificate, loaded into the context this transport
      builds (not allowed with a TLSContext ``verify``: ``ValueError``).
    * ``offload``: an :class:`~anyio_asyncssl.Offload` for the contexts this
      transport builds (the client key's signatures then run on its workers).
    * ``proxy_verify``: how an HTTPS proxy is verified (same forms as
      ``verify``; httpx verifies proxies with its own defaults, not
      ``verify``).  ``httpx.Proxy(ssl_context=...)`` is refused
      (``TypeError``).
    * ``limits``: ``None`` means httpx's defaults.

    SOCKS proxies need the ``socksio`` package (``ImportError`` otherwise).
    ``http2=True`` needs ``h2`` (``ImportError``).  Errors while building the
    contexts propagate (``TLSFileNotFoundError`` for a missing CA or
    certificate file, ``TLSError`` for a bad one).  Requests raise httpx's
    own exceptions (``httpx.ConnectError`` for a failed handshake, etc.).
    """

    def __init__(
        self,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        proxy: ProxyTypes | None = None,
        uds: str | None = None,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[SocketOption] | None = None,
        *,
        offload: Offload | None = None,
        proxy_verify: VerifyTypes = True,
    ) -> None:
        if http2 and importlib.util.find_spec("h2") is None:
            raise ImportError("http2=True needs the h2 package: "
                              "pip install 'anyio-asyncssl[httpx]'")
        if limits is None:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        p = _as_proxy(proxy)
        context = _build_context(verify, cert, offload, trust_env)
        proxy_context: TLSContext | None = None
        if p is not None and p.url.scheme == "https":
            proxy_context = _build_context(proxy_verify, None, offload, trust_env,
                                           "proxy_verify")
        self.backend = AsyncTLSBackend(context, http1=http1, http2=http2,
                                       proxy_context=proxy_context)
        b = self.backend
        self._pool: httpcore.AsyncConnectionPool
        if p is None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=b.ssl_context,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                http1=http1,
                http2=http2,
                uds=uds,
                local_address=local_address,
                retries=retries,
                socket_options=socket_options,
                network_backend=b,
            )
        elif p.url.scheme in ("http", "https"):
            self._pool = httpcore.AsyncHTTPProxy(
                proxy_url=httpcore.URL(
                    scheme=p.url.raw_scheme,
                    host=p.url.raw_host,
                    port=p.url.port,
                    target=p.url.raw_path,
                ),
                proxy_auth=p.raw_auth,
                proxy_headers=p.headers.raw,
                ssl_context=b.ssl_context,
                proxy_ssl_context=b.proxy_ssl_context if p.url.scheme == "https" else None,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                http1=http1,
                http2=http2,
                socket_options=socket_options,
                network_backend=b,
            )
        elif p.url.scheme in ("socks5", "socks5h"):
            if importlib.util.find_spec("socksio") is None:
                raise ImportError("a SOCKS proxy needs the socksio package: "
                                  "pip install 'httpx[socks]'")
            self._pool = httpcore.AsyncSOCKSProxy(
                proxy_url=httpcore.URL(
                    scheme=p.url.raw_scheme,
                    host=p.url.raw_host,
                    port=p.url.port,
                    target=p.url.raw_path,
                ),
                proxy_auth=p.raw_auth,
                ssl_context=b.ssl_context,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                http1=http1,
                http2=http2,
                network_backend=b,
            )
        else:
            raise ValueError("Proxy protocol must be either 'http', 'https', 'socks5', or "
                             f"'socks5h', but got {p.url.scheme!r}.")

    @property
    def context(self) -> TLSContext:
        """The TLSContext used for origins."""
        return self.backend.context


def _environment_proxies() -> dict[str, str | None]:
    """The proxy mounts httpx derives from the environment (``HTTPS_PROXY``, ``NO_PROXY``...)."""
    from httpx._utils import get_environment_proxies

    return get_environment_proxies()


def create_async_client(
    *,
    verify: VerifyTypes = True,
    cert: CertTypes | None = None,
    http1: bool = True,
    http2: bool = False,
    offload: Offload | None = None,
    proxy: ProxyTypes | None = None,
    proxy_verify: VerifyTypes = True,
    limits: httpx.Limits | None = None,
    trust_env: bool = True,
    retries: int = 0,
    uds: str | None = None,
    local_address: str | None = None,
    socket_options: Iterable[SocketOption] | None = None,
    **client_kwargs: Any,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose connections use anyio-asyncssl's TLS.

    ``verify``, ``cert``, ``offload``, ``proxy_verify``: as for
    :class:`AsyncTLSTransport`; one TLSContext is built and shared by every
    transport of the client.  ``http1``, ``http2``, ``proxy``, ``limits``,
    ``retries``, ``uds``, ``local_address``, ``socket_options`` go to the
    transport.  ``trust_env`` goes to both: as with httpx, ``HTTP_PROXY``/
    ``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY`` are honoured when no
    ``proxy`` is given (each proxy gets an :class:`AsyncTLSTransport` mount),
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` choose the CAs for ``verify=True``,
    and httpx reads ``.netrc``.  Other keyword arguments (``timeout``,
    ``headers``, ``auth``, ``follow_redirects``, ``base_url``,
    ``event_hooks``, ``mounts``...) go to ``httpx.AsyncClient``; ``mounts``
    you give override the environment's.

    Not supported: ``transport=`` (``TypeError``: it would bypass this
    module), a stdlib ``ssl.SSLContext`` as ``verify`` (``TypeError``), a
    synchronous ``httpx.Client``.  With ``verify=True`` and
    ``trust_env=False``, OpenSSL itself still reads ``SSL_CERT_FILE``/
    ``SSL_CERT_DIR`` when it loads the system store.  Raises as
    :class:`AsyncTLSTransport` does for bad arguments or files.
    """
    if "transport" in client_kwargs:
        raise TypeError("create_async_client() builds the transport itself: use "
                        "AsyncTLSTransport(...) with httpx.AsyncClient(transport=...) instead")
    context = _build_context(verify, cert, offload, trust_env)
    proxy_map: dict[str, ProxyTypes | None] = {}
    if proxy is not None:
        proxy_map["all://"] = proxy
    elif trust_env:
        proxy_map.update(_environment_proxies())
    proxies = {key: _as_proxy(value) for key, value in proxy_map.items()}
    proxy_context: TLSContext | None = None
    if any(p is not None and p.url.scheme == "https" for p in proxies.values()):
        proxy_context = _build_context(proxy_verify, None, offload, trust_env, "proxy_verify")

    def transport(p: httpx.Proxy | None) -> AsyncTLSTransport:
        return AsyncTLSTransport(
            verify=context, http1=http1, http2=http2, limits=limits, proxy=p,
            uds=uds, local_address=local_address, retries=retries,
            socket_options=socket_options, trust_env=trust_env,
            proxy_verify=proxy_context if proxy_context is not None else True)

    main = transport(None)
    # as httpx: a None mount (NO_PROXY) sends the request to the main transport
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        key: None if p is None else transport(p) for key, p in proxies.items()}
    mounts.update(client_kwargs.pop("mounts", None) or {})
    return httpx.AsyncClient(transport=main, mounts=mounts, trust_env=trust_env,
                             http1=http1, http2=http2, **client_kwargs)
