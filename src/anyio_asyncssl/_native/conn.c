/*
 * conn.c -- one SSL object over memory BIOs with pinned buffers, driven by
 * one C call per step (asx_step).
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
 * The wake-ups of a paused job come through the async callback installed
 * here (notifier.c); the connection only holds the notifier pointer and the
 * counters the callback bumps.
 *
 * Two data paths, one step.  Over memory BIOs (any transport) the step feeds
 * the ciphertext Python passes in and copies out what OpenSSL wrote.  On the
 * native path (asx_conn_use_socket, a kernel socket) OpenSSL reads and
 * writes the socket through sockbio.c: nothing to feed or drain, and a step
 * may also answer WANT_WRITE (the socket is full) or TRANSPORT_ERROR (the
 * socket failed; its errno, not a TLS error).
 *
 * Outside async mode (no job can pause) a read decrypts every record that
 * has already arrived, up to the caller's size, in this one call, and a
 * write takes the caller's buffer as it is (Python points write_buf at it
 * for the call; OpenSSL keeps nothing of it once the call returns, and
 * SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER lets a WANT_WRITE retry come with the
 * same bytes at another address).  A read that fails after it already
 * produced data returns the data; the failure (status and error queue) is
 * kept and is the next read's answer, since a second SSL_read after a fatal
 * error would not say why.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/async.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "asyncssl.h"

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
    /* a WANT_WRITE retry may come with the same bytes at another address */
    SSL_set_mode(c->ssl, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
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
    if (c->pending_op != ASX_OP_NONE || (SSL_waiting_for_async(c->ssl) && !c->job_dead))
        return 0;
    /* a dead job (job_dead, its engine done) is abandoned: SSL_free frees
     * its wait context; the job's fibre is never resumed nor freed */
    job_errors_clear(c);
    SSL_free(c->ssl);    /* frees both BIOs */
    free(c->own_read);
    free(c->own_write);
    free(c);
    asx_libctx_reap();   /* it may have been the last user of an Offload's */
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

int asx_conn_use_socket(asx_conn *c, int fd, const unsigned char *prefix, size_t len)
{
    BIO *b = asx_sockbio_new(fd, prefix, len);

    if (b == NULL)
        return 0;
    /* one reference for both directions; frees the memory BIOs */
    SSL_set_bio(c->ssl, b, b);
    c->rbio = c->wbio = NULL;
    c->sock = b;
    return 1;
}

void asx_conn_forget_socket(asx_conn *c)
{
    if (c->sock != NULL)
        asx_sockbio_forget(c->sock);
}

void asx_conn_set_eof(asx_conn *c)
{
    if (c->rbio != NULL)      /* the socket BIO sees the peer's EOF itself */
        BIO_set_mem_eof_return(c->rbio, 0);
}

/* classify a finished (not paused) call: r->ssl_error and r->status */
static void classify_failure(asx_conn *c, int ret, asx_result *r)
{
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
    if ((r->status == ASX_ERROR || r->status == ASX_EOF) && c->sock != NULL
        && (r->sys_errno = asx_sockbio_errno(c->sock)) != 0)
        r->status = ASX_TRANSPORT_ERROR;
}

/* a read that already has data to return failed: the data goes back now,
 * and unless the failure is only "wait" (or the peer's close_notify, which
 * the next read sees again) it is the next read's answer, with its error
 * queue kept as a paused job's is */
static void defer_failure(asx_conn *c, int ret)
{
    int e = SSL_get_error(c->ssl, ret);
    asx_result later;

    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_ASYNC_JOB)
        return;
    memset(&later, 0, sizeof(later));
    classify_failure(c, ret, &later);
    if (later.status != ASX_CLOSED) {
        c->deferred_status = later.status;
        job_errors_save(c);
    }
}

/* after a read that produced |n| bytes, decrypt the records that have
 * already arrived too (no syscall).  In async mode such a read may pause:
 * then the data so far stays in the pinned buffer (read_off says how much)
 * and 0 is returned, as the paused job is the same operation; its retry
 * appends.  Otherwise returns the bytes read in all. */
