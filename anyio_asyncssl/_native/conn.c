/*
 * conn.c -- one SSL object over memory BIOs, driven by one C call per step;
 * the GIL-free async callback and the per-loop notifier; the handshake-time
 * callbacks (ALPN, SNI, keylog) that read data prepared beforehand.
 *
 * Theory of operation
 * -------------------
 * asx_step() is the whole hot path of a driver step: it feeds incoming
 * ciphertext into the read BIO, clears the error queue, runs one operation
 * (handshake, read into the pinned read buffer, write from the pinned write
 * buffer, shutdown), classifies the result and copies pending ciphertext out
 * of the write BIO.  Python makes one crossing per step and allocates
 * nothing here.
 *
 * Async mode: when an operation answers WANT_ASYNC its job is paused inside
 * OpenSSL with the arguments of that first call.  Whatever SSL function is
 * called next on this SSL resumes *that* job (ssl_start_async_job ignores the
 * new function), so we remember the paused operation in pending_op and the
 * Python layer refuses any other operation until it completes.  The read
 * and write buffers are per connection and never move: the job holds raw
 * pointers into them.  asx_conn_free() refuses while a job is paused (the
 * job would leak and the engine would later write into freed memory).
 * Whether a job is paused is asked with SSL_waiting_for_async(), not
 * SSL_get_error(): the latter reports SSL_ERROR_SSL whenever the error queue
 * is not empty, and libssl queues an error and then pauses when the fatal
 * alert it sends goes through a record cipher that pauses.  Such errors are
 * kept in the connection and put back when the retry ends the operation.
 *
 * The async callback runs on an engine thread, or inside the job on the loop
 * thread (early notifications).  It takes no GIL and runs no Python: it bumps
 * the connection's wake-up counter, queues the connection id on the
 * notifier's completion queue and writes the notifier's eventfd.  The
 * notifier is per event-loop thread, so a loop waits on one fd however many
 * connections it drives.  Wake-ups are level-style and may be early,
 * duplicated or stale: the driver re-checks by retrying.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/async.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "asyncssl.h"

/* ------------------------------------------------------------------ */
/* notifier                                                            */
/* ------------------------------------------------------------------ */
struct asx_notifier {
    int efd;
    pthread_mutex_t mu;
    uint64_t *ids;
    size_t cap, count;
    int overflow;
};

asx_notifier *asx_notifier_new(size_t capacity)
{
    asx_notifier *n = calloc(1, sizeof(*n));

    if (n == NULL)
        return NULL;
    if (capacity < 16)
        capacity = 16;
    n->ids = calloc(capacity, sizeof(uint64_t));
    n->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (n->ids == NULL || n->efd < 0) {
        if (n->efd >= 0)
            close(n->efd);
        free(n->ids);
        free(n);
        return NULL;
    }
    n->cap = capacity;
    pthread_mutex_init(&n->mu, NULL);
    return n;
}

void asx_notifier_free(asx_notifier *n)
{
    if (n == NULL)
        return;
    close(n->efd);
    pthread_mutex_destroy(&n->mu);
    free(n->ids);
    free(n);
}

int asx_notifier_fd(asx_notifier *n) { return n->efd; }

void asx_notifier_post(asx_notifier *n, uint64_t id)
{
    uint64_t one = 1;
    ssize_t w;

    pthread_mutex_lock(&n->mu);
    if (n->count < n->cap)
        n->ids[n->count++] = id;
    else
        n->overflow = 1;
    pthread_mutex_unlock(&n->mu);
    w = write(n->efd, &one, sizeof(one));
    (void)w;
}

