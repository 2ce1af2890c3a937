"""cffi API-mode build of ``anyio_asyncssl._native._openssl``.

The binding is declared in plain text: the OpenSSL types, constants and
functions Python uses are listed here (``TYPES``, ``OPENSSL_FUNCS``); our own
C API is not written here again but read from ``asyncssl.h``, whose lines
between ``/* cffi: begin */`` and ``/* cffi: end */`` are the cdef
(:func:`header_cdef`): the header is the one source of the C boundary.
``stubgen.py`` types the same cdef for mypy (``_openssl.pyi``), and
tests/test_native_boundary.py checks that every ``lib.<name>`` the Python
code uses is declared and that the stub is current.  Our C lives in ordinary
``.c`` files beside this one (``SOURCES``) and is compiled with only
non-deprecated OpenSSL 3.0 API.  ``setup.py`` names this module in
``cffi_modules``; ``python src/anyio_asyncssl/_native/build.py`` builds in place.

Before anything is compiled, :func:`find_openssl` preprocesses
``<openssl/opensslv.h>`` with the build's compiler and stops the build with
one message (:data:`MISSING`: the package to install on Debian/Ubuntu,
Fedora/RHEL and Alpine, and ``ASYNCSSL_OPENSSL_DIR``) when the headers are
missing or older than 3.0.  ``ASYNCSSL_OPENSSL_DIR=/prefix`` builds against
another OpenSSL: its ``include/`` and ``lib64/`` or ``lib/``, with an rpath so
the extension loads those libraries at run time.

Environment: ``ASYNCSSL_SANITIZE=address|undefined|thread`` compiles our C
with AddressSanitizer, UndefinedBehaviorSanitizer (any report aborts) or
ThreadSanitizer; the process must preload the runtime (``.ci/sanitize``).
``ASYNCSSL_ASAN=1`` is the older spelling of ``ASYNCSSL_SANITIZE=address``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the project (src layout)

TYPES = """
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_METHOD;
typedef ... SSL_CIPHER;
typedef ... SSL_SESSION;
typedef ... BIO;
typedef ... BIO_METHOD;
typedef ... X509;
typedef ... X509_STORE;
typedef ... X509_NAME;
typedef ... X509_NAME_ENTRY;
typedef ... X509_VERIFY_PARAM;
typedef ... ASN1_OBJECT;
typedef ... ASN1_STRING;
typedef ... ASN1_TIME;
typedef ... ASN1_INTEGER;
typedef ... BIGNUM;
typedef ... EVP_PKEY;
typedef ... OSSL_LIB_CTX;
typedef ... OSSL_PROVIDER;
typedef ... GENERAL_NAMES;
typedef ... GENERAL_NAME;
typedef int pem_password_cb(char *buf, int size, int rwflag, void *userdata);

#define ASYNC_STATUS_UNSUPPORTED ...
#define ASYNC_STATUS_ERR ...
#define ASYNC_STATUS_OK ...
#define ASYNC_STATUS_EAGAIN ...
#define SSL_VERIFY_NONE ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...
#define TLS1_VERSION ...
#define TLS1_1_VERSION ...
#define TLS1_2_VERSION ...
#define TLS1_3_VERSION ...
#define X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS ...
#define NID_subject_alt_name ...
#define GEN_DNS ...
#define GEN_IPADD ...
#define GEN_EMAIL ...
#define GEN_URI ...
#define ERR_LIB_SSL ...
#define SSL_R_UNEXPECTED_EOF_WHILE_READING ...
#define SSL_R_CERTIFICATE_VERIFY_FAILED ...
static const uint64_t SSL_OP_NO_COMPRESSION;
static const uint64_t SSL_OP_NO_SSLv3;
static const uint64_t SSL_OP_NO_RENEGOTIATION;
static const uint64_t SSL_OP_CIPHER_SERVER_PREFERENCE;
static const uint64_t SSL_OP_ALL;
"""

OPENSSL_FUNCS = """
unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int type);
int ASYNC_is_capable(void);
int ASYNC_init_thread(size_t max_size, size_t init_size);
void ASYNC_cleanup_thread(void);

OSSL_LIB_CTX *OSSL_LIB_CTX_new(void);
void OSSL_LIB_CTX_free(OSSL_LIB_CTX *);
OSSL_PROVIDER *OSSL_PROVIDER_load(OSSL_LIB_CTX *, const char *name);
int OSSL_PROVIDER_available(OSSL_LIB_CTX *, const char *name);
int OSSL_LIB_CTX_load_config(OSSL_LIB_CTX *ctx, const char *config_file);

