"""anyio's and trio's own TLS examples, run on our streams with only the import lines changed.

The examples are copied verbatim from the projects' docs (sources below).  Each
runs twice: as published (stock anyio/trio on the stdlib's ssl, which proves
the harness) and with the import lines rewritten to ours; the test checks that
the rewrite touched nothing but import lines.  Where an example needs a host
name or a port that cannot exist here, the harness provides it (a free port
instead of 1234; a name table for ``open_tcp_stream``), never by editing the
example.

* anyio docs/streams.rst, "Using self signed certificates"
  (agronholm/anyio 660a06d, 2026-08-21): the server and the client.
* trio docs/source/reference-io.rst, "stream adapters"
  (python-trio/trio 60d0c2f, 2026-08-17): TLS to a subprocess over a
  StapledStream, and TLS in TLS through an HTTPS proxy.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Pki

HERE = Path(__file__).parent
TIMEOUT = 30

# -- anyio: docs/streams.rst ---------------------------------------------------------
ANYIO_SERVER = """\
import ssl

from anyio import create_tcp_listener, run
from anyio.streams.tls import TLSListener


async def handle(client):
    async with client:
        name = await client.receive()
        await client.send(b'Hello, %s\\n' % name)


async def main():
    # Create a context for the purpose of authenticating clients
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    # Load the server certificate and private key
    context.load_cert_chain(certfile='cert.pem', keyfile='key.pem')

    # Create the listener and start serving connections
    listener = TLSListener(await create_tcp_listener(local_port=1234), context)
    await listener.serve(handle)

run(main)
"""

ANYIO_CLIENT = """\
import ssl

from anyio import connect_tcp, run


async def main():
    # These two steps are only required for certificates that are not trusted by the
    # installed CA certificates on your machine, so you can skip this part if you
    # use Let's Encrypt or a commercial certificate vendor
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cafile='cert.pem')

    async with await connect_tcp('localhost', 1234, ssl_context=context) as client:
        await client.send(b'Client\\n')
        response = await client.receive()
        print(response)