static size_t read_more(asx_conn *c, size_t n)
{
    BIO *in = c->sock != NULL ? c->sock : c->rbio;

    while (n < c->read_len && (SSL_pending(c->ssl) > 0 || BIO_ctrl_pending(in) > 0)) {
        size_t more = 0;
        int ret = SSL_read_ex(c->ssl, c->read_buf + n, c->read_len - n, &more);

        if (ret > 0) {
            n += more;
            continue;
        }
        if (SSL_waiting_for_async(c->ssl)) {
            c->read_off = n;
            return 0;
        }
        defer_failure(c, ret);
        break;
    }
    return n;
}

/* Completions the engine signalled from outside the job (an "early" wake-up
 * fires inside the job, before the pause, and says nothing of completion). */
static uint64_t outside_wakeups(asx_conn *c)
{
    uint64_t w = __atomic_load_n(&c->wakeups, __ATOMIC_ACQUIRE);

    return w - __atomic_load_n(&c->cb_in_job, __ATOMIC_ACQUIRE);
}

/* OpenSSL 4.0 keeps a connection's fatal error sticky: every later call
 * fails at once, before it would resume a paused job, and SSL_get_error()
 * reports the failure (SSL_ERROR_SSL or SSL_ERROR_SYSCALL) whatever the queue
 * holds, from the very call that paused.  Asked with the queue empty (the
 * job's errors already saved), a paused job's connection answers
 * SSL_ERROR_WANT_ASYNC unless it is in that state: then no call will ever
 * resume the job.  Before 4.0 the retry resumes it; it sends its alert and
 * ends. */
static int job_is_dead(asx_conn *c, int ret)
{
    int e;

    if (ERR_peek_error() != 0)
        return 0;
    e = SSL_get_error(c->ssl, ret);
    return e == SSL_ERROR_SSL || e == SSL_ERROR_SYSCALL;
}

/* whether the engine is done with a dead job's operation: only then may the
 * SSL (its wait context, the callback's argument) be freed */
static int dead_job_engine_done(asx_conn *c)
{
    switch (c->dead_async_status) {
    case ASYNC_STATUS_OK:
        return outside_wakeups(c) != c->dead_wakeups;
    case ASYNC_STATUS_UNSUPPORTED: {
        OSSL_ASYNC_FD fds[8];
        struct pollfd p[8];
        size_t n = 0, i;

        if (!SSL_get_all_async_fds(c->ssl, NULL, &n) || n == 0)
            return 1;
        if (n > sizeof(fds) / sizeof(fds[0]) || !SSL_get_all_async_fds(c->ssl, fds, &n))
            return 0;
        for (i = 0; i < n; i++) {
            p[i].fd = fds[i];
            p[i].events = POLLIN;
            p[i].revents = 0;
        }
        return poll(p, (nfds_t)n, 0) > 0;
    }
    default:                     /* EAGAIN, ERR: nothing is in flight */
        return 1;
    }
}

/* a step on a connection whose job can never resume (job_is_dead): no SSL
 * call (OpenSSL would refuse it).  Until the engine is done the operation
 * still answers WANT_ASYNC; then it fails with the errors the job queued
 * (a read that paused after some records returns them first). */
static void dead_job_step(asx_conn *c, int op, asx_result *r)
{
    asx_result later;

    r->ret = -1;
    ERR_clear_error();
    if (c->pending_op == op && !dead_job_engine_done(c)) {
        c->retries++;
        c->want_async++;
        r->ssl_error = SSL_ERROR_WANT_ASYNC;
        r->status = ASX_WANT_ASYNC;
        r->async_status = c->dead_async_status;
        return;
    }
    memset(&later, 0, sizeof(later));
    classify_failure(c, -1, &later);
    if (later.status == ASX_WANT_ASYNC || later.status == ASX_DONE) {
        /* not OpenSSL 4.0's sticky error after all: never report a pause */
        later.status = ASX_ERROR;
        later.ssl_error = SSL_ERROR_SSL;
    }
    if (op == ASX_OP_READ && c->pending_op == op && c->read_off > 0) {
        c->deferred_status = later.status;
        job_errors_save(c);
        r->ret = 1;
        r->status = ASX_DONE;
        r->result = c->read_off;
        c->read_off = 0;
        return;
    }
    r->ssl_error = later.ssl_error;
    r->status = later.status;
    r->sys_errno = later.sys_errno;
}

