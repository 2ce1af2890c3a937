"""The sans-IO core end to end, no event loop: handshakes, data, offload evidence.

Two :class:`TLSConnection` objects shuttle bytes in one thread.  With offload
on, the counters of the connection and of the :class:`Offload` prove that the
private-key operation really went through the async path: the job paused,
``WANT_ASYNC`` came back, the wake-up came from a worker thread (callback) or
through the engine's wait fd, and the retry finished the handshake.
"""

from __future__ import annotations

import hashlib
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Pki
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import anyio_asyncssl as A
from anyio_asyncssl.testing import TestEngine, cipher_counters, pump, pump_until, retry_while_async

TIMEOUT = 10.0
Status = A.Status


# -- helpers ---------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_paused_jobs_left(no_jobs_left: None) -> None:
    """Every test must leave no job paused and nothing parked (rule 4 of docs/architecture.md)."""


def _pair(server_ctx: A.TLSContext, client_ctx: A.TLSContext,
          notify: str = "callback") -> tuple[A.TLSConnection, A.TLSConnection]:
    s = A.TLSConnection(server_ctx, server_side=True, notify=notify)
    c = A.TLSConnection(client_ctx, server_hostname="localhost")
    return c, s


def _retry(call: Callable[[], Status], *, timeout: float = TIMEOUT) -> list[Status]:
    """Call ``call`` until it stops answering WANT_ASYNC; return every answer."""
    return retry_while_async(call, timeout=timeout)


def _send(src: A.TLSConnection, dst: A.TLSConnection, data: bytes, *,
          timeout: float = TIMEOUT) -> bytes:
    """Write ``data`` on ``src``, read on ``dst`` until all of it arrived; return it."""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    sent = 0
    got = bytearray()
    while len(got) < len(data):
        if time.monotonic() > deadline:
            raise TimeoutError(f"sent {sent}, received {len(got)} of {len(data)} bytes")
        waiting = False
        if sent < len(data):
            # a retry after WANT_ASYNC passes the same bytes again (rule 2)
            st, n = src.write(view[sent:sent + 65536])
            if st is Status.DONE:
                assert n > 0
                sent += n
            waiting |= st is Status.WANT_ASYNC
        dst.receive_bytes(src.bytes_to_send())
        st, chunk = dst.read(65536)
        assert st is not Status.CLOSED
        if st is Status.DONE:
            got += chunk
        waiting |= st is Status.WANT_ASYNC
        if waiting:
            time.sleep(0.0002)
    # both sides are idle again: no job left paused
    assert src.pending_operation is None and dst.pending_operation is None
    return bytes(got)


def _set_version(ctx: A.TLSContext, version: str) -> None:
    if version == "TLSv1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3


