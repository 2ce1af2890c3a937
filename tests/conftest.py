"""Shared fixtures: a test PKI (trustme), an Offload with a test engine."""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

import anyio_asyncssl as A
from anyio_asyncssl.testing import TestEngine


def alert_received(exc: BaseException) -> int | None:
    """The description code of the fatal alert the peer sent (RFC 8446 6), from
    OpenSSL's "SSL alert number N" detail: the code, not the reason's name,
    which OpenSSL renamed (3.6: TLS_ALERT_BAD_RECORD_MAC, a new code)."""
    for _, _, detail in getattr(exc, "errors", ()):
        m = re.search(r"SSL alert number (\d+)", detail)
        if m:
            return int(m.group(1))
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the servers the tests start, as it does in a terminal.

    A shell starts a background job with SIGINT ignored; the ignoring is
    inherited through exec, and coreutils' ``timeout`` no longer resets it
    (9.8: "timeout now honors ignored signals").  A Python started with
    SIGINT ignored installs no KeyboardInterrupt handler, so under
    ``pytest ... &`` every server child (examples, docs) would ignore the
    tests' Ctrl-C.  The suite runs its children as a terminal would.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    rsa_file: Path  # key + chain, PEM
    ec_file: Path
    client_file: Path  # a client certificate (mTLS)
    tmp: Path

    def server_ctx(self, kind: str = "rsa", offload: A.Offload | None = None,
                   **kw: object) -> A.TLSContext:
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload, **kw)  # type: ignore[arg-type]
        ctx.load_cert_chain(self.rsa_file if kind == "rsa" else self.ec_file)
        return ctx

    def client_ctx(self, offload: A.Offload | None = None) -> A.TLSContext:
        return A.create_default_context(cafile=self.ca_file, offload=offload)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    rsa = ca.issue_cert("localhost", "127.0.0.1", "::1", "example.com",
                        key_type=trustme.KeyType.RSA)
    rsa.private_key_and_cert_chain_pem.write_to_path(tmp / "rsa.pem")
    ec = ca.issue_cert("localhost", "127.0.0.1", "::1", "example.com",
                       key_type=trustme.KeyType.ECDSA)
    ec.private_key_and_cert_chain_pem.write_to_path(tmp / "ec.pem")
    client = ca.issue_cert("client@example.com", common_name="test client")
    client.private_key_and_cert_chain_pem.write_to_path(tmp / "client.pem")
    return Pki(ca, tmp / "ca.pem", tmp / "rsa.pem", tmp / "ec.pem", tmp / "client.pem", tmp)


@pytest.fixture(scope="session")
def offload() -> Iterator[A.Offload]:
    off = A.Offload(workers=2)
    yield off
    off.close()


@pytest.fixture
def no_jobs_left(engine: TestEngine) -> Iterator[None]:
    """Fails the test if it leaves an async job paused or a parked connection unreaped."""
    before = A.connection_counters()
    yield
    gc.collect()
    deadline = time.monotonic() + 10.0
    while A.connection_counters()["parked_now"] > before["parked_now"]:
        A.reap_parked()
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
    after = A.connection_counters()
    assert after["paused_now"] == before["paused_now"], "a test left an async job paused"
    assert after["parked_now"] == before["parked_now"], "a parked connection was never reaped"


@pytest.fixture
def engine(offload: A.Offload) -> Iterator[TestEngine]:
    """The session offload's test engine, with faults cleared before and after."""
    eng = TestEngine(offload)
    eng.clear()
    eng.set_record_pauses(True)
    yield eng
    eng.clear()
    eng.set_record_pauses(True)


def recording_handler(handler: Callable[[Any], Awaitable[None]],
                      errors: list[BaseException]) -> Callable[[Any], Awaitable[None]]:
    """Wrap a listener handler: record its exceptions (not cancellation), always close."""
    import anyio

    async def guarded(stream: Any) -> None:
        try:
            await handler(stream)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            errors.append(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    return guarded


def signal_state(pid: int | str = "self") -> str:
    """A process's blocked, ignored and caught signal masks, from /proc (hex, as the kernel)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        return f"pid {pid}: {exc}"
    return f"pid {pid}: " + " ".join(line.replace(":\t", "=") for line in status.splitlines()
                                     if line.startswith(("SigBlk:", "SigIgn:", "SigCgt:")))


def stop_with_ctrl_c(proc: subprocess.Popen[str]) -> str:
    """SIGINT a server process: it must exit 0 without a traceback; its stdout.

    A process that does not stop is reported with its signal masks and the
    test process's (a SIGINT blocked or ignored here is inherited by children).
    """
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        state = f"child {signal_state(proc.pid)}; tests {signal_state()}"
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args!r} did not stop on SIGINT within 20 s: {state}\n"
                             f"stdout: {out[-2000:]}\nstderr: {err[-2000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return out


def require_tool(name: str, package: str) -> str:
    """The tool's path; skip (fail under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install it: see .ci/run)")
        pytest.skip(message)
    return path