unsigned long ERR_get_error_all(const char **file, int *line, const char **func,
                                const char **data, int *flags);
unsigned long ERR_peek_error(void);
unsigned long ERR_peek_last_error(void);
void ERR_clear_error(void);
const char *ERR_lib_error_string(unsigned long e);
const char *ERR_reason_error_string(unsigned long e);
int ERR_GET_LIB(unsigned long e);
int ERR_GET_REASON(unsigned long e);

const SSL_METHOD *TLS_method(void);
SSL_CTX *SSL_CTX_new_ex(OSSL_LIB_CTX *libctx, const char *propq, const SSL_METHOD *meth);
void SSL_CTX_free(SSL_CTX *);
uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
uint64_t SSL_CTX_clear_options(SSL_CTX *ctx, uint64_t op);
uint64_t SSL_CTX_get_options(const SSL_CTX *ctx);
int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version);
int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *str);
int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str);
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey(SSL_CTX *ctx, EVP_PKEY *pkey);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
int SSL_CTX_load_verify_file(SSL_CTX *ctx, const char *CAfile);
int SSL_CTX_load_verify_dir(SSL_CTX *ctx, const char *CApath);
int SSL_CTX_set_default_verify_paths(SSL_CTX *ctx);
X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *);
int X509_STORE_add_cert(X509_STORE *ctx, X509 *x);
void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, void *callback);
int SSL_CTX_get_verify_mode(const SSL_CTX *ctx);
int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx,
                                   unsigned int sid_ctx_len);
int SSL_CTX_set_alpn_protos(SSL_CTX *ctx, const unsigned char *protos, unsigned int protos_len);
int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);
int SSL_CTX_add_client_CA(SSL_CTX *ctx, X509 *cacert);

SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl);
int SSL_set_tlsext_host_name(SSL *s, const char *name);
int SSL_set1_host(SSL *s, const char *hostname);
void SSL_set_hostflags(SSL *s, unsigned int flags);
X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl);
int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc);
int SSL_set_session(SSL *to, SSL_SESSION *session);
SSL_SESSION *SSL_get1_session(SSL *ssl);
void SSL_SESSION_free(SSL_SESSION *session);
int SSL_SESSION_is_resumable(const SSL_SESSION *s);
int SSL_session_reused(const SSL *s);
const unsigned char *SSL_SESSION_get_id(const SSL_SESSION *s, unsigned int *len);
long SSL_SESSION_get_time(const SSL_SESSION *s);
long SSL_SESSION_get_timeout(const SSL_SESSION *s);
int SSL_SESSION_has_ticket(const SSL_SESSION *s);
unsigned long SSL_SESSION_get_ticket_lifetime_hint(const SSL_SESSION *s);
const char *SSL_get_version(const SSL *ssl);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *c);
const char *SSL_CIPHER_get_version(const SSL_CIPHER *c);
int SSL_CIPHER_get_bits(const SSL_CIPHER *c, int *alg_bits);
void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len);
X509 *SSL_get1_peer_certificate(const SSL *s);
long SSL_get_verify_result(const SSL *ssl);
const char *X509_verify_cert_error_string(long n);
size_t SSL_get_finished(const SSL *s, void *buf, size_t count);
size_t SSL_get_peer_finished(const SSL *s, void *buf, size_t count);
int SSL_get_shutdown(const SSL *ssl);
int SSL_get_all_async_fds(SSL *s, int *fds, size_t *numfds);
int SSL_get_changed_async_fds(SSL *s, int *addfd, size_t *numaddfds, int *delfd,
                              size_t *numdelfds);
int SSL_key_update(SSL *s, int updatetype);
#define SSL_KEY_UPDATE_NOT_REQUESTED ...
#define SSL_KEY_UPDATE_REQUESTED ...

BIO *BIO_new_mem_buf(const void *buf, int len);
BIO *BIO_new(const BIO_METHOD *type);
const BIO_METHOD *BIO_s_mem(void);
int BIO_free(BIO *a);
int BIO_read(BIO *b, void *data, int dlen);
EVP_PKEY *PEM_read_bio_PrivateKey_ex(BIO *bp, EVP_PKEY **x, pem_password_cb *cb, void *u,
                                     OSSL_LIB_CTX *libctx, const char *propq);
X509 *PEM_read_bio_X509(BIO *bp, X509 **x, pem_password_cb *cb, void *u);
X509 *d2i_X509(X509 **px, const unsigned char **in, long len);
int i2d_X509(X509 *a, unsigned char **out);
void X509_free(X509 *a);
void EVP_PKEY_free(EVP_PKEY *key);

