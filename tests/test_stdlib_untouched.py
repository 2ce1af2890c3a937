"""The stdlib ``ssl`` module keeps working, unchanged, in a process where our offload
provider is loaded and active (it lives in a private OpenSSL library context)."""

from __future__ import annotations

import contextlib
import io
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl._ffi import ffi, lib
from anyio_asyncssl.testing import TestEngine, pump

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
VERSION_NAME = {TLS12: "TLSv1.2", TLS13: "TLSv1.3"}


# -- two kinds of sans-IO peer behind one small interface -------------------------------
class _Ours:
    def __init__(self, conn: A.TLSConnection) -> None:
        self.conn = conn
        self.waiting = False

    def handshake(self, incoming: bytes) -> bool:
        st = self.conn.do_handshake(incoming)
        self.waiting = st in (A.Status.WANT_ASYNC, A.Status.WANT_ASYNC_JOB)
        return st is A.Status.DONE

    def outgoing(self) -> bytes:
        return self.conn.bytes_to_send()

    def send(self, data: bytes) -> None:
        st, n = self.conn.write(data)
        assert st is A.Status.DONE and n == len(data)

    def recv(self, incoming: bytes) -> bytes:
        st, data = self.conn.read(incoming=incoming)
        return data if st is A.Status.DONE else b""

    def version(self) -> str | None:
        return self.conn.version()


class _Stdlib:
    def __init__(self, ctx: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                server_hostname=server_hostname)
        self.waiting = False

    def handshake(self, incoming: bytes) -> bool:
        if incoming:
            self.inc.write(incoming)
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def outgoing(self) -> bytes:
        return self.out.read()

    def send(self, data: bytes) -> None:
        assert self.obj.write(data) == len(data)

    def recv(self, incoming: bytes) -> bytes:
        if incoming:
            self.inc.write(incoming)
        try:
            return self.obj.read(65536)
        except ssl.SSLWantReadError:
            return b""

    def version(self) -> str | None:
        return self.obj.version()


_Peer = _Ours | _Stdlib


def _shuttle(client: _Peer, server: _Peer, timeout: float = 5.0) -> None:
    """Handshake both peers, then send a message each way and check it arrives."""
    deadline = time.monotonic() + timeout
    done = [False, False]
    while not all(done):
        assert time.monotonic() < deadline, "handshake made no progress"
        if not done[0]:
            done[0] = client.handshake(server.outgoing())
        if not done[1]:
            done[1] = server.handshake(client.outgoing())
        if client.waiting or server.waiting:
            time.sleep(0.0005)
    for sender, receiver, msg in ((client, server, b"ping from client"),
                                  (server, client, b"pong from server")):
        sender.send(msg)
        got = b""
        while len(got) < len(msg):
            assert time.monotonic() < deadline, "data did not arrive"
            # the last handshake flight (e.g. TLS 1.3 tickets) may still be in flight
            receiver.recv(b"")
            got += receiver.recv(sender.outgoing())
            sender.recv(receiver.outgoing())
        assert got == msg


def _counters(offload: A.Offload) -> tuple[int, int, int, int]:
    st = offload.stats()
    return st.sign_ops, st.submitted, st.inline, st.decrypt_ops


