"""anyio-asyncssl: TLS streams for anyio and trio on OpenSSL's asynchronous mode.

The event loop never runs private-key crypto: it is handed to an offload
engine (our worker-thread provider, or an accelerator's provider), OpenSSL
pauses the TLS call, and the engine's completion wakes the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._ffi import OPENSSL_VERSION, OPENSSL_VERSION_NUMBER
from .connection import (
    AsyncStatus,
    Operation,
    Status,
    TLSConnection,
    TLSSession,
    connection_counters,
    reap_parked,
    set_job_pool,
)
from .context import Purpose, TLSContext, TLSFileNotFoundError, create_default_context
from .errors import (
    AsyncEngineError,
    CertificateVerifyError,
    ConnectionFreedError,
    OperationInProgressError,
    TLSEOFError,
    TLSError,
    WrongThreadError,
)
from .notifier import Notifier
from .offload import Offload, OffloadStats, default_offload
from .selfsigned import generate_self_signed

if TYPE_CHECKING:
    from .stream import AsyncTLSAttribute, AsyncTLSListener, AsyncTLSStream, connect_tcp

__version__ = "0.1.0"

# The anyio face is imported on first use, so that the sans-IO core
# (context, connection, offload, testing) never imports anyio or trio.
_STREAM_NAMES = ("AsyncTLSAttribute", "AsyncTLSListener", "AsyncTLSStream", "connect_tcp")


def __getattr__(name: str) -> object:
    if name in _STREAM_NAMES:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'anyio_asyncssl' has no attribute {name!r}")

__all__ = [
    "OPENSSL_VERSION",
    "OPENSSL_VERSION_NUMBER",
    "AsyncEngineError",
    "AsyncStatus",
    "AsyncTLSAttribute",
    "AsyncTLSListener",
    "AsyncTLSStream",
    "CertificateVerifyError",
    "ConnectionFreedError",
    "Notifier",
    "Offload",
    "OffloadStats",
    "Operation",
    "OperationInProgressError",
    "Purpose",
    "Status",
    "TLSConnection",
    "TLSContext",
    "TLSEOFError",
    "TLSError",
    "TLSFileNotFoundError",
    "TLSSession",
    "WrongThreadError",
    "connect_tcp",
    "connection_counters",
    "create_default_context",
    "default_offload",
    "generate_self_signed",
    "reap_parked",
    "set_job_pool",
]
