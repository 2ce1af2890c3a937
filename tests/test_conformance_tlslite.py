"""RFC 8446 conformance of our TLS 1.3 server, driven by tlslite-ng as a scriptable client.

Our server is the sans-IO :class:`anyio_asyncssl.TLSConnection` on a real
loopback socket, in a thread (handshake, then echo).  The client is
tlslite-ng: its ordinary ``handshakeClientCert`` for the well-formed parts,
and its record layer or a hook on the ClientHello it sends for the scripted,
malformed or unusual ones (the way tlsfuzzer builds its conformance scripts).

Each test asserts what RFC 8446 requires, by alert *description* numbers
(section 6), never by OpenSSL's reason strings: where the RFC names one
alert, that one; where it allows several, the allowed set.  On the server
side the failure must be our :class:`anyio_asyncssl.TLSError` (an
``ssl.SSLError``).  Every scenario runs with the server context made with
and without offload, which changes the handshake's code path (async jobs).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import pytest
from conftest import Pki

import anyio_asyncssl as A

try:
    with warnings.catch_warnings():  # tlslite's package imports asyncore (deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        import tlslite  # noqa: F401
    from tlslite import HandshakeSettings
    from tlslite import TLSConnection as TLSLiteConnection
    from tlslite.constants import TLS_1_3_HRR, ExtensionType, KeyUpdateMessageType
    from tlslite.errors import TLSAbruptCloseError, TLSRemoteAlert
    from tlslite.extensions import KeyShareEntry
    from tlslite.messages import (
        ChangeCipherSpec,
        ClientHello,
        Finished,
        KeyUpdate,
        Message,
        ServerHello,
    )
    from tlslite.utils.codec import Parser
except ImportError:  # pragma: no cover - the [test] extra installs it
    pytest.skip("these tests need tlslite-ng: pip install tlslite-ng (or '.[test]')",
                allow_module_level=True)

T = TypeVar("T")

TIMEOUT = 10.0  # every socket operation and every wait; nothing may hang

# record content types (RFC 8446 5.1)
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23

# handshake types (RFC 8446 4)
CLIENT_HELLO = 1
SERVER_HELLO = 2

# alert descriptions (RFC 8446 6)
CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
BAD_RECORD_MAC = 20
RECORD_OVERFLOW = 22
HANDSHAKE_FAILURE = 40
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
INSUFFICIENT_SECURITY = 71
NO_APPLICATION_PROTOCOL = 120

# a GREASE group (RFC 8701): a server must treat it as any unknown group
UNKNOWN_GROUP = 0x2A2A
X25519 = 0x001D
SECP256R1 = 0x0017
SECP384R1 = 0x0018

MAX_PLAINTEXT = 2**14  # RFC 8446 5.1


# -- our server: a sans-IO TLSConnection on a loopback socket, in a thread ----------------
@dataclass
class Served:
    """What one server-side connection did."""

    error: BaseException | None = None
    handshake_done: bool = False
    received: list[bytes] = field(default_factory=list)
    close_notify_received: bool = False
    session_reused: bool | None = None
    alpn: str | None = None
    version: str | None = None
    job_left_paused: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


def _retry_async(call: Callable[[], T], deadline: float) -> T:
    """Call until the answer is not WANT_ASYNC(_JOB) (offload: the engine's worker signs)."""
    while True:
        out = call()
        st = out[0] if isinstance(out, tuple) else out
        if st not in (A.Status.WANT_ASYNC, A.Status.WANT_ASYNC_JOB):
            return out
        if time.monotonic() > deadline:
            raise TimeoutError("the offload engine never completed")
        time.sleep(0.0005)


def _serve_one(ctx: A.TLSContext, sock: socket.socket, served: Served,
               after_handshake: Callable[[A.TLSConnection], None] | None = None) -> None:
    """Handshake, then echo every read back, until close_notify, EOF or an error."""
    deadline = time.monotonic() + 3 * TIMEOUT
    sock.settimeout(TIMEOUT)
    conn = A.TLSConnection(ctx, server_side=True)

    def flush() -> None:
        out = conn.bytes_to_send()
        if out:
            sock.sendall(out)

    def receive() -> None:
        data = sock.recv(65536)
        if data:
            conn.receive_bytes(data)
        else:
            conn.receive_eof()

    try:
        while True:
            st = _retry_async(conn.do_handshake, deadline)
            flush()
            if st is A.Status.DONE:
                break
            receive()
        served.handshake_done = True
        served.session_reused = conn.session_reused
        served.alpn = conn.selected_alpn_protocol()
        served.version = conn.version()
        if after_handshake is not None:
            after_handshake(conn)
        while True:
            st, data = _retry_async(conn.read, deadline)
            flush()
            if st is A.Status.CLOSED:
                served.close_notify_received = True
                _retry_async(conn.shutdown, deadline)
                flush()
                break
            if st is A.Status.DONE:
                served.received.append(data)
                view = memoryview(data)
                while view:
                    _, n = _retry_async(partial(conn.write, view), deadline)
                    view = view[n:]
                flush()
                continue
            receive()
    except Exception as exc:
        served.error = exc
        try:
            flush()  # the alert OpenSSL wrote for this error, if any
        except OSError:
            pass
    finally:
        served.job_left_paused = conn.pending_operation is not None
        conn.free()
        # a lingering close: let the client read our last flight (an alert) before
        # the socket goes; closing with unread input would reset the connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()
        served.finished.set()


class OurServer:
    """Accepts ``connections`` connections on 127.0.0.1, each served in its own thread."""

    def __init__(self, ctx: A.TLSContext, connections: int = 1,
                 after_handshake: Callable[[A.TLSConnection], None] | None = None) -> None:
        self.ctx = ctx
        self.after_handshake = after_handshake
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = int(self.listener.getsockname()[1])
        self.served = [Served() for _ in range(connections)]
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        for served in self.served:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=_serve_one, daemon=True,
                                 args=(self.ctx, sock, served, self.after_handshake))
            self.threads.append(t)
            t.start()

    def result(self, i: int = 0) -> Served:
        """Connection ``i`` once its server thread has finished."""
        assert self.served[i].finished.wait(2 * TIMEOUT), "the server connection never finished"
        assert not self.served[i].job_left_paused, "an async job was left paused"
        return self.served[i]

    def close(self) -> None:
        self.listener.close()
        self.acceptor.join(TIMEOUT)
        for t in self.threads:
            t.join(TIMEOUT)