# -- handshake + data: the matrix -------------------------------------------------
@pytest.mark.parametrize("notify", ["callback", "fd"])
@pytest.mark.parametrize("use_offload", [True, False], ids=["offload", "no-offload"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_handshake_and_data_both_ways(pki: Pki, offload: A.Offload, engine: TestEngine,
                                      version: str, kind: str, use_offload: bool,
                                      notify: str) -> None:
    engine.set(latency_ms=5)  # the worker cannot finish before the job pauses
    sctx = pki.server_ctx(kind, offload=offload if use_offload else None)
    _set_version(sctx, version)
    c, s = _pair(sctx, pki.client_ctx(), notify)
    before = offload.stats()

    pump(c, s, timeout=TIMEOUT)

    after = offload.stats()
    assert s.handshake_done and c.handshake_done
    assert s.version() == c.version() == version
    # the right certificate and key were used
    key = x509.load_der_x509_certificate(c.getpeercert(binary_form=True)).public_key()
    if kind == "rsa":
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
    if version == "TLSv1.2":
        cipher = s.cipher()
        assert cipher is not None
        assert cipher[0].startswith("ECDHE-RSA-" if kind == "rsa" else "ECDHE-ECDSA-")

    st = s.stats()
    if use_offload:
        # one signature (ServerKeyExchange / CertificateVerify), offloaded
        assert after.sign_ops == before.sign_ops + 1
        assert after.submitted == before.submitted + 1
        assert after.completed == before.completed + 1
        assert after.inline == before.inline
        assert after.pauses > before.pauses  # the job paused
        assert st["want_async"] > 0  # WANT_ASYNC was returned
        assert st["retries"] > 0  # ... and the same operation was retried to completion
        assert st["want_async_job"] == 0
        if notify == "callback":
            assert st["callbacks_on_worker"] >= 1  # the C callback ran on a worker thread
            assert st["callbacks_in_job"] == 0
            assert s.wakeups == st["callbacks_on_worker"]
            assert after.notify_callback == before.notify_callback + 1
            assert after.notify_fd == before.notify_fd
            assert s.async_status is A.AsyncStatus.OK
        else:
            assert after.notify_fd == before.notify_fd + 1  # the engine's wait fd
            assert after.notify_callback == before.notify_callback
            assert s.wakeups == 0 and st["callbacks_on_worker"] == 0
            assert s.async_status is A.AsyncStatus.UNSUPPORTED
        # async_mode "handshake": records run without jobs afterwards
        assert not s.async_active
    else:
        assert after == before  # the offload engine saw nothing
        assert st == dict.fromkeys(st, 0)
        assert not s.async_active
    assert c.stats()["want_async"] == 0  # the client has no offload

    assert _send(c, s, b"ping from the client") == b"ping from the client"
    assert _send(s, c, b"pong from the server") == b"pong from the server"
    assert s.pending_operation is None


def test_static_rsa_key_exchange_is_offloaded_as_decrypt(pki: Pki, offload: A.Offload,
                                                         engine: TestEngine) -> None:
    engine.set(latency_ms=5)
    sctx = pki.server_ctx("rsa", offload=offload)
    sctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sctx.set_ciphers("AES128-GCM-SHA256")  # RSA key exchange, the user's choice
    cctx = pki.client_ctx()
    cctx.set_ciphers("AES128-GCM-SHA256")
    c, s = _pair(sctx, cctx)
    before = offload.stats()

    pump(c, s, timeout=TIMEOUT)

    after = offload.stats()
    cipher = s.cipher()
    assert cipher is not None and cipher[0] == "AES128-GCM-SHA256"
    assert s.version() == "TLSv1.2"
    assert after.decrypt_ops == before.decrypt_ops + 1  # the premaster secret
    assert after.sign_ops == before.sign_ops  # nothing signed in static RSA
    assert after.submitted == before.submitted + 1
    assert after.pauses > before.pauses
    assert s.stats()["want_async"] > 0 and s.stats()["retries"] > 0
    assert _send(c, s, b"hello") == b"hello"
    assert _send(s, c, b"world") == b"world"


@pytest.mark.parametrize("records_pause", [False, True], ids=["handshake-async",
                                                               "record-pauses"])
def test_large_data_both_ways_arrives_intact(pki: Pki, offload: A.Offload,
                                             engine: TestEngine, records_pause: bool) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    if records_pause:
        engine.enable_record_pauses(sctx)  # every record of the server pauses
        engine.set(latency_ms=2)
    c, s = _pair(sctx, pki.client_ctx())
    pump(c, s, timeout=TIMEOUT)
    rng = random.Random(1234)
    up = rng.randbytes(1 << 20)
    down = rng.randbytes(1 << 20)
    paused = cipher_counters().paused

    got_up = _send(c, s, up, timeout=30)
    got_down = _send(s, c, down, timeout=30)

    assert len(got_up) == len(up) and hashlib.sha256(got_up).digest() == hashlib.sha256(
        up).digest()
    assert got_down == down
    if records_pause:
        # 1 MiB is 64 records of 16 KiB each way: every cipher call went to the
        # engine, and (with 2 ms latency) nearly every one paused the job; a
        # worker may finish before a pause if this thread is descheduled
        assert cipher_counters().paused - paused >= 128
        assert s.stats()["want_async"] >= 100
    else:
        assert cipher_counters().paused == paused
        assert not s.async_active


# -- the record-cipher test engine: all four operations pause ---------------------
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_all_four_operations_pause_and_complete(pki: Pki, offload: A.Offload,
                                                engine: TestEngine, version: str) -> None:
    engine.set(latency_ms=2)
    sctx = pki.server_ctx("rsa", offload=offload)
    _set_version(sctx, version)
    engine.enable_record_pauses(sctx)
    assert sctx.async_mode == "always"
    c, s = _pair(sctx, pki.client_ctx())
    seen: dict[str, list[Status]] = {"handshake": []}
    paused0 = cipher_counters().paused

    def server_handshake(incoming: bytes) -> Status:
        st = s.do_handshake(incoming)
        seen["handshake"].append(st)
        return st

    pump_until(c, s, lambda b: c.do_handshake(b), server_handshake, timeout=TIMEOUT)
    assert s.handshake_done and s.version() == version
    assert s.async_active  # "always": records run in jobs too
    paused_hs = cipher_counters().paused
    assert paused_hs > paused0

    # read: the client's record is decrypted by a pausing cipher
    assert c.write(b"hello server") == (Status.DONE, 12)
    s.receive_bytes(c.bytes_to_send())
    data: list[bytes] = []

    def read() -> Status:
        st, chunk = s.read(100)
        data.append(chunk)
        return st

    seen["read"] = _retry(read)
    assert b"".join(data) == b"hello server"

    # write: the server's record is encrypted by a pausing cipher
    seen["write"] = _retry(lambda: s.write(b"hello client")[0])
    assert c.read(100, s.bytes_to_send()) == (Status.DONE, b"hello client")

    # shutdown: the close_notify alert is encrypted by a pausing cipher
    seen["shutdown"] = _retry(s.shutdown)
    assert s.close_notify_sent
    assert c.read(100, s.bytes_to_send()) == (Status.CLOSED, b"")
    assert c.close_notify_received

    for op, statuses in seen.items():
        assert Status.WANT_ASYNC in statuses, f"{op} never paused: {statuses}"
        assert statuses[-1] in (Status.DONE, Status.WANT_READ), f"{op}: {statuses}"
    assert seen["read"][-1] is Status.DONE
    assert seen["write"][-1] is Status.DONE
    assert seen["shutdown"][-1] is Status.DONE
    assert cipher_counters().paused > paused_hs
    st = s.stats()
    assert st["want_async"] >= 4 and st["retries"] >= 4
    assert st["callbacks_on_worker"] >= 4
    assert s.pending_operation is None


def test_load_provider_under_a_custom_name(pki: Pki, offload: A.Offload,
                                           engine: TestEngine) -> None:
    engine.set(latency_ms=2)
    offload.register_test_provider("my-accel")
    sctx = pki.server_ctx("rsa", offload=offload)
    sctx.load_provider("my-accel", properties="?asyncssl.cipher=yes")
    sctx.async_mode = "always"
    assert "my-accel" in offload.providers
    assert sctx.property_query is not None
    assert sctx.property_query.split(",")[0] == "?asyncssl.cipher=yes"
    c, s = _pair(sctx, pki.client_ctx())
    paused0 = cipher_counters().paused

    pump(c, s, timeout=TIMEOUT)
    assert cipher_counters().paused > paused0  # handshake records went through my-accel
    paused1 = cipher_counters().paused
    assert _send(c, s, b"through my-accel") == b"through my-accel"
    assert _send(s, c, b"and back") == b"and back"
    assert cipher_counters().paused > paused1
    assert s.stats()["want_async"] > 0


def test_load_provider_changes_only_its_own_context(pki: Pki, offload: A.Offload,
                                                    engine: TestEngine) -> None:
    first = pki.server_ctx("rsa", offload=offload)
    engine.enable_record_pauses(first)
    later = pki.server_ctx("rsa", offload=offload)  # made after the provider was loaded
    assert later.property_query == offload.property_query
    assert "?asyncssl.cipher=yes" not in (later.property_query or "")
    later.async_mode = "always"
    c, s = _pair(later, pki.client_ctx())
    paused0 = cipher_counters()
    pump(c, s, timeout=TIMEOUT)
    assert _send(c, s, b"x" * 1000) == b"x" * 1000
    assert cipher_counters() == paused0  # the default provider's ciphers, no pauses


def test_peer_chains_verified_and_as_sent(pki: Pki) -> None:
    client = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    server = A.TLSConnection(pki.server_ctx("rsa"), server_side=True)
    pump(client, server)
    leaf = client.getpeercert(True)
    ca = ssl.PEM_cert_to_DER_cert(pki.ca.cert_pem.bytes().decode())
    # verified: leaf first, up to the trusted root; as sent: the server's chain file
    assert client.get_verified_chain() == [leaf, ca]
    assert client.get_unverified_chain()[0] == leaf
    assert ca not in client.get_unverified_chain()
    decoded = client.get_verified_chain(binary_form=False)
    assert decoded[0] == client.getpeercert()
    assert decoded[1]["subject"] == decoded[1]["issuer"]          # the self-signed root
    # the server asked for no client certificate: nothing to show
    assert server.get_verified_chain() == [] and server.get_unverified_chain() == []
    fresh = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    with pytest.raises(ValueError):
        fresh.get_verified_chain()


def test_generated_certificates_for_one_host_can_be_trusted_together(tmp_path: Path) -> None:
    """Each generated certificate has a subject and a serial of its own.

    A store trusting two self-signed certificates that share a subject finds only
    one of them by name in OpenSSL 4.0 (``openssl verify`` too): the other's peer
    failed "self-signed certificate".  The soak's two servers (RSA and EC, both
    ``localhost``) hit that on OpenSSL 4.0 before the subjects carried the serial.
    """
    made = [A.generate_self_signed("localhost", key_type=kind)
            for kind in ("rsa", "ec", "ec")]
    certs = [x509.load_pem_x509_certificate(cert) for cert, _ in made]
    assert len({c.subject for c in certs}) == 3
    assert len({c.serial_number for c in certs}) == 3
    for c in certs:
        assert c.issuer == c.subject
        assert 0 < c.serial_number < 2 ** 159 and c.serial_number.bit_length() == 159
    trust = b"".join(cert for cert, _ in made).decode("ascii")
    for i, (cert, key) in enumerate(made):
        (tmp_path / f"{i}.pem").write_bytes(key + cert)
        server_ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tmp_path / f"{i}.pem")
        client = A.TLSConnection(A.create_default_context(cadata=trust),
                                 server_hostname="localhost")
        pump(client, A.TLSConnection(server_ctx, server_side=True))
        assert client.getpeercert(True) == ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))
