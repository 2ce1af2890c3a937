/*
 * asyncssl.h -- the C side of anyio-asyncssl: the one declaration of the C
 * API Python calls, and what our .c files share.
 *
 * One source for the C boundary
 * -----------------------------
 * The lines between a "cffi: begin" and a "cffi: end" marker are what
 * Python sees: build.py gives exactly those lines to cffi's cdef (after the
 * OpenSSL declarations it lists itself), and stubgen.py types the same
 * lines for mypy (_openssl.pyi; tests/test_native_boundary.py keeps the two
 * equal).  So they hold only what cffi's parser takes: prototypes,
 * typedefs, structs, "#define NAME <integer>" (cffi checks each value
 * against the compiler's) and comments.  A struct with fields that are C's
 * own keeps them in the "#else" branch of "#ifdef ASX_CFFI": cffi reads the
 * first branch ("...;": the rest of the struct is unknown to it, the
 * compiler supplies the offsets) and the C compiler, which never defines
 * ASX_CFFI, the second.  The rest of this header is for our .c files only.
 *
 * The parts, each with its theory of operation at the top of its file:
 *   pool.c              worker threads, the pause/notify protocol, fault
 *                       injection
 *   provider_core.c     what both OpenSSL 3 providers share: the registry
 *                       (library context -> pool), the provider context,
 *                       unloading (providers.h)
 *   offload_provider.c  the offload provider: keymgmt + signature + RSA
 *                       decrypt on the worker pool
 *   test_provider.c     the test record-cipher provider (pausing SSL_read,
 *                       SSL_write, SSL_shutdown)
 *   notifier.c          the per-loop notifier (eventfd + completion queue)
 *                       and the GIL-free async callback
 *   conn.c              one SSL* over memory BIOs with pinned buffers, and
 *                       the one-call step function
 *   ctx_callbacks.c     the handshake-time callbacks (ALPN, SNI, keylog) in
 *                       C, reading data prepared ahead
 *   certgen.c           a self-signed certificate for `asyncssl serve`
 *   certinfo.c          certificate decoding for getpeercert()
 */
#ifndef ASYNCSSL_H
#define ASYNCSSL_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>
#include <openssl/async.h>

/* ------------------------------------------------------------------ */
/* worker pool (pool.c)                                                */
/* ------------------------------------------------------------------ */
/* cffi: begin */
typedef struct asx_pool asx_pool;

typedef struct {
    uint64_t submitted;      /* operations queued to a worker */
    uint64_t completed;      /* operations a worker finished */
    uint64_t inline_ops;     /* operations computed on the calling thread */
    uint64_t pauses;         /* ASYNC_pause_job() calls */
    uint64_t spurious_resumes;
    uint64_t queue_full;     /* EAGAIN answers (real or injected) */
    uint64_t errors;         /* operations that failed (real or injected) */
    uint64_t notify_callback;
    uint64_t notify_fd;
    uint64_t latency_ns_total;
    uint64_t latency_ns_max;
    uint64_t sign_ops;
    uint64_t decrypt_ops;
    uint64_t cipher_ops;
    int64_t min_stack_headroom; /* least free fibre stack seen in our code */
} asx_pool_stats;

/* Fault and latency injection (the test engine).  Counts are "the next N
 * offloaded operations"; flags stay on until cleared. */
typedef struct {
    int latency_us;          /* worker sleeps this long before computing */
    int late_ms;             /* completion is published this long after the work */
    int eagain_count;        /* answer ASYNC_STATUS_EAGAIN (queue full) once each */
    int err_count;           /* answer ASYNC_STATUS_ERR, the operation fails */
    int early_count;         /* fire the callback inside the job before pausing */
    int duplicate_count;     /* fire the completion callback twice */
    int fd_only;             /* ignore the callback, signal the wait fd */
    int max_queue;           /* queue length that counts as full (0: none) */
    int inline_latency_us;   /* an operation run inline (no job) takes this long: a slow
                              * device signing on the caller's thread */
} asx_faults;

/* how workers are scheduled: they must never take the loop's core */
#define ASX_WORKERS_NORMAL 0  /* like any thread */
#define ASX_WORKERS_LOW 1     /* nice 19: a busy loop thread always preempts them */
#define ASX_WORKERS_IDLE 2    /* SCHED_IDLE: they run only on an otherwise idle CPU */
/* |cpus|: the CPUs workers may run on (|ncpus| 0: any) */
asx_pool *asx_pool_new(int nworkers, int priority, const int *cpus, size_t ncpus);
/* the priority the workers run at (as asked, or NORMAL if refused) */
int asx_pool_priority(asx_pool *p);
int asx_pool_workers(asx_pool *p);
void asx_pool_close(asx_pool *p);       /* drain, join; later ops run inline */
/* after fork(), in the child: start the workers the parent's pool had */
int asx_pool_restart(asx_pool *p);
void asx_pool_unref(asx_pool *p);
void asx_pool_get_stats(asx_pool *p, asx_pool_stats *out);
void asx_pool_reset_stats(asx_pool *p);
void asx_pool_set_faults(asx_pool *p, const asx_faults *f);
void asx_pool_get_faults(asx_pool *p, asx_faults *f);
/* cffi: end */

