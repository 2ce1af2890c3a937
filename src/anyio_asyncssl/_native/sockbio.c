/*
 * sockbio.c -- a BIO over a non-blocking socket, for the native data path.
 *
 * Theory of operation
 * -------------------
 * When a connection's transport is a kernel socket, OpenSSL reads and
 * writes the socket itself through this BIO: no ciphertext crosses Python,
 * no memory-BIO copies.  A step that needs more input than has arrived ends
 * with SSL_ERROR_WANT_READ (the driver waits until the fd is readable), one
 * whose output the socket does not take with SSL_ERROR_WANT_WRITE (it waits
 * until the fd is writable); either way the same step is simply retried.
 *
 * Reads are buffered here, not in libssl (read_ahead stays off): one recv()
 * takes up to ASX_SOCKBIO_CAP bytes, several records, and libssl's small
 * reads (a 5-byte header, then the body) are served from the buffer.  So
 *   - a step decrypts every record that has arrived for one syscall;
 *   - what is left after the peer's close_notify is ours to hand back
 *     (unwrap's trailing bytes), where libssl's read-ahead buffer would keep
 *     it out of reach;
 *   - bytes a transport had already read before we took its socket over
 *     (asyncio's protocol buffer) go in first (asx_sockbio_new's prefix).
 * The buffer exists only while it holds data (asx_sockbio_release_idle,
 * called after every step), so idle connections cost nothing here.
 *
 * Writes go straight to send(MSG_NOSIGNAL); a short write is reported as
 * such and libssl keeps the rest of the record and retries (it requires the
 * retry to carry the same data: the driver retries the same step).
 *
 * Errors: EAGAIN sets the retry flags; EOF (recv() == 0) is remembered and
 * reported as a 0-byte read without retry, which libssl turns into its
 * unexpected-EOF error unless a close_notify came first; any other errno is
 * kept (asx_sockbio_errno) and raised as ERR_LIB_SYS, so the Python layer
 * can raise the transport's OSError (ECONNRESET is a broken transport, not a
 * TLS failure).  This BIO never closes the fd: its owner does.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <openssl/bio.h>
#include <openssl/err.h>

#include "asyncssl.h"

typedef struct {
    int fd;
    unsigned char *in;        /* buffered ciphertext (NULL while empty) */
    size_t in_off, in_len;    /* unread bytes: in[in_off .. in_off + in_len) */
    int eof;                  /* recv() returned 0 */
    int err;                  /* the last hard errno, 0 if none */
    uint64_t recvs, sends;    /* syscalls, for the stats */
} sockbio;

static BIO_METHOD *g_method;
static pthread_once_t g_method_once = PTHREAD_ONCE_INIT;

static int sb_create(BIO *b)
{
    BIO_set_init(b, 0);
    BIO_set_data(b, NULL);
    return 1;
}

static int sb_destroy(BIO *b)
{
    sockbio *s = BIO_get_data(b);

    if (s != NULL) {
        /* ciphertext only (encrypted records), no need to cleanse */
        free(s->in);
        free(s);
    }
    BIO_set_data(b, NULL);
    return 1;
}

static int hard_error(BIO *b, sockbio *s, int e)
{
    s->err = e;
    BIO_clear_retry_flags(b);
    ERR_raise_data(ERR_LIB_SYS, e, "anyio-asyncssl socket");
    return -1;
}

static int sb_read(BIO *b, char *out, size_t outl, size_t *readbytes)
{
    sockbio *s = BIO_get_data(b);
    ssize_t n;
    size_t k;

    *readbytes = 0;
    BIO_clear_retry_flags(b);
    if (outl == 0)
        return 0;
    if (s->in_len == 0) {
        if (s->eof)
            return 0;
        if (outl >= ASX_SOCKBIO_CAP) {
            /* a big read needs no buffer of ours */
            do
                n = recv(s->fd, out, outl, 0);
            while (n < 0 && errno == EINTR);
            s->recvs++;
            if (n > 0) {
                *readbytes = (size_t)n;
                return 1;
            }
        } else {
            if (s->in == NULL && (s->in = malloc(ASX_SOCKBIO_CAP)) == NULL) {
                ERR_raise(ERR_LIB_BIO, ERR_R_MALLOC_FAILURE);
                return -1;
            }
            do
                n = recv(s->fd, s->in, ASX_SOCKBIO_CAP, 0);
            while (n < 0 && errno == EINTR);
            s->recvs++;
            if (n > 0) {
                s->in_off = 0;
                s->in_len = (size_t)n;
            }
        }
        if (n == 0) {
            s->eof = 1;
            return 0;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                BIO_set_retry_read(b);
                return -1;
            }
            return hard_error(b, s, errno);
        }
    }
    k = s->in_len < outl ? s->in_len : outl;
    memcpy(out, s->in + s->in_off, k);
    s->in_off += k;
    s->in_len -= k;
    *readbytes = k;
    return 1;
}

