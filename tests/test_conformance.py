"""RFC 8446 conformance of what OpenSSL enables by default, checked on the wire.

TLS 1.3 middlebox compatibility (RFC 8446 appendix D.4): a client offers a
non-empty ``legacy_session_id`` and a server that receives one MUST answer
with a dummy change_cipher_spec record right after its ServerHello.  OpenSSL
does both only with ``SSL_OP_ENABLE_MIDDLEBOX_COMPAT``, on by default: a
context must add its options to OpenSSL's defaults, never replace them.
"""

from __future__ import annotations

import ssl

import pytest
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.testing import pump

# TLS record content types (RFC 8446 5.1)
CHANGE_CIPHER_SPEC = 20
HANDSHAKE = 22
APPLICATION_DATA = 23
SERVER_HELLO = 2
CLIENT_HELLO = 1


def _records(wire: bytes) -> list[tuple[int, bytes]]:
    """Split TLS records: ``(content type, fragment)``."""
    out: list[tuple[int, bytes]] = []
    while len(wire) >= 5:
        n = int.from_bytes(wire[3:5], "big")
        out.append((wire[0], wire[5:5 + n]))
        wire = wire[5 + n:]
    assert wire == b"", "a truncated record"
    return out


def _stdlib_client_hello() -> bytes:
    """The ClientHello of a stdlib client (TLS 1.3 capable), as sent on the wire."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _client_hello_session_id(record: bytes) -> bytes:
    """``legacy_session_id`` of a ClientHello handshake message."""
    assert record[0] == CLIENT_HELLO
    body = record[4:]
    # legacy_version (2) + random (32), then the length-prefixed session id
    n = body[34]
    return body[35:35 + n]


def test_new_context_keeps_openssl_middlebox_compat_default() -> None:
    for protocol in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
        ctx = A.TLSContext(protocol)
        assert ctx.options & ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    assert A.create_default_context().options & ssl.OP_ENABLE_MIDDLEBOX_COMPAT


def test_context_options_are_a_superset_of_the_stdlib_defaults() -> None:
    """Nothing OpenSSL (or CPython) turns on by default is lost silently."""
    for protocol in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
        ours = A.TLSContext(protocol).options
        stdlib = ssl.SSLContext(protocol).options
        # CPython leaves SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS out of SSL_OP_ALL
        # (a TLS 1.0 CBC workaround we do not need: TLS >= 1.2 only).  Debian's
        # python3 (not upstream CPython) adds OP_IGNORE_UNEXPECTED_EOF, which
        # takes a truncation for a clean end: we keep upstream's default, a
        # ragged EOF is a TLSEOFError (test_the_default_context_reports_a_ragged_eof)
        missing = stdlib & ~ours & ~0x800 & ~ssl.OP_IGNORE_UNEXPECTED_EOF
        assert missing == 0, hex(missing)


def test_the_default_context_reports_a_ragged_eof(pki: Pki) -> None:
    """Upstream CPython's default, whatever a distribution's python3 does."""
    for protocol in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
        assert not A.TLSContext(protocol).options & ssl.OP_IGNORE_UNEXPECTED_EOF
    server = A.TLSConnection(pki.server_ctx("rsa"), server_side=True)
    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    pump(client, server)
    server.receive_eof()   # the transport ended, no close_notify
    with pytest.raises(A.TLSEOFError):
        server.read(100)


def test_tls13_server_sends_ccs_after_server_hello(pki: Pki) -> None:
    """Fed the stdlib client's ClientHello, our server answers ServerHello, then CCS."""
    hello = _stdlib_client_hello()
    assert _client_hello_session_id(_records(hello)[0][1]), "stdlib sends a session id"
    server = A.TLSConnection(pki.server_ctx("rsa"), server_side=True)
    assert server.do_handshake(hello) is A.Status.WANT_READ
    records = _records(server.bytes_to_send())
    kinds = [kind for kind, _ in records]
    assert kinds[0] == HANDSHAKE and records[0][1][0] == SERVER_HELLO
    assert kinds[1] == CHANGE_CIPHER_SPEC, kinds
    assert records[1][1] == b"\x01"
    assert all(kind == APPLICATION_DATA for kind in kinds[2:]), kinds


def test_tls13_server_with_offload_sends_ccs_after_server_hello(
        pki: Pki, offload: A.Offload) -> None:
    from anyio_asyncssl.testing import retry_while_async

    hello = _stdlib_client_hello()
    server = A.TLSConnection(pki.server_ctx("rsa", offload=offload), server_side=True)
    server.receive_bytes(hello)
    assert retry_while_async(server.do_handshake)[-1] is A.Status.WANT_READ
    kinds = [kind for kind, _ in _records(server.bytes_to_send())]
    assert kinds[:2] == [HANDSHAKE, CHANGE_CIPHER_SPEC], kinds


def test_our_client_sends_a_32_byte_legacy_session_id(pki: Pki) -> None:
    """As the stdlib client does (RFC 8446 D.4: a non-empty session id)."""
    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    assert client.do_handshake() is A.Status.WANT_READ
    records = _records(client.bytes_to_send())
    assert records[0][0] == HANDSHAKE
    ours = _client_hello_session_id(records[0][1])
    theirs = _client_hello_session_id(_records(_stdlib_client_hello())[0][1])
    assert len(ours) == len(theirs) == 32


def test_key_update_is_refused_before_the_handshake_and_on_tls12(pki: Pki) -> None:
    from anyio_asyncssl.testing import pump

    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    with pytest.raises(A.TLSError):
        client.key_update()
    sctx = pki.server_ctx("rsa")
    sctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = A.TLSConnection(sctx, server_side=True)
    pump(client, server)
    with pytest.raises(A.TLSError):
        server.key_update()


def test_key_update_both_ways_between_our_connections(pki: Pki) -> None:
    """Each side's KeyUpdate(update_requested) is answered; data flows after each."""
    from anyio_asyncssl.testing import pump

    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    server = A.TLSConnection(pki.server_ctx("rsa"), server_side=True)
    pump(client, server)
    for first, second in ((client, server), (server, client)):
        first.key_update(request_peer_update=True)
        first.write(b"after update")
        wire = first.bytes_to_send()
        assert second.read(100, wire) == (A.Status.DONE, b"after update")
        second.write(b"reply")   # carries the requested KeyUpdate of its own
        assert first.read(100, second.bytes_to_send()) == (A.Status.DONE, b"reply")
