"""Handshake failures: the right exception class and a useful message, on the side
that detects the problem (and an alert error on the other side)."""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path
from typing import Protocol

import pytest
import trustme
from conftest import Pki, alert_received

import anyio_asyncssl as A
from anyio_asyncssl.testing import pump

X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_HOSTNAME_MISMATCH = 62


class _Side(Protocol):
    def bytes_to_send(self) -> bytes: ...
    def do_handshake(self, data: bytes = ...) -> A.Status: ...


def _handshake_errors(
    c: _Side, s: _Side, timeout: float = 5.0
) -> tuple[ssl.SSLError | None, ssl.SSLError | None]:
    """Run a handshake to its end; return (client error, server error).

    A side that fails stops; its last bytes (the alert) still reach the other
    side, which then fails too or finishes.  Stops when neither side can move.
    """
    errors: dict[int, ssl.SSLError | None] = {0: None, 1: None}
    done = {0: False, 1: False}
    sides = ((0, c, s), (1, s, c))
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < 2:
        assert time.monotonic() < deadline, "handshake neither failed nor finished"
        moved = False
        waiting = False
        for i, me, peer in sides:
            data = peer.bytes_to_send()
            if errors[i] is not None or done[i]:
                continue
            moved = moved or bool(data)
            try:
                st = me.do_handshake(data)
            except ssl.SSLError as exc:
                errors[i] = exc
                moved = True
                continue
            if st is A.Status.DONE:
                done[i] = True
                moved = True
            elif st in (A.Status.WANT_ASYNC, A.Status.WANT_ASYNC_JOB):
                waiting = True
        if waiting:
            time.sleep(0.0005)
        idle = 0 if (moved or waiting) else idle + 1
    return errors[0], errors[1]


def _pair(
    server_ctx: A.TLSContext, client_ctx: A.TLSContext, hostname: str = "localhost"
) -> tuple[A.TLSConnection, A.TLSConnection]:
    return (A.TLSConnection(client_ctx, server_hostname=hostname),
            A.TLSConnection(server_ctx, server_side=True))


def _issue(pki: Pki, name: str, *, not_before: datetime.datetime,
           not_after: datetime.datetime) -> Path:
    leaf = pki.ca.issue_cert("localhost", key_type=trustme.KeyType.RSA,
                             not_before=not_before, not_after=not_after)
    path = pki.tmp / f"{name}.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(path)
    return path


@pytest.fixture(params=[False, True], ids=["inline", "offload"])
def server_offload(request: pytest.FixtureRequest, offload: A.Offload) -> A.Offload | None:
    return offload if request.param else None


# -- certificate verification -------------------------------------------------------
def test_untrusted_ca_fails_on_client_with_verify_code(
    pki: Pki, server_offload: A.Offload | None
) -> None:
    other_ca = trustme.CA()
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=other_ca.cert_pem.bytes().decode("ascii"))
    c, s = _pair(pki.server_ctx("rsa", offload=server_offload), client)
    with pytest.raises(A.CertificateVerifyError,
                       match="certificate verify failed: unable to get local issuer") as info:
        pump(c, s)
    err = info.value
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert isinstance(err, ssl.SSLError)
    assert err.verify_code in (X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
                               X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN)
    assert err.verify_message == "unable to get local issuer certificate"
    assert err.reason == "CERTIFICATE_VERIFY_FAILED"


def test_untrusted_ca_server_sees_unknown_ca_alert(pki: Pki) -> None:
    other_ca = trustme.CA()
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=other_ca.cert_pem.bytes().decode("ascii"))
    c, s = _pair(pki.server_ctx("rsa"), client)
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(cerr, A.CertificateVerifyError)
    assert isinstance(serr, A.TLSError)
    assert not isinstance(serr, A.CertificateVerifyError)
    assert "alert unknown ca" in str(serr)


