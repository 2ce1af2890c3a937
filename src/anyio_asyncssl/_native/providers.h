/*
 * providers.h -- what our two OpenSSL providers share (provider_core.c):
 * the registry (library context -> pool, the providers we loaded), the
 * provider context both start with, and the helpers their dispatch tables
 * use.  Not part of the C API Python sees (asyncssl.h).
 */
#ifndef ASX_PROVIDERS_H
#define ASX_PROVIDERS_H

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/err.h>
#include <openssl/proverr.h>

#include "asyncssl.h"

#if !defined(OPENSSL_NO_DEPRECATED) || OPENSSL_API_COMPAT < 30000
#error "build with -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED"
#endif

/* where the inner keys, digests and ciphers we delegate to come from */
#define ASX_INNER_PROPQ "provider=default"

/* A dispatch-table entry.  Every function put here is declared first with
 * its OSSL_FUNC_*_fn type (as OpenSSL's own providers do), so the compiler
 * checks its definition against the operation's signature before the cast
 * erases it. */
#define ASX_FN(fn) ((void (*)(void))(fn))
#define ASX_NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* The start of every provider context (each provider extends it). */
typedef struct {
    OSSL_LIB_CTX *libctx;     /* the library context the provider is loaded into */
    asx_pool *pool;           /* from the registry; may be attached after loading */
    char name_props[96];      /* "provider=NAME" */
    char op_props[128];       /* "provider=NAME,<the operations' own property>" */
} asx_provctx;

/*
 * The common part of a provider's init function: reads the library context
 * and the provider's name from the core, then allocates |size| bytes (a
 * struct that starts with an asx_provctx) and fills that start; |op_property|
 * is added to op_props.  NULL, with an error raised, on failure.
 */
void *asx_provctx_new(size_t size, const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                      const char *op_property);
/* run |q| through |p|'s pool (inline when there is none): asx_run() */
int asx_provctx_run(asx_provctx *p, asx_req *q);

/* registry: attach |pool| to |libctx| (takes a reference) */
int asx_registry_set_pool(OSSL_LIB_CTX *libctx, asx_pool *pool);
/* load provider |name| into |libctx| and remember it for asx_unload_providers() */
int asx_registry_load(OSSL_LIB_CTX *libctx, const char *name);

/* after fork(), in the child: the test provider's own lock */
void asx_test_provider_after_fork_child(void);

#endif