@contextmanager
def serving(ctx: A.TLSContext, connections: int = 1,
            after_handshake: Callable[[A.TLSConnection], None] | None = None,
            ) -> Iterator[OurServer]:
    """Our server on 127.0.0.1; ``after_handshake(conn)`` runs in its thread, then echo."""
    server = OurServer(ctx, connections, after_handshake)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=[False, True], ids=["plain", "offload"])
def offload_on(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def server_ctx(pki: Pki, offload: A.Offload, offload_on: bool) -> A.TLSContext:
    """Our server's context, without and with offload (async jobs in the handshake)."""
    return pki.server_ctx("rsa", offload=offload if offload_on else None)


def assert_our_error(served: Served) -> A.TLSError:
    """The server connection failed with our error class (an ``ssl.SSLError``)."""
    assert served.error is not None, "the server accepted what it must reject"
    assert isinstance(served.error, A.TLSError), repr(served.error)
    assert isinstance(served.error, ssl.SSLError)
    return served.error


# -- the client: tlslite-ng, on a socket that records what crossed it ----------------------
class Wire:
    """A socket that keeps a copy of every byte sent and received."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = bytearray()
        self.received = bytearray()

    def send(self, data: bytes) -> int:
        n = self.sock.send(data)
        self.sent += data[:n]
        return n

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += data

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.received += data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Client(TLSLiteConnection):  # type: ignore[misc]
    """tlslite-ng's client, with hooks on the handshake messages it sends.

    ``hello_hook(hello, n)`` may change the n-th ClientHello (0: the first,
    1: the one after a HelloRetryRequest) and ``ccs_hook(ccs)`` the dummy
    CCS; tlslite hashes what is sent, so the transcript stays consistent.
    Messages in ``before_finished`` go out right before the client's
    Finished.  ``messages`` collects every handshake message received
    (HelloRetryRequest included), ``key_updates`` the request_update of
    each KeyUpdate received.
    """

    def __init__(self, wire: Wire,
                 hello_hook: Callable[[ClientHello, int], None] | None = None,
                 ccs_hook: Callable[[ChangeCipherSpec], None] | None = None) -> None:
        super().__init__(wire)
        self.wire = wire
        self.hello_hook = hello_hook
        self.ccs_hook = ccs_hook
        self.hellos_sent = 0
        self.session_ids: list[bytes] = []  # legacy_session_id of each ClientHello sent
        self.before_finished: list[Any] = []
        self.messages: list[Any] = []
        self.key_updates: list[int] = []

    def _sendMsg(self, msg: Any, randomizeFirstBlock: bool = True,
                 update_hashes: bool = True) -> Iterator[int]:
        if isinstance(msg, ClientHello):
            if self.hello_hook is not None:
                self.hello_hook(msg, self.hellos_sent)
            self.hellos_sent += 1
            self.session_ids.append(bytes(msg.session_id))
        elif isinstance(msg, ChangeCipherSpec) and self.ccs_hook is not None:
            self.ccs_hook(msg)
        elif isinstance(msg, Finished):
            while self.before_finished:
                yield from super()._sendMsg(self.before_finished.pop(0))
        yield from super()._sendMsg(msg, randomizeFirstBlock, update_hashes)

    def _getMsg(self, *args: Any, **kwargs: Any) -> Any:
        for result in super()._getMsg(*args, **kwargs):
            if not isinstance(result, int):
                self.messages.append(result)
            yield result

    def _handle_keyupdate_request(self, request: Any) -> Any:
        self.key_updates.append(request.message_type)
        return super()._handle_keyupdate_request(request)


def tls13_settings(**overrides: Any) -> HandshakeSettings:
    """A TLS 1.3-only tlslite client; one cipher (pure Python AES-GCM is slow enough)."""
    s = HandshakeSettings()
    s.minVersion = s.maxVersion = (3, 4)
    s.versions = [(3, 4)]
    s.cipherNames = ["aes128gcm"]
    s.eccCurves = ["x25519", "secp256r1", "secp384r1"]
    s.keyShares = ["x25519"]
    s.record_size_limit = None  # RFC 8449 would change the record-size limits tested here
    s.use_heartbeat_extension = False
    for name, value in overrides.items():
        setattr(s, name, value)
    return s


def open_client(port: int, **hooks: Any) -> Client:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return Client(Wire(sock), **hooks)


def connect(port: int, *, settings: HandshakeSettings | None = None,
            alpn: list[bytes] | None = None, session: Any = None, **hooks: Any) -> Client:
    """A tlslite client with a completed TLS 1.3 handshake to our server."""
    client = open_client(port, **hooks)
    client.handshakeClientCert(settings=settings or tls13_settings(), serverName="localhost",
                               alpn=alpn, session=session)
    assert client.version == (3, 4)
    return client


def handshake_alert(client: Client, **kwargs: Any) -> int:
    """Run the handshake, which must end with an alert from the server: its description."""
    with pytest.raises(TLSRemoteAlert) as info:
        client.handshakeClientCert(settings=kwargs.pop("settings", None) or tls13_settings(),
                                   serverName="localhost", **kwargs)
    return int(info.value.description)


def server_alert(client: Client) -> int | None:
    """Read until the server ends the connection: its alert's description (None: no alert)."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not client.read() and client.closed:
                return CLOSE_NOTIFY
    except TLSRemoteAlert as alert:
        return int(alert.description)
    except (TLSAbruptCloseError, OSError):
        return None
    raise TimeoutError("the server neither answered nor closed")


def server_alert_or_echo(client: Client, data: bytes) -> bytes | int | None:
    """The echo of ``data``, or the alert (description) the server ended the connection with."""
    try:
        client.write(data)
        got = b""
        while len(got) < len(data):
            chunk = client.read()
            if not chunk:
                return CLOSE_NOTIFY
            got += chunk
        return got
    except TLSRemoteAlert as alert:
        return int(alert.description)
    except (TLSAbruptCloseError, OSError):
        return None


def read_exactly(client: Client, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = client.read(n - len(got))
        assert chunk, "the connection closed before the echo"
        got += chunk
    return got


def echo(client: Client, data: bytes) -> bytes:
    """Send ``data``, read as many bytes back (the server echoes)."""
    client.write(data)
    return read_exactly(client, len(data))


def send_protected(client: Client, inner_type: int, content: bytes, padding: int = 0) -> None:
    """One protected record (RFC 8446 5.2) whose TLSInnerPlaintext we choose entirely."""
    layer = client._recordLayer
    inner = bytearray(content) + bytes([inner_type]) + bytes(padding)
    sealed = layer._encryptThenSeal(inner, APPLICATION_DATA)
    for _ in layer._recordSocket.send(Message(APPLICATION_DATA, sealed)):
        pass


def send_raw(client: Client, record_type: int, fragment: bytes,
             version: bytes = b"\x03\x03") -> None:
    """A record written as is, unprotected (a plaintext record)."""
    client.wire.sendall(bytes([record_type]) + version + len(fragment).to_bytes(2, "big")
                        + fragment)


def records(wire: bytes | bytearray) -> list[tuple[int, bytes]]:
    """The complete records in ``wire``: ``(content type, fragment)``."""
    out: list[tuple[int, bytes]] = []
    while len(wire) >= 5:
        n = int.from_bytes(wire[3:5], "big")
        if len(wire) < 5 + n:
            break
        out.append((wire[0], bytes(wire[5:5 + n])))
        wire = wire[5 + n:]
    return out


def parse_server_hello(fragment: bytes) -> ServerHello:
    p = Parser(bytearray(fragment))
    assert p.get(1) == SERVER_HELLO
    return ServerHello().parse(p)


def key_share_entry(group: int) -> KeyShareEntry:
    """A syntactically valid share for a group tlslite may not know (random bytes)."""
    return KeyShareEntry().create(group, bytearray(os.urandom(32)))


def close(client: Client) -> None:
    try:
        client.close()
    except (OSError, TLSAbruptCloseError, TLSRemoteAlert):
        pass


# -- a baseline ----------------------------------------------------------------------------
def test_tlslite_client_completes_a_tls13_handshake_and_echoes(server_ctx: A.TLSContext) -> None:
    with serving(server_ctx) as server:
        client = connect(server.port)
        assert echo(client, b"hello over TLS 1.3") == b"hello over TLS 1.3"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert served.version == "TLSv1.3"
    assert served.close_notify_received
    assert served.received == [b"hello over TLS 1.3"]


# -- change_cipher_spec: middlebox compatibility (RFC 8446 D.4, 5) --------------------------
def test_server_sends_ccs_right_after_server_hello(server_ctx: A.TLSContext) -> None:
    """D.4: a non-empty legacy_session_id is echoed (4.1.3), then a dummy CCS follows SH."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        close(client)
        assert server.result().error is None
    hello = records(client.wire.sent)[0]
    assert hello[0] == HANDSHAKE and hello[1][0] == CLIENT_HELLO
    [session_id] = client.session_ids
    got = records(client.wire.received)
    assert got[0][0] == HANDSHAKE
    server_hello = parse_server_hello(got[0][1])
    assert server_hello.random != TLS_1_3_HRR
    assert len(session_id) == 32 and server_hello.session_id == session_id
    assert got[1] == (CHANGE_CIPHER_SPEC, b"\x01")
    # everything after it is protected: outer type application_data (5.2)
    assert {kind for kind, _ in got[2:]} == {APPLICATION_DATA}


def test_server_ignores_the_clients_dummy_ccs(server_ctx: A.TLSContext) -> None:
    """D.4/5: the client's CCS before its second flight MUST be dropped by the server."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        assert echo(client, b"after the client's CCS") == b"after the client's CCS"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    kinds = [kind for kind, _ in records(client.wire.sent)]
    assert kinds[:2] == [HANDSHAKE, CHANGE_CIPHER_SPEC], kinds
    assert (CHANGE_CIPHER_SPEC, b"\x01") in records(client.wire.sent)


def test_server_drops_two_dummy_ccs_records(server_ctx: A.TLSContext) -> None:
    """5: a CCS of value 0x01 received before the peer's Finished MUST simply be dropped."""
    def twice(ccs: ChangeCipherSpec) -> None:
        send_raw(client, CHANGE_CIPHER_SPEC, b"\x01")

    with serving(server_ctx) as server:
        client = open_client(server.port, ccs_hook=twice)
        client.handshakeClientCert(settings=tls13_settings(), serverName="localhost")
        result = server_alert_or_echo(client, b"two CCS")
        close(client)
        served = server.result()
    assert result == b"two CCS", (result, served.error)
    assert served.error is None
    assert records(client.wire.sent).count((CHANGE_CIPHER_SPEC, b"\x01")) == 2


@pytest.mark.xfail(
    A.OPENSSL_VERSION_NUMBER < 0x30400000, strict=True,
    reason="OpenSSL < 3.4 answers a TLS 1.3 CCS whose value is not 0x01 with illegal_parameter "
           "(47), not unexpected_message (openssl/openssl#25086, fixed in 3.4 by #25257)")
def test_ccs_with_a_value_other_than_1_is_unexpected_message(server_ctx: A.TLSContext) -> None:
    """5: "any other change_cipher_spec value ... MUST abort ... unexpected_message"."""
    def bad_value(ccs: ChangeCipherSpec) -> None:
        ccs.type = 2

    with serving(server_ctx) as server:
        client = open_client(server.port, ccs_hook=bad_value)
        client.handshakeClientCert(settings=tls13_settings(), serverName="localhost")
        alert = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == UNEXPECTED_MESSAGE


def test_protected_ccs_is_unexpected_message(server_ctx: A.TLSContext) -> None:
    """5: "... or which receives a protected change_cipher_spec record MUST abort"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_protected(client, CHANGE_CIPHER_SPEC, b"\x01")
        alert = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == UNEXPECTED_MESSAGE


def test_ccs_after_the_handshake_is_unexpected_message(server_ctx: A.TLSContext) -> None:
    """5: a CCS after the peer's Finished "MUST be treated as an unexpected record type"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")  # the server has our Finished
        send_raw(client, CHANGE_CIPHER_SPEC, b"\x01")
        alert = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == UNEXPECTED_MESSAGE


def test_ccs_before_the_client_hello_is_unexpected_message(server_ctx: A.TLSContext) -> None:
    """5: a CCS before the first ClientHello "MUST be treated as an unexpected record type"."""
    def ccs_first(hello: ClientHello, n: int) -> None:
        send_raw(client, CHANGE_CIPHER_SPEC, b"\x01", version=b"\x03\x01")

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=ccs_first)
        alert = handshake_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == UNEXPECTED_MESSAGE


# -- HelloRetryRequest (RFC 8446 4.1.4, 4.2.8) and unknown groups ---------------------------
def hello_retry(client: Client) -> ServerHello:
    """The HelloRetryRequest the client received (the first ServerHello, special random)."""
    first = client.messages[0]
    assert isinstance(first, ServerHello)
    assert first.random == TLS_1_3_HRR, "no HelloRetryRequest"
    return first


def server_hello(client: Client) -> ServerHello:
    """The real ServerHello (after a HelloRetryRequest, if any)."""
    hellos = [m for m in client.messages
              if isinstance(m, ServerHello) and m.random != TLS_1_3_HRR]
    assert len(hellos) == 1
    return hellos[0]


def selected_group(hello: ServerHello) -> int:
    ext = hello.getExtension(ExtensionType.key_share)
    assert ext is not None, "no key_share"
    if hello.random == TLS_1_3_HRR:
        return int(ext.selected_group)
    return int(ext.server_share.group)


def test_empty_key_share_gets_a_hello_retry_request(server_ctx: A.TLSContext) -> None:
    """2.1/4.1.4: no usable share -> HRR naming an offered group; the retry completes."""
    offered: list[list[int]] = []

    def note(hello: ClientHello, n: int) -> None:
        offered.append(list(hello.getExtension(ExtensionType.supported_groups).groups))

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=note)
        client.handshakeClientCert(settings=tls13_settings(keyShares=[]), serverName="localhost")
        assert echo(client, b"after the retry") == b"after the retry"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    hrr = hello_retry(client)
    group = selected_group(hrr)
    assert group in offered[0]
    assert client.hellos_sent == 2
    # the ServerHello uses the group the HRR asked for (4.2.8)
    assert selected_group(server_hello(client)) == group
    # 4.1.4: HRR and ServerHello echo the (unchanged) legacy_session_id
    first_id, second_id = client.session_ids
    assert len(first_id) == 32 and second_id == first_id
    assert hrr.session_id == server_hello(client).session_id == first_id
    # D.4: the dummy CCS follows the server's *first* handshake message, here the HRR
    got = records(client.wire.received)
    assert parse_server_hello(got[0][1]).random == TLS_1_3_HRR
    assert got[1] == (CHANGE_CIPHER_SPEC, b"\x01")
    assert parse_server_hello(got[2][1]).random != TLS_1_3_HRR
    assert [kind for kind, _ in got].count(CHANGE_CIPHER_SPEC) == 1
    # and the server dropped the client's dummy CCS, sent before its second ClientHello
    sent = records(client.wire.sent)
    assert [kind for kind, _ in sent[:3]] == [HANDSHAKE, CHANGE_CIPHER_SPEC, HANDSHAKE]
    assert sent[2][1][0] == CLIENT_HELLO


