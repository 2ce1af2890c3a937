"""Every example in examples/ runs, as a user would run it (``examples/test_*.py`` run as tests).

Servers start on port 0 and must survive a client that hangs up without
close_notify before they echo for the next one; Ctrl-C stops them cleanly.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_with_ctrl_c

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def start(name: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"{name}: {line!r} {proc.communicate()[1]}")
    return proc, int(m.group(1))


def hang_up_rudely(port: int, ctx: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tls.recv(1)
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tls.close()      # RST, no close_notify


@pytest.mark.parametrize("name", ["echo_server_anyio.py", "trio_nursery_server.py"])
def test_echo_server_examples_survive_rude_clients(tmp_path: Path, name: str) -> None:
    cert = tmp_path / "ca.pem"
    proc, port = start(name, "--write-cert", str(cert))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        for _ in range(2):
            hang_up_rudely(port, ctx)
        out = subprocess.run([sys.executable, str(EXAMPLES / "client_anyio.py"), "127.0.0.1",
                              str(port), "--cafile", str(cert)],
                             capture_output=True, text=True, timeout=60, env=ENV)
        assert out.returncode == 0, out.stderr
        assert "echo: b'hello over async TLS\\n'" in out.stdout
    finally:
        stop_with_ctrl_c(proc)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_https_server_example_answers_http(tmp_path: Path, backend: str) -> None:
    import http.client

    cert = tmp_path / "ca.pem"
    proc, port = start("https_server.py", "--backend", backend, "--write-cert", str(cert))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        hang_up_rudely(port, ctx)
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        for _ in range(2):       # keep-alive
            conn.request("GET", "/hello")
            r = conn.getresponse()
            assert r.status == 200
            assert b"GET /hello HTTP/1.1" in r.read()
        conn.close()
    finally:
        stop_with_ctrl_c(proc)


def test_offload_demo_prints_both_rows() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "offload_demo.py"), "--handshakes",
                          "8", "--key-type", "rsa2048"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["on"], ["off"])]
    assert [r[0] for r in rows] == ["on", "off"], out.stdout
    for r in rows:
        assert all(float(x) >= 0 for x in r[1:]), out.stdout
