/*
 * offload_provider.c -- "asyncssl-offload", the OpenSSL 3 provider that
 * hands private-key operations to the worker pool: keymgmt RSA + EC,
 * signature RSA + ECDSA, asym cipher RSA (TLS 1.2 static-RSA key exchange).
 *
 * Theory of operation
 * -------------------
 * A key object wraps an *inner* key of the default provider (fetched with
 * "provider=default").  Keys enter only through asx_wrap_key()
 * (EVP_PKEY_todata -> EVP_PKEY_fromdata into our keymgmt); every other
 * import is refused, so libcrypto never moves a foreign key into us, and
 * our export() never hands out the private half, so the default provider
 * can never sign with our key behind our back (EVP_DigestSignInit must then
 * use our signature).
 *
 * Only the signature and asym-cipher algorithms carry "asyncssl.sign=yes";
 * an SSL_CTX made with the property query "?asyncssl.sign=yes" prefers them
 * without pulling libssl's group keymgmt fetches to us (that would drop the
 * EC groups).  digest_sign hashes on the calling thread, then
 * asx_provctx_run() signs inline or on a worker while the job pauses
 * (pool.c).
 *
 * Every dispatch function is declared with its OSSL_FUNC_*_fn type, and
 * every refusal raises an error (ERR_LIB_PROV) saying why.  Answers are not
 * refusals and raise nothing: has() and match() answering 0,
 * query_operation_name() answering NULL ("use the keymgmt's name"), and
 * import() declining a foreign key while libcrypto probes (see km_import).
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
#include <string.h>

#include "providers.h"

#define KEY_RSA 1
#define KEY_EC 2

/* set by asx_wrap_key() around the one import we accept */
static __thread int tl_import_open;
/* set by asx_wrap_key() for a key another provider holds (a token's): the
 * import takes a reference to it instead of its private half */
static __thread EVP_PKEY *tl_foreign_key;

typedef struct {
    asx_provctx base;
    OSSL_ALGORITHM km_algs[3], sig_algs[3], asym_algs[2];
} offload_ctx;

/* ------------------------------------------------------------------ */
/* keymgmt                                                             */
/* ------------------------------------------------------------------ */
typedef struct {
    asx_provctx *prov;
    int type;
    EVP_PKEY *inner;
    int has_priv;
    /* where |inner|'s operations are fetched: the default provider for keys
     * rebuilt from their data, the holding provider ("provider=pkcs11")
     * for keys we only have a reference to */
    char inner_propq[80];
} key;

static OSSL_FUNC_keymgmt_new_fn km_rsa_new, km_ec_new;
static OSSL_FUNC_keymgmt_free_fn km_free;
static OSSL_FUNC_keymgmt_has_fn km_has;
static OSSL_FUNC_keymgmt_import_fn km_import;
static OSSL_FUNC_keymgmt_import_types_fn km_rsa_types, km_ec_types;
static OSSL_FUNC_keymgmt_export_fn km_export;
static OSSL_FUNC_keymgmt_get_params_fn km_get_params;
static OSSL_FUNC_keymgmt_gettable_params_fn km_rsa_gettable, km_ec_gettable;
static OSSL_FUNC_keymgmt_match_fn km_match;
static OSSL_FUNC_keymgmt_query_operation_name_fn km_rsa_query, km_ec_query;

static const char *key_type_name(int type) { return type == KEY_RSA ? "RSA" : "EC"; }