def test_share_only_for_an_unknown_group_gets_a_hello_retry_request(
        server_ctx: A.TLSContext) -> None:
    """4.2.7/4.2.8: a share for a group the server does not support is ignored -> HRR."""
    def unknown_share_only(hello: ClientHello, n: int) -> None:
        if n == 0:
            hello.getExtension(ExtensionType.supported_groups).groups = [
                UNKNOWN_GROUP, X25519, SECP256R1]
            hello.getExtension(ExtensionType.key_share).client_shares = [
                key_share_entry(UNKNOWN_GROUP)]

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=unknown_share_only)
        client.handshakeClientCert(settings=tls13_settings(), serverName="localhost")
        assert echo(client, b"x") == b"x"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    group = selected_group(hello_retry(client))
    assert group in (X25519, SECP256R1)
    assert selected_group(server_hello(client)) == group


def test_unknown_groups_are_ignored(server_ctx: A.TLSContext) -> None:
    """4.2.7: unknown groups in supported_groups and key_share are skipped, no HRR needed."""
    def with_unknown(hello: ClientHello, n: int) -> None:
        hello.getExtension(ExtensionType.supported_groups).groups = [UNKNOWN_GROUP, X25519]
        ks = hello.getExtension(ExtensionType.key_share)
        ks.client_shares = [key_share_entry(UNKNOWN_GROUP), *ks.client_shares]

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=with_unknown)
        client.handshakeClientCert(settings=tls13_settings(keyShares=["x25519"]),
                                   serverName="localhost")
        assert echo(client, b"x") == b"x"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert client.hellos_sent == 1
    assert selected_group(server_hello(client)) == X25519


