/*
 * provider.c -- two in-process OpenSSL 3 providers, built with only
 * non-deprecated 3.0 API (-DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED).
 *
 * Theory of operation
 * -------------------
 * OpenSSL 4.0 has no ENGINEs and no custom METHODs, so private-key offload
 * is a provider.  Both providers are registered with
 * OSSL_PROVIDER_add_builtin() into a *private* OSSL_LIB_CTX (the default
 * library context, which the stdlib ssl module uses, is never touched) and
 * find their worker pool through a small registry keyed by that library
 * context.
 *
 * "asyncssl-offload": keymgmt RSA + EC, signature RSA + ECDSA, asym cipher
 *   RSA (TLS 1.2 static-RSA key exchange).  A key object wraps an *inner*
 *   key of the default provider (fetched with "provider=default").  Keys
 *   enter only through asx_wrap_key() (EVP_PKEY_todata -> EVP_PKEY_fromdata
 *   into our keymgmt); every other import is refused, so libcrypto never
 *   moves a foreign key into us, and our export() never hands out the private
 *   half, so the default provider can never sign with our key behind our
 *   back (EVP_DigestSignInit must then use our signature).  Only the
 *   signature and asym-cipher algorithms carry "asyncssl.sign=yes"; an
 *   SSL_CTX made with the property query "?asyncssl.sign=yes" prefers them
 *   without pulling libssl's group keymgmt fetches to us (that would drop
 *   the EC groups).  digest_sign hashes on the calling thread, then
 *   asx_run() signs inline or on a worker while the job pauses.
 *
 * test record-cipher provider (registered under any name):
 *   AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 with the property
 *   "asyncssl.cipher=yes", delegating to the default provider through an
 *   inner EVP_CIPHER_CTX.  Inside a job, update() with output and final()
 *   run on a worker and pause, so SSL_read, SSL_write and SSL_shutdown pause
 *   too (libssl fetches record ciphers with the SSL_CTX property query when
 *   the SSL_CTX is made: load the provider before).
 *
 * Everything here may run on a job's 32 KiB fibre stack: small frames only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/evp.h>
#include <openssl/err.h>
#include <openssl/async.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "asyncssl.h"

#if !defined(OPENSSL_NO_DEPRECATED) || OPENSSL_API_COMPAT < 30000
#error "build with -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED"
#endif

#define INNER_PROPQ "provider=default"
#define F(fn) ((void (*)(void))(fn))
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------ */
/* registry: library context -> pool, loaded providers                 */
/* ------------------------------------------------------------------ */
/* One entry per library context we installed into, in a linked list: no
 * fixed limit on how many Offloads a process makes.  Lookups happen when a
 * provider is initialised (not per operation), so a list is fast enough. */
#define MAX_LOADED 2          /* "default" and our offload provider */
typedef struct reg_entry reg_entry;
struct reg_entry {
    OSSL_LIB_CTX *libctx;
    asx_pool *pool;
    OSSL_PROVIDER *loaded[MAX_LOADED];
    reg_entry *next;
};
static reg_entry *g_reg;
static pthread_mutex_t g_reg_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread int tl_import_open;

/* under g_reg_mu; NULL when absent and !create, or out of memory */
static reg_entry *reg_find(OSSL_LIB_CTX *libctx, int create)
{
    reg_entry *e;

    for (e = g_reg; e != NULL; e = e->next)
        if (e->libctx == libctx)
            return e;
    if (!create)
        return NULL;
    if ((e = calloc(1, sizeof(*e))) == NULL) {
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    e->libctx = libctx;
    e->next = g_reg;
    g_reg = e;
    return e;
}

static asx_pool *reg_pool(OSSL_LIB_CTX *libctx)
{
    asx_pool *p = NULL;
    reg_entry *e;

    pthread_mutex_lock(&g_reg_mu);
    if ((e = reg_find(libctx, 0)) != NULL)
        p = e->pool;
    pthread_mutex_unlock(&g_reg_mu);
    return p;
}

static int reg_set_pool(OSSL_LIB_CTX *libctx, asx_pool *pool)
{
    reg_entry *e;

    pthread_mutex_lock(&g_reg_mu);
    e = reg_find(libctx, 1);
    if (e != NULL && e->pool != pool) {
        if (pool != NULL)
            asx_pool_ref(pool);
        if (e->pool != NULL)
            asx_pool_unref(e->pool);
        e->pool = pool;
    }
    pthread_mutex_unlock(&g_reg_mu);
    return e != NULL;
}

static int reg_remember(OSSL_LIB_CTX *libctx, OSSL_PROVIDER *prov)
{
    reg_entry *e;
    int j, ok = 0;

    pthread_mutex_lock(&g_reg_mu);
    if ((e = reg_find(libctx, 1)) != NULL)
        for (j = 0; j < MAX_LOADED && !ok; j++)
            if (e->loaded[j] == NULL) {
                e->loaded[j] = prov;
                ok = 1;
            }
    pthread_mutex_unlock(&g_reg_mu);
    if (!ok && e != NULL)
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INTERNAL_ERROR,
                       "anyio-asyncssl: more than %d providers loaded by us", MAX_LOADED);
    return ok;
}

