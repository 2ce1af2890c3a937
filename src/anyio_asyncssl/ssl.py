"""The stdlib's :mod:`ssl` names, where making a context makes a :class:`TLSContext`.

Moving a program over is then an import change::

    import ssl                        # before
    from anyio_asyncssl import ssl    # after

``ssl.create_default_context(...)`` and ``ssl.SSLContext(protocol)`` build
:class:`~anyio_asyncssl.TLSContext` objects (with the same methods and
properties as the stdlib's), which our streams take.  Every other name
(``Purpose``, ``CERT_REQUIRED``, ``PROTOCOL_TLS_SERVER``, ``TLSVersion``,
``SSLError``, ``OP_*``, ...) is the stdlib's own object, so comparisons and
``except ssl.SSLError`` keep working (our errors subclass the stdlib's).
What the stdlib can do and a ``TLSContext`` cannot (``wrap_socket``,
``wrap_bio``, loading keys from memory) is not here: use the stdlib for that.
"""

from __future__ import annotations

import ssl as _stdlib_ssl
from typing import Any

from .context import TLSContext, create_default_context

__all__ = ["SSLContext", "create_default_context"]

#: :class:`~anyio_asyncssl.TLSContext` under the stdlib's name
SSLContext = TLSContext

# the names most programs use, for readers and type checkers; the rest
# come from the stdlib through __getattr__
Purpose = _stdlib_ssl.Purpose
SSLError = _stdlib_ssl.SSLError
SSLEOFError = _stdlib_ssl.SSLEOFError
SSLCertVerificationError = _stdlib_ssl.SSLCertVerificationError
CertificateError = _stdlib_ssl.CertificateError
TLSVersion = _stdlib_ssl.TLSVersion
VerifyMode = _stdlib_ssl.VerifyMode
CERT_NONE = _stdlib_ssl.CERT_NONE
CERT_OPTIONAL = _stdlib_ssl.CERT_OPTIONAL
CERT_REQUIRED = _stdlib_ssl.CERT_REQUIRED
PROTOCOL_TLS_CLIENT = _stdlib_ssl.PROTOCOL_TLS_CLIENT
PROTOCOL_TLS_SERVER = _stdlib_ssl.PROTOCOL_TLS_SERVER


def __getattr__(name: str) -> Any:
    """Every other stdlib :mod:`ssl` name, unchanged."""
    try:
        return getattr(_stdlib_ssl, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