def test_only_unknown_groups_is_handshake_failure(server_ctx: A.TLSContext) -> None:
    """4.1.1: no group in common -> "MUST abort the handshake with ... handshake_failure"."""
    def only_unknown(hello: ClientHello, n: int) -> None:
        hello.getExtension(ExtensionType.supported_groups).groups = [UNKNOWN_GROUP]
        hello.getExtension(ExtensionType.key_share).client_shares = [
            key_share_entry(UNKNOWN_GROUP)]

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=only_unknown)
        alert = handshake_alert(client)
        served = server.result()
    assert_our_error(served)
    # 4.1.1: "handshake_failure or an insufficient_security alert"
    assert alert in (HANDSHAKE_FAILURE, INSUFFICIENT_SECURITY)


def test_share_for_a_less_preferred_group(server_ctx: A.TLSContext) -> None:
    """4.2.8: a share only for a supported group the server ranks lower (secp384r1): the
    server may use it or ask for its preferred group with an HRR; either way the ServerHello
    group is one the client offered, and the one the HRR named if there was one."""
    with serving(server_ctx) as server:
        client = open_client(server.port)
        client.handshakeClientCert(settings=tls13_settings(keyShares=["secp384r1"]),
                                   serverName="localhost")
        assert echo(client, b"x") == b"x"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    group = selected_group(server_hello(client))
    if client.hellos_sent == 1:
        assert group == SECP384R1  # the share it had
    else:
        assert group == selected_group(hello_retry(client)) in (X25519, SECP256R1, SECP384R1)


