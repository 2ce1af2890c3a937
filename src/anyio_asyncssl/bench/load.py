"""Load generators, each run as its own process (so it never shares the server's loop).

    python -m anyio_asyncssl.bench.load handshake PORT --concurrency 16 --seconds 5 [--rate R]
    python -m anyio_asyncssl.bench.load bulk PORT --mib 256
    python -m anyio_asyncssl.bench.load hold PORT --connections 1000

* ``handshake``: full TLS 1.3 handshakes (no resumption, no certificate
  check, as ``openssl s_time -new``) over non-blocking stdlib ``ssl`` sockets
  driven by one epoll loop.  Without ``--rate``, ``--concurrency``
  handshakes are kept in flight (closed loop); with it, a new handshake
  starts every ``1/rate`` s (open loop, at most 256 in flight) whatever the
  server's speed.  The socket is closed right after the handshake.  A rate
  needs a completed handshake: on a starved machine the window is stretched
  (by at most ``STRETCH_SECONDS``) until one completes; the rate is the
  count over the window's real length either way.
* ``bulk``: one connection; send ``--mib`` MiB and read the echo back at the
  same time (one thread, non-blocking socket, so neither side's buffers fill
  up); the time runs from the end of the handshake to the last echoed byte.
* ``hold``: open ``--connections`` TLS connections (handshake, one byte echoed
  back so the server has finished its side), print ``OPEN n``, keep them idle
  until a line arrives on standard input, then close them.

Each prints ``RESULT {json}`` with its own CPU time, so the report can say
whether the load generator (not the server) was the bottleneck.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import ssl
import sys
import time
from typing import Any

#: how far a handshake window may be stretched when no handshake completed in it
STRETCH_SECONDS = 30.0


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# -- handshakes ---------------------------------------------------------------------

class Conn:
    __slots__ = ("sock", "started", "tls")

    def __init__(self, sock: socket.socket, started: float) -> None:
        self.sock = sock
        self.tls: ssl.SSLSocket | None = None
        self.started = started


def handshakes(port: int, concurrency: int, seconds: float, rate: float | None) -> None:
    ctx = client_context()
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    done = errors = late = 0
    latencies: list[float] = []
    max_in_flight = concurrency if rate is None else 256
    perf = time.perf_counter

    def start(now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, os.strerror(err))
        conns[s.fileno()] = Conn(s, now)
        ep.register(s.fileno(), select.EPOLLOUT)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, errors
        c = conns.pop(fd)
        ep.unregister(fd)
        (c.tls or c.sock).close()
        if ok:
            done += 1
            latencies.append(perf() - c.started)
        else:
            errors += 1

    def step(fd: int) -> None:
        c = conns[fd]
        try:
            if c.tls is None:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, False)
                    return
                c.tls = ctx.wrap_socket(c.sock, do_handshake_on_connect=False)
            c.tls.do_handshake()
        except ssl.SSLWantReadError:
            ep.modify(fd, select.EPOLLIN)
        except ssl.SSLWantWriteError:
            ep.modify(fd, select.EPOLLOUT)
        except OSError:
            finish(fd, False)
        else:
            finish(fd, True)

    c0 = cpu()
    t0 = perf()
    end = t0 + seconds
    next_start = t0
    while True:
        now = perf()
        if now >= end:
            if done or now >= t0 + seconds + STRETCH_SECONDS:
                break
            end = now + 0.05  # nothing completed yet (a starved machine): measure on
        if rate is None:
            while len(conns) < max_in_flight:
                start(now)
        else:
            while next_start <= now:
                if len(conns) < max_in_flight:
                    start(now)
                else:
                    late += 1
                next_start += 1.0 / rate
        timeout = min(end, next_start if rate else end) - perf()
        for fd, _ in ep.poll(max(timeout, 0.0)):
            if fd in conns:
                step(fd)
    wall = perf() - t0
    client_cpu = cpu() - c0
    for fd in list(conns):
        finish(fd, False)
    latencies.sort()
    lat = latencies or [0.0]
    emit({"handshakes": done, "errors": errors, "seconds": wall,
          "rate": done / wall, "skipped_starts": late,
          "client_cpu_s": client_cpu, "client_busy": client_cpu / wall,
          "latency_p50_ms": lat[len(lat) // 2] * 1e3,
          "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3})


# -- bulk ---------------------------------------------------------------------------

def bulk(port: int, mib: float) -> None:
    total = int(mib * 1024 * 1024)
    chunk = memoryview(b"x" * 262144)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = client_context().wrap_socket(raw)
    tls.setblocking(False)
    sent = received = 0
    pending = chunk[:0]
    ep = select.epoll()
    fd = tls.fileno()
    ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
    c0 = cpu()
    t0 = time.perf_counter()
    while received < total:
        if not tls.pending() and not ep.poll(5.0):
            raise TimeoutError(f"bulk stalled at sent={sent} received={received}")
        try:
            while True:
                n = len(tls.recv(262144))
                if n == 0:
                    raise ConnectionError("server closed the connection early")
                received += n
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        if sent < total:
            try:
                while sent < total:
                    if not pending:
                        pending = chunk[:min(len(chunk), total - sent)]
                    n = tls.send(pending)
                    sent += n
                    pending = pending[n:]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            if sent >= total:
                ep.modify(fd, select.EPOLLIN)
    wall = time.perf_counter() - t0
    client_cpu = cpu() - c0
    tls.close()
    emit({"bytes_each_way": total, "seconds": wall, "client_cpu_s": client_cpu,
          "client_busy": client_cpu / wall})


# -- idle connections -----------------------------------------------------------------

def hold(port: int, connections: int) -> None:
    raise_fd_limit()
    ctx = client_context()
    keep = []
    t0 = time.perf_counter()
    for _ in range(connections):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw)
        tls.sendall(b"x")
        if tls.recv(1) != b"x":
            raise ConnectionError("no echo")
        keep.append(tls)
    print(f"OPEN {len(keep)}", flush=True)
    sys.stdin.readline()
    for tls in keep:
        tls.close()
    emit({"connections": len(keep), "seconds": time.perf_counter() - t0})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["handshake", "bulk", "hold"])
    p.add_argument("port", type=int)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float)
    p.add_argument("--mib", type=float, default=256)
    p.add_argument("--connections", type=int, default=1000)
    a = p.parse_args()
    if a.mode == "handshake":
        handshakes(a.port, a.concurrency, a.seconds, a.rate)
    elif a.mode == "bulk":
        bulk(a.port, a.mib)
    else:
        hold(a.port, a.connections)


if __name__ == "__main__":
    main()
