"""TLSContext: defaults, certificates and keys, ciphers, ALPN, SNI, mTLS, sessions,
keylog, CA data and connection inspection -- and clear errors for wrong input."""

from __future__ import annotations

import datetime
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import Pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

import anyio_asyncssl as A
from anyio_asyncssl._ffi import lib
from anyio_asyncssl.testing import pump, pump_until

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


# -- helpers -------------------------------------------------------------------
def _connect(
    server_ctx: A.TLSContext,
    client_ctx: A.TLSContext,
    hostname: str | None = "localhost",
    session: A.TLSSession | None = None,
) -> tuple[A.TLSConnection, A.TLSConnection]:
    s = A.TLSConnection(server_ctx, server_side=True)
    c = A.TLSConnection(client_ctx, server_hostname=hostname, session=session)
    pump(c, s)
    return c, s


def _server_to_client(c: A.TLSConnection, s: A.TLSConnection, data: bytes) -> bytes:
    """The server writes ``data``; the client reads it (and any session tickets)."""
    got: list[bytes] = []

    def client_read(incoming: bytes) -> A.Status:
        st, chunk = c.read(incoming=incoming)
        got.append(chunk)
        return st

    pump_until(c, s, client_read, lambda b: s.write(data, incoming=b)[0], timeout=5)
    return b"".join(got)


def _client_ctx(pki: Pki, version: ssl.TLSVersion | None = None) -> A.TLSContext:
    ctx = pki.client_ctx()
    if version is not None:
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


def _leaf_pem(cert: trustme.LeafCert) -> bytes:
    return cert.cert_chain_pems[0].bytes()


def _first_cert_der(path: Path) -> bytes:
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----",
                  path.read_text(), re.S)
    assert m is not None
    return ssl.PEM_cert_to_DER_cert(m.group(0))


@pytest.fixture(scope="module")
def sni_certs(pki: Pki) -> dict[str, Path]:
    """Key+chain files for other.example and *.wild.example (same CA as ``pki``)."""
    out: dict[str, Path] = {}
    for name, ident in (("other", "other.example"), ("wild", "*.wild.example")):
        leaf = pki.ca.issue_cert(ident, key_type=trustme.KeyType.RSA)
        path = pki.tmp / f"sni-{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(path)
        out[ident] = path
    return out


@pytest.fixture(scope="module")
def encrypted_key(pki: Pki) -> tuple[Path, Path]:
    """(certificate chain file, PKCS#8 key file encrypted with b"s3cret")."""
    leaf = pki.ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    enc = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    cert_path = pki.tmp / "enc-cert.pem"
    key_path = pki.tmp / "enc-key.pem"
    cert_path.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key_path.write_bytes(enc)
    assert b"ENCRYPTED" in enc
    return cert_path, key_path


# -- create_default_context -----------------------------------------------------
def test_default_client_context_verifies_certificate_and_hostname() -> None:
    ctx = A.create_default_context(ssl.Purpose.SERVER_AUTH)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version >= TLS12
    assert ctx.protocol == ssl.PROTOCOL_TLS_CLIENT


def test_default_server_context_requests_no_client_certificate() -> None:
    ctx = A.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    assert ctx.minimum_version >= TLS12
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER


def test_default_context_rejects_unknown_purpose() -> None:
    with pytest.raises(ValueError, match="purpose"):
        A.create_default_context("bogus")  # type: ignore[arg-type]


def test_openssl_option_bits_match_stdlib_constants() -> None:
    assert lib.SSL_OP_NO_COMPRESSION == ssl.OP_NO_COMPRESSION
    assert lib.SSL_OP_NO_RENEGOTIATION == ssl.OP_NO_RENEGOTIATION
    assert lib.SSL_OP_CIPHER_SERVER_PREFERENCE == ssl.OP_CIPHER_SERVER_PREFERENCE


@pytest.mark.parametrize("purpose", [ssl.Purpose.SERVER_AUTH, ssl.Purpose.CLIENT_AUTH])
def test_default_context_disables_compression_and_renegotiation(purpose: ssl.Purpose) -> None:
    ctx = A.create_default_context(purpose)
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_options_setter_clears_and_sets_bits(pki: Pki) -> None:
    ctx = pki.server_ctx()
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_tls12_suites_are_ecdhe_only(pki: Pki) -> None:
    client = _client_ctx(pki, TLS12)
    c, _ = _connect(pki.server_ctx("rsa"), client)
    assert c.version() == "TLSv1.2"
    cipher = c.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-RSA-")


