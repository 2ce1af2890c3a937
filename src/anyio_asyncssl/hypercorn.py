"""Serve an ASGI app with hypercorn's trio worker on :class:`~anyio_asyncssl.trio.TrioTLSListener`.

Install with ``pip install 'anyio-asyncssl[hypercorn]'``.

Theory of operation
-------------------
hypercorn's trio worker (``hypercorn/trio/run.py``, ``worker_serve``, read
from hypercorn 0.18.0) wraps every secure socket in a ``trio.SSLListener``
built from ``Config.create_ssl_context()``, and there is no hook to replace
it.  :func:`serve` is therefore a copy of ``worker_serve``'s *structure*
(lifespan startup, one ``WorkerContext``, the listeners, the shutdown
triggers, ``graceful_timeout``, lifespan shutdown) that reuses hypercorn's
own pieces for everything else: ``Lifespan``, ``WorkerContext``,
``TCPServer``, ``raise_shutdown``, ``Config.create_sockets`` and the app
wrapping.  Only the listener differs: a :class:`TrioTLSListener` with
``https_compatible=True`` (as hypercorn's) over a :class:`TLSContext` that
:func:`tls_context_from_config` builds from the same ``Config`` fields, with
private-key operations offloaded.

hypercorn touches the TLS stream in ``hypercorn/trio/tcp_server.py``
(``TCPServer``, 0.18.0; the same in 0.17.0) only by duck typing, never ``isinstance``:
``run()`` calls ``do_handshake()`` (under ``ssl_handshake_timeout``),
``selected_alpn_protocol()`` and ``transport_stream.socket`` inside a
``try``/``except AttributeError`` that means "not TLS"; ``_close()`` calls
``send_eof()`` (which ``trio.SSLStream`` lacks) then ``aclose()``; the rest
is ``send_all``/``receive_some``/``aclose``.  :class:`TrioTLSStream` has all
of these, so the unchanged ``TCPServer`` serves it.  A small subclass,
:class:`_TLSTCPServer`, changes these things:

* it runs the handshake first, and closes the stream when it fails
  (hypercorn returns without closing it, leaving the socket to the garbage
  collector);
* ``_close()`` bounds ``send_eof()`` (ours sends close_notify, so a
  ``Connection: close`` response ends with a clean TLS closure) and closes
  the stream even when cancelled;
* a connection closed for being idle (how a graceful shutdown ends h2
  connections) also gets close_notify, and at shutdown an h2 stream's end
  waits until its END_STREAM is sent (hypercorn could send GOAWAY first,
  after which h2 sends nothing: curl 8.x reports a partial transfer);
* the app gets the ASGI TLS extension (``scope["extensions"]["tls"]``:
  TLS version, cipher suite, the client's certificate), which hypercorn does
  not provide.

Should a later hypercorn rename ``TCPServer._close``, the override is
simply unused and hypercorn's own closing still works with our stream.
QUIC (``config.quic_bind``) is not served: aioquic does its own TLS.

Offload settings may come from the ``Config`` too (e.g. in its TOML file,
since ``Config.from_mapping`` keeps unknown keys): ``asyncssl_offload``
(bool, default true), ``asyncssl_offload_workers`` (int) and
``asyncssl_offload_priority`` (``"low"``, ``"idle"`` or ``"normal"``).
Without workers or priority, the process-wide
:func:`~anyio_asyncssl.default_offload` is used.
"""

from __future__ import annotations

import re
import ssl
import warnings
from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from socket import socket
from typing import Any, Literal, cast

import trio

from .context import TLSContext
from .offload import Offload, WorkerPriority, default_offload
from .trio import TrioTLSListener, TrioTLSStream

try:
    from hypercorn.config import Config
    from hypercorn.events import Closed, Event
    from hypercorn.protocol.events import StreamClosed
    from hypercorn.trio.lifespan import Lifespan
    from hypercorn.trio.statsd import StatsdLogger
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import (
        AppWrapper,
        ASGIReceiveCallable,
        ASGISendCallable,
        ConnectionState,
        Framework,
        LifespanState,
        Scope,
    )
    from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "anyio_asyncssl.hypercorn needs hypercorn: pip install 'anyio-asyncssl[hypercorn]'"
    ) from exc


