"""The asyncssl command: serve (the README's main job) and connect."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anyio_asyncssl.selfsigned import generate_self_signed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_generated_certificate_is_accepted_by_the_stdlib(tmp_path: Path, key_type: str) -> None:
    cert, key = generate_self_signed("localhost", key_type=key_type)
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    decoded = ssl._ssl._test_decode_cert(str(tmp_path / "c.pem"))  # type: ignore[attr-defined]
    assert decoded["subject"] == ((("commonName", "localhost"),),
                                  (("organizationName", "anyio-asyncssl"),))
    assert ("DNS", "localhost") in decoded["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in decoded["subjectAltName"]


def test_serve_echoes_with_offload_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = _free_port()
    cert = tmp_path / "server-cert.pem"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "anyio_asyncssl", "serve", "--port", str(port),
         "--workers", "2", "--write-cert", str(cert)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"127.0.0.1:{port}" in banner and "offload: 2 worker threads" in banner
        # a stdlib client, verifying the generated certificate
        client_ctx = ssl.create_default_context(cafile=str(cert))
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"ping over async TLS")
                assert tls.recv(100) == b"ping over async TLS"
        # the connect subcommand
        out = subprocess.run(
            [sys.executable, "-m", "anyio_asyncssl", "connect", "127.0.0.1", str(port),
             "--cafile", str(cert), "--servername", "localhost"],
            input=b"hello\n", capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"hello\n"
        assert b"TLSv1.3" in out.stderr
        time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        stdout, stderr = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped. offloaded operations: 4" in stdout  # 3 stdlib + 1 connect handshakes


def test_connect_reports_an_untrusted_server(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "anyio_asyncssl", "serve", "--port", str(port), "--no-offload"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert "offload: off" in server.stdout.readline()
        out = subprocess.run(
            [sys.executable, "-m", "anyio_asyncssl", "connect", "127.0.0.1", str(port),
             "--servername", "localhost"], input=b"x", capture_output=True, timeout=30)
        assert out.returncode == 1
        assert b"certificate verify failed" in out.stderr
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