def test_second_client_hello_without_the_requested_share_is_illegal_parameter(
        server_ctx: A.TLSContext) -> None:
    """4.1.2: after an HRR with key_share the client MUST replace its shares with one for
    the HRR's group.  A retry still without it is "incorrect or inconsistent with other
    fields" (6): illegal_parameter, as OpenSSL, tlsfuzzer and the issue expect."""
    def drop_share_again(hello: ClientHello, n: int) -> None:
        if n == 1:
            hello.getExtension(ExtensionType.key_share).client_shares = []

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=drop_share_again)
        alert = handshake_alert(client, settings=tls13_settings(keyShares=[]))
        served = server.result()
    hello_retry(client)
    assert_our_error(served)
    assert alert == ILLEGAL_PARAMETER


def test_second_client_hello_with_a_share_of_another_group_is_illegal_parameter(
        server_ctx: A.TLSContext) -> None:
    """4.1.2/4.2.8: the retried share must be for the group the HRR selected."""
    asked: list[int] = []

    def other_group(hello: ClientHello, n: int) -> None:
        if n == 1:
            ks = hello.getExtension(ExtensionType.key_share)
            asked.append(ks.client_shares[0].group)
            other = SECP256R1 if asked[0] != SECP256R1 else X25519
            ks.client_shares = [Client._genKeyShareEntry(other, (3, 4))]

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=other_group)
        alert = handshake_alert(client, settings=tls13_settings(keyShares=[]))
        served = server.result()
    assert asked == [selected_group(hello_retry(client))]
    assert_our_error(served)
    assert alert == ILLEGAL_PARAMETER


