/*
 * provider_core.c -- what our two in-process OpenSSL 3 providers share: the
 * registry that finds a library context's worker pool, the provider context
 * both start with, and unloading.  Built with only non-deprecated 3.0 API
 * (-DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED).
 *
 * Theory of operation
 * -------------------
 * OpenSSL 4.0 has no ENGINEs and no custom METHODs, so private-key offload
 * is a provider.  Both providers (offload_provider.c, test_provider.c) are
 * registered with OSSL_PROVIDER_add_builtin() into a *private* OSSL_LIB_CTX
 * (the default library context, which the stdlib ssl module uses, is never
 * touched) and find their worker pool through a small registry keyed by
 * that library context.
 *
 * The registry holds one entry per library context we installed into, in a
 * linked list: there is no fixed limit on how many Offloads a process makes.
 * Lookups happen when a provider is initialised (not per operation), so a
 * list is fast enough.  An entry also remembers the providers we loaded into
 * its library context, so asx_unload_providers() unloads exactly those
 * before the context is freed; a full entry is an error, never a silent drop.
 *
 * Lifetime.  An SSL_CTX made in our library context uses it until the last
 * byte of SSL_CTX_free() (cached digests, the key, the store), and SSL
 * objects keep their SSL_CTX alive, parked ones included; Python's cycle
 * collector finalises an Offload and a context that die together in any
 * order.  So the library context is not Python's to free: an entry counts
 * the SSL_CTXs made in it (asx_libctx_track() adds an SSL_CTX ex_data whose
 * free callback counts down), and asx_libctx_release() (the Offload is gone)
 * frees it only when that count is 0.  The free callback runs *inside*
 * SSL_CTX_free(), when the context is still being torn down, so the last
 * one only moves the entry to a dead list; asx_libctx_reap() frees the dead
 * list from a safe point: right after SSL_free()/SSL_CTX_free() return
 * (asx_conn_free, asx_ssl_ctx_free) and on release.
 *
 * A provider context starts with an asx_provctx: the library context the
 * core loaded the provider into (a builtin provider shares this libcrypto,
 * so that is our OSSL_LIB_CTX), its pool (looked up again when the pool is
 * attached after the provider was loaded) and the property strings its
 * algorithms carry.  Operations go through asx_provctx_run(), which is
 * asx_run() on that pool (pool.c) or the computation inline without one.
 *
 * Everything in the providers may run on a job's 32 KiB fibre stack: small
 * frames only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "providers.h"

/* ------------------------------------------------------------------ */
/* registry: library context -> pool, loaded providers                 */
/* ------------------------------------------------------------------ */
#define MAX_LOADED 2          /* "default" and our offload provider */
typedef struct reg_entry reg_entry;
struct reg_entry {
    OSSL_LIB_CTX *libctx;
    asx_pool *pool;
    OSSL_PROVIDER *loaded[MAX_LOADED];
    long ctx_refs;            /* SSL_CTXs made in libctx, not yet freed */
    int released;             /* its Offload is gone: free at ctx_refs == 0 */
    reg_entry *next;
};
static reg_entry *g_reg;
static reg_entry *g_dead;     /* released, unused: freed by asx_libctx_reap() */
static int g_ctx_index = -1;
static pthread_mutex_t g_reg_mu = PTHREAD_MUTEX_INITIALIZER;

/* under g_reg_mu; NULL when absent and !create, or out of memory (raised) */
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

int asx_registry_set_pool(OSSL_LIB_CTX *libctx, asx_pool *pool)
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

int asx_registry_load(OSSL_LIB_CTX *libctx, const char *name)
{
    OSSL_PROVIDER *prov = OSSL_PROVIDER_load(libctx, name);

    if (prov == NULL) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INIT_FAIL,
                       "anyio-asyncssl: could not load the provider %s", name);
        return 0;
    }
    if (!reg_remember(libctx, prov)) {
        OSSL_PROVIDER_unload(prov);
        return 0;
    }
    return 1;
}