__all__ = ["serve", "tls_context_from_config"]

# How long _close waits to send close_notify (a peer that stopped reading
# can block it); the stream is closed either way.
_CLOSE_NOTIFY_TIMEOUT = 5.0

_TLS_VERSION_IDS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_PRIORITIES = ("low", "idle", "normal")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----",
                       re.DOTALL)


# -- the TLS context -----------------------------------------------------------------
def _offload_from_config(config: Config) -> tuple[Offload | None, bool]:
    """The offload the ``asyncssl_*`` settings ask for, and whether it is new (ours to close)."""
    enabled = getattr(config, "asyncssl_offload", True)
    if not isinstance(enabled, bool):
        raise TypeError(f"config.asyncssl_offload must be a bool, not {enabled!r}")
    workers = getattr(config, "asyncssl_offload_workers", None)
    priority = getattr(config, "asyncssl_offload_priority", None)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise TypeError(f"config.asyncssl_offload_workers must be an int, not {workers!r}")
    if priority is not None and priority not in _PRIORITIES:
        raise ValueError(f"config.asyncssl_offload_priority must be one of {_PRIORITIES}, "
                         f"not {priority!r}")
    if not enabled:
        return None, False
    if workers is None and priority is None:
        return default_offload(), False
    return Offload(workers, priority=cast(WorkerPriority, priority or "low")), True


def _check_verify_flags(flags: ssl.VerifyFlags | None) -> None:
    # TLSContext has no verify_flags; OpenSSL 3's default already trusts a
    # trust-store certificate first (VERIFY_X509_TRUSTED_FIRST)
    if flags is None:
        return
    accepted = ssl.VerifyFlags.VERIFY_DEFAULT | ssl.VerifyFlags.VERIFY_X509_TRUSTED_FIRST
    if ssl.VerifyFlags(flags) & ~accepted:
        raise ValueError(f"config.verify_flags={flags!r} is not supported by TLSContext "
                         "(only VERIFY_DEFAULT and VERIFY_X509_TRUSTED_FIRST)")


def _build_context(config: Config, offload: Offload | None) -> TLSContext:
    if not config.ssl_enabled:
        raise ValueError("config has no TLS certificate: set config.certfile and config.keyfile")
    _check_verify_flags(config.verify_flags)
    assert config.certfile is not None and config.keyfile is not None  # ssl_enabled
    # Config.create_ssl_context (hypercorn/config.py, 0.18.0), step by step
    ctx = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    # ssl.create_default_context(Purpose.CLIENT_AUTH) trusts the system store
    # for client certificates (used only when verify_mode asks for one)
    ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    ctx.set_ciphers(config.ciphers)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 7540 9.2
    # hypercorn assigns ``options = OP_NO_COMPRESSION``, which also clears the
    # stdlib's defaults (OP_NO_SSLv3, OP_CIPHER_SERVER_PREFERENCE,
    # OP_ENABLE_MIDDLEBOX_COMPAT, ...); TLSContext already disables
    # compression (RFC 7540 9.2.1) and keeps the others
    ctx.set_alpn_protocols(config.alpn_protocols)
    ctx.load_cert_chain(config.certfile, config.keyfile, password=config.keyfile_password)
    if config.ca_certs is not None:
        ctx.load_verify_locations(cafile=config.ca_certs)
    if config.verify_mode is not None:
        ctx.verify_mode = config.verify_mode
    return ctx


