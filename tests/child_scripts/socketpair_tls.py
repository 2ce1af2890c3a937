"""Shared by the child scripts: one TLS handshake of ours over a socket pair."""

from __future__ import annotations

import socket
from functools import partial

import anyio
from anyio.abc import UNIXSocketStream

import anyio_asyncssl as A


async def one_handshake(sctx: A.TLSContext, cctx: A.TLSContext) -> None:
    """Handshake a server and a client stream of ours (client checks ``localhost``)."""
    a, b = socket.socketpair()
    left = await UNIXSocketStream.from_socket(a)
    right = await UNIXSocketStream.from_socket(b)
    async with left, right, anyio.create_task_group() as tg:
        tg.start_soon(partial(A.AsyncTLSStream.wrap, left, context=sctx, server_side=True))
        await A.AsyncTLSStream.wrap(right, context=cctx, hostname="localhost")
