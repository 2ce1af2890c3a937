/*
 * certinfo.c -- certificate decoding for getpeercert() that Python cannot do
 * with plain accessor calls.
 *
 * Theory of operation
 * -------------------
 * getpeercert() (Python's certificate decoding) builds the stdlib's
 * dictionary with OpenSSL's accessors through cffi.  Two of its entries
 * live inside extensions whose structures are not reachable that way
 * without declaring OpenSSL's internal struct layouts to cffi: the URIs of
 * the authority information access extension (|kind| 0: OCSP, 1:
 * caIssuers) and of the CRL distribution points (|kind| 2).  asx_cert_uris()
 * decodes them in C, as the stdlib's _ssl.c does, and writes them
 * NUL-separated into the caller's buffer: no allocation crosses the
 * boundary.  It returns how many URIs it wrote, or -1 when |buf| is too
 * small (the caller retries with a larger one).
 *
 * asx_chain_cert() reads the peer's chain (STACK_OF(X509), a macro type
 * cffi cannot declare) one certificate at a time, for get_verified_chain()
 * and get_unverified_chain().
 */
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <string.h>

#include "asyncssl.h"

static int put_uri(const GENERAL_NAME *gen, char *buf, size_t cap, size_t *used)
{
    const ASN1_IA5STRING *s;
    int len;

    if (gen->type != GEN_URI)
        return 0;
    s = gen->d.uniformResourceIdentifier;
    len = ASN1_STRING_length(s);
    if (*used + (size_t)len + 1 > cap)
        return -1;
    memcpy(buf + *used, ASN1_STRING_get0_data(s), (size_t)len);
    buf[*used + (size_t)len] = '\0';
    *used += (size_t)len + 1;
    return 1;
}

int asx_cert_uris(X509 *x, int kind, char *buf, size_t cap)
{
    size_t used = 0;
    int i, j, n = 0, r;

    if (kind == 0 || kind == 1) {
        AUTHORITY_INFO_ACCESS *info = X509_get_ext_d2i(x, NID_info_access, NULL, NULL);
        int want = kind == 0 ? NID_ad_OCSP : NID_ad_ca_issuers;

        if (info == NULL)
            return 0;
        for (i = 0; i < sk_ACCESS_DESCRIPTION_num(info) && n >= 0; i++) {
            ACCESS_DESCRIPTION *ad = sk_ACCESS_DESCRIPTION_value(info, i);

            if (OBJ_obj2nid(ad->method) != want)
                continue;
            r = put_uri(ad->location, buf, cap, &used);
            n = r < 0 ? -1 : n + r;
        }
        AUTHORITY_INFO_ACCESS_free(info);
        return n;
    }
    if (kind == 2) {
        STACK_OF(DIST_POINT) *dps = X509_get_ext_d2i(x, NID_crl_distribution_points, NULL, NULL);

        if (dps == NULL)
            return 0;
        for (i = 0; i < sk_DIST_POINT_num(dps) && n >= 0; i++) {
            DIST_POINT *dp = sk_DIST_POINT_value(dps, i);
            GENERAL_NAMES *names;

            if (dp->distpoint == NULL || dp->distpoint->type != 0)
                continue;
            names = dp->distpoint->name.fullname;
            for (j = 0; j < sk_GENERAL_NAME_num(names) && n >= 0; j++) {
                r = put_uri(sk_GENERAL_NAME_value(names, j), buf, cap, &used);
                n = r < 0 ? -1 : n + r;
            }
        }
        sk_DIST_POINT_pop_free(dps, DIST_POINT_free);
        return n;
    }
    return 0;
}

X509 *asx_chain_cert(const SSL *ssl, int verified, int i)
{
    STACK_OF(X509) *chain = verified ? SSL_get0_verified_chain(ssl)
                                     : SSL_get_peer_cert_chain(ssl);

    if (chain == NULL || i < 0 || i >= sk_X509_num(chain))
        return NULL;
    return sk_X509_value(chain, i);
}
