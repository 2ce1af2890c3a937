/*
 * pool.c -- worker threads that run private-key (and test-cipher) operations
 * for a paused OpenSSL ASYNC job, and the pause/notify protocol.
 *
 * Theory of operation
 * -------------------
 * Our provider code runs inside libssl, inside an ASYNC job when the SSL
 * object is in SSL_MODE_ASYNC (on the job's 32 KiB fibre stack: keep frames
 * small, no recursion).  asx_run() is the one place that decides:
 *
 *   - no job, no workers, or the pool closed  -> compute inline;
 *   - else build the notification route: the ASYNC_WAIT_CTX callback when
 *     the application set one (libssl forwards it to SSL_set_async_callback),
 *     else an eventfd we register with ASYNC_WAIT_CTX_set_wait_fd();
 *   - queue the request and loop on ASYNC_pause_job() until it is done.
 *
 * The request lives on the paused job's stack.  The worker publishes the
 * result (done=1), fires the notification, then sets released=1 and never
 * touches the request again.  A job resumed between done and released (an
 * early or spurious wake-up) spins with sched_yield() for the few
 * instructions the notification takes, so the SSL object (whose wait context
 * the callback goes through) can never be freed under the worker.
 *
 * Wake-ups are level-style on the application side: the callback may fire
 * before the pause (early), twice (duplicate), or for an operation that
 * never paused; the job simply pauses again while !done.
 *
 * fork(): a child inherits the pools but none of their threads.  A
 * pthread_atfork handler holds every pool's lock across fork() (so the
 * child's copy of a queue is consistent), and in the child empties the
 * queues (their requests belong to the parent's paused jobs), marks the
 * pools as having no workers (operations compute inline) and releases the
 * locks.  asx_pool_restart() then gives a child fresh workers (the Python
 * layer calls it from os.register_at_fork; a fork made from C without it
 * keeps computing inline, which is slow but correct).
 *
 * Fault injection (asx_faults) makes the same code path answer EAGAIN
 * (queue full: status EAGAIN, pause, the application reschedules the retry
 * and we submit on resume), ERR (status ERR, pause, then fail), notify
 * early or twice, notify only through the wait fd (status UNSUPPORTED), or
 * with latency.  Stats are atomics read by Offload.stats().
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <openssl/async.h>
#include <openssl/err.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>
#include <errno.h>

#include "asyncssl.h"

#define ADD(p, f, v) __atomic_add_fetch(&(p)->st.f, (v), __ATOMIC_RELAXED)

struct asx_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    asx_req *head, *tail;
    size_t queued;
    int nworkers;
    int accepting;           /* under mu */
    int stopping;            /* under mu */
    pthread_t *threads;
    int refs;                /* atomic */
    int want_workers;        /* as asked at creation: what a forked child restarts */
    int priority;            /* ASX_WORKERS_* */
    int priority_refused;    /* a worker could not lower itself (atomic) */
    cpu_set_t cpus;          /* where workers may run */
    int pin;                 /* cpus is set */
    asx_faults faults;       /* under mu */
    asx_pool_stats st;
    asx_pool *next_pool;     /* every live pool, for the fork handlers (g_pools_mu) */
};

static pthread_mutex_t g_pools_mu = PTHREAD_MUTEX_INITIALIZER;
static asx_pool *g_pools;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

static __thread int tl_worker;