static int sb_write(BIO *b, const char *data, size_t len, size_t *written)
{
    sockbio *s = BIO_get_data(b);
    ssize_t n;

    *written = 0;
    BIO_clear_retry_flags(b);
    if (len == 0)
        return 0;
    do
        n = send(s->fd, data, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    s->sends++;
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            BIO_set_retry_write(b);
            return -1;
        }
        return hard_error(b, s, errno);
    }
    *written = (size_t)n;
    return 1;
}

static long sb_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    sockbio *s = BIO_get_data(b);

    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_PENDING:
        return s == NULL ? 0 : (long)s->in_len;
    case BIO_CTRL_WPENDING:
        return 0;
    case BIO_CTRL_EOF:
        return s != NULL && s->eof && s->in_len == 0;
    case BIO_CTRL_FLUSH:
    case BIO_CTRL_PUSH:
    case BIO_CTRL_POP:
        return 1;
    default:
        return 0;
    }
}

static void method_init(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK
                                 | BIO_TYPE_DESCRIPTOR, "anyio-asyncssl socket");

    if (m == NULL || !BIO_meth_set_create(m, sb_create) || !BIO_meth_set_destroy(m, sb_destroy)
        || !BIO_meth_set_read_ex(m, sb_read) || !BIO_meth_set_write_ex(m, sb_write)
        || !BIO_meth_set_ctrl(m, sb_ctrl)) {
        BIO_meth_free(m);
        return;
    }
    g_method = m;
}

BIO *asx_sockbio_new(int fd, const unsigned char *prefix, size_t prefix_len)
{
    sockbio *s;
    BIO *b;

    pthread_once(&g_method_once, method_init);
    if (g_method == NULL) {
        ERR_raise_data(ERR_LIB_BIO, ERR_R_INIT_FAIL, "anyio-asyncssl socket BIO method");
        return NULL;
    }
    if ((s = calloc(1, sizeof(*s))) == NULL) {
        ERR_raise(ERR_LIB_BIO, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    s->fd = fd;
    if (prefix_len > 0) {
        if ((s->in = malloc(prefix_len > ASX_SOCKBIO_CAP ? prefix_len : ASX_SOCKBIO_CAP))
            == NULL) {
            free(s);
            ERR_raise(ERR_LIB_BIO, ERR_R_MALLOC_FAILURE);
            return NULL;
        }
        memcpy(s->in, prefix, prefix_len);
        s->in_len = prefix_len;
    }
    if ((b = BIO_new(g_method)) == NULL) {
        free(s->in);
        free(s);
        return NULL;
    }
    BIO_set_data(b, s);
    BIO_set_init(b, 1);
    return b;
}

/* after a step: give back the read buffer once it is empty */
void asx_sockbio_release_idle(BIO *b)
{
    sockbio *s = BIO_get_data(b);

    if (s != NULL && s->in_len == 0 && s->in != NULL) {
        free(s->in);
        s->in = NULL;
        s->in_off = 0;
    }
}

/* the bytes received but not read by libssl (unwrap: what followed close_notify) */
size_t asx_sockbio_take(BIO *b, unsigned char *out, size_t cap)
{
    sockbio *s = BIO_get_data(b);
    size_t k;

    if (s == NULL || s->in_len == 0)
        return 0;
    k = s->in_len < cap ? s->in_len : cap;
    memcpy(out, s->in + s->in_off, k);
    s->in_off += k;
    s->in_len -= k;
    return k;
}

/* the fd was closed by its owner: never touch that number again (EBADF) */
void asx_sockbio_forget(BIO *b)
{
    sockbio *s = BIO_get_data(b);

    if (s != NULL)
        s->fd = -1;
}

int asx_sockbio_errno(BIO *b)
{
    sockbio *s = BIO_get_data(b);

    return s == NULL ? 0 : s->err;
}

void asx_sockbio_counts(BIO *b, uint64_t *recvs, uint64_t *sends)
{
    sockbio *s = BIO_get_data(b);

    *recvs = s == NULL ? 0 : s->recvs;
    *sends = s == NULL ? 0 : s->sends;
}