static void *km_new(asx_provctx *p, int type)
{
    key *k = OPENSSL_zalloc(sizeof(*k));

    if (k == NULL) {
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    k->prov = p;
    k->type = type;
    strcpy(k->inner_propq, ASX_INNER_PROPQ);
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

    /* Only keys handed over by asx_wrap_key(): libcrypto must not move
     * foreign keys (peer public keys, other contexts' keys) into us.  This
     * refusal is an answer, not an error, and raises nothing: libcrypto
     * asks it while probing (EVP_PKEY_eq when SSL_CTX_use_PrivateKey checks
     * the key against the certificate, a signature fetch choosing a key's
     * provider), falls back to the default provider, and does not pop what
     * a probe queued, so an error here would be left behind on the queue
     * of every successful load_cert_chain(). */
    if (!tl_import_open)
        return 0;
    if (tl_foreign_key != NULL) {
        /* a reference, not a copy: the holding provider signs (on our
         * workers); |params| carried only its public half */
        const char *holder = OSSL_PROVIDER_get0_name(EVP_PKEY_get0_provider(tl_foreign_key));

        if (holder == NULL || strlen(holder) > sizeof(k->inner_propq) - sizeof("provider=")
            || !EVP_PKEY_up_ref(tl_foreign_key)) {
            ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                           "anyio-asyncssl offload: cannot refer to the %s key",
                           key_type_name(k->type));
            return 0;
        }
        EVP_PKEY_free(k->inner);
        k->inner = tl_foreign_key;
        k->has_priv = 1;
        strcpy(k->inner_propq, "provider=");
        strcat(k->inner_propq, holder);
        return 1;
    }
    /* export_to_provider asks for SELECT_ALL even for public keys */
    priv = (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        && OSSL_PARAM_locate_const(params, k->type == KEY_RSA ? OSSL_PKEY_PARAM_RSA_D
                                                              : OSSL_PKEY_PARAM_PRIV_KEY) != NULL;
    pctx = EVP_PKEY_CTX_new_from_name(k->prov->libctx, key_type_name(k->type), ASX_INNER_PROPQ);
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &inner,
                             evp_selection(priv ? selection
                                                : selection & ~OSSL_KEYMGMT_SELECT_PRIVATE_KEY),
                             (OSSL_PARAM *)params) <= 0) {
        EVP_PKEY_CTX_free(pctx);
        ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                       "anyio-asyncssl offload: the default provider could not import the %s key",
                       key_type_name(k->type));
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

    if (k == NULL || k->inner == NULL) {
        ERR_raise(ERR_LIB_PROV, PROV_R_NO_KEY_SET);
        return 0;
    }
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) {
        /* non-exportable private key, like an HSM's */
        ERR_raise_data(ERR_LIB_PROV, PROV_R_NOT_SUPPORTED,
                       "anyio-asyncssl offload: the private key is not exportable");
        return 0;
    }
    if (EVP_PKEY_todata(k->inner, evp_selection(selection), &params) <= 0) {
        ERR_raise(ERR_LIB_PROV, ERR_R_EVP_LIB);
        return 0;
    }
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

    if (k == NULL || k->inner == NULL) {
        ERR_raise(ERR_LIB_PROV, PROV_R_NO_KEY_SET);
        return 0;
    }
    for (p = params; p->key != NULL; p++)
        for (i = 0; i < ASX_NELEM(km_forward); i++) {
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
    { OSSL_FUNC_KEYMGMT_NEW, ASX_FN(km_rsa_new) },
    { OSSL_FUNC_KEYMGMT_FREE, ASX_FN(km_free) },
    { OSSL_FUNC_KEYMGMT_HAS, ASX_FN(km_has) },
    { OSSL_FUNC_KEYMGMT_IMPORT, ASX_FN(km_import) },
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, ASX_FN(km_rsa_types) },
    { OSSL_FUNC_KEYMGMT_EXPORT, ASX_FN(km_export) },
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, ASX_FN(km_rsa_types) },
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, ASX_FN(km_get_params) },
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, ASX_FN(km_rsa_gettable) },
    { OSSL_FUNC_KEYMGMT_MATCH, ASX_FN(km_match) },
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, ASX_FN(km_rsa_query) },
    { 0, NULL }
};
static const OSSL_DISPATCH ec_keymgmt[] = {
    { OSSL_FUNC_KEYMGMT_NEW, ASX_FN(km_ec_new) },
    { OSSL_FUNC_KEYMGMT_FREE, ASX_FN(km_free) },
    { OSSL_FUNC_KEYMGMT_HAS, ASX_FN(km_has) },
    { OSSL_FUNC_KEYMGMT_IMPORT, ASX_FN(km_import) },
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, ASX_FN(km_ec_types) },
    { OSSL_FUNC_KEYMGMT_EXPORT, ASX_FN(km_export) },
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, ASX_FN(km_ec_types) },
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, ASX_FN(km_get_params) },
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, ASX_FN(km_ec_gettable) },
    { OSSL_FUNC_KEYMGMT_MATCH, ASX_FN(km_match) },
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, ASX_FN(km_ec_query) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* what signature and asym cipher share: an operation on one of our    */
/* keys, carried out by an inner EVP_PKEY_CTX of the default provider   */
/* ------------------------------------------------------------------ */
typedef struct {
    asx_provctx *prov;
    key *k;
    EVP_PKEY_CTX *inner;      /* EVP_PKEY_sign_init / _decrypt_init on k->inner */
} keyop;