void asx_pool_ref(asx_pool *p);
int asx_is_worker_thread(void);

/* one offloaded operation; lives on the paused job's stack */
typedef struct asx_req asx_req;
struct asx_req {
    int (*fn)(asx_req *);
    void *ctx;               /* EVP_PKEY_CTX* or EVP_CIPHER_CTX* */
    unsigned char *out;
    size_t outlen;           /* in: buffer size, out: produced */
    const unsigned char *in;
    size_t inlen;
    int ret;
    unsigned long err;
    int kind;                /* ASX_REQ_* for the stats */
    /* set by asx_run */
    int done;                /* result published (atomic) */
    int released;            /* worker no longer touches this request (atomic) */
    int duplicate;
    int late_ms;
    uint64_t submit_ns;
    ASYNC_callback_fn cb;
    void *cb_arg;
    void *note;
    asx_req *next;
};
#define ASX_REQ_SIGN 1
#define ASX_REQ_DECRYPT 2
#define ASX_REQ_CIPHER 3

/* run req->fn: inline outside a job, else on a worker while the job pauses */
int asx_run(asx_pool *p, asx_req *q);

/* ------------------------------------------------------------------ */
/* providers (provider_core.c, offload_provider.c, test_provider.c)    */
/* ------------------------------------------------------------------ */
/* cffi: begin */
/* loads "default" and our offload provider into |libctx|; |pool| serves it */
int asx_install_offload(OSSL_LIB_CTX *libctx, asx_pool *pool);
/* registers the test record-cipher provider under |name| (load it with
 * OSSL_PROVIDER_load); its pauses go through |pool| */
int asx_register_test_provider(OSSL_LIB_CTX *libctx, const char *name, asx_pool *pool);
/* unload what we loaded into |libctx| (before OSSL_LIB_CTX_free) */
void asx_unload_providers(OSSL_LIB_CTX *libctx);
/* |ctx| was made in |libctx|: keep |libctx| until |ctx| is freed */
int asx_libctx_track(SSL_CTX *ctx, OSSL_LIB_CTX *libctx);
/* the Offload is gone: free |libctx| (providers, pool reference) once no
 * SSL_CTX made in it is left */
void asx_libctx_release(OSSL_LIB_CTX *libctx);
/* SSL_CTX_free, then free library contexts it was the last user of */
int asx_ssl_ctx_free(SSL_CTX *ctx);
/* rebuild a loaded key inside the offload provider's keymgmt */
EVP_PKEY *asx_wrap_key(OSSL_LIB_CTX *libctx, EVP_PKEY *in);
/* keystore.c: the first private key |uri| names, through OSSL_STORE in
 * |libctx| (NULL: the default one); |pass| answers any password or PIN
 * prompt; *asked says whether one came.  NULL leaves errors queued */
EVP_PKEY *asx_load_key_uri(OSSL_LIB_CTX *libctx, const char *propq, const char *uri,
                           const unsigned char *pass, size_t passlen, int *asked);
/* test-cipher counters: record-cipher calls made inside a job, pauses */
void asx_cipher_counts(uint64_t *in_job, uint64_t *paused);
void asx_set_cipher_pause(int on);
/* cffi: end */

/* after fork(), in the child (called by pool.c's fork handler) */
void asx_providers_after_fork_child(void);
/* free released library contexts whose last SSL_CTX is gone; call only
 * where no SSL_CTX_free() is in progress on this thread */
void asx_libctx_reap(void);

#define ASX_OFFLOAD_PROVIDER "asyncssl-offload"

/* ------------------------------------------------------------------ */
/* notifier: one per event loop (notifier.c)                           */
/* ------------------------------------------------------------------ */
/* cffi: begin */
typedef struct asx_notifier asx_notifier;
asx_notifier *asx_notifier_new(size_t capacity);
void asx_notifier_free(asx_notifier *n);
int asx_notifier_fd(asx_notifier *n);
/* drain the eventfd and copy out up to |cap| completed connection ids;
 * returns how many, or -1 when the queue overflowed (wake everyone) */
long asx_notifier_drain(asx_notifier *n, uint64_t *ids, size_t cap);
/* push one id and signal, as the callback does (for tests and reaping) */
void asx_notifier_post(asx_notifier *n, uint64_t id);
/* cffi: end */