void asx_unload_providers(OSSL_LIB_CTX *libctx)
{
    reg_entry **pp, *e = NULL;
    int j;

    pthread_mutex_lock(&g_reg_mu);
    for (pp = &g_reg; *pp != NULL; pp = &(*pp)->next)
        if ((*pp)->libctx == libctx) {
            e = *pp;
            *pp = e->next;
            break;
        }
    pthread_mutex_unlock(&g_reg_mu);
    if (e == NULL)
        return;
    for (j = MAX_LOADED - 1; j >= 0; j--)
        if (e->loaded[j] != NULL)
            OSSL_PROVIDER_unload(e->loaded[j]);
    if (e->pool != NULL)
        asx_pool_unref(e->pool);
    free(e);
}

/* ------------------------------------------------------------------ */
/* provider context                                                    */
/* ------------------------------------------------------------------ */
#define KIND_OFFLOAD 1
#define KIND_CIPHER 2
#define NCIPH 3

typedef struct {
    OSSL_LIB_CTX *libctx;
    asx_pool *pool;
    int kind;
    char km_props[96];        /* provider=NAME */
    char op_props[128];       /* provider=NAME,asyncssl.sign=yes / .cipher=yes */
    OSSL_ALGORITHM km_algs[3], sig_algs[3], asym_algs[2], ciph_algs[NCIPH + 1];
    EVP_CIPHER *inner_ciph[NCIPH];
} provctx;

static asx_pool *pool_of(provctx *p)
{
    /* the pool may be attached after the provider was loaded */
    if (p->pool == NULL)
        p->pool = reg_pool(p->libctx);
    return p->pool;
}

static int run(provctx *p, asx_req *q)
{
    asx_pool *pool = pool_of(p);

    if (pool == NULL)
        return q->fn(q);
    return asx_run(pool, q);
}

/* ------------------------------------------------------------------ */
/* keymgmt                                                             */
/* ------------------------------------------------------------------ */
#define KEY_RSA 1
#define KEY_EC 2

typedef struct {
    provctx *prov;
    int type;
    EVP_PKEY *inner;
    int has_priv;
} key;

static void *km_new(provctx *p, int type)
{
    key *k = OPENSSL_zalloc(sizeof(*k));

    if (k != NULL) {
        k->prov = p;
        k->type = type;
    }
    return k;
}
static void *km_rsa_new(void *p) { return km_new(p, KEY_RSA); }
static void *km_ec_new(void *p) { return km_new(p, KEY_EC); }

static void km_free(void *vk)
{
    key *k = vk;

    if (k != NULL) {
        EVP_PKEY_free(k->inner);
        OPENSSL_free(k);
    }
}

static int km_has(const void *vk, int selection)
{
    const key *k = vk;

    if (k == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) && k->inner == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !k->has_priv)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS) && k->type == KEY_EC && k->inner == NULL)
        return 0;
    return 1;
}

static int evp_selection(int selection)
{
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        return EVP_PKEY_KEYPAIR;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        return EVP_PKEY_PUBLIC_KEY;
    return EVP_PKEY_KEY_PARAMETERS;
}

static int km_import(void *vk, int selection, const OSSL_PARAM params[])
{
    key *k = vk;
    EVP_PKEY_CTX *pctx;
    EVP_PKEY *inner = NULL;
    int priv;

    /* only keys handed over by asx_wrap_key(): libcrypto must not move
     * foreign keys (peer public keys, other contexts' keys) into us */
    if (!tl_import_open)
        return 0;
    /* export_to_provider asks for SELECT_ALL even for public keys */
    priv = (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        && OSSL_PARAM_locate_const(params, k->type == KEY_RSA ? OSSL_PKEY_PARAM_RSA_D
                                                              : OSSL_PKEY_PARAM_PRIV_KEY) != NULL;
    pctx = EVP_PKEY_CTX_new_from_name(k->prov->libctx, k->type == KEY_RSA ? "RSA" : "EC",
                                      INNER_PROPQ);
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &inner,
                             evp_selection(priv ? selection
                                                : selection & ~OSSL_KEYMGMT_SELECT_PRIVATE_KEY),
                             (OSSL_PARAM *)params) <= 0) {
        EVP_PKEY_CTX_free(pctx);
        return 0;
    }
    EVP_PKEY_CTX_free(pctx);
    EVP_PKEY_free(k->inner);
    k->inner = inner;
    k->has_priv = priv;
    return 1;
}