def tls_context_from_config(config: Config, offload: Offload | None = None) -> TLSContext:
    """A server :class:`TLSContext` equivalent to ``config.create_ssl_context()``.

    TLS >= 1.2, ``config.ciphers`` (TLS 1.2 suites), ALPN
    ``config.alpn_protocols`` (by default h2, then http/1.1), the
    certificate chain and key from ``config.certfile``/``config.keyfile``
    (``config.keyfile_password``), and client verification: ``config.verify_mode``
    against ``config.ca_certs`` *and* the system trust store, as hypercorn's
    ``ssl.create_default_context(Purpose.CLIENT_AUTH)`` does.  Compression
    is off; unlike hypercorn, the other default options (e.g. TLS 1.3
    middlebox compatibility) are kept.

    Private-key operations go to ``offload``; without it, to the offload the
    config's ``asyncssl_offload*`` settings describe (a new :class:`Offload`
    if they set workers or priority: the context keeps it alive, close it
    with ``ctx.offload.close()`` when done), else to
    :func:`~anyio_asyncssl.default_offload`; ``asyncssl_offload = false``
    means no offload.

    Raises ``ValueError`` when the config has no certfile/keyfile, for
    ``config.verify_flags`` beyond ``VERIFY_X509_TRUSTED_FIRST`` (not
    supported) or a bad ``asyncssl_offload_priority``; ``TypeError`` for
    badly typed ``asyncssl_*`` settings;
    :class:`~anyio_asyncssl.TLSFileNotFoundError` for a missing file and
    :class:`~anyio_asyncssl.TLSError` for a wrong password, a key that does
    not match, unusable ciphers or a bad ALPN list.
    """
    if offload is None:
        offload, _ = _offload_from_config(config)
    return _build_context(config, offload)


# -- the ASGI TLS extension ---------------------------------------------------------------
_RFC4514_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}
_cipher_ids: dict[str, int] | None = None


def _cipher_suite_id(name: str | None) -> int | None:
    """The IANA id of an OpenSSL cipher name (from the stdlib's cipher table), or None."""
    global _cipher_ids
    if name is None:
        return None
    if _cipher_ids is None:
        table = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            table.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        except ssl.SSLError:  # pragma: no cover - an OpenSSL without these keywords
            pass
        _cipher_ids = {c["name"]: int(c["id"]) & 0xFFFF for c in table.get_ciphers()}
    return _cipher_ids.get(name)