const X509_NAME *X509_get_subject_name(const X509 *a);
const X509_NAME *X509_get_issuer_name(const X509 *a);
int X509_NAME_entry_count(const X509_NAME *name);
const X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *name, int loc);
const ASN1_OBJECT *X509_NAME_ENTRY_get_object(const X509_NAME_ENTRY *ne);
const ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *ne);
int X509_NAME_ENTRY_set(const X509_NAME_ENTRY *ne);
int OBJ_obj2nid(const ASN1_OBJECT *o);
const char *OBJ_nid2ln(int n);
int OBJ_obj2txt(char *buf, int buf_len, const ASN1_OBJECT *a, int no_name);
int ASN1_STRING_to_UTF8(unsigned char **out, const ASN1_STRING *in);
int ASN1_STRING_length(const ASN1_STRING *x);
const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *x);
long X509_get_version(const X509 *x);
ASN1_INTEGER *X509_get_serialNumber(X509 *x);
BIGNUM *ASN1_INTEGER_to_BN(const ASN1_INTEGER *ai, BIGNUM *bn);
char *BN_bn2hex(const BIGNUM *a);
void BN_free(BIGNUM *a);
const ASN1_TIME *X509_get0_notBefore(const X509 *x);
const ASN1_TIME *X509_get0_notAfter(const X509 *x);
int ASN1_TIME_print(BIO *fp, const ASN1_TIME *a);
void *X509_get_ext_d2i(const X509 *x, int nid, int *crit, int *idx);
int sk_GENERAL_NAME_num(const GENERAL_NAMES *);
GENERAL_NAME *sk_GENERAL_NAME_value(const GENERAL_NAMES *, int);
void GENERAL_NAMES_free(GENERAL_NAMES *a);
void *GENERAL_NAME_get0_value(const GENERAL_NAME *a, int *ptype);
void OPENSSL_free(void *);
"""

HEADER = os.path.join(HERE, "asyncssl.h")
CFFI_BEGIN = "/* cffi: begin */"
CFFI_END = "/* cffi: end */"


def header_cdef(path: str = HEADER) -> str:
    """Our C API as cffi sees it: the lines of ``asyncssl.h`` between the markers.

    Each ``/* cffi: begin */`` ... ``/* cffi: end */`` block is kept; inside
    one, ``#ifdef ASX_CFFI`` / ``#ifndef ASX_CFFI`` / ``#else`` / ``#endif``
    are resolved with ASX_CFFI defined (the C compiler never defines it) and
    ``#define NAME <integer>`` lines stay.  Every other line becomes an empty
    line, so cffi's error messages carry the header's own line numbers.

    Raises ValueError on an unbalanced marker or conditional, or on any
    other preprocessor line inside a block.
    """
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: list[str] = []
    inside = False
    kept: list[bool] = []       # one entry per open ASX_CFFI conditional
    for number, line in enumerate(lines, 1):
        text = line.strip()
        where = f"{name}:{number}"
        keep = False
        if text == CFFI_BEGIN:
            if inside:
                raise ValueError(f"{where}: {CFFI_BEGIN} inside a cffi block")
            inside = True
        elif text == CFFI_END:
            if not inside or kept:
                raise ValueError(f"{where}: {CFFI_END} without its begin, or inside #ifdef")
            inside = False
        elif inside and text.startswith("#"):
            words = text[1:].split()
            directive = words[0] if words else ""
            if directive in ("ifdef", "ifndef") and words[1:2] == ["ASX_CFFI"]:
                kept.append(directive == "ifdef")
            elif directive == "else" and kept:
                kept[-1] = not kept[-1]
            elif directive == "endif" and kept:
                kept.pop()
            elif directive == "define":
                keep = all(kept)
            else:
                raise ValueError(f"{where}: cffi reads no {text!r} (only #define and ASX_CFFI)")
        else:
            keep = inside and all(kept)
        out.append(line if keep else "")
    if inside or kept:
        raise ValueError(f"{name}: a cffi block or an #ifdef ASX_CFFI is not closed")
    return "\n".join(out) + "\n"


# our C, in build order; the headers are what the sources include
SOURCES = [
    "pool.c",
    "provider_core.c",
    "offload_provider.c",
    "test_provider.c",
    "notifier.c",
    "conn.c",
    "sockbio.c",
    "ctx_callbacks.c",
    "certgen.c",
    "certinfo.c",
    "keystore.c",
]
HEADERS = ["asyncssl.h", "providers.h"]

CFLAGS = [
    "-DOPENSSL_API_COMPAT=30000",
    "-DOPENSSL_NO_DEPRECATED",
    "-Werror=implicit-function-declaration",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-pthread",
]

LDFLAGS = ["-pthread"]

SANITIZERS = {
    "address": ["-fsanitize=address"],
    # Python's CFLAGS carry -fwrapv, which turns the signed-overflow check off
    "undefined": ["-fsanitize=undefined", "-fno-sanitize-recover=all", "-fno-wrapv"],
    "thread": ["-fsanitize=thread"],
}
SANITIZE = os.environ.get("ASYNCSSL_SANITIZE", "") or (
    "address" if os.environ.get("ASYNCSSL_ASAN") else ""
)
if SANITIZE:
    if SANITIZE not in SANITIZERS:
        raise SystemExit(f"ASYNCSSL_SANITIZE={SANITIZE!r}: expected one of {', '.join(SANITIZERS)}")
    CFLAGS += [*SANITIZERS[SANITIZE], "-fno-omit-frame-pointer", "-g", "-O1"]
    LDFLAGS += SANITIZERS[SANITIZE]

MISSING = """\
anyio-asyncssl: cannot build: {problem}.
It needs the development headers and libraries of OpenSSL 3.0 or newer:
  Debian/Ubuntu:  apt-get install libssl-dev
  Fedora/RHEL:    dnf install openssl-devel
  Alpine:         apk add openssl-dev