def _stdlib_server(pki: Pki, kind: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.rsa_file if kind == "rsa" else pki.ec_file)
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _stdlib_client(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


@pytest.fixture
def active_offload(pki: Pki, offload: A.Offload) -> Iterator[A.Offload]:
    """The offload, after handshakes went through it (so its provider is in use)."""
    TestEngine(offload).clear()
    before = offload.stats().sign_ops
    for kind in ("rsa", "ec"):
        s = A.TLSConnection(pki.server_ctx(kind, offload=offload), server_side=True)
        c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
        pump(c, s)
    assert offload.stats().sign_ops - before == 2
    yield offload


# -- stdlib against stdlib ----------------------------------------------------------------
@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_stdlib_handshakes_do_not_use_offload(
    pki: Pki, active_offload: A.Offload, kind: str, version: ssl.TLSVersion
) -> None:
    before = _counters(active_offload)
    server = _Stdlib(_stdlib_server(pki, kind, version), server_side=True)
    client = _Stdlib(_stdlib_client(pki), server_side=False, server_hostname="localhost")
    _shuttle(client, server)
    assert client.version() == server.version() == VERSION_NAME[version]
    peer = client.obj.getpeercert()
    assert peer is not None and peer["subjectAltName"][0] == ("DNS", "localhost")
    assert _counters(active_offload) == before


def test_stdlib_handshake_while_our_job_is_paused(pki: Pki, offload: A.Offload) -> None:
    """A stdlib handshake runs to completion while our server's signature is
    paused on a worker; the stdlib does not touch (or resume) our job."""
    engine = TestEngine(offload)
    engine.clear()
    s = A.TLSConnection(pki.server_ctx("rsa", offload=offload), server_side=True)
    c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    with engine.inject(latency_ms=100):
        assert c.do_handshake() is A.Status.WANT_READ
        assert s.do_handshake(c.bytes_to_send()) is A.Status.WANT_ASYNC
        assert s.pending_operation is A.Operation.HANDSHAKE
        before = _counters(offload)
        server = _Stdlib(_stdlib_server(pki, "rsa", TLS13), server_side=True)
        client = _Stdlib(_stdlib_client(pki), server_side=False, server_hostname="localhost")
        _shuttle(client, server)
        assert _counters(offload) == before
        assert s.pending_operation is A.Operation.HANDSHAKE  # still paused
        pump(c, s)
    assert c.handshake_done and s.handshake_done


_STDLIB_PROBE = """
import json, ssl
client = ssl.create_default_context()
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
print(json.dumps({
    "version": ssl.OPENSSL_VERSION,
    "client_ciphers": [c["name"] for c in client.get_ciphers()],
    "server_ciphers": [c["name"] for c in server.get_ciphers()],
    "client_options": int(client.options),
    "server_options": int(server.options),
    "client_min": int(client.minimum_version),
    "client_max": int(client.maximum_version),
}, sort_keys=True))
"""


def test_stdlib_defaults_same_as_in_a_fresh_interpreter(active_offload: A.Offload) -> None:
    fresh = subprocess.run([sys.executable, "-c", _STDLIB_PROBE], capture_output=True,
                           text=True, check=True, timeout=30).stdout
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(_STDLIB_PROBE, {})
    assert json.loads(here.getvalue()) == json.loads(fresh)


def test_offload_provider_only_in_private_library_context(active_offload: A.Offload) -> None:
    name = b"asyncssl-offload"
    assert lib.OSSL_PROVIDER_available(active_offload.libctx, name) == 1
    assert lib.OSSL_PROVIDER_available(ffi.NULL, name) == 0  # the stdlib's context
    assert lib.OSSL_PROVIDER_available(ffi.NULL, b"default") == 1


# -- ours against the stdlib ------------------------------------------------------------
@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_our_offloaded_server_with_stdlib_client(
    pki: Pki, active_offload: A.Offload, kind: str, version: ssl.TLSVersion
) -> None:
    sctx = pki.server_ctx(kind, offload=active_offload)
    sctx.minimum_version = sctx.maximum_version = version
    server = _Ours(A.TLSConnection(sctx, server_side=True))
    client = _Stdlib(_stdlib_client(pki), server_side=False, server_hostname="localhost")
    before = active_offload.stats()
    _shuttle(client, server)
    after = active_offload.stats()
    assert client.version() == server.version() == VERSION_NAME[version]
    assert after.sign_ops - before.sign_ops == 1  # our key, on a worker
    assert after.submitted - before.submitted == 1
    assert after.inline == before.inline
    if version == TLS12:
        prefix = "ECDHE-ECDSA-" if kind == "ec" else "ECDHE-RSA-"
        assert client.obj.cipher()[0].startswith(prefix)  # type: ignore[index]


@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_our_client_with_stdlib_server(
    pki: Pki, active_offload: A.Offload, kind: str, version: ssl.TLSVersion
) -> None:
    server = _Stdlib(_stdlib_server(pki, kind, version), server_side=True)
    client = _Ours(A.TLSConnection(pki.client_ctx(offload=active_offload),
                                   server_hostname="localhost"))
    before = _counters(active_offload)
    _shuttle(client, server)
    assert client.version() == server.version() == VERSION_NAME[version]
    assert ("DNS", "localhost") in client.conn.getpeercert()["subjectAltName"]
    assert _counters(active_offload) == before  # a client without a key signs nothing


@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls12", "tls13"])
def test_our_offloaded_mtls_client_with_stdlib_server(
    pki: Pki, active_offload: A.Offload, version: ssl.TLSVersion
) -> None:
    sctx = _stdlib_server(pki, "rsa", version)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(cafile=str(pki.ca_file))
    server = _Stdlib(sctx, server_side=True)
    cctx = pki.client_ctx(offload=active_offload)
    cctx.load_cert_chain(pki.client_file)
    client = _Ours(A.TLSConnection(cctx, server_hostname="localhost"))
    before = active_offload.stats()
    _shuttle(client, server)
    after = active_offload.stats()
    assert client.version() == server.version() == VERSION_NAME[version]
    assert after.sign_ops - before.sign_ops == 1  # the client's CertificateVerify
    assert after.submitted - before.submitted == 1
    peer = server.obj.getpeercert()
    assert peer is not None and ("email", "client@example.com") in peer["subjectAltName"]


def test_stdlib_still_works_after_offload_closed(pki: Pki) -> None:
    with A.Offload(workers=1) as off:
        s = A.TLSConnection(pki.server_ctx("ec", offload=off), server_side=True)
        c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
        pump(c, s)
        assert off.stats().sign_ops == 1
    server = _Stdlib(_stdlib_server(pki, "ec", TLS13), server_side=True)
    client = _Stdlib(_stdlib_client(pki), server_side=False, server_hostname="localhost")
    _shuttle(client, server)
    assert client.version() == "TLSv1.3"
    assert off.stats().sign_ops == 1