void asx_step(asx_conn *c, int op, const unsigned char *in, size_t inlen, size_t arg,
              unsigned char *out, size_t outcap, asx_result *r)
{
    size_t n = 0, pending = 0;
    int ret = 1;

    memset(r, 0, sizeof(*r));
    while (inlen > 0 && c->rbio != NULL) {   /* memory BIO writes never fail short */
        int chunk = inlen > 0x40000000 ? 0x40000000 : (int)inlen;
        int w = BIO_write(c->rbio, in, chunk);

        if (w <= 0)
            break;
        in += w;
        inlen -= (size_t)w;
    }
    if (op == ASX_OP_READ && c->deferred_status != 0 && c->pending_op == ASX_OP_NONE) {
        /* the failure read_more() met after the data it returned */
        r->status = c->deferred_status;
        c->deferred_status = 0;
        ERR_clear_error();
        job_errors_restore(c);
        if (r->status == ASX_TRANSPORT_ERROR)
            r->sys_errno = asx_sockbio_errno(c->sock);
    } else if (op != ASX_OP_NONE && c->job_dead) {
        dead_job_step(c, op, r);
        c->pending_op = r->status == ASX_WANT_ASYNC ? op : ASX_OP_NONE;
    } else if (op != ASX_OP_NONE) {
        uint64_t before = outside_wakeups(c);

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
            if (c->pending_op != ASX_OP_READ) {
                c->read_len = arg < c->read_cap ? arg : c->read_cap;
                c->read_off = 0;
            }
            /* a resumed job keeps its own arguments: the offset matters for
             * the result only */
            ret = SSL_read_ex(c->ssl, c->read_buf + c->read_off, c->read_len - c->read_off,
                              &n);
            if (ret > 0) {
                n += c->read_off;
                c->read_off = 0;
                if ((n = read_more(c, n)) == 0)
                    ret = -1;     /* paused after some records: WANT_ASYNC below */
            } else if (c->read_off > 0 && !SSL_waiting_for_async(c->ssl)) {
                /* the job that paused after some records failed: those
                 * records go back now, the failure with the next read */
                defer_failure(c, ret);
                n = c->read_off;
                c->read_off = 0;
                ret = 1;
            }
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
            if (c->deferred_status == 0)
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
            if (job_is_dead(c, ret)) {
                /* OpenSSL 4.0: no call will resume it.  The completion to
                 * wait for is one signalled after this call began. */
                c->job_dead = 1;
                c->dead_wakeups = before;
                c->dead_async_status = r->async_status;
            }
        } else {
            classify_failure(c, ret, r);
        }
        c->pending_op = r->status == ASX_WANT_ASYNC ? op : ASX_OP_NONE;
    }
    if (c->sock != NULL) {
        asx_sockbio_release_idle(c->sock);
        return;
    }
    pending = BIO_ctrl_pending(c->wbio);
    if (pending > 0 && outcap > 0) {
        int got = BIO_read(c->wbio, out, (int)(pending < outcap ? pending : outcap));

        r->out_len = got > 0 ? (size_t)got : 0;
        pending = BIO_ctrl_pending(c->wbio);
    }
    r->out_pending = pending;
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
    size_t pending;

    if (c->sock != NULL)
        return asx_sockbio_take(c->sock, out, cap);
    pending = BIO_ctrl_pending(c->rbio);
    int got;

    if (pending == 0 || cap == 0)
        return pending;
    got = BIO_read(c->rbio, out, (int)(pending < cap ? pending : cap));
    return got > 0 ? (size_t)got : 0;
}