def test_tls12_static_rsa_client_is_refused(pki: Pki) -> None:
    client = _client_ctx(pki, TLS12)
    client.set_ciphers("AES128-GCM-SHA256")  # static RSA key exchange only
    with pytest.raises(A.TLSError, match="no shared cipher") as info:
        _connect(pki.server_ctx("rsa"), client)
    assert info.value.reason == "NO_SHARED_CIPHER"


# -- load_cert_chain ----------------------------------------------------------------
def test_load_cert_chain_missing_file_is_file_not_found(pki: Pki) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    missing = pki.tmp / "does-not-exist.pem"
    with pytest.raises(A.TLSFileNotFoundError, match=r"does-not-exist\.pem") as info:
        ctx.load_cert_chain(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ssl.SSLError)
    assert info.value.errno == 2
    assert info.value.filename == str(missing)


def test_load_cert_chain_missing_key_file_is_file_not_found(pki: Pki) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(FileNotFoundError, match="key file"):
        ctx.load_cert_chain(pki.rsa_file, pki.tmp / "no-key.pem")


@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
def test_load_cert_chain_key_not_matching_certificate(
    pki: Pki, offload: A.Offload, use_offload: bool
) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload if use_offload else None)
    # the RSA certificate (first in rsa.pem) with the key of ec.pem
    with pytest.raises(A.TLSError, match="private key does not match the certificate"):
        ctx.load_cert_chain(pki.rsa_file, pki.ec_file)


def test_load_cert_chain_file_without_key(pki: Pki) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match="no private key"):
        ctx.load_cert_chain(pki.ca_file)


@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
@pytest.mark.parametrize(
    "password",
    ["s3cret", b"s3cret", lambda: "s3cret", lambda: b"s3cret"],
    ids=["str", "bytes", "callable-str", "callable-bytes"],
)
def test_load_cert_chain_encrypted_key_with_password(
    pki: Pki,
    offload: A.Offload,
    encrypted_key: tuple[Path, Path],
    password: str | bytes | Callable[[], str | bytes],
    use_offload: bool,
) -> None:
    cert, key = encrypted_key
    off = offload if use_offload else None
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
    ctx.load_cert_chain(cert, key, password=password)
    before = offload.stats().sign_ops
    c, s = _connect(ctx, pki.client_ctx())
    assert c.handshake_done and s.handshake_done
    assert offload.stats().sign_ops - before == (1 if use_offload else 0)


def test_load_cert_chain_encrypted_key_wrong_password(
    encrypted_key: tuple[Path, Path]
) -> None:
    cert, key = encrypted_key
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match="wrong password"):
        ctx.load_cert_chain(cert, key, password="not-it")
    with pytest.raises(A.TLSError, match="wrong password"):
        ctx.load_cert_chain(cert, key, password=lambda: b"not-it")


def test_load_cert_chain_encrypted_key_missing_password(
    encrypted_key: tuple[Path, Path]
) -> None:
    cert, key = encrypted_key
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match="encrypted: pass password="):
        ctx.load_cert_chain(cert, key)


def test_load_cert_chain_bad_password_type(encrypted_key: tuple[Path, Path]) -> None:
    cert, key = encrypted_key
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TypeError, match="password"):
        ctx.load_cert_chain(cert, key, password=1234)  # type: ignore[arg-type]


@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_load_cert_chain_serves_handshakes(
    pki: Pki, offload: A.Offload, kind: str, use_offload: bool
) -> None:
    before = offload.stats().sign_ops
    c, s = _connect(pki.server_ctx(kind, offload=offload if use_offload else None),
                    pki.client_ctx())
    assert c.version() == "TLSv1.3" and s.version() == "TLSv1.3"
    assert offload.stats().sign_ops - before == (1 if use_offload else 0)


# -- ciphers and ALPN --------------------------------------------------------------
def test_set_ciphers_rejects_unknown_cipher() -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError, match="NOPE-NOT-A-CIPHER") as info:
        ctx.set_ciphers("NOPE-NOT-A-CIPHER")
    assert isinstance(info.value, A.TLSError)
    assert info.value.reason == "NO_CIPHER_MATCH"