def _rfc4514_value(value: str) -> str:
    out = re.sub(r'([\\,+"<>;=])', r"\\\1", value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def _rfc4514(subject: Any) -> str:
    """A getpeercert() subject as an RFC 4514 string (last RDN first)."""
    return ",".join(
        "+".join(f"{_RFC4514_NAMES.get(k, k)}={_rfc4514_value(v)}" for k, v in rdn)
        for rdn in reversed(subject))


def _tls_extension(stream: TrioTLSStream[Any], server_cert: str | None) -> dict[str, Any]:
    """``scope["extensions"]["tls"]`` (ASGI TLS extension 0.2) for a handshaken stream."""
    version = stream.version()
    cipher = stream.cipher()
    chain: list[str] = []
    name: str | None = None
    leaf = stream.getpeercert(binary_form=True)
    if leaf:
        ders = [leaf] + [der for der in stream.ssl_object.get_unverified_chain() if der != leaf]
        chain = [ssl.DER_cert_to_PEM_cert(der) for der in ders]
        try:
            name = _rfc4514(stream.getpeercert().get("subject", ()))
        except Exception:  # an odd certificate must not take the connection down
            name = None
    return {
        "server_cert": server_cert,
        "client_cert_chain": chain,
        "client_cert_name": name,
        # OpenSSL ends the handshake when a requested certificate fails to verify
        "client_cert_error": None,
        "tls_version": _TLS_VERSION_IDS.get(version) if version else None,
        "cipher_suite": _cipher_suite_id(cipher[0] if cipher else None),
    }


def _first_pem_cert(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            match = _PEM_CERT.search(f.read())
    except OSError:  # pragma: no cover - load_cert_chain read it a moment ago
        return None
    return match.group(0).decode("ascii") + "\n" if match else None


class _TLSExtensionApp:
    """Adds the connection's TLS extension to every http and websocket scope."""

    def __init__(self, app: AppWrapper, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable, sync_spawn: Callable[..., Any],
                       call_soon: Callable[..., Any]) -> None:
        if scope["type"] in ("http", "websocket"):
            www = cast(dict[str, Any], scope)
            extensions = www.get("extensions")
            if extensions is None:
                www["extensions"] = extensions = {}
            # a copy per scope: an app may change its own
            chain = list(self.tls["client_cert_chain"])
            extensions["tls"] = {**self.tls, "client_cert_chain": chain}
        await self.app(scope, receive, send, sync_spawn, call_soon)


# -- the connection -------------------------------------------------------------------------
class _TLSTCPServer(TCPServer):
    """hypercorn's ``TCPServer`` for a :class:`TrioTLSStream` (see the module docstring).

    Mirrors ``TCPServer.run`` and ``TCPServer._close`` of
    ``hypercorn/trio/tcp_server.py`` as of hypercorn 0.18.0.
    """

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext,
                 state: LifespanState, stream: TrioTLSStream[trio.SocketStream],
                 server_cert: str | None) -> None:
        # hypercorn annotates ``stream`` as trio.SSLStream but duck-types it
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.tls_stream = stream
        self.server_cert = server_cert
        self._h2_held: object = None

    async def run(self) -> None:
        # TCPServer.run handshakes the same way but returns without closing
        # the stream when the handshake fails
        try:
            with trio.fail_after(self.config.ssl_handshake_timeout):
                await self.tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            await trio.aclose_forcefully(self.tls_stream)
            return
        self.app = _TLSExtensionApp(self.app, _tls_extension(self.tls_stream, self.server_cert))
        # finds the handshake done, reads ALPN and the socket, serves
        await super().run()

    async def _close(self) -> None:
        # TCPServer._close: send_eof() (AttributeError on trio.SSLStream, so
        # skipped there; close_notify here), then aclose().  Bounded, and
        # aclose() runs even if send_eof() is cancelled (graceful_timeout).
        # send_eof() sends, so it takes TCPServer's send lock like
        # protocol_send(): an h2 stream's task may be sending at that moment
        # (it got BusyResourceError, "Error in ASGI Framework").  The task
        # that already holds it (a send that broke, then Closed) goes on.
        try:
            with trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT):
                if self.send_lock.statistics().owner is trio.lowlevel.current_task():
                    await self.tls_stream.send_eof()
                else:
                    async with self.send_lock:
                        await self.tls_stream.send_eof()
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
            pass  # already gone
        finally:
            await self.tls_stream.aclose()

    async def _initiate_server_close(self) -> None:
        # TCPServer._initiate_server_close (an idle connection at shutdown or
        # after keep_alive_timeout: how h2 connections end in a graceful
        # shutdown) closes the stream directly, which with
        # https_compatible=True sends no close_notify; curl 8.x fails such a
        # transfer ("unexpected eof while reading").  Closed the same way as
        # _close(): with close_notify.  Called shielded, so bounded there.
        await self.protocol.handle(Closed())
        await self._close()

    async def protocol_send(self, event: Event) -> None:
        self._hold_h2_stream_ends()
        await super().protocol_send(event)

    def _hold_h2_stream_ends(self) -> None:
        # hypercorn's h2 stream (0.18.0, protocol/h2.py) ends when its send
        # task has taken the last chunk (drain()), perhaps before that task
        # sends END_STREAM; at shutdown the stream's end sends GOAWAY at once
        # (close_connection()), after which h2 refuses every frame, so
        # END_STREAM is never sent and the client sees a partial response
        # (curl 8.x: "Transferred a partial file").  The send task removes a
        # stream's buffer once END_STREAM is sent: at shutdown, a stream's end
        # waits for that (bounded).  Set up before the protocol's first
        # output, so before its first stream.
        inner = getattr(getattr(self, "protocol", None), "protocol", None)
        if inner is None or inner is self._h2_held:
            return
        buffers = getattr(inner, "stream_buffers", None)
        if not isinstance(buffers, dict):
            return  # HTTP/1.1
        self._h2_held = inner
        stream_send = inner.stream_send
        terminated = self.context.terminated

        async def held(event: Any) -> None:
            if isinstance(event, StreamClosed) and terminated.is_set():
                with trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT):
                    while event.stream_id in buffers and not inner.closed:
                        await trio.sleep(0.001)
            await stream_send(event)

        inner.stream_send = held


# -- serving -------------------------------------------------------------------------------
def _listen_sockets(config: Config) -> tuple[list[socket], list[socket]]:
    """(TLS sockets, plain sockets), listening, from ``config.create_sockets()``."""
    sockets = config.create_sockets()
    if config.ssl_enabled:
        secure, insecure = sockets.secure_sockets, sockets.insecure_sockets
    else:
        # serve(context=...) without config.certfile: hypercorn files the
        # binds as insecure; they are ours to serve over TLS
        secure, insecure = sockets.insecure_sockets, []
    for sock in [*secure, *insecure]:
        sock.listen(config.backlog)
    return secure, insecure


