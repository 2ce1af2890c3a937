"""The peer certificate as the stdlib's ``getpeercert()`` shows it.

Theory of operation
-------------------
``ssl.SSLSocket.getpeercert()`` returns a dict whose shape code in the wild
depends on (``subject`` and ``issuer`` as tuples of RDNs of ``(name,
value)`` pairs, ``subjectAltName`` entries named as CPython names them,
``OCSP``/``caIssuers``/``crlDistributionPoints`` URI tuples, OpenSSL's
``ASN1_TIME_print`` dates).  :func:`decode` builds the same dict from an
``X509*`` with OpenSSL's own accessors; the tests compare it with the
stdlib's decoder on the same certificates.  Only the four GENERAL_NAME kinds
that are strings are read as strings (a DirName is an X509_NAME, a
registered ID an ASN1_OBJECT: reading those as strings crashed).  The
extension URIs are collected by a small C helper (``asx_cert_uris``).
"""

from __future__ import annotations

from typing import Any

from ._ffi import ffi, lib

__all__ = ["decode", "der"]


def der(x: Any) -> bytes:
    """The certificate ``x`` (an ``X509*``) as DER bytes."""
    n = lib.i2d_X509(x, ffi.NULL)
    buf = ffi.new("unsigned char[]", n)
    p = ffi.new("unsigned char **", buf)
    lib.i2d_X509(x, p)
    return bytes(ffi.buffer(buf, n))


def _name(name: Any) -> tuple[tuple[tuple[str, str], ...], ...]:
    rdns: list[list[tuple[str, str]]] = []
    last_set = -1
    for i in range(lib.X509_NAME_entry_count(name)):
        entry = lib.X509_NAME_get_entry(name, i)
        obj = lib.X509_NAME_ENTRY_get_object(entry)
        nid = lib.OBJ_obj2nid(obj)
        if nid:
            key = ffi.string(lib.OBJ_nid2ln(nid)).decode()
        else:
            txt = ffi.new("char[]", 128)
            lib.OBJ_obj2txt(txt, 128, obj, 1)
            key = ffi.string(txt).decode()
        out = ffi.new("unsigned char **")
        n = lib.ASN1_STRING_to_UTF8(out, lib.X509_NAME_ENTRY_get_data(entry))
        value = bytes(ffi.buffer(out[0], n)).decode("utf-8", "replace") if n >= 0 else ""
        if n >= 0:
            lib.OPENSSL_free(out[0])
        s = lib.X509_NAME_ENTRY_set(entry)
        if s != last_set:
            rdns.append([])
            last_set = s
        rdns[-1].append((key, value))
    return tuple(tuple(r) for r in rdns)


def _time(t: Any) -> str:
    bio = lib.BIO_new(lib.BIO_s_mem())
    try:
        lib.ASN1_TIME_print(bio, t)
        buf = ffi.new("char[]", 64)
        n = lib.BIO_read(bio, buf, 64)
        return bytes(ffi.buffer(buf, max(n, 0))).decode()
    finally:
        lib.BIO_free(bio)


# GENERAL_NAME types without a cdef (x509v3.h; stable ABI values)
_GEN_OTHERNAME, _GEN_X400, _GEN_DIRNAME, _GEN_EDIPARTY, _GEN_RID = 0, 3, 4, 5, 8


def _san(x: Any) -> tuple[tuple[str, Any], ...]:
    names = lib.X509_get_ext_d2i(x, lib.NID_subject_alt_name, ffi.NULL, ffi.NULL)
    if names == ffi.NULL:
        return ()
    names = ffi.cast("GENERAL_NAMES *", names)
    out: list[tuple[str, Any]] = []
    try:
        for i in range(lib.sk_GENERAL_NAME_num(names)):
            gen = lib.sk_GENERAL_NAME_value(names, i)
            kind = ffi.new("int *")
            val = lib.GENERAL_NAME_get0_value(gen, kind)
            # only these four are ASN1_STRINGs; DirName is an X509_NAME, RID an
            # ASN1_OBJECT (reading them as strings crashed the process)
            if kind[0] in (lib.GEN_DNS, lib.GEN_EMAIL, lib.GEN_URI, lib.GEN_IPADD):
                s = ffi.cast("ASN1_STRING *", val)
                raw = bytes(ffi.buffer(lib.ASN1_STRING_get0_data(s), lib.ASN1_STRING_length(s)))
            if kind[0] == lib.GEN_DNS:
                out.append(("DNS", raw.decode("ascii", "replace")))
            elif kind[0] == lib.GEN_EMAIL:
                out.append(("email", raw.decode("ascii", "replace")))
            elif kind[0] == lib.GEN_URI:
                out.append(("URI", raw.decode("ascii", "replace")))
            elif kind[0] == lib.GEN_IPADD:
                if len(raw) == 4:
                    out.append(("IP Address", ".".join(str(b) for b in raw)))
                elif len(raw) == 16:
                    out.append(("IP Address", ":".join(
                        f"{int.from_bytes(raw[j:j + 2], 'big'):X}" for j in range(0, 16, 2))))
                else:
                    out.append(("IP Address", "<invalid>"))
            elif kind[0] == _GEN_DIRNAME:
                out.append(("DirName", _name(ffi.cast("X509_NAME *", val))))
            elif kind[0] == _GEN_RID:
                txt = ffi.new("char[]", 128)
                lib.OBJ_obj2txt(txt, 128, ffi.cast("ASN1_OBJECT *", val), 0)
                out.append(("Registered ID", ffi.string(txt).decode()))
            elif kind[0] == _GEN_X400:
                out.append(("X400Name", "<unsupported>"))
            elif kind[0] == _GEN_EDIPARTY:
                out.append(("EdiPartyName", "<unsupported>"))
            else:
                out.append(("othername", "<unsupported>"))
    finally:
        lib.GENERAL_NAMES_free(names)
    return tuple(out)


def decode(x: Any) -> dict[str, Any]:
    """The stdlib's ``getpeercert()`` dict for ``x`` (an ``X509*``)."""
    bn = lib.ASN1_INTEGER_to_BN(lib.X509_get_serialNumber(x), ffi.NULL)
    hexs = lib.BN_bn2hex(bn)
    serial = ffi.string(hexs).decode()
    lib.OPENSSL_free(hexs)
    lib.BN_free(bn)
    cert: dict[str, Any] = {
        "subject": _name(lib.X509_get_subject_name(x)),
        "issuer": _name(lib.X509_get_issuer_name(x)),
        "version": int(lib.X509_get_version(x)) + 1,
        "serialNumber": serial,
        "notBefore": _time(lib.X509_get0_notBefore(x)),
        "notAfter": _time(lib.X509_get0_notAfter(x)),
    }
    san = _san(x)
    if san:
        cert["subjectAltName"] = san
    for kind, key in ((0, "OCSP"), (1, "caIssuers"), (2, "crlDistributionPoints")):
        uris = _uris(x, kind)
        if uris:
            cert[key] = uris
    return cert


def _uris(x: Any, kind: int) -> tuple[str, ...]:
    cap = 4096
    while True:
        buf = ffi.new("char[]", cap)
        n = lib.asx_cert_uris(x, kind, buf, cap)
        if n >= 0:
            break
        cap *= 4
    raw = ffi.buffer(buf, cap)[:]
    return tuple(part.decode("ascii", "replace") for part in raw.split(b"\0")[:n])

