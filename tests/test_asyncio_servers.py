"""Real asyncio servers and clients on our TLS: uvicorn, aiohttp, hypercorn's asyncio worker.

Each test runs the recipe a user would write (see ``examples/uvicorn_app.py``,
``examples/aiohttp_app.py`` and ``anyio_asyncssl.recipes``) with the real
package, the server's key loaded into a :class:`~anyio_asyncssl.TLSContext`
with the session's offload, in a thread with its own loop (or, for the
examples, in a subprocess), on loopback only, with free ports and bounded
waits.  The clients are implementations we did not write: httpx (the
stdlib's ``ssl``) and curl (its own TLS library), forced to TLS 1.2 or 1.3.

What proves it is our TLS and not asyncio's: the offload's ``sign_ops``
move with every handshake (only our contexts use the offload), the app
runs on our loop class, the servers see ``https`` (they ask the transport
for ``sslcontext``), and aiohttp's handlers see our ``TLSConnection``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import pytest
from conftest import Pki, require_tool

import anyio_asyncssl as A
from anyio_asyncssl.asyncio import new_event_loop, new_uvloop_event_loop
from anyio_asyncssl.asyncio_tls import TLSTransport

if TYPE_CHECKING:  # optional: the tests that need them skip without them
    from hypercorn.config import Config

    from anyio_asyncssl.recipes import TLSConnector

httpx = pytest.importorskip("httpx", reason="needs httpx with h2: pip install 'httpx[http2]'")

TIMEOUT = 30.0          # seconds for a server to start or stop
CLIENT_TIMEOUT = 20.0   # seconds for one client exchange
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": new_event_loop,
    "uvloop": new_uvloop_event_loop,
}
LOOP_IMPORT_STRINGS = {
    "asyncio": "anyio_asyncssl.asyncio:new_event_loop",
    "uvloop": "anyio_asyncssl.asyncio:new_uvloop_event_loop",
}
OUR_LOOPS = {"asyncio": "TLSEventLoop", "uvloop": "UVLoopTLSEventLoop"}


def need(module: str, install: str) -> Any:
    return pytest.importorskip(module, reason=f"needs {module}: pip install {install}")


def need_loop(loop: str) -> None:
    if loop == "uvloop":
        need("uvloop", "uvloop")


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign_ops(offload: A.Offload) -> int:
    return offload.stats().sign_ops


def server_context(pki: Pki, offload: A.Offload, *alpn: str) -> A.TLSContext:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    ctx.load_cert_chain(pki.rsa_file)
    ctx.set_alpn_protocols(list(alpn) or ["http/1.1"])
    return ctx


def stdlib_client_context(pki: Pki, tls: str) -> ssl.SSLContext:
    """A new stdlib client context (httpx sets ALPN on it) pinned to one TLS version."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[tls]
    return ctx


# -- clients -------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    http_version: str
    tls_version: str | None
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def httpx_exchange(pki: Pki, tls: str, requests: list[tuple[str, str, bytes | None]], *,
                   http2: bool = False) -> list[Reply]:
    """The requests, in order, on one httpx client (one connection, kept alive)."""
    replies = []
    with httpx.Client(verify=stdlib_client_context(pki, tls), http2=http2,
                      timeout=CLIENT_TIMEOUT) as client:
        for method, url, body in requests:
            r = client.request(method, url, content=body)
            stream = r.extensions["network_stream"]
            tls_object = stream.get_extra_info("ssl_object")
            replies.append(Reply(r.status_code, r.http_version,
                                 tls_object.version() if tls_object else None, r.content))
    return replies


def require_curl() -> str:
    return require_tool("curl", "curl")


@dataclass
class CurlResult:
    bodies: list[bytes]
    http_versions: list[str]
    tls_versions: list[str]   # one per handshake
    stderr: str


def curl(pki: Pki, tls: str, urls: list[str], *, http2: bool = False) -> CurlResult:
    """GET the URLs with one curl (reusing its connection), pinned to one TLS version."""
    marker = "\n--curl-http-version:%{http_version}--\n"
    proc = subprocess.run(
        [require_curl(), "-sS", "-v", "--max-time", str(CLIENT_TIMEOUT),
         "--cacert", str(pki.ca_file), f"--tlsv{tls}", "--tls-max", tls,
         "--http2" if http2 else "--http1.1", "-w", marker, *urls],
        capture_output=True, timeout=CLIENT_TIMEOUT + 10, check=False)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr
    parts = re.split(rb"\n--curl-http-version:([0-9.]+)--\n", proc.stdout)
    bodies, versions = parts[0:-1:2], [v.decode() for v in parts[1::2]]
    return CurlResult(bodies, versions,
                      re.findall(r"SSL connection using (TLSv1\.[23])", stderr), stderr)


