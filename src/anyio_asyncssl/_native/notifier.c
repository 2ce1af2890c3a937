/*
 * notifier.c -- the per-loop notifier (an eventfd and a completion queue of
 * connection ids) and the GIL-free async callback that feeds it.
 *
 * Theory of operation
 * -------------------
 * The async callback runs on an engine thread, or inside the job on the loop
 * thread (early notifications).  It takes no GIL and runs no Python: it bumps
 * the connection's wake-up counter, queues the connection id on the
 * notifier's completion queue and writes the notifier's eventfd.  There is
 * one notifier per event loop, so a loop waits on one fd however many
 * connections it drives.  Wake-ups are level-style and may be early,
 * duplicated or stale: the driver re-checks by retrying.
 *
 * The queue is a mutex-protected array of fixed capacity.  When it is full a
 * post sets the overflow flag instead (the callback neither allocates nor
 * waits for room), and the next drain answers -1: every waiter of that loop
 * re-checks, so no wake-up is lost.  A drain that leaves ids behind (the
 * caller's buffer was smaller) writes the eventfd again, so it stays
 * readable until the queue is empty.
 *
 * Wake-ups are batched: a post writes the eventfd only when nothing was
 * posted since the loop's last drain (the "signalled" flag, under the
 * mutex), so a burst of completions costs the workers one write and the
 * loop one wake-up.  The drain reads the eventfd before it takes the
 * mutex: a post that finds the flag still set lands in the queue before
 * the drain copies it out, and one after the drain signals again.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/ssl.h>
#include <openssl/async.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "asyncssl.h"

/* ------------------------------------------------------------------ */
/* notifier                                                            */
/* ------------------------------------------------------------------ */
struct asx_notifier {
    int efd;
    pthread_mutex_t mu;
    uint64_t *ids;
    size_t cap, count;
    int overflow;
    int signalled;        /* the eventfd was written since the last drain */
};

asx_notifier *asx_notifier_new(size_t capacity)
{
    asx_notifier *n = calloc(1, sizeof(*n));

    if (n == NULL)
        return NULL;
    if (capacity < 16)
        capacity = 16;
    n->ids = calloc(capacity, sizeof(uint64_t));
    n->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (n->ids == NULL || n->efd < 0) {
        if (n->efd >= 0)
            close(n->efd);
        free(n->ids);
        free(n);
        return NULL;
    }
    n->cap = capacity;
    pthread_mutex_init(&n->mu, NULL);
    return n;
}

void asx_notifier_free(asx_notifier *n)
{
    if (n == NULL)
        return;
    close(n->efd);
    pthread_mutex_destroy(&n->mu);
    free(n->ids);
    free(n);
}

int asx_notifier_fd(asx_notifier *n) { return n->efd; }

void asx_notifier_post(asx_notifier *n, uint64_t id)
{
    uint64_t one = 1;
    ssize_t w;

    int signal;

    pthread_mutex_lock(&n->mu);
    if (n->count < n->cap)
        n->ids[n->count++] = id;
    else
        n->overflow = 1;
    /* one eventfd write per drain, however many completions come first */
    signal = !n->signalled;
    n->signalled = 1;
    pthread_mutex_unlock(&n->mu);
    if (signal) {
        w = write(n->efd, &one, sizeof(one));
        (void)w;
    }
}

long asx_notifier_drain(asx_notifier *n, uint64_t *ids, size_t cap)
{
    uint64_t v;
    ssize_t r = read(n->efd, &v, sizeof(v));
    long out;

    (void)r;
    pthread_mutex_lock(&n->mu);
    n->signalled = 0;     /* posts from now on signal again */
    if (n->overflow) {
        n->overflow = 0;
        n->count = 0;
        out = -1;
    } else {
        size_t k = n->count < cap ? n->count : cap;

        memcpy(ids, n->ids, k * sizeof(uint64_t));
        memmove(n->ids, n->ids + k, (n->count - k) * sizeof(uint64_t));
        n->count -= k;
        out = (long)k;
        if (n->count > 0) {      /* more left: keep the fd readable */
            uint64_t one = 1;
            ssize_t w = write(n->efd, &one, sizeof(one));

            (void)w;
            n->signalled = 1;
        }
    }
    pthread_mutex_unlock(&n->mu);
    return out;
}

/* ------------------------------------------------------------------ */
/* the async callback: no GIL, no Python                               */
/* ------------------------------------------------------------------ */
int asx_async_callback(SSL *s, void *arg)
{
    asx_conn *c = arg;
    asx_notifier *n = __atomic_load_n(&c->notifier, __ATOMIC_ACQUIRE);
    uint64_t id = c->id;

    (void)s;
    if (asx_is_worker_thread())
        __atomic_add_fetch(&c->cb_on_worker, 1, __ATOMIC_RELAXED);
    if (ASYNC_get_current_job() != NULL)
        __atomic_add_fetch(&c->cb_in_job, 1, __ATOMIC_RELAXED);
    /* the last touch of |c|: a connection whose job can never resume (conn.c,
     * job_dead) may be freed as soon as its owner sees this count move */
    __atomic_add_fetch(&c->wakeups, 1, __ATOMIC_RELEASE);
    if (n != NULL)
        asx_notifier_post(n, id);
    return 1;
}