int asx_is_worker_thread(void) { return tl_worker; }

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_us(long us)
{
    struct timespec ts;

    if (us <= 0)
        return;
    ts.tv_sec = us / 1000000;
    ts.tv_nsec = (us % 1000000) * 1000;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------ */
/* wait-fd route, for applications that set no callback                */
/* ------------------------------------------------------------------ */
typedef struct {
    int efd;
    int refs;   /* one for the ASYNC_WAIT_CTX, one per request in flight */
} fdnote;

static const char fdnote_key[] = "anyio-asyncssl";

static void fdnote_unref(fdnote *n)
{
    if (__atomic_sub_fetch(&n->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        close(n->efd);
        free(n);
    }
}

static void fdnote_cleanup(ASYNC_WAIT_CTX *ctx, const void *key, OSSL_ASYNC_FD fd,
                           void *custom)
{
    (void)ctx; (void)key; (void)fd;
    fdnote_unref(custom);
}

static fdnote *fdnote_get(ASYNC_WAIT_CTX *w)
{
    OSSL_ASYNC_FD fd;
    void *custom = NULL;
    fdnote *n;

    if (ASYNC_WAIT_CTX_get_fd(w, fdnote_key, &fd, &custom))
        return custom;
    if ((n = calloc(1, sizeof(*n))) == NULL)
        return NULL;
    n->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    n->refs = 1;
    if (n->efd < 0 || !ASYNC_WAIT_CTX_set_wait_fd(w, fdnote_key, n->efd, n, fdnote_cleanup)) {
        if (n->efd >= 0)
            close(n->efd);
        free(n);
        return NULL;
    }
    return n;
}

static void efd_signal(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof(one));

    (void)r;
}

static void efd_drain(int efd)
{
    uint64_t v;
    ssize_t r = read(efd, &v, sizeof(v));

    (void)r;
}

/* ------------------------------------------------------------------ */
/* workers                                                             */
/* ------------------------------------------------------------------ */
static void notify(asx_pool *p, asx_req *q)
{
    if (q->cb != NULL) {
        ADD(p, notify_callback, 1);
        q->cb(q->cb_arg);
    } else if (q->note != NULL) {
        ADD(p, notify_fd, 1);
        efd_signal(((fdnote *)q->note)->efd);
    }
}

static void complete(asx_pool *p, asx_req *q, int ret, unsigned long err)
{
    uint64_t lat = now_ns() - q->submit_ns;
    uint64_t mx = __atomic_load_n(&p->st.latency_ns_max, __ATOMIC_RELAXED);
    fdnote *note = q->note;

    while (lat > mx && !__atomic_compare_exchange_n(&p->st.latency_ns_max, &mx, lat, 1,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    ADD(p, latency_ns_total, lat);
    ADD(p, completed, 1);
    q->ret = ret;
    q->err = err;
    __atomic_store_n(&q->done, 1, __ATOMIC_RELEASE);
    notify(p, q);
    if (q->duplicate)
        notify(p, q);
    if (note != NULL)
        fdnote_unref(note);
    /* last touch: after this the job may return and its stack is gone */
    __atomic_store_n(&q->released, 1, __ATOMIC_RELEASE);
}

/* a worker lowers itself (never the loop thread): when the machine is busy
 * the event loop always wins, and signatures use what the loop leaves */
static void schedule_worker(asx_pool *p)
{
    int ok = 1;

    if (p->priority == ASX_WORKERS_IDLE) {
        struct sched_param sp;

        memset(&sp, 0, sizeof(sp));
        ok = pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0;
    } else if (p->priority == ASX_WORKERS_LOW) {
        /* on Linux a thread id names one thread: only this worker is niced */
        ok = setpriority(PRIO_PROCESS, (id_t)gettid(), 19) == 0;
    }
    if (!ok)
        __atomic_store_n(&p->priority_refused, 1, __ATOMIC_RELAXED);
    if (p->pin)
        pthread_setaffinity_np(pthread_self(), sizeof(p->cpus), &p->cpus);
    pthread_setname_np(pthread_self(), "asyncssl-work");
}

static void *worker_main(void *arg)
{
    asx_pool *p = arg;

    tl_worker = 1;
    schedule_worker(p);
    for (;;) {
        asx_req *q;
        int ret, latency_us;
        unsigned long err = 0;

        pthread_mutex_lock(&p->mu);
        while (p->head == NULL && !p->stopping)
            pthread_cond_wait(&p->cv, &p->mu);
        if (p->head == NULL) {       /* stopping and drained */
            pthread_mutex_unlock(&p->mu);
            break;
        }
        q = p->head;
        p->head = q->next;
        if (p->head == NULL)
            p->tail = NULL;
        p->queued--;
        latency_us = p->faults.latency_us;
        pthread_mutex_unlock(&p->mu);

        sleep_us(latency_us);
        ret = q->fn(q);
        if (ret <= 0) {
            ADD(p, errors, 1);
            err = ERR_peek_error();
            ERR_clear_error();     /* it would stay on this thread otherwise */
        }
        sleep_us((long)q->late_ms * 1000);
        complete(p, q, ret, err);
    }
    OPENSSL_thread_stop();
    return NULL;
}

/* fork handlers: hold every lock across fork(), then repair the child */
static void atfork_prepare(void)
{
    asx_pool *p;

    pthread_mutex_lock(&g_pools_mu);
    for (p = g_pools; p != NULL; p = p->next_pool)
        pthread_mutex_lock(&p->mu);
}

static void atfork_parent(void)
{
    asx_pool *p;

    for (p = g_pools; p != NULL; p = p->next_pool)
        pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&g_pools_mu);
}

static void atfork_child(void)
{
    asx_pool *p;

    for (p = g_pools; p != NULL; p = p->next_pool) {
        /* the requests are the parent's; the workers did not come along */
        p->head = p->tail = NULL;
        p->queued = 0;
        p->nworkers = 0;
        p->accepting = 0;
        pthread_cond_init(&p->cv, NULL);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_unlock(&g_pools_mu);
    asx_providers_after_fork_child();
}

static void atfork_register(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static int start_workers(asx_pool *p, int n)
{
    int i;

    for (i = 0; i < n; i++) {
        if (pthread_create(&p->threads[i], NULL, worker_main, p) != 0)
            break;
        p->nworkers++;
    }
    return p->nworkers;
}

int asx_pool_restart(asx_pool *p)
{
    int n;

    pthread_mutex_lock(&p->mu);
    if (p->stopping || p->nworkers > 0) {   /* closed by its owner, or running */
        n = p->nworkers;
        pthread_mutex_unlock(&p->mu);
        return n;
    }
    n = start_workers(p, p->want_workers);
    p->accepting = n > 0;
    pthread_mutex_unlock(&p->mu);
    return n;
}

int asx_pool_priority(asx_pool *p)
{
    return __atomic_load_n(&p->priority_refused, __ATOMIC_RELAXED) ? ASX_WORKERS_NORMAL
                                                                    : p->priority;
}

asx_pool *asx_pool_new(int nworkers, int priority, const int *cpus, size_t ncpus)
{
    asx_pool *p = calloc(1, sizeof(*p));

    if (p == NULL)
        return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->refs = 1;
    p->st.min_stack_headroom = -1;
    if (nworkers < 0)
        nworkers = 0;
    if (nworkers > 256)
        nworkers = 256;
    p->threads = calloc((size_t)(nworkers ? nworkers : 1), sizeof(pthread_t));
    if (p->threads == NULL) {
        free(p);
        return NULL;
    }
    p->want_workers = nworkers;
    p->priority = priority;
    CPU_ZERO(&p->cpus);
    for (size_t i = 0; i < ncpus; i++)
        if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) {
            CPU_SET(cpus[i], &p->cpus);
            p->pin = 1;
        }
    pthread_once(&g_atfork_once, atfork_register);
    pthread_mutex_lock(&g_pools_mu);
    p->next_pool = g_pools;
    g_pools = p;
    pthread_mutex_lock(&p->mu);    /* a fork() now must not see a half-made pool */
    pthread_mutex_unlock(&g_pools_mu);
    start_workers(p, nworkers);
    p->accepting = p->nworkers > 0;
    pthread_mutex_unlock(&p->mu);
    return p;
}

int asx_pool_workers(asx_pool *p)
{
    int n;

    pthread_mutex_lock(&p->mu);
    n = p->accepting ? p->nworkers : 0;
    pthread_mutex_unlock(&p->mu);
    return n;
}

void asx_pool_close(asx_pool *p)
{
    int i, n;

    pthread_mutex_lock(&p->mu);
    if (!p->accepting && p->stopping) {
        pthread_mutex_unlock(&p->mu);
        return;
    }
    p->accepting = 0;
    p->stopping = 1;
    n = p->nworkers;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < n; i++)
        pthread_join(p->threads[i], NULL);   /* workers drain the queue first */
}

void asx_pool_ref(asx_pool *p) { __atomic_add_fetch(&p->refs, 1, __ATOMIC_ACQ_REL); }

void asx_pool_unref(asx_pool *p)
{
    asx_pool **pp;

    if (p == NULL || __atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    asx_pool_close(p);
    pthread_mutex_lock(&g_pools_mu);
    for (pp = &g_pools; *pp != NULL; pp = &(*pp)->next_pool)
        if (*pp == p) {
            *pp = p->next_pool;
            break;
        }
    pthread_mutex_unlock(&g_pools_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

void asx_pool_get_stats(asx_pool *p, asx_pool_stats *out)
{
    /* each field is read atomically; the set is not a snapshot */
    uint64_t *src = (uint64_t *)&p->st, *dst = (uint64_t *)out;
    size_t i;

    for (i = 0; i < offsetof(asx_pool_stats, min_stack_headroom) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    out->min_stack_headroom = __atomic_load_n(&p->st.min_stack_headroom, __ATOMIC_RELAXED);
}

void asx_pool_reset_stats(asx_pool *p)
{
    uint64_t *dst = (uint64_t *)&p->st;
    size_t i;

    for (i = 0; i < offsetof(asx_pool_stats, min_stack_headroom) / sizeof(uint64_t); i++)
        __atomic_store_n(&dst[i], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&p->st.min_stack_headroom, -1, __ATOMIC_RELAXED);
}

void asx_pool_set_faults(asx_pool *p, const asx_faults *f)
{
    pthread_mutex_lock(&p->mu);
    p->faults = *f;
    pthread_mutex_unlock(&p->mu);
}

void asx_pool_get_faults(asx_pool *p, asx_faults *f)
{
    pthread_mutex_lock(&p->mu);
    *f = p->faults;
    pthread_mutex_unlock(&p->mu);
}

/* ------------------------------------------------------------------ */
/* the pause protocol                                                  */
/* ------------------------------------------------------------------ */
static void note_headroom(asx_pool *p, ASYNC_JOB *job)
{
    /* ASYNC_JOB starts with the fibre's ucontext on POSIX (async_posix.h) */
    volatile char here = 0;
    const ucontext_t *uc = (const ucontext_t *)job;
    int64_t free_bytes = (int64_t)((const char *)&here - (const char *)uc->uc_stack.ss_sp);
    int64_t cur = __atomic_load_n(&p->st.min_stack_headroom, __ATOMIC_RELAXED);

    if (uc->uc_stack.ss_size == 0 || free_bytes < 0
        || free_bytes > (int64_t)uc->uc_stack.ss_size)
        return;
    while ((cur < 0 || free_bytes < cur)
           && !__atomic_compare_exchange_n(&p->st.min_stack_headroom, &cur, free_bytes, 1,
                                           __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

enum { DECIDE_RUN, DECIDE_EAGAIN, DECIDE_ERR };

int asx_run(asx_pool *p, asx_req *q)
{
    ASYNC_JOB *job = ASYNC_get_current_job();
    ASYNC_WAIT_CTX *w;
    ASYNC_callback_fn cb = NULL;
    void *cb_arg = NULL;
    int decide, early = 0, fd_only = 0, inline_latency_us;
    fdnote *note = NULL;

    if (q->kind == ASX_REQ_SIGN)
        ADD(p, sign_ops, 1);
    else if (q->kind == ASX_REQ_DECRYPT)
        ADD(p, decrypt_ops, 1);
    else
        ADD(p, cipher_ops, 1);
    if (job == NULL || (w = ASYNC_get_wait_ctx(job)) == NULL)
        goto run_inline;
    note_headroom(p, job);

    for (;;) {
        pthread_mutex_lock(&p->mu);
        if (!p->accepting) {
            pthread_mutex_unlock(&p->mu);
            goto run_inline;
        }
        decide = DECIDE_RUN;
        if (p->faults.err_count > 0) {
            p->faults.err_count--;
            decide = DECIDE_ERR;
        } else if (p->faults.eagain_count > 0) {
            p->faults.eagain_count--;
            decide = DECIDE_EAGAIN;
        } else if (p->faults.max_queue > 0 && p->queued >= (size_t)p->faults.max_queue) {
            decide = DECIDE_EAGAIN;
        }
        if (decide == DECIDE_RUN) {
            if (p->faults.early_count > 0) {
                p->faults.early_count--;
                early = 1;
            }
            if (p->faults.duplicate_count > 0) {
                p->faults.duplicate_count--;
                q->duplicate = 1;
            }
            fd_only = p->faults.fd_only;
            q->late_ms = p->faults.late_ms;
        }
        pthread_mutex_unlock(&p->mu);
        if (decide == DECIDE_RUN)
            break;
        if (decide == DECIDE_ERR) {
            /* the engine failed: report ERR, pause once, then fail */
            ADD(p, errors, 1);
            ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_ERR);
            ADD(p, pauses, 1);
            ASYNC_pause_job();
            ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_OK);
            ERR_raise_data(ERR_LIB_ASYNC, ERR_R_OPERATION_FAIL,
                           "anyio-asyncssl offload: engine error (ASYNC_STATUS_ERR)");
            return 0;
        }
        /* queue full: the application reschedules us; resubmit on resume */
        ADD(p, queue_full, 1);
        ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_EAGAIN);
        ADD(p, pauses, 1);
        ASYNC_pause_job();
        ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_OK);
    }

    if (!fd_only && ASYNC_WAIT_CTX_get_callback(w, &cb, &cb_arg) && cb != NULL) {
        q->cb = cb;
        q->cb_arg = cb_arg;
        ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_OK);
    } else {
        if ((note = fdnote_get(w)) == NULL)
            goto run_inline;
        __atomic_add_fetch(&note->refs, 1, __ATOMIC_ACQ_REL);
        q->note = note;
        /* the callback (if any) is not used: tell the application to poll fds */
        ASYNC_WAIT_CTX_set_status(w, ASYNC_STATUS_UNSUPPORTED);
    }
    if (early && cb != NULL) {
        ADD(p, notify_callback, 1);
        cb(cb_arg);               /* a wake-up before the pause */
    }

    q->submit_ns = now_ns();
    q->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (!p->accepting) {          /* closed between the checks */
        pthread_mutex_unlock(&p->mu);
        if (note != NULL)
            fdnote_unref(note);
        q->note = NULL;
        goto run_inline;
    }
    if (p->tail)
        p->tail->next = q;
    else
        p->head = q;
    p->tail = q;
    p->queued++;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    ADD(p, submitted, 1);

    while (!__atomic_load_n(&q->done, __ATOMIC_ACQUIRE)) {
        ADD(p, pauses, 1);
        ASYNC_pause_job();
        if (!__atomic_load_n(&q->done, __ATOMIC_ACQUIRE))
            ADD(p, spurious_resumes, 1);
    }
    while (!__atomic_load_n(&q->released, __ATOMIC_ACQUIRE))
        sched_yield();            /* the worker is inside notify(): instructions */
    if (note != NULL)
        efd_drain(note->efd);     /* we clear our own wake signal */
    if (q->ret <= 0 && q->err != 0)
        ERR_raise_data(ERR_GET_LIB(q->err), ERR_GET_REASON(q->err),
                       "(offloaded operation failed on a worker thread)");
    return q->ret;

run_inline:
    ADD(p, inline_ops, 1);
    pthread_mutex_lock(&p->mu);
    inline_latency_us = p->faults.inline_latency_us;
    pthread_mutex_unlock(&p->mu);
    sleep_us(inline_latency_us);
    return q->fn(q);
}