# -- KeyUpdate (RFC 8446 4.6.3) ---------------------------------------------------------------
UPDATE_NOT_REQUESTED = KeyUpdateMessageType.update_not_requested  # 0
UPDATE_REQUESTED = KeyUpdateMessageType.update_requested  # 1


def send_key_update(client: Client, request: int) -> None:
    """Send KeyUpdate and switch our sending keys, as tlslite does (its read keys follow
    the server's own KeyUpdate, when it sends one)."""
    for _ in client.send_keyupdate_request(request):
        pass


def test_client_key_update_requested_is_answered_and_data_flows(
        server_ctx: A.TLSContext) -> None:
    """4.6.3: on update_requested the server updates its receive keys and MUST send its own
    KeyUpdate(update_not_requested) before its next application data; both directions go on."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        assert echo(client, b"before") == b"before"
        for round_ in range(3):
            send_key_update(client, UPDATE_REQUESTED)
            # the server can read only with the client's new keys; tlslite reads the echo only
            # after switching its own read keys on the server's KeyUpdate
            message = f"after update {round_}".encode()
            assert echo(client, message) == message
            assert client.key_updates == [UPDATE_NOT_REQUESTED] * (round_ + 1)
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert served.close_notify_received
    assert served.received == [b"before", b"after update 0", b"after update 1",
                               b"after update 2"]


def test_client_key_update_not_requested_gets_no_answer(server_ctx: A.TLSContext) -> None:
    """4.6.3: update_not_requested: the server updates its receive keys and sends none."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"before")
        send_key_update(client, UPDATE_NOT_REQUESTED)
        assert echo(client, b"after") == b"after"
        send_key_update(client, UPDATE_NOT_REQUESTED)
        assert echo(client, b"after two") == b"after two"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert client.key_updates == []


def test_key_update_with_an_invalid_request_is_illegal_parameter(
        server_ctx: A.TLSContext) -> None:
    """4.6.3: request_update other than 0 or 1 -> "MUST ... illegal_parameter"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"before")
        for _ in client._sendMsg(KeyUpdate().create(2)):
            pass
        alert = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == ILLEGAL_PARAMETER


def test_key_update_before_the_handshake_completes_is_unexpected_message(
        server_ctx: A.TLSContext) -> None:
    """4.6.3: "Implementations that receive a KeyUpdate message prior to receiving a
    Finished message MUST terminate the connection with an unexpected_message alert"."""
    with serving(server_ctx) as server:
        client = open_client(server.port)
        client.before_finished.append(KeyUpdate().create(UPDATE_NOT_REQUESTED))
        client.handshakeClientCert(settings=tls13_settings(), serverName="localhost")
        alert = server_alert(client)
        served = server.result()
    assert not client.before_finished, "the KeyUpdate was not sent"
    assert_our_error(served)
    assert not served.handshake_done
    assert alert == UNEXPECTED_MESSAGE


def test_server_initiated_key_update(server_ctx: A.TLSContext) -> None:
    """4.6.3: either side may update; on update_requested the client answers in kind."""

    def update_requested(conn: A.TLSConnection) -> None:
        conn.key_update(request_peer_update=True)

    with serving(server_ctx, after_handshake=update_requested) as server:
        client = connect(server.port)
        # the server's KeyUpdate goes out with its next write: the echo
        assert echo(client, b"first") == b"first"
        assert client.key_updates == [UPDATE_REQUESTED]
        # tlslite answered with its own KeyUpdate: the server must read with the new keys
        assert echo(client, b"second") == b"second"
        client.close()
        served = server.result()
    assert served.error is None, served.error


# -- unprotected records after the handshake (RFC 8446 5, 5.2) -------------------------------
@pytest.mark.parametrize("alert", [bytes([1, CLOSE_NOTIFY]), bytes([2, HANDSHAKE_FAILURE])],
                         ids=["close_notify", "fatal_handshake_failure"])
def test_plaintext_alert_after_the_handshake_is_unexpected_message(
        server_ctx: A.TLSContext, alert: bytes) -> None:
    """5/5.2: once protected, every record but CCS has outer type application_data; an
    unprotected alert is an unexpected record type -> unexpected_message, never a close."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_raw(client, ALERT, alert)
        got = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert not served.close_notify_received
    assert got == UNEXPECTED_MESSAGE


def test_plaintext_application_data_after_the_handshake_is_bad_record_mac(
        server_ctx: A.TLSContext) -> None:
    """5.2: a record that does not deprotect -> "MUST terminate ... bad_record_mac"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_raw(client, APPLICATION_DATA, b"plaintext, not protected at all")
        got = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert served.received == [b"x"]
    assert got == BAD_RECORD_MAC


