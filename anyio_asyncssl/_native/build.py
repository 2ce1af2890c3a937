"""cffi API-mode build of ``anyio_asyncssl._native._openssl``.

The bindings are declared in plain text blocks (types, OpenSSL functions, our
C); our C lives in ordinary ``.c`` files beside this one and is compiled with
only non-deprecated OpenSSL 3.0 API.  ``setup.py`` names this module in
``cffi_modules``; ``python anyio_asyncssl/_native/build.py`` builds in place.

Environment: ``ASYNCSSL_SANITIZE=address|undefined|thread`` compiles our C
with AddressSanitizer, UndefinedBehaviorSanitizer (any report aborts) or
ThreadSanitizer; the process must preload the runtime (``.ci/sanitize``).
``ASYNCSSL_ASAN=1`` is the older spelling of ``ASYNCSSL_SANITIZE=address``.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

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
typedef ... ASN1_OCTET_STRING;
typedef int pem_password_cb(char *buf, int size, int rwflag, void *userdata);

#define SSL_ERROR_NONE ...
#define SSL_ERROR_SSL ...
#define SSL_ERROR_WANT_READ ...
#define SSL_ERROR_WANT_WRITE ...
#define SSL_ERROR_SYSCALL ...
#define SSL_ERROR_ZERO_RETURN ...
#define SSL_ERROR_WANT_ASYNC ...
#define SSL_ERROR_WANT_ASYNC_JOB ...
#define ASYNC_STATUS_UNSUPPORTED ...
#define ASYNC_STATUS_ERR ...
#define ASYNC_STATUS_OK ...
#define ASYNC_STATUS_EAGAIN ...
#define SSL_VERIFY_NONE ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...
#define SSL_VERIFY_POST_HANDSHAKE ...
#define TLS1_VERSION ...
#define TLS1_1_VERSION ...
#define TLS1_2_VERSION ...
#define TLS1_3_VERSION ...
#define TLSEXT_NAMETYPE_host_name ...
#define X509_V_OK ...
#define X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS ...
#define NID_subject_alt_name ...
#define GEN_DNS ...
#define GEN_IPADD ...
#define GEN_EMAIL ...
#define GEN_URI ...
#define ERR_LIB_SSL ...
#define SSL_R_UNEXPECTED_EOF_WHILE_READING ...
#define SSL_R_CERTIFICATE_VERIFY_FAILED ...
#define SSL_SESS_CACHE_CLIENT ...
#define SSL_SESS_CACHE_SERVER ...
#define SSL_SESS_CACHE_BOTH ...
#define SSL_SESS_CACHE_NO_INTERNAL_STORE ...
#define XN_FLAG_RFC2253 ...
static const uint64_t SSL_OP_NO_COMPRESSION;
static const uint64_t SSL_OP_NO_SSLv3;
static const uint64_t SSL_OP_NO_RENEGOTIATION;
static const uint64_t SSL_OP_CIPHER_SERVER_PREFERENCE;
static const uint64_t SSL_OP_NO_TICKET;
static const uint64_t SSL_OP_ALL;
static const uint64_t SSL_OP_IGNORE_UNEXPECTED_EOF;
static const uint64_t SSL_OP_ENABLE_MIDDLEBOX_COMPAT;
static const long OPENSSL_VERSION_NUMBER;
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
int OSSL_PROVIDER_unload(OSSL_PROVIDER *prov);
int OSSL_PROVIDER_available(OSSL_LIB_CTX *, const char *name);

unsigned long ERR_get_error_all(const char **file, int *line, const char **func,
                                const char **data, int *flags);
unsigned long ERR_peek_error(void);
unsigned long ERR_peek_last_error(void);
void ERR_clear_error(void);
const char *ERR_lib_error_string(unsigned long e);
const char *ERR_reason_error_string(unsigned long e);
int ERR_GET_LIB(unsigned long e);
int ERR_GET_REASON(unsigned long e);

const SSL_METHOD *TLS_server_method(void);
const SSL_METHOD *TLS_client_method(void);
const SSL_METHOD *TLS_method(void);
SSL_CTX *SSL_CTX_new_ex(OSSL_LIB_CTX *libctx, const char *propq, const SSL_METHOD *meth);
void SSL_CTX_free(SSL_CTX *);
uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
uint64_t SSL_CTX_clear_options(SSL_CTX *ctx, uint64_t op);
uint64_t SSL_CTX_get_options(const SSL_CTX *ctx);
int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version);
int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version);
int SSL_CTX_get_min_proto_version(SSL_CTX *ctx);
int SSL_CTX_get_max_proto_version(SSL_CTX *ctx);
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
long SSL_CTX_set_session_cache_mode(SSL_CTX *ctx, long mode);
int SSL_CTX_add_client_CA(SSL_CTX *ctx, X509 *cacert);
void SSL_CTX_set_security_level(SSL_CTX *ctx, int level);

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
int SSL_version(const SSL *ssl);
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
const char *SSL_get_servername(const SSL *s, const int type);
int SSL_is_init_finished(const SSL *s);
int SSL_get_shutdown(const SSL *ssl);
int SSL_in_init(const SSL *s);
int SSL_get_all_async_fds(SSL *s, int *fds, size_t *numfds);
int SSL_get_changed_async_fds(SSL *s, int *addfd, size_t *numaddfds, int *delfd,
                              size_t *numdelfds);
int SSL_get_async_status(SSL *s, int *status);
int SSL_verify_client_post_handshake(SSL *s);
int SSL_key_update(SSL *s, int updatetype);
#define SSL_KEY_UPDATE_NOT_REQUESTED ...
#define SSL_KEY_UPDATE_REQUESTED ...
long SSL_get_mode(SSL *ssl);

BIO *BIO_new_mem_buf(const void *buf, int len);
BIO *BIO_new(const BIO_METHOD *type);
const BIO_METHOD *BIO_s_mem(void);
int BIO_free(BIO *a);
int BIO_read(BIO *b, void *data, int dlen);
size_t BIO_ctrl_pending(BIO *b);
BIO *BIO_new_file(const char *filename, const char *mode);
EVP_PKEY *PEM_read_bio_PrivateKey_ex(BIO *bp, EVP_PKEY **x, pem_password_cb *cb, void *u,
                                     OSSL_LIB_CTX *libctx, const char *propq);
X509 *PEM_read_bio_X509(BIO *bp, X509 **x, pem_password_cb *cb, void *u);
X509 *d2i_X509(X509 **px, const unsigned char **in, long len);
int i2d_X509(X509 *a, unsigned char **out);
void X509_free(X509 *a);
void EVP_PKEY_free(EVP_PKEY *key);
const char *EVP_PKEY_get0_type_name(const EVP_PKEY *key);
int EVP_PKEY_get_bits(const EVP_PKEY *pkey);

X509_NAME *X509_get_subject_name(const X509 *a);
X509_NAME *X509_get_issuer_name(const X509 *a);
int X509_NAME_entry_count(const X509_NAME *name);
X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *name, int loc);
ASN1_OBJECT *X509_NAME_ENTRY_get_object(const X509_NAME_ENTRY *ne);
ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *ne);
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

OUR_FUNCS = """
typedef struct asx_pool asx_pool;
typedef struct {
    uint64_t submitted;
    uint64_t completed;
    uint64_t inline_ops;
    uint64_t pauses;
    uint64_t spurious_resumes;
    uint64_t queue_full;
    uint64_t errors;
    uint64_t notify_callback;
    uint64_t notify_fd;
    uint64_t latency_ns_total;
    uint64_t latency_ns_max;
    uint64_t sign_ops;
    uint64_t decrypt_ops;
    uint64_t cipher_ops;
    int64_t min_stack_headroom;
} asx_pool_stats;
typedef struct {
    int latency_us;
    int late_ms;
    int eagain_count;
    int err_count;
    int early_count;
    int duplicate_count;
    int fd_only;
    int max_queue;
} asx_faults;