static int km_export(void *vk, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    key *k = vk;
    OSSL_PARAM *params = NULL;
    int ret;

    if (k == NULL || k->inner == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        return 0;   /* non-exportable private key, like an HSM's */
    if (EVP_PKEY_todata(k->inner, evp_selection(selection), &params) <= 0)
        return 0;
    ret = cb(params, cbarg);
    OSSL_PARAM_free(params);
    return ret;
}

static const OSSL_PARAM rsa_key_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_D, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_FACTOR1, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_FACTOR2, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_EXPONENT1, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_EXPONENT2, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_COEFFICIENT1, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM ec_key_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_PRIV_KEY, NULL, 0),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_EC_INCLUDE_PUBLIC, NULL),
    OSSL_PARAM_END
};
static const OSSL_PARAM *km_rsa_types(int s) { (void)s; return rsa_key_types; }
static const OSSL_PARAM *km_ec_types(int s) { (void)s; return ec_key_types; }

/* public parameters forwarded from the inner key (never private ones) */
static const struct {
    const char *name;
    int types;
} km_forward[] = {
    { OSSL_PKEY_PARAM_BITS, KEY_RSA | KEY_EC },
    { OSSL_PKEY_PARAM_SECURITY_BITS, KEY_RSA | KEY_EC },
    { OSSL_PKEY_PARAM_MAX_SIZE, KEY_RSA | KEY_EC },
    { OSSL_PKEY_PARAM_DEFAULT_DIGEST, KEY_RSA | KEY_EC },
    { OSSL_PKEY_PARAM_GROUP_NAME, KEY_EC },
    { OSSL_PKEY_PARAM_RSA_N, KEY_RSA },
    { OSSL_PKEY_PARAM_RSA_E, KEY_RSA },
    { OSSL_PKEY_PARAM_PUB_KEY, KEY_EC },
    { OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, KEY_EC },
    { OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, KEY_EC },
};

static int km_get_params(void *vk, OSSL_PARAM params[])
{
    key *k = vk;
    OSSL_PARAM *p;
    size_t i;

    if (k == NULL || k->inner == NULL)
        return 0;
    for (p = params; p->key != NULL; p++)
        for (i = 0; i < NELEM(km_forward); i++) {
            OSSL_PARAM one[2];

            if ((km_forward[i].types & k->type) == 0 || strcmp(p->key, km_forward[i].name) != 0)
                continue;
            one[0] = *p;
            one[1] = OSSL_PARAM_construct_end();
            if (EVP_PKEY_get_params(k->inner, one) > 0)
                p->return_size = one[0].return_size;
            break;
        }
    return 1;
}

static const OSSL_PARAM km_rsa_gettable_tbl[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM km_ec_gettable_tbl[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM *km_rsa_gettable(void *p) { (void)p; return km_rsa_gettable_tbl; }
static const OSSL_PARAM *km_ec_gettable(void *p) { (void)p; return km_ec_gettable_tbl; }

static int km_match(const void *v1, const void *v2, int selection)
{
    const key *a = v1, *b = v2;

    if (a == NULL || b == NULL || a->inner == NULL || b->inner == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return EVP_PKEY_eq(a->inner, b->inner) == 1;
    if (selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS)
        return EVP_PKEY_parameters_eq(a->inner, b->inner) == 1;
    return 1;
}

static const char *km_rsa_query(int op) { (void)op; return "RSA"; }
static const char *km_ec_query(int op) { return op == OSSL_OP_SIGNATURE ? "ECDSA" : NULL; }

static const OSSL_DISPATCH rsa_keymgmt[] = {
    { OSSL_FUNC_KEYMGMT_NEW, F(km_rsa_new) },
    { OSSL_FUNC_KEYMGMT_FREE, F(km_free) },
    { OSSL_FUNC_KEYMGMT_HAS, F(km_has) },
    { OSSL_FUNC_KEYMGMT_IMPORT, F(km_import) },
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, F(km_rsa_types) },
    { OSSL_FUNC_KEYMGMT_EXPORT, F(km_export) },
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, F(km_rsa_types) },
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, F(km_get_params) },
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, F(km_rsa_gettable) },
    { OSSL_FUNC_KEYMGMT_MATCH, F(km_match) },
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, F(km_rsa_query) },
    { 0, NULL }
};
static const OSSL_DISPATCH ec_keymgmt[] = {
    { OSSL_FUNC_KEYMGMT_NEW, F(km_ec_new) },
    { OSSL_FUNC_KEYMGMT_FREE, F(km_free) },
    { OSSL_FUNC_KEYMGMT_HAS, F(km_has) },
    { OSSL_FUNC_KEYMGMT_IMPORT, F(km_import) },
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, F(km_ec_types) },
    { OSSL_FUNC_KEYMGMT_EXPORT, F(km_export) },
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, F(km_ec_types) },
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, F(km_get_params) },
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, F(km_ec_gettable) },
    { OSSL_FUNC_KEYMGMT_MATCH, F(km_match) },
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, F(km_ec_query) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* signature                                                           */
/* ------------------------------------------------------------------ */
typedef struct {
    provctx *prov;
    key *k;
    EVP_PKEY_CTX *inner;      /* EVP_PKEY_sign_init on k->inner */
    EVP_MD *md;
    EVP_MD_CTX *mdctx;        /* streaming (update/final) path only */
} sigctx;