long asx_notifier_drain(asx_notifier *n, uint64_t *ids, size_t cap)
{
    uint64_t v;
    ssize_t r = read(n->efd, &v, sizeof(v));
    long out;

    (void)r;
    pthread_mutex_lock(&n->mu);
    if (n->overflow) {
        n->overflow = 0;
        n->count = 0;
        out = -1;
    } else {
        size_t k = n->count < cap ? n->count : cap;

        memcpy(ids, n->ids, k * sizeof(uint64_t));
        memmove(n->ids, n->ids + k, (n->count - k) * sizeof(uint64_t));
        n->count -= k;
        out = (long)k;
        if (n->count > 0) {      /* more left: keep the fd readable */
            uint64_t one = 1;
            ssize_t w = write(n->efd, &one, sizeof(one));

            (void)w;
        }
    }
    pthread_mutex_unlock(&n->mu);
    return out;
}

/* ------------------------------------------------------------------ */
/* the async callback: no GIL, no Python                               */
/* ------------------------------------------------------------------ */
int asx_async_callback(SSL *s, void *arg)
{
    asx_conn *c = arg;
    asx_notifier *n = __atomic_load_n(&c->notifier, __ATOMIC_ACQUIRE);

    (void)s;
    if (asx_is_worker_thread())
        __atomic_add_fetch(&c->cb_on_worker, 1, __ATOMIC_RELAXED);
    if (ASYNC_get_current_job() != NULL)
        __atomic_add_fetch(&c->cb_in_job, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&c->wakeups, 1, __ATOMIC_RELEASE);
    if (n != NULL)
        asx_notifier_post(n, c->id);
    return 1;
}

/* ------------------------------------------------------------------ */
/* connection                                                          */
/* ------------------------------------------------------------------ */
#define ASX_MAX_JOB_ERRORS ((int)(sizeof(((asx_conn *)0)->job_errors) / sizeof(unsigned long)))

static void job_errors_clear(asx_conn *c)
{
    int i;

    for (i = 0; i < c->njob_errors; i++) {
        free(c->job_error_data[i]);
        c->job_error_data[i] = NULL;
    }
    c->njob_errors = 0;
}

/* pop one error with a copy of its text (NULL: none); 0 when the queue is empty */
static unsigned long pop_error(char **text)
{
    const char *data = NULL;
    int flags = 0;
    unsigned long e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);

    *text = NULL;
    if (e != 0 && (flags & ERR_TXT_STRING) && data != NULL && *data != '\0')
        *text = strdup(data);   /* before any push can reuse the slot */
    return e;
}

static void push_error(unsigned long e, const char *text)
{
    if (text != NULL)
        ERR_raise_data(ERR_GET_LIB(e), ERR_GET_REASON(e), "%s", text);
    else
        ERR_raise(ERR_GET_LIB(e), ERR_GET_REASON(e));
}

/* a job paused with errors queued: they belong to its operation, keep them */
static void job_errors_save(asx_conn *c)
{
    char *text;
    unsigned long e;

    while ((e = pop_error(&text)) != 0) {
        if (c->njob_errors < ASX_MAX_JOB_ERRORS) {
            c->job_errors[c->njob_errors] = e;
            c->job_error_data[c->njob_errors++] = text;
        } else {
            free(text);
        }
    }
}

/* the job ended in failure: its saved errors go back first, then the later ones */
static void job_errors_restore(asx_conn *c)
{
    unsigned long later[ASX_MAX_JOB_ERRORS];
    char *later_text[ASX_MAX_JOB_ERRORS], *text;
    unsigned long e;
    int nl = 0, i;

    while ((e = pop_error(&text)) != 0) {
        if (nl < ASX_MAX_JOB_ERRORS) {
            later[nl] = e;
            later_text[nl++] = text;
        } else {
            free(text);
        }
    }
    for (i = 0; i < c->njob_errors; i++)
        push_error(c->job_errors[i], c->job_error_data[i]);
    for (i = 0; i < nl; i++) {
        push_error(later[i], later_text[i]);
        free(later_text[i]);
    }
    job_errors_clear(c);
}

