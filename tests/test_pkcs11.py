"""Keys that never leave a token: SoftHSM2 through pkcs11-provider, signed off the loop.

A module fixture makes a SoftHSM2 token in a temporary directory (RSA-2048 and
ECDSA P-256 key pairs generated inside it by ``pkcs11-tool``: sensitive, never
extractable) and certificates for their public halves from a test CA.  The
server loads pkcs11-provider into an Offload's library context with
``load_provider(path=, params=)`` and the keys by ``pkcs11:`` URI; the token
signs each handshake on our worker threads.  Peers: the stdlib's ssl and
``openssl s_client``.  CI installs softhsm2, opensc and pkcs11-provider
(Debian 12: backports); elsewhere the tests skip with the install line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute
from conftest import require_tool

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream
from anyio_asyncssl.testing import TestEngine

PIN = "1234"
SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so",
                   "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
INSTALL = "apt-get install softhsm2 opensc pkcs11-provider (Debian 12: from bookworm-backports)"
TIMEOUT = 30


def _modules_dir() -> str:
    out = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True,
                         check=True).stdout
    return out.split('"')[1]


@dataclass
class Token:
    module: str          # the PKCS#11 module (SoftHSM2)
    provider: str        # pkcs11-provider's OpenSSL module
    ca_file: Path
    chains: dict[str, Path]
    uris: dict[str, str]

    def offload(self) -> A.Offload:
        off = A.Offload(workers=2)
        off.load_provider("pkcs11", path=self.provider,
                          params={"pkcs11-module-path": self.module}, properties="")
        return off

    def server_ctx(self, off: A.Offload, kind: str, **kw: object) -> A.TLSContext:
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off, **kw)  # type: ignore[arg-type]
        ctx.load_cert_chain(self.chains[kind], self.uris[kind], password=PIN)
        return ctx


def _certificate_for(public_der: bytes, ca_key: object, ca_cert: object) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject)  # type: ignore[attr-defined]
            .public_key(serialization.load_der_public_key(public_der))  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            # what a strict verifier (Python 3.13's VERIFY_X509_STRICT) requires, as trustme does
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)  # type: ignore[attr-defined]
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                serialization.load_der_public_key(public_der)), critical=False)  # type: ignore[arg-type]
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return leaf.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    for needed in ("softhsm2-util", "pkcs11-tool", "openssl"):
        require_tool(needed, INSTALL.split("install ")[1])
    module = next((m for m in SOFTHSM_MODULES if os.path.exists(m)), None)
    provider = os.path.join(_modules_dir(), "pkcs11.so")
    if module is None or not os.path.exists(provider):
        message = f"SoftHSM2 or pkcs11-provider is not installed: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install it: see .ci/run)")
        pytest.skip(message)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tmp = tmp_path_factory.mktemp("softhsm")
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)   # read by SoftHSM when the provider loads it

    def run(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=True,
                              timeout=60).stdout

    run("softhsm2-util", "--init-token", "--free", "--label", "asyncssl", "--pin", PIN,
        "--so-pin", "5678")
    tool = ("pkcs11-tool", "--module", module, "--token-label", "asyncssl", "--login",
            "--pin", PIN)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asyncssl token CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chains, uris = {}, {}
    for kind, key_type, key_id in (("rsa", "rsa:2048", "01"), ("ec", "EC:prime256v1", "02")):
        run(*tool, "--keypairgen", "--key-type", key_type, "--label", f"{kind}key",
            "--id", key_id)
        pub = tmp / f"{kind}-pub.der"
        run(*tool, "--read-object", "--type", "pubkey", "--id", key_id, "-o", str(pub))
        chain = tmp / f"{kind}-chain.pem"
        leaf = _certificate_for(pub.read_bytes(), ca_key, ca_cert)
        chain.write_bytes(leaf + ca_file.read_bytes())
        chains[kind] = chain
        uris[kind] = f"pkcs11:token=asyncssl;object={kind}key;type=private"
    yield Token(module, provider, ca_file, chains, uris)
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="module")
def token_offload(token: Token) -> Iterator[A.Offload]:
    off = token.offload()
    yield off
    off.close()


# == the token's keys serve TLS 1.3, signed on our workers ==================================
async def _serve_one(ctx: A.TLSContext, client: Callable[[int], None]) -> None:
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(SocketAttribute.local_port)
    served = anyio.Event()

    async def echo(stream: AsyncTLSStream) -> None:
        try:
            async with stream:
                await stream.send(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        served.set()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(AsyncTLSListener(tcp, ctx).serve, echo)
            await anyio.to_thread.run_sync(client, port)
            await served.wait()
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_token_keys_serve_the_stdlib_with_signatures_on_workers(
        token: Token, token_offload: A.Offload, kind: str) -> None:
    ctx = token.server_ctx(token_offload, kind)
    seen: list[tuple[str | None, object]] = []

    def client(port: int) -> None:
        cctx = ssl.create_default_context(cafile=str(token.ca_file))
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                cctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"token")
            assert tls.recv(10) == b"token"
            peer = tls.getpeercert()
            assert peer is not None
            seen.append((tls.version(), peer["subjectAltName"]))

    before = token_offload.stats()
    anyio.run(_serve_one, ctx, client)
    after = token_offload.stats()
    assert seen == [("TLSv1.3", (("DNS", "localhost"), ("IP Address", "127.0.0.1")))]
    # the token signed once, on one of our workers (not inline on the loop)
    assert after.sign_ops == before.sign_ops + 1
    assert after.completed == before.completed + 1 and after.inline == before.inline


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_token_keys_serve_openssl_s_client(token: Token, token_offload: A.Offload,
                                           kind: str) -> None:
    ctx = token.server_ctx(token_offload, kind)
    out: list[str] = []

    def client(port: int) -> None:
        proc = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
             "-CAfile", str(token.ca_file), "-verify_return_error", "-servername", "localhost",
             "-verify_hostname", "localhost", "-quiet"],
            input="s_client\n", capture_output=True, text=True, timeout=TIMEOUT)
        out.append(proc.stdout + proc.stderr)

    anyio.run(_serve_one, ctx, client)
    assert "s_client" in out[0] and "verify error" not in out[0], out[0]


def test_the_token_refuses_to_give_out_its_private_keys(token: Token) -> None:
    """What makes this worth it: the private halves are never in our process."""
    listing = subprocess.run(
        ["pkcs11-tool", "--module", token.module, "--token-label", "asyncssl", "--login",
         "--pin", PIN, "--list-objects", "--type", "privkey"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    assert listing.count("never extractable") == 2, listing
    assert listing.count("sensitive") >= 2, listing


def test_with_no_workers_of_ours_the_tokens_provider_signs_directly(token: Token) -> None:
    """Offload(workers=0): a provider that pauses jobs itself (QAT) keeps its keys.

    In a fresh process: closing an Offload unloads its pkcs11-provider, whose
    C_Finalize ends the PKCS#11 module for the whole process (PKCS#11's rule).
    """
    script = (
        "import ssl, anyio_asyncssl as A\n"
        "from anyio_asyncssl.testing import pump\n"
        "off = A.Offload(workers=0)\n"
        f"off.load_provider('pkcs11', path={token.provider!r}, "
        f"params={{'pkcs11-module-path': {token.module!r}}}, properties='')\n"
        "ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)\n"
        f"ctx.load_cert_chain({str(token.chains['ec'])!r}, {token.uris['ec']!r}, "
        f"password={PIN!r})\n"
        f"client = A.TLSConnection(A.create_default_context(cafile={str(token.ca_file)!r}), "
        "server_hostname='localhost')\n"
        "server = A.TLSConnection(ctx, server_side=True)\n"
        "pump(client, server)\n"
        "print('VERSION', client.version(), 'SIGN_OPS', off.stats().sign_ops)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VERSION TLSv1.3 SIGN_OPS 0" in proc.stdout, proc.stdout   # not through ours


# == errors at load time, never at the first handshake ==================================
def test_a_wrong_pin_fails_at_load_time(token: Token) -> None:
    """In a fresh process: a token stays logged in for the process once a PIN was right."""
    script = (
        "import ssl, sys, anyio_asyncssl as A\n"
        "off = A.Offload(workers=1)\n"
        f"off.load_provider('pkcs11', path={token.provider!r}, "
        f"params={{'pkcs11-module-path': {token.module!r}}}, properties='')\n"
        "ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)\n"
        "try:\n"
        f"    ctx.load_cert_chain({str(token.chains['rsa'])!r}, {token.uris['rsa']!r}, "
        "password='0000')\n"
        "except A.TLSError as exc:\n"
        "    print('REFUSED', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit('a wrong PIN was accepted')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout


@pytest.mark.parametrize("uri", ["pkcs11:token=asyncssl;object=nosuchkey;type=private",
                                 "pkcs11:token=nosuchtoken;object=rsakey;type=private"],
                         ids=["object", "token"])
def test_a_missing_object_or_token_fails_at_load_time(token: Token, token_offload: A.Offload,
                                                      uri: str) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=token_offload)
    with pytest.raises(A.TLSError, match="no private key found at"):
        ctx.load_cert_chain(token.chains["rsa"], uri, password=PIN)


def test_a_key_that_does_not_match_the_certificate_fails_at_load_time(
        token: Token, token_offload: A.Offload) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=token_offload)
    with pytest.raises(A.TLSError):
        ctx.load_cert_chain(token.chains["rsa"], token.uris["ec"], password=PIN)


def test_a_provider_whose_module_is_missing_fails_before_any_handshake(token: Token) -> None:
    """pkcs11-provider opens its PKCS#11 module lazily: the key's load is where it fails."""
    off = A.Offload(workers=1)
    try:
        with pytest.raises(A.TLSError):
            off.load_provider("pkcs11-broken", path=token.provider,
                              params={"pkcs11-module-path": "/nonexistent/module.so"},
                              properties="")
            ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
            ctx.load_cert_chain(token.chains["rsa"],
                                "pkcs11:token=asyncssl;object=rsakey;type=private",
                                password=PIN)
    finally:
        off.close()