/* the params functions serve both operations (their types are the same) */
static OSSL_FUNC_signature_get_ctx_params_fn keyop_get_ctx_params;
static OSSL_FUNC_asym_cipher_get_ctx_params_fn keyop_get_ctx_params;
static OSSL_FUNC_asym_cipher_set_ctx_params_fn keyop_set_ctx_params;

/* an operation context of |size| bytes, starting with a keyop */
static void *keyop_new(void *p, size_t size)
{
    keyop *op = OPENSSL_zalloc(size);

    if (op == NULL) {
        ERR_raise(ERR_LIB_PROV, ERR_R_MALLOC_FAILURE);
        return NULL;
    }
    op->prov = p;
    return op;
}

/* start an operation with |keydata| (which must hold the private half):
 * |init| is EVP_PKEY_sign_init or EVP_PKEY_decrypt_init */
static int keyop_init(keyop *op, void *keydata, int (*init)(EVP_PKEY_CTX *), const char *what)
{
    key *k = keydata;

    if (k == NULL || k->inner == NULL || !k->has_priv) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_PASSED_INVALID_ARGUMENT,
                       "anyio-asyncssl offload: no private key");
        return 0;
    }
    op->k = k;
    EVP_PKEY_CTX_free(op->inner);
    op->inner = EVP_PKEY_CTX_new_from_pkey(op->prov->libctx, k->inner, k->inner_propq);
    if (op->inner == NULL || init(op->inner) <= 0) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                       "anyio-asyncssl offload: %s cannot %s with the %s key",
                       k->inner_propq, what, key_type_name(k->type));
        return 0;
    }
    return 1;
}

static int keyop_started(const keyop *op)
{
    if (op == NULL || op->k == NULL || op->inner == NULL) {
        ERR_raise(ERR_LIB_PROV, PROV_R_NO_KEY_SET);
        return 0;
    }
    return 1;
}

static int keyop_set_ctx_params(void *vop, const OSSL_PARAM params[])
{
    keyop *op = vop;

    if (params == NULL || params[0].key == NULL)
        return 1;
    if (!keyop_started(op))
        return 0;
    if (EVP_PKEY_CTX_set_params(op->inner, params) <= 0) {
        ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_SET_PARAMETER);
        return 0;
    }
    return 1;
}

static int keyop_get_ctx_params(void *vop, OSSL_PARAM params[])
{
    keyop *op = vop;

    if (!keyop_started(op))
        return 0;
    if (EVP_PKEY_CTX_get_params(op->inner, params) <= 0) {
        ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
        return 0;
    }
    return 1;
}

/* the size of a signature or decryption with the operation's key */
static int keyop_output_size(const keyop *op, size_t *out)
{
    int n = EVP_PKEY_get_size(op->k->inner);

    if (n <= 0) {
        ERR_raise(ERR_LIB_PROV, PROV_R_INVALID_KEY);
        return 0;
    }
    *out = (size_t)n;
    return 1;
}

/* Run one private-key operation through the pool (pool.c): |fn| calls
 * EVP_PKEY_sign or EVP_PKEY_decrypt on the inner context, inline or on a
 * worker while the job pauses; the worker's error comes back with it. */