# -- apps ----------------------------------------------------------------------------
def info(scheme: str, http_version: str, body: bytes) -> dict[str, Any]:
    return {"scheme": scheme, "http_version": http_version,
            "loop": type(asyncio.get_running_loop()).__name__,
            "body_len": len(body), "body_sha256": sha256(body)}


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI app (hypercorn): ``/info`` (echoes a body's digest), ``/bytes?n=``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/bytes":
        payload = pattern(int(parse_qs(scope["query_string"].decode())["n"][0]))
    else:
        payload = json.dumps(info(scope["scheme"], scope["http_version"], body)).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(payload)).encode())]})
    for i in range(0, len(payload), 65536):
        await send({"type": "http.response.body", "body": payload[i:i + 65536],
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def starlette_app() -> Any:
    need("starlette", "starlette")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def info_endpoint(request: Request) -> JSONResponse:
        # a GET's body is not read: over h2, uvicorn 0.54's zttp protocol never ends it
        # (also with the stdlib's TLS)
        body = await request.body() if request.method == "POST" else b""
        return JSONResponse(info(request.url.scheme, request.scope["http_version"], body))

    async def bytes_endpoint(request: Request) -> Response:
        return Response(pattern(int(request.query_params["n"])))

    return Starlette(routes=[Route("/info", info_endpoint, methods=["GET", "POST"]),
                             Route("/bytes", bytes_endpoint)])


def fastapi_app() -> Any:
    need("fastapi", "fastapi")
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    async def info_endpoint(request: Request) -> dict[str, Any]:
        return info(request.url.scheme, request.scope["http_version"], await request.body())

    async def bytes_endpoint(n: int) -> Response:
        return Response(pattern(n))

    # this module's annotations are strings (``from __future__ import annotations``) that
    # FastAPI resolves in the module's globals, where these local imports are not
    info_endpoint.__annotations__ = {"request": Request, "return": dict[str, Any]}
    bytes_endpoint.__annotations__ = {"n": int, "return": Response}
    app.api_route("/info", methods=["GET", "POST"])(info_endpoint)
    app.get("/bytes")(bytes_endpoint)
    return app


# -- running a server in a thread --------------------------------------------------------
@dataclass
class LoopThread:
    """A server coroutine on its own loop in a thread; records the loop's exception handler."""

    port: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None
    errors: list[BaseException] = field(default_factory=list)
    loop_errors: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def serving(loop_factory: Callable[[], asyncio.AbstractEventLoop],
            serve: Callable[[asyncio.Event, Callable[[int], None]], Awaitable[None]],
            ) -> Iterator[LoopThread]:
    """``serve(stop, started)`` in a thread on ``loop_factory()``; stopped (bounded) on exit."""
    state = LoopThread()
    ready = threading.Event()

    def started(port: int) -> None:
        state.port = port
        ready.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: state.loop_errors.append(context))
        state.loop, state.stop = loop, asyncio.Event()
        await serve(state.stop, started)

    def target() -> None:
        loop = loop_factory()
        try:
            loop.run_until_complete(main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:
            state.errors.append(exc)
        finally:
            loop.close()
            ready.set()

    thread = threading.Thread(target=target, name="server loop", daemon=True)
    thread.start()
    try:
        assert ready.wait(TIMEOUT), "the server did not start"
        if state.errors:
            raise state.errors[0]
        yield state
    finally:
        if state.loop is not None and state.stop is not None and not state.loop.is_closed():
            state.loop.call_soon_threadsafe(state.stop.set)
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "the server did not stop"
    if state.errors:
        raise state.errors[0]
    assert not state.loop_errors, state.loop_errors


def free_listening_fd() -> tuple[int, int]:
    """A listening loopback TCP socket's fd (the caller owns it) and its port.

    Listening already, so a client that connects before the server accepts waits in
    the backlog instead of being refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    return sock.detach(), port


# -- uvicorn ----------------------------------------------------------------------------
@contextmanager
def uvicorn_server(app: Any, context: A.TLSContext, loop: str, **config: Any,
                   ) -> Iterator[int]:
    """The uvicorn recipe, run in a thread: ``Config(loop=<import string>)``, ``load()``,
    ``config.ssl = context``, ``Server(config).run()``."""
    uvicorn = need("uvicorn", "uvicorn")
    if not hasattr(uvicorn.Config, "get_loop_factory"):
        pytest.skip("needs uvicorn >= 0.36 (loop= as a loop factory's import string): "
                    "pip install -U uvicorn")
    cfg = uvicorn.Config(app, host="127.0.0.1", port=0, loop=LOOP_IMPORT_STRINGS[loop],
                         log_level="warning", timeout_graceful_shutdown=10, **config)
    cfg.load()
    cfg.ssl = context
    server = uvicorn.Server(cfg)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:   # SystemExit on a startup failure
            errors.append(exc)

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert not errors, errors
            assert thread.is_alive(), "uvicorn stopped during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "uvicorn did not stop"
    assert not errors, errors


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_starlette_httpx(pki: Pki, offload: A.Offload, loop: str, tls: str) -> None:
    need_loop(loop)
    upload = pattern(1_000_000)
    before = sign_ops(offload)
    with uvicorn_server(starlette_app(), server_context(pki, offload), loop) as port:
        url = f"https://localhost:{port}"
        replies = httpx_exchange(pki, tls, [("GET", f"{url}/info", None),
                                            ("POST", f"{url}/info", upload),
                                            ("GET", f"{url}/bytes?n=3000000", None)])
        assert sign_ops(offload) - before >= 1   # one handshake, its signature offloaded
    for r in replies:
        assert (r.status, r.http_version, r.tls_version) == (200, "HTTP/1.1", f"TLSv{tls}")
    first, posted, big = replies
    assert first.json()["scheme"] == "https"
    assert first.json()["loop"] == OUR_LOOPS[loop]
    assert (posted.json()["body_len"], posted.json()["body_sha256"]) == (len(upload),
                                                                         sha256(upload))
    assert big.content == pattern(3_000_000)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_uvicorn_curl(pki: Pki, offload: A.Offload, tls: str) -> None:
    before = sign_ops(offload)
    with uvicorn_server(starlette_app(), server_context(pki, offload), "asyncio") as port:
        url = f"https://localhost:{port}"
        result = curl(pki, tls, [f"{url}/info", f"{url}/bytes?n=1000000"])
        assert sign_ops(offload) - before >= len(result.tls_versions) >= 1
    assert result.tls_versions == [f"TLSv{tls}"], result.stderr   # one connection, kept alive
    assert result.http_versions == ["1.1", "1.1"]
    assert json.loads(result.bodies[0])["scheme"] == "https"
    assert result.bodies[1] == pattern(1_000_000)


def test_uvicorn_fastapi(pki: Pki, offload: A.Offload) -> None:
    before = sign_ops(offload)
    with uvicorn_server(fastapi_app(), server_context(pki, offload), "asyncio") as port:
        replies = httpx_exchange(pki, "1.3", [("POST", f"https://localhost:{port}/info", b"hi"),
                                              ("GET", f"https://localhost:{port}/bytes?n=70000",
                                               None)])
        assert sign_ops(offload) - before >= 1
    assert replies[0].json()["scheme"] == "https"
    assert replies[0].json()["loop"] == "TLSEventLoop"
    assert replies[0].json()["body_sha256"] == sha256(b"hi")
    assert replies[1].content == pattern(70000)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_uvicorn_h2_with_zttp(pki: Pki, offload: A.Offload, tls: str) -> None:
    """uvicorn 0.54 serves h2 with ``http="zttp", http2=True``; it picks h2 from our ALPN."""
    uvicorn = need("uvicorn", "uvicorn")
    if "http2" not in uvicorn.Config.__init__.__code__.co_varnames:
        pytest.skip("this uvicorn has no HTTP/2 (uvicorn >= 0.54 with zttp has)")
    need("zttp", "zttp")
    need("h2", "'httpx[http2]'")
    context = server_context(pki, offload, "h2", "http/1.1")
    before = sign_ops(offload)
    with uvicorn_server(starlette_app(), context, "asyncio", http="zttp", http2=True) as port:
        url = f"https://localhost:{port}"
        replies = httpx_exchange(pki, tls, [("GET", f"{url}/info", None),
                                            ("GET", f"{url}/bytes?n=1000000", None)],
                                 http2=True)
        result = curl(pki, tls, [f"{url}/info"], http2=True)
        assert sign_ops(offload) - before >= 2
    assert [(r.http_version, r.tls_version) for r in replies] == [("HTTP/2", f"TLSv{tls}")] * 2
    assert replies[0].json()["http_version"] == "2"
    assert replies[1].content == pattern(1_000_000)
    assert (result.http_versions, result.tls_versions) == (["2"], [f"TLSv{tls}"])


# -- aiohttp: the server ------------------------------------------------------------------
def common_name(cert: dict[str, Any] | None) -> str | None:
    """The subject's commonName of a ``getpeercert()`` dict."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def aiohttp_app(file: Path | None = None) -> Any:
    web = need("aiohttp.web", "aiohttp")

    async def info_endpoint(request: Any) -> Any:
        body = await request.read()
        tls = request.transport.get_extra_info("ssl_object")
        return web.json_response({
            **info(request.scheme, f"{request.version.major}.{request.version.minor}", body),
            "secure": request.secure,
            "tls_object": type(tls).__name__,
            "tls_version": tls.version(),
            "alpn": tls.selected_alpn_protocol(),
            "transport": type(request.transport).__name__,
            "our_context": isinstance(request.transport.get_extra_info("sslcontext"),
                                      A.TLSContext),
            "peer_cn": common_name(tls.getpeercert()),
        })

    async def bytes_endpoint(request: Any) -> Any:
        return web.Response(body=pattern(int(request.query["n"])))

    async def file_endpoint(request: Any) -> Any:
        return web.FileResponse(file)

    app = web.Application(client_max_size=4 * 2**20)
    app.router.add_route("*", "/info", info_endpoint)
    app.router.add_get("/bytes", bytes_endpoint)
    app.router.add_get("/file", file_endpoint)
    return app


@contextmanager
def aiohttp_server(app: Any, context: Any, loop: str | Callable[[], Any]) -> Iterator[int]:
    """The aiohttp recipe: ``web.TCPSite(runner, host, port, ssl_context=context)`` on our loop."""
    web = need("aiohttp.web", "aiohttp")

    async def serve(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            started(runner.addresses[0][1])
            await stop.wait()
        finally:
            await runner.cleanup()

    factory = LOOP_FACTORIES[loop] if isinstance(loop, str) else loop
    with serving(factory, serve) as state:
        yield state.port


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp_server_httpx(pki: Pki, offload: A.Offload, loop: str, tls: str) -> None:
    need_loop(loop)
    upload = pattern(2_000_000)
    before = sign_ops(offload)
    with aiohttp_server(aiohttp_app(), server_context(pki, offload), loop) as port:
        url = f"https://localhost:{port}"
        replies = httpx_exchange(pki, tls, [("GET", f"{url}/info", None),
                                            ("POST", f"{url}/info", upload),
                                            ("GET", f"{url}/bytes?n=3000000", None)])
        assert sign_ops(offload) - before >= 1
    for r in replies:
        assert (r.status, r.http_version, r.tls_version) == (200, "HTTP/1.1", f"TLSv{tls}")
    seen = replies[0].json()
    assert seen["scheme"] == "https" and seen["secure"] is True
    assert (seen["tls_object"], seen["tls_version"], seen["alpn"]) == (
        "TLSConnection", f"TLSv{tls}", "http/1.1")
    assert (seen["transport"], seen["our_context"], seen["loop"]) == (
        "TLSTransport", True, OUR_LOOPS[loop])
    assert replies[1].json()["body_sha256"] == sha256(upload)
    assert replies[2].content == pattern(3_000_000)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_aiohttp_server_curl(pki: Pki, offload: A.Offload, tls: str) -> None:
    before = sign_ops(offload)
    with aiohttp_server(aiohttp_app(), server_context(pki, offload), "asyncio") as port:
        url = f"https://localhost:{port}"
        result = curl(pki, tls, [f"{url}/info", f"{url}/bytes?n=1000000"])
        assert sign_ops(offload) - before >= 1
    assert result.tls_versions == [f"TLSv{tls}"], result.stderr
    assert result.http_versions == ["1.1", "1.1"]
    seen = json.loads(result.bodies[0])
    assert (seen["secure"], seen["tls_version"], seen["transport"]) == (
        True, f"TLSv{tls}", "TLSTransport")
    assert result.bodies[1] == pattern(1_000_000)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp_file_response(pki: Pki, offload: A.Offload, tmp_path: Path, loop: str) -> None:
    """``web.FileResponse`` sends with ``loop.sendfile()``: on our TLS it must fall back.

    Fails on the asyncio loop while ``TLSTransport`` lacks sendfile support
    (see ``test_loop_sendfile_on_tls_transport``).
    """
    need_loop(loop)
    data = pattern(1_500_000)
    (tmp_path / "data.bin").write_bytes(data)
    with aiohttp_server(aiohttp_app(tmp_path / "data.bin"), server_context(pki, offload),
                        loop) as port:
        url = f"https://localhost:{port}/file"
        replies = httpx_exchange(pki, "1.3", [("GET", url, None), ("GET", url, None)])
    assert [r.status for r in replies] == [200, 200]
    assert all(r.content == data for r in replies)


# -- asyncio's sendfile on our transport (what aiohttp's FileResponse uses) --------------------
def test_loop_sendfile_on_tls_transport(pki: Pki, offload: A.Offload, tmp_path: Path) -> None:
    """``loop.sendfile(transport, file)`` works on asyncio's TLS transport (by its
    fallback, reading the file and writing it); it must on ours too."""
    data = pattern(300_000)
    (tmp_path / "data.bin").write_bytes(data)
    sent: list[int] = []

    async def main() -> bytes:
        loop = asyncio.get_running_loop()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                with (tmp_path / "data.bin").open("rb") as f:
                    sent.append(await loop.sendfile(writer.transport, f))
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                            ssl=server_context(pki, offload))
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=stdlib_client_context(pki, "1.3"),
                server_hostname="localhost")
            received = await reader.read()
            writer.close()
            return received

    loop = new_event_loop()
    try:
        received = loop.run_until_complete(asyncio.wait_for(main(), CLIENT_TIMEOUT))
    finally:
        loop.close()
    assert sent == [len(data)]
    assert received == data


# -- aiohttp: the client ---------------------------------------------------------------
def tls_connector_class() -> type[TLSConnector]:
    """The aiohttp client recipe's helper (skips without aiohttp)."""
    need("aiohttp", "aiohttp")
    from anyio_asyncssl.recipes import TLSConnector

    return TLSConnector


def client_context(pki: Pki, offload: A.Offload, tls: str, *,
                   certificate: bool = True) -> A.TLSContext:
    ctx = A.create_default_context(cafile=pki.ca_file, offload=offload)
    ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[tls]
    if certificate:
        ctx.load_cert_chain(pki.client_file)   # its signature shows in sign_ops
    return ctx


def stdlib_server_context(pki: Pki, *, require_client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.rsa_file)
    ctx.set_alpn_protocols(["http/1.1"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def run_client(main: Callable[[], Awaitable[Any]], loop: str = "asyncio") -> Any:
    """Run ``main()`` on one of our loops, bounded."""
    need_loop(loop)
    event_loop = LOOP_FACTORIES[loop]()
    try:
        return event_loop.run_until_complete(asyncio.wait_for(main(), CLIENT_TIMEOUT))
    finally:
        event_loop.run_until_complete(event_loop.shutdown_asyncgens())
        event_loop.close()


async def aiohttp_get(connector: Any, urls: list[str], **kwargs: Any) -> list[tuple[int, bytes]]:
    """GET the URLs in order with one session on ``connector``: (status, body) each."""
    aiohttp = need("aiohttp", "aiohttp")
    replies = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in urls:
            async with session.get(url, **kwargs) as response:
                replies.append((response.status, await response.read()))
    return replies


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp_client_against_stdlib_server(pki: Pki, offload: A.Offload, loop: str,
                                              tls: str) -> None:
    """Our client (``TLSConnector``) with a client certificate on the offload, against
    aiohttp's server on asyncio's own loop and the stdlib's TLS."""
    TLSConnector = tls_connector_class()

    with aiohttp_server(aiohttp_app(), stdlib_server_context(pki), asyncio.new_event_loop,
                        ) as port:
        url = f"https://localhost:{port}"
        before = sign_ops(offload)

        async def main() -> list[tuple[int, bytes]]:
            connector = TLSConnector(ssl=client_context(pki, offload, tls))
            return await aiohttp_get(connector, [f"{url}/info", f"{url}/bytes?n=2000000",
                                                 f"{url}/info"])

        replies = run_client(main, loop)
        # one handshake (the connection is kept alive), our key's signature offloaded
        assert sign_ops(offload) - before == 1
    assert [status for status, _ in replies] == [200, 200, 200]
    seen = json.loads(replies[0][1])
    # what the stdlib server saw: the version we were pinned to, and our certificate
    assert (seen["tls_version"], seen["tls_object"], seen["peer_cn"], seen["loop"]) == (
        f"TLSv{tls}", "SSLObject", "test client", "_UnixSelectorEventLoop")
    assert replies[1][1] == pattern(2_000_000)


def test_aiohttp_client_against_our_server(pki: Pki, offload: A.Offload) -> None:
    """Both ends ours, mutual TLS: aiohttp's client on asyncio, its server on uvloop."""
    need_loop("uvloop")
    TLSConnector = tls_connector_class()

    server_ctx = server_context(pki, offload)
    server_ctx.load_verify_locations(cafile=pki.ca_file)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    before = sign_ops(offload)
    with aiohttp_server(aiohttp_app(), server_ctx, "uvloop") as port:
        async def main() -> list[tuple[int, bytes]]:
            connector = TLSConnector(ssl=client_context(pki, offload, "1.3"))
            return await aiohttp_get(connector, [f"https://localhost:{port}/info"] * 2)

        replies = run_client(main, "asyncio")
        assert sign_ops(offload) - before == 2   # the server's signature and the client's
    assert [status for status, _ in replies] == [200, 200]
    seen = json.loads(replies[0][1])
    assert (seen["tls_object"], seen["peer_cn"], seen["loop"]) == (
        "TLSConnection", "test client", "UVLoopTLSEventLoop")


def test_aiohttp_client_certificate_error(pki: Pki, offload: A.Offload) -> None:
    """A server our context does not trust: aiohttp's certificate error, from ours."""
    aiohttp = need("aiohttp", "aiohttp")
    TLSConnector = tls_connector_class()

    with aiohttp_server(aiohttp_app(), stdlib_server_context(pki, require_client_cert=False),
                        asyncio.new_event_loop) as port:
        async def main() -> None:
            untrusting = A.create_default_context(offload=offload)   # not our test CA
            await aiohttp_get(TLSConnector(ssl=untrusting), [f"https://localhost:{port}/info"])

        with pytest.raises(aiohttp.ClientConnectorCertificateError) as excinfo:
            run_client(main)
    assert isinstance(excinfo.value.certificate_error, A.CertificateVerifyError)


def test_aiohttp_client_request_ssl_keeps_aiohttp_meaning(pki: Pki, offload: A.Offload) -> None:
    """A request's own ``ssl=`` (here a stdlib context) is aiohttp's, not the connector's."""
    TLSConnector = tls_connector_class()

    with aiohttp_server(aiohttp_app(), stdlib_server_context(pki, require_client_cert=False),
                        asyncio.new_event_loop) as port:
        async def main() -> list[tuple[int, bytes]]:
            connector = TLSConnector(ssl=client_context(pki, offload, "1.3"))
            return await aiohttp_get(connector, [f"https://localhost:{port}/info"],
                                     ssl=stdlib_client_context(pki, "1.2"))

        before = sign_ops(offload)
        (status, body), = run_client(main)
        assert sign_ops(offload) == before   # our client certificate was not used
    seen = json.loads(body)
    assert (status, seen["tls_version"], seen["peer_cn"]) == (200, "TLSv1.2", None)


def test_aiohttp_client_through_connect_proxy(pki: Pki, offload: A.Offload) -> None:
    """HTTPS through an HTTP proxy: aiohttp upgrades the tunnel with ``loop.start_tls()``."""
    TLSConnector = tls_connector_class()

    tunnels: list[bytes] = []
    writers: set[asyncio.StreamWriter] = set()   # closed at the end: the tunnels end
    handlers: set[asyncio.Future[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(head.split(b"\r\n", 1)[0])
        port = head.split()[1].decode().rpartition(":")[2]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writers.add(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        both = asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        handlers.add(both)
        await both

    async def serve_proxy(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        async with server:
            started(server.sockets[0].getsockname()[1])
            await stop.wait()
            for writer in writers:
                writer.close()
            await asyncio.wait_for(asyncio.gather(*handlers), TIMEOUT)

    before = sign_ops(offload)
    with aiohttp_server(aiohttp_app(), stdlib_server_context(pki), asyncio.new_event_loop,
                        ) as port, serving(asyncio.new_event_loop, serve_proxy) as proxy_state:
        async def main() -> list[tuple[int, bytes]]:
            connector = TLSConnector(ssl=client_context(pki, offload, "1.3"))
            return await aiohttp_get(connector, [f"https://localhost:{port}/info"] * 2,
                                     proxy=f"http://127.0.0.1:{proxy_state.port}")

        replies = run_client(main)
        assert sign_ops(offload) - before == 1   # our client certificate, once
    assert tunnels == [f"CONNECT localhost:{port} HTTP/1.1".encode()]
    seen = json.loads(replies[0][1])
    assert (replies[0][0], seen["tls_version"], seen["peer_cn"]) == (200, "TLSv1.3",
                                                                    "test client")


def test_tls_connector_argument_errors(pki: Pki) -> None:
    aiohttp = need("aiohttp", "aiohttp")
    TLSConnector = tls_connector_class()

    async def on_asyncio_loop() -> None:
        with pytest.raises(TypeError, match="new_event_loop"):
            TLSConnector(ssl=A.create_default_context(cafile=pki.ca_file))

    asyncio.run(on_asyncio_loop())

    async def on_our_loop() -> None:
        with pytest.raises(TypeError, match=r"not an ssl\.SSLContext"):
            TLSConnector(ssl=ssl.create_default_context())  # type: ignore[arg-type]
        # why the connector exists: aiohttp itself refuses a TLSContext
        with pytest.raises(TypeError, match="ssl should be SSLContext"):
            aiohttp.TCPConnector(ssl=A.create_default_context())
        connector = TLSConnector(ssl=A.create_default_context(cafile=pki.ca_file))
        await connector.close()

    run_client(on_our_loop)


# -- hypercorn's asyncio worker -------------------------------------------------------------
def hypercorn_config_class(make_context: Callable[[Any], A.TLSContext]) -> type[Config]:
    """The hypercorn recipe: a ``Config`` whose ``create_ssl_context()`` is a TLSContext."""
    need("hypercorn", "hypercorn")
    from hypercorn.config import Config

    class AsyncSSLConfig(Config):
        def create_ssl_context(self) -> Any:
            return make_context(self)

    return AsyncSSLConfig


@contextmanager
def hypercorn_server(pki: Pki, make_context: Callable[[Any], A.TLSContext], loop: str,
                     ) -> Iterator[int]:
    need("hypercorn", "hypercorn")
    from hypercorn.asyncio import serve as hypercorn_serve

    config = hypercorn_config_class(make_context)()
    fd, port = free_listening_fd()
    config.bind = [f"fd://{fd}"]
    config.certfile = config.keyfile = str(pki.rsa_file)   # makes hypercorn bind it as TLS
    config.graceful_timeout = 5

    async def serve(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        task = asyncio.ensure_future(hypercorn_serve(asgi_app, config,  # type: ignore[arg-type]
                                                     shutdown_trigger=stop.wait))
        started(port)   # the socket listens already: early clients wait in its backlog
        await task

    try:
        with serving(LOOP_FACTORIES[loop], serve):
            yield port
    finally:
        try:
            os.close(fd)   # hypercorn closes its socket; this only covers a failed start
        except OSError:
            pass


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_hypercorn_asyncio_httpx(pki: Pki, offload: A.Offload, loop: str, http2: bool,
                                 tls: str) -> None:
    need_loop(loop)
    if http2:
        need("h2", "'httpx[http2]'")
    context = server_context(pki, offload, "h2", "http/1.1")
    upload = pattern(1_000_000)
    before = sign_ops(offload)
    with hypercorn_server(pki, lambda _: context, loop) as port:
        url = f"https://localhost:{port}"
        replies = httpx_exchange(pki, tls, [("GET", f"{url}/info", None),
                                            ("POST", f"{url}/info", upload),
                                            ("GET", f"{url}/bytes?n=3000000", None)],
                                 http2=http2)
        assert sign_ops(offload) - before >= 1
    expected = "HTTP/2" if http2 else "HTTP/1.1"
    for r in replies:
        assert (r.status, r.http_version, r.tls_version) == (200, expected, f"TLSv{tls}")
    seen = replies[0].json()
    assert (seen["scheme"], seen["http_version"], seen["loop"]) == (
        "https", "2" if http2 else "1.1", OUR_LOOPS[loop])
    assert replies[1].json()["body_sha256"] == sha256(upload)
    assert replies[2].content == pattern(3_000_000)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_hypercorn_asyncio_curl(pki: Pki, offload: A.Offload, http2: bool, tls: str) -> None:
    context = server_context(pki, offload, "h2", "http/1.1")
    before = sign_ops(offload)
    with hypercorn_server(pki, lambda _: context, "asyncio") as port:
        url = f"https://localhost:{port}"
        result = curl(pki, tls, [f"{url}/info", f"{url}/bytes?n=1000000"], http2=http2)
        assert sign_ops(offload) - before >= 1
    assert result.tls_versions == [f"TLSv{tls}"], result.stderr
    assert result.http_versions == (["2", "2"] if http2 else ["1.1", "1.1"])
    seen = json.loads(result.bodies[0])
    assert (seen["scheme"], seen["http_version"]) == ("https", "2" if http2 else "1.1")
    assert result.bodies[1] == pattern(1_000_000)


def test_hypercorn_asyncio_context_from_config(pki: Pki, offload: A.Offload) -> None:
    """The Config's own TLS settings (certfile, keyfile, ALPN) made into a TLSContext."""
    need("hypercorn", "hypercorn")
    need("trio", "trio")
    from anyio_asyncssl.hypercorn import tls_context_from_config

    before = sign_ops(offload)
    with hypercorn_server(pki, lambda config: tls_context_from_config(config, offload),
                          "asyncio") as port:
        replies = httpx_exchange(pki, "1.3", [("GET", f"https://localhost:{port}/info", None)],
                                 http2=True)
        assert sign_ops(offload) - before >= 1
    assert (replies[0].http_version, replies[0].json()["scheme"]) == ("HTTP/2", "https")


# -- every server: a clean end to a ``Connection: close`` exchange -------------------------------
@contextmanager
def any_server(kind: str, pki: Pki, offload: A.Offload) -> Iterator[int]:
    context = server_context(pki, offload, "h2", "http/1.1")
    if kind == "uvicorn":
        with uvicorn_server(starlette_app(), context, "asyncio") as port:
            yield port
    elif kind == "aiohttp":
        with aiohttp_server(aiohttp_app(), context, "asyncio") as port:
            yield port
    else:
        with hypercorn_server(pki, lambda _: context, "asyncio") as port:
            yield port


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["uvicorn", "aiohttp", "hypercorn"])
def test_connection_close_ends_with_close_notify(pki: Pki, offload: A.Offload, kind: str,
                                                 tls: str) -> None:
    """The server closes after a ``Connection: close`` response: all of the body, then
    close_notify (the stdlib client, told not to hide it, raises on an EOF without one)."""
    size = 700_000
    with any_server(kind, pki, offload) as port:
        ctx = stdlib_client_context(pki, tls)
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost",
                                suppress_ragged_eofs=False) as tls_socket:
            tls_socket.sendall(f"GET /bytes?n={size} HTTP/1.1\r\nHost: localhost\r\n"
                               "Connection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls_socket.recv(65536):   # ssl.SSLEOFError without close_notify
                response += chunk
            version = tls_socket.version()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert version == f"TLSv{tls}"
    assert body == pattern(size)


# -- aiohttp: WebSockets, both ends ours ---------------------------------------------------
def test_aiohttp_websocket(pki: Pki, offload: A.Offload) -> None:
    aiohttp = need("aiohttp", "aiohttp")
    web = need("aiohttp.web", "aiohttp")
    TLSConnector = tls_connector_class()

    async def echo(request: Any) -> Any:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    messages = [b"hello", pattern(1_000_000), b"bye"]
    before = sign_ops(offload)
    with aiohttp_server(app, server_context(pki, offload), "asyncio") as port:
        async def main() -> list[bytes]:
            connector = TLSConnector(ssl=client_context(pki, offload, "1.3", certificate=False))
            async with aiohttp.ClientSession(connector=connector) as session, \
                    session.ws_connect(f"wss://localhost:{port}/ws",
                                       max_msg_size=2**21) as ws:
                replies = []
                for message in messages:
                    await ws.send_bytes(message)
                    replies.append(await ws.receive_bytes())
                return replies

        replies = run_client(main, "uvloop")
        assert sign_ops(offload) - before == 1
    assert replies == [m[::-1] for m in messages]


# -- the examples, as a user runs them ---------------------------------------------------------
def start_example(name: str, *args: str, ready: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``examples/<name>``; its port, from the first output line matching ``ready``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name} did not start: {''.join(output)}")
        output.append(line)
        m = re.search(ready, line)
        if m:
            proc.lines = lines  # type: ignore[attr-defined]
            proc.output = output  # type: ignore[attr-defined]
            return proc, int(m.group(1))


def stop_example(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C: the example must exit 0 without a traceback; all its output."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines: queue.Queue[str | None] = proc.lines  # type: ignore[attr-defined]
    output: list[str] = proc.output  # type: ignore[attr-defined]
    while (line := lines.get(timeout=TIMEOUT)) is not None:
        output.append(line)
    text = "".join(output)
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    return text


def example_sign_ops(output: str) -> int:
    m = re.search(r"offload sign_ops=(\d+)", output)
    assert m, output
    return int(m.group(1))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_example(tmp_path: Path, loop: str) -> None:
    need("uvicorn", "uvicorn")
    need("starlette", "starlette")
    need_loop(loop)
    cert = tmp_path / "ca.pem"
    args = ["--write-cert", str(cert), *(["--uvloop"] if loop == "uvloop" else [])]
    proc, port = start_example("uvicorn_app.py", *args,
                               ready=r"Uvicorn running on https://127\.0\.0\.1:(\d+)")
    try:
        out = subprocess.run([require_curl(), "-sS", "--max-time", str(CLIENT_TIMEOUT),
                              "--cacert", str(cert), f"https://localhost:{port}/"],
                             capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 10)
    finally:
        output = stop_example(proc)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"hello over https on {OUR_LOOPS[loop]}\n"
    assert example_sign_ops(output) >= 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp_example(tmp_path: Path, loop: str) -> None:
    need("aiohttp", "aiohttp")
    need_loop(loop)
    cert = tmp_path / "ca.pem"
    args = ["--write-cert", str(cert), *(["--uvloop"] if loop == "uvloop" else [])]
    proc, port = start_example("aiohttp_app.py", *args,
                               ready=r"Running on https://127\.0\.0\.1:(\d+)")
    try:
        by_curl = subprocess.run([require_curl(), "-sS", "--max-time", str(CLIENT_TIMEOUT),
                                  "--cacert", str(cert), "--tls-max", "1.2",
                                  f"https://localhost:{port}/"],
                                 capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 10)
        by_example = subprocess.run(
            [sys.executable, str(EXAMPLES / "aiohttp_app.py"), *args[2:],
             "--get", f"https://localhost:{port}/", "--cafile", str(cert)],
            capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 10)
    finally:
        output = stop_example(proc)
    assert by_curl.returncode == 0, by_curl.stderr
    assert by_curl.stdout == "hello over https (TLSv1.2)\n"
    assert by_example.returncode == 0, by_example.stderr
    assert by_example.stdout == "200 hello over https (TLSv1.3)\n"
    assert example_sign_ops(output) >= 2


def test_class_names_compared_above() -> None:
    assert TLSTransport.__name__ == "TLSTransport"
    loop = new_event_loop()
    try:
        assert type(loop).__name__ == OUR_LOOPS["asyncio"]
    finally:
        loop.close()
