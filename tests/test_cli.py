"""The asyncssl command: serve, connect and cert, driven as a user would (subprocesses, loopback).

Every error path a user can reach prints one line naming what failed and
exits non-zero without a traceback; the clients here are the stdlib's
``ssl``/``http.client`` and our own ``connect``.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import pty
import re
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import anyio_asyncssl as A
from anyio_asyncssl.selfsigned import generate_self_signed

ASYNCSSL = [sys.executable, "-m", "anyio_asyncssl"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def run(*args: str, input: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*ASYNCSSL, *args], input=input, capture_output=True,
                          timeout=timeout, env=ENV)


def one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """The run failed with one clear line (no traceback) containing every needle."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("asyncssl")]
    assert lines, err
    for needle in needles:
        assert needle in lines[-1], err
    return lines[-1]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    banner: str
    cert: Path

    def stop(self, sig: int = signal.SIGINT) -> tuple[str, str]:
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return out, err

    def client_ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def start(tmp_path: Path, *args: str) -> Server:
    cert = tmp_path / "served-cert.pem"
    extra = [] if "--cert" in args else ["--write-cert", str(cert)]
    proc = subprocess.Popen([*ASYNCSSL, "serve", "--port", "0", *extra, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    m = re.search(r"on 127\.0\.0\.1:(\d+)", banner)
    if m is None:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no banner: {banner!r} {err}")
    if "--cert" in args:
        cert = Path(args[args.index("--cert") + 1])
    return Server(proc, int(m.group(1)), banner, cert)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start(tmp_path, "--workers", "2", "-v")
    yield s
    if s.proc.poll() is None:
        s.stop()


def echo_once(srv: Server, data: bytes = b"ping over async TLS") -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
            srv.client_ctx().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


# == cert ========================================================================
@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
def test_cert_writes_a_pair_the_stdlib_loads(tmp_path: Path, key_type: str) -> None:
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    proc = run("cert", "--key-type", key_type, "--san", "example.test", "--san", "10.0.0.1",
               "--cert-out", str(c), "--key-out", str(k))
    assert proc.returncode == 0, proc.stderr
    assert b"SHA-256 fingerprint" in proc.stdout
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(c, k)
    decoded = ssl._ssl._test_decode_cert(str(c))  # type: ignore[attr-defined]
    assert ("DNS", "example.test") in decoded["subjectAltName"]
    assert ("IP Address", "10.0.0.1") in decoded["subjectAltName"]
    # never overwrites without --force
    one_line_error(run("cert", "--cert-out", str(c), "--key-out", str(k)), str(c), "--force")
    assert run("cert", "--force", "--cert-out", str(c), "--key-out", str(k)).returncode == 0


def test_generated_certificate_names() -> None:
    cert, _ = generate_self_signed("localhost", key_type="ec")
    der = ssl.PEM_cert_to_DER_cert(cert.decode())
    assert b"localhost" in der


@pytest.mark.parametrize("command", ["serve", "connect", "cert"])
def test_version_everywhere(command: str) -> None:
    for argv in (["--version"], [command, "--version"]):
        proc = run(*argv)
        assert proc.returncode == 0
        # the OpenSSL it runs on (3.x or 4.x), named as the library names itself
        assert re.match(rb"asyncssl \d+\.\d+\.\d+ \(OpenSSL \d+\.\d+\.\d+", proc.stdout), \
            proc.stdout
        assert f"({A.OPENSSL_VERSION})".encode() in proc.stdout, proc.stdout


# == serve ========================================================================
def test_serve_port_0_prints_the_bound_port_and_echoes_with_offload(server: Server) -> None:
    assert "offload: 2 worker threads" in server.banner
    for _ in range(3):
        assert echo_once(server) == b"ping over async TLS"
    out, err = server.stop()
    assert "stopped. connections: 3, handshakes: 3" in out
    assert "offloaded operations: 3" in out
    assert err.count("TLSv1.3") == 3          # -v: one line per connection


def test_serve_survives_clients_that_hang_up_without_close_notify(server: Server) -> None:
    for _ in range(3):
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        tls = server.client_ctx().wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"half a conversation")
        assert tls.recv(100)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        tls.close()    # no close_notify; an RST with SO_LINGER 0
    # and a client that drops the TCP connection in the middle of the handshake
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05\x01\x00")
    assert echo_once(server) == b"ping over async TLS"
    out, _ = server.stop()
    assert "connections: 4" in out


def test_serve_drops_a_silent_client_after_the_handshake_timeout(tmp_path: Path) -> None:
    srv = start(tmp_path, "--handshake-timeout", "0.5", "--no-offload", "-v")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        t0 = time.monotonic()
        assert raw.recv(100) == b""      # closed by the server
        assert time.monotonic() - t0 < 5
    _, err = srv.stop(signal.SIGTERM)
    assert "handshake_timeout" in err


def test_serve_http_app_keeps_alive_and_reports_stats(tmp_path: Path) -> None:
    srv = start(tmp_path, "--app", "http", "--backend", "asyncio", "--workers", "1")
    assert "(asyncio)" in srv.banner
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=srv.client_ctx(),
                                       timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200 and b"anyio-asyncssl" in r.read()
    conn.request("GET", "/stats")        # the same connection: keep-alive
    r = conn.getresponse()
    stats = json.loads(r.read())
    conn.request("GET", "/nothing-here")
    assert conn.getresponse().status == 404
    conn.close()
    assert stats["connections"] == {"open": 1, "total": 1}
    assert stats["handshakes"] == 1
    assert stats["offload"]["sign_ops"] == 1 and stats["offload"]["workers"] == 1
    assert set(stats["loop_lag_ms"]) >= {"p50", "p99", "max"}
    srv.stop(signal.SIGTERM)


def test_serve_alpn_and_client_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    client_cert = ca.issue_cert("client.example")
    srv = start(tmp_path, "--alpn", "h2,http/1.1", "--client-ca", str(tmp_path / "client-ca.pem"),
                "--no-offload")
    ctx = srv.client_ctx()
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    client_cert.configure_cert(ctx)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(b"mtls")
        assert tls.recv(10) == b"mtls"
    # without a client certificate the server refuses
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
            srv.client_ctx().wrap_socket(raw, server_hostname="localhost") as tls:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls.sendall(b"x")
            tls.recv(10)
    srv.stop()


def _encrypted_pair(tmp_path: Path, password: bytes) -> tuple[Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(password))
    (tmp_path / "enc-key.pem").write_bytes(enc)
    (tmp_path / "chain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    return tmp_path / "chain.pem", tmp_path / "enc-key.pem"


def test_serve_with_an_encrypted_key_from_a_password_file(tmp_path: Path) -> None:
    cert, key = _encrypted_pair(tmp_path, b"s3cret")
    (tmp_path / "pw").write_bytes(b"s3cret\n")
    srv = start(tmp_path, "--cert", str(cert), "--key", str(key),
                "--password-file", str(tmp_path / "pw"), "--workers", "1")
    assert "SHA-256" in srv.proc.stdout.readline()   # type: ignore[union-attr]
    srv.stop()


def test_serve_key_errors_name_the_file(tmp_path: Path) -> None:
    cert, key = _encrypted_pair(tmp_path, b"s3cret")
    (tmp_path / "pw").write_text("wrong\n")
    one_line_error(run("serve", "--cert", str(cert), "--key", str(key),
                       "--password-file", str(tmp_path / "pw")), str(key), "password")
    # no password and no terminal: says how to give one
    one_line_error(run("serve", "--cert", str(cert), "--key", str(key)),
                   str(key), "--password-file")
    other, _ = generate_self_signed("localhost")
    (tmp_path / "other.pem").write_bytes(other)
    _, plain_key = generate_self_signed("localhost")
    (tmp_path / "plain-key.pem").write_bytes(plain_key)
    one_line_error(run("serve", "--cert", str(tmp_path / "other.pem"),
                       "--key", str(tmp_path / "plain-key.pem")), "does not match")
    one_line_error(run("serve", "--cert", str(tmp_path / "missing.pem")),
                   "missing.pem", "no such file")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    one_line_error(run("serve", "--cert", str(tmp_path / "garbage.pem")), "garbage.pem")
    # unreadable (a directory: permissions do not stop root, who runs CI)
    (tmp_path / "a-directory.pem").mkdir()
    one_line_error(run("serve", "--cert", str(tmp_path / "a-directory.pem")), "a-directory.pem")


def test_serve_writes_the_generated_key_and_certificate(tmp_path: Path) -> None:
    c, k = tmp_path / "w-cert.pem", tmp_path / "w-key.pem"
    srv = start(tmp_path, "--key-type", "p256", "--write-key", str(k), "--no-offload")
    assert "P256" in srv.banner
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    srv.stop()
    # the written pair serves again
    c.write_bytes(srv.cert.read_bytes())
    srv2 = start(tmp_path, "--cert", str(c), "--key", str(k), "--no-offload")
    assert echo_once(srv2) == b"ping over async TLS"
    srv2.stop()


@pytest.mark.parametrize(("args", "needle"), [
    (["--port", "74031"], "out of range"),
    (["--port", "-1"], "out of range"),
    (["--port", "http"], "not a port"),
    (["--workers", "many"], "not a number of workers"),
    (["--workers", "-2"], "workers must be"),
    (["--handshake-timeout", "0"], "more than 0"),
    (["--key-type", "dsa"], "invalid choice"),
])
def test_serve_refuses_bad_option_values(args: list[str], needle: str) -> None:
    proc = run("serve", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr.decode() and b"Traceback" not in proc.stderr


def test_serve_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(run("serve", "--port", str(port), "--no-offload"),
                       f"127.0.0.1:{port}", "already in use")


def test_serve_bad_host_is_one_line() -> None:
    one_line_error(run("serve", "--host", "no-such-host.invalid", "--no-offload"),
                   "no-such-host.invalid")


# == connect ========================================================================
def test_connect_copies_until_the_server_closes(tmp_path: Path) -> None:
    # the reply (a whole HTTP response) is longer than what was sent
    srv = start(tmp_path, "--app", "http", "--workers", "1")
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    proc = run("connect", f"127.0.0.1:{srv.port}", "--cafile", str(srv.cert),
               "--sni", "localhost", input=request)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"HTTP/1.1 200 OK") and b"anyio-asyncssl" in proc.stdout
    err = proc.stderr.decode()
    assert "TLSv1.3" in err and "verification: OK" in err and "subject commonName=localhost" in err
    srv.stop()


def test_connect_shows_the_verified_chain(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    srv = start(tmp_path, "--cert", str(tmp_path / "chain.pem"), "--no-offload")
    proc = run("connect", f"127.0.0.1:{srv.port}", "--cafile", str(tmp_path / "ca.pem"),
               input=b"")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "certificate 0: subject" in err and "certificate 1: subject" in err   # leaf, root
    assert "verification: OK" in err
    srv.stop()


def test_connect_forms_versions_and_alpn(server: Server) -> None:
    proc = run("connect", "127.0.0.1", str(server.port), "--cafile", str(server.cert),
               "--tls1.2", "--alpn", "echo", input=b"twelve")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"twelve"
    assert b"TLSv1.2" in proc.stderr
    big = os.urandom(1 << 20)     # more than one read, and a file on stdin
    (Path(server.cert).parent / "big").write_bytes(big)
    with open(Path(server.cert).parent / "big", "rb") as f:
        proc2 = subprocess.run([*ASYNCSSL, "connect", f"127.0.0.1:{server.port}", "-q",
                                "--cafile", str(server.cert)], stdin=f, capture_output=True,
                               timeout=60, env=ENV)
    assert proc2.returncode == 0, proc2.stderr
    assert proc2.stdout == big
    assert proc2.stderr == b""


def test_connect_untrusted_server_suggests_cafile_or_insecure(server: Server) -> None:
    line = one_line_error(run("connect", f"127.0.0.1:{server.port}"),
                          "verification failed", f"127.0.0.1:{server.port}")
    assert "--cafile" in line and "--insecure" in line
    proc = run("connect", f"127.0.0.1:{server.port}", "--insecure", input=b"anyway")
    assert proc.returncode == 0 and proc.stdout == b"anyway"
    assert b"WARNING" in proc.stderr and b"NOT verified" in proc.stderr


def test_connect_timeout_covers_the_handshake() -> None:
    with socket.socket() as silent:       # accepts (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        one_line_error(run("connect", f"127.0.0.1:{port}", "--timeout", "1"),
                       "timed out after 1 s", f"127.0.0.1:{port}")
        assert time.monotonic() - t0 < 15


def test_connect_errors_are_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # bound, not listening: refused
        one_line_error(run("connect", f"127.0.0.1:{port}"), "refused", f"127.0.0.1:{port}")
    one_line_error(run("connect", "no-such-host.invalid:443"), "cannot resolve",
                   "no-such-host.invalid")
    one_line_error(run("connect", "127.0.0.1"), "HOST:PORT")
    one_line_error(run("connect", "127.0.0.1:99999"), "out of range")
    one_line_error(run("connect", "127.0.0.1:1", "--cafile", "/nonexistent.pem"),
                   "/nonexistent.pem")


def test_connect_ctrl_c_exits_130_quietly(server: Server) -> None:
    r, w = os.pipe()       # stdin that never ends
    try:
        proc = subprocess.Popen([*ASYNCSSL, "connect", f"127.0.0.1:{server.port}",
                                 "--cafile", str(server.cert)], stdin=r,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        seen = b""
        while b"verification" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err


def test_connect_is_interactive_on_a_terminal(server: Server) -> None:
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO          # what we read back is the server's echo only
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen([*ASYNCSSL, "connect", f"127.0.0.1:{server.port}", "-q",
                             "--cafile", str(server.cert)],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=ENV)
    os.close(slave)

    def read_until(needle: bytes) -> bytes:
        got = b""
        deadline = time.monotonic() + 20
        while needle not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    got += os.read(master, 1024)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    break
        return got

    try:
        os.write(master, b"first line\n")
        assert b"first line" in read_until(b"first line")     # before any EOF: interactive
        os.write(master, b"second\n")
        assert b"second" in read_until(b"second")
        os.write(master, b"\x04")                           # Ctrl-D: end of input
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        os.close(master)


# == bench ========================================================================
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="asyncssl bench needs 2 CPUs")
def test_bench_prints_the_comparison_and_draws_it(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    proc = run("bench", "--smoke", "--plot", str(chart), "--out", str(tmp_path / "out"),
               timeout=300)
    out = proc.stdout.decode()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        one_line_error(proc, "--plot needs matplotlib")
    else:
        assert proc.returncode == 0, proc.stderr
        assert chart.stat().st_size > 10_000
    rows = {ln.split("  ")[0]: ln for ln in out.splitlines() if "(" in ln and "x)" in ln}
    assert set(rows) >= {"anyio-asyncssl (trio face), offload", "trio.SSLStream",
                         "anyio-asyncssl (trio face), no offload", "anyio TLSStream (trio)"}
    assert rows["trio.SSLStream"].count("(1.00x)") == 5
    assert b"8/8" in proc.stderr                         # the progress bar got to the end
    assert (tmp_path / "out" / "RESULTS.md").exists()


def test_serve_asks_for_the_password_on_a_terminal(tmp_path: Path) -> None:
    cert, key = _encrypted_pair(tmp_path, b"typed-in")
    master, slave = pty.openpty()
    proc = subprocess.Popen([*ASYNCSSL, "serve", "--port", "0", "--no-offload",
                             "--cert", str(cert), "--key", str(key)],
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, text=True,
                            env=ENV, start_new_session=True)
    os.close(slave)
    try:
        got = b""
        deadline = time.monotonic() + 20
        while b"password for" not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                got += os.read(master, 1024)
        assert str(key).encode() in got, got            # the prompt names the key file
        os.write(master, b"typed-in\n")
        assert proc.stdout is not None
        assert "TLS echo server on 127.0.0.1:" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        os.close(master)


def test_connect_to_a_server_that_does_not_speak_tls_is_one_line() -> None:
    import threading

    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]

        def answer() -> None:
            conn, _ = plain.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nnot TLS here\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        one_line_error(run("connect", f"127.0.0.1:{port}", "--timeout", "10"),
                       f"TLS handshake with 127.0.0.1:{port} failed")
        t.join(10)