def test_failed_set_ciphers_leaves_tls12_suites_unchanged(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    with pytest.raises(A.TLSError):
        server.set_ciphers("NOPE-NOT-A-CIPHER")
    c, _ = _connect(server, _client_ctx(pki, TLS12))
    assert c.version() == "TLSv1.2"


def test_set_ciphersuites_rejects_unknown_suite() -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match="TLS_NOPE"):
        ctx.set_ciphersuites("TLS_NOPE")


@pytest.mark.parametrize("bad", [b"", b"x" * 300, ""], ids=["empty", "300-bytes", "empty-str"])
def test_set_alpn_protocols_rejects_bad_protocol_id(bad: bytes | str) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError, match="1 to 255 bytes") as info:
        ctx.set_alpn_protocols(["h2", bad])
    assert isinstance(info.value, A.TLSError)
    assert ctx.alpn_protocols == ()


def test_alpn_negotiates_common_protocol(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_alpn_protocols(["h2", "http/1.1"])
    client = pki.client_ctx()
    client.set_alpn_protocols(["http/1.1"])
    assert client.alpn_protocols == (b"http/1.1",)
    c, s = _connect(server, client)
    assert c.selected_alpn_protocol() == "http/1.1"
    assert s.selected_alpn_protocol() == "http/1.1"


def test_alpn_server_preference_wins(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_alpn_protocols(["h2", "http/1.1"])
    client = pki.client_ctx()
    client.set_alpn_protocols(["http/1.1", "h2"])
    c, s = _connect(server, client)
    assert c.selected_alpn_protocol() == s.selected_alpn_protocol() == "h2"


def test_alpn_not_offered_selects_nothing(pki: Pki) -> None:
    server = pki.server_ctx("rsa")
    server.set_alpn_protocols(["h2"])
    c, s = _connect(server, pki.client_ctx())
    assert c.selected_alpn_protocol() is None
    assert s.selected_alpn_protocol() is None


# -- SNI ------------------------------------------------------------------------
def _sni_server(pki: Pki, sni_certs: dict[str, Path], off: A.Offload | None) -> A.TLSContext:
    ctx = pki.server_ctx("rsa", offload=off)
    for name, path in sni_certs.items():
        ctx.add_sni_certificate(name, path)
    assert ctx.sni_hostnames == ("other.example", "*.wild.example")
    return ctx


def _dns_names(c: A.TLSConnection) -> set[str]:
    cert = c.getpeercert()
    return {v for k, v in cert["subjectAltName"] if k == "DNS"}


@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
@pytest.mark.parametrize(
    ("hostname", "expected", "hit"),
    [
        ("other.example", "other.example", 1),
        ("a.wild.example", "*.wild.example", 1),
        ("OTHER.Example", "other.example", 1),
        ("unknown.example", "localhost", 0),
        ("x.y.wild.example", "localhost", 0),  # a wildcard covers one label only
    ],
)
def test_sni_selects_certificate(
    pki: Pki, offload: A.Offload, sni_certs: dict[str, Path],
    hostname: str, expected: str, hit: int, use_offload: bool,
) -> None:
    server = _sni_server(pki, sni_certs, offload if use_offload else None)
    client = pki.client_ctx()
    client.check_hostname = False  # the default certificate does not name unknown hosts
    before = offload.stats().sign_ops
    c, _ = _connect(server, client, hostname=hostname)
    assert expected in _dns_names(c)
    assert server.sni_hits == hit
    # the SNI certificate's key is offloaded too
    assert offload.stats().sign_ops - before == (1 if use_offload else 0)


def test_sni_certificate_verifies_with_hostname_check(
    pki: Pki, sni_certs: dict[str, Path]
) -> None:
    server = _sni_server(pki, sni_certs, None)
    c, _ = _connect(server, pki.client_ctx(), hostname="b.wild.example")
    assert "*.wild.example" in _dns_names(c)
    assert server.sni_hits == 1


def test_sni_without_server_name_gets_default_certificate(
    pki: Pki, sni_certs: dict[str, Path]
) -> None:
    server = _sni_server(pki, sni_certs, None)
    client = pki.client_ctx()
    client.check_hostname = False
    c, _ = _connect(server, client, hostname=None)
    assert "localhost" in _dns_names(c)
    assert server.sni_hits == 0


def test_sni_missing_certificate_file(pki: Pki) -> None:
    ctx = pki.server_ctx("rsa")
    with pytest.raises(A.TLSFileNotFoundError):
        ctx.add_sni_certificate("x.example", pki.tmp / "missing-sni.pem")
    assert ctx.sni_hostnames == ()


# -- mutual TLS ---------------------------------------------------------------------
def _mtls_server(pki: Pki, off: A.Offload | None = None) -> A.TLSContext:
    ctx = pki.server_ctx("rsa", offload=off)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.ca_file)
    return ctx


@pytest.mark.parametrize("version", [TLS12, TLS13])
@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
def test_mtls_server_sees_client_certificate(
    pki: Pki, offload: A.Offload, version: ssl.TLSVersion, use_offload: bool
) -> None:
    off = offload if use_offload else None
    client = pki.client_ctx(offload=off)
    client.maximum_version = version
    client.load_cert_chain(pki.client_file)
    before = offload.stats().sign_ops
    c, s = _connect(_mtls_server(pki, off), client)
    # the client's proof of its key goes through the offload too
    assert offload.stats().sign_ops - before == (2 if use_offload else 0)
    peer = s.getpeercert()
    assert ("email", "client@example.com") in peer["subjectAltName"]
    assert (("commonName", "test client"),) in peer["subject"]
    assert s.getpeercert(binary_form=True) == _first_cert_der(pki.client_file)
    assert c.version() == s.version() == {TLS12: "TLSv1.2", TLS13: "TLSv1.3"}[version]


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_mtls_without_client_certificate_fails_on_server(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    client = pki.client_ctx()
    client.maximum_version = version
    with pytest.raises(ssl.SSLError,
                       match="peer did not return a certificate") as info:
        _connect(_mtls_server(pki), client)
    assert isinstance(info.value, A.TLSError)


def test_mtls_optional_accepts_missing_client_certificate(pki: Pki) -> None:
    server = _mtls_server(pki)
    server.verify_mode = ssl.CERT_OPTIONAL
    c, s = _connect(server, pki.client_ctx())
    assert s.getpeercert() is None
    assert c.handshake_done


def test_mtls_with_sni_certificate_keeps_client_verification(
    pki: Pki, sni_certs: dict[str, Path]
) -> None:
    server = _mtls_server(pki)
    server.add_sni_certificate("other.example", sni_certs["other.example"])
    client = pki.client_ctx()
    client.load_cert_chain(pki.client_file)
    c, s = _connect(server, client, hostname="other.example")
    assert "other.example" in _dns_names(c)
    assert ("email", "client@example.com") in s.getpeercert()["subjectAltName"]
    # and a client without a certificate is still refused
    with pytest.raises(ssl.SSLError, match="peer did not return a certificate"):
        _connect(server, pki.client_ctx(), hostname="other.example")


# -- sessions -------------------------------------------------------------------------
@pytest.mark.parametrize("version", [TLS12, TLS13])
@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
def test_session_resumption(
    pki: Pki, offload: A.Offload, version: ssl.TLSVersion, use_offload: bool
) -> None:
    server = pki.server_ctx("rsa", offload=offload if use_offload else None)
    client = _client_ctx(pki, version)
    c1, s1 = _connect(server, client)
    assert not c1.session_reused and not s1.session_reused
    assert _server_to_client(c1, s1, b"hello") == b"hello"  # TLS 1.3: tickets arrive
    sess = c1.session
    assert sess is not None and sess.is_resumable
    before = offload.stats().sign_ops
    c2, s2 = _connect(server, client, session=sess)
    assert c2.session_reused and s2.session_reused
    assert c2.version() == {TLS12: "TLSv1.2", TLS13: "TLSv1.3"}[version]
    assert offload.stats().sign_ops == before  # a resumed handshake signs nothing


def test_session_resumption_with_mtls(pki: Pki) -> None:
    server = _mtls_server(pki)
    client = _client_ctx(pki, TLS12)
    client.load_cert_chain(pki.client_file)
    c1, _ = _connect(server, client)
    c2, s2 = _connect(server, client, session=c1.session)
    assert c2.session_reused and s2.session_reused
    assert ("email", "client@example.com") in s2.getpeercert()["subjectAltName"]


def test_session_on_server_side_is_refused(pki: Pki) -> None:
    c, _ = _connect(pki.server_ctx(), pki.client_ctx())
    sess = c.session
    assert sess is not None
    with pytest.raises(ValueError, match="client side"):
        A.TLSConnection(pki.server_ctx(), server_side=True, session=sess)


# -- keylog --------------------------------------------------------------------------
def test_keylog_filename_records_tls13_secrets(pki: Pki, tmp_path: Path) -> None:
    log = tmp_path / "keys.log"
    client = pki.client_ctx()
    client.keylog_filename = str(log)
    assert client.keylog_filename == str(log)
    _connect(pki.server_ctx(), client)
    client.keylog_filename = None  # closes the file
    lines = log.read_text().splitlines()
    assert lines[0].startswith("#")
    labels = {line.split()[0] for line in lines[1:]}
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in labels
    assert "CLIENT_TRAFFIC_SECRET_0" in labels
    # one line per secret: label, 32-byte client random, secret (hex)
    for line in lines[1:]:
        _label, client_random, secret = line.split()
        assert len(client_random) == 64 and len(secret) >= 64
    # nothing more is written once it is switched off
    _connect(pki.server_ctx(), client)
    assert log.read_text().splitlines() == lines


# -- CA data ---------------------------------------------------------------------------
def test_load_verify_locations_cadata_pem_str(pki: Pki) -> None:
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=pki.ca.cert_pem.bytes().decode("ascii"))
    c, _ = _connect(pki.server_ctx(), client)
    assert c.handshake_done


def test_load_verify_locations_cadata_der_bytes(pki: Pki) -> None:
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    der = ssl.PEM_cert_to_DER_cert(pki.ca.cert_pem.bytes().decode("ascii"))
    client.load_verify_locations(cadata=der)
    c, _ = _connect(pki.server_ctx(), client)
    assert c.handshake_done


@pytest.mark.parametrize(
    "cadata",
    ["not a certificate", b"\x30\x03\x02\x01\x00", b"garbage bytes"],
    ids=["pem-text", "bad-der", "garbage"],
)
def test_load_verify_locations_bad_cadata(cadata: str | bytes) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(A.TLSError, match="cadata"):
        ctx.load_verify_locations(cadata=cadata)


def test_load_verify_locations_missing_cafile(pki: Pki) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(A.TLSFileNotFoundError, match="CA file"):
        ctx.load_verify_locations(pki.tmp / "no-ca.pem")
    with pytest.raises(TypeError):
        ctx.load_verify_locations()


# -- inspection --------------------------------------------------------------------------
def test_version_and_cipher(pki: Pki) -> None:
    c, s = _connect(pki.server_ctx(), _client_ctx(pki, TLS12))
    assert c.version() == s.version() == "TLSv1.2"
    assert c.cipher() == s.cipher()
    name, proto, bits = c.cipher()  # type: ignore[misc]
    assert name.startswith("ECDHE-RSA-") and proto == "TLSv1.2" and bits in (128, 256)
    c3, _ = _connect(pki.server_ctx(), pki.client_ctx())
    cipher = c3.cipher()
    assert cipher is not None and cipher[0].startswith("TLS_") and cipher[1] == "TLSv1.3"


def test_version_is_none_before_handshake(pki: Pki) -> None:
    c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    assert c.version() is None
    assert c.cipher() is None
    with pytest.raises(ValueError, match="handshake"):
        c.getpeercert()


def test_shared_ciphers_on_server_side(pki: Pki) -> None:
    client = _client_ctx(pki, TLS12)
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305")
    c, s = _connect(pki.server_ctx(), client)
    shared = s.shared_ciphers()
    assert shared is not None
    names = {n for n, _, _ in shared}
    assert {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"} <= names
    assert "ECDHE-RSA-AES256-GCM-SHA384" not in names  # the client did not offer it
    assert c.shared_ciphers() is None


def test_tls_unique_channel_binding_equal_on_both_sides(pki: Pki) -> None:
    c, s = _connect(pki.server_ctx(), _client_ctx(pki, TLS12))
    cb = c.get_channel_binding("tls-unique")
    assert cb is not None and len(cb) == 12  # the first Finished's verify_data
    assert s.get_channel_binding("tls-unique") == cb
    # a different connection has a different binding
    c2, _ = _connect(pki.server_ctx(), _client_ctx(pki, TLS12))
    assert c2.get_channel_binding() != cb
    with pytest.raises(ValueError, match="not implemented"):
        c.get_channel_binding("tls-server-end-point")


def test_tls_unique_channel_binding_after_resumption(pki: Pki) -> None:
    server = pki.server_ctx()
    client = _client_ctx(pki, TLS12)
    c1, _ = _connect(server, client)
    c2, s2 = _connect(server, client, session=c1.session)
    assert c2.session_reused
    cb = c2.get_channel_binding()
    assert cb is not None and s2.get_channel_binding() == cb


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_getpeercert_matches_stdlib_decoding(pki: Pki, kind: str, tmp_path: Path) -> None:
    leaf = pki.ca.issue_cert("localhost", "127.0.0.1", "::1", "example.com",
                             key_type=trustme.KeyType.RSA if kind == "rsa"
                             else trustme.KeyType.ECDSA)
    chain = tmp_path / "chain.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(chain)
    only_leaf = tmp_path / "leaf.pem"
    only_leaf.write_bytes(_leaf_pem(leaf))
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain)
    c, _ = _connect(server, pki.client_ctx())
    ours = c.getpeercert()
    expected = ssl._ssl._test_decode_cert(str(only_leaf))  # type: ignore[attr-defined]
    assert ours == expected
    for key in ("subject", "issuer", "notBefore", "notAfter", "subjectAltName"):
        assert key in ours
    assert ("IP Address", "0:0:0:0:0:0:0:1") in ours["subjectAltName"]
    der = c.getpeercert(binary_form=True)
    assert der == ssl.PEM_cert_to_DER_cert(_leaf_pem(leaf).decode("ascii"))
    assert der[0] == 0x30  # an ASN.1 SEQUENCE


def test_getpeercert_without_verification_is_empty_dict(pki: Pki) -> None:
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c, s = _connect(pki.server_ctx(), client, hostname=None)
    assert c.getpeercert() == {}
    assert isinstance(c.getpeercert(binary_form=True), bytes)
    assert s.getpeercert() is None  # the client sent no certificate


# -- more clear errors and SNI policy -----------------------------------------------------
def test_load_cert_chain_key_only_file_names_the_certificate_file(pki: Pki) -> None:
    key_only = pki.tmp / "key-only.pem"
    text = pki.rsa_file.read_text()
    key_only.write_text(text[: text.index("-----BEGIN CERTIFICATE-----")])
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match=r"cannot load certificate chain .*key-only\.pem"):
        ctx.load_cert_chain(key_only, pki.rsa_file)


