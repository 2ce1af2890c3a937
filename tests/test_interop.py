"""Interoperability with real TLS peers: OpenSSL's, GnuTLS's and curl's.

Server side: an :class:`AsyncTLSListener` with offload runs in the test's event
loop and an external client (``openssl s_client``, ``gnutls-cli``, ``curl``)
talks to it.  Client side: ``openssl s_server`` / ``gnutls-serv`` run as
subprocesses on a free loopback port and :func:`connect_tcp` talks to them.

A missing tool skips its tests (with the command that installs it), except
under CI, where every tool is installed and a missing one is a failure.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from subprocess import PIPE
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream, Process, SocketAttribute
from anyio.streams.tls import TLSAttribute
from conftest import Pki, alert_received, recording_handler, require_tool

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream, connect_tcp

pytestmark = pytest.mark.anyio

TIMEOUT = 30  # seconds for one conversation with a peer (2 shared cores, be generous)
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that need a number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- our server -------------------------------------------------------------------
Handler = Callable[[AsyncTLSStream], Awaitable[None]]


@asynccontextmanager
async def serving(ctx: A.TLSContext, handler: Handler,
                  errors: list[BaseException]) -> AsyncIterator[int]:
    """Serve ``handler`` on an AsyncTLSListener on 127.0.0.1; yield the port.

    Handler exceptions (other than cancellation) are recorded in ``errors``
    instead of tearing the listener down, so the test can assert on them.
    """

    guarded = recording_handler(handler, errors)

    class Listener(AsyncTLSListener):
        async def handle_handshake_error(  # type: ignore[override]  # needs self
                self, exc: BaseException, stream: Any) -> None:
            await anyio.aclose_forcefully(stream)
            if not isinstance(exc, Exception):
                raise exc
            errors.append(exc)

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(tcp.extra(SocketAttribute.local_port))
    listener = Listener(tcp, ctx, handshake_timeout=TIMEOUT)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, guarded)
            yield port
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def receive_line(stream: AsyncTLSStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        buf += await stream.receive()
        assert len(buf) < 65536
    return buf


async def close_politely(stream: AsyncTLSStream) -> None:
    """close_notify, then wait (bounded) for the peer's; a peer that just hangs up is fine."""
    with anyio.move_on_after(5):
        try:
            await stream.aclose()
        except (anyio.BrokenResourceError, ssl.SSLError):
            pass


def echo_line_handler(seen: list[AsyncTLSStream]) -> Handler:
    async def handler(stream: AsyncTLSStream) -> None:
        seen.append(stream)
        await stream.send(await receive_line(stream))
        await close_politely(stream)

    return handler


def server_ctx(pki: Pki, offload: A.Offload, kind: str = "rsa",
               version: str | None = None) -> A.TLSContext:
    ctx = pki.server_ctx(kind, offload=offload)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[version]
    return ctx


