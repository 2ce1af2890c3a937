"""``asyncssl serve``: a TLS server (echo or HTTP) on anyio, offload on by default.

Theory of operation
-------------------
One anyio task group (trio or asyncio backend) holds: the listener's serve
loop (AsyncTLSListener over ``anyio.create_tcp_listener``, which binds
first, so the banner prints the addresses really bound, port 0 included),
a loop-lag ticker (stats.py), and a signal watcher: SIGINT or SIGTERM
cancels the group, every connection is closed, a summary is printed and the
process exits 0.  A connection's life is counted and, with ``-v``, logged
as one line (peer, version, cipher, duration, how it ended); a client that
hangs up, with or without close_notify, ends only its own connection.  A
failed or timed-out handshake goes to the listener's error handler, which
counts it by kind and closes the socket.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import AnyByteStream, SocketAttribute, TaskStatus
from anyio.streams.tls import TLSAttribute

from ..context import TLSContext
from ..errors import TLSError
from ..offload import Offload
from ..stream import AsyncTLSAttribute, AsyncTLSListener, AsyncTLSStream
from .apps import APPS
from .common import (
    KEY_TYPES,
    CLIError,
    add_password_options,
    fingerprint,
    format_address,
    generate,
    have_trio,
    load_key_pair,
    need_trio,
    port_number,
    positive_seconds,
    worker_count,
    write_file,
)
from .stats import ServerStats

#: how long a closing connection waits for the client's close_notify
CLOSE_TIMEOUT = 2.0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="TLS server (echo or HTTP), offload on",
                       description="A TLS server on anyio (trio or asyncio) whose private-key "
                       "operations run off the event loop.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=port_number, default=8443,
                   help="TCP port, 0 for any free one (default 8443)")
    s.add_argument("--backend", choices=("trio", "asyncio"), default=None,
                   help="event loop (default: trio if installed, else asyncio)")
    s.add_argument("--app", choices=sorted(APPS), default="echo",
                   help="echo (default), or http: a page and GET /stats as JSON")
    s.add_argument("--cert", metavar="PATH",
                   help="certificate chain (PEM); default: generate a self-signed one")
    s.add_argument("--key", metavar="PATH", help="private key (PEM), if not in --cert")
    add_password_options(s)
    s.add_argument("--key-type", choices=list(KEY_TYPES), default="rsa2048",
                   help="key of the generated certificate (default rsa2048)")
    s.add_argument("--hostname", default="localhost",
                   help="name in the generated certificate (default localhost)")
    s.add_argument("--write-cert", metavar="PATH",
                   help="write the generated certificate here (clients' --cafile)")
    s.add_argument("--write-key", metavar="PATH",
                   help="write the generated private key here (mode 0600)")
    s.add_argument("--workers", type=worker_count, default=None,
                   help="offload worker threads (default: one per CPU)")
    s.add_argument("--no-offload", action="store_true",
                   help="sign on the event loop's thread")
    s.add_argument("--alpn", help="comma-separated ALPN protocols to accept, in preference order")
    s.add_argument("--client-ca", metavar="PATH",
                   help="require client certificates issued by this CA (mTLS)")
    s.add_argument("--handshake-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="drop a client whose handshake takes longer (default 10)")
    s.add_argument("-v", "--verbose", action="store_true",
                   help="one line per connection: peer, version, cipher, duration")
    s.set_defaults(func=run)


def _log(message: str) -> None:
    print(f"asyncssl: {message}", file=sys.stderr, flush=True)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    if isinstance(exc, TLSError | ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return f"handshake:{(reason or type(exc).__name__).lower()}"
    if isinstance(exc, BrokenResourceError | EndOfStream | ClosedResourceError):
        return "handshake:disconnected"
    if isinstance(exc, OSError):
        return f"handshake:{errno.errorcode.get(exc.errno or 0, 'oserror').lower()}"
    return f"handshake:{type(exc).__name__.lower()}"


def _peer(stream: Any) -> str:
    addr = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(addr, tuple):
        return format_address(str(addr[0]), int(addr[1]))
    return str(addr) if addr else "?"


@dataclass(eq=False)
class _CountingListener(AsyncTLSListener):
    stats: ServerStats = field(default_factory=ServerStats)
    verbose: bool = False

    async def handle_handshake_error(  # type: ignore[override]
            self, exc: BaseException, stream: AnyByteStream) -> None:
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        kind = _error_kind(exc)
        self.stats.errors[kind] += 1
        if self.verbose:
            _log(f"{_peer(stream)} handshake failed: {kind} ({exc})")


def _make_context(args: argparse.Namespace, tmp: str) -> tuple[TLSContext, str, str | None]:
    """The server context; what it serves (for the banner) and a fingerprint."""
    offload = None if args.no_offload else Offload(workers=args.workers)
    ctx = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    if args.cert:
        if args.write_cert or args.write_key:
            raise CLIError("--write-cert/--write-key write a generated certificate: "
                           "not with --cert")
        load_key_pair(ctx, args, args.cert, args.key)
        with open(args.cert, "rb") as f:
            pem = f.read()
        try:
            fp: str | None = fingerprint(pem)
        except ValueError:
            fp = None
        what = f"certificate {args.cert}"
    else:
        if args.key:
            raise CLIError("--key needs --cert")
        gen = generate(args.key_type, args.hostname)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        write_file(cert_path, gen.cert_pem)
        write_file(key_path, gen.key_pem, private=True)
        ctx.load_cert_chain(cert_path, key_path)
        what = gen.description
        if args.write_cert:
            write_file(args.write_cert, gen.cert_pem, what="certificate")
            what += f" (certificate written to {args.write_cert})"
        if args.write_key:
            write_file(args.write_key, gen.key_pem, private=True, what="key")
            what += f" (key written to {args.write_key})"
        fp = fingerprint(gen.cert_pem)
    if args.alpn:
        try:
            ctx.set_alpn_protocols([p for p in args.alpn.split(",") if p])
        except (ValueError, TLSError) as exc:
            raise CLIError(f"--alpn {args.alpn}: {exc}") from None
    if args.client_ca:
        try:
            ctx.load_verify_locations(cafile=args.client_ca)
        except (OSError, TLSError) as exc:
            raise CLIError(f"cannot load client CA file {args.client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx, what, fp


async def _serve(args: argparse.Namespace, ctx: TLSContext, what: str,
                 fp: str | None) -> ServerStats:
    app = APPS[args.app]
    stats = ServerStats(offload=ctx.offload)
    try:
        tcp = await anyio.create_tcp_listener(local_host=args.host, local_port=args.port)
    except OSError as exc:
        where = format_address(args.host, args.port)
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(f"cannot listen on {where}: address already in use") from None
        if exc.errno == errno.EACCES:
            raise CLIError(f"cannot listen on {where}: permission denied") from None
        raise CLIError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    listeners = getattr(tcp, "listeners", [tcp])
    bound = [format_address(*lst.extra(SocketAttribute.local_address)[:2]) for lst in listeners]
    tls = _CountingListener(tcp, ctx, handshake_timeout=args.handshake_timeout, stats=stats,
                            verbose=args.verbose)

    async def handle(stream: AsyncTLSStream) -> None:
        t0 = time.monotonic()
        peer = _peer(stream)
        stats.handshakes += 1
        stats.connections_open += 1
        stats.connections_total += 1
        how = "closed by the client"
        try:
            await app(stream, stats)
            how = "closed by the server"
        except EndOfStream:
            pass
        except (BrokenResourceError, ClosedResourceError) as exc:
            # most often a client that hung up without close_notify
            how = f"broken: {exc.__cause__ or exc}"
            stats.errors["disconnected"] += 1
        finally:
            stats.connections_open -= 1
            stats.pauses += stream.extra(AsyncTLSAttribute.pauses, 0)
            # close_notify both ways, but a client that never answers (or a
            # stop) must not hold the server: bounded, then forceful
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
                await stream.aclose()
            if scope.cancelled_caught:
                await anyio.aclose_forcefully(stream.transport_stream)
            if args.verbose:
                cipher = stream.extra(TLSAttribute.cipher, None) or ("?",)
                _log(f"{peer} {stream.extra(TLSAttribute.tls_version, '?')} {cipher[0]} "
                     f"{time.monotonic() - t0:.3f} s, {how}")

    offload = ctx.offload
    async with anyio.create_task_group() as tg:
        async def watch_signals(*, task_status: TaskStatus[None]) -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    _log(f"{signal.Signals(signum).name}: stopping")
                    tg.cancel_scope.cancel()
                    return

        # the handlers are in place before the banner says Ctrl-C stops
        await tg.start(watch_signals)
        tg.start_soon(stats.measure_lag)
        tg.start_soon(tls.serve, handle)
        print(f"asyncssl: TLS {args.app} server on {', '.join(bound)} "
              f"({anyio_backend_name()}) with {what}; "
              f"offload: {_threads(offload.workers) if offload else 'off'}. "
              "Ctrl-C stops.", flush=True)
        if fp:
            print(f"asyncssl: certificate SHA-256 fingerprint {fp}", flush=True)
    return stats


def _threads(n: int) -> str:
    return f"{n} worker thread{'s' if n != 1 else ''}" if n else "inline (0 workers)"


def anyio_backend_name() -> str:
    import sniffio
    return str(sniffio.current_async_library())


def run(args: argparse.Namespace) -> int:
    backend = args.backend or ("trio" if have_trio() else "asyncio")
    if backend == "trio":
        need_trio("--backend trio")
    with tempfile.TemporaryDirectory() as tmp:
        ctx, what, fp = _make_context(args, tmp)
        try:
            stats = anyio.run(_serve, args, ctx, what, fp, backend=backend)
        finally:
            if ctx.offload is not None:
                ctx.offload.close()
    lag = stats.lag_percentiles()
    off = ""
    if ctx.offload is not None:
        st = ctx.offload.stats()
        off = (f"; offloaded operations: {st.completed} (mean {st.mean_latency_ms:.2f} ms), "
               f"pauses: {stats.pauses}")
    print(f"asyncssl: stopped. connections: {stats.connections_total}, handshakes: "
          f"{stats.handshakes}, errors: {sum(stats.errors.values())}{off}; loop lag p99 "
          f"{lag['p99'] or 0:.2f} ms, max {lag['max'] or 0:.2f} ms", flush=True)
    return 0