/*
 * A library context is retired, never freed.  OpenSSL keeps per-thread state
 * of a library context (its public and private DRBGs) in every thread that
 * drew random bytes from it, and registers that thread's cleanup with the
 * context as argument but not as key: OSSL_LIB_CTX_free() cleans up only the
 * calling thread's.  Freed on one thread after another thread's handshake
 * used it, the other thread's exit (the main thread's: OPENSSL_cleanup() at
 * process exit) read the freed context's lock: a crash or a spin at exit
 * (tests/test_offload_lifecycle.py, OpenSSL 3.0).  What we loaded into it is
 * unloaded and its pool released first (entry_free), so a retired context is
 * the bare context, kept reachable here until the process ends.
 */
typedef struct retired { OSSL_LIB_CTX *libctx; struct retired *next; } retired;
static retired *g_retired;
static pthread_mutex_t g_retired_mu = PTHREAD_MUTEX_INITIALIZER;

static void libctx_retire(OSSL_LIB_CTX *libctx)
{
    retired *r = malloc(sizeof(*r));

    if (r == NULL)
        return;                /* kept all the same, only unreachable */
    r->libctx = libctx;
    pthread_mutex_lock(&g_retired_mu);
    r->next = g_retired;
    g_retired = r;
    pthread_mutex_unlock(&g_retired_mu);
}

static void entry_free(reg_entry *e, int free_libctx)
{
    int j;

    for (j = MAX_LOADED - 1; j >= 0; j--)
        if (e->loaded[j] != NULL)
            OSSL_PROVIDER_unload(e->loaded[j]);
    if (e->pool != NULL)
        asx_pool_unref(e->pool);
    if (free_libctx)
        libctx_retire(e->libctx);
    free(e);
}

/* under g_reg_mu: take |libctx|'s entry out of the registry */
static reg_entry *reg_unlink(OSSL_LIB_CTX *libctx)
{
    reg_entry **pp, *e;

    for (pp = &g_reg; *pp != NULL; pp = &(*pp)->next)
        if ((*pp)->libctx == libctx) {
            e = *pp;
            *pp = e->next;
            return e;
        }
    return NULL;
}

void asx_unload_providers(OSSL_LIB_CTX *libctx)
{
    reg_entry *e;

    pthread_mutex_lock(&g_reg_mu);
    e = reg_unlink(libctx);
    pthread_mutex_unlock(&g_reg_mu);
    if (e != NULL)
        entry_free(e, 0);
}

static void ctx_gone(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                     long argl, void *argp)
{
    reg_entry *e;

    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr == NULL)
        return;
    pthread_mutex_lock(&g_reg_mu);
    if ((e = reg_find((OSSL_LIB_CTX *)ptr, 0)) != NULL
            && --e->ctx_refs == 0 && e->released) {
        reg_unlink(e->libctx);
        e->next = g_dead;      /* SSL_CTX_free() is still using it */
        __atomic_store_n(&g_dead, e, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_reg_mu);
}

static pthread_once_t g_ctx_index_once = PTHREAD_ONCE_INIT;
static void ctx_index_init(void)
{
    g_ctx_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, ctx_gone);
}

int asx_libctx_track(SSL_CTX *ctx, OSSL_LIB_CTX *libctx)
{
    reg_entry *e;

    pthread_once(&g_ctx_index_once, ctx_index_init);
    if (g_ctx_index < 0)
        return 0;
    pthread_mutex_lock(&g_reg_mu);
    if ((e = reg_find(libctx, 0)) != NULL)
        e->ctx_refs++;
    pthread_mutex_unlock(&g_reg_mu);
    if (e == NULL) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INTERNAL_ERROR,
                       "anyio-asyncssl: library context not in the registry");
        return 0;
    }
    if (!SSL_CTX_set_ex_data(ctx, g_ctx_index, libctx)) {
        pthread_mutex_lock(&g_reg_mu);
        e->ctx_refs--;         /* e outlives this: its Offload is alive */
        pthread_mutex_unlock(&g_reg_mu);
        return 0;
    }
    return 1;
}

