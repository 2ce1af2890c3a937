/*
 * test_provider.c -- the test record-cipher provider (registered under any
 * name by asx_register_test_provider), an OpenSSL 3 provider that makes
 * SSL_read, SSL_write and SSL_shutdown pause the way the handshake's
 * private-key operation does, so the test engine can pause all four
 * operations.
 *
 * Theory of operation
 * -------------------
 * It offers AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305 with the property
 * "asyncssl.cipher=yes", delegating to the default provider through an
 * inner EVP_CIPHER_CTX.  Inside a job, update() with output and final() run
 * on a worker and pause (asx_provctx_run, pool.c), so SSL_read, SSL_write
 * and SSL_shutdown pause too.  libssl fetches record ciphers with the
 * SSL_CTX property query when the SSL_CTX is made: load the provider
 * before.  asx_set_cipher_pause(0) keeps computing inline (the counters
 * still count calls made inside a job).
 *
 * The algorithm-level queries (get_params, gettable) have no provider
 * context, so they answer from EVP_CIPHERs fetched once per process (from
 * the first library context that loads this provider); each provider
 * context fetches its own for the operations.  A cipher that cannot be
 * fetched fails the provider's init with an error naming it: no cipher is
 * dropped from the table silently.
 *
 * The cipher operations are pass-throughs: when the inner cipher answers 0
 * (a record that does not authenticate), the answer is passed on as it is,
 * and libssl raises its own error (bad record MAC) as it does for the
 * default provider.  The refusals that are ours (no memory, no inner
 * cipher) raise.
 *
 * Everything here may run on a job's 32 KiB fibre stack: small frames only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/evp.h>
#include <openssl/async.h>
#include <pthread.h>
#include <string.h>

#include "providers.h"

#define NCIPH 3

static const struct {
    const char *names;
    const char *inner;
} cipher_names[NCIPH] = {
    { "AES-128-GCM:id-aes128-GCM:2.16.840.1.101.3.4.1.6", "AES-128-GCM" },
    { "AES-256-GCM:id-aes256-GCM:2.16.840.1.101.3.4.1.46", "AES-256-GCM" },
    { "ChaCha20-Poly1305", "ChaCha20-Poly1305" },
};

typedef struct {
    asx_provctx base;
    OSSL_ALGORITHM ciph_algs[NCIPH + 1];
    EVP_CIPHER *inner_ciph[NCIPH];
} testprov_ctx;

static uint64_t g_cipher_in_job, g_cipher_paused;
static int g_cipher_pause = 1;

void asx_cipher_counts(uint64_t *in_job, uint64_t *paused)
{
    *in_job = __atomic_load_n(&g_cipher_in_job, __ATOMIC_RELAXED);
    *paused = __atomic_load_n(&g_cipher_paused, __ATOMIC_RELAXED);
}

void asx_set_cipher_pause(int on) { __atomic_store_n(&g_cipher_pause, on, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------------ */
/* cipher operations                                                   */
/* ------------------------------------------------------------------ */
typedef struct {
    testprov_ctx *prov;
    int idx;
    EVP_CIPHER_CTX *inner;
} cipherctx;

static OSSL_FUNC_cipher_freectx_fn c_freectx;
static OSSL_FUNC_cipher_dupctx_fn c_dupctx;
static OSSL_FUNC_cipher_encrypt_init_fn c_einit;
static OSSL_FUNC_cipher_decrypt_init_fn c_dinit;
static OSSL_FUNC_cipher_update_fn c_update;
static OSSL_FUNC_cipher_final_fn c_final;
static OSSL_FUNC_cipher_cipher_fn c_cipher;
static OSSL_FUNC_cipher_get_ctx_params_fn c_get_ctx_params;
static OSSL_FUNC_cipher_set_ctx_params_fn c_set_ctx_params;

