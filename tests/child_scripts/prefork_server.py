"""Run by test_safety: a pre-fork server (gunicorn's shape) with offload on.

argv: server PEM, number of workers.  The parent makes the Offload, the
context and the listening socket, prints the port, forks the workers and
waits for them; each worker serves on a fresh loop (alternately asyncio and
trio) and answers each client with its pid and how many operations its
offload completed.  SIGTERM stops everything.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys

import anyio
from anyio.abc import SocketListener

import anyio_asyncssl as A

SERVER_PEM, WORKERS = sys.argv[1], int(sys.argv[2])
offload = A.Offload(workers=2)
ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
ctx.load_cert_chain(SERVER_PEM)
sock = socket.create_server(("127.0.0.1", 0))
sock.setblocking(False)
ready_r, ready_w = os.pipe()   # each worker writes one byte once it handles SIGTERM


async def handle(stream: A.AsyncTLSStream) -> None:
    async with stream:
        try:
            request = await stream.receive()
            stats = offload.stats()
            reply = f"{os.getpid()} {stats.completed} {stats.workers} ".encode() + request
            await stream.send(reply)
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
            pass


async def serve() -> None:
    listener = await SocketListener.from_socket(sock)
    async with anyio.create_task_group() as tg:
        async def stop_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                os.write(ready_w, b"r")
                async for _ in signals:
                    tg.cancel_scope.cancel()

        tg.start_soon(stop_on_sigterm)
        await A.AsyncTLSListener(listener, ctx).serve(handle, tg)


children = []
for i in range(WORKERS):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            anyio.run(serve, backend="trio" if i % 2 else "asyncio")
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    children.append(pid)
for _ in children:
    os.read(ready_r, 1)
print(sock.getsockname()[1], flush=True)


def forward_sigterm(*_: object) -> None:
    for child in children:
        os.kill(child, signal.SIGTERM)


signal.signal(signal.SIGTERM, forward_sigterm)
failed = 0
for pid in children:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    print("child", pid, os.waitstatus_to_exitcode(status), file=sys.stderr)
    failed += os.waitstatus_to_exitcode(status) != 0
sys.exit(1 if failed else 0)
