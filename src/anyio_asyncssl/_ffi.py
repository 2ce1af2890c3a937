"""Loads the compiled binding and checks the OpenSSL it runs against."""

from __future__ import annotations

try:
    # typed by _native/_openssl.pyi, generated from asyncssl.h (stubgen.py)
    from ._native._openssl import ffi as ffi
    from ._native._openssl import lib as lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "anyio_asyncssl: the compiled OpenSSL binding is missing or cannot load "
        f"({exc}). Install with the system OpenSSL >= 3.0 headers present "
        "(Debian: apt-get install libssl-dev) and reinstall the package."
    ) from exc

OPENSSL_VERSION_NUMBER: int = int(lib.OpenSSL_version_num())
OPENSSL_VERSION: str = ffi.string(lib.OpenSSL_version(0)).decode()


def check_runtime(version_number: int, version: str, async_capable: bool) -> None:
    """Raise ImportError unless OpenSSL is >= 3.0 with ASYNC job support."""
    if version_number < 0x30000000:
        raise ImportError(
            f"anyio_asyncssl needs OpenSSL >= 3.0 at run time, found {version}")
    if not async_capable:
        raise ImportError(
            "anyio_asyncssl needs OpenSSL's ASYNC job support (ASYNC_is_capable() is false "
            f"for {version} on this platform)")


check_runtime(OPENSSL_VERSION_NUMBER, OPENSSL_VERSION, bool(lib.ASYNC_is_capable()))
