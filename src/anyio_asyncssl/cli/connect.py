"""``asyncssl connect``: a TLS client in the manner of ``openssl s_client``.

Theory of operation
-------------------
``--timeout`` bounds everything before the session exists: name
resolution, TCP connect and the TLS handshake.  Then the session is
described on stderr (version, cipher, ALPN, the server's certificate and
the verification result) and two tasks copy concurrently: standard input to
the connection and the connection to standard output.  End of input sends
our end of the stream (TLS 1.3 half-close; close_notify on TLS 1.2) and
keeps reading, so an echo's reply is never cut off; the server closing ends
the session.  On a terminal the copy is line by line as typed.  Pipes,
sockets and terminals are awaited with ``anyio.wait_readable`` (the fd
stays blocking, as the shell expects); files and /dev/null are read in a
worker thread.  Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import ssl
import stat
import sys
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.streams.tls import TLSAttribute

from ..context import TLSContext, create_default_context
from ..errors import CertificateVerifyError, TLSError
from ..stream import AsyncTLSStream, connect_tcp
from .common import (
    CLIError,
    add_password_options,
    fingerprint_der,
    format_address,
    have_trio,
    host_and_port,
    load_key_pair,
    positive_seconds,
)

CHUNK = 65536


def add_parser(sub: Any) -> None:
    c = sub.add_parser("connect", help="TLS client: stdin to the server, the server to stdout",
                       description="Connect, describe the TLS session, then copy standard "
                       "input to the server and the server's data to standard output.")
    c.add_argument("target", nargs="+", metavar="HOST:PORT",
                   help="HOST:PORT, [IPv6]:PORT, or HOST PORT")
    c.add_argument("--cafile", metavar="PATH", help="trust this CA file instead of the system's")
    c.add_argument("--insecure", action="store_true",
                   help="do not verify the server's certificate (dangerous)")
    c.add_argument("--sni", metavar="NAME",
                   help="name to send as SNI and verify (default: HOST)")
    c.add_argument("--alpn", help="comma-separated ALPN protocols to offer")
    c.add_argument("--cert", metavar="PATH", help="client certificate chain (PEM), for mTLS")
    c.add_argument("--key", metavar="PATH", help="client private key (PEM), if not in --cert")
    add_password_options(c)
    v = c.add_mutually_exclusive_group()
    v.add_argument("--tls1.2", dest="tls12", action="store_true", help="TLS 1.2 only")
    v.add_argument("--tls1.3", dest="tls13", action="store_true", help="TLS 1.3 only")
    c.add_argument("--timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="bound on resolving, connecting and the handshake (default 10)")
    c.add_argument("-q", "--quiet", action="store_true", help="do not describe the session")
    c.set_defaults(func=run)


def _say(message: str) -> None:
    print(f"asyncssl: {message}", file=sys.stderr, flush=True)


def _context(args: argparse.Namespace) -> TLSContext:
    if args.insecure:
        if args.cafile:
            raise CLIError("--insecure and --cafile contradict each other")
        ctx = TLSContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _say("WARNING: --insecure: the server's certificate is NOT verified; anyone on the "
             "path can read and change this session")
    else:
        if args.cafile and not os.path.exists(args.cafile):
            raise CLIError(f"CA file {args.cafile}: no such file")
        try:
            ctx = create_default_context(cafile=args.cafile)
        except (OSError, TLSError) as exc:
            raise CLIError(f"cannot load CA file {args.cafile}: {exc}") from None
    if args.cert:
        load_key_pair(ctx, args, args.cert, args.key)
    elif args.key:
        raise CLIError("--key needs --cert")
    if args.alpn:
        try:
            ctx.set_alpn_protocols([p for p in args.alpn.split(",") if p])
        except (ValueError, TLSError) as exc:
            raise CLIError(f"--alpn {args.alpn}: {exc}") from None
    if args.tls12 or args.tls13:
        version = ssl.TLSVersion.TLSv1_2 if args.tls12 else ssl.TLSVersion.TLSv1_3
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _name(entries: Any) -> str:
    return ", ".join(f"{k}={v}" for rdn in entries or () for k, v in rdn)


def _describe(stream: AsyncTLSStream, args: argparse.Namespace, verified_name: str) -> None:
    cipher = stream.extra(TLSAttribute.cipher, None) or ("?", "?", 0)
    _say(f"{stream.extra(TLSAttribute.tls_version, '?')}, cipher {cipher[0]} ({cipher[2]} bits), "
         f"ALPN {stream.extra(TLSAttribute.alpn_protocol, None) or 'none'}")
    der = stream.extra(TLSAttribute.peer_certificate_binary, None)
    conn = stream.ssl_object
    chain = conn.get_verified_chain(False) if not args.insecure else []
    if not chain:     # unverified: what the server sent
        chain = conn.get_unverified_chain(False)
    for depth, cert in enumerate(chain):
        names = ", ".join(f"{k}:{v}" for k, v in cert.get("subjectAltName", ()))
        _say(f"certificate {depth}: subject {_name(cert.get('subject'))}; issuer "
             f"{_name(cert.get('issuer'))}; valid {cert.get('notBefore')} to "
             f"{cert.get('notAfter')}" + (f"; names {names}" if names else ""))
    if der:
        _say(f"server certificate SHA-256 fingerprint {fingerprint_der(der)}")
    if args.insecure:
        _say("verification: NOT DONE (--insecure)")
    else:
        _say(f"verification: OK (chain trusted, name {verified_name} matches)")


async def _open(args: argparse.Namespace, host: str, port: int,
                ctx: TLSContext) -> AsyncTLSStream:
    where = format_address(host, port)
    name = args.sni or host
    try:
        with anyio.fail_after(args.timeout):
            return await connect_tcp(host, port, context=ctx, hostname=name)
    except TimeoutError:
        raise CLIError(f"connecting to {where} timed out after {args.timeout:g} s "
                       "(connect and handshake)") from None
    except CertificateVerifyError as exc:
        raise CLIError(f"certificate verification failed for {where} (name {name}): "
                       f"{exc.verify_message}; pass --cafile FILE to trust the server's CA, "
                       "or --insecure to skip verification") from None
    except TLSError as exc:
        raise CLIError(f"TLS handshake with {where} failed: {exc}") from None
    except (BrokenResourceError, EndOfStream):
        raise CLIError(f"{where} closed the connection during the TLS handshake") from None
    except socket.gaierror as exc:
        raise CLIError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    except ValueError as exc:    # a hostname that cannot be sent (IDNA, NUL)
        raise CLIError(f"bad host name {name!r}: {exc}") from None
    except OSError as exc:
        text = exc.strerror or str(exc)
        if exc.errno == errno.ECONNREFUSED or "refused" in text.lower() or "All connection" in text:
            raise CLIError(f"cannot connect to {where}: connection refused") from None
        raise CLIError(f"cannot connect to {where}: {text}") from None


async def _read_input(fd: int) -> bytes:
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        await anyio.wait_readable(fd)
        return os.read(fd, CHUNK)
    return await anyio.to_thread.run_sync(os.read, fd, CHUNK)


async def _copy(args: argparse.Namespace, stream: AsyncTLSStream) -> str:
    """Copy both ways until the server closes; returns how it ended."""
    out = sys.stdout.buffer
    ended = "closed by the server"
    async with anyio.create_task_group() as tg:
        async def to_server() -> None:
            fd = sys.stdin.fileno()
            try:
                while data := await _read_input(fd):
                    await stream.send(data)
                await stream.send_eof()
            except (BrokenResourceError, ClosedResourceError):
                pass    # the server went away: from_server says how

        async def from_server() -> None:
            nonlocal ended
            try:
                while True:
                    out.write(await stream.receive())
                    out.flush()
            except EndOfStream:
                pass
            except BrokenResourceError as exc:
                ended = f"connection lost: {exc.__cause__ or exc}"
            tg.cancel_scope.cancel()

        tg.start_soon(to_server)
        tg.start_soon(from_server)
    return ended


async def _session(args: argparse.Namespace, host: str, port: int, ctx: TLSContext) -> str:
    """The session, or ``"interrupted"`` on Ctrl-C/SIGTERM.

    The signals are received here, as events, rather than raised into
    whatever code runs when they arrive: the copy is cancelled at an await
    and the connection closed without waiting for the server.
    """
    ended = "interrupted"
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(watch)
            stream = await _open(args, host, port, ctx)
            try:
                if not args.quiet:
                    _describe(stream, args, args.sni or host)
                ended = await _copy(args, stream)
            finally:
                with anyio.move_on_after(2, shield=True):
                    try:
                        await stream.aclose()
                    except (BrokenResourceError, ClosedResourceError):
                        pass
                await anyio.aclose_forcefully(stream)
            tg.cancel_scope.cancel()
    return ended


def run(args: argparse.Namespace) -> int:
    host, port = host_and_port(args.target)
    ctx = _context(args)
    if sys.stdin is None or sys.stdin.closed:
        raise CLIError("standard input is closed")
    backend = "trio" if have_trio() else "asyncio"
    ended = anyio.run(_session, args, host, port, ctx, backend=backend)
    if ended == "interrupted":
        return 130
    if not args.quiet:
        _say(ended)
    return 0