static void *sig_newctx(void *p, const char *propq)
{
    sigctx *c = OPENSSL_zalloc(sizeof(*c));

    (void)propq;
    if (c != NULL)
        c->prov = p;
    return c;
}

static void sig_freectx(void *vc)
{
    sigctx *c = vc;

    if (c == NULL)
        return;
    EVP_PKEY_CTX_free(c->inner);
    EVP_MD_free(c->md);
    EVP_MD_CTX_free(c->mdctx);
    OPENSSL_free(c);
}

static void *sig_dupctx(void *vc)
{
    sigctx *c = vc, *d = OPENSSL_zalloc(sizeof(*d));

    if (d == NULL)
        return NULL;
    *d = *c;
    d->inner = NULL;
    d->md = NULL;
    d->mdctx = NULL;
    if ((c->inner != NULL && (d->inner = EVP_PKEY_CTX_dup(c->inner)) == NULL)
        || (c->md != NULL && !EVP_MD_up_ref(c->md))) {
        sig_freectx(d);
        return NULL;
    }
    d->md = c->md;
    if (c->mdctx != NULL
        && ((d->mdctx = EVP_MD_CTX_new()) == NULL || !EVP_MD_CTX_copy_ex(d->mdctx, c->mdctx))) {
        sig_freectx(d);
        return NULL;
    }
    return d;
}

static int sig_set_md(sigctx *c, const char *mdname)
{
    EVP_MD *md;

    if (mdname == NULL || *mdname == '\0')
        return 1;
    if ((md = EVP_MD_fetch(c->prov->libctx, mdname, INNER_PROPQ)) == NULL)
        return 0;
    EVP_MD_free(c->md);
    c->md = md;
    return 1;
}

static int sig_set_ctx_params(void *vc, const OSSL_PARAM params[])
{
    sigctx *c = vc;
    const OSSL_PARAM *p;

    if (params == NULL || params[0].key == NULL)
        return 1;
    if (c == NULL || c->inner == NULL)
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL) {
        const char *mdname = NULL;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &mdname) || !sig_set_md(c, mdname))
            return 0;
    }
    return EVP_PKEY_CTX_set_params(c->inner, params) > 0;
}

static int sig_get_ctx_params(void *vc, OSSL_PARAM params[])
{
    sigctx *c = vc;

    return c != NULL && c->inner != NULL && EVP_PKEY_CTX_get_params(c->inner, params) > 0;
}

static int sig_init(sigctx *c, void *keydata, const char *mdname, const OSSL_PARAM params[])
{
    key *k = keydata;

    if (k == NULL || k->inner == NULL || !k->has_priv) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_PASSED_INVALID_ARGUMENT,
                       "anyio-asyncssl offload: no private key");
        return 0;
    }
    c->k = k;
    EVP_PKEY_CTX_free(c->inner);
    c->inner = EVP_PKEY_CTX_new_from_pkey(c->prov->libctx, k->inner, INNER_PROPQ);
    if (c->inner == NULL || EVP_PKEY_sign_init(c->inner) <= 0)
        return 0;
    if (mdname != NULL) {
        OSSL_PARAM mdp[2];

        if (!sig_set_md(c, mdname))
            return 0;
        mdp[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, (char *)mdname, 0);
        mdp[1] = OSSL_PARAM_construct_end();
        if (EVP_PKEY_CTX_set_params(c->inner, mdp) <= 0)
            return 0;
    }
    EVP_MD_CTX_free(c->mdctx);
    c->mdctx = NULL;
    return sig_set_ctx_params(c, params);
}

static int sig_sign_init(void *vc, void *keydata, const OSSL_PARAM params[])
{
    return sig_init(vc, keydata, NULL, params);
}

static int sig_digest_sign_init(void *vc, const char *mdname, void *keydata,
                                const OSSL_PARAM params[])
{
    return sig_init(vc, keydata, (mdname == NULL || *mdname == '\0') ? "SHA256" : mdname,
                    params);
}

static int req_sign(asx_req *q)
{
    size_t l = q->outlen;
    int r = EVP_PKEY_sign(q->ctx, q->out, &l, q->in, q->inlen);

    q->outlen = l;
    return r;
}

static int sig_do_sign(sigctx *c, unsigned char *sig, size_t *siglen, size_t sigsize,
                       const unsigned char *dgst, size_t dlen)
{
    asx_req q;

    if (sig == NULL) {
        *siglen = (size_t)EVP_PKEY_get_size(c->k->inner);
        return *siglen > 0;
    }
    memset(&q, 0, sizeof(q));
    q.fn = req_sign;
    q.kind = ASX_REQ_SIGN;
    q.ctx = c->inner;
    q.out = sig;
    q.outlen = sigsize;
    q.in = dgst;
    q.inlen = dlen;
    if (run(c->prov, &q) <= 0)
        return 0;
    *siglen = q.outlen;
    return 1;
}

