"""A TLS server on stdin/stdout (the stdlib's SSLObject over memory BIOs).

    python stdio_tls_server.py KEY_AND_CHAIN.pem

Answers each line with the line upper-cased, until the client's close_notify
or EOF.  The peer for trio's "TLS to a subprocess" docs example.
"""

from __future__ import annotations

import os
import ssl
import sys


def main() -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[1])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def flush() -> None:
        while data := outgoing.read():
            os.write(stdout, data)

    def feed() -> bool:
        data = os.read(stdin, 65536)
        if not data:
            return False
        incoming.write(data)
        return True

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            if not feed():
                return
    flush()
    line = b""
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            flush()
            if not feed():
                return
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            flush()
            return
        if not chunk:
            return
        line += chunk
        while b"\n" in line:
            one, _, line = line.partition(b"\n")
            tls.write(one.upper() + b"\n")
            flush()


if __name__ == "__main__":
    main()