static int keyop_run(keyop *op, int kind, int (*fn)(asx_req *), unsigned char *out,
                     size_t *outlen, size_t outsize, const unsigned char *in, size_t inlen)
{
    asx_req q = { .fn = fn, .kind = kind, .out = out, .outlen = outsize, .in = in,
                  .inlen = inlen };

    if (!keyop_started(op))
        return 0;
    if (out == NULL)
        return keyop_output_size(op, outlen);
    q.ctx = op->inner;
    if (asx_provctx_run(op->prov, &q) <= 0) {
        ERR_raise_data(ERR_LIB_PROV,
                       kind == ASX_REQ_SIGN ? PROV_R_FAILED_TO_SIGN : PROV_R_FAILED_TO_DECRYPT,
                       "anyio-asyncssl offload");
        return 0;
    }
    *outlen = q.outlen;
    return 1;
}

/* ------------------------------------------------------------------ */
/* signature                                                           */
/* ------------------------------------------------------------------ */
typedef struct {
    keyop op;
    EVP_MD *md;
    EVP_MD_CTX *mdctx;        /* streaming (update/final) path only */
} sigctx;

static OSSL_FUNC_signature_newctx_fn sig_newctx;
static OSSL_FUNC_signature_freectx_fn sig_freectx;
static OSSL_FUNC_signature_dupctx_fn sig_dupctx;
static OSSL_FUNC_signature_sign_init_fn sig_sign_init;
static OSSL_FUNC_signature_sign_fn sig_sign;
static OSSL_FUNC_signature_digest_sign_init_fn sig_digest_sign_init;
static OSSL_FUNC_signature_digest_sign_fn sig_digest_sign;
static OSSL_FUNC_signature_digest_sign_update_fn sig_digest_sign_update;
static OSSL_FUNC_signature_digest_sign_final_fn sig_digest_sign_final;
static OSSL_FUNC_signature_set_ctx_params_fn sig_set_ctx_params;
static OSSL_FUNC_signature_settable_ctx_params_fn sig_rsa_settable, sig_ec_settable;
static OSSL_FUNC_signature_gettable_ctx_params_fn sig_gettable;

static void *sig_newctx(void *p, const char *propq)
{
    (void)propq;
    return keyop_new(p, sizeof(sigctx));
}

static void sig_freectx(void *vc)
{
    sigctx *c = vc;

    if (c == NULL)
        return;
    EVP_PKEY_CTX_free(c->op.inner);
    EVP_MD_free(c->md);
    EVP_MD_CTX_free(c->mdctx);
    OPENSSL_free(c);
}

static void *sig_dupctx(void *vc)
{
    sigctx *c = vc, *d = keyop_new(c->op.prov, sizeof(*d));

    if (d == NULL)
        return NULL;
    d->op.k = c->op.k;
    if ((c->op.inner != NULL && (d->op.inner = EVP_PKEY_CTX_dup(c->op.inner)) == NULL)
        || (c->md != NULL && !EVP_MD_up_ref(c->md)))
        goto fail;
    d->md = c->md;
    if (c->mdctx != NULL
        && ((d->mdctx = EVP_MD_CTX_new()) == NULL || !EVP_MD_CTX_copy_ex(d->mdctx, c->mdctx)))
        goto fail;
    return d;
fail:
    sig_freectx(d);
    ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                   "anyio-asyncssl offload: could not copy a signature context");
    return NULL;
}

static int sig_set_md(sigctx *c, const char *mdname)
{
    EVP_MD *md;

    if (mdname == NULL || *mdname == '\0')
        return 1;
    if ((md = EVP_MD_fetch(c->op.prov->libctx, mdname, ASX_INNER_PROPQ)) == NULL) {
        ERR_raise_data(ERR_LIB_PROV, PROV_R_INVALID_DIGEST, "%s could not be fetched", mdname);
        return 0;
    }
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
    if (!keyop_started(&c->op))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL) {
        const char *mdname = NULL;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &mdname)) {
            ERR_raise(ERR_LIB_PROV, PROV_R_FAILED_TO_GET_PARAMETER);
            return 0;
        }
        if (!sig_set_md(c, mdname))
            return 0;
    }
    return keyop_set_ctx_params(&c->op, params);
}