static void *c_newctx(testprov_ctx *p, int idx)
{
    cipherctx *c = OPENSSL_zalloc(sizeof(*c));

    if (c == NULL || (c->inner = EVP_CIPHER_CTX_new()) == NULL) {
        OPENSSL_free(c);
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    if (!EVP_CipherInit_ex2(c->inner, p->inner_ciph[idx], NULL, NULL, 1, NULL)) {
        EVP_CIPHER_CTX_free(c->inner);
        OPENSSL_free(c);
        ERR_raise_data(ERR_LIB_PROV, PROV_R_CIPHER_OPERATION_FAILED,
                       "anyio-asyncssl test cipher: %s", cipher_names[idx].inner);
        return NULL;
    }
    c->prov = p;
    c->idx = idx;
    return c;
}

static void c_freectx(void *vc)
{
    cipherctx *c = vc;

    if (c != NULL) {
        EVP_CIPHER_CTX_free(c->inner);
        OPENSSL_free(c);
    }
}

static void *c_dupctx(void *vc)
{
    cipherctx *c = vc, *d = OPENSSL_zalloc(sizeof(*d));

    if (d == NULL) {
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    *d = *c;
    if ((d->inner = EVP_CIPHER_CTX_new()) == NULL || !EVP_CIPHER_CTX_copy(d->inner, c->inner)) {
        EVP_CIPHER_CTX_free(d->inner);
        OPENSSL_free(d);
        ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                       "anyio-asyncssl test cipher: could not copy a cipher context");
        return NULL;
    }
    return d;
}

static int c_einit(void *vc, const unsigned char *k, size_t kl, const unsigned char *iv,
                   size_t ivl, const OSSL_PARAM params[])
{
    (void)kl; (void)ivl;
    return EVP_CipherInit_ex2(((cipherctx *)vc)->inner, NULL, k, iv, 1, params);
}

static int c_dinit(void *vc, const unsigned char *k, size_t kl, const unsigned char *iv,
                   size_t ivl, const OSSL_PARAM params[])
{
    (void)kl; (void)ivl;
    return EVP_CipherInit_ex2(((cipherctx *)vc)->inner, NULL, k, iv, 0, params);
}

static int req_update(asx_req *q)
{
    int l = 0;
    int r = EVP_CipherUpdate(q->ctx, q->out, &l, q->in, (int)q->inlen);

    q->outlen = (size_t)l;
    return r;
}

static int req_final(asx_req *q)
{
    int l = 0;
    int r = EVP_CipherFinal_ex(q->ctx, q->out, &l);

    q->outlen = (size_t)l;
    return r;
}

static int c_run(cipherctx *c, int (*fn)(asx_req *), unsigned char *out, size_t *outl,
                 const unsigned char *in, size_t inl, int pausable)
{
    asx_req q = { .fn = fn, .kind = ASX_REQ_CIPHER, .ctx = c->inner, .out = out, .in = in,
                  .inlen = inl };
    int r;

    if (ASYNC_get_current_job() != NULL) {
        __atomic_add_fetch(&g_cipher_in_job, 1, __ATOMIC_RELAXED);
        if (pausable && __atomic_load_n(&g_cipher_pause, __ATOMIC_RELAXED)) {
            __atomic_add_fetch(&g_cipher_paused, 1, __ATOMIC_RELAXED);
            r = asx_provctx_run(&c->prov->base, &q);
        } else {
            r = fn(&q);
        }
    } else {
        r = fn(&q);
    }
    if (r > 0)
        *outl = q.outlen;
    return r > 0;
}

static int c_update(void *vc, unsigned char *out, size_t *outl, size_t outsize,
                    const unsigned char *in, size_t inl)
{
    (void)outsize;
    /* only updates that produce record payload pause (not the AAD) */
    return c_run(vc, req_update, out, outl, in, inl, out != NULL && inl > 0);
}

static int c_final(void *vc, unsigned char *out, size_t *outl, size_t outsize)
{
    (void)outsize;
    return c_run(vc, req_final, out, outl, NULL, 0, 1);
}

static int c_cipher(void *vc, unsigned char *out, size_t *outl, size_t outsize,
                    const unsigned char *in, size_t inl)
{
    int r = EVP_Cipher(((cipherctx *)vc)->inner, out, in, (unsigned int)inl);

    (void)outsize;
    if (r < 0)
        return 0;
    *outl = (size_t)r;
    return 1;
}

static int c_get_ctx_params(void *vc, OSSL_PARAM params[])
{
    return EVP_CIPHER_CTX_get_params(((cipherctx *)vc)->inner, params);
}

static int c_set_ctx_params(void *vc, const OSSL_PARAM params[])
{
    return EVP_CIPHER_CTX_set_params(((cipherctx *)vc)->inner, params);
}

/* algorithm-level queries need the default provider's EVP_CIPHER without a
 * provider context; these are fetched once per process (default libctx
 * objects are not used: they come from the first registering libctx) */
static EVP_CIPHER *g_const_ciph[NCIPH];
static pthread_mutex_t g_const_mu = PTHREAD_MUTEX_INITIALIZER;

void asx_test_provider_after_fork_child(void)
{
    pthread_mutex_init(&g_const_mu, NULL);
}

/* one dispatch table per cipher: get_params and the gettables take no
 * cipher context, so they know their cipher by their function */
#define CIPHER_FUNCS(i)                                                          \
    static OSSL_FUNC_cipher_newctx_fn c_newctx_##i;                              \
    static OSSL_FUNC_cipher_get_params_fn c_get_params_##i;                      \
    static OSSL_FUNC_cipher_gettable_params_fn c_gettable_##i;                   \
    static OSSL_FUNC_cipher_gettable_ctx_params_fn c_gettable_ctx_##i;           \
    static OSSL_FUNC_cipher_settable_ctx_params_fn c_settable_ctx_##i;           \
    static void *c_newctx_##i(void *p) { return c_newctx(p, i); }                \
    static int c_get_params_##i(OSSL_PARAM params[])                             \
    { return EVP_CIPHER_get_params(g_const_ciph[i], params); }                   \
    static const OSSL_PARAM *c_gettable_##i(void *p)                             \
    { (void)p; return EVP_CIPHER_gettable_params(g_const_ciph[i]); }             \
    static const OSSL_PARAM *c_gettable_ctx_##i(void *c, void *p)                \
    { (void)c; (void)p; return EVP_CIPHER_gettable_ctx_params(g_const_ciph[i]); } \
    static const OSSL_PARAM *c_settable_ctx_##i(void *c, void *p)                \
    { (void)c; (void)p; return EVP_CIPHER_settable_ctx_params(g_const_ciph[i]); } \
    static const OSSL_DISPATCH cipher_##i[] = {                                  \
        { OSSL_FUNC_CIPHER_NEWCTX, ASX_FN(c_newctx_##i) },                       \
        { OSSL_FUNC_CIPHER_FREECTX, ASX_FN(c_freectx) },                         \
        { OSSL_FUNC_CIPHER_DUPCTX, ASX_FN(c_dupctx) },                           \
        { OSSL_FUNC_CIPHER_ENCRYPT_INIT, ASX_FN(c_einit) },                      \
        { OSSL_FUNC_CIPHER_DECRYPT_INIT, ASX_FN(c_dinit) },                      \
        { OSSL_FUNC_CIPHER_UPDATE, ASX_FN(c_update) },                           \
        { OSSL_FUNC_CIPHER_FINAL, ASX_FN(c_final) },                             \
        { OSSL_FUNC_CIPHER_CIPHER, ASX_FN(c_cipher) },                           \
        { OSSL_FUNC_CIPHER_GET_PARAMS, ASX_FN(c_get_params_##i) },               \
        { OSSL_FUNC_CIPHER_GETTABLE_PARAMS, ASX_FN(c_gettable_##i) },            \
        { OSSL_FUNC_CIPHER_GET_CTX_PARAMS, ASX_FN(c_get_ctx_params) },           \
        { OSSL_FUNC_CIPHER_SET_CTX_PARAMS, ASX_FN(c_set_ctx_params) },           \
        { OSSL_FUNC_CIPHER_GETTABLE_CTX_PARAMS, ASX_FN(c_gettable_ctx_##i) },    \
        { OSSL_FUNC_CIPHER_SETTABLE_CTX_PARAMS, ASX_FN(c_settable_ctx_##i) },    \
        { 0, NULL }                                                              \
    };
CIPHER_FUNCS(0)
CIPHER_FUNCS(1)
CIPHER_FUNCS(2)
static const OSSL_DISPATCH *const cipher_tables[NCIPH] = { cipher_0, cipher_1, cipher_2 };

/* ------------------------------------------------------------------ */
/* the provider                                                        */
/* ------------------------------------------------------------------ */
static OSSL_FUNC_provider_query_operation_fn testprov_query;
static OSSL_FUNC_provider_teardown_fn testprov_teardown;
static OSSL_provider_init_fn testprov_init;

static const OSSL_ALGORITHM *testprov_query(void *vp, int op, int *no_cache)
{
    testprov_ctx *p = vp;

    *no_cache = 0;
    return op == OSSL_OP_CIPHER ? p->ciph_algs : NULL;   /* NULL: nothing else */
}

static void testprov_teardown(void *vp)
{
    testprov_ctx *p = vp;
    int i;

    for (i = 0; i < NCIPH; i++)
        EVP_CIPHER_free(p->inner_ciph[i]);
    OPENSSL_free(p);
}

static const OSSL_DISPATCH testprov_dispatch[] = {
    { OSSL_FUNC_PROVIDER_TEARDOWN, ASX_FN(testprov_teardown) },
    { OSSL_FUNC_PROVIDER_QUERY_OPERATION, ASX_FN(testprov_query) },
    { 0, NULL }
};

static int testprov_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                         const OSSL_DISPATCH **out, void **vp)
{
    testprov_ctx *p = asx_provctx_new(sizeof(*p), handle, in, "asyncssl.cipher=yes");
    int i, missing = -1;

    if (p == NULL)
        return 0;
    pthread_mutex_lock(&g_const_mu);
    for (i = 0; i < NCIPH; i++)
        if (g_const_ciph[i] == NULL)
            g_const_ciph[i] = EVP_CIPHER_fetch(p->base.libctx, cipher_names[i].inner,
                                               ASX_INNER_PROPQ);
    for (i = 0; i < NCIPH && missing < 0; i++)
        if (g_const_ciph[i] == NULL)
            missing = i;
    pthread_mutex_unlock(&g_const_mu);
    for (i = 0; i < NCIPH && missing < 0; i++) {
        p->inner_ciph[i] = EVP_CIPHER_fetch(p->base.libctx, cipher_names[i].inner,
                                            ASX_INNER_PROPQ);
        if (p->inner_ciph[i] == NULL)
            missing = i;
        p->ciph_algs[i] = (OSSL_ALGORITHM){ cipher_names[i].names, p->base.op_props,
                                            cipher_tables[i], "anyio-asyncssl test cipher" };
    }
    if (missing >= 0) {
        ERR_raise_data(ERR_LIB_PROV, PROV_R_UNABLE_TO_FIND_CIPHERS,
                       "anyio-asyncssl test cipher provider: the default provider has no %s",
                       cipher_names[missing].inner);
        testprov_teardown(p);
        return 0;
    }
    *out = testprov_dispatch;
    *vp = p;
    return 1;
}

int asx_register_test_provider(OSSL_LIB_CTX *libctx, const char *name, asx_pool *pool)
{
    if (pool != NULL && !asx_registry_set_pool(libctx, pool))
        return 0;
    if (!OSSL_PROVIDER_add_builtin(libctx, name, testprov_init)) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INIT_FAIL,
                       "anyio-asyncssl: could not register the test provider %s", name);
        return 0;
    }
    return 1;
}