asx_conn *asx_conn_new(SSL_CTX *ctx, int server, size_t read_cap, size_t write_cap,
                       int use_callback, uint64_t id)
{
    asx_conn *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    c->id = id;
    /* buffers are pinned lazily (asx_conn_pin): most connections only read
     * and write outside async mode and use their thread's shared buffers */
    c->pin_read_cap = read_cap ? read_cap : 1;
    c->pin_write_cap = write_cap ? write_cap : 1;
    c->ssl = SSL_new(ctx);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        SSL_free(c->ssl);
        free(c);
        return NULL;
    }
    /* an empty read BIO means "no data yet" until receive_eof() */
    BIO_set_mem_eof_return(c->rbio, -1);
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    /* free the ~17 KiB record buffers of idle connections, as CPython's ssl does */
    SSL_set_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
    if (server)
        SSL_set_accept_state(c->ssl);
    else
        SSL_set_connect_state(c->ssl);
    /* before the first SSL call: libssl copies the callback into the wait
     * context only when it creates it (rule 5 of docs/architecture.md) */
    if (use_callback) {
        SSL_set_async_callback(c->ssl, asx_async_callback);
        SSL_set_async_callback_arg(c->ssl, c);
    }
    return c;
}

int asx_conn_free(asx_conn *c)
{
    if (c == NULL)
        return 1;
    if (c->pending_op != ASX_OP_NONE || SSL_waiting_for_async(c->ssl))
        return 0;
    job_errors_clear(c);
    SSL_free(c->ssl);    /* frees both BIOs */
    free(c->own_read);
    free(c->own_write);
    free(c);
    return 1;
}

int asx_conn_pin(asx_conn *c)
{
    if (c->own_read == NULL) {
        unsigned char *r = malloc(c->pin_read_cap), *w = malloc(c->pin_write_cap);

        if (r == NULL || w == NULL) {
            free(r);
            free(w);
            return 0;
        }
        c->own_read = r;
        c->own_write = w;
    }
    if (c->pending_op == ASX_OP_NONE) {
        c->read_buf = c->own_read;
        c->read_cap = c->pin_read_cap;
        c->write_buf = c->own_write;
        c->write_cap = c->pin_write_cap;
    }
    return 1;
}

int asx_conn_use_buffers(asx_conn *c, unsigned char *rbuf, size_t rcap,
                         unsigned char *wbuf, size_t wcap)
{
    if (c->own_read != NULL || c->pending_op != ASX_OP_NONE || c->async_mode)
        return 0;
    c->read_buf = rbuf;
    c->read_cap = rcap;
    c->write_buf = wbuf;
    c->write_cap = wcap;
    return 1;
}

void asx_conn_set_notifier(asx_conn *c, asx_notifier *n)
{
    __atomic_store_n(&c->notifier, n, __ATOMIC_RELEASE);
}

void asx_conn_set_async(asx_conn *c, int on)
{
    if (on)
        SSL_set_mode(c->ssl, SSL_MODE_ASYNC);
    else
        SSL_clear_mode(c->ssl, SSL_MODE_ASYNC);
    c->async_mode = on;
}

void asx_conn_set_eof(asx_conn *c)
{
    BIO_set_mem_eof_return(c->rbio, 0);
}

