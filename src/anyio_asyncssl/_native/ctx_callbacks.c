/*
 * ctx_callbacks.c -- the handshake-time callbacks of an SSL_CTX (ALPN
 * select, SNI, keylog), in C, reading data Python prepared beforehand in an
 * asx_ctx_ext.
 *
 * Theory of operation
 * -------------------
 * libssl calls these during a handshake: inside asx_step(), which cffi
 * runs without the GIL, and possibly inside an async job on its 32 KiB
 * fibre stack.  No Python may run there (DESIGN rule 6), so everything they
 * need is prepared ahead, when the context is configured: the server's ALPN
 * list in wire format, the SNI names with a child SSL_CTX each (holding
 * their certificate, key and chain), the keylog file descriptor.
 * asx_ctx_attach() stores the extension in the SSL_CTX's ex_data (keylog
 * finds it there) and installs the callbacks.
 *
 * ALPN: the server's preference wins; no protocol in common is a fatal
 * no_application_protocol alert (RFC 7301).  SNI: exact names first, then
 * wildcards ("*.example.com" matches one label); an unknown name keeps the
 * default certificate; a match swaps only the certificate, key and chain
 * (see sni_cb).  Keylog: one writev() per line on an O_APPEND descriptor, so
 * lines from concurrent handshakes never interleave.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/uio.h>

#include "asyncssl.h"

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
    asx_libctx_reap();   /* called from Python, never inside SSL_CTX_free */
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
            asx_libctx_reap();
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