# -- external processes -----------------------------------------------------------
class Peer:
    """An external program with its stdout and stderr collected as they arrive."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.out = bytearray()
        self.err = bytearray()

    async def _collect(self, stream: ByteReceiveStream | None, buf: bytearray) -> None:
        if stream is None:
            return
        try:
            async for chunk in stream:
                buf += chunk
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(data)

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()

    async def wait_for(self, needle: bytes, timeout: float = TIMEOUT) -> None:
        """Wait until ``needle`` appears on stdout (fail with both outputs if not)."""
        with anyio.move_on_after(timeout):
            while needle not in self.out:
                if self.proc.returncode is not None:
                    await anyio.sleep(0.05)  # let the collectors catch up once
                    break
                await anyio.sleep(0.01)
        assert needle in self.out, self.describe(f"{needle!r} never appeared")

    async def wait_exit(self, timeout: float = TIMEOUT) -> int:
        with anyio.fail_after(timeout):
            return await self.proc.wait()

    def describe(self, what: str) -> str:
        return (f"{what}\n--- stdout ---\n{self.out.decode(errors='replace')[-4000:]}"
                f"\n--- stderr ---\n{self.err.decode(errors='replace')[-4000:]}")


@asynccontextmanager
async def peer_process(cmd: list[str]) -> AsyncIterator[Peer]:
    """Run ``cmd``; whatever happens, it is killed and reaped on the way out."""
    proc = await anyio.open_process(cmd, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    peer = Peer(proc)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer._collect, proc.stdout, peer.out)
            tg.start_soon(peer._collect, proc.stderr, peer.err)
            try:
                yield peer
            finally:
                with anyio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.kill()
                    with anyio.move_on_after(10):
                        await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()


async def wait_listening(port: int, peer: Peer, timeout: float = TIMEOUT) -> None:
    """Wait until something accepts on ``port`` (the peer's server is up).

    The probe connects and hangs up at once; OpenSSL's and GnuTLS's servers
    log that and keep serving.
    """
    with anyio.fail_after(timeout):
        while True:
            if peer.proc.returncode is not None:
                pytest.fail(peer.describe("the server exited before listening"))
            try:
                probe = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            await probe.aclose()
            return


@asynccontextmanager
async def external_server(make_cmd: Callable[[int], list[str]]) -> AsyncIterator[tuple[int, Peer]]:
    """Start a server subprocess on a free port (retrying if the port got taken)."""
    for attempt in range(3):
        port = free_port()
        async with peer_process(make_cmd(port)) as peer:
            try:
                await wait_listening(port, peer)
            except pytest.fail.Exception:
                if attempt == 2 or b"in use" not in peer.err.lower():
                    raise
                continue
            yield port, peer
            return
    raise AssertionError("unreachable")


# -- openssl s_client against our server -------------------------------------------
@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_openssl_s_client_echo_and_alpn(pki: Pki, offload: A.Offload, kind: str,
                                              version: str) -> None:
    openssl = require_tool("openssl", "openssl")
    ctx = server_ctx(pki, offload, kind)
    ctx.set_alpn_protocols(["echo/1", "http/1.1"])
    before = offload.stats().sign_ops
    seen: list[AsyncTLSStream] = []
    errors: list[BaseException] = []
    async with serving(ctx, echo_line_handler(seen), errors) as port:
        cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-CAfile", str(pki.ca_file), "-verify_return_error", "-verify_hostname",
               "localhost", "-alpn", "foo,echo/1", "-ign_eof", f"-tls1_{version[-1]}"]
        async with peer_process(cmd) as peer:
            await peer.wait_for(b"Verify return code: 0 (ok)")
            await peer.write(b"hello from s_client\n")
            await peer.wait_for(b"hello from s_client\n", timeout=TIMEOUT)
            await peer.close_stdin()
            await peer.wait_exit()
    assert not errors, errors
    out = peer.out.decode(errors="replace")
    assert "ALPN protocol: echo/1" in out, peer.describe("no ALPN")
    assert f"Protocol  : TLSv{version}" in out or f"New, TLSv{version}," in out, out
    (stream,) = seen
    assert stream.extra(TLSAttribute.alpn_protocol) == "echo/1"
    assert stream.extra(TLSAttribute.tls_version) == f"TLSv{version}"
    assert offload.stats().sign_ops > before  # the handshake's signature was offloaded


async def test_openssl_s_client_static_rsa_key_exchange_decrypts_in_offload(
        pki: Pki, offload: A.Offload) -> None:
    openssl = require_tool("openssl", "openssl")
    ctx = server_ctx(pki, offload, "rsa", version="1.2")
    ctx.set_ciphers("AES128-GCM-SHA256")
    before = offload.stats()
    seen: list[AsyncTLSStream] = []
    errors: list[BaseException] = []
    async with serving(ctx, echo_line_handler(seen), errors) as port:
        cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-CAfile", str(pki.ca_file), "-verify_return_error", "-tls1_2",
               "-cipher", "AES128-GCM-SHA256", "-ign_eof"]
        async with peer_process(cmd) as peer:
            await peer.wait_for(b"Verify return code: 0 (ok)")
            await peer.write(b"static rsa\n")
            await peer.wait_for(b"static rsa\n")
            await peer.close_stdin()
            await peer.wait_exit()
    assert not errors, errors
    (stream,) = seen
    assert stream.extra(TLSAttribute.cipher)[0] == "AES128-GCM-SHA256"
    after = offload.stats()
    # RSA key exchange: the premaster secret was decrypted by the offload provider
    assert after.decrypt_ops > before.decrypt_ops
    assert after.in_flight == 0


# -- gnutls-cli against our server, our client against gnutls-serv ------------------
@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_gnutls_cli_echo_and_alpn(pki: Pki, offload: A.Offload, kind: str,
                                        version: str) -> None:
    gnutls_cli = require_tool("gnutls-cli", "gnutls-bin")
    ctx = server_ctx(pki, offload, kind)
    ctx.set_alpn_protocols(["echo/1"])
    seen: list[AsyncTLSStream] = []
    errors: list[BaseException] = []
    async with serving(ctx, echo_line_handler(seen), errors) as port:
        cmd = [gnutls_cli, "--x509cafile", str(pki.ca_file), "--port", str(port),
               "--sni-hostname", "localhost", "--verify-hostname", "localhost",
               "--priority", "NORMAL:-VERS-ALL:+VERS-TLS" + version, "--alpn", "echo/1",
               "127.0.0.1"]
        async with peer_process(cmd) as peer:
            await peer.wait_for(b"- Handshake was completed")
            await peer.write(b"hello from gnutls\n")
            await peer.wait_for(b"hello from gnutls\n")
            await peer.close_stdin()
            await peer.wait_exit()
    assert not errors, errors
    out = peer.out.decode(errors="replace")
    assert "The certificate is trusted" in out, peer.describe("not trusted")
    assert f"(TLS{version}" in out, peer.describe("wrong version")
    (stream,) = seen
    assert stream.extra(TLSAttribute.alpn_protocol) == "echo/1"
    assert stream.extra(TLSAttribute.tls_version) == f"TLSv{version}"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_our_client_against_gnutls_serv_echo(pki: Pki, offload: A.Offload,
                                                  version: str) -> None:
    gnutls_serv = require_tool("gnutls-serv", "gnutls-bin")
    prio = "NORMAL:-VERS-ALL:+VERS-TLS" + version

    def cmd(port: int) -> list[str]:
        return [gnutls_serv, "--echo", "--port", str(port), "--priority", prio,
                "--x509certfile", str(pki.rsa_file), "--x509keyfile", str(pki.rsa_file)]

    ctx = pki.client_ctx(offload=offload)
    async with external_server(cmd) as (port, _peer):
        with anyio.fail_after(TIMEOUT):
            stream = await connect_tcp("127.0.0.1", port, context=ctx, hostname="localhost")
            try:
                assert stream.extra(TLSAttribute.tls_version) == f"TLSv{version}"
                for i in range(3):
                    line = f"line {i} to gnutls\n".encode()
                    await stream.send(line)
                    got = b""
                    while len(got) < len(line):
                        got += await stream.receive()
                    assert got == line
            finally:
                await close_politely(stream)


# -- curl against a tiny HTTP/1.1 server on AsyncTLSListener -------------------------
BODY = b"hello from anyio-asyncssl over offload\n"


async def http_handler(stream: AsyncTLSStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive()
        assert len(request) < 65536
    assert request.startswith(b"GET / HTTP/1.1\r\n"), request
    await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY))
    await close_politely(stream)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_curl_gets_a_page(pki: Pki, offload: A.Offload, version: str) -> None:
    curl = require_tool("curl", "curl")
    ctx = server_ctx(pki, offload, "rsa")
    ctx.set_alpn_protocols(["http/1.1"])
    errors: list[BaseException] = []
    flags = ["--tlsv1.2", "--tls-max", "1.2"] if version == "1.2" else ["--tlsv1.3"]
    async with serving(ctx, http_handler, errors) as port:
        with anyio.fail_after(TIMEOUT):
            result = await anyio.run_process(
                [curl, "-sS", "--http1.1", "--max-time", str(TIMEOUT), "--cacert",
                 str(pki.ca_file), "--resolve", f"localhost:{port}:127.0.0.1",
                 "-w", "%{http_code} %{ssl_verify_result}", *flags,
                 f"https://localhost:{port}/"], check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == BODY + b"200 0"
    assert not errors, errors


# -- our client against openssl s_server --------------------------------------------
def s_server_cmd(openssl: str, pki: Pki, version: str, mode: str,
                 *extra: str) -> Callable[[int], list[str]]:
    def cmd(port: int) -> list[str]:
        return [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(pki.rsa_file),
                "-naccept", "5", f"-tls1_{version[-1]}", mode, *extra]

    return cmd


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_our_client_against_openssl_s_server_rev(pki: Pki, offload: A.Offload,
                                                      version: str) -> None:
    openssl = require_tool("openssl", "openssl")
    ctx = pki.client_ctx(offload=offload)
    async with external_server(s_server_cmd(openssl, pki, version, "-rev")) as (port, _):
        with anyio.fail_after(TIMEOUT):
            stream = await connect_tcp("127.0.0.1", port, context=ctx, hostname="localhost")
            try:
                assert stream.extra(TLSAttribute.tls_version) == f"TLSv{version}"
                await stream.send(b"stressed\n")
                assert (await receive_line(stream)).strip() == b"desserts"
            finally:
                await close_politely(stream)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_our_client_against_openssl_s_server_www(pki: Pki, version: str) -> None:
    openssl = require_tool("openssl", "openssl")
    async with external_server(s_server_cmd(openssl, pki, version, "-www")) as (port, _):
        with anyio.fail_after(TIMEOUT):
            stream = await connect_tcp("127.0.0.1", port, context=pki.client_ctx(),
                                       hostname="localhost")
            page = await http_get(stream)
    assert b"HTTP/1.0 200 ok" in page
    assert f"Protocol  : TLSv{version}".encode() in page
    assert b"no client certificate available" in page


async def http_get(stream: AsyncTLSStream) -> bytes:
    """GET / over ``stream``, read to the end (s_server -www closes after the page)."""
    await stream.send(b"GET / HTTP/1.0\r\n\r\n")
    page = b""
    try:
        while len(page) < 1 << 20:
            page += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass
    await anyio.aclose_forcefully(stream)
    return page


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_our_client_presents_a_client_certificate_to_s_server(
        pki: Pki, offload: A.Offload, version: str) -> None:
    openssl = require_tool("openssl", "openssl")
    ctx = pki.client_ctx(offload=offload)
    ctx.load_cert_chain(pki.client_file)
    before = offload.stats().sign_ops
    make = s_server_cmd(openssl, pki, version, "-www", "-Verify", "1",
                        "-CAfile", str(pki.ca_file))
    async with external_server(make) as (port, _):
        with anyio.fail_after(TIMEOUT):
            stream = await connect_tcp("127.0.0.1", port, context=ctx, hostname="localhost")
            page = await http_get(stream)
    assert b"HTTP/1.0 200 ok" in page, page
    assert b"no client certificate available" not in page
    assert b"Client certificate" in page, page
    # our client's CertificateVerify was signed by the offload provider
    assert offload.stats().sign_ops > before


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_s_server_requiring_a_client_certificate_refuses_our_client_without_one(
        pki: Pki, version: str) -> None:
    openssl = require_tool("openssl", "openssl")
    make = s_server_cmd(openssl, pki, version, "-www", "-Verify", "1",
                        "-CAfile", str(pki.ca_file))
    async with external_server(make) as (port, _):
        with anyio.fail_after(TIMEOUT):
            with pytest.raises((ssl.SSLError, anyio.BrokenResourceError,
                                anyio.EndOfStream)) as info:
                # TLS 1.3: the handshake completes on our side; the alert comes on read
                stream = await connect_tcp("127.0.0.1", port, context=pki.client_ctx(),
                                           hostname="localhost")
                try:
                    await stream.send(b"GET / HTTP/1.0\r\n\r\n")
                    await stream.receive()
                finally:
                    await anyio.aclose_forcefully(stream)
    exc = info.value
    if isinstance(exc, ssl.SSLError):
        assert isinstance(exc, A.TLSError)
        # RFC 5246 7.4.6: handshake_failure (40); RFC 8446 4.4.2.4:
        # certificate_required (116).  (The reason's name is OpenSSL's, and 4.0
        # renamed the alert reasons: TLS_ALERT_*.)
        assert alert_received(exc) in (40, 116), exc