void asx_step(asx_conn *c, int op, const unsigned char *in, size_t inlen, size_t arg,
              unsigned char *out, size_t outcap, asx_result *r)
{
    size_t n = 0, pending;
    int ret = 1;

    memset(r, 0, sizeof(*r));
    while (inlen > 0) {       /* memory BIO writes never fail short */
        int chunk = inlen > 0x40000000 ? 0x40000000 : (int)inlen;
        int w = BIO_write(c->rbio, in, chunk);

        if (w <= 0)
            break;
        in += w;
        inlen -= (size_t)w;
    }
    if (op != ASX_OP_NONE) {
        if (c->pending_op == op)
            c->retries++;
        else
            job_errors_clear(c);
        ERR_clear_error();
        switch (op) {
        case ASX_OP_HANDSHAKE:
            ret = SSL_do_handshake(c->ssl);
            break;
        case ASX_OP_READ:
            if (c->read_buf == NULL) {
                ERR_raise_data(ERR_LIB_SSL, ERR_R_PASSED_NULL_PARAMETER, "no read buffer");
                ret = 0;
                break;
            }
            if (c->pending_op != ASX_OP_READ)
                c->read_len = arg < c->read_cap ? arg : c->read_cap;
            ret = SSL_read_ex(c->ssl, c->read_buf, c->read_len, &n);
            break;
        case ASX_OP_WRITE:
            if (c->write_buf == NULL) {
                ERR_raise_data(ERR_LIB_SSL, ERR_R_PASSED_NULL_PARAMETER, "no write buffer");
                ret = 0;
                break;
            }
            ret = SSL_write_ex(c->ssl, c->write_buf, c->write_len, &n);
            break;
        case ASX_OP_SHUTDOWN:
            ret = SSL_shutdown(c->ssl);
            break;
        default:
            ret = -1;
        }
        r->ret = ret;
        if (ret > 0 || (op == ASX_OP_SHUTDOWN && ret == 0)) {
            r->status = ASX_DONE;
            r->result = (op == ASX_OP_READ || op == ASX_OP_WRITE) ? n : (size_t)ret;
            job_errors_clear(c);
        } else if (SSL_waiting_for_async(c->ssl)) {
            /* A job is paused, whatever SSL_get_error() says: it looks at the
             * error queue first, and libssl may have queued an error inside
             * the job and then paused (SSLfatal sends an alert, whose record
             * encryption can pause).  Reporting that as a failure would let
             * the SSL be freed under its paused job (rule 4).  The errors
             * belong to the operation: keep them for the retry. */
            r->ssl_error = SSL_ERROR_WANT_ASYNC;
            r->status = ASX_WANT_ASYNC;
            c->want_async++;
            if (!SSL_get_async_status(c->ssl, &r->async_status))
                r->async_status = ASYNC_STATUS_UNSUPPORTED;
            job_errors_save(c);
        } else {
            r->ssl_error = SSL_get_error(c->ssl, ret);
            if (c->njob_errors > 0 && (r->ssl_error == SSL_ERROR_SSL
                                       || r->ssl_error == SSL_ERROR_SYSCALL)) {
                /* the job ended in failure: put back what it queued before
                 * pausing, ahead of anything queued since */
                job_errors_restore(c);
                r->ssl_error = SSL_ERROR_SSL;
            }
            job_errors_clear(c);
            switch (r->ssl_error) {
            case SSL_ERROR_WANT_READ:
                r->status = ASX_WANT_READ;
                break;
            case SSL_ERROR_WANT_WRITE:
                r->status = ASX_WANT_WRITE;
                break;
            case SSL_ERROR_WANT_ASYNC:
                r->status = ASX_WANT_ASYNC;
                c->want_async++;
                if (!SSL_get_async_status(c->ssl, &r->async_status))
                    r->async_status = ASYNC_STATUS_UNSUPPORTED;
                break;
            case SSL_ERROR_WANT_ASYNC_JOB:
                r->status = ASX_WANT_ASYNC_JOB;
                c->want_async_job++;
                break;
            case SSL_ERROR_ZERO_RETURN:
                r->status = ASX_CLOSED;
                break;
            case SSL_ERROR_SYSCALL:
                r->status = ERR_peek_error() == 0 ? ASX_EOF : ASX_ERROR;
                break;
            default:
                r->status = ASX_ERROR;
            }
        }
        c->pending_op = r->status == ASX_WANT_ASYNC ? op : ASX_OP_NONE;
    }
    pending = BIO_ctrl_pending(c->wbio);
    if (pending > 0 && outcap > 0) {
        int got = BIO_read(c->wbio, out, (int)(pending < outcap ? pending : outcap));

        r->out_len = got > 0 ? (size_t)got : 0;
        pending = BIO_ctrl_pending(c->wbio);
    }
    r->out_pending = pending;
}

