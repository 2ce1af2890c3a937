"""httpx on anyio-asyncssl (``anyio_asyncssl.httpx``) against real peers.

Peers: a stdlib ``ssl`` HTTP/1.1 server and an ``h2`` HTTP/2 server, each in
threads of this process; CONNECT proxies (plain and TLS, so TLS in TLS) in
threads too; our own :class:`AsyncTLSListener` with an ``h11`` responder in
the test's event loop.  Every async test runs on both anyio backends; every
server binds to loopback and every wait is bounded.  Where a failure is
tested, stock httpx (the stdlib's TLS) is asked the same question and must
raise the same httpx exception class.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import trustme
from conftest import Pki

httpx = pytest.importorskip("httpx", reason="pip install 'anyio-asyncssl[httpx]'")
httpcore = pytest.importorskip("httpcore", reason="pip install 'anyio-asyncssl[httpx]'")
h2_connection = pytest.importorskip("h2.connection", reason="pip install 'anyio-asyncssl[httpx]'")
h11 = pytest.importorskip("h11", reason="pip install 'anyio-asyncssl[httpx]'")
import h2.config  # noqa: E402
import h2.events  # noqa: E402

import anyio_asyncssl as A  # noqa: E402
from anyio_asyncssl.httpx import (  # noqa: E402
    AsyncTLSBackend,
    AsyncTLSNetworkStream,
    AsyncTLSTransport,
    create_async_client,
)
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream  # noqa: E402

TIMEOUT = 20  # seconds: generous, the machine is shared
HTTPX_TIMEOUT = httpx.Timeout(TIMEOUT)


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- threaded loopback servers -----------------------------------------------------
@dataclass
class Record:
    """What a threaded server saw."""

    connections: int = 0
    alpn: list[str | None] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    peer_certs: list[Any] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)   # CONNECT targets (proxies)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ThreadedServer:
    """Accepts on 127.0.0.1 in a thread; each connection gets ``handle(sock, record)``
    in a thread of its own.  Stops (and joins, bounded) on close()."""

    def __init__(self, handle: Callable[[socket.socket, Record], None]) -> None:
        self.handle = handle
        self.record = Record()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._serve, daemon=True)
        self._acceptor.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            with self.record.lock:
                self.record.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn, self.record)
        except Exception as exc:
            self.record.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(TIMEOUT)
        self.sock.close()
        for c in self._conns:   # wake handlers blocked in recv
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(TIMEOUT)


@contextmanager
def serve(handle: Callable[[socket.socket, Record], None]) -> Iterator[ThreadedServer]:
    server = ThreadedServer(handle)
    try:
        yield server
    finally:
        server.close()


def recv_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to the end of an HTTP head; the head, or None at EOF.  Leftovers stay in buf."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
        if len(buf) > 1 << 20:
            raise ValueError("head too long")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


def tls_accept(sock: socket.socket, ctx: ssl.SSLContext, record: Record) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except (ssl.SSLError, OSError):
        # let the alert reach the client (closing with its unread request
        # would reset the connection and lose it): half-close, drain, close
        try:
            tls.shutdown(socket.SHUT_WR)   # drops the SSL object: plain socket from here
            tls.settimeout(2)
            for _ in range(100):
                if not tls.recv(65536):
                    break
        except OSError:
            pass
        tls.close()
        raise
    with record.lock:
        record.alpn.append(tls.selected_alpn_protocol())
        record.versions.append(tls.version())
        record.peer_certs.append(tls.getpeercert())
    return tls


def http11_loop(sock: socket.socket, record: Record, prefix: str = "hello") -> None:
    """Serve HTTP/1.1 requests (keep-alive) until the client closes."""
    buf = bytearray()
    for _ in range(100):
        head = recv_head(sock, buf)
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
        body_in = bytes(buf[:length])
        del buf[:length]
        with record.lock:
            record.paths.append(path)
        body = f"{prefix} {method} {path} {len(body_in)}".encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def h2_loop(sock: ssl.SSLSocket, record: Record) -> None:
    """Serve HTTP/2 requests on one connection until the client closes."""
    conn = h2_connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    paths: dict[int, str] = {}
    for _ in range(10_000):
        data = sock.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                # header_encoding="utf-8": h2 gives str, though it types bytes
                headers = dict(cast(list[tuple[str, str]], event.headers))
                paths[event.stream_id] = str(headers[":path"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                path = paths.pop(event.stream_id)
                with record.lock:
                    record.paths.append(path)
                body = f"h2 {path}".encode()
                conn.send_headers(event.stream_id, [
                    (":status", "200"), ("content-type", "text/plain"),
                    ("content-length", str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
        sock.sendall(conn.data_to_send())


def stdlib_server_ctx(certfile: Path, *, alpn: list[str] | None = None,
                      client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


def https_handler(ctx: ssl.SSLContext) -> Callable[[socket.socket, Record], None]:
    """HTTP/1.1 over stdlib TLS; HTTP/2 when ALPN selected h2."""
    def handle(sock: socket.socket, record: Record) -> None:
        tls = tls_accept(sock, ctx, record)
        try:
            if tls.selected_alpn_protocol() == "h2":
                h2_loop(tls, record)
            else:
                http11_loop(tls, record)
        finally:
            tls.close()
    return handle


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes (bounded by TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready: list[socket.socket] = [
            s for s in (a, b) if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            ready, _, _ = select.select([a, b], [], [], 0.2)
        for src in ready:
            dst = b if src is a else a
            try:
                data = src.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            if not data:
                return
            dst.sendall(data)


def connect_proxy_handler(ctx: ssl.SSLContext | None) -> Callable[[socket.socket, Record], None]:
    """An HTTP CONNECT proxy (over TLS when ``ctx`` is given)."""
    def handle(sock: socket.socket, record: Record) -> None:
        conn: socket.socket = tls_accept(sock, ctx, record) if ctx is not None else sock
        buf = bytearray()
        head = recv_head(conn, buf)
        if head is None:
            return
        method, target, _ = head.decode("latin-1").split("\r\n")[0].split(" ", 2)
        assert method == "CONNECT", method
        with record.lock:
            record.targets.append(target)
        host, _, port = target.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT) as up:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if buf:
                up.sendall(bytes(buf))
            pipe(conn, up)
    return handle


@pytest.fixture(scope="module")
def https_server(pki: Pki) -> Iterator[ThreadedServer]:
    """Stdlib TLS, ALPN h2 and http/1.1 (HTTP/2 via h2, else HTTP/1.1)."""
    with serve(https_handler(stdlib_server_ctx(pki.rsa_file, alpn=["h2", "http/1.1"]))) as s:
        yield s


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, Path]:
    """A certificate from an unknown CA, and one of ours for another name only."""
    tmp = tmp_path_factory.mktemp("other_pki")
    unknown = trustme.CA().issue_cert("localhost", "127.0.0.1")
    unknown.private_key_and_cert_chain_pem.write_to_path(tmp / "unknown.pem")
    wrong = pki.ca.issue_cert("other.example")
    wrong.private_key_and_cert_chain_pem.write_to_path(tmp / "wrong_name.pem")
    client = pki.ca.issue_cert("client2@example.com", common_name="split client")
    client.cert_chain_pems[0].write_to_path(tmp / "client_cert.pem")
    client.private_key_pem.write_to_path(tmp / "client_key.pem")
    return {"unknown": tmp / "unknown.pem", "wrong_name": tmp / "wrong_name.pem",
            "client_cert": tmp / "client_cert.pem", "client_key": tmp / "client_key.pem"}


def stock_client(pki: Pki, **kw: Any) -> Any:
    """Stock httpx (stdlib TLS) trusting the test CA."""
    return httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca_file)),
                             trust_env=False, **kw)


def our_client(pki: Pki, **kw: Any) -> Any:
    kw.setdefault("verify", pki.ca_file)
    kw.setdefault("trust_env", False)
    kw.setdefault("timeout", HTTPX_TIMEOUT)
    return create_async_client(**kw)


def chain(exc: BaseException) -> list[BaseException]:
    """exc and what caused it (httpcore's pool re-raises ``from None``: the
    original stays as ``__context__``)."""
    out = [exc]
    while len(out) < 10:
        nxt = out[-1].__cause__ or out[-1].__context__
        if nxt is None:
            break
        out.append(nxt)
    return out


# -- our own server (in the event loop) ---------------------------------------------
@dataclass
class OurServer:
    port: int
    connections: list[AsyncTLSStream]


async def h11_handler(stream: AsyncTLSStream) -> None:
    """A tiny HTTP/1.1 responder (h11), keep-alive until the client goes."""
    conn = h11.Connection(h11.SERVER)
    target = b""
    for _ in range(10_000):
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            target = event.target
        elif isinstance(event, h11.EndOfMessage):
            body = b"ours " + target
            await stream.send(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(len(body)))])))
            await stream.send(conn.send(h11.Data(data=body)))
            await stream.send(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return


@asynccontextmanager
async def our_server(ctx: A.TLSContext, handler: Any = h11_handler,
                     listener: Any = None) -> AsyncIterator[OurServer]:
    if listener is None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port, 0)
    server = OurServer(port, [])

    async def handle(stream: AsyncTLSStream) -> None:
        server.connections.append(stream)
        try:
            await handler(stream)
        finally:
            await anyio.aclose_forcefully(stream)

    tls_listener = AsyncTLSListener(listener, ctx, standard_compatible=False,
                                    handshake_timeout=TIMEOUT)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tls_listener.serve, handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


# == HTTP/1.1 and HTTP/2 against stdlib servers ====================================
@pytest.mark.anyio
async def test_http11_against_stdlib_server(pki: Pki, https_server: ThreadedServer) -> None:
    before = https_server.record.connections
    async with our_client(pki) as client:
        r1 = await client.get(f"https://localhost:{https_server.port}/one")
        r2 = await client.post(f"https://localhost:{https_server.port}/two", content=b"x" * 1000)
        r3 = await client.get(f"https://127.0.0.1:{https_server.port}/three")
    assert (r1.status_code, r1.text, r1.http_version) == (200, "hello GET /one 0", "HTTP/1.1")
    assert r2.text == "hello POST /two 1000"
    assert r3.text == "hello GET /three 0"
    # keep-alive: one connection per origin (localhost, 127.0.0.1)
    assert https_server.record.connections - before == 2
    assert https_server.record.alpn[-1] == "http/1.1"
    ssl_object = r1.extensions["network_stream"].get_extra_info("ssl_object")
    assert isinstance(ssl_object, A.TLSConnection)


@pytest.mark.anyio
async def test_http2_against_h2_server(pki: Pki, https_server: ThreadedServer) -> None:
    before = https_server.record.connections
    async with our_client(pki, http2=True) as client:
        responses: list[Any] = [None] * 5

        async def get(i: int) -> None:
            responses[i] = await client.get(f"https://localhost:{https_server.port}/s{i}")

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(get, i)
    for i, r in enumerate(responses):
        assert r.status_code == 200
        assert r.http_version == "HTTP/2"
        assert r.text == f"h2 /s{i}"
    # multiplexed on one connection
    assert https_server.record.connections - before == 1
    assert https_server.record.alpn[-1] == "h2"
    stream = responses[0].extensions["network_stream"]
    ssl_object = stream.get_extra_info("ssl_object")
    assert isinstance(ssl_object, A.TLSConnection)
    assert ssl_object.selected_alpn_protocol() == "h2"
    assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.anyio
async def test_http2_off_offers_http11_only(pki: Pki, https_server: ThreadedServer) -> None:
    async with our_client(pki, http2=False) as client:
        r = await client.get(f"https://localhost:{https_server.port}/plain")
    assert r.http_version == "HTTP/1.1"
    assert r.text == "hello GET /plain 0"
    assert https_server.record.alpn[-1] == "http/1.1"


@pytest.mark.anyio
async def test_http2_only(pki: Pki, https_server: ThreadedServer) -> None:
    async with our_client(pki, http1=False, http2=True) as client:
        r = await client.get(f"https://localhost:{https_server.port}/only2")
        assert client._transport.context.alpn_protocols == (b"h2",)
    assert r.http_version == "HTTP/2"
    assert https_server.record.alpn[-1] == "h2"


@pytest.mark.anyio
async def test_shared_context_gets_each_clients_alpn(pki: Pki,
                                                    https_server: ThreadedServer) -> None:
    ctx = pki.client_ctx()
    async with our_client(pki, verify=ctx, http2=True) as c2:
        async with our_client(pki, verify=ctx, http2=False) as c1:
            # c1 was made last (its ALPN list is on the context), c2 asks first
            r2 = await c2.get(f"https://localhost:{https_server.port}/c2")
            r1 = await c1.get(f"https://localhost:{https_server.port}/c1")
    assert (r2.http_version, r2.text) == ("HTTP/2", "h2 /c2")
    assert (r1.http_version, r1.text) == ("HTTP/1.1", "hello GET /c1 0")


# == our server (AsyncTLSListener + h11) with offload ================================
@pytest.mark.anyio
async def test_against_our_server_with_offload(pki: Pki, offload: A.Offload) -> None:
    before = offload.stats().sign_ops
    async with our_server(pki.server_ctx(offload=offload)) as server:
        async with our_client(pki) as client:
            r1 = await client.get(f"https://localhost:{server.port}/a")
            r2 = await client.get(f"https://localhost:{server.port}/b")
    assert (r1.status_code, r1.text, r2.text) == (200, "ours /a", "ours /b")
    assert len(server.connections) == 1   # keep-alive
    assert offload.stats().sign_ops > before   # the server's signature ran on the workers
    assert r1.extensions["network_stream"].get_extra_info("ssl_object").version() == "TLSv1.3"


@pytest.mark.anyio
async def test_over_unix_socket(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "https.sock"
    listener = await anyio.create_unix_listener(path)
    async with our_server(pki.server_ctx(), listener=listener):
        async with our_client(pki, uds=str(path)) as client:
            r = await client.get("https://localhost/uds")
    assert r.text == "ours /uds"


# == mutual TLS ========================================================================
@pytest.mark.anyio
async def test_mtls_client_cert_with_offload(pki: Pki, offload: A.Offload) -> None:
    ctx = stdlib_server_ctx(pki.rsa_file, client_ca=pki.ca_file)
    with serve(https_handler(ctx)) as server:
        before = offload.stats().sign_ops
        async with our_client(pki, cert=pki.client_file, offload=offload) as client:
            r = await client.get(f"https://localhost:{server.port}/mtls")
            assert client._transport.context.offload is offload
        assert r.text == "hello GET /mtls 0"
        subject = dict(x[0] for x in server.record.peer_certs[-1]["subject"])
        assert subject["commonName"] == "test client"
        # the client key's CertificateVerify signature ran on the offload workers
        assert offload.stats().sign_ops > before


@pytest.mark.anyio
async def test_mtls_cert_and_key_files(pki: Pki, other_pki: dict[str, Path],
                                       offload: A.Offload) -> None:
    ctx = stdlib_server_ctx(pki.rsa_file, client_ca=pki.ca_file)
    with serve(https_handler(ctx)) as server:
        before = offload.stats().sign_ops
        cert = (other_pki["client_cert"], other_pki["client_key"])
        async with our_client(pki, cert=cert, offload=offload) as client:
            r = await client.get(f"https://localhost:{server.port}/split")
        assert r.status_code == 200
        subject = dict(x[0] for x in server.record.peer_certs[-1]["subject"])
        assert subject["commonName"] == "split client"
        assert offload.stats().sign_ops > before


@pytest.mark.anyio
async def test_mtls_without_client_cert_is_an_httpx_error(pki: Pki) -> None:
    ctx = stdlib_server_ctx(pki.rsa_file, client_ca=pki.ca_file)
    with serve(https_handler(ctx)) as server:
        async with our_client(pki) as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.get(f"https://localhost:{server.port}/nocert")
    # TLS 1.3: the server checks the client's certificate after the client's
    # handshake is over, so its alert is read with the response (stock httpx
    # on asyncio lets that ssl.SSLError escape unmapped)
    assert type(info.value) is httpx.ReadError
    assert "certificate required" in str(info.value).lower()
    assert isinstance(chain(info.value)[2], A.TLSError)


# == verification failures: httpx's own exceptions, as with the stdlib ================
async def both_raise(pki: Pki, url: str, **kw: Any) -> tuple[BaseException, BaseException]:
    async with our_client(pki) as client:
        with pytest.raises(httpx.HTTPError) as ours:
            await client.get(url)
    async with stock_client(pki, timeout=HTTPX_TIMEOUT) as client:
        with pytest.raises(httpx.HTTPError) as stock:
            await client.get(url)
    return ours.value, stock.value


@pytest.mark.anyio
async def test_unknown_ca_is_connect_error(pki: Pki, other_pki: dict[str, Path]) -> None:
    with serve(https_handler(stdlib_server_ctx(other_pki["unknown"]))) as server:
        ours, stock = await both_raise(pki, f"https://localhost:{server.port}/")
    assert type(ours) is type(stock) is httpx.ConnectError
    assert "certificate verify failed" in str(ours).lower()
    # (stock httpx on trio says nothing: trio wraps the SSLError in an empty
    # BrokenResourceError, whose cause is the stdlib's verification error)
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain(stock))
    causes = chain(ours)
    assert isinstance(causes[1], httpcore.ConnectError)
    assert isinstance(causes[2], A.CertificateVerifyError)
    assert isinstance(causes[2], ssl.SSLCertVerificationError)


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_wrong_hostname_is_connect_error(pki: Pki, other_pki: dict[str, Path],
                                               host: str) -> None:
    with serve(https_handler(stdlib_server_ctx(other_pki["wrong_name"]))) as server:
        ours, stock = await both_raise(pki, f"https://{host}:{server.port}/")
    assert type(ours) is type(stock) is httpx.ConnectError
    assert "certificate verify failed" in str(ours).lower()
    assert "mismatch" in str(ours).lower()
    assert isinstance(chain(ours)[2], A.CertificateVerifyError)


@pytest.mark.anyio
async def test_sni_hostname_extension_is_verified(pki: Pki,
                                                  https_server: ThreadedServer) -> None:
    async with our_client(pki) as client:
        r = await client.get(f"https://127.0.0.1:{https_server.port}/sni",
                             extensions={"sni_hostname": "example.com"})
        assert r.status_code == 200
    async with our_client(pki) as client:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            await client.get(f"https://127.0.0.1:{https_server.port}/sni",
                             extensions={"sni_hostname": "not-in-the-cert.example"})


@pytest.mark.anyio
async def test_verify_false_accepts_unknown_ca(pki: Pki, other_pki: dict[str, Path]) -> None:
    with serve(https_handler(stdlib_server_ctx(other_pki["unknown"]))) as server:
        async with our_client(pki, verify=False) as client:
            r = await client.get(f"https://localhost:{server.port}/insecure")
    assert r.text == "hello GET /insecure 0"


@pytest.mark.anyio
async def test_verify_true_uses_system_store_not_test_ca(
        pki: Pki, https_server: ThreadedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with our_client(pki, verify=True) as client:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            await client.get(f"https://localhost:{https_server.port}/")
    # with trust_env, SSL_CERT_FILE names the CAs (as in httpx)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with our_client(pki, verify=True, trust_env=True) as client:
        r = await client.get(f"https://localhost:{https_server.port}/envca")
    assert r.status_code == 200


# == timeouts ==========================================================================
@pytest.mark.anyio
async def test_handshake_never_answered_is_connect_timeout(pki: Pki) -> None:
    # the kernel completes the TCP handshake (backlog); nobody ever speaks TLS
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"https://localhost:{silent.getsockname()[1]}/"
        timeout = httpx.Timeout(TIMEOUT, connect=0.5)
        with anyio.move_on_after(TIMEOUT) as bound:
            async with our_client(pki, timeout=timeout) as client:
                with pytest.raises(httpx.ConnectTimeout):
                    await client.get(url)
            async with stock_client(pki, timeout=timeout) as client:
                with pytest.raises(httpx.ConnectTimeout):
                    await client.get(url)
        assert not bound.cancelled_caught, "the connect timeout was not applied"


@pytest.mark.anyio
async def test_response_never_sent_is_read_timeout(pki: Pki) -> None:
    async def mute(stream: AsyncTLSStream) -> None:
        await stream.receive()
        await anyio.sleep(TIMEOUT)

    timeout = httpx.Timeout(TIMEOUT, read=0.5)
    async with our_server(pki.server_ctx(), handler=mute) as server:
        url = f"https://localhost:{server.port}/"
        with anyio.fail_after(TIMEOUT):
            async with our_client(pki, timeout=timeout) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get(url)
            async with stock_client(pki, timeout=timeout) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get(url)


@pytest.mark.anyio
async def test_connection_refused_is_connect_error(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: refused
        async with our_client(pki) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"https://127.0.0.1:{port}/")


# == proxies: CONNECT over plain TCP, and over TLS (TLS in TLS) ======================
@pytest.mark.anyio
async def test_https_proxy_tls_in_tls_with_http2(pki: Pki,
                                                 https_server: ThreadedServer) -> None:
    # the proxy would pick h2 if offered it: it must be offered http/1.1 only
    proxy_ctx = stdlib_server_ctx(pki.rsa_file, alpn=["h2", "http/1.1"])
    with serve(connect_proxy_handler(proxy_ctx)) as proxy:
        async with our_client(pki, http2=True, proxy=f"https://localhost:{proxy.port}",
                              proxy_verify=pki.ca_file) as client:
            r1 = await client.get(f"https://localhost:{https_server.port}/tunnel1")
            r2 = await client.get(f"https://localhost:{https_server.port}/tunnel2")
            stream = r1.extensions["network_stream"]
            # TLS in TLS: the kernel socket is the one to the proxy
            assert stream.get_extra_info("socket").fileno() >= 0
            assert stream.get_extra_info("server_addr") == ("127.0.0.1", proxy.port)
            assert stream.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        assert (r1.text, r2.text) == ("h2 /tunnel1", "h2 /tunnel2")
        assert r1.http_version == "HTTP/2"
        assert proxy.record.alpn == ["http/1.1"]
        assert proxy.record.targets == [f"localhost:{https_server.port}"]


@pytest.mark.anyio
async def test_https_proxy_is_verified_with_proxy_verify(
        pki: Pki, other_pki: dict[str, Path], https_server: ThreadedServer) -> None:
    proxy_ctx = stdlib_server_ctx(other_pki["unknown"])
    with serve(connect_proxy_handler(proxy_ctx)) as proxy:
        async with our_client(pki, proxy=f"https://localhost:{proxy.port}",
                              proxy_verify=pki.ca_file) as client:
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await client.get(f"https://localhost:{https_server.port}/")
        assert proxy.record.targets == []
        async with our_client(pki, proxy=f"https://localhost:{proxy.port}",
                              proxy_verify=False) as client:
            r = await client.get(f"https://localhost:{https_server.port}/via")
        assert r.text == "hello GET /via 0"


@pytest.mark.anyio
async def test_http_proxy_connect(pki: Pki, https_server: ThreadedServer) -> None:
    with serve(connect_proxy_handler(None)) as proxy:
        async with our_client(pki, http2=True,
                              proxy=f"http://127.0.0.1:{proxy.port}") as client:
            r = await client.get(f"https://localhost:{https_server.port}/plainproxy")
        assert r.text == "h2 /plainproxy"
        assert proxy.record.targets == [f"localhost:{https_server.port}"]


@pytest.mark.anyio
async def test_environment_proxy_with_trust_env(pki: Pki, https_server: ThreadedServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    with serve(connect_proxy_handler(None)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        url = f"https://localhost:{https_server.port}/env"
        async with our_client(pki, trust_env=False) as client:
            r = await client.get(url)
        assert r.status_code == 200 and proxy.record.targets == []
        async with our_client(pki, trust_env=True) as client:
            mounted = [t for t in client._mounts.values() if t is not None]
            assert mounted and all(isinstance(t, AsyncTLSTransport) for t in mounted)
            r = await client.get(url)
        assert r.status_code == 200
        assert proxy.record.targets == [f"localhost:{https_server.port}"]
        monkeypatch.setenv("NO_PROXY", "localhost")
        async with our_client(pki, trust_env=True) as client:
            r = await client.get(url)
        assert r.status_code == 200
        assert len(proxy.record.targets) == 1


# == the httpcore backend itself =====================================================
@pytest.mark.anyio
async def test_backend_stream_extra_info(pki: Pki, https_server: ThreadedServer) -> None:
    ctx = pki.client_ctx()
    backend = AsyncTLSBackend(ctx, http2=True)
    with anyio.fail_after(TIMEOUT):
        stream = await backend.connect_tcp("127.0.0.1", https_server.port, timeout=TIMEOUT)
        assert isinstance(stream, AsyncTLSNetworkStream)
        assert stream.get_extra_info("ssl_object") is None
        client_addr = stream.get_extra_info("client_addr")
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", https_server.port)
        # httpcore passes a stdlib context: it is ignored, ours is used
        tls = await stream.start_tls(ssl.create_default_context(), "localhost", TIMEOUT)
        try:
            ssl_object = tls.get_extra_info("ssl_object")
            assert isinstance(ssl_object, A.TLSConnection)
            assert ssl_object.selected_alpn_protocol() == "h2"
            assert ssl_object.cipher() is not None
            assert ssl_object.getpeercert()["subjectAltName"]
            assert tls.get_extra_info("client_addr") == client_addr
            assert tls.get_extra_info("server_addr") == ("127.0.0.1", https_server.port)
            sock = tls.get_extra_info("socket")
            assert sock is not None and sock.fileno() >= 0
            assert tls.get_extra_info("no such thing") is None
            # h2 server: it sends its SETTINGS at once, so the socket becomes readable
            for _ in range(200):
                if tls.get_extra_info("is_readable"):
                    break
                await anyio.sleep(0.01)
            assert tls.get_extra_info("is_readable") is True
            data = await tls.read(65536, timeout=TIMEOUT)
            assert data  # h2 SETTINGS frame
        finally:
            await tls.aclose()


@pytest.mark.anyio
async def test_backend_idle_connection_not_readable(pki: Pki) -> None:
    async with our_server(pki.server_ctx()) as server:
        backend = AsyncTLSBackend(pki.client_ctx())
        with anyio.fail_after(TIMEOUT):
            stream = await backend.connect_tcp("127.0.0.1", server.port)
            tls = await stream.start_tls(backend.ssl_context, "localhost", TIMEOUT)
            await tls.write(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout=TIMEOUT)
            got = b""
            while not got.endswith(b"ours /idle"):
                chunk = await tls.read(65536, timeout=TIMEOUT)
                assert chunk
                got += chunk
            # everything was read: an idle keep-alive connection is not "readable"
            await anyio.sleep(0.05)
            assert tls.get_extra_info("is_readable") is False
            await server.connections[0].aclose()   # the server goes: now it is
            for _ in range(200):
                if tls.get_extra_info("is_readable"):
                    break
                await anyio.sleep(0.01)
            assert tls.get_extra_info("is_readable") is True
            assert await tls.read(100, timeout=TIMEOUT) == b""
            await tls.aclose()


@pytest.mark.anyio
async def test_backend_start_tls_failure_closes_stream(pki: Pki,
                                                       other_pki: dict[str, Path]) -> None:
    with serve(https_handler(stdlib_server_ctx(other_pki["unknown"]))) as server:
        backend = AsyncTLSBackend(pki.client_ctx())
        with anyio.fail_after(TIMEOUT):
            stream = await backend.connect_tcp("127.0.0.1", server.port)
            with pytest.raises(httpcore.ConnectError) as info:
                await stream.start_tls(backend.ssl_context, "localhost", TIMEOUT)
            assert isinstance(info.value.__cause__, A.CertificateVerifyError)
            with pytest.raises(httpcore.WriteError):
                await stream.write(b"x")


@pytest.mark.anyio
async def test_backend_write_after_peer_reset_is_write_error(pki: Pki) -> None:
    async def close_at_once(stream: AsyncTLSStream) -> None:
        await anyio.aclose_forcefully(stream)

    async with our_server(pki.server_ctx(), handler=close_at_once) as server:
        backend = AsyncTLSBackend(pki.client_ctx())
        with anyio.fail_after(TIMEOUT):
            stream = await backend.connect_tcp("127.0.0.1", server.port)
            tls = await stream.start_tls(backend.ssl_context, "localhost", TIMEOUT)
            with pytest.raises(httpcore.WriteError):
                for _ in range(1000):
                    await tls.write(b"x" * 65536, timeout=TIMEOUT)
                    await anyio.sleep(0)
            await tls.aclose()


@pytest.mark.anyio
async def test_backend_sleep() -> None:
    backend = AsyncTLSBackend(A.TLSContext(ssl.PROTOCOL_TLS_CLIENT))
    start = time.monotonic()
    await backend.sleep(0.05)
    assert time.monotonic() - start >= 0.04


# == arguments =========================================================================
def test_stdlib_context_is_refused_with_a_hint() -> None:
    hint = (r"verify must be an anyio_asyncssl\.TLSContext, not an ssl\.SSLContext.*"
            r"create_default_context.*verify= also takes a CA file")
    with pytest.raises(TypeError, match=hint):
        create_async_client(verify=ssl.create_default_context())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=hint):
        AsyncTLSTransport(verify=ssl.create_default_context())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"context must be an anyio_asyncssl\.TLSContext"):
        AsyncTLSBackend(ssl.create_default_context())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="proxy_verify"):
        create_async_client(proxy="https://localhost:1",
                            proxy_verify=ssl.create_default_context(),  # type: ignore[arg-type]
                            trust_env=False)


def test_server_context_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="server context"):
        create_async_client(verify=pki.server_ctx())


def test_user_context_used_as_is_except_alpn(pki: Pki, offload: A.Offload) -> None:
    ctx = pki.client_ctx(offload=offload)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    snapshot = (ctx.verify_mode, ctx.check_hostname, ctx.minimum_version, ctx.options)
    client = create_async_client(verify=ctx, http2=True, trust_env=False)
    # httpx types _transport as its base class; create_async_client puts ours there
    assert cast(AsyncTLSTransport, client._transport).context is ctx
    assert (ctx.verify_mode, ctx.check_hostname, ctx.minimum_version, ctx.options) == snapshot
    assert ctx.alpn_protocols == (b"h2", b"http/1.1")
    with pytest.raises(ValueError, match="load_cert_chain"):
        create_async_client(verify=ctx, cert=pki.client_file)
    with pytest.raises(ValueError, match="offload"):
        create_async_client(verify=ctx, offload=A.Offload(workers=1))
    # the same offload as the context's is fine
    create_async_client(verify=ctx, offload=offload, trust_env=False)


def test_alpn_lists(pki: Pki) -> None:
    ctx = pki.client_ctx()

    def alpn() -> tuple[bytes, ...]:
        """The context's list now (each AsyncTLSBackend sets it)."""
        return ctx.alpn_protocols

    AsyncTLSBackend(ctx)
    assert alpn() == (b"http/1.1",)
    AsyncTLSBackend(ctx, http2=True)
    assert alpn() == (b"h2", b"http/1.1")
    AsyncTLSBackend(ctx, http1=False, http2=True)
    assert alpn() == (b"h2",)
    with pytest.raises(ValueError, match="own TLSContext"):
        AsyncTLSBackend(ctx, http2=True, proxy_context=ctx)
    with pytest.raises(ValueError, match="http1 and http2"):
        AsyncTLSBackend(ctx, http1=False)


def test_other_refusals(pki: Pki) -> None:
    with pytest.raises(TypeError, match="transport"):
        create_async_client(transport=httpx.AsyncHTTPTransport())
    with pytest.raises(TypeError, match="proxy_verify"):
        create_async_client(proxy=httpx.Proxy("https://localhost:1",
                                              ssl_context=ssl.create_default_context()),
                            verify=pki.ca_file, trust_env=False)
    with pytest.raises(FileNotFoundError):
        create_async_client(verify=pki.tmp / "no-such-ca.pem")
    with pytest.raises(FileNotFoundError):
        create_async_client(verify=pki.ca_file, cert=pki.tmp / "no-such-cert.pem")
    with pytest.raises(TypeError):
        create_async_client(verify=1)  # type: ignore[arg-type]


def test_import_without_httpx_names_the_extra() -> None:
    code = ("import sys; sys.modules['httpx'] = None\n"
            "try:\n    import anyio_asyncssl.httpx\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "pip install 'anyio-asyncssl[httpx]'" in out.stdout
    # and the core package never imports httpx
    code = "import anyio_asyncssl, anyio_asyncssl.stream, sys; print('httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"
