/*
 * certgen.c -- a self-signed certificate for `asyncssl serve`, made with
 * non-deprecated OpenSSL 3.0 API, so the runtime needs no other package.
 *
 * Each certificate is its own issuer, so each gets a name and a serial of its
 * own: a random 159-bit serial (as `openssl req -x509` draws), and an OU that
 * carries the serial's first 64 bits.  Two certificates for one hostname must
 * not share a subject: a store that trusts both finds only one of them by
 * name in OpenSSL 4.0 (the other's peer fails "self-signed certificate"), and
 * an issuer/serial pair seen twice is refused by browsers.
 */
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/rsa.h>
#include <string.h>

#include "asyncssl.h"

void asx_free_secret(char *s)
{
    if (s != NULL)
        OPENSSL_clear_free(s, strlen(s));
}

static char *bio_to_string(BIO *b)
{
    char *data = NULL;
    long n = BIO_get_mem_data(b, &data);
    char *out;

    if (n < 0 || (out = OPENSSL_malloc((size_t)n + 1)) == NULL)
        return NULL;
    memcpy(out, data, (size_t)n);
    out[n] = '\0';
    return out;
}

/*
 * |key_type| "rsa" (|bits|) or "ec" (P-256); |san| like "DNS:localhost,IP:127.0.0.1".
 * On success *cert_pem and *key_pem are OPENSSL_malloc'ed strings (free the
 * key with asx_free_secret); on failure both are NULL.
 */
int asx_self_signed(const char *common_name, const char *san, const char *key_type, int bits,
                    int days, char **cert_pem, char **key_pem)
{
    EVP_PKEY *pkey = NULL;
    X509 *x = NULL;
    X509_EXTENSION *ext = NULL;
    X509V3_CTX v3;
    BIO *cb = NULL, *kb = NULL;
    X509_NAME *name = NULL;
    BIGNUM *serial = NULL;
    char *serial_hex = NULL;
    char unit[12 + 16 + 1];
    int ok = 0;

    *cert_pem = *key_pem = NULL;
    if (strcmp(key_type, "ec") == 0)
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    else
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
    if (pkey == NULL || (x = X509_new()) == NULL)
        goto end;
    if ((serial = BN_new()) == NULL
        || !BN_rand(serial, 159, BN_RAND_TOP_ONE, BN_RAND_BOTTOM_ANY)
        || (serial_hex = BN_bn2hex(serial)) == NULL
        || BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) == NULL)
        goto end;
    memcpy(unit, "self-signed ", 12);
    memcpy(unit + 12, serial_hex, 16);      /* 159 bits, top one set: 40 hex digits */
    unit[12 + 16] = '\0';
    if (!X509_set_version(x, 2)
        || X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL
        || X509_gmtime_adj(X509_getm_notAfter(x), (long)days * 86400) == NULL
        || !X509_set_pubkey(x, pkey))
        goto end;
    /* a name of our own, set as subject and issuer (OpenSSL 4.0's
     * X509_get_subject_name() returns a name that must not be changed) */
    if ((name = X509_NAME_new()) == NULL
        || !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                       (const unsigned char *)common_name, -1, -1, 0)
        || !X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                                       (const unsigned char *)"anyio-asyncssl", -1, -1, 0)
        || !X509_NAME_add_entry_by_txt(name, "OU", MBSTRING_UTF8,
                                       (const unsigned char *)unit, -1, -1, 0)
        || !X509_set_subject_name(x, name)
        || !X509_set_issuer_name(x, name))
        goto end;
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    if ((ext = X509V3_EXT_nconf_nid(NULL, &v3, NID_subject_alt_name, san)) == NULL
        || !X509_add_ext(x, ext, -1))
        goto end;
    X509_EXTENSION_free(ext);
    if ((ext = X509V3_EXT_nconf_nid(NULL, &v3, NID_basic_constraints, "critical,CA:FALSE")) == NULL
        || !X509_add_ext(x, ext, -1))
        goto end;
    X509_EXTENSION_free(ext);
    ext = NULL;
    if (!X509_sign(x, pkey, EVP_sha256()))
        goto end;
    cb = BIO_new(BIO_s_mem());
    kb = BIO_new(BIO_s_mem());
    if (cb == NULL || kb == NULL || !PEM_write_bio_X509(cb, x)
        || !PEM_write_bio_PrivateKey(kb, pkey, NULL, NULL, 0, NULL, NULL))
        goto end;
    *cert_pem = bio_to_string(cb);
    *key_pem = bio_to_string(kb);
    ok = *cert_pem != NULL && *key_pem != NULL;
    if (!ok) {                /* half made: nothing goes back to the caller */
        OPENSSL_free(*cert_pem);
        if (*key_pem != NULL)
            OPENSSL_clear_free(*key_pem, strlen(*key_pem));
        *cert_pem = *key_pem = NULL;
    }
end:
    OPENSSL_free(serial_hex);
    BN_free(serial);
    X509_NAME_free(name);
    X509_EXTENSION_free(ext);
    BIO_free(cb);
    BIO_free(kb);
    X509_free(x);
    EVP_PKEY_free(pkey);
    return ok;
}
