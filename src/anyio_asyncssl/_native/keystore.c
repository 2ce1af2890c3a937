/*
 * keystore.c -- a private key by URI, through OSSL_STORE, in a given library
 * context.
 *
 * Theory of operation
 * -------------------
 * `TLSContext.load_cert_chain(certfile, keyfile)` takes a key URI as well as
 * a path: `file:/etc/key.pem`, or any scheme a provider loaded into the
 * context's library context offers through OSSL_STORE (`pkcs11:` from
 * pkcs11-provider, `handle:` from tpm2-openssl).  The store is opened in the
 * context's private library context (the Offload's, or the default one), so
 * a provider loaded for one context is never visible to others.
 *
 * The password (a PEM pass phrase, or a token's PIN: providers ask through
 * the UI method they are given) comes from Python already resolved, and
 * reaches the store through a UI method wrapping a PEM password callback;
 * nothing ever prompts on a terminal.  `*asked` tells the caller whether it
 * was asked for one, so a failure can say "wrong password" rather than
 * "not found".
 *
 * The first private key the URI names is returned (owned by the caller);
 * NULL leaves OpenSSL's errors on the queue for the caller to raise.
 */
#include <openssl/evp.h>
#include <openssl/store.h>
#include <openssl/ui.h>
#include <string.h>

#include "asyncssl.h"

struct passphrase {
    const unsigned char *data;
    size_t len;
    int asked;
};

static int passphrase_cb(char *buf, int size, int rwflag, void *u)
{
    struct passphrase *pw = u;

    (void)rwflag;
    pw->asked = 1;
    if (pw->data == NULL || size < 0 || pw->len > (size_t)size)
        return -1;
    memcpy(buf, pw->data, pw->len);
    return (int)pw->len;
}

EVP_PKEY *asx_load_key_uri(OSSL_LIB_CTX *libctx, const char *propq, const char *uri,
                           const unsigned char *pass, size_t passlen, int *asked)
{
    struct passphrase pw = { pass, passlen, 0 };
    UI_METHOD *ui = UI_UTIL_wrap_read_pem_callback(passphrase_cb, 0);
    OSSL_STORE_CTX *store;
    EVP_PKEY *key = NULL;

    if (asked != NULL)
        *asked = 0;
    if (ui == NULL)
        return NULL;
    store = OSSL_STORE_open_ex(uri, libctx, propq, ui, &pw, NULL, NULL, NULL);
    if (store != NULL) {
        /* a hint only: stores that cannot filter return everything */
        OSSL_STORE_expect(store, OSSL_STORE_INFO_PKEY);
        while (key == NULL && !OSSL_STORE_eof(store)) {
            OSSL_STORE_INFO *info = OSSL_STORE_load(store);

            if (info == NULL) {
                if (OSSL_STORE_error(store))
                    break;
                continue;
            }
            if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
                key = OSSL_STORE_INFO_get1_PKEY(info);
            OSSL_STORE_INFO_free(info);
        }
        OSSL_STORE_close(store);
    }
    UI_destroy_method(ui);
    if (asked != NULL)
        *asked = pw.asked;
    return key;
}