static int sig_sign(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    return sig_do_sign(vc, sig, siglen, sigsize, tbs, tbslen);
}

static int sig_digest_sign(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize,
                           const unsigned char *tbs, size_t tbslen)
{
    sigctx *c = vc;
    unsigned char dg[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;

    if (sig == NULL)
        return sig_do_sign(c, NULL, siglen, 0, NULL, 0);
    if (c->md == NULL || !EVP_Digest(tbs, tbslen, dg, &dl, c->md, NULL))
        return 0;
    return sig_do_sign(c, sig, siglen, sigsize, dg, dl);
}

static int sig_digest_sign_update(void *vc, const unsigned char *data, size_t len)
{
    sigctx *c = vc;

    if (c->mdctx == NULL
        && (c->md == NULL || (c->mdctx = EVP_MD_CTX_new()) == NULL
            || !EVP_DigestInit_ex2(c->mdctx, c->md, NULL)))
        return 0;
    return EVP_DigestUpdate(c->mdctx, data, len);
}

static int sig_digest_sign_final(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize)
{
    sigctx *c = vc;
    unsigned char dg[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;

    if (sig == NULL)
        return sig_do_sign(c, NULL, siglen, 0, NULL, 0);
    if (c->mdctx == NULL && !sig_digest_sign_update(c, NULL, 0))
        return 0;
    if (!EVP_DigestFinal_ex(c->mdctx, dg, &dl))
        return 0;
    return sig_do_sign(c, sig, siglen, sigsize, dg, dl);
}

static const OSSL_PARAM sig_rsa_settable_tbl[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM sig_ec_settable_tbl[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_size_t(OSSL_SIGNATURE_PARAM_DIGEST_SIZE, NULL),
    OSSL_PARAM_END
};
static const OSSL_PARAM sig_gettable_tbl[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM *sig_rsa_settable(void *c, void *p) { (void)c; (void)p; return sig_rsa_settable_tbl; }
static const OSSL_PARAM *sig_ec_settable(void *c, void *p) { (void)c; (void)p; return sig_ec_settable_tbl; }
static const OSSL_PARAM *sig_gettable(void *c, void *p) { (void)c; (void)p; return sig_gettable_tbl; }

#define SIG_COMMON                                                               \
    { OSSL_FUNC_SIGNATURE_NEWCTX, F(sig_newctx) },                               \
    { OSSL_FUNC_SIGNATURE_FREECTX, F(sig_freectx) },                             \
    { OSSL_FUNC_SIGNATURE_DUPCTX, F(sig_dupctx) },                               \
    { OSSL_FUNC_SIGNATURE_SIGN_INIT, F(sig_sign_init) },                         \
    { OSSL_FUNC_SIGNATURE_SIGN, F(sig_sign) },                                   \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, F(sig_digest_sign_init) },           \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN, F(sig_digest_sign) },                     \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, F(sig_digest_sign_update) },       \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, F(sig_digest_sign_final) },         \
    { OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, F(sig_set_ctx_params) },               \
    { OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, F(sig_get_ctx_params) },               \
    { OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, F(sig_gettable) }