run(main)
"""

#: the import lines a user changes, and what they become
ANYIO_IMPORTS = {
    "import ssl": "from anyio_asyncssl import ssl",
    "from anyio.streams.tls import TLSListener": "from anyio_asyncssl.stream import TLSListener",
    "from anyio import connect_tcp, run":
        "from anyio import run\nfrom anyio_asyncssl.stream import connect_tcp",
}

#: the certificate command from the same page, as written
OPENSSL_REQ = ("openssl req -x509 -newkey rsa:2048 -subj '/CN=localhost' -keyout key.pem "
               "-out cert.pem -nodes -days 365")


def rewrite_imports(source: str, table: dict[str, str]) -> str:
    """Replace whole import lines; fail if a changed line is not an import."""
    out = []
    for line in source.splitlines():
        new = table.get(line, line)
        if new != line:
            for part in (line, *new.splitlines()):
                assert part.startswith(("import ", "from ")), part
        out.append(new)
    rewritten = "\n".join(out) + "\n"
    assert rewritten != source, "nothing was rewritten"
    return rewritten


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def run_script(source: str, cwd: Path, backend: str, *, wait: bool) -> subprocess.Popen[str]:
    """Run ``source`` as __main__ under ``backend`` (anyio.run's default, patched)."""
    path = cwd / ("client.py" if wait else "server.py")
    path.write_text(source)
    runner = ("import anyio, functools, runpy, sys; "
              f"anyio.run = functools.partial(anyio.run, backend={backend!r}); "
              "runpy.run_path(sys.argv[1], run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", runner, str(path)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.communicate()}")
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server never listened")


@pytest.fixture(scope="module")
def anyio_example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("anyio-example")
    subprocess.run(OPENSSL_REQ, shell=True, cwd=tmp, check=True, capture_output=True,
                   timeout=60)
    return tmp


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("server_side,client_side", [
    ("ours", "ours"), ("ours", "stock"), ("stock", "ours"), ("stock", "stock")])
def test_anyio_docs_server_and_client(anyio_example_dir: Path, tmp_path: Path, backend: str,
                                      server_side: str, client_side: str) -> None:
    port = free_port()
    server_src = ANYIO_SERVER.replace("1234", str(port))
    client_src = ANYIO_CLIENT.replace("1234", str(port))
    if server_side == "ours":
        server_src = rewrite_imports(server_src, ANYIO_IMPORTS)
        assert "from anyio_asyncssl.stream import TLSListener" in server_src
    if client_side == "ours":
        client_src = rewrite_imports(client_src, ANYIO_IMPORTS)
        assert "from anyio_asyncssl.stream import connect_tcp" in client_src
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_bytes((anyio_example_dir / name).read_bytes())
    server = run_script(server_src, tmp_path, backend, wait=False)
    try:
        wait_for_port(port, server)
        client = run_script(client_src, tmp_path, backend, wait=True)
        out, err = client.communicate(timeout=TIMEOUT)
        assert client.returncode == 0, err
        assert out == "b'Hello, Client\\n\\n'\n"
    finally:
        server.terminate()
        server.communicate(timeout=TIMEOUT)


# -- trio: docs/source/reference-io.rst ----------------------------------------------
TRIO_STAPLED = """\
ssl_context = ssl.create_default_context()
ssl_context.check_hostname = False
s = SSLStream(StapledStream(process.stdin, process.stdout), ssl_context)
"""

TRIO_PROXY = """\
# Get a raw SocketStream connection to the proxy:
s0 = await open_tcp_stream("proxy", 443)

# Set up SSL connection to proxy:
s1 = SSLStream(s0, proxy_ssl_context, server_hostname="proxy")
# Request a connection to the website
await s1.send_all(b"CONNECT website:443 / HTTP/1.0\\r\\n\\r\\n")
await check_CONNECT_response(s1)

# Set up SSL connection to the real website. Notice that s1 is
# already an SSLStream object, and here we're wrapping a second
# SSLStream object around it.
s2 = SSLStream(s1, website_ssl_context, server_hostname="website")
# Make our request
await s2.send_all(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
...
"""

TRIO_IMPORTS = {
    "stock": "import ssl\nfrom trio import SSLStream, StapledStream",
    "ours": "from anyio_asyncssl import ssl\nfrom anyio_asyncssl.trio import SSLStream\n"
            "from trio import StapledStream",
}


def example_function(imports: str, body: str, params: str) -> Callable[..., Any]:
    """``async def example(params): body`` with the given import lines, compiled."""
    source = (imports + "\n\n\nasync def example(" + params + "):\n"
              + textwrap.indent(body, "    ") + "    return locals()\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, "<docs example>", "exec"), namespace)
    return namespace["example"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("side", ["stock", "ours"])
def test_trio_docs_tls_to_a_subprocess_over_a_stapled_stream(
        pki: Pki, side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # create_default_context() trusts the system store: point it at our CA
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    example = example_function(TRIO_IMPORTS[side], TRIO_STAPLED, "process")

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            process = await trio.lowlevel.open_process(
                [sys.executable, str(HERE / "child_scripts" / "stdio_tls_server.py"),
                 str(pki.rsa_file)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                s = (await example(process))["s"]
                assert type(s).__module__ == ("trio" if side == "stock"
                                              else "anyio_asyncssl.trio")
                await s.send_all(b"over stdio\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += await s.receive_some()
                assert data == b"OVER STDIO\n"
                assert s.version() == "TLSv1.3"
                await s.aclose()
                assert await process.wait() == 0
            finally:
                process.kill()
                await process.wait()

    trio.run(main)


async def proxy_server(stream: trio.SSLStream[Any], website_port: int) -> None:
    """An HTTPS proxy on trio.SSLStream: CONNECT, then relay bytes both ways."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    assert request.startswith(b"CONNECT website:443 "), request
    upstream = await trio.open_tcp_stream("127.0.0.1", website_port)
    await stream.send_all(b"HTTP/1.0 200 Connection established\r\n\r\n")

    async def pipe(src: Any, dst: Any) -> None:
        while data := await src.receive_some():
            await dst.send_all(data)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, stream, upstream)
        nursery.start_soon(pipe, upstream, stream)
    await upstream.aclose()
    await trio.aclose_forcefully(stream)


async def website(stream: trio.SSLStream[Any]) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    assert request.startswith(b"GET /index.html HTTP/1.0"), request
    await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nthe website, through the tunnel")
    await stream.aclose()


@pytest.mark.parametrize("side", ["stock", "ours"])
def test_trio_docs_tls_in_tls_through_an_https_proxy(pki: Pki, side: str) -> None:
    def server_ctx(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pki.ca.issue_cert(name).configure_cert(ctx)
        return ctx

    example = example_function(
        TRIO_IMPORTS[side], TRIO_PROXY,
        "open_tcp_stream, proxy_ssl_context, website_ssl_context, check_CONNECT_response")
    ssl_module = ssl if side == "stock" else __import__("anyio_asyncssl.ssl").ssl

    async def check_CONNECT_response(stream: Any) -> None:  # the docs name it so
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += await stream.receive_some()
        assert reply.startswith(b"HTTP/1.0 200 "), reply

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                site = await nursery.start(trio.serve_ssl_over_tcp, website, 0,
                                           server_ctx("website"))
                site_port = site[0].transport_listener.socket.getsockname()[1]
                proxy = await nursery.start(
                    trio.serve_ssl_over_tcp, lambda s: proxy_server(s, site_port), 0,
                    server_ctx("proxy"))
                names = {("proxy", 443): proxy[0].transport_listener.socket.getsockname()[1]}

                async def open_tcp_stream(host: str, port: int) -> trio.SocketStream:
                    return await trio.open_tcp_stream("127.0.0.1", names[host, port])

                contexts = [ssl_module.create_default_context(cafile=str(pki.ca_file))
                            for _ in range(2)]
                s2 = (await example(open_tcp_stream, *contexts, check_CONNECT_response))["s2"]
                assert type(s2).__module__ == ("trio" if side == "stock"
                                               else "anyio_asyncssl.trio")
                assert type(s2.transport_stream) is type(s2)   # TLS in TLS
                response = b""
                while data := await s2.receive_some():
                    response += data
                assert response == b"HTTP/1.0 200 OK\r\n\r\nthe website, through the tunnel"
                assert s2.getpeercert()["subjectAltName"] == (("DNS", "website"),)
                assert s2.transport_stream.getpeercert()["subjectAltName"] == (("DNS", "proxy"),)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_rewrite_refuses_to_touch_anything_but_imports() -> None:
    with pytest.raises(AssertionError):
        rewrite_imports("x = 1\n", {"x = 1": "x = 2"})
    assert os.path.exists(HERE / "child_scripts" / "stdio_tls_server.py")