static int sig_init(sigctx *c, void *keydata, const char *mdname, const OSSL_PARAM params[])
{
    if (!keyop_init(&c->op, keydata, EVP_PKEY_sign_init, "sign"))
        return 0;
    if (mdname != NULL) {
        OSSL_PARAM mdp[2];

        if (!sig_set_md(c, mdname))
            return 0;
        mdp[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, (char *)mdname, 0);
        mdp[1] = OSSL_PARAM_construct_end();
        if (EVP_PKEY_CTX_set_params(c->op.inner, mdp) <= 0) {
            ERR_raise_data(ERR_LIB_PROV, PROV_R_INVALID_DIGEST, "digest=%s", mdname);
            return 0;
        }
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

static int sig_sign(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    return keyop_run(vc, ASX_REQ_SIGN, req_sign, sig, siglen, sigsize, tbs, tbslen);
}

static int sig_digest_sign(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize,
                           const unsigned char *tbs, size_t tbslen)
{
    sigctx *c = vc;
    unsigned char dg[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;

    if (sig == NULL)
        return sig_sign(c, NULL, siglen, 0, NULL, 0);
    if (c->md == NULL) {
        ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_MESSAGE_DIGEST);
        return 0;
    }
    if (!EVP_Digest(tbs, tbslen, dg, &dl, c->md, NULL)) {
        ERR_raise(ERR_LIB_PROV, ERR_R_EVP_LIB);
        return 0;
    }
    return sig_sign(c, sig, siglen, sigsize, dg, dl);
}

static int sig_digest_sign_update(void *vc, const unsigned char *data, size_t len)
{
    sigctx *c = vc;

    if (c->mdctx == NULL) {
        if (c->md == NULL) {
            ERR_raise(ERR_LIB_PROV, PROV_R_MISSING_MESSAGE_DIGEST);
            return 0;
        }
        if ((c->mdctx = EVP_MD_CTX_new()) == NULL || !EVP_DigestInit_ex2(c->mdctx, c->md, NULL)) {
            ERR_raise(ERR_LIB_PROV, ERR_R_EVP_LIB);
            return 0;
        }
    }
    if (!EVP_DigestUpdate(c->mdctx, data, len)) {
        ERR_raise(ERR_LIB_PROV, ERR_R_EVP_LIB);
        return 0;
    }
    return 1;
}

static int sig_digest_sign_final(void *vc, unsigned char *sig, size_t *siglen, size_t sigsize)
{
    sigctx *c = vc;
    unsigned char dg[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;

    if (sig == NULL)
        return sig_sign(c, NULL, siglen, 0, NULL, 0);
    if (c->mdctx == NULL && !sig_digest_sign_update(c, NULL, 0))
        return 0;
    if (!EVP_DigestFinal_ex(c->mdctx, dg, &dl)) {
        ERR_raise(ERR_LIB_PROV, ERR_R_EVP_LIB);
        return 0;
    }
    return sig_sign(c, sig, siglen, sigsize, dg, dl);
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
    { OSSL_FUNC_SIGNATURE_NEWCTX, ASX_FN(sig_newctx) },                          \
    { OSSL_FUNC_SIGNATURE_FREECTX, ASX_FN(sig_freectx) },                        \
    { OSSL_FUNC_SIGNATURE_DUPCTX, ASX_FN(sig_dupctx) },                          \
    { OSSL_FUNC_SIGNATURE_SIGN_INIT, ASX_FN(sig_sign_init) },                    \
    { OSSL_FUNC_SIGNATURE_SIGN, ASX_FN(sig_sign) },                              \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, ASX_FN(sig_digest_sign_init) },      \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN, ASX_FN(sig_digest_sign) },                \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, ASX_FN(sig_digest_sign_update) },  \
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, ASX_FN(sig_digest_sign_final) },    \
    { OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, ASX_FN(sig_set_ctx_params) },          \
    { OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, ASX_FN(keyop_get_ctx_params) },        \
    { OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, ASX_FN(sig_gettable) }

