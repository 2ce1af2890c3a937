"""anyio-asyncssl: TLS streams for anyio and trio on OpenSSL's asynchronous mode.

The event loop never runs private-key crypto: it is handed to an offload
engine (our worker-thread provider, or an accelerator's provider), OpenSSL
pauses the TLS call, and the engine's completion wakes the loop.
"""

from __future__ import annotations

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
    OperationInProgressError,
    TLSEOFError,
    TLSError,
    WrongThreadError,
)
from .notifier import Notifier
from .offload import Offload, OffloadStats, default_offload
from .stream import AsyncTLSAttribute, AsyncTLSListener, AsyncTLSStream, connect_tcp

__version__ = "0.1.0"

__all__ = [
    "OPENSSL_VERSION",
    "OPENSSL_VERSION_NUMBER",
    "AsyncEngineError",
    "AsyncStatus",
    "AsyncTLSAttribute",
    "AsyncTLSListener",
    "AsyncTLSStream",
    "CertificateVerifyError",
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
    "reap_parked",
    "set_job_pool",
]