def test_self_signed_root_in_chain_is_code_19(pki: Pki, tmp_path: Path) -> None:
    other_ca = trustme.CA()
    leaf = other_ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    path = tmp_path / "with-root.pem"
    path.write_bytes(leaf.private_key_and_cert_chain_pem.bytes() + other_ca.cert_pem.bytes())
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path)
    c, s = _pair(server, pki.client_ctx())
    with pytest.raises(A.CertificateVerifyError, match="self-signed certificate") as info:
        pump(c, s)
    assert info.value.verify_code == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


def test_hostname_mismatch_is_code_62(pki: Pki, server_offload: A.Offload | None) -> None:
    c, s = _pair(pki.server_ctx("rsa", offload=server_offload), pki.client_ctx(),
                 hostname="wrong.example")
    with pytest.raises(A.CertificateVerifyError,
                       match=r"Hostname mismatch, .* not valid for 'wrong\.example'") as info:
        pump(c, s)
    assert isinstance(info.value, ssl.SSLCertVerificationError)
    assert info.value.verify_code == X509_V_ERR_HOSTNAME_MISMATCH
    assert "wrong.example" in info.value.verify_message


def test_ip_address_mismatch_is_code_64(pki: Pki) -> None:
    c, s = _pair(pki.server_ctx("rsa"), pki.client_ctx(), hostname="10.9.8.7")
    with pytest.raises(A.CertificateVerifyError,
                       match=r"IP address mismatch, .* not valid for '10\.9\.8\.7'") as info:
        pump(c, s)
    assert info.value.verify_code == 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


def test_hostname_check_off_accepts_other_name(pki: Pki) -> None:
    client = pki.client_ctx()
    client.check_hostname = False
    c, s = _pair(pki.server_ctx("rsa"), client, hostname="wrong.example")
    pump(c, s)
    assert c.handshake_done


def test_expired_certificate_is_code_10(pki: Pki) -> None:
    now = datetime.datetime.now(datetime.UTC)
    path = _issue(pki, "expired", not_before=now - datetime.timedelta(days=30),
                  not_after=now - datetime.timedelta(days=1))
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path)
    c, s = _pair(server, pki.client_ctx())
    with pytest.raises(A.CertificateVerifyError, match="certificate has expired") as info:
        pump(c, s)
    assert info.value.verify_code == X509_V_ERR_CERT_HAS_EXPIRED
    assert info.value.verify_message == "certificate has expired"


def test_not_yet_valid_certificate_is_code_9(pki: Pki) -> None:
    now = datetime.datetime.now(datetime.UTC)
    path = _issue(pki, "future", not_before=now + datetime.timedelta(days=1),
                  not_after=now + datetime.timedelta(days=30))
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path)
    c, s = _pair(server, pki.client_ctx())
    with pytest.raises(A.CertificateVerifyError, match="not yet valid") as info:
        pump(c, s)
    assert info.value.verify_code == X509_V_ERR_CERT_NOT_YET_VALID


def test_untrusted_client_certificate_fails_on_server(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode("ascii"))
    client = pki.client_ctx()
    client.load_cert_chain(pki.client_file)
    c, s = _pair(server, client)
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(serr, A.CertificateVerifyError)
    # the client's chain was completed from its own trust store: the root comes along
    assert serr.verify_code in (X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
                                X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN)
    assert serr.verify_message
    # TLS 1.3: the client finished before the server checked its certificate
    assert cerr is None


# -- negotiation failures ----------------------------------------------------------------
def test_no_shared_cipher_ecdsa_suites_with_rsa_certificate(
    pki: Pki, server_offload: A.Offload | None
) -> None:
    server = pki.server_ctx("rsa", offload=server_offload)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    server.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    c, s = _pair(server, pki.client_ctx())
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(serr, A.TLSError)
    assert serr.reason == "NO_SHARED_CIPHER"
    assert "no shared cipher" in str(serr)
    assert isinstance(cerr, A.TLSError)
    assert "alert handshake failure" in str(cerr)