static const OSSL_DISPATCH rsa_signature[] = {
    SIG_COMMON,
    { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, ASX_FN(sig_rsa_settable) },
    { 0, NULL }
};
static const OSSL_DISPATCH ecdsa_signature[] = {
    SIG_COMMON,
    { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, ASX_FN(sig_ec_settable) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* asym cipher: RSA decrypt (TLS 1.2 static-RSA key exchange)          */
/* ------------------------------------------------------------------ */
static OSSL_FUNC_asym_cipher_newctx_fn asym_newctx;
static OSSL_FUNC_asym_cipher_freectx_fn asym_freectx;
static OSSL_FUNC_asym_cipher_decrypt_init_fn asym_decrypt_init;
static OSSL_FUNC_asym_cipher_decrypt_fn asym_decrypt;
static OSSL_FUNC_asym_cipher_settable_ctx_params_fn asym_settable;
static OSSL_FUNC_asym_cipher_gettable_ctx_params_fn asym_gettable;

static void *asym_newctx(void *p) { return keyop_new(p, sizeof(keyop)); }

static void asym_freectx(void *vop)
{
    keyop *op = vop;

    if (op != NULL) {
        EVP_PKEY_CTX_free(op->inner);
        OPENSSL_free(op);
    }
}

static int asym_decrypt_init(void *vop, void *keydata, const OSSL_PARAM params[])
{
    return keyop_init(vop, keydata, EVP_PKEY_decrypt_init, "decrypt")
        && keyop_set_ctx_params(vop, params);
}

static int req_decrypt(asx_req *q)
{
    size_t l = q->outlen;
    int r = EVP_PKEY_decrypt(q->ctx, q->out, &l, q->in, q->inlen);

    q->outlen = l;
    return r;
}

static int asym_decrypt(void *vop, unsigned char *out, size_t *outlen, size_t outsize,
                        const unsigned char *in, size_t inlen)
{
    return keyop_run(vop, ASX_REQ_DECRYPT, req_decrypt, out, outlen, outsize, in, inlen);
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
    { OSSL_FUNC_ASYM_CIPHER_NEWCTX, ASX_FN(asym_newctx) },
    { OSSL_FUNC_ASYM_CIPHER_FREECTX, ASX_FN(asym_freectx) },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, ASX_FN(asym_decrypt_init) },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT, ASX_FN(asym_decrypt) },
    { OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, ASX_FN(keyop_set_ctx_params) },
    { OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, ASX_FN(asym_settable) },
    { OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, ASX_FN(keyop_get_ctx_params) },
    { OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, ASX_FN(asym_gettable) },
    { 0, NULL }
};

/* ------------------------------------------------------------------ */
/* the provider                                                        */
/* ------------------------------------------------------------------ */
static OSSL_FUNC_provider_query_operation_fn offload_query;
static OSSL_FUNC_provider_teardown_fn offload_teardown;
static OSSL_provider_init_fn offload_init;

static const OSSL_ALGORITHM *offload_query(void *vp, int op, int *no_cache)
{
    offload_ctx *p = vp;

    *no_cache = 0;
    if (op == OSSL_OP_KEYMGMT)
        return p->km_algs;
    if (op == OSSL_OP_SIGNATURE)
        return p->sig_algs;
    if (op == OSSL_OP_ASYM_CIPHER)
        return p->asym_algs;
    return NULL;               /* an answer: we offer nothing else */
}

static void offload_teardown(void *vp) { OPENSSL_free(vp); }

static const OSSL_DISPATCH offload_dispatch[] = {
    { OSSL_FUNC_PROVIDER_TEARDOWN, ASX_FN(offload_teardown) },
    { OSSL_FUNC_PROVIDER_QUERY_OPERATION, ASX_FN(offload_query) },
    { 0, NULL }
};