async def serve(
    app: Framework,
    config: Config,
    *,
    context: TLSContext | None = None,
    offload: Offload | None = None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    mode: Literal["asgi", "wsgi"] | None = None,
) -> None:
    """Serve ``app`` over TLS on ``config.bind`` until shut down, like ``hypercorn.trio.serve``.

    The TLS context is ``context`` if given, else
    :func:`tls_context_from_config` with ``offload`` (so ``config.certfile``
    and ``config.keyfile`` are required).  ``config.insecure_bind`` is served
    over plain TCP, as hypercorn does when the config has a certificate.
    With ``nursery.start(serve, ...)`` it returns the bound URLs (e.g.
    ``["https://127.0.0.1:8443"]``, the real port when binding port 0).

    Shutdown as in hypercorn: when ``shutdown_trigger()`` returns (or
    ``config.max_requests`` is reached, or on ``KeyboardInterrupt``) the
    listeners close, so new connections are refused; requests in flight get
    ``config.graceful_timeout`` seconds to finish, then their connections
    are cancelled; the app's lifespan shutdown runs and ``serve`` returns.
    An :class:`Offload` this function made (from ``asyncssl_offload_*``
    settings) is closed on return.

    The app sees the ASGI TLS extension (``scope["extensions"]["tls"]``).

    Raises ``ValueError`` for ``context`` together with ``offload``, a client
    context, a config without a certificate when no ``context`` is given,
    ``config.quic_bind`` (QUIC is not served), or ``config.insecure_bind``
    without ``config.certfile``/``keyfile``; the errors of
    :func:`tls_context_from_config`; ``OSError`` when a bind fails; and
    whatever the app's lifespan startup raises (hypercorn's
    ``LifespanFailureError``/``LifespanTimeoutError``).
    """
    if config.debug:
        warnings.warn("The config `debug` has no affect when using serve", Warning, stacklevel=2)
    if config.workers != 1:
        warnings.warn("The config `workers` has no affect when using serve", Warning,
                      stacklevel=2)
    if config.quic_bind:
        raise ValueError("config.quic_bind is not supported: aioquic does its own TLS "
                         "(use hypercorn.trio.serve for HTTP/3)")
    if config.insecure_bind and not config.ssl_enabled:
        raise ValueError("config.insecure_bind needs config.certfile and config.keyfile "
                         "(hypercorn's Config.create_sockets ignores it otherwise)")
    owned: Offload | None = None
    server_cert: str | None = None
    if context is None:
        if offload is None:
            offload, is_new = _offload_from_config(config)
            owned = offload if is_new else None
        try:
            context = _build_context(config, offload)
        except BaseException:
            if owned is not None:
                owned.close()
            raise
        assert config.certfile is not None
        server_cert = _first_pem_cert(config.certfile)
    elif offload is not None:
        raise ValueError("pass context= or offload=, not both (a context has its offload)")
    elif context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("context is a client context: use ssl.PROTOCOL_TLS_SERVER")
    try:
        await _worker_serve(wrap_app(app, config.wsgi_max_body_size, mode), config, context,
                            server_cert, shutdown_trigger, task_status)
    finally:
        if owned is not None:
            owned.close()


async def _worker_serve(
    app: AppWrapper,
    config: Config,
    tls_context: TLSContext,
    server_cert: str | None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """hypercorn/trio/run.py ``worker_serve`` (0.18.0) with our listener; no QUIC."""
    config.set_statsd_logger_class(StatsdLogger)

    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            secure, insecure = _listen_sockets(config)
            listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
            binds = []
            for sock in secure:
                listeners.append(TrioTLSListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    tls_context,
                    https_compatible=True,
                ))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"https://{bind}")
                await config.log.info(f"Running on https://{bind} (CTRL + C to quit)")
            for sock in insecure:
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"http://{bind}")
                await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")

            state = ConnectionState(lifespan_state.copy())

            async def handle(stream: trio.abc.Stream) -> None:
                if isinstance(stream, TrioTLSStream):
                    await _TLSTCPServer(app, config, context, state, stream, server_cert).run()
                else:
                    await TCPServer(app, config, context, state, stream).run()  # type: ignore[arg-type]

            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(partial(
                        trio.serve_listeners, handle, listeners, handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