asx_pool *asx_pool_new(int nworkers);
int asx_pool_workers(asx_pool *p);
void asx_pool_close(asx_pool *p);
int asx_pool_restart(asx_pool *p);
void asx_pool_unref(asx_pool *p);
void asx_pool_get_stats(asx_pool *p, asx_pool_stats *out);
void asx_pool_reset_stats(asx_pool *p);
void asx_pool_set_faults(asx_pool *p, const asx_faults *f);
void asx_pool_get_faults(asx_pool *p, asx_faults *f);

int asx_install_offload(OSSL_LIB_CTX *libctx, asx_pool *pool);
int asx_register_test_provider(OSSL_LIB_CTX *libctx, const char *name, asx_pool *pool);
void asx_unload_providers(OSSL_LIB_CTX *libctx);
EVP_PKEY *asx_wrap_key(OSSL_LIB_CTX *libctx, EVP_PKEY *in);
void asx_cipher_counts(uint64_t *in_job, uint64_t *paused);
void asx_set_cipher_pause(int on);

typedef struct asx_notifier asx_notifier;
asx_notifier *asx_notifier_new(size_t capacity);
void asx_notifier_free(asx_notifier *n);
int asx_notifier_fd(asx_notifier *n);
long asx_notifier_drain(asx_notifier *n, uint64_t *ids, size_t cap);
void asx_notifier_post(asx_notifier *n, uint64_t id);