void asx_libctx_release(OSSL_LIB_CTX *libctx)
{
    reg_entry *e;
    int now = 0;

    pthread_mutex_lock(&g_reg_mu);
    if ((e = reg_find(libctx, 0)) != NULL) {
        e->released = 1;
        if (e->ctx_refs == 0) {
            reg_unlink(libctx);
            now = 1;
        }
    }
    pthread_mutex_unlock(&g_reg_mu);
    if (e == NULL)
        libctx_retire(libctx);   /* nothing loaded, nothing tracked */
    else if (now)
        entry_free(e, 1);
    asx_libctx_reap();
}

void asx_libctx_reap(void)
{
    reg_entry *dead, *next;

    if (__atomic_load_n(&g_dead, __ATOMIC_ACQUIRE) == NULL)
        return;
    pthread_mutex_lock(&g_reg_mu);
    dead = g_dead;
    __atomic_store_n(&g_dead, NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_reg_mu);
    for (; dead != NULL; dead = next) {
        next = dead->next;
        entry_free(dead, 1);
    }
}

int asx_ssl_ctx_free(SSL_CTX *ctx)
{
    SSL_CTX_free(ctx);
    asx_libctx_reap();
    return 1;
}

/* after fork(), in the child (pool.c's fork handler): a thread of the
 * parent may have held a lock */
void asx_providers_after_fork_child(void)
{
    pthread_mutex_init(&g_reg_mu, NULL);
    asx_test_provider_after_fork_child();
}

/* ------------------------------------------------------------------ */
/* provider context                                                    */
/* ------------------------------------------------------------------ */
void *asx_provctx_new(size_t size, const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                      const char *op_property)
{
    OSSL_FUNC_core_get_libctx_fn *get_libctx = NULL;
    OSSL_FUNC_core_get_params_fn *get_params = NULL;
    const char *name = NULL;
    OSSL_PARAM req[2];
    asx_provctx *p;
    int n, m;

    for (; in->function_id != 0; in++) {
        if (in->function_id == OSSL_FUNC_CORE_GET_LIBCTX)
            get_libctx = OSSL_FUNC_core_get_libctx(in);
        else if (in->function_id == OSSL_FUNC_CORE_GET_PARAMS)
            get_params = OSSL_FUNC_core_get_params(in);
    }
    if (get_libctx == NULL || get_params == NULL) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INVALID_PROVIDER_FUNCTIONS,
                       "anyio-asyncssl: the core offers no get_libctx or get_params");
        return NULL;
    }
    req[0] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_CORE_PROV_NAME, (char **)&name, 0);
    req[1] = OSSL_PARAM_construct_end();
    if (!get_params(handle, req) || name == NULL) {
        ERR_raise_data(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER,
                       "anyio-asyncssl: the core did not say the provider's name");
        return NULL;
    }
    if ((p = OPENSSL_zalloc(size)) == NULL) {
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    /* a builtin provider shares this libcrypto: the core's library context
     * is the OSSL_LIB_CTX we were loaded into */
    p->libctx = (OSSL_LIB_CTX *)get_libctx(handle);
    p->pool = reg_pool(p->libctx);
    n = snprintf(p->name_props, sizeof(p->name_props), "provider=%s", name);
    /* user-defined property names need a '.' (property_parse.c) */
    m = snprintf(p->op_props, sizeof(p->op_props), "provider=%s,%s", name, op_property);
    if (n < 0 || (size_t)n >= sizeof(p->name_props) || m < 0 || (size_t)m >= sizeof(p->op_props)) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_PASSED_INVALID_ARGUMENT,
                       "anyio-asyncssl: provider name too long (%zu bytes): %.40s...",
                       strlen(name), name);
        OPENSSL_free(p);
        return NULL;
    }
    return p;
}

int asx_provctx_run(asx_provctx *p, asx_req *q)
{
    /* the pool may be attached after the provider was loaded */
    if (p->pool == NULL)
        p->pool = reg_pool(p->libctx);
    if (p->pool == NULL)
        return q->fn(q);
    return asx_run(p->pool, q);
}