#define RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"

static int offload_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                        const OSSL_DISPATCH **out, void **vp)
{
    offload_ctx *p = asx_provctx_new(sizeof(*p), handle, in, "asyncssl.sign=yes");
    const char *km, *op;

    if (p == NULL)
        return 0;
    km = p->base.name_props;
    op = p->base.op_props;
    /* the zeroed last entry of each table ends it */
    p->km_algs[0] = (OSSL_ALGORITHM){ RSA_NAMES, km, rsa_keymgmt, "anyio-asyncssl offload RSA" };
    p->km_algs[1] = (OSSL_ALGORITHM){ "EC:id-ecPublicKey:1.2.840.10045.2.1", km, ec_keymgmt,
                                      "anyio-asyncssl offload EC" };
    p->sig_algs[0] = (OSSL_ALGORITHM){ RSA_NAMES, op, rsa_signature,
                                       "anyio-asyncssl offload RSA signature" };
    p->sig_algs[1] = (OSSL_ALGORITHM){ "ECDSA", op, ecdsa_signature,
                                       "anyio-asyncssl offload ECDSA" };
    p->asym_algs[0] = (OSSL_ALGORITHM){ RSA_NAMES, op, rsa_asym_cipher,
                                        "anyio-asyncssl offload RSA decrypt" };
    *out = offload_dispatch;
    *vp = p;
    return 1;
}

/* ------------------------------------------------------------------ */
/* entry points                                                        */
/* ------------------------------------------------------------------ */
int asx_install_offload(OSSL_LIB_CTX *libctx, asx_pool *pool)
{
    /* once any provider is loaded explicitly the default is not auto-loaded */
    if (!asx_registry_set_pool(libctx, pool) || !asx_registry_load(libctx, "default"))
        return 0;
    if (!OSSL_PROVIDER_add_builtin(libctx, ASX_OFFLOAD_PROVIDER, offload_init)) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_INIT_FAIL,
                       "anyio-asyncssl: could not register the %s provider", ASX_OFFLOAD_PROVIDER);
        return 0;
    }
    return asx_registry_load(libctx, ASX_OFFLOAD_PROVIDER);
}

EVP_PKEY *asx_wrap_key(OSSL_LIB_CTX *libctx, EVP_PKEY *in)
{
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    EVP_PKEY *out = NULL;
    const char *type = EVP_PKEY_get0_type_name(in);
    const char *holder;
    int foreign;

    if (type == NULL || (strcmp(type, "RSA") != 0 && strcmp(type, "EC") != 0)) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_UNSUPPORTED,
                       "anyio-asyncssl offload supports RSA and EC keys, not %s",
                       type ? type : "(unknown)");
        return NULL;
    }
    holder = OSSL_PROVIDER_get0_name(EVP_PKEY_get0_provider(in));
    foreign = holder != NULL && strcmp(holder, "default") != 0;
    /* a key another provider holds (a token's, which never gives out its
     * private half) is referred to; a default-provider key is copied */
    if (EVP_PKEY_todata(in, foreign ? EVP_PKEY_PUBLIC_KEY : EVP_PKEY_KEYPAIR, &params) <= 0) {
        ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                       "anyio-asyncssl offload: the %s key cannot be exported", type);
        return NULL;
    }
    pctx = EVP_PKEY_CTX_new_from_name(libctx, type, "provider=" ASX_OFFLOAD_PROVIDER);
    tl_import_open = 1;
    tl_foreign_key = foreign ? in : NULL;
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &out, foreign ? EVP_PKEY_PUBLIC_KEY : EVP_PKEY_KEYPAIR,
                             params) <= 0)
        out = NULL;
    tl_foreign_key = NULL;
    tl_import_open = 0;
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
    if (out == NULL)
        ERR_raise_data(ERR_LIB_PROV, ERR_R_EVP_LIB,
                       "anyio-asyncssl offload: the %s key could not be rebuilt in %s", type,
                       ASX_OFFLOAD_PROVIDER);
    return out;
}