# -- zero-length records (RFC 8446 5.1, 5.4) ---------------------------------------------------
@pytest.mark.parametrize("padding", [0, 100], ids=["bare", "padded"])
def test_zero_length_application_data_is_allowed(
        server_ctx: A.TLSContext, padding: int) -> None:
    """5.4: "Zero-length fragments of Application Data MAY be sent" (also as padding-only
    cover traffic): the stream goes on, nothing is delivered for them."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        send_protected(client, APPLICATION_DATA, b"", padding)
        assert echo(client, b"one") == b"one"
        for _ in range(3):
            send_protected(client, APPLICATION_DATA, b"", padding)
        assert echo(client, b"two") == b"two"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert b"".join(served.received) == b"onetwo"
    assert served.close_notify_received


@pytest.mark.parametrize("inner_type", [HANDSHAKE, ALERT], ids=["handshake", "alert"])
@pytest.mark.parametrize("padding", [0, 100], ids=["bare", "padded"])
def test_zero_length_handshake_or_alert_record_is_rejected(
        server_ctx: A.TLSContext, inner_type: int, padding: int) -> None:
    """5.1: "Implementations MUST NOT send zero-length fragments of Handshake types, even if
    those fragments contain padding"; 5.4: an Alert record holds exactly one alert."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_protected(client, inner_type, b"", padding)
        got = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert got in (UNEXPECTED_MESSAGE, DECODE_ERROR)


def test_zero_length_plaintext_handshake_record_is_rejected_or_ignored(
        server_ctx: A.TLSContext) -> None:
    """5.1 forbids *sending* zero-length Handshake fragments and names no action for the
    receiver: before protection our server (OpenSSL) drops one and the handshake goes on.
    Rejecting it would have to be unexpected_message or decode_error."""
    def empty_first(hello: ClientHello, n: int) -> None:
        send_raw(client, HANDSHAKE, b"", version=b"\x03\x01")

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=empty_first)
        try:
            client.handshakeClientCert(settings=tls13_settings(), serverName="localhost")
        except TLSRemoteAlert as alert:
            outcome: int | bytes = int(alert.description)
        else:
            outcome = server_alert_or_echo(client, b"x")  # type: ignore[assignment]
            close(client)
        served = server.result()
    if outcome == b"x":
        assert served.error is None, served.error
    else:
        assert_our_error(served)
        assert outcome in (UNEXPECTED_MESSAGE, DECODE_ERROR)


# -- record size limits (RFC 8446 5.1, 5.2) ----------------------------------------------------
def test_full_size_protected_record_is_accepted(server_ctx: A.TLSContext) -> None:
    """5.2: TLSInnerPlaintext up to 2^14 + 1 octets: 2^14 of content plus the type byte."""
    data = os.urandom(MAX_PLAINTEXT)
    with serving(server_ctx) as server:
        client = connect(server.port)
        send_protected(client, APPLICATION_DATA, data)
        got = read_exactly(client, len(data))
        # padding counts too: 1000 bytes of content padded to exactly 2^14 + 1
        send_protected(client, APPLICATION_DATA, data[:1000], MAX_PLAINTEXT - 1000)
        assert read_exactly(client, 1000) == data[:1000]
        assert echo(client, b"still open") == b"still open"
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert got == data
    assert b"".join(served.received) == data + data[:1000] + b"still open"


def test_protected_record_one_byte_over_is_record_overflow(server_ctx: A.TLSContext) -> None:
    """5.1: content over 2^14 bytes (once deprotected) -> "MUST ... record_overflow"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_protected(client, APPLICATION_DATA, bytes(MAX_PLAINTEXT + 1))
        got = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert served.received == [b"x"]
    assert got == RECORD_OVERFLOW


def test_padding_past_the_limit_is_rejected_or_ignored(server_ctx: A.TLSContext) -> None:
    """5.4: "the full encoded TLSInnerPlaintext MUST NOT exceed 2^14 + 1 octets" binds the
    sender; the receiver's MUSTs are content <= 2^14 (5.1) and ciphertext <= 2^14 + 256
    (5.2).  1000 bytes padded to 2^14 + 2 break neither: our server (OpenSSL) delivers the
    content; rejecting it would have to be record_overflow."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        send_protected(client, APPLICATION_DATA, b"z" * 1000, MAX_PLAINTEXT - 999)
        try:
            outcome: bytes | int | None = read_exactly(client, 1000)
        except TLSRemoteAlert as alert:
            outcome = int(alert.description)
        close(client)
        served = server.result()
    if outcome == b"z" * 1000:
        assert served.error is None, served.error
    else:
        assert_our_error(served)
        assert outcome == RECORD_OVERFLOW


