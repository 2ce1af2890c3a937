"""Exceptions, and the one helper that turns OpenSSL's error queue into them.

Every exception subclasses :class:`ssl.SSLError`, so ``except ssl.SSLError``
in existing code keeps working.  Like the stdlib, ``library`` and ``reason``
carry OpenSSL's library and reason, the reason by the name the stdlib gives
the code (its macro's) (``CERTIFICATE_VERIFY_FAILED``, ``SSLV3_ALERT_HANDSHAKE_FAILURE``),
so it does not change when an OpenSSL release rewords the reason's text.
"""

from __future__ import annotations

import ssl
from typing import Any, NoReturn

from ._ffi import ffi, lib

__all__ = [
    "AsyncEngineError",
    "CertificateVerifyError",
    "ConnectionFreedError",
    "OperationInProgressError",
    "TLSEOFError",
    "TLSError",
    "WrongThreadError",
    "raise_from_queue",
]


class TLSError(ssl.SSLError):
    """A TLS failure reported by OpenSSL (or by this library around it).

    ``library``/``reason`` name OpenSSL's library and reason; ``errors`` holds
    every ``(library, reason, detail)`` that was on the error queue.
    """

    def __init__(
        self,
        message: str,
        *,
        library: str | None = None,
        reason: str | None = None,
        errors: tuple[tuple[str, str, str], ...] = (),
    ) -> None:
        super().__init__(1, message)
        # like the stdlib's, None when OpenSSL gave none
        self.library = library  # type: ignore[assignment]
        self.reason = reason  # type: ignore[assignment]
        self.errors = errors
        self.message = message

    def __str__(self) -> str:
        return self.message


class CertificateVerifyError(TLSError, ssl.SSLCertVerificationError):
    """The peer's certificate did not verify (untrusted, expired, wrong name, ...)."""

    def __init__(self, message: str, *, verify_code: int, verify_message: str,
                 library: str | None = "SSL", reason: str | None = "CERTIFICATE_VERIFY_FAILED",
                 errors: tuple[tuple[str, str, str], ...] = ()) -> None:
        super().__init__(message, library=library, reason=reason, errors=errors)
        self.verify_code = verify_code
        self.verify_message = verify_message


class TLSEOFError(TLSError, ssl.SSLEOFError):
    """The transport ended without a TLS close_notify (a ragged EOF)."""


class AsyncEngineError(TLSError):
    """The offload engine failed an operation (``ASYNC_STATUS_ERR``)."""


class OperationInProgressError(TLSError):
    """Another TLS operation's async job is paused on this connection.

    OpenSSL would silently resume the paused job instead of running the new
    call (rule 1 of docs/architecture.md), so the call is refused.
    """


class WrongThreadError(TLSError):
    """The connection belongs to another OS thread (rule 3: jobs resume on their thread)."""


class ConnectionFreedError(TLSError):
    """The TLS connection was freed (``TLSConnection.free()``); it cannot be used any more."""


# OpenSSL library codes (err.h) by the names the stdlib ssl module uses
_LIBRARIES = {
    2: "SYS", 3: "BN", 4: "RSA", 5: "DH", 6: "EVP", 7: "BUF", 8: "OBJ", 9: "PEM", 10: "DSA",
    11: "X509", 13: "ASN1", 14: "CONF", 15: "CRYPTO", 16: "EC", 20: "SSL", 32: "BIO",
    33: "PKCS7", 34: "X509V3", 35: "PKCS12", 36: "RAND", 37: "DSO", 38: "ENGINE", 39: "OCSP",
    40: "UI", 41: "COMP", 42: "ECDSA", 43: "ECDH", 44: "OSSL_STORE", 45: "FIPS", 46: "CMS",
    47: "TS", 48: "HMAC", 50: "CT", 51: "ASYNC", 52: "KDF", 53: "SM2", 54: "ESS", 55: "PROP",
    56: "CRMF", 57: "PROV", 58: "CMP", 59: "OSSL_ENCODER", 60: "OSSL_DECODER", 61: "HTTP",
}


