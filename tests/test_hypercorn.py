"""hypercorn's trio worker on our TrioTLSListener (``anyio_asyncssl.hypercorn``).

The server runs in the test's ``trio.run`` with the session's offload; the
clients are real ones: httpx (HTTP/1.1 and h2 over the stdlib's ssl, in a
worker thread), a raw stdlib ``ssl`` socket where the TLS closure itself is
checked, and curl.  Every wait is bounded; only loopback is used.

What proves it is our stack and not hypercorn's ``trio.SSLListener``: the
offload's ``sign_ops`` move with each handshake, the app sees the ASGI TLS
extension, and ``Connection: close`` ends with a close_notify.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from conftest import Pki, require_tool

import anyio_asyncssl as A

pytest.importorskip("hypercorn", reason="needs hypercorn: pip install 'anyio-asyncssl[hypercorn]'")
if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx", reason="needs httpx with h2: pip install 'httpx[http2]'")
pytest.importorskip("h2", reason="needs httpx with h2: pip install 'httpx[http2]'")

from hypercorn.config import Config

from anyio_asyncssl.hypercorn import serve, tls_context_from_config

if TYPE_CHECKING:
    from hypercorn.typing import Scope

TIMEOUT = 60  # seconds for a whole test (2 shared cores: generous)
CLIENT_TIMEOUT = 20  # seconds for one client request
TLS_IDS = {"1.2": 0x0303, "1.3": 0x0304}


def run(main: Callable[[], Awaitable[object]], timeout: float = TIMEOUT) -> None:
    async def bounded() -> None:
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


# -- the app ---------------------------------------------------------------------
@dataclass
class App:
    """A tiny ASGI app; its paths are the tests' endpoints."""

    lifespan: list[str] = field(default_factory=list)
    slow_started: trio.Event = field(default_factory=trio.Event)
    slow_finished: bool = False

    # receive and send stay loose: hypercorn's event TypedDicts make keys the ASGI
    # spec leaves optional (more_body) required
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/octet-stream")]
        if path == "/info":
            body = json.dumps({
                "http_version": scope["http_version"],
                "scheme": scope["scheme"],
                "extensions": sorted(scope.get("extensions") or {}),
                "tls": (scope.get("extensions") or {}).get("tls"),
            }).encode()
            await respond(send, body, [(b"content-type", b"application/json")])
        elif path == "/stream":  # a large body, streamed in 64 KiB chunks
            data = pattern(int(query["size"]))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(0, len(data), 65536):
                await send({"type": "http.response.body", "body": data[i:i + 65536],
                            "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/upload":  # reads a large request body
            digest = hashlib.sha256()
            size = 0
            while True:
                message = await receive()
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await respond(send, f"{size} {digest.hexdigest()}".encode(), headers)
        elif path == "/close":  # the app ends the connection
            await respond(send, pattern(int(query["size"])),
                          [*headers, (b"connection", b"close")])
        elif path == "/slow":
            self.slow_started.set()
            await trio.sleep(float(query["delay"]))
            self.slow_finished = True
            await respond(send, pattern(int(query.get("size", "100000"))), headers)
        else:
            await respond(send, b"not found", headers, status=404)


async def respond(send: Any, body: bytes, headers: list[tuple[bytes, bytes]],
                  status: int = 200) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the server ----------------------------------------------------------------
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]

    def tracebacks(self) -> str:
        """The ERROR records in full (with their exceptions), for a failure's message."""
        fmt = logging.Formatter()
        return "\n".join(fmt.format(r) for r in self.records if r.levelno >= logging.ERROR)


def make_config(pki: Pki | None, **settings: Any) -> Config:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    if pki is not None:
        config.certfile = config.keyfile = str(pki.rsa_file)
    config.loglevel = "INFO"
    for key, value in settings.items():
        setattr(config, key, value)
    return config


@dataclass
class Served:
    app: App
    binds: list[str]
    stop: trio.Event
    returned: trio.Event
    log: Records

    @property
    def url(self) -> str:
        return next(b for b in self.binds if b.startswith("https://"))

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port


@asynccontextmanager
async def serving(config: Config, **kw: Any) -> AsyncIterator[Served]:
    """serve() in a nursery until the block ends; then a graceful stop, bounded.

    hypercorn errors are logged to a handler of ours: any ERROR fails the test.
    """
    log = Records()
    logger = logging.getLogger(f"test_hypercorn.{id(log)}")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    config.errorlog = logger
    app = App()
    stop, returned = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:

        async def server(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status, **kw)
            returned.set()

        binds = await nursery.start(server)
        served = Served(app, binds, stop, returned, log)
        try:
            yield served
        finally:
            stop.set()
        with trio.fail_after(config.graceful_timeout + 15):
            await returned.wait()
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
    assert log.errors() == [], log.tracebacks()


# -- the clients -----------------------------------------------------------------
def client_ssl(pki: Pki, tls: str | None = None, cert: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif tls == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a blocking client call in a thread (abandoned if the test times out)."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw), abandon_on_cancel=True)


def httpx_request(ctx: ssl.SSLContext, http2: bool, method: str, url: str,
                  **kw: Any) -> httpx.Response:
    with httpx.Client(http2=http2, verify=ctx, timeout=CLIENT_TIMEOUT) as client:
        response = client.request(method, url, **kw)
        response.read()
        return response


def raw_tls_request(ctx: ssl.SSLContext, port: int, request: bytes) -> bytes:
    """Send one request and read until the TLS connection ends.

    A transport EOF without close_notify raises ``ssl.SSLEOFError`` here
    (``suppress_ragged_eofs=False``): only a clean TLS closure returns.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost",
                            suppress_ragged_eofs=False) as tls:
        tls.sendall(request)
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
        return bytes(data)


def parse_http11(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def require_curl() -> str:
    return require_tool("curl", "curl")


async def curl(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(CLIENT_TIMEOUT + 5):
        proc = await trio.run_process(
            [require_curl(), "-sS", "--max-time", str(CLIENT_TIMEOUT), *args],
            capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def first_pem_cert(path: Path) -> str:
    text = path.read_text()
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return text[begin:end] + "\n"


# -- tls_context_from_config -------------------------------------------------------
def test_context_from_config_matches_create_ssl_context(pki: Pki, offload: A.Offload) -> None:
    config = make_config(pki, ca_certs=str(pki.ca_file), verify_mode=ssl.CERT_OPTIONAL)
    reference = config.create_ssl_context()
    assert reference is not None
    ctx = tls_context_from_config(config, offload=offload)
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER
    assert ctx.offload is offload
    assert ctx.minimum_version == reference.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.alpn_protocols == (b"h2", b"http/1.1")
    assert ctx.verify_mode == reference.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_context_from_config_errors(pki: Pki, offload: A.Offload) -> None:
    with pytest.raises(ValueError, match="certfile"):
        tls_context_from_config(make_config(None), offload=offload)
    with pytest.raises(A.TLSError):
        tls_context_from_config(make_config(pki, ciphers="NO-SUCH-CIPHER"), offload=offload)
    with pytest.raises(A.TLSFileNotFoundError):
        tls_context_from_config(make_config(pki, certfile=str(pki.tmp / "missing.pem")),
                                offload=offload)
    with pytest.raises(ValueError, match="verify_flags"):
        tls_context_from_config(make_config(pki, verify_flags=ssl.VERIFY_CRL_CHECK_LEAF),
                                offload=offload)
    # VERIFY_X509_TRUSTED_FIRST is what OpenSSL does anyway
    tls_context_from_config(make_config(pki, verify_flags=ssl.VERIFY_X509_TRUSTED_FIRST),
                            offload=offload)
    with pytest.raises(ValueError, match="priority"):
        tls_context_from_config(make_config(pki, asyncssl_offload_priority="fast"))
    with pytest.raises(TypeError, match="workers"):
        tls_context_from_config(make_config(pki, asyncssl_offload_workers="2"))


def test_offload_settings_from_config(pki: Pki) -> None:
    config = Config.from_mapping(certfile=str(pki.rsa_file), keyfile=str(pki.rsa_file),
                                 asyncssl_offload_workers=1, asyncssl_offload_priority="normal")
    ctx = tls_context_from_config(config)
    assert ctx.offload is not None and ctx.offload is not A.default_offload()
    assert ctx.offload.workers == 1
    ctx.offload.close()
    config = Config.from_mapping(certfile=str(pki.rsa_file), keyfile=str(pki.rsa_file),
                                 asyncssl_offload=False)
    assert tls_context_from_config(config).offload is None
    config = Config.from_mapping(certfile=str(pki.rsa_file), keyfile=str(pki.rsa_file))
    assert tls_context_from_config(config).offload is A.default_offload()
    # The private Offload's library context must be freed on this thread, the
    # one that used it: a TLSContext is freed by the cycle collector, which may
    # run on a client thread of a later test, and OpenSSL 3.0 then leaves this
    # thread's handlers for the freed context behind; OPENSSL_cleanup() at exit
    # runs them and crashes (a library issue, not this module's).
    del ctx
    gc.collect()


def test_serve_argument_errors(pki: Pki, offload: A.Offload) -> None:
    ctx = pki.server_ctx(offload=offload)

    async def main() -> None:
        with pytest.raises(ValueError, match="certfile"):
            await serve(App(), make_config(None), offload=offload)
        with pytest.raises(ValueError, match="not both"):
            await serve(App(), make_config(None), context=ctx, offload=offload)
        with pytest.raises(ValueError, match="client context"):
            await serve(App(), make_config(None), context=pki.client_ctx())
        with pytest.raises(ValueError, match="quic"):
            await serve(App(), make_config(pki, quic_bind=["127.0.0.1:0"]), offload=offload)
        with pytest.raises(ValueError, match="insecure_bind"):
            await serve(App(), make_config(None, insecure_bind=["127.0.0.1:0"]), context=ctx)

    run(main)


# -- HTTP/1.1 and h2, TLS 1.2 and 1.3 --------------------------------------------
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_httpx(pki: Pki, offload: A.Offload, http2: bool, tls: str) -> None:
    ctx = client_ssl(pki, tls)
    signs = offload.stats().sign_ops

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            for _ in range(2):  # two connections, two handshakes
                r = await in_thread(httpx_request, ctx, http2, "GET", served.url + "/info")
                assert r.status_code == 200
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                info = r.json()
                assert info["http_version"] == ("2" if http2 else "1.1")
                assert info["scheme"] == "https"
                tls_ext = info["tls"]
                assert tls_ext["tls_version"] == TLS_IDS[tls]
                assert isinstance(tls_ext["cipher_suite"], int)
                if tls == "1.3":
                    assert tls_ext["cipher_suite"] >> 8 == 0x13
                assert tls_ext["server_cert"] == first_pem_cert(pki.rsa_file)
                assert tls_ext["client_cert_chain"] == []
                assert tls_ext["client_cert_name"] is None

    run(main)
    assert offload.stats().sign_ops >= signs + 2


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_large_bodies(pki: Pki, offload: A.Offload, http2: bool) -> None:
    size = 4 * 1024 * 1024
    ctx = client_ssl(pki)

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            r = await in_thread(httpx_request, ctx, http2, "GET",
                                f"{served.url}/stream?size={size}")
            assert r.status_code == 200
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert len(r.content) == size
            assert hashlib.sha256(r.content).digest() == hashlib.sha256(pattern(size)).digest()
            upload = os.urandom(size // 2)
            r = await in_thread(httpx_request, ctx, http2, "POST", served.url + "/upload",
                                content=upload)
            assert r.text == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"

    run(main)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_curl(pki: Pki, offload: A.Offload, tmp_path: Path, http: str, tls: str) -> None:
    require_curl()
    versions = ["--tlsv1.2", "--tls-max", "1.2"] if tls == "1.2" else ["--tlsv1.3"]
    size = 2 * 1024 * 1024
    signs = offload.stats().sign_ops

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            out = tmp_path / "info.json"
            code, stdout, stderr = await curl(
                http, *versions, "--cacert", str(pki.ca_file), "-o", str(out),
                "-w", "%{http_version} %{response_code}", served.url + "/info")
            assert code == 0, stderr
            assert stdout == ("2 200" if http == "--http2" else "1.1 200")
            info = json.loads(out.read_text())
            assert info["http_version"] == ("2" if http == "--http2" else "1.1")
            assert info["tls"]["tls_version"] == TLS_IDS[tls]

            big = tmp_path / "big.bin"
            code, stdout, stderr = await curl(
                http, *versions, "--cacert", str(pki.ca_file), "-o", str(big),
                "-w", "%{size_download}", f"{served.url}/stream?size={size}")
            assert code == 0, stderr
            assert big.read_bytes() == pattern(size)

    run(main)
    assert offload.stats().sign_ops >= signs + 2


# -- Connection: close --------------------------------------------------------------
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("who", ["app", "client"])
def test_connection_close_is_complete_and_clean(pki: Pki, offload: A.Offload,
                                                who: str, tls: str) -> None:
    """The whole response arrives, then close_notify (a ragged EOF would raise)."""
    size = 1_000_000
    ctx = client_ssl(pki, tls)
    if who == "app":
        request = f"GET /close?size={size} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    else:
        request = (f"GET /stream?size={size} HTTP/1.1\r\nHost: localhost\r\n"
                   "Connection: close\r\n\r\n").encode()

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            data = await in_thread(raw_tls_request, ctx, served.port, request)
            status, headers, body = parse_http11(data)
            assert status == 200
            assert headers.get("connection") == "close"
            if "content-length" in headers:
                assert int(headers["content-length"]) == size
                assert body == pattern(size)
            else:  # chunked (the streamed body): the payload is all there, in order
                assert headers["transfer-encoding"] == "chunked"
                assert body.endswith(b"0\r\n\r\n") and len(body) > size

    run(main)


def test_many_connection_closes_keep_the_server_up(pki: Pki, offload: A.Offload) -> None:
    """Closing races the connection's read loop (the app's task closes the
    stream while the reader waits): every one must end as a closed stream,
    never as an error that takes the server down."""
    size = 20_000
    contexts = [client_ssl(pki, "1.2"), client_ssl(pki, "1.3")]
    requests = [f"GET /close?size={size} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
                (f"GET /stream?size={size} HTTP/1.1\r\nHost: localhost\r\n"
                 "Connection: close\r\n\r\n").encode()]

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            for i in range(100):
                data = await in_thread(raw_tls_request, contexts[i % 2], served.port,
                                       requests[(i // 2) % 2])
                assert parse_http11(data)[0] == 200

    run(main)


def test_curl_connection_close(pki: Pki, offload: A.Offload, tmp_path: Path) -> None:
    require_curl()
    size = 1_000_000

    async def main() -> None:
        async with serving(make_config(pki), offload=offload) as served:
            out = tmp_path / "close.bin"
            code, stdout, stderr = await curl(
                "--http1.1", "--cacert", str(pki.ca_file), "-o", str(out),
                "-w", "%{response_code} %{size_download}", f"{served.url}/close?size={size}")
            assert code == 0, stderr
            assert stdout == f"200 {size}"
            assert out.read_bytes() == pattern(size)

    run(main)


# -- graceful shutdown -------------------------------------------------------------
async def refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


def httpx_stream_body(ctx: ssl.SSLContext, http2: bool, url: str) -> tuple[str, int, bytes,
                                                                         Exception | None]:
    """GET with a streamed body: (http_version, status, the bytes received, the error at the end).

    hypercorn 0.18's h2 graceful close (protocol/h2.py) sends GOAWAY when the
    last stream's buffer is drained, which can be before that stream's
    END_STREAM; h2 then refuses to send END_STREAM after GOAWAY, and httpcore
    raises RemoteProtocolError (ConnectionTerminated) after the whole body.
    Stock hypercorn does the same.  The caller decides what it tolerates.
    """
    body = bytearray()
    with httpx.Client(http2=http2, verify=ctx, timeout=CLIENT_TIMEOUT) as client, \
            client.stream("GET", url) as response:
        try:
            for chunk in response.iter_bytes():
                body += chunk
        except httpx.RemoteProtocolError as exc:
            return response.http_version, response.status_code, bytes(body), exc
        return response.http_version, response.status_code, bytes(body), None


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_graceful_shutdown(pki: Pki, offload: A.Offload, http2: bool) -> None:
    """shutdown_trigger during a slow request: it completes, new connections are
    refused, serve returns (well before graceful_timeout)."""
    ctx = client_ssl(pki)
    delay, size = 2.0, 500_000
    config = make_config(pki, graceful_timeout=30.0)

    async def main() -> None:
        results: list[tuple[str, int, bytes, Exception | None]] = []
        async with serving(config, offload=offload) as served, \
                trio.open_nursery() as nursery:

            async def slow_client() -> None:
                results.append(await in_thread(
                    httpx_stream_body, ctx, http2,
                    f"{served.url}/slow?delay={delay}&size={size}"))

            nursery.start_soon(slow_client)
            await served.app.slow_started.wait()
            triggered = time.monotonic()
            served.stop.set()
            with trio.fail_after(5):
                while not await refused(served.port):
                    await trio.sleep(0.05)
            assert not served.app.slow_finished, "new connections were accepted too long"
            with trio.fail_after(delay + 20):
                await served.returned.wait()
            elapsed = time.monotonic() - triggered
            assert served.app.slow_finished
            assert elapsed < config.graceful_timeout, "serve waited for the graceful timeout"
        assert len(results) == 1
        http_version, status, body, error = results[0]
        assert http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert status == 200
        assert body == pattern(size)  # the whole response was delivered
        if error is not None:
            # only hypercorn's early GOAWAY (see httpx_stream_body), only on h2:
            # a graceful one (NO_ERROR) that covers the request's stream
            assert http2, error
            assert "ConnectionTerminated error_code:0, last_stream_id:1," in str(error)

    run(main)


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_curl_graceful_shutdown(pki: Pki, offload: A.Offload, tmp_path: Path, http: str) -> None:
    """curl (nghttp2) takes hypercorn's early h2 GOAWAY in its stride: no tolerance here."""
    require_curl()
    delay, size = 1.5, 300_000
    out = tmp_path / "slow.bin"

    async def main() -> None:
        results: list[tuple[int, str, str]] = []
        async with serving(make_config(pki, graceful_timeout=30.0), offload=offload) as served, \
                trio.open_nursery() as nursery:

            async def slow_client() -> None:
                results.append(await curl(
                    http, "--cacert", str(pki.ca_file), "-o", str(out),
                    "-w", "%{http_version} %{response_code}",
                    f"{served.url}/slow?delay={delay}&size={size}"))

            nursery.start_soon(slow_client)
            await served.app.slow_started.wait()
            served.stop.set()
            with trio.fail_after(delay + 20):
                await served.returned.wait()
        code, stdout, stderr = results[0]
        assert code == 0, stderr
        assert stdout == ("2 200" if http == "--http2" else "1.1 200")
        assert out.read_bytes() == pattern(size)

    run(main)


def test_graceful_timeout_cuts_slow_requests(pki: Pki, offload: A.Offload) -> None:
    ctx = client_ssl(pki)
    config = make_config(pki, graceful_timeout=0.5)

    async def main() -> None:
        errors: list[BaseException] = []
        async with serving(config, offload=offload) as served, \
                trio.open_nursery() as nursery:

            async def slow_client() -> None:
                try:
                    await in_thread(httpx_request, ctx, False, "GET",
                                    f"{served.url}/slow?delay=60")
                except httpx.TransportError as exc:
                    errors.append(exc)

            nursery.start_soon(slow_client)
            await served.app.slow_started.wait()
            triggered = time.monotonic()
            served.stop.set()
            with trio.fail_after(10):
                await served.returned.wait()
            assert time.monotonic() - triggered < 8
        assert not served.app.slow_finished
        assert len(errors) == 1  # the connection was closed under the request

    run(main)


# -- handshakes ----------------------------------------------------------------------
def test_mutual_tls(pki: Pki, offload: A.Offload) -> None:
    config = make_config(pki, ca_certs=str(pki.ca_file), verify_mode=ssl.CERT_REQUIRED)
    with_cert = client_ssl(pki, cert=pki.client_file)
    without = client_ssl(pki)

    async def main() -> None:
        async with serving(config, offload=offload) as served:
            r = await in_thread(httpx_request, with_cert, True, "GET", served.url + "/info")
            assert r.http_version == "HTTP/2"
            tls_ext = r.json()["tls"]
            assert tls_ext["client_cert_chain"][0] == first_pem_cert(pki.client_file)
            assert "CN=test client" in tls_ext["client_cert_name"]
            assert tls_ext["client_cert_error"] is None
            with pytest.raises(httpx.TransportError):
                await in_thread(httpx_request, without, True, "GET", served.url + "/info")
            # the server goes on
            r = await in_thread(httpx_request, with_cert, False, "GET", served.url + "/info")
            assert r.status_code == 200

    run(main)


def read_until_closed(port: int, send: bytes) -> bytes:
    """Plain TCP: send ``send``, read until the server closes (bounded by the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        if send:
            s.sendall(send)
        data = bytearray()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return bytes(data)


@pytest.mark.parametrize("client", ["http-on-https-port", "silent"])
def test_failed_handshake_closes_connection(pki: Pki, offload: A.Offload, client: str) -> None:
    """A failed or timed-out handshake closes the connection promptly (we close
    the stream; hypercorn drops it for CPython's refcounting to close) and the
    server keeps serving."""
    config = make_config(pki, ssl_handshake_timeout=0.5)
    ctx = client_ssl(pki)

    async def main() -> None:
        async with serving(config, offload=offload) as served:
            started = time.monotonic()
            send = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if client != "silent" else b""
            data = await in_thread(read_until_closed, served.port, send)
            assert time.monotonic() - started < 10
            assert b"HTTP/1.1" not in data
            r = await in_thread(httpx_request, ctx, True, "GET", served.url + "/info")
            assert r.status_code == 200

    run(main)


# -- other binds and contexts -------------------------------------------------------
def test_insecure_bind_is_plain_http(pki: Pki, offload: A.Offload) -> None:
    config = make_config(pki, insecure_bind=["127.0.0.1:0"])
    ctx = client_ssl(pki)

    async def main() -> None:
        async with serving(config, offload=offload) as served:
            plain = next(b for b in served.binds if b.startswith("http://"))
            r = await in_thread(httpx_request, ctx, False, "GET", plain + "/info")
            assert r.json()["scheme"] == "http"
            assert r.json()["tls"] is None  # the TLS extension is for TLS only
            r = await in_thread(httpx_request, ctx, True, "GET", served.url + "/info")
            assert r.http_version == "HTTP/2" and r.json()["scheme"] == "https"

    run(main)


def test_explicit_context(pki: Pki, offload: A.Offload) -> None:
    """serve(context=...) with a config that has no certificate: bind is served over TLS."""
    server_ctx = pki.server_ctx("ec", offload=offload)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx = client_ssl(pki, "1.2")
    signs = offload.stats().sign_ops

    async def main() -> None:
        async with serving(make_config(None), context=server_ctx) as served:
            r = await in_thread(httpx_request, ctx, True, "GET", served.url + "/info")
            assert r.http_version == "HTTP/2"
            assert r.json()["tls"]["tls_version"] == TLS_IDS["1.2"]
            assert r.json()["tls"]["server_cert"] is None  # not known for a given context

    run(main)
    assert offload.stats().sign_ops >= signs + 1