def test_ciphertext_over_2_14_plus_256_is_record_overflow(server_ctx: A.TLSContext) -> None:
    """5.2: TLSCiphertext.length "MUST NOT exceed 2^14 + 256 bytes ... record_overflow"."""
    with serving(server_ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        send_raw(client, APPLICATION_DATA, bytes(MAX_PLAINTEXT + 256 + 1))
        got = server_alert(client)
        served = server.result()
    assert_our_error(served)
    assert got == RECORD_OVERFLOW


def test_plaintext_record_over_2_14_is_record_overflow(server_ctx: A.TLSContext) -> None:
    """5.1: TLSPlaintext.length "MUST NOT exceed 2^14 bytes ... record_overflow"."""
    def oversized_first(hello: ClientHello, n: int) -> None:
        # a handshake record one byte too long (its content is never looked at)
        send_raw(client, HANDSHAKE, bytes([CLIENT_HELLO]) + bytes(MAX_PLAINTEXT),
                 version=b"\x03\x01")

    with serving(server_ctx) as server:
        client = open_client(server.port, hello_hook=oversized_first)
        alert = handshake_alert(client)
        served = server.result()
    assert_our_error(served)
    assert alert == RECORD_OVERFLOW


# -- ALPN (RFC 7301 3.2; RFC 8446 4.2 names it among the EncryptedExtensions) -----------------
@pytest.mark.parametrize(("offered", "chosen"), [
    ([b"spdy/1", b"http/1.1"], "http/1.1"),
    ([b"http/1.1", b"h2"], "h2"),  # the server's preference among the client's
], ids=["one-in-common", "servers-preference"])
def test_alpn_server_picks_from_the_clients_list(
        pki: Pki, offload: A.Offload, offload_on: bool, offered: list[bytes],
        chosen: str) -> None:
    ctx = pki.server_ctx("rsa", offload=offload if offload_on else None)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with serving(ctx) as server:
        client = connect(server.port, alpn=offered)
        echo(client, b"x")
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert client.session.appProto == chosen.encode()
    assert served.alpn == chosen


def test_alpn_without_overlap_is_no_application_protocol(
        pki: Pki, offload: A.Offload, offload_on: bool) -> None:
    """RFC 7301 3.2: no protocol in common -> the server "MUST respond with a fatal
    no_application_protocol alert" (this library does, rather than ignore ALPN)."""
    ctx = pki.server_ctx("rsa", offload=offload if offload_on else None)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with serving(ctx) as server:
        client = open_client(server.port)
        alert = handshake_alert(client, alpn=[b"spdy/1", b"imap"])
        served = server.result()
    assert_our_error(served)
    assert alert == NO_APPLICATION_PROTOCOL
    # sent before the ServerHello, so unprotected: the server never got to choose keys
    assert records(client.wire.received)[0][0] == ALERT


def test_alpn_not_offered_means_none_selected(
        pki: Pki, offload: A.Offload, offload_on: bool) -> None:
    """RFC 7301 3.1: a client that offers no ALPN gets none; the handshake goes on."""
    ctx = pki.server_ctx("rsa", offload=offload if offload_on else None)
    ctx.set_alpn_protocols(["h2"])
    with serving(ctx) as server:
        client = connect(server.port)
        echo(client, b"x")
        client.close()
        served = server.result()
    assert served.error is None, served.error
    assert served.alpn is None
    assert client.session.appProto in (None, b"")
    assert server_hello_extension(client, ExtensionType.alpn) is None


# -- resumption with tickets (RFC 8446 2.2, 4.2.9, 4.2.11, 4.6.1) -----------------------------
def server_hello_extension(client: Client, ext_type: int) -> Any:
    return server_hello(client).getExtension(ext_type)


def first_session(port: int) -> Any:
    """A full handshake; read until the server's NewSessionTickets are in; the session."""
    client = connect(port)
    assert echo(client, b"first") == b"first"  # tickets come before the echo
    assert client.tickets, "the server sent no NewSessionTicket"
    assert not client.resumed
    session = client.session
    client.close()
    return session


def test_resumption_with_a_ticket_psk_dhe_ke(server_ctx: A.TLSContext) -> None:
    """4.2.9/4.2.11: the client offers a ticket with psk_dhe_ke: the server accepts the PSK
    (pre_shared_key selects identity 0) *and* does (EC)DHE (a key_share in ServerHello)."""
    with serving(server_ctx, connections=2) as server:
        session = first_session(server.port)
        client = connect(server.port, session=session,
                         settings=tls13_settings(psk_modes=["psk_dhe_ke"]))
        assert echo(client, b"resumed") == b"resumed"
        client.close()
        first, second = server.result(0), server.result(1)
    assert first.error is None and second.error is None, (first.error, second.error)
    assert client.resumed
    assert second.session_reused
    assert server_hello_extension(client, ExtensionType.pre_shared_key).selected == 0
    assert server_hello_extension(client, ExtensionType.key_share) is not None
    # a PSK handshake sends no Certificate (2.2)
    assert not any(type(m).__name__ == "Certificate" for m in client.messages)


def test_resumption_respects_the_clients_psk_modes(server_ctx: A.TLSContext) -> None:
    """4.2.9: offered psk_ke only, the server "MUST NOT select a key exchange mode that is not
    listed by the client": resume without (EC)DHE, or fall back to a full handshake."""
    with serving(server_ctx, connections=2) as server:
        session = first_session(server.port)
        client = connect(server.port, session=session,
                         settings=tls13_settings(psk_modes=["psk_ke"]))
        assert echo(client, b"second") == b"second"
        client.close()
        second = server.result(1)
    assert second.error is None, second.error
    psk = server_hello_extension(client, ExtensionType.pre_shared_key)
    key_share = server_hello_extension(client, ExtensionType.key_share)
    if psk is not None:  # psk_ke: no key_share (4.2.8: "psk_ke ... MUST NOT send key_share")
        assert key_share is None and client.resumed and second.session_reused
    else:
        assert key_share is not None and not client.resumed and not second.session_reused