def _mnemonic(text: str | None) -> str | None:
    if not text:
        return None
    return text.strip().upper().replace(" ", "_").replace("-", "_")


def _s(p: object) -> str:
    return "" if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")


# A reason's name is its macro's (SSL_R_<NAME>), as the stdlib names it: a
# table build.py makes from the headers we compile against
# (asx_reason_name), so a release that rewords a reason's text (3.5: "ssl/tls
# alert handshake failure") keeps its name.  A code the headers do not name
# gets its text's mnemonic.
_NAMES: dict[tuple[int, int], str | None] = {}


def _reason_name(lib_code: int, reason_code: int) -> str | None:
    key = (lib_code, reason_code)
    if key not in _NAMES:
        p = lib.asx_reason_name(lib_code, reason_code)
        _NAMES[key] = None if p == ffi.NULL else ffi.string(p).decode()
    return _NAMES[key]


def _drain() -> list[tuple[str, str, str, str]]:
    """Pop every entry of this thread's OpenSSL error queue: (library, text, detail, mnemonic)."""
    out: list[tuple[str, str, str, str]] = []
    data = ffi.new("const char **")
    flags = ffi.new("int *")
    while True:
        code = lib.ERR_get_error_all(ffi.NULL, ffi.NULL, ffi.NULL, data, flags)
        if code == 0:
            return out
        lib_code = lib.ERR_GET_LIB(code)
        reason_code = lib.ERR_GET_REASON(code)
        lib_name = _LIBRARIES.get(lib_code) or _s(lib.ERR_lib_error_string(code)) or (
            f"lib({lib_code})")
        text = _s(lib.ERR_reason_error_string(code))
        reason = text or f"reason({reason_code})"
        mnemonic = _reason_name(lib_code, reason_code) or _mnemonic(text) or reason
        detail = _s(data[0]) if (flags[0] & 0x02) else ""  # ERR_TXT_STRING
        out.append((lib_name, reason, detail, mnemonic))


def drain_queue() -> tuple[tuple[str, str, str], ...]:
    """Pop every entry of this thread's OpenSSL error queue: (library, reason text, detail)."""
    return tuple(entry[:3] for entry in _drain())


def error_from_queue(
    default: str = "TLS error",
    cls: type[TLSError] = TLSError,
    *,
    context: str | None = None,
    message: str | None = None,
    library: str | None = None,
    reason: str | None = None,
    **attrs: Any,
) -> TLSError:
    """Build the exception for this thread's OpenSSL error queue, and empty the queue.

    The one place where exceptions are made from OpenSSL's errors: every
    entry goes into ``errors``; the message is OpenSSL's outermost reason
    (with its detail and root cause), or ``default`` when the queue is empty.
    ``context`` is put in front (``"cannot load ...: <OpenSSL's reason>"``);
    ``message`` replaces it (for the stdlib's wording of well-known errors).
    ``library``/``reason`` override what the queue says (for conditions
    libssl reports only through a return value); ``attrs`` go to ``cls``.
    """
    entries = _drain()
    errors = tuple(entry[:3] for entry in entries)
    lib_name = mnemonic = None
    if entries:
        # the last entry is the outermost (libssl's), the first the root cause
        lib_name, reason_text, detail, mnemonic = entries[-1]
        parts = [f"[{_mnemonic(lib_name)}: {mnemonic}] {reason_text}"]
        if detail:
            parts.append(f"({detail})")
        if len(errors) > 1:
            root = errors[0]
            parts.append(f"<- {root[1]}" + (f" ({root[2]})" if root[2] else ""))
        text = " ".join(parts)
        if context:
            text = f"{context}: {text}"
    else:
        text = context or default
    return cls(message if message is not None else text,
               library=library if library is not None else _mnemonic(lib_name),
               reason=reason if reason is not None else mnemonic,
               errors=errors, **attrs)


def raise_from_queue(default: str = "TLS error", cls: type[TLSError] = TLSError,
                     **kwargs: Any) -> NoReturn:
    """Raise :func:`error_from_queue` (same arguments)."""
    raise error_from_queue(default, cls, **kwargs)