/* the SSL async callback conn.c installs (arg: the asx_conn) */
int asx_async_callback(SSL *s, void *arg);

/* ------------------------------------------------------------------ */
/* connection (conn.c)                                                 */
/* ------------------------------------------------------------------ */
/* cffi: begin */
#define ASX_OP_NONE 0
#define ASX_OP_HANDSHAKE 1
#define ASX_OP_READ 2
#define ASX_OP_WRITE 3
#define ASX_OP_SHUTDOWN 4

#define ASX_DONE 0
#define ASX_WANT_READ 1
#define ASX_WANT_ASYNC 2
#define ASX_WANT_ASYNC_JOB 3
#define ASX_CLOSED 4          /* close_notify received */
#define ASX_EOF 5             /* transport EOF without close_notify */
#define ASX_ERROR 6           /* see the error queue */
#define ASX_WANT_WRITE 7      /* the socket takes no more now (never with memory BIOs) */
#define ASX_TRANSPORT_ERROR 8 /* the socket failed: sys_errno */

typedef struct {
    int status;               /* ASX_* above */
    int ssl_error;            /* SSL_get_error() */
    int async_status;         /* SSL_get_async_status() after WANT_ASYNC */
    int ret;                  /* the raw return value */
    size_t result;            /* bytes read or written */
    size_t out_len;           /* ciphertext copied to out */
    size_t out_pending;       /* ciphertext still in the write BIO */
    int sys_errno;            /* ASX_TRANSPORT_ERROR: the socket's errno */
} asx_result;

/* Python reads the fields before the ASX_CFFI split on every step (and
 * writes write_len); the rest are C's own. */
typedef struct asx_conn asx_conn;
struct asx_conn {
    SSL *ssl;
    uint64_t id;
    /* read_buf/write_buf: what the next SSL_read_ex/SSL_write_ex gets.
     * Before asx_conn_pin() they point at the thread's shared buffers (set by
     * asx_conn_use_buffers; only for calls outside async mode, which cannot
     * pause); after it, at this connection's own pinned buffers (a paused
     * job keeps the pointer, rule 2 of docs/architecture.md). */
    unsigned char *read_buf;
    unsigned char *write_buf; /* plaintext for SSL_write_ex */
    size_t write_cap;
    size_t write_len;         /* bytes in write_buf for the pending write */
    int pending_op;           /* the operation whose job is paused */
    int async_mode;           /* SSL_MODE_ASYNC currently on */
    /* counters (the callback's are atomic) */
    uint64_t wakeups;
    uint64_t cb_on_worker;
    uint64_t cb_in_job;
    uint64_t want_async;
    uint64_t want_async_job;
    uint64_t retries;
#ifdef ASX_CFFI
    ...;
#else
    BIO *rbio, *wbio;         /* owned by ssl */
    asx_notifier *notifier;   /* atomic: read by the callback */
    size_t read_cap;
    size_t read_len;          /* length given to the pending read */
    unsigned char *own_read, *own_write;  /* owned, NULL until pinned */
    size_t pin_read_cap, pin_write_cap;
    /* errors libssl queued inside a job that then paused (e.g. SSLfatal,
     * then the alert's record encryption paused): kept for the retry */
    unsigned long job_errors[8];
    char *job_error_data[8];  /* their text (malloc'ed), or NULL */
    int njob_errors;
    BIO *sock;                /* the socket BIO on the native path (else NULL) */
    size_t read_off;          /* a read paused after its first records: their bytes */
    int deferred_status;      /* a read that failed after returning data: its
                               * status, reported by the next read (job_errors
                               * keep its error queue) */
    /* OpenSSL 4.0 refuses every call on a connection in its error state
     * before it would resume a paused job: a job that paused after a fatal
     * error (the alert's encryption) can never finish.  Such a job is
     * abandoned (its fibre stack is never freed) once its engine has
     * signalled completion; then the failure is reported and the SSL may be
     * freed (docs/architecture.md, "Where OpenSSL versions differ"). */
    int job_dead;             /* 1: the paused job can never be resumed */
    uint64_t dead_wakeups;    /* wakeups when it was found dead */
    int dead_async_status;    /* its SSL_get_async_status() then */
#endif
};

asx_conn *asx_conn_new(SSL_CTX *ctx, int server, size_t read_cap, size_t write_cap,
                       int use_callback, uint64_t id);
/* give this connection its own pinned buffers (idempotent); 0: no memory */
int asx_conn_pin(asx_conn *c);
/* use shared buffers (refused once pinned or while a job is paused) */
int asx_conn_use_buffers(asx_conn *c, unsigned char *rbuf, size_t rcap,
                         unsigned char *wbuf, size_t wcap);
