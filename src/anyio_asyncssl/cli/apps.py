"""The applications ``asyncssl serve --app`` runs on each TLS connection.

``echo`` sends back what it receives until the client closes.  ``http`` is
a small HTTP/1.1 server (keep-alive, Content-Length bodies): ``GET /``
answers a short page, ``GET /stats`` the server's counters as JSON
(stats.py), anything else 404.  Both end quietly when the client goes away,
with or without close_notify: that is what clients do.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from anyio.abc import ByteStream

from .stats import ServerStats

App = Callable[[ByteStream, ServerStats], Awaitable[None]]

MAX_HEAD = 16384
MAX_BODY = 1 << 20


async def echo(stream: ByteStream, stats: ServerStats) -> None:
    while True:
        data = await stream.receive()   # EndOfStream ends the connection
        await stream.send(data)


_PAGE = (b"<!doctype html><title>asyncssl</title>"
         b"<h1>anyio-asyncssl</h1><p>TLS on OpenSSL's async mode. "
         b"Counters: <a href=\"/stats\">/stats</a></p>\n")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 431: "Request Header Fields Too Large"}


def _response(status: int, body: bytes, content_type: str, keep_alive: bool,
              head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Server: asyncssl",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


async def http(stream: ByteStream, stats: ServerStats) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                await stream.send(_response(431, b"", "text/plain", False))
                return
            buf += await stream.receive()   # EndOfStream between requests: done
        head, _, buf = buf.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await stream.send(_response(400, b"bad request line\n", "text/plain", False))
            return
        method, target, version = parts
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                await stream.send(_response(400, b"bad header\n", "text/plain", False))
                return
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = (connection != "close" if version == "HTTP/1.1"
                      else connection == "keep-alive")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY or "transfer-encoding" in headers:
            await stream.send(_response(413 if length > MAX_BODY else 400, b"", "text/plain",
                                        False))
            return
        while len(buf) < length:
            buf += await stream.receive()
        buf = buf[length:]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"GET or HEAD only\n", "text/plain"
        elif path == "/":
            status, body, ctype = 200, _PAGE, "text/html; charset=utf-8"
        elif path == "/stats":
            status, body, ctype = (200, json.dumps(stats.as_dict(), indent=1).encode() + b"\n",
                                   "application/json")
        else:
            status, body, ctype = 404, b"not found\n", "text/plain"
        await stream.send(_response(status, body, ctype, keep_alive, method == "HEAD"))
        if not keep_alive:
            return


APPS: dict[str, App] = {"echo": echo, "http": http}