static const OSSL_DISPATCH rsa_signature[] = {
    SIG_COMMON,
    { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, F(sig_rsa_settable) },
    { 0, NULL }
};
static const OSSL_DISPATCH ecdsa_signature[] = {
    SIG_COMMON,
    { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, F(sig_ec_settable) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* asym cipher: RSA decrypt (TLS 1.2 static-RSA key exchange)          */
/* ------------------------------------------------------------------ */
typedef struct {
    provctx *prov;
    key *k;
    EVP_PKEY_CTX *inner;
} asymctx;

static void *asym_newctx(void *p)
{
    asymctx *c = OPENSSL_zalloc(sizeof(*c));

    if (c != NULL)
        c->prov = p;
    return c;
}

static void asym_freectx(void *vc)
{
    asymctx *c = vc;

    if (c != NULL) {
        EVP_PKEY_CTX_free(c->inner);
        OPENSSL_free(c);
    }
}

static int asym_set_ctx_params(void *vc, const OSSL_PARAM params[])
{
    asymctx *c = vc;

    if (params == NULL || params[0].key == NULL)
        return 1;
    return c != NULL && c->inner != NULL && EVP_PKEY_CTX_set_params(c->inner, params) > 0;
}

static int asym_get_ctx_params(void *vc, OSSL_PARAM params[])
{
    asymctx *c = vc;

    return c != NULL && c->inner != NULL && EVP_PKEY_CTX_get_params(c->inner, params) > 0;
}

static int asym_decrypt_init(void *vc, void *keydata, const OSSL_PARAM params[])
{
    asymctx *c = vc;
    key *k = keydata;

    if (k == NULL || k->inner == NULL || !k->has_priv)
        return 0;
    c->k = k;
    EVP_PKEY_CTX_free(c->inner);
    c->inner = EVP_PKEY_CTX_new_from_pkey(c->prov->libctx, k->inner, INNER_PROPQ);
    if (c->inner == NULL || EVP_PKEY_decrypt_init(c->inner) <= 0)
        return 0;
    return asym_set_ctx_params(c, params);
}

static int req_decrypt(asx_req *q)
{
    size_t l = q->outlen;
    int r = EVP_PKEY_decrypt(q->ctx, q->out, &l, q->in, q->inlen);

    q->outlen = l;
    return r;
}

static int asym_decrypt(void *vc, unsigned char *out, size_t *outlen, size_t outsize,
                        const unsigned char *in, size_t inlen)
{
    asymctx *c = vc;
    asx_req q;

    if (out == NULL) {
        *outlen = (size_t)EVP_PKEY_get_size(c->k->inner);
        return 1;
    }
    memset(&q, 0, sizeof(q));
    q.fn = req_decrypt;
    q.kind = ASX_REQ_DECRYPT;
    q.ctx = c->inner;
    q.out = out;
    q.outlen = outsize;
    q.in = in;
    q.inlen = inlen;
    if (run(c->prov, &q) <= 0)
        return 0;
    *outlen = q.outlen;
    return 1;
}

static const OSSL_PARAM asym_settable_tbl[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, NULL),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, NULL),
    OSSL_PARAM_END
};
static const OSSL_PARAM asym_gettable_tbl[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_END
};
static const OSSL_PARAM *asym_settable(void *c, void *p) { (void)c; (void)p; return asym_settable_tbl; }
static const OSSL_PARAM *asym_gettable(void *c, void *p) { (void)c; (void)p; return asym_gettable_tbl; }