/* 0 (refused) while a job is paused; 1 when freed */
int asx_conn_free(asx_conn *c);
void asx_conn_set_notifier(asx_conn *c, asx_notifier *n);
void asx_conn_set_async(asx_conn *c, int on);
/* feed |in|, run |op| (|arg| = max bytes for a read), classify, drain
 * ciphertext into |out|.  The pending write's data must already be in
 * write_buf (write_len). */
void asx_step(asx_conn *c, int op, const unsigned char *in, size_t inlen,
              size_t arg, unsigned char *out, size_t outcap, asx_result *r);
/* the native path: OpenSSL reads and writes |fd| (non-blocking) itself,
 * starting with |prefix| (bytes the transport had read already); before the
 * handshake only.  0: no memory (error queued) */
int asx_conn_use_socket(asx_conn *c, int fd, const unsigned char *prefix, size_t len);
/* the socket's fd is closed (or about to be): later steps fail with EBADF
 * instead of touching a number the kernel may hand to another file */
void asx_conn_forget_socket(asx_conn *c);
/* receive_eof(): an empty read BIO now means EOF */
void asx_conn_set_eof(asx_conn *c);
/* unwrap(): ciphertext the peer sent after its close_notify */
size_t asx_conn_take_input(asx_conn *c, unsigned char *out, size_t cap);
/* ciphers both sides offer (server side, after the handshake) */
int asx_shared_ciphers(SSL *s, const SSL_CIPHER **out, int cap);
/* cffi: end */

/* ------------------------------------------------------------------ */
/* context extension: data the handshake callbacks read, prepared      */
/* ahead (ctx_callbacks.c)                                             */
/* ------------------------------------------------------------------ */
/* sockbio.c: a BIO over a non-blocking socket fd (C only) */
#define ASX_SOCKBIO_CAP 65536
BIO *asx_sockbio_new(int fd, const unsigned char *prefix, size_t prefix_len);
void asx_sockbio_release_idle(BIO *b);
size_t asx_sockbio_take(BIO *b, unsigned char *out, size_t cap);
int asx_sockbio_errno(BIO *b);
void asx_sockbio_forget(BIO *b);
void asx_sockbio_counts(BIO *b, uint64_t *recvs, uint64_t *sends);
/* cffi: begin */
typedef struct asx_ctx_ext asx_ctx_ext;
asx_ctx_ext *asx_ctx_ext_new(void);
void asx_ctx_ext_free(asx_ctx_ext *e);
/* installs ALPN select, SNI and keylog callbacks on |ctx|, reading |e| */
int asx_ctx_attach(SSL_CTX *ctx, asx_ctx_ext *e);
int asx_ctx_set_alpn(asx_ctx_ext *e, const unsigned char *wire, size_t len);
int asx_ctx_set_keylog_fd(asx_ctx_ext *e, int fd);
int asx_ctx_add_sni(asx_ctx_ext *e, const char *hostname, SSL_CTX *ctx);
uint64_t asx_ctx_sni_hits(asx_ctx_ext *e);
/* cffi: end */

/* ------------------------------------------------------------------ */
/* certificates (certgen.c, certinfo.c)                                */
/* ------------------------------------------------------------------ */
/* cffi: begin */
/* a self-signed certificate (OPENSSL_malloc'ed PEM strings) */
int asx_self_signed(const char *common_name, const char *san, const char *key_type, int bits,
                    int days, char **cert_pem, char **key_pem);
/* zero, then free, a secret string OpenSSL allocated (a private key's PEM) */
void asx_free_secret(char *s);
/* URIs of AIA (kind 0 OCSP, 1 caIssuers) or CRL distribution points (2),
 * NUL-separated into |buf|; how many, or -1 when |buf| is too small */
int asx_cert_uris(X509 *x, int kind, char *buf, size_t cap);
/* the |i|th certificate of the peer's chain as sent (|verified| 0: a
 * server's view lacks the client's leaf, as in OpenSSL) or as verified (1,
 * leaf first); NULL past the end.  Not up-ref'd: valid while |ssl| lives */
X509 *asx_chain_cert(const SSL *ssl, int verified, int i);
/* cffi: end */

/* ------------------------------------------------------------------ */
/* error names (a table build.py makes from the OpenSSL headers)       */
/* ------------------------------------------------------------------ */
/* cffi: begin */
/* the name of reason |reason| of library |lib| as the headers spell its
 * macro (SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE: "SSLV3_ALERT_HANDSHAKE_FAILURE"),
 * the name the stdlib gives it; NULL for a code the headers do not name */
const char *asx_reason_name(int lib, int reason);
/* cffi: end */

#endif