or point the build at another OpenSSL 3.x/4.x installation, whose include/ and
lib/ (or lib64/) are used, e.g.:
  ASYNCSSL_OPENSSL_DIR=/opt/openssl-3.5 pip install anyio-asyncssl"""


class OpenSSLMissing(SystemExit):
    """The build cannot start: no usable OpenSSL headers (the message says what to do)."""


def openssl_dirs(prefix: str) -> tuple[list[str], list[str]]:
    """The include and library directories of ``ASYNCSSL_OPENSSL_DIR`` (both empty if unset)."""
    if not prefix:
        return [], []
    libs = [d for d in (os.path.join(prefix, "lib64"), os.path.join(prefix, "lib"))
            if os.path.isdir(d)]
    return [os.path.join(prefix, "include")], libs


# what the preprocessor leaves of it names the headers' version, or says they are too old
PROBE = """\
#include <openssl/opensslv.h>
#if OPENSSL_VERSION_NUMBER < 0x30000000L
asx_old OPENSSL_VERSION_TEXT
#else
asx_version OPENSSL_VERSION_TEXT
#endif
"""


def find_openssl(prefix: str = "", cc: str = "") -> str:
    """OPENSSL_VERSION_TEXT of the headers the compiler sees; raises OpenSSLMissing.

    ``prefix`` is ``ASYNCSSL_OPENSSL_DIR`` (its ``include/`` must hold the
    headers: a stray system copy does not count); ``cc`` the compiler
    command (``$CC``, else Python's own).
    """
    includes, _ = openssl_dirs(prefix)
    if prefix and not os.path.isfile(os.path.join(includes[0], "openssl", "opensslv.h")):
        raise OpenSSLMissing(MISSING.format(
            problem=f"ASYNCSSL_OPENSSL_DIR={prefix} has no include/openssl/opensslv.h"))
    cc = cc or os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.c")
        with open(probe, "w") as f:
            f.write(PROBE)
        cmd = [*shlex.split(cc), "-E", *(f"-I{d}" for d in includes), probe]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise OpenSSLMissing(MISSING.format(problem=f"no C compiler ({cmd[0]}: {exc})")) \
                from None
    # (the expansion may sit on lines of its own, after line markers)
    flat = " ".join(ln for ln in out.stdout.splitlines() if not ln.startswith("#"))
    found = re.search(r"\basx_(old|version)\s+((?:\"[^\"]*\"\s*)+)", flat)
    if out.returncode != 0 or not found:
        errors = [ln for ln in out.stderr.splitlines() if "error" in ln] or ["not found"]
        raise OpenSSLMissing(MISSING.format(
            problem=f"the OpenSSL headers were not found ({errors[0].strip()})"))
    text = "".join(re.findall(r'"([^"]*)"', found.group(2)))
    if found.group(1) == "old":
        raise OpenSSLMissing(MISSING.format(
            problem=f"the OpenSSL headers found are older than 3.0 ({text})"))
    return text


def _preprocess(flags: list[str], code: str, cc: str = "") -> str:
    cc = cc or os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.c")
        with open(probe, "w") as f:
            f.write(code)
        out = subprocess.run([*shlex.split(cc), "-E", *flags, probe],
                             capture_output=True, text=True, check=True)
    return out.stdout


def reason_table(includes: list[str], cc: str = "") -> str:
    """C source of ``asx_reason_name``: every ``<LIB>_R_<NAME> <code>`` macro of the
    headers' ``*err.h`` files, keyed by (``ERR_LIB_<LIB>``, code), sorted for bsearch.

    The stdlib names a reason by its macro (its own table is made from
    OpenSSL's sources the same way); a release that rewords the reason's
    text keeps the name.  Python 3.13 no longer exports its table.
    """
    flags = [f"-I{d}" for d in includes]
    marks = _preprocess(flags, "#include <openssl/opensslv.h>\n", cc)
    found = re.search(r'^# \d+ "([^"]*/openssl)/opensslv\.h"', marks, re.M)
    headers = sorted(os.listdir(found.group(1))) if found else []
    err_headers = [h for h in headers if h.endswith("err.h")]
    code = "".join(f"#include <openssl/{h}>\n" for h in err_headers)
    macros = _preprocess([*flags, "-dM", "-DOPENSSL_API_COMPAT=30000"], code, cc)
    libs = {m[0]: int(m[1]) for m in re.findall(r"^#define ERR_LIB_(\w+) (\d+)$", macros, re.M)}
    rows: dict[tuple[int, int], str] = {}
    for prefix, name, value in re.findall(r"^#define (\w+?)_R_(\w+) (\d+)$", macros, re.M):
        if prefix in libs:
            rows.setdefault((libs[prefix], int(value)), name)
    body = ",\n".join(f'    {{{lib}, {reason}, "{name}"}}'
                      for (lib, reason), name in sorted(rows.items()))
    return f"""
    #include <stdlib.h>
    struct asx_reason {{ int lib; int reason; const char *name; }};
    static const struct asx_reason asx_reasons[] = {{
    {body or '    {0, 0, ""}'}
    }};
    static int asx_reason_cmp(const void *a, const void *b)
    {{
        const struct asx_reason *x = a, *y = b;

        if (x->lib != y->lib)
            return x->lib < y->lib ? -1 : 1;
        return x->reason < y->reason ? -1 : x->reason > y->reason;
    }}
    const char *asx_reason_name(int lib, int reason)
    {{
        struct asx_reason key = {{lib, reason, NULL}};
        const struct asx_reason *hit = bsearch(&key, asx_reasons,
            sizeof(asx_reasons) / sizeof(asx_reasons[0]), sizeof(asx_reasons[0]),
            asx_reason_cmp);

        return hit != NULL && hit->name[0] != '\\0' ? hit->name : NULL;
    }}
    """


OPENSSL_DIR = os.environ.get("ASYNCSSL_OPENSSL_DIR", "")
OPENSSL_INCLUDE, OPENSSL_LIB = openssl_dirs(OPENSSL_DIR)
OPENSSL_HEADERS_VERSION = find_openssl(OPENSSL_DIR)

ffibuilder = FFI()
ffibuilder.cdef(TYPES + OPENSSL_FUNCS)
ffibuilder.cdef(header_cdef())
ffibuilder.set_source(
    "anyio_asyncssl._native._openssl",
    """
    #include <openssl/opensslv.h>
    #include <openssl/ssl.h>
    #include <openssl/err.h>
    #include <openssl/async.h>
    #include <openssl/provider.h>
    #include <openssl/x509v3.h>
    #include <openssl/pem.h>
    #include <openssl/bn.h>
    #include "asyncssl.h"
    """ + reason_table(OPENSSL_INCLUDE),
    sources=[os.path.relpath(os.path.join(HERE, s), ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE, ROOT), *OPENSSL_INCLUDE],
    library_dirs=OPENSSL_LIB,
    runtime_library_dirs=OPENSSL_LIB,
    libraries=["ssl", "crypto"],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)

if __name__ == "__main__":
    # Build in a scratch directory, then rename into place: a process that
    # has the old module mapped keeps a valid file.
    import glob
    import shutil
    import tempfile

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        for src in [*SOURCES, *HEADERS]:
            os.makedirs(os.path.join(tmp, os.path.relpath(HERE, ROOT)), exist_ok=True)
            shutil.copy(os.path.join(HERE, src), os.path.join(tmp, os.path.relpath(HERE, ROOT)))
        os.chdir(tmp)
        built = ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv)
        target = os.path.join(HERE, os.path.basename(built))
        shutil.copy(built, target + ".new")
        os.replace(target + ".new", target)
        for stale in glob.glob(os.path.join(HERE, "_openssl*.so")):
            if stale != target:
                os.remove(stale)