static const OSSL_DISPATCH rsa_asym_cipher[] = {
    { OSSL_FUNC_ASYM_CIPHER_NEWCTX, F(asym_newctx) },
    { OSSL_FUNC_ASYM_CIPHER_FREECTX, F(asym_freectx) },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, F(asym_decrypt_init) },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT, F(asym_decrypt) },
    { OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, F(asym_set_ctx_params) },
    { OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, F(asym_settable) },
    { OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, F(asym_get_ctx_params) },
    { OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, F(asym_gettable) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* test record ciphers                                                 */
/* ------------------------------------------------------------------ */
static const struct {
    const char *names;
    const char *inner;
} cipher_names[NCIPH] = {
    { "AES-128-GCM:id-aes128-GCM:2.16.840.1.101.3.4.1.6", "AES-128-GCM" },
    { "AES-256-GCM:id-aes256-GCM:2.16.840.1.101.3.4.1.46", "AES-256-GCM" },
    { "ChaCha20-Poly1305", "ChaCha20-Poly1305" },
};

static uint64_t g_cipher_in_job, g_cipher_paused;
static int g_cipher_pause = 1;

void asx_cipher_counts(uint64_t *in_job, uint64_t *paused)
{
    *in_job = __atomic_load_n(&g_cipher_in_job, __ATOMIC_RELAXED);
    *paused = __atomic_load_n(&g_cipher_paused, __ATOMIC_RELAXED);
}

void asx_set_cipher_pause(int on) { __atomic_store_n(&g_cipher_pause, on, __ATOMIC_RELAXED); }

typedef struct {
    provctx *prov;
    int idx;
    EVP_CIPHER_CTX *inner;
} cipherctx;

static void *c_newctx(provctx *p, int idx)
{
    cipherctx *c = OPENSSL_zalloc(sizeof(*c));

    if (c == NULL || p->inner_ciph[idx] == NULL || (c->inner = EVP_CIPHER_CTX_new()) == NULL
        || !EVP_CipherInit_ex2(c->inner, p->inner_ciph[idx], NULL, NULL, 1, NULL)) {
        if (c != NULL)
            EVP_CIPHER_CTX_free(c->inner);
        OPENSSL_free(c);
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

    if (d == NULL)
        return NULL;
    *d = *c;
    if ((d->inner = EVP_CIPHER_CTX_new()) == NULL || !EVP_CIPHER_CTX_copy(d->inner, c->inner)) {
        EVP_CIPHER_CTX_free(d->inner);
        OPENSSL_free(d);
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
    asx_req q;
    int r;

    memset(&q, 0, sizeof(q));
    q.fn = fn;
    q.kind = ASX_REQ_CIPHER;
    q.ctx = c->inner;
    q.out = out;
    q.in = in;
    q.inlen = inl;
    if (ASYNC_get_current_job() != NULL) {
        __atomic_add_fetch(&g_cipher_in_job, 1, __ATOMIC_RELAXED);
        if (pausable && __atomic_load_n(&g_cipher_pause, __ATOMIC_RELAXED)) {
            __atomic_add_fetch(&g_cipher_paused, 1, __ATOMIC_RELAXED);
            r = run(c->prov, &q);
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

#define CIPHER_FUNCS(i)                                                          \
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
        { OSSL_FUNC_CIPHER_NEWCTX, F(c_newctx_##i) },                            \
        { OSSL_FUNC_CIPHER_FREECTX, F(c_freectx) },                              \
        { OSSL_FUNC_CIPHER_DUPCTX, F(c_dupctx) },                                \
        { OSSL_FUNC_CIPHER_ENCRYPT_INIT, F(c_einit) },                           \
        { OSSL_FUNC_CIPHER_DECRYPT_INIT, F(c_dinit) },                           \
        { OSSL_FUNC_CIPHER_UPDATE, F(c_update) },                                \
        { OSSL_FUNC_CIPHER_FINAL, F(c_final) },                                  \
        { OSSL_FUNC_CIPHER_CIPHER, F(c_cipher) },                                \
        { OSSL_FUNC_CIPHER_GET_PARAMS, F(c_get_params_##i) },                    \
        { OSSL_FUNC_CIPHER_GETTABLE_PARAMS, F(c_gettable_##i) },                 \
        { OSSL_FUNC_CIPHER_GET_CTX_PARAMS, F(c_get_ctx_params) },                \
        { OSSL_FUNC_CIPHER_SET_CTX_PARAMS, F(c_set_ctx_params) },                \
        { OSSL_FUNC_CIPHER_GETTABLE_CTX_PARAMS, F(c_gettable_ctx_##i) },         \
        { OSSL_FUNC_CIPHER_SETTABLE_CTX_PARAMS, F(c_settable_ctx_##i) },         \
        { 0, NULL }                                                              \
    };
CIPHER_FUNCS(0)
CIPHER_FUNCS(1)
CIPHER_FUNCS(2)
static const OSSL_DISPATCH *const cipher_tables[NCIPH] = { cipher_0, cipher_1, cipher_2 };

/* ------------------------------------------------------------------ */
/* provider entry points                                               */
/* ------------------------------------------------------------------ */
static const OSSL_ALGORITHM *prov_query(void *vp, int op, int *no_cache)
{
    provctx *p = vp;

    *no_cache = 0;
    if (p->kind == KIND_OFFLOAD) {
        if (op == OSSL_OP_KEYMGMT)
            return p->km_algs;
        if (op == OSSL_OP_SIGNATURE)
            return p->sig_algs;
        if (op == OSSL_OP_ASYM_CIPHER)
            return p->asym_algs;
    } else if (op == OSSL_OP_CIPHER) {
        return p->ciph_algs;
    }
    return NULL;
}

static void prov_teardown(void *vp)
{
    provctx *p = vp;
    int i;

    for (i = 0; i < NCIPH; i++)
        EVP_CIPHER_free(p->inner_ciph[i]);
    OPENSSL_free(p);
}

static const OSSL_DISPATCH prov_dispatch[] = {
    { OSSL_FUNC_PROVIDER_TEARDOWN, F(prov_teardown) },
    { OSSL_FUNC_PROVIDER_QUERY_OPERATION, F(prov_query) },
    { 0, NULL }
};

static int prov_init(int kind, const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                     const OSSL_DISPATCH **out, void **vp)
{
    OSSL_FUNC_core_get_libctx_fn *get_libctx = NULL;
    OSSL_FUNC_core_get_params_fn *get_params = NULL;
    const char *name = NULL;
    OSSL_PARAM req[2];
    provctx *p;
    int i;

    for (; in->function_id != 0; in++) {
        if (in->function_id == OSSL_FUNC_CORE_GET_LIBCTX)
            get_libctx = OSSL_FUNC_core_get_libctx(in);
        else if (in->function_id == OSSL_FUNC_CORE_GET_PARAMS)
            get_params = OSSL_FUNC_core_get_params(in);
    }
    if (get_libctx == NULL || get_params == NULL)
        return 0;
    req[0] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_CORE_PROV_NAME, (char **)&name, 0);
    req[1] = OSSL_PARAM_construct_end();
    if (!get_params(handle, req) || name == NULL)
        return 0;
    if ((p = OPENSSL_zalloc(sizeof(*p))) == NULL)
        return 0;
    /* a builtin provider shares this libcrypto: the core's library context
     * is the OSSL_LIB_CTX we were loaded into */
    p->libctx = (OSSL_LIB_CTX *)get_libctx(handle);
    p->kind = kind;
    p->pool = reg_pool(p->libctx);
    snprintf(p->km_props, sizeof(p->km_props), "provider=%s", name);
    if (kind == KIND_OFFLOAD) {
        /* user-defined property names need a '.' (property_parse.c) */
        snprintf(p->op_props, sizeof(p->op_props), "provider=%s,asyncssl.sign=yes", name);
        p->km_algs[0] = (OSSL_ALGORITHM){ "RSA:rsaEncryption:1.2.840.113549.1.1.1", p->km_props,
                                          rsa_keymgmt, "anyio-asyncssl offload RSA" };
        p->km_algs[1] = (OSSL_ALGORITHM){ "EC:id-ecPublicKey:1.2.840.10045.2.1", p->km_props,
                                          ec_keymgmt, "anyio-asyncssl offload EC" };
        p->sig_algs[0] = (OSSL_ALGORITHM){ "RSA:rsaEncryption:1.2.840.113549.1.1.1", p->op_props,
                                           rsa_signature, "anyio-asyncssl offload RSA signature" };
        p->sig_algs[1] = (OSSL_ALGORITHM){ "ECDSA", p->op_props, ecdsa_signature,
                                           "anyio-asyncssl offload ECDSA" };
        p->asym_algs[0] = (OSSL_ALGORITHM){ "RSA:rsaEncryption:1.2.840.113549.1.1.1", p->op_props,
                                            rsa_asym_cipher, "anyio-asyncssl offload RSA decrypt" };
    } else {
        int a = 0;

        snprintf(p->op_props, sizeof(p->op_props), "provider=%s,asyncssl.cipher=yes", name);
        pthread_mutex_lock(&g_const_mu);
        for (i = 0; i < NCIPH; i++)
            if (g_const_ciph[i] == NULL)
                g_const_ciph[i] = EVP_CIPHER_fetch(p->libctx, cipher_names[i].inner, INNER_PROPQ);
        pthread_mutex_unlock(&g_const_mu);
        for (i = 0; i < NCIPH; i++) {
            p->inner_ciph[i] = EVP_CIPHER_fetch(p->libctx, cipher_names[i].inner, INNER_PROPQ);
            if (p->inner_ciph[i] == NULL || g_const_ciph[i] == NULL)
                continue;
            p->ciph_algs[a++] = (OSSL_ALGORITHM){ cipher_names[i].names, p->op_props,
                                                  cipher_tables[i], "anyio-asyncssl test cipher" };
        }
    }
    *out = prov_dispatch;
    *vp = p;
    return 1;
}

static int offload_init(const OSSL_CORE_HANDLE *h, const OSSL_DISPATCH *in,
                        const OSSL_DISPATCH **out, void **vp)
{
    return prov_init(KIND_OFFLOAD, h, in, out, vp);
}

static int cipher_init(const OSSL_CORE_HANDLE *h, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **vp)
{
    return prov_init(KIND_CIPHER, h, in, out, vp);
}

static int load(OSSL_LIB_CTX *libctx, const char *name)
{
    OSSL_PROVIDER *prov = OSSL_PROVIDER_load(libctx, name);

    if (prov == NULL)
        return 0;
    if (!reg_remember(libctx, prov)) {
        OSSL_PROVIDER_unload(prov);
        return 0;
    }
    return 1;
}

int asx_install_offload(OSSL_LIB_CTX *libctx, asx_pool *pool)
{
    /* once any provider is loaded explicitly the default is not auto-loaded */
    if (!reg_set_pool(libctx, pool) || !load(libctx, "default"))
        return 0;
    if (!OSSL_PROVIDER_add_builtin(libctx, ASX_OFFLOAD_PROVIDER, offload_init))
        return 0;
    return load(libctx, ASX_OFFLOAD_PROVIDER);
}

int asx_register_test_provider(OSSL_LIB_CTX *libctx, const char *name, asx_pool *pool)
{
    if (pool != NULL && !reg_set_pool(libctx, pool))
        return 0;
    return OSSL_PROVIDER_add_builtin(libctx, name, cipher_init);
}

EVP_PKEY *asx_wrap_key(OSSL_LIB_CTX *libctx, EVP_PKEY *in)
{
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    EVP_PKEY *out = NULL;
    const char *type = EVP_PKEY_get0_type_name(in);

    if (type == NULL || (strcmp(type, "RSA") != 0 && strcmp(type, "EC") != 0)) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_UNSUPPORTED,
                       "anyio-asyncssl offload supports RSA and EC keys, not %s",
                       type ? type : "(unknown)");
        return NULL;
    }
    if (EVP_PKEY_todata(in, EVP_PKEY_KEYPAIR, &params) <= 0)
        return NULL;
    pctx = EVP_PKEY_CTX_new_from_name(libctx, type, "provider=" ASX_OFFLOAD_PROVIDER);
    tl_import_open = 1;
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &out, EVP_PKEY_KEYPAIR, params) <= 0)
        out = NULL;
    tl_import_open = 0;
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
    return out;
}

const char *asx_pkey_provider_name(const EVP_PKEY *pkey)
{
    const OSSL_PROVIDER *p = pkey == NULL ? NULL : EVP_PKEY_get0_provider(pkey);

    return p == NULL ? "" : OSSL_PROVIDER_get0_name(p);
}

/* after fork(), in the child: a thread of the parent may have held a lock */
void asx_providers_after_fork_child(void)
{
    pthread_mutex_init(&g_reg_mu, NULL);
    pthread_mutex_init(&g_const_mu, NULL);
}