def test_load_verify_locations_garbage_cafile(pki: Pki) -> None:
    garbage = pki.tmp / "garbage-ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(A.TLSError, match=r"cannot load CA file .*garbage-ca\.pem"):
        ctx.load_verify_locations(garbage)


def test_sni_certificate_keeps_ecdhe_only_policy(pki: Pki, sni_certs: dict[str, Path]) -> None:
    server = _sni_server(pki, sni_certs, None)
    client = _client_ctx(pki, TLS12)
    client.set_ciphers("AES128-GCM-SHA256")  # static RSA
    with pytest.raises(A.TLSError, match="no shared cipher"):
        _connect(server, client, hostname="other.example")


def test_sni_ec_certificate_replaces_rsa_default(pki: Pki) -> None:
    ec = pki.ca.issue_cert("ec.example", key_type=trustme.KeyType.ECDSA)
    path = pki.tmp / "sni-ec.pem"
    ec.private_key_and_cert_chain_pem.write_to_path(path)
    server = pki.server_ctx("rsa")
    server.add_sni_certificate("ec.example", path)
    for version in (TLS12, TLS13):
        c, _ = _connect(server, _client_ctx(pki, version), hostname="ec.example")
        assert "ec.example" in _dns_names(c)
        if version == TLS12:
            assert c.cipher()[0].startswith("ECDHE-ECDSA-")  # type: ignore[index]