/* ------------------------------------------------------------------ */
/* context extension: ALPN select, SNI, keylog                         */
/* ------------------------------------------------------------------ */
typedef struct {
    char *name;               /* lower case; "*.example.com" for a wildcard */
    SSL_CTX *ctx;
} sni_entry;

struct asx_ctx_ext {
    unsigned char *alpn;      /* server preference, wire format */
    size_t alpn_len;
    int keylog_fd;
    sni_entry *sni;
    size_t nsni;
    uint64_t sni_hits;
};

static int g_ext_idx = -1;
static pthread_once_t g_ext_once = PTHREAD_ONCE_INIT;

static void ext_index_init(void)
{
    g_ext_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

asx_ctx_ext *asx_ctx_ext_new(void)
{
    asx_ctx_ext *e = calloc(1, sizeof(*e));

    if (e != NULL)
        e->keylog_fd = -1;
    pthread_once(&g_ext_once, ext_index_init);
    return e;
}

void asx_ctx_ext_free(asx_ctx_ext *e)
{
    size_t i;

    if (e == NULL)
        return;
    for (i = 0; i < e->nsni; i++) {
        free(e->sni[i].name);
        SSL_CTX_free(e->sni[i].ctx);
    }
    free(e->sni);
    free(e->alpn);
    free(e);
}

static int alpn_select_cb(SSL *s, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    asx_ctx_ext *e = arg;
    unsigned char *sel = NULL;

    (void)s;
    if (e == NULL || e->alpn == NULL)
        return SSL_TLSEXT_ERR_NOACK;
    /* server list first: the server's preference wins */
    if (SSL_select_next_proto(&sel, outlen, e->alpn, (unsigned int)e->alpn_len, in, inlen)
        != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL;   /* RFC 7301: no_application_protocol */
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int sni_match(const char *pattern, const char *name)
{
    const char *dot;

    if (strcasecmp(pattern, name) == 0)
        return 1;
    if (pattern[0] != '*' || pattern[1] != '.')
        return 0;
    dot = strchr(name, '.');
    return dot != NULL && dot != name && strcasecmp(pattern + 1, dot) == 0;
}

static int sni_cb(SSL *s, int *al, void *arg)
{
    asx_ctx_ext *e = arg;
    const char *name = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    size_t i;

    (void)al;
    if (e == NULL || name == NULL)
        return SSL_TLSEXT_ERR_OK;
    /* exact names first, then wildcards */
    for (i = 0; i < e->nsni; i++)
        if (e->sni[i].name[0] != '*' && strcasecmp(e->sni[i].name, name) == 0)
            goto found;
    for (i = 0; i < e->nsni; i++)
        if (e->sni[i].name[0] == '*' && sni_match(e->sni[i].name, name))
            goto found;
    return SSL_TLSEXT_ERR_OK;     /* unknown name: the default certificate */
found:
    /*
     * Swap only the certificate, key and chain (kept in the child SSL_CTX).
     * SSL_set_SSL_CTX would also swap in the child's cipher list, CA store,
     * session id context and client CA list: the parent's settings (ECDHE-only
     * TLS 1.2 suites, mTLS trust) would silently stop applying.
     */
    {
        SSL_CTX *child = e->sni[i].ctx;
        X509 *x = SSL_CTX_get0_certificate(child);
        EVP_PKEY *pkey = SSL_CTX_get0_privatekey(child);
        STACK_OF(X509) *chain = NULL;

        if (x == NULL || pkey == NULL || !SSL_CTX_get0_chain_certs(child, &chain))
            return SSL_TLSEXT_ERR_ALERT_FATAL;
        SSL_certs_clear(s);
        if (!SSL_use_cert_and_key(s, x, pkey, chain, 1))
            return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    __atomic_add_fetch(&e->sni_hits, 1, __ATOMIC_RELAXED);
    return SSL_TLSEXT_ERR_OK;
}

static void keylog_cb(const SSL *s, const char *line)
{
    asx_ctx_ext *e = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), g_ext_idx);
    struct iovec iov[2];
    ssize_t w;

    if (e == NULL || e->keylog_fd < 0)
        return;
    iov[0].iov_base = (void *)line;
    iov[0].iov_len = strlen(line);
    iov[1].iov_base = (void *)"\n";
    iov[1].iov_len = 1;
    w = writev(e->keylog_fd, iov, 2);   /* O_APPEND: one line per call */
    (void)w;
}

int asx_ctx_attach(SSL_CTX *ctx, asx_ctx_ext *e)
{
    if (!SSL_CTX_set_ex_data(ctx, g_ext_idx, e))
        return 0;
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, e);
    SSL_CTX_set_tlsext_servername_callback(ctx, sni_cb);
    SSL_CTX_set_tlsext_servername_arg(ctx, e);
    SSL_CTX_set_keylog_callback(ctx, e->keylog_fd >= 0 ? keylog_cb : NULL);
    return 1;
}

int asx_ctx_set_alpn(asx_ctx_ext *e, const unsigned char *wire, size_t len)
{
    unsigned char *copy = NULL;

    if (len > 0) {
        if ((copy = malloc(len)) == NULL)
            return 0;
        memcpy(copy, wire, len);
    }
    free(e->alpn);
    e->alpn = copy;
    e->alpn_len = len;
    return 1;
}

int asx_ctx_set_keylog_fd(asx_ctx_ext *e, int fd)
{
    e->keylog_fd = fd;
    return 1;
}

int asx_ctx_add_sni(asx_ctx_ext *e, const char *hostname, SSL_CTX *ctx)
{
    sni_entry *grown;
    size_t i;

    for (i = 0; i < e->nsni; i++)
        if (strcasecmp(e->sni[i].name, hostname) == 0) {
            if (!SSL_CTX_up_ref(ctx))
                return 0;
            SSL_CTX_free(e->sni[i].ctx);
            e->sni[i].ctx = ctx;
            return 1;
        }
    grown = realloc(e->sni, (e->nsni + 1) * sizeof(*grown));
    if (grown == NULL)
        return 0;
    e->sni = grown;
    if ((grown[e->nsni].name = strdup(hostname)) == NULL)
        return 0;
    if (!SSL_CTX_up_ref(ctx)) {
        free(grown[e->nsni].name);
        return 0;
    }
    grown[e->nsni].ctx = ctx;
    e->nsni++;
    return 1;
}

uint64_t asx_ctx_sni_hits(asx_ctx_ext *e)
{
    return __atomic_load_n(&e->sni_hits, __ATOMIC_RELAXED);
}

int asx_shared_ciphers(SSL *s, const SSL_CIPHER **out, int cap)
{
    STACK_OF(SSL_CIPHER) *server = SSL_get_ciphers(s);
    STACK_OF(SSL_CIPHER) *client = SSL_get_client_ciphers(s);
    int i, n = 0;

    if (server == NULL || client == NULL)
        return -1;
    for (i = 0; i < sk_SSL_CIPHER_num(server) && n < cap; i++) {
        const SSL_CIPHER *c = sk_SSL_CIPHER_value(server, i);

        if (sk_SSL_CIPHER_find(client, c) >= 0)
            out[n++] = c;
    }
    return n;
}

size_t asx_conn_take_input(asx_conn *c, unsigned char *out, size_t cap)
{
    size_t pending = BIO_ctrl_pending(c->rbio);
    int got;

    if (pending == 0 || cap == 0)
        return pending;
    got = BIO_read(c->rbio, out, (int)(pending < cap ? pending : cap));
    return got > 0 ? (size_t)got : 0;
}
