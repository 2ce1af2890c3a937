"""Every ```python block in README.md and docs/*.md runs.

A page's blocks run in order as one program (a tutorial builds on its
earlier blocks), in a fresh interpreter, in a directory holding the files the
docs name (cert.pem, key.pem, server.pem, ca.pem).  ``anyio.run``,
``trio.run`` and ``asyncio.Runner.run`` (of a ``main()``) are wrapped: the
server a snippet starts on 127.0.0.1:8443 must echo for a stdlib client,
and a ``client()`` the page defines must run against it; then the server
is cancelled.  A block preceded by
``<!-- docs-test: skip: REASON -->`` (hardware the test machine lacks) is
only compiled.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import stop_with_ctrl_c

from anyio_asyncssl.selfsigned import generate_self_signed

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: skip: (?P<skip>[^>]+?) -->\n)?```python\n(?P<code>.*?)```",
                   re.S)

PRELUDE = '''
# private names only: a block must import what it uses itself
import socket as _socket, ssl as _ssl, time as _time
import anyio as _anyio
try:
    import trio as _trio
except ImportError:
    _trio = None
PORT = 8443  # DOCS_PORT
EXERCISED = []

def _echo_client():
    deadline = _time.monotonic() + 30
    while True:
        try:
            raw = _socket.create_connection(("127.0.0.1", PORT), timeout=5)
            break
        except OSError:
            if _time.monotonic() > deadline:
                raise
            _time.sleep(0.05)
    ctx = _ssl.create_default_context(cafile="ca.pem")
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"docs")
        assert tls.recv(10) == b"docs"

async def _exercised(fn, *args):
    async with _anyio.create_task_group() as tg:
        tg.start_soon(fn, *args)
        await _anyio.to_thread.run_sync(_echo_client)
        EXERCISED.append(fn.__name__)
        client = globals().get("client")
        if client is not None:
            with _anyio.fail_after(30):
                await client()
            EXERCISED.append("client")
        tg.cancel_scope.cancel()

def _wrap(real):
    def run(fn, *args, **kw):
        return real(_exercised, fn, *args, **kw)
    return run

_anyio.run = _wrap(_anyio.run)
if _trio is not None:
    _trio.run = _wrap(_trio.run)

# asyncio pages run their server with asyncio.Runner(loop_factory=...).run(main())
import asyncio as _asyncio
_real_runner_run = _asyncio.Runner.run

def _runner_run(self, coro, **kw):
    if getattr(coro, "__name__", None) != "main":   # anyio.run's own use of the Runner
        return _real_runner_run(self, coro, **kw)

    async def exercised():
        task = _asyncio.ensure_future(coro)
        try:
            await _asyncio.to_thread(_echo_client)
            EXERCISED.append(coro.__name__)
            client = globals().get("client")
            if client is not None:
                await _asyncio.wait_for(client(), 30)
                EXERCISED.append("client")
        finally:
            task.cancel()
            try:
                await task
            except BaseException:
                pass
    return _real_runner_run(self, exercised(), **kw)

_asyncio.Runner.run = _runner_run
'''

EPILOGUE = '''
# a page that defines client() after starting its server: run them together
if "client" in globals() and "client" not in EXERCISED and "main" in globals():
    import gc as _gc
    _gc.collect()    # the first server's listening socket (snippets do not close it)
    (_trio.run if USES_TRIO else _anyio.run)(main)
    assert "client" in EXERCISED
print("EXERCISED", EXERCISED)
'''


DOCS_PORT = 8443


@pytest.fixture
def docs_port() -> Iterator[int]:
    """Port 8443, which the docs' servers and clients use as written, is this test's alone.

    Chroots share the host's network: two suites running at once (one per
    Debian release) met on 8443, and one's client reached the other's server.
    An abstract Unix socket, named in the network namespace and released when
    its holder dies, is the machine-wide claim; then the port must be free.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 900
    while True:
        try:
            claim.bind(f"\0anyio-asyncssl-tests-port-{DOCS_PORT}")
            break
        except OSError:
            if time.monotonic() > deadline:
                claim.close()
                pytest.fail(f"another test run held port {DOCS_PORT} for 15 minutes")
            time.sleep(0.1)
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = socket.socket()
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", DOCS_PORT))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"127.0.0.1:{DOCS_PORT}, which the docs use, is taken by "
                                f"another program: {exc}")
                time.sleep(0.1)
            finally:
                probe.close()
        yield DOCS_PORT
    finally:
        claim.close()


def blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(m["code"], m["skip"]) for m in BLOCK.finditer(page.read_text())]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    cert, key = generate_self_signed("localhost")
    (d / "cert.pem").write_bytes(cert)
    (d / "ca.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    (d / "server.pem").write_bytes(key + cert)
    return d


def test_every_python_block_compiles_and_skips_say_why() -> None:
    seen = 0
    for page in PAGES:
        for code, skip in blocks(page):
            compile(code, f"{page.name} block", "exec")
            assert skip is None or len(skip.strip()) > 10, (page.name, skip)
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize("page", [p for p in PAGES if any(s is None for _, s in blocks(p))],
                         ids=lambda p: p.name)
def test_every_python_block_runs(page: Path, files: Path, docs_port: int) -> None:
    runnable = [code for code, skip in blocks(page) if skip is None]
    source = "\n".join(runnable)
    program = (textwrap.dedent(PRELUDE) + f"USES_TRIO = {'trio.run(' in source}\n"
               + source + textwrap.dedent(EPILOGUE))
    proc = subprocess.run([sys.executable, "-c", program], cwd=files, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    if "anyio.run(" in source or "trio.run(" in source or ".run(main())" in source:
        assert "EXERCISED ['main'" in proc.stdout, proc.stdout


# == shell blocks =====================================================================
SH_BLOCK = re.compile(r"```sh\n(?P<code>.*?)```", re.S)
ASYNCSSL = [sys.executable, "-m", "anyio_asyncssl"]


def sh_commands(page: Path) -> list[str]:
    """The block lines of a page, comments dropped; installation lines (what CI does) out."""
    out = []
    for m in SH_BLOCK.finditer(page.read_text()):
        for line in m["code"].splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith(("pip install", "apt-get install")):
                out.append(line)
    return out


def _prepare(d: Path) -> None:
    cert, key = generate_self_signed("localhost")
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    (d / "pw.txt").write_text("unused: the key is not encrypted\n")


def _serve(d: Path, args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*ASYNCSSL, *args], cwd=d, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    if "server on" not in banner:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"asyncssl {shlex.join(args)}: no banner (exit {proc.returncode}):"
                             f" {banner!r}\n{err[-2000:]}")
    return proc


@pytest.mark.parametrize("page", [p for p in sorted((ROOT / "docs").glob("*.md"))
                                  if SH_BLOCK.search(p.read_text())], ids=lambda p: p.name)
def test_every_shell_command_in_the_docs_runs(page: Path, tmp_path: Path,
                                              docs_port: int) -> None:
    """Each ``asyncssl`` line of the page, as written (``bench`` in its --smoke mode)."""
    commands = sh_commands(page)
    for i, line in enumerate(commands):
        d = tmp_path / str(i)
        d.mkdir()
        stdin = b""
        pipe = re.match(r"echo (\S+) \| (.*)", line)
        if pipe:
            stdin, line = pipe[1].encode() + b"\n", pipe[2]
        args = shlex.split(line)
        assert args[0] == "asyncssl", f"{page.name}: not a command the test knows: {line}"
        args = args[1:]
        if args[0] in ("serve", "connect"):
            _prepare(d)
        if args[0] == "serve":
            stop_with_ctrl_c(_serve(d, args))
            continue
        server = _serve(d, ["serve", "--write-cert", "ca.pem"]) if args[0] == "connect" else None
        if args[0] == "bench":
            args.append("--smoke")
        try:
            proc = subprocess.run([*ASYNCSSL, *args], cwd=d, input=stdin, capture_output=True,
                                  timeout=300)
        finally:
            if server is not None:
                stop_with_ctrl_c(server)
        if "--plot" in args and importlib.util.find_spec("matplotlib") is None:
            # without the plot extra that line says what to install, in one line
            assert proc.returncode == 1 and b"pip install 'anyio-asyncssl[plot]'" in proc.stderr
            continue
        assert proc.returncode == 0, f"{page.name}: {line}\n{proc.stderr.decode()[-2000:]}"
        if stdin:
            assert proc.stdout == stdin, (line, proc.stdout)
