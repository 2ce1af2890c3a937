"""TLSContext: an ``ssl.SSLContext``-like wrapper around one OpenSSL SSL_CTX.

Theory of operation
-------------------
Everything that can run during a handshake is prepared here, in Python,
before any connection exists: passwords are resolved, keys are decoded and
(with offload) rebuilt inside our provider, the ALPN list is encoded to wire
format, SNI certificates become child SSL_CTXs.  The callbacks libssl calls
during a handshake (ALPN select, SNI, keylog) are C functions in ctx_callbacks.c that
read that prepared data: no Python runs inside an OpenSSL call, where it
could be on a 32 KiB job stack (rule 6 of docs/architecture.md).  Certificate and host-name
verification are OpenSSL's own (``SSL_set1_host``), with no verify callback.

Record ciphers are fetched when an SSL_CTX is created, with the context's
property query.  So every setting is also recorded as a small "apply"
function; :meth:`TLSContext.load_provider` makes a fresh SSL_CTX with the new
query and applies the recorded settings again.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from ._ffi import ffi, lib
from .errors import TLSError, drain_queue, raise_from_queue
from .offload import Offload

__all__ = [
    "AsyncMode",
    "Purpose",
    "TLSContext",
    "TLSFileNotFoundError",
    "create_default_context",
]

Purpose = ssl.Purpose
AsyncMode = Literal["off", "handshake", "always"]

PasswordType = str | bytes | bytearray | Callable[[], str | bytes | bytearray] | None
StrOrBytesPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]

DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
_SESSION_ID_CONTEXT = b"anyio-asyncssl"

_VERSION_TO_OPENSSL = {
    ssl.TLSVersion.MINIMUM_SUPPORTED: 0,
    ssl.TLSVersion.MAXIMUM_SUPPORTED: 0,
    ssl.TLSVersion.TLSv1: lib.TLS1_VERSION,
    ssl.TLSVersion.TLSv1_1: lib.TLS1_1_VERSION,
    ssl.TLSVersion.TLSv1_2: lib.TLS1_2_VERSION,
    ssl.TLSVersion.TLSv1_3: lib.TLS1_3_VERSION,
}


class TLSFileNotFoundError(TLSError, FileNotFoundError):
    """A certificate, key or CA file does not exist."""


def _fspath(path: StrOrBytesPath) -> bytes:
    return os.fsencode(path)


def _read_file(path: StrOrBytesPath, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        err = TLSFileNotFoundError(f"{what} not found: {os.fsdecode(path)!r}")
        err.errno = 2
        err.filename = os.fsdecode(path)
        raise err from None


def _resolve_password(password: PasswordType) -> bytes | None:
    if password is None:
        return None
    if callable(password):
        password = password()
    if isinstance(password, str):
        return password.encode()
    if isinstance(password, (bytes, bytearray)):
        return bytes(password)
    raise TypeError("password should be a string, bytes, or a callable returning one")


def _encode_alpn(protocols: Iterable[str | bytes]) -> bytes:
    wire = bytearray()
    for proto in protocols:
        raw = proto.encode("ascii") if isinstance(proto, str) else bytes(proto)
        if not 1 <= len(raw) <= 255:
            raise TLSError(f"ALPN protocols must be 1 to 255 bytes long, got {raw!r}")
        wire.append(len(raw))
        wire += raw
    if len(wire) > 0xFFFF:
        raise TLSError("ALPN protocol list too long")
    return bytes(wire)


def _load_private_key(data: bytes, password: PasswordType, libctx: Any, what: str) -> Any:
    """Decode a PEM private key in ``libctx``; returns an owned EVP_PKEY*."""
    encrypted = b"ENCRYPTED" in data
    pw = _resolve_password(password) if encrypted else None
    if encrypted and pw is None:
        raise TLSError(f"{what} is encrypted: pass password=")
    # With a NULL callback OpenSSL takes u as the pass phrase; an empty one
    # keeps it from ever prompting on a terminal.
    pw_buf = ffi.new("char[]", pw if pw is not None else b"")
    bio = lib.BIO_new_mem_buf(data, len(data))
    lib.ERR_clear_error()
    try:
        pkey = lib.PEM_read_bio_PrivateKey_ex(bio, ffi.NULL, ffi.NULL, pw_buf, libctx, ffi.NULL)
    finally:
        lib.BIO_free(bio)
    if pkey == ffi.NULL:
        if encrypted:
            raise_from_queue(message=f"{what}: wrong password or corrupt key", library="PEM",
                             reason="BAD_DECRYPT")
        raise_from_queue(context=f"{what}: no private key found")
    return pkey


_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def key_uri(keyfile: StrOrBytesPath | None) -> str | None:
    """``keyfile`` as a store URI (``file:``, ``pkcs11:``, ...), or None for a path.

    A string that starts with a URI scheme and names no existing file is a
    URI (so a file really called ``pkcs11:x`` still loads as a file).
    """
    if not isinstance(keyfile, str) or not _URI_SCHEME.match(keyfile):
        return None
    if os.path.exists(keyfile):
        return None
    return keyfile


def _load_key_uri(uri: str, password: PasswordType, libctx: Any, propq: str | None) -> Any:
    """The private key ``uri`` names, through OSSL_STORE in ``libctx``; an owned EVP_PKEY*."""
    pw = _resolve_password(password)
    pw_buf = ffi.new("unsigned char[]", pw) if pw is not None else ffi.NULL
    asked = ffi.new("int *")
    lib.ERR_clear_error()
    pkey = lib.asx_load_key_uri(libctx, propq.encode() if propq else ffi.NULL, uri.encode(),
                                pw_buf, len(pw) if pw is not None else 0, asked)
    if pkey == ffi.NULL:
        if asked[0] and pw is None:
            raise_from_queue(message=f"private key {uri!r} is protected: pass password=",
                             library="PEM", reason="BAD_PASSWORD_READ")
        if asked[0]:
            raise_from_queue(message=f"private key {uri!r}: wrong password or PIN",
                             library="PEM", reason="BAD_DECRYPT")
        raise_from_queue(context=f"no private key found at {uri!r}")
    return pkey


def _x509_from_cadata(cadata: str | bytes | bytearray) -> list[Any]:
    certs: list[Any] = []
    if isinstance(cadata, str):
        raw = cadata.encode("ascii")
        bio = lib.BIO_new_mem_buf(raw, len(raw))
        try:
            while True:
                x = lib.PEM_read_bio_X509(bio, ffi.NULL, ffi.NULL, ffi.NULL)
                if x == ffi.NULL:
                    break
                certs.append(x)
        finally:
            lib.BIO_free(bio)
        drain_queue()  # the end of the data reads as "no start line"
        if not certs:
            raise TLSError("cadata: no PEM certificate found")
        return certs
    buf = bytes(cadata)
    keep = ffi.from_buffer(buf)
    pp = ffi.new("const unsigned char **", keep)
    end = int(ffi.cast("uintptr_t", keep)) + len(buf)
    while int(ffi.cast("uintptr_t", pp[0])) < end:
        remaining = end - int(ffi.cast("uintptr_t", pp[0]))
        x = lib.d2i_X509(ffi.NULL, pp, remaining)
        if x == ffi.NULL:
            for c in certs:
                lib.X509_free(c)
            raise_from_queue(context="cadata: not DER certificates")
        certs.append(x)
    if not certs:
        raise TLSError("cadata: empty")
    return certs


class _CtxHandle:
    """Owns one SSL_CTX* (and its children); frees them when collected."""

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        if self.ptr is not None and self.ptr != ffi.NULL:
            # frees, once the SSL_CTX is gone, an Offload's library context
            # it was the last user of (provider_core.c, "Lifetime")
            lib.asx_ssl_ctx_free(self.ptr)
            self.ptr = None


class _ExtHandle:
    def __init__(self) -> None:
        self.ptr = lib.asx_ctx_ext_new()
        if self.ptr == ffi.NULL:
            raise MemoryError

    def __del__(self) -> None:
        ptr = self.__dict__.pop("ptr", None)
        if ptr is not None:
            lib.asx_ctx_ext_free(ptr)


class TLSContext:
    """Certificates, verification and protocol settings shared by connections.

    Mirrors :class:`ssl.SSLContext`.  ``protocol`` may be
    ``ssl.PROTOCOL_TLS_CLIENT`` (default: verification and host-name checks
    on) or ``ssl.PROTOCOL_TLS_SERVER`` (off); one context can serve either
    side.  With ``offload`` the private keys it loads are signed by the
    offload provider's workers and handshakes run in OpenSSL's async mode.

    ``async_mode``: ``"handshake"`` (default with offload: only private-key
    operations are offloaded, so only the handshake pays for async jobs),
    ``"always"`` (read, write and shutdown too, for providers that offload
    record ciphers), ``"off"`` (default without offload).
    """

    def __init__(
        self,
        protocol: ssl._SSLMethod = ssl.PROTOCOL_TLS_CLIENT,
        *,
        offload: Offload | None = None,
        async_mode: AsyncMode | None = None,
    ) -> None:
        if protocol not in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS):
            raise ValueError(
                "protocol must be PROTOCOL_TLS_CLIENT, PROTOCOL_TLS_SERVER or PROTOCOL_TLS")
        self.protocol = protocol
        self._offload = offload
        self._property_query = offload.property_query if offload is not None else None
        self._ext = _ExtHandle()
        # settings to replay on a rebuilt SSL_CTX (load_provider), in order; a
        # setting with a slot replaces its earlier value, so a context whose
        # ALPN list is set per connection does not grow
        self._applied: dict[object, Callable[[TLSContext, Any], object]] = {}
        self._children: list[_CtxHandle] = []  # SNI contexts
        self._handle = self._new_ssl_ctx()
        self._verify_mode = ssl.CERT_NONE
        self._check_hostname = False
        self._alpn: tuple[bytes, ...] = ()
        self._keylog_filename: str | None = None
        self._keylog_file: Any = None
        self._minimum_version = ssl.TLSVersion.TLSv1_2
        self._maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
        self._sni_names: list[str] = []
        self._has_cert = False
        self._ciphers = DEFAULT_CIPHERS
        self.async_mode: AsyncMode = async_mode or ("handshake" if offload else "off")
        # added to what SSL_CTX_new enables (as CPython does), never assigned:
        # assigning cleared SSL_OP_ENABLE_MIDDLEBOX_COMPAT, an RFC 8446 D.4 MUST
        ours = (lib.SSL_OP_ALL | lib.SSL_OP_NO_SSLv3 | lib.SSL_OP_NO_COMPRESSION
                | lib.SSL_OP_NO_RENEGOTIATION | lib.SSL_OP_CIPHER_SERVER_PREFERENCE)
        self._apply(lambda me, ctx: lib.SSL_CTX_set_options(ctx, ours))
        self._apply(lambda me, ctx: me._check(
            lib.SSL_CTX_set_min_proto_version(ctx, lib.TLS1_2_VERSION)))
        self._apply(lambda me, ctx: me._check(
            lib.SSL_CTX_set_cipher_list(ctx, DEFAULT_CIPHERS.encode())))
        self._apply(lambda me, ctx: me._check(lib.SSL_CTX_set_session_id_context(
            ctx, _SESSION_ID_CONTEXT, len(_SESSION_ID_CONTEXT))))
        if protocol == ssl.PROTOCOL_TLS_CLIENT:
            self.verify_mode = ssl.CERT_REQUIRED
            self.check_hostname = True

    # -- plumbing -----------------------------------------------------------
    def _new_ssl_ctx(self) -> _CtxHandle:
        lib.ERR_clear_error()
        libctx = self._offload.libctx if self._offload is not None else ffi.NULL
        propq = self._property_query.encode() if self._property_query else ffi.NULL
        ptr = lib.SSL_CTX_new_ex(libctx, propq, lib.TLS_method())
        if ptr == ffi.NULL:
            raise_from_queue("SSL_CTX_new_ex failed")
        handle = _CtxHandle(ptr)
        if libctx != ffi.NULL and not lib.asx_libctx_track(ptr, libctx):
            raise_from_queue("could not tie the context to its offload")
        if not lib.asx_ctx_attach(ptr, self._ext.ptr):
            raise_from_queue("could not attach context callbacks")
        return handle

    @staticmethod
    def _check(ok: int, message: str = "OpenSSL call failed") -> None:
        if ok != 1:
            raise_from_queue(context=message)

    def _apply(self, fn: Callable[[TLSContext, Any], object], slot: str | None = None) -> None:
        """Run a setting on the SSL_CTX and record it for rebuilds (one per ``slot``).

        ``fn(context, ssl_ctx)`` gets the context as an argument rather than
        closing over it: a context that held closures over itself would be a
        reference cycle, freed by the cycle collector on whatever thread runs
        it, and with it the offload's OpenSSL library context (OpenSSL 3.0
        then frees that thread's state only, and crashes at exit).
        """
        lib.ERR_clear_error()
        fn(self, self._handle.ptr)
        key: object = slot if slot is not None else object()
        self._applied.pop(key, None)
        self._applied[key] = fn

    @property
    def ssl_ctx(self) -> Any:
        """The ``SSL_CTX*`` (cffi pointer); valid while this context lives."""
        return self._handle.ptr

    @property
    def offload(self) -> Offload | None:
        return self._offload

    @property
    def property_query(self) -> str | None:
        return self._property_query

    def load_provider(self, name: str, *, properties: str | None = None,
                      path: str | os.PathLike[str] | None = None,
                      params: Mapping[str, str] | None = None) -> None:
        """Load a provider (e.g. an accelerator's) and prefer it for what it offers.

        Needs a context made with ``offload=``: the provider is loaded into
        that offload's private library context (never the default one).  The
        SSL_CTX is rebuilt with ``properties`` (default ``?provider=<name>``)
        in front of its property query and every earlier setting applied
        again.  ``path`` and ``params``: the provider's module file and its
        configuration parameters, as :meth:`Offload.load_provider` takes
        them.  Raises :class:`TLSError` when OpenSSL cannot load it.
        """
        if self._offload is None:
            raise TLSError("load_provider needs a context created with offload=Offload()")
        # load only: the offload's property query (used by contexts made
        # later) stays as it is, the preference is this context's own
        self._offload._load(name, path=path, params=params)
        extra = properties if properties is not None else f"?provider={name}"
        query = self._property_query or ""
        if extra and extra not in query.split(","):
            self._property_query = f"{extra},{query}" if query else extra
        new = self._new_ssl_ctx()
        old, self._handle = self._handle, new
        try:
            lib.ERR_clear_error()
            for fn in list(self._applied.values()):
                fn(self, new.ptr)
        except BaseException:
            self._handle = old
            raise

    # -- protocol settings ----------------------------------------------------
    @property
    def options(self) -> int:
        return int(lib.SSL_CTX_get_options(self._handle.ptr))

    @options.setter
    def options(self, value: int) -> None:
        value = int(value)

        def apply(me: TLSContext, ctx: Any) -> None:
            current = int(lib.SSL_CTX_get_options(ctx))
            lib.SSL_CTX_clear_options(ctx, current & ~value)
            lib.SSL_CTX_set_options(ctx, value)

        self._apply(apply, slot="options")

    @property
    def minimum_version(self) -> ssl.TLSVersion:
        return self._minimum_version

    @minimum_version.setter
    def minimum_version(self, version: ssl.TLSVersion) -> None:
        v = _VERSION_TO_OPENSSL[ssl.TLSVersion(version)]
        self._apply(lambda me, ctx: me._check(lib.SSL_CTX_set_min_proto_version(ctx, v)),
                    slot="minimum_version")
        self._minimum_version = ssl.TLSVersion(version)

    @property
    def maximum_version(self) -> ssl.TLSVersion:
        return self._maximum_version

    @maximum_version.setter
    def maximum_version(self, version: ssl.TLSVersion) -> None:
        v = _VERSION_TO_OPENSSL[ssl.TLSVersion(version)]
        self._apply(lambda me, ctx: me._check(lib.SSL_CTX_set_max_proto_version(ctx, v)),
                    slot="maximum_version")
        self._maximum_version = ssl.TLSVersion(version)

    def set_ciphers(self, ciphers: str) -> None:
        """TLS 1.2 cipher list (OpenSSL syntax).  Raises TLSError if none match."""
        raw = ciphers.encode("ascii")

        def apply(me: TLSContext, ctx: Any) -> None:
            if lib.SSL_CTX_set_cipher_list(ctx, raw) != 1:
                # OpenSSL has already replaced the list (TLS 1.3 suites only): restore it
                lib.SSL_CTX_set_cipher_list(ctx, me._ciphers.encode("ascii"))
                raise_from_queue(message=f"No cipher can be selected from {ciphers!r}",
                                 library="SSL", reason="NO_CIPHER_MATCH")
        self._apply(apply, slot="ciphers")
        self._ciphers = ciphers

    def set_ciphersuites(self, suites: str) -> None:
        """TLS 1.3 cipher suites (e.g. ``TLS_AES_128_GCM_SHA256``)."""
        raw = suites.encode("ascii")

        def apply(me: TLSContext, ctx: Any) -> None:
            if lib.SSL_CTX_set_ciphersuites(ctx, raw) != 1:
                raise_from_queue(
                    message=f"No TLS 1.3 cipher suite can be selected from {suites!r}",
                    library="SSL", reason="NO_CIPHER_MATCH")
        self._apply(apply, slot="ciphersuites")

    def set_alpn_protocols(self, protocols: Iterable[str | bytes]) -> None:
        """Offer (client) or accept (server, in this preference order) these ALPN ids.

        A server that shares none with the client ends the handshake with a
        ``no_application_protocol`` alert (RFC 7301).  Raises TLSError for an
        empty or over-long protocol id.
        """
        protocols = list(protocols)
        wire = _encode_alpn(protocols)

        def apply(me: TLSContext, ctx: Any) -> None:
            # SSL_CTX_set_alpn_protos returns 0 on success
            if lib.SSL_CTX_set_alpn_protos(ctx, wire, len(wire)) != 0:
                raise_from_queue("could not set ALPN protocols")
            if not lib.asx_ctx_set_alpn(me._ext.ptr, wire, len(wire)):
                raise MemoryError

        self._apply(apply, slot="alpn")
        self._alpn = tuple(p.encode() if isinstance(p, str) else bytes(p) for p in protocols)

    @property
    def alpn_protocols(self) -> tuple[bytes, ...]:
        return self._alpn

    # -- verification -------------------------------------------------------
    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return ssl.VerifyMode(self._verify_mode)

    @verify_mode.setter
    def verify_mode(self, mode: ssl.VerifyMode | int) -> None:
        mode = ssl.VerifyMode(mode)
        if mode == ssl.CERT_NONE and self._check_hostname:
            raise ValueError("Cannot set verify_mode to CERT_NONE when check_hostname is enabled.")
        flags = {
            ssl.CERT_NONE: lib.SSL_VERIFY_NONE,
            ssl.CERT_OPTIONAL: lib.SSL_VERIFY_PEER,
            ssl.CERT_REQUIRED: lib.SSL_VERIFY_PEER | lib.SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
        }[mode]
        self._apply(lambda me, ctx: lib.SSL_CTX_set_verify(ctx, flags, ffi.NULL),
                    slot="verify_mode")
        self._verify_mode = mode

    @property
    def check_hostname(self) -> bool:
        return self._check_hostname

    @check_hostname.setter
    def check_hostname(self, value: bool) -> None:
        if value and self._verify_mode == ssl.CERT_NONE:
            self.verify_mode = ssl.CERT_REQUIRED
        self._check_hostname = bool(value)

    def load_verify_locations(
        self,
        cafile: StrOrBytesPath | None = None,
        capath: StrOrBytesPath | None = None,
        cadata: str | bytes | bytearray | None = None,
    ) -> None:
        """Trust these CA certificates (PEM file, hashed directory, PEM str or DER bytes)."""
        if cafile is None and capath is None and cadata is None:
            raise TypeError("cafile, capath and cadata cannot be all omitted")
        if cafile is not None:
            _read_file(cafile, "CA file")
            path = _fspath(cafile)
            self._apply(lambda me, ctx: me._check(lib.SSL_CTX_load_verify_file(ctx, path),
                                                f"cannot load CA file {os.fsdecode(path)!r}"))
        if capath is not None:
            dpath = _fspath(capath)
            if not os.path.isdir(dpath):
                raise TLSFileNotFoundError(f"CA directory not found: {os.fsdecode(dpath)!r}")
            self._apply(lambda me, ctx: me._check(lib.SSL_CTX_load_verify_dir(ctx, dpath)))
        if cadata is not None:
            _x509_from_cadata(cadata)  # validate now, with a clear error

            def apply(me: TLSContext, ctx: Any) -> None:
                store = lib.SSL_CTX_get_cert_store(ctx)
                for x in _x509_from_cadata(cadata):
                    # re-adding a known certificate is not an error in 3.0
                    lib.X509_STORE_add_cert(store, x)
                    lib.SSL_CTX_add_client_CA(ctx, x)
                    lib.X509_free(x)
                drain_queue()

            self._apply(apply)

    def load_default_certs(self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        """Trust the system CA store (OpenSSL's default paths; honours SSL_CERT_FILE)."""
        self._apply(lambda me, ctx: me._check(lib.SSL_CTX_set_default_verify_paths(ctx)))

    # -- certificates ---------------------------------------------------------
    def _use_cert_chain(self, ctx: Any, certfile: bytes, pkey: Any) -> None:
        if lib.SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1:
            raise_from_queue(context=f"cannot load certificate chain {os.fsdecode(certfile)!r}")
        if lib.SSL_CTX_use_PrivateKey(ctx, pkey) != 1 or lib.SSL_CTX_check_private_key(ctx) != 1:
            raise_from_queue(context="private key does not match the certificate",
                             reason="KEY_VALUES_MISMATCH")

    def _prepare_key(self, certfile: StrOrBytesPath, keyfile: StrOrBytesPath | None,
                     password: PasswordType) -> tuple[bytes, Any]:
        _read_file(certfile, "certificate file")
        libctx = self._offload.libctx if self._offload is not None else ffi.NULL
        uri = key_uri(keyfile)
        if uri is not None:
            pkey = _load_key_uri(uri, password, libctx, self._property_query)
        else:
            key_data = _read_file(keyfile if keyfile is not None else certfile, "key file")
            pkey = _load_private_key(key_data, password, libctx, "private key")
        if self._offload is not None and not (uri is not None and self._offload.workers == 0):
            # Offload(workers=0) with a provider's key (a vendor provider that
            # pauses jobs itself): that provider signs, directly
            lib.ERR_clear_error()
            wrapped = lib.asx_wrap_key(libctx, pkey)
            lib.EVP_PKEY_free(pkey)
            if wrapped == ffi.NULL:
                raise_from_queue("could not move the key into the offload provider")
            pkey = wrapped
        return _fspath(certfile), ffi.gc(pkey, lib.EVP_PKEY_free)

    def load_cert_chain(
        self,
        certfile: StrOrBytesPath,
        keyfile: StrOrBytesPath | None = None,
        password: PasswordType = None,
    ) -> None:
        """Load this side's certificate chain and private key (PEM).

        ``keyfile`` may also be a key URI, loaded through OpenSSL's
        OSSL_STORE in this context's library context: ``file:/path/key.pem``,
        or any scheme a provider loaded there offers (``pkcs11:...``).
        ``password`` (str, bytes, or a callable returning one) is resolved
        now, in Python; for a URI it also answers a token's PIN prompt.
        Raises :class:`TLSFileNotFoundError` for a missing file and
        :class:`TLSError` for a wrong password, a corrupt file, a URI that
        names no private key (or an unknown scheme), or a key that does not
        match the certificate.
        """
        path, pkey = self._prepare_key(certfile, keyfile, password)
        self._apply(lambda me, ctx: me._use_cert_chain(ctx, path, pkey))
        self._has_cert = True

    def add_sni_certificate(
        self,
        hostname: str,
        certfile: StrOrBytesPath,
        keyfile: StrOrBytesPath | None = None,
        password: PasswordType = None,
    ) -> None:
        """Serve this certificate to clients that ask for ``hostname`` (SNI).

        ``hostname`` may be a single-label wildcard (``*.example.com``).
        Clients asking for other names get the :meth:`load_cert_chain`
        certificate.  The choice is made by a C callback from a table built
        here.
        """
        check_hostname_text(hostname)
        name = _idna_name(hostname.lower().rstrip("."))
        path, pkey = self._prepare_key(certfile, keyfile, password)

        def apply(me: TLSContext, ctx: Any) -> None:
            child = me._new_ssl_ctx()
            me._use_cert_chain(child.ptr, path, pkey)
            if not lib.asx_ctx_add_sni(me._ext.ptr, name.encode(), child.ptr):
                raise MemoryError
            me._children.append(child)

        self._apply(apply)
        self._sni_names.append(name)

    @property
    def sni_hostnames(self) -> tuple[str, ...]:
        return tuple(self._sni_names)

    @property
    def sni_hits(self) -> int:
        """Handshakes whose SNI name selected an :meth:`add_sni_certificate` entry."""
        return int(lib.asx_ctx_sni_hits(self._ext.ptr))

    # -- sessions -------------------------------------------------------------
    @property
    def num_tickets(self) -> int:
        return self._num_tickets if hasattr(self, "_num_tickets") else 2

    @num_tickets.setter
    def num_tickets(self, n: int) -> None:
        if n < 0:
            raise ValueError("num_tickets must be >= 0")
        self._apply(lambda me, ctx: me._check(lib.SSL_CTX_set_num_tickets(ctx, n)),
                    slot="num_tickets")
        self._num_tickets = n

    # -- keylog ---------------------------------------------------------------
    @property
    def keylog_filename(self) -> str | None:
        return self._keylog_filename

    @keylog_filename.setter
    def keylog_filename(self, path: str | None) -> None:
        if self._keylog_file is not None:
            self._keylog_file.close()
            self._keylog_file = None
        if path is None:
            lib.asx_ctx_set_keylog_fd(self._ext.ptr, -1)
        else:
            f = open(path, "a", buffering=1)
            if f.tell() == 0:
                f.write("# TLS secrets log file, generated by anyio-asyncssl\n")
            self._keylog_file = f
            lib.asx_ctx_set_keylog_fd(self._ext.ptr, f.fileno())
        self._keylog_filename = path

        def apply(me: TLSContext, ctx: Any) -> None:
            lib.asx_ctx_attach(ctx, me._ext.ptr)
            for child in me._children:
                lib.asx_ctx_attach(child.ptr, me._ext.ptr)

        self._apply(apply, slot="keylog")

    def __repr__(self) -> str:
        side = {ssl.PROTOCOL_TLS_CLIENT: "client", ssl.PROTOCOL_TLS_SERVER: "server"}.get(
            self.protocol, "any")
        return (f"<TLSContext {side} offload={self._offload is not None} "
                f"async_mode={self.async_mode!r}>")


def require_tls_context(value: object, argument: str = "context") -> TLSContext:
    """Return ``value`` if it is a :class:`TLSContext`; raise ``TypeError`` at once if not.

    Every constructor that takes a context calls this before any I/O, so a
    stdlib :class:`ssl.SSLContext` passed by mistake fails where it is passed,
    with the recipe for the equivalent :class:`TLSContext`, not at the first
    handshake.
    """
    if isinstance(value, TLSContext):
        return value
    if isinstance(value, ssl.SSLContext):
        server = value.protocol == ssl.PROTOCOL_TLS_SERVER
        purpose = "CLIENT_AUTH" if server else "SERVER_AUTH"
        protocol = "PROTOCOL_TLS_SERVER" if server else "PROTOCOL_TLS_CLIENT"
        raise TypeError(
            f"{argument} must be an anyio_asyncssl.TLSContext, not an ssl.SSLContext "
            "(OpenSSL's async mode needs a context of its own).  Build one with the same "
            f"settings: anyio_asyncssl.create_default_context(ssl.Purpose.{purpose}, "
            f"cafile=..., offload=anyio_asyncssl.Offload()) or anyio_asyncssl.TLSContext("
            f"ssl.{protocol}, offload=...), then the same load_cert_chain(), "
            "load_verify_locations(), set_alpn_protocols() calls; or change `import ssl` "
            "to `from anyio_asyncssl import ssl`, whose create_default_context() and "
            "SSLContext make TLSContexts")
    raise TypeError(
        f"{argument} must be an anyio_asyncssl.TLSContext, not {type(value).__name__}")


def pick_context(context: object, ssl_context: object, argument: str = "context") -> (
        TLSContext | None):
    """The context given as ``context=`` or as its stdlib-style alias ``ssl_context=``.

    Both given is a ``TypeError`` (which one was meant?); a value that is not a
    :class:`TLSContext` is refused by :func:`require_tls_context`.
    """
    if context is not None and ssl_context is not None:
        raise TypeError(f"give {argument}= or ssl_context=, not both")
    value = context if context is not None else ssl_context
    if value is None:
        return None
    return require_tls_context(value, argument if context is not None else "ssl_context")


def check_hostname_text(hostname: str) -> None:
    """Refuse a host name OpenSSL would cut short: a NUL ends a C string.

    ``"localhost\\x00.attacker.example"`` would otherwise be verified and sent
    (SNI) as ``localhost``.  Raises TypeError, as the stdlib's ``wrap_bio``.
    """
    if not isinstance(hostname, str):
        raise TypeError(f"server_hostname must be str, not {type(hostname).__name__}")
    if "\0" in hostname:
        raise TypeError("server_hostname must not contain NUL characters")


def _idna_name(hostname: str) -> str:
    """Host name to its ASCII form (IDNA 2008 via the ``idna`` package, UTS 46)."""
    if hostname.startswith("*."):
        return "*." + _idna_name(hostname[2:])
    try:
        hostname.encode("ascii")
        return hostname.lower()
    except UnicodeEncodeError:
        pass
    import idna

    return str(idna.encode(hostname, uts46=True).decode("ascii"))


def create_default_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
    *,
    cafile: StrOrBytesPath | None = None,
    capath: StrOrBytesPath | None = None,
    cadata: str | bytes | bytearray | None = None,
    offload: Offload | None = None,
) -> TLSContext:
    """A context with secure defaults, like :func:`ssl.create_default_context`.

    TLS >= 1.2, ECDHE-only TLS 1.2 suites, no compression, no renegotiation.
    ``Purpose.SERVER_AUTH`` (a client's context): CERT_REQUIRED, host-name
    checks, and the given CAs or else the system store.  ``Purpose.CLIENT_AUTH``
    (a server's context): no client certificate requested; CAs given here
    are used when you set ``verify_mode`` for mutual TLS.
    """
    if purpose == ssl.Purpose.SERVER_AUTH:
        ctx = TLSContext(ssl.PROTOCOL_TLS_CLIENT, offload=offload)
    elif purpose == ssl.Purpose.CLIENT_AUTH:
        ctx = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    else:
        raise ValueError(f"unknown purpose {purpose!r}")
    if cafile is not None or capath is not None or cadata is not None:
        ctx.load_verify_locations(cafile, capath, cadata)
    elif purpose == ssl.Purpose.SERVER_AUTH:
        ctx.load_default_certs(purpose)
    return ctx