def _unusual_cert(tmp: Path, *, aia: bool) -> tuple[Path, Path]:
    """A self-signed localhost certificate with DirName and Registered ID
    subject alt names (and optionally AIA and CRL distribution points)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Unusual")])
    dirname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dir entry")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(0x1234ABCD)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.DirectoryName(dirname),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
            x509.UniformResourceIdentifier("https://localhost/"),
        ]), critical=False)
    )
    if aia:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier("http://ocsp.example/")),
            x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                   x509.UniformResourceIdentifier("http://ca.example/ca.der")),
        ]), critical=False).add_extension(x509.CRLDistributionPoints([
            x509.DistributionPoint([x509.UniformResourceIdentifier("http://crl.example/a.crl")],
                                   None, None, None),
        ]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = tmp / "unusual-cert.pem", tmp / "unusual-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _peer_cert_dict(cert_path: Path, key_path: Path) -> dict[str, object]:
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    c, _ = _connect(server, A.create_default_context(cafile=cert_path))
    return c.getpeercert()  # type: ignore[no-any-return]


def test_getpeercert_dirname_and_registered_id_match_stdlib(tmp_path: Path) -> None:
    cert_path, key_path = _unusual_cert(tmp_path, aia=False)
    ours = _peer_cert_dict(cert_path, key_path)
    assert ours == ssl._ssl._test_decode_cert(str(cert_path))  # type: ignore[attr-defined]
    assert ("DirName", ((("commonName", "dir entry"),),)) in ours["subjectAltName"]  # type: ignore[operator]
    assert ("Registered ID", "1.2.3.4") in ours["subjectAltName"]  # type: ignore[operator]
    assert ours["serialNumber"] == "1234ABCD"


def test_getpeercert_aia_and_crl_distribution_points_match_stdlib(tmp_path: Path) -> None:
    cert_path, key_path = _unusual_cert(tmp_path, aia=True)
    ours = _peer_cert_dict(cert_path, key_path)
    assert ours == ssl._ssl._test_decode_cert(str(cert_path))  # type: ignore[attr-defined]


def test_settings_replayed_on_rebuild_do_not_grow_when_repeated(
        pki: Pki, offload: A.Offload) -> None:
    """A context whose ALPN list is set per connection (httpx clients sharing it)."""
    from anyio_asyncssl.testing import pump

    ctx = A.create_default_context(cafile=pki.ca_file, offload=offload)
    before = len(ctx._applied)
    for i in range(200):
        ctx.set_alpn_protocols(["h2", "http/1.1"] if i % 2 else ["http/1.1"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
    assert len(ctx._applied) <= before + 3
    # the last value is the one a rebuilt SSL_CTX gets
    ctx.set_alpn_protocols(["h2"])
    ctx.load_provider("default")
    server_ctx = pki.server_ctx()
    server_ctx.set_alpn_protocols(["http/1.1", "h2"])
    client = A.TLSConnection(ctx, server_hostname="localhost")
    server = A.TLSConnection(server_ctx, server_side=True)
    pump(client, server)
    assert client.selected_alpn_protocol() == "h2"


def test_a_context_is_freed_by_reference_counting_not_by_the_cycle_collector(
        pki: Pki, offload: A.Offload, tmp_path: Path) -> None:
    """No reference cycle: a context goes on the thread that drops it.

    It was a cycle (its replayable settings closed over it), so the cycle
    collector freed it on whichever thread happened to run, and with it the
    offload's library context: OpenSSL 3.0 then crashed at exit.
    """
    import gc
    import weakref

    gc.disable()
    try:
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
        ctx.load_cert_chain(pki.rsa_file)
        ctx.add_sni_certificate("example.com", pki.ec_file)
        ctx.set_ciphers("ECDHE+AESGCM")
        ctx.set_ciphersuites("TLS_AES_128_GCM_SHA256")
        ctx.set_alpn_protocols(["h2"])
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=pki.ca_file)
        ctx.load_verify_locations(cadata=pki.ca.cert_pem.bytes().decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.num_tickets = 1
        ctx.options = ctx.options
        ctx.keylog_filename = str(tmp_path / "keys.log")
        ctx.load_provider("default")
        conn = A.TLSConnection(ctx, server_side=True)
        ref = weakref.ref(ctx)
        del ctx, conn
        assert ref() is None
    finally:
        gc.enable()


# == key URIs (OSSL_STORE) =============================================================
def _split_pem(pki: Pki, tmp_path: Path, password: bytes | None = None) -> tuple[Path, Path]:
    """The RSA chain and its key in separate files (the key encrypted with ``password``)."""
    from cryptography.hazmat.primitives import serialization

    pem = pki.rsa_file.read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, enc))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(block for block in re.findall(
        rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)))
    return chain, key_path


@pytest.mark.parametrize("use_offload", [False, True], ids=["inline", "offload"])
def test_a_key_uri_loads_through_the_store_and_serves(pki: Pki, offload: A.Offload,
                                                      tmp_path: Path, use_offload: bool) -> None:
    from anyio_asyncssl.testing import pump

    chain, key = _split_pem(pki, tmp_path)
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload if use_offload else None)
    ctx.load_cert_chain(chain, f"file:{key}")
    before = offload.stats().sign_ops
    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    server = A.TLSConnection(ctx, server_side=True)
    pump(client, server)
    assert client.version() == "TLSv1.3"
    assert (offload.stats().sign_ops > before) is use_offload


def test_a_protected_key_uri_takes_the_password_and_says_what_is_wrong(
        pki: Pki, tmp_path: Path) -> None:
    chain, key = _split_pem(pki, tmp_path, password=b"s3cret")
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, f"file:{key}", password="s3cret")
    with pytest.raises(A.TLSError, match="wrong password"):
        ctx.load_cert_chain(chain, f"file:{key}", password="nope")
    with pytest.raises(A.TLSError, match="pass password="):
        ctx.load_cert_chain(chain, f"file:{key}")


@pytest.mark.parametrize("uri", ["file:/nonexistent/key.pem", "nosuchscheme:key-1"])
def test_a_key_uri_that_names_nothing_fails_at_load_time(pki: Pki, uri: str) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(A.TLSError, match="no private key found at"):
        ctx.load_cert_chain(pki.rsa_file, uri)


def test_a_file_whose_name_looks_like_a_uri_is_still_a_file(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain, key = _split_pem(pki, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkcs11:token-key").write_bytes(key.read_bytes())
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, "pkcs11:token-key")   # a relative path, not a URI
    from anyio_asyncssl.context import key_uri
    assert key_uri("pkcs11:token-key") is None
    assert key_uri("pkcs11:object=other") == "pkcs11:object=other"
    assert key_uri(tmp_path / "x") is None


# == providers with a module path and parameters ===============================================
def _modules_dir() -> str:
    import subprocess

    out = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True,
                         check=True).stdout
    return out.split('"')[1]


def test_a_provider_loads_from_its_module_path_with_parameters(pki: Pki) -> None:
    off = A.Offload(workers=1)
    try:
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        ctx.load_cert_chain(pki.rsa_file)
        ctx.load_provider("legacy", path=f"{_modules_dir()}/legacy.so",
                          params={"some-setting": 'quoted "$HOME" # not a comment \\ ok'},
                          properties="")
        assert "legacy" in off.providers
        from anyio_asyncssl.testing import pump

        client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
        server = A.TLSConnection(ctx, server_side=True)
        pump(client, server)   # the rebuilt context still serves
        with pytest.raises(A.TLSError, match="could not load provider 'gone' from"):
            off.load_provider("gone", path="/nonexistent/gone.so")
        with pytest.raises(ValueError, match="letters, digits"):
            off.load_provider("bad name", params={"a": "b"})
        with pytest.raises(ValueError, match="single lines"):
            off.load_provider("legacy2", params={"a": "b\nactivate = 0"})
        del client, server, ctx
    finally:
        off.close()


def test_provider_config_quotes_what_openssl_would_expand() -> None:
    from anyio_asyncssl.offload import provider_config

    text = provider_config("pkcs11", "/usr/lib/pkcs11.so", {
        "pkcs11-module-path": "/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11-module-token-pin": "file:/run/pin#1$x"})
    assert 'module = "/usr/lib/pkcs11.so"' in text
    assert 'pkcs11-module-token-pin = "file:/run/pin\\#1\\$x"' in text
    assert text.endswith("activate = 1\n")
