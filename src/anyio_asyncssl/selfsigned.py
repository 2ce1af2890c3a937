"""Self-signed certificates for tests, demos and ``asyncssl serve``.

Made by our C (``certgen.c``) with OpenSSL's non-deprecated API, so nothing
beyond the system OpenSSL is needed.  The key's PEM is zeroed before
OpenSSL frees it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ._ffi import ffi, lib
from .errors import raise_from_queue

__all__ = ["generate_self_signed"]


def generate_self_signed(
    hostname: str = "localhost",
    *,
    key_type: str = "rsa",
    bits: int = 2048,
    days: int = 30,
    extra_names: Sequence[str] = ("127.0.0.1", "::1"),
) -> tuple[bytes, bytes]:
    """A self-signed certificate and its private key, both PEM (made by OpenSSL).

    ``key_type``: ``"rsa"`` (``bits`` long) or ``"ec"`` (P-256).  The
    certificate names ``hostname`` and ``extra_names`` (IP addresses become
    IP SANs) and is valid for ``days``.  For tests and demos: nothing
    trusts it until you add it as a CA.  Raises :class:`TLSError` when
    OpenSSL cannot make it.
    """

    names = []
    for n in (hostname, *extra_names):
        try:
            ipaddress.ip_address(n)
            names.append(f"IP:{n}")
        except ValueError:
            names.append(f"DNS:{n}")
    cert = ffi.new("char **")
    key = ffi.new("char **")
    lib.ERR_clear_error()
    if not lib.asx_self_signed(hostname.encode(), ",".join(names).encode(), key_type.encode(),
                               bits, days, cert, key):
        raise_from_queue("could not generate a self-signed certificate")
    try:
        return ffi.string(cert[0]), ffi.string(key[0])
    finally:
        lib.OPENSSL_free(cert[0])
        lib.asx_free_secret(key[0])   # zeroed first: it is a private key
