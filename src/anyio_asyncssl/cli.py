"""The ``asyncssl`` command.

``asyncssl serve``: a TLS echo server (default 127.0.0.1:8443) on a trio
nursery (``trio.serve_listeners`` with :class:`TrioTLSListener`), offload on,
with a self-signed certificate generated at start unless ``--cert``/``--key``
are given.  Ctrl-C stops it gracefully.

``asyncssl connect HOST PORT``: a TLS client that prints the session and
copies stdin to the server and the server's replies to stdout.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .context import TLSContext, create_default_context
from .errors import TLSError
from .offload import Offload
from .selfsigned import generate_self_signed

__all__ = ["main"]


def _server_context(args: argparse.Namespace, tmp: str) -> tuple[TLSContext, str]:
    offload = None if args.no_offload else Offload(workers=args.workers)
    ctx = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
        what = f"certificate {args.cert}"
    else:
        cert, key = generate_self_signed(args.hostname, key_type=args.key_type,
                                         bits=args.bits)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ctx.load_cert_chain(cert_path, key_path)
        what = f"self-signed {args.key_type.upper()} certificate for {args.hostname}"
        if args.write_cert:
            with open(args.write_cert, "wb") as f:
                f.write(cert)
            what += f" (written to {args.write_cert})"
    if args.alpn:
        ctx.set_alpn_protocols(args.alpn.split(","))
    return ctx, what


async def _echo_trio(stream: Any) -> None:
    import trio

    try:
        while True:
            data = await stream.receive_some()
            if not data:
                break
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        if cause is not None:
            print(f"asyncssl: connection ended: {cause}", file=sys.stderr)
    finally:
        await stream.aclose()


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, possibly inside (nested) exception groups from nurseries."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    subs: tuple[BaseException, ...] = tuple(getattr(exc, "exceptions", None) or ())
    return bool(subs) and all(_is_interrupt(e) for e in subs)


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .trio import TrioTLSListener

    with tempfile.TemporaryDirectory() as tmp:
        ctx, what = _server_context(args, tmp)

        async def run() -> None:
            listeners = await trio.open_tcp_listeners(args.port, host=args.host)
            tls = [TrioTLSListener(lst, ctx) for lst in listeners]
            offload = ctx.offload
            print(f"asyncssl: TLS echo server on {args.host}:{args.port} with {what}; "
                  f"offload: {f'{offload.workers} worker threads' if offload else 'off'}. "
                  "Ctrl-C stops.", flush=True)
            await trio.serve_listeners(_echo_trio, tls)

        try:
            trio.run(run)
        except BaseException as exc:
            if not _is_interrupt(exc):
                raise
        finally:
            if ctx.offload is not None:
                st = ctx.offload.stats()
                print(f"\nasyncssl: stopped. offloaded operations: {st.completed} "
                      f"(mean {st.mean_latency_ms:.2f} ms), pauses: {st.pauses}", flush=True)
                ctx.offload.close()
    return 0


def _connect(args: argparse.Namespace) -> int:
    import anyio

    from .stream import connect_tcp

    if args.insecure:
        ctx = TLSContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = create_default_context(cafile=args.cafile)
    if args.alpn:
        ctx.set_alpn_protocols(args.alpn.split(","))

    async def run() -> None:
        from anyio.streams.tls import TLSAttribute

        async with await connect_tcp(args.host, args.port, context=ctx,
                                     hostname=args.servername or args.host) as stream:
            print(f"asyncssl: connected: {stream.extra(TLSAttribute.tls_version)} "
                  f"{stream.extra(TLSAttribute.cipher)[0]}, ALPN "
                  f"{stream.extra(TLSAttribute.alpn_protocol)}", file=sys.stderr, flush=True)
            data = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
            if data:
                await stream.send(data)
                got = 0
                with anyio.move_on_after(args.timeout):
                    while got < len(data):
                        chunk = await stream.receive()
                        got += len(chunk)
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()

    try:
        anyio.run(run)
    except (TLSError, OSError) as exc:
        print(f"asyncssl: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncssl",
                                description="TLS on OpenSSL's async mode for anyio and trio")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="TLS echo server (trio), offload on")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8443)
    s.add_argument("--cert", help="certificate chain (PEM); default: generate a self-signed one")
    s.add_argument("--key", help="private key (PEM), if not in --cert")
    s.add_argument("--hostname", default="localhost", help="name in the generated certificate")
    s.add_argument("--key-type", choices=("rsa", "ec"), default="rsa")
    s.add_argument("--bits", type=int, default=2048, help="RSA key size for the generated key")
    s.add_argument("--write-cert", metavar="PATH",
                   help="write the generated certificate here (for clients' --cafile)")
    s.add_argument("--workers", type=int, default=None, help="offload threads (default: CPUs)")
    s.add_argument("--no-offload", action="store_true", help="sign on the event loop")
    s.add_argument("--alpn", help="comma-separated ALPN protocols to accept")
    s.set_defaults(func=_serve)

    c = sub.add_parser("connect", help="TLS client: stdin to the server, replies to stdout")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--cafile", help="trust this CA file instead of the system store")
    c.add_argument("--insecure", action="store_true", help="do not verify the server")
    c.add_argument("--servername", help="name to verify and send as SNI (default: host)")
    c.add_argument("--alpn", help="comma-separated ALPN protocols to offer")
    c.add_argument("--timeout", type=float, default=10.0)
    c.set_defaults(func=_connect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TLSError as exc:
        print(f"asyncssl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