#define ASX_OP_NONE ...
#define ASX_OP_HANDSHAKE ...
#define ASX_OP_READ ...
#define ASX_OP_WRITE ...
#define ASX_OP_SHUTDOWN ...
#define ASX_DONE ...
#define ASX_WANT_READ ...
#define ASX_WANT_ASYNC ...
#define ASX_WANT_ASYNC_JOB ...
#define ASX_CLOSED ...
#define ASX_EOF ...
#define ASX_ERROR ...
#define ASX_WANT_WRITE ...

typedef struct {
    int status;
    int ssl_error;
    int async_status;
    int ret;
    size_t result;
    size_t out_len;
    size_t out_pending;
} asx_result;

typedef struct asx_conn {
    SSL *ssl;
    uint64_t id;
    unsigned char *read_buf;
    size_t read_cap;
    unsigned char *write_buf;
    size_t write_cap;
    size_t write_len;
    int pending_op;
    int async_mode;
    uint64_t wakeups;
    uint64_t cb_on_worker;
    uint64_t cb_in_job;
    uint64_t want_async;
    uint64_t want_async_job;
    uint64_t retries;
    ...;
} asx_conn;

asx_conn *asx_conn_new(SSL_CTX *ctx, int server, size_t read_cap, size_t write_cap,
                       int use_callback, uint64_t id);
int asx_conn_free(asx_conn *c);
int asx_conn_pin(asx_conn *c);
int asx_conn_use_buffers(asx_conn *c, unsigned char *rbuf, size_t rcap,
                         unsigned char *wbuf, size_t wcap);
void asx_conn_set_notifier(asx_conn *c, asx_notifier *n);
void asx_conn_set_async(asx_conn *c, int on);
void asx_conn_set_eof(asx_conn *c);
size_t asx_conn_take_input(asx_conn *c, unsigned char *out, size_t cap);
void asx_step(asx_conn *c, int op, const unsigned char *in, size_t inlen, size_t arg,
              unsigned char *out, size_t outcap, asx_result *r);
int asx_shared_ciphers(SSL *s, const SSL_CIPHER **out, int cap);

typedef struct asx_ctx_ext asx_ctx_ext;
asx_ctx_ext *asx_ctx_ext_new(void);
void asx_ctx_ext_free(asx_ctx_ext *e);
int asx_ctx_attach(SSL_CTX *ctx, asx_ctx_ext *e);
int asx_ctx_set_alpn(asx_ctx_ext *e, const unsigned char *wire, size_t len);
int asx_ctx_set_keylog_fd(asx_ctx_ext *e, int fd);
int asx_ctx_add_sni(asx_ctx_ext *e, const char *hostname, SSL_CTX *ctx);
uint64_t asx_ctx_sni_hits(asx_ctx_ext *e);

int asx_self_signed(const char *common_name, const char *san, const char *key_type, int bits,
                    int days, char **cert_pem, char **key_pem);
void asx_free_secret(char *s);
int asx_cert_uris(X509 *x, int kind, char *buf, size_t cap);
"""

SOURCES = [
    "pool.c",
    "provider_core.c",
    "offload_provider.c",
    "test_provider.c",
    "notifier.c",
    "conn.c",
    "ctx_callbacks.c",
    "certgen.c",
    "certinfo.c",
]
HEADERS = ["asyncssl.h", "providers.h"]

CFLAGS = [
    "-DOPENSSL_API_COMPAT=30000",
    "-DOPENSSL_NO_DEPRECATED",
    "-Werror=implicit-function-declaration",
    "-Wall",
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

ffibuilder = FFI()
ffibuilder.cdef(TYPES + OPENSSL_FUNCS + OUR_FUNCS)
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
    #if OPENSSL_VERSION_NUMBER < 0x30000000L
    #error "anyio-asyncssl needs OpenSSL >= 3.0 headers (apt-get install libssl-dev)"
    #endif
    """,
    sources=[os.path.relpath(os.path.join(HERE, s), ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE, ROOT)],
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