def test_no_shared_cipher_disjoint_lists(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    client = pki.client_ctx()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES256-GCM-SHA384")
    c, s = _pair(server, client)
    with pytest.raises(A.TLSError, match="no shared cipher") as info:
        pump(c, s)
    assert info.value.reason == "NO_SHARED_CIPHER"


def test_no_shared_tls13_suite(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.set_ciphersuites("TLS_AES_256_GCM_SHA384")
    client = pki.client_ctx()
    client.set_ciphersuites("TLS_CHACHA20_POLY1305_SHA256")
    c, s = _pair(server, client)
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(serr, A.TLSError) and serr.reason == "NO_SHARED_CIPHER"
    assert isinstance(cerr, A.TLSError) and "handshake failure" in str(cerr)


def test_no_shared_protocol_version(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    client = pki.client_ctx()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    c, s = _pair(server, client)
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(serr, A.TLSError)
    assert "unsupported protocol" in str(serr)
    assert isinstance(cerr, A.TLSError)
    assert "alert protocol version" in str(cerr)


def test_alpn_mismatch_server_refuses_and_client_sees_alert(
    pki: Pki, server_offload: A.Offload | None
) -> None:
    server = pki.server_ctx("rsa", offload=server_offload)
    server.set_alpn_protocols(["h2"])
    client = pki.client_ctx()
    client.set_alpn_protocols(["http/1.1"])
    c, s = _pair(server, client)
    cerr, serr = _handshake_errors(c, s)
    assert isinstance(serr, A.TLSError)
    assert "no application protocol" in str(serr)
    assert isinstance(cerr, A.TLSError)
    assert not isinstance(cerr, A.CertificateVerifyError)
    assert "alert no application protocol" in str(cerr)


def test_alpn_mismatch_raises_from_pump(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_alpn_protocols(["h2"])
    client = pki.client_ctx()
    client.set_alpn_protocols(["http/1.1"])
    c, s = _pair(server, client)
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        pump(c, s)


# -- after a failure ----------------------------------------------------------------------
def test_failed_handshake_leaves_context_usable(
    pki: Pki, server_offload: A.Offload | None
) -> None:
    server = pki.server_ctx("rsa", offload=server_offload)
    c, s = _pair(server, pki.client_ctx(), hostname="wrong.example")
    with pytest.raises(A.CertificateVerifyError):
        pump(c, s)
    c2, s2 = _pair(server, pki.client_ctx())
    pump(c2, s2)
    assert c2.handshake_done and s2.handshake_done


def test_error_queue_does_not_leak_into_next_connection(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_alpn_protocols(["h2"])
    bad_client = pki.client_ctx()
    bad_client.set_alpn_protocols(["http/1.1"])
    good_client = pki.client_ctx()
    good_client.set_alpn_protocols(["h2"])
    c, s = _pair(server, bad_client)
    _handshake_errors(c, s)
    c2, s2 = _pair(server, good_client)
    pump(c2, s2)
    assert c2.selected_alpn_protocol() == "h2"
    # a later, different failure reports its own reason, not the old one
    c3, s3 = _pair(server, pki.client_ctx(), hostname="wrong.example")
    with pytest.raises(A.CertificateVerifyError) as info:
        pump(c3, s3)
    assert "application protocol" not in str(info.value)


# -- the same failure has the stdlib's reason name on every OpenSSL ------------------------
class _StdlibSide:
    """A stdlib ``SSLObject`` over memory BIOs, spoken to like a TLSConnection by
    :func:`_handshake_errors`."""

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=None if server_side else "localhost")

    def bytes_to_send(self) -> bytes:
        return self.outgoing.read()

    def do_handshake(self, data: bytes = b"") -> A.Status:
        if data:
            self.incoming.write(data)
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return A.Status.WANT_READ
        return A.Status.DONE


def _stdlib_server(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.rsa_file)
    return ctx


def _stdlib_client(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


@pytest.mark.parametrize("case", ["handshake_failure received", "unknown_ca received"])
def test_a_received_alert_has_the_stdlibs_reason_name_whatever_openssl_calls_it(
        pki: Pki, tmp_path: Path, case: str) -> None:
    """OpenSSL 3.5 reworded alert reasons ("ssl/tls alert handshake failure" for
    "sslv3 alert handshake failure"); the stdlib names a reason by its code, so
    must we: the same alert from the same peer gives the same ``reason``."""
    if case == "handshake_failure received":
        # the server finds no shared cipher and says handshake_failure
        server_std = _stdlib_server(pki)
        server_std.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        ours, theirs = pki.client_ctx(), _stdlib_client(pki.ca_file)
        for ctx in (ours, theirs):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE-RSA-AES256-GCM-SHA384")
        our_err, _ = _handshake_errors(A.TLSConnection(ours, server_hostname="localhost"),
                                       _StdlibSide(server_std, server_side=True))
        std_err, _ = _handshake_errors(_StdlibSide(theirs, server_side=False),
                                       _StdlibSide(server_std, server_side=True))
    else:
        # a client that trusts another CA says unknown_ca to the server
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(other)
        server_ours, server_std = pki.server_ctx("rsa"), _stdlib_server(pki)
        _, our_err = _handshake_errors(_StdlibSide(_stdlib_client(other), server_side=False),
                                       A.TLSConnection(server_ours, server_side=True))
        _, std_err = _handshake_errors(_StdlibSide(_stdlib_client(other), server_side=False),
                                       _StdlibSide(server_std, server_side=True))
    assert isinstance(our_err, A.TLSError) and isinstance(std_err, ssl.SSLError)
    assert alert_received(our_err) == {"handshake_failure received": 40,
                                       "unknown_ca received": 48}[case]
    assert our_err.library == std_err.library == "SSL"
    ours_major_minor = (A.OPENSSL_VERSION_NUMBER >> 28, (A.OPENSSL_VERSION_NUMBER >> 20) & 0xFF)
    if ssl.OPENSSL_VERSION_INFO[:2] != ours_major_minor:
        # (a system whose stdlib links another OpenSSL, e.g. 3.6 beside our 4.0,
        # which reports alerts under new codes, TLS_ALERT_*: the names differ
        # there as the two OpenSSLs do; the alert above is what both agree on)
        return
    assert our_err.reason == std_err.reason, (our_err, std_err)
    assert f"[SSL: {std_err.reason}]" in str(our_err)


def test_reason_names_come_from_the_headers_as_the_stdlibs_do() -> None:
    """The build's table names every reason by its macro (asx_reason_name)."""
    import _ssl

    from anyio_asyncssl._ffi import ffi, lib

    def name(lib_code: int, reason: int) -> str | None:
        p = lib.asx_reason_name(lib_code, reason)
        return None if p == ffi.NULL else ffi.string(p).decode()

    assert name(lib.ERR_LIB_SSL, lib.SSL_R_CERTIFICATE_VERIFY_FAILED) == "CERTIFICATE_VERIFY_FAILED"
    assert name(lib.ERR_LIB_SSL, lib.SSL_R_UNEXPECTED_EOF_WHILE_READING) == (
        "UNEXPECTED_EOF_WHILE_READING")
    assert name(lib.ERR_LIB_SSL, 99999) is None
    # Python up to 3.12 exports its own table (3.13 no longer does): where
    # both name a code, the names agree
    stdlib: dict[tuple[int, int], str] = getattr(_ssl, "err_codes_to_names", {})
    same_openssl = ssl.OPENSSL_VERSION_INFO[:2] == (
        A.OPENSSL_VERSION_NUMBER >> 28, (A.OPENSSL_VERSION_NUMBER >> 20) & 0xFF)
    if stdlib and same_openssl:
        disagree = {k: (v, name(*k)) for k, v in stdlib.items() if name(*k) not in (None, v)}
        assert not disagree, disagree
        assert sum(name(*k) is not None for k in stdlib) > 0.9 * len(stdlib)