# == the loop keeps ticking while the token signs slowly ========================================
def _storm(ctx: A.TLSContext, ca_file: Path, handshakes: int) -> tuple[float, float]:
    """Serve ``handshakes`` concurrent stdlib clients: the loop's 2 ms ticker's lateness.

    Returns (worst, stalled) in ms: ``stalled`` sums each tick's lateness
    beyond 5 ms, the time the loop spent blocked (each signature on the loop
    adds nearly its whole duration), robust on a busy machine where ordinary
    scheduling makes every tick a little late.
    """
    lateness: list[float] = []

    async def main() -> None:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp.extra(SocketAttribute.local_port)
        done = 0

        async def ticker() -> None:
            while True:
                t0 = time.perf_counter()
                await anyio.sleep(0.002)
                lateness.append(time.perf_counter() - t0 - 0.002)

        async def handle(stream: AsyncTLSStream) -> None:
            nonlocal done
            try:
                async with stream:
                    await stream.send(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
            done += 1

        def clients() -> None:
            cctx = ssl.create_default_context(cafile=str(ca_file))

            def one() -> None:
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                        cctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"x")
                    tls.recv(1)

            threads = [threading.Thread(target=one) for _ in range(handshakes)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)

        with anyio.fail_after(TIMEOUT * 2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(AsyncTLSListener(tcp, ctx).serve, handle)
                tg.start_soon(ticker)
                await anyio.to_thread.run_sync(clients)
                while done < handshakes:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()

    anyio.run(main)
    return max(lateness) * 1000, sum(max(0.0, x - 0.005) for x in lateness) * 1000


def test_the_loop_keeps_ticking_while_the_token_signs_and_stalls_without_offload(
        token: Token, token_offload: A.Offload) -> None:
    engine = TestEngine(token_offload)
    # a slow token: every signature takes 30 ms more, on a worker or inline
    engine.set(latency_ms=30, inline_latency_ms=30)
    try:
        offloaded = _storm(token.server_ctx(token_offload, "rsa"), token.ca_file, 12)
        # the same key, the same provider, signing on the loop (async mode off)
        inline = _storm(token.server_ctx(token_offload, "rsa", async_mode="off"),
                        token.ca_file, 12)
    finally:
        engine.clear()
    print(f"tick lateness, worst/stalled: offloaded {offloaded[0]:.1f}/{offloaded[1]:.1f} ms, "
          f"inline {inline[0]:.1f}/{inline[1]:.1f} ms")
    # 12 signatures of at least 30 ms each on the loop stall it for about 300 ms
    assert inline[1] > 150, f"without offload the loop should stall ({inline[1]:.1f} ms)"
    assert offloaded[1] < inline[1] / 4, f"offloaded {offloaded[1]:.1f} ms vs {inline[1]:.1f} ms"
