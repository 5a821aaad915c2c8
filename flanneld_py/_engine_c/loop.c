/*
 * loop.c -- the engine's life (loop.h): construction, start, the poll loop of the engine thread,
 * the command socketpair between Python and that thread, counter snapshots (per-peer entries
 * included), stop.
 */
#define _GNU_SOURCE 1

#include "loop.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "forward.h"

/* ---- per-peer counter entries (engine.h: "per-peer traffic") ---------------------------------- */

/* Entry i now belongs to net/plen -> peer (used) or to nobody, its counters zero. Packets still
 * waiting in a stalled send vector go to the address they were routed to, but no longer count
 * on this entry. */
static void pc_own(Engine *e, uint32_t i, uint32_t net, unsigned plen, uint32_t peer, int used)
{
    txvec *v = e->tx;
    for (int k = v ? v->head : 0; v && k < v->nready; k++)
        if (v->pk[v->ready[k]].pc == i)
            v->pk[v->ready[k]].pc = RT_NO_PC;
    peer_ctr *p = &e->pcs[i];
    uint32_t seq = __atomic_load_n(&p->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&p->seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the odd seq is seen before any change below */
    __atomic_store_n(&p->net, net, __ATOMIC_RELAXED);
    __atomic_store_n(&p->plen, (uint32_t)plen, __ATOMIC_RELAXED);
    __atomic_store_n(&p->peer, peer, __ATOMIC_RELAXED);
    __atomic_store_n(&p->used, (uint32_t)used, __ATOMIC_RELAXED);
    for (int k = 0; k < N_PC; k++)
        __atomic_store_n(&p->c[k], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&p->seq, seq + 2, __ATOMIC_RELEASE);
}

/* A free entry for net/plen -> peer, or RT_NO_PC when all PEER_SLOTS are in use. */
static uint32_t pc_take(Engine *e, uint32_t net, unsigned plen, uint32_t peer)
{
    uint32_t i = e->pc_free;
    if (i != RT_NO_PC) {
        e->pc_free = e->pcs[i].next_free;
    } else {
        i = e->pc_hi;
        if (i >= PEER_SLOTS)
            return RT_NO_PC;
    }
    pc_own(e, i, net, plen, peer, 1);
    if (i == e->pc_hi)
        __atomic_store_n(&e->pc_hi, i + 1, __ATOMIC_RELEASE);
    return i;
}

static void pc_drop(Engine *e, uint32_t i)
{
    if (i == RT_NO_PC)
        return;
    pc_own(e, i, 0, 0, 0, 0);
    e->pcs[i].next_free = e->pc_free;
    e->pc_free = i;
}

int pc_read(Engine *e, uint32_t i, peer_ctr *out)
{
    const peer_ctr *p = &e->pcs[i];
    for (;;) {
        uint32_t seq = __atomic_load_n(&p->seq, __ATOMIC_ACQUIRE);
        if (seq & 1) {
            sched_yield(); /* the loop is in the middle of pc_own: a few stores */
            continue;
        }
        out->net = __atomic_load_n(&p->net, __ATOMIC_RELAXED);
        out->plen = __atomic_load_n(&p->plen, __ATOMIC_RELAXED);
        out->peer = __atomic_load_n(&p->peer, __ATOMIC_RELAXED);
        out->used = __atomic_load_n(&p->used, __ATOMIC_RELAXED);
        for (int k = 0; k < N_PC; k++)
            out->c[k] = __atomic_load_n(&p->c[k], __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the reads above happen before the re-check */
        if (__atomic_load_n(&p->seq, __ATOMIC_RELAXED) == seq)
            return (int)out->used;
    }
}

uint32_t pc_count(Engine *e) { return __atomic_load_n(&e->pc_hi, __ATOMIC_ACQUIRE); }

/* ---- commands --------------------------------------------------------------------------------- */

int eng_apply_cmd(Engine *e, const struct eng_cmd *c)
{
    if (c->op == CMD_SET) {
        uint32_t net = c->net & pfx_mask(c->plen);
        rt_slot *s = rt_get(&e->rt, net, c->plen);
        if (s) {
            if (s->peer != c->peer && s->pc != RT_NO_PC) /* another host: its counts start anew */
                pc_own(e, s->pc, net, c->plen, c->peer, 1);
            s->peer = c->peer;
            s->flags = (uint8_t)c->flags;
        } else {
            uint32_t pc = pc_take(e, net, c->plen, c->peer);
            if (rt_insert(&e->rt, net, c->plen, c->peer, (uint8_t)c->flags, pc) < 0) {
                pc_drop(e, pc);
                CTR(e, route_errors, 1);
                return -1;
            }
        }
    }
    if (c->op == CMD_DEL) {
        rt_slot *s = rt_get(&e->rt, c->net, c->plen);
        if (s) {
            pc_drop(e, s->pc);
            rt_remove(&e->rt, c->net, c->plen);
        }
    }
    /* release: a reader that sees this count (stats() loads it first, acquire) also sees every
     * counter of the batches before it, as commands are applied only between batches */
    __atomic_store_n(&e->ctr[C_route_commands], e->ctr[C_route_commands] + 1, __ATOMIC_RELEASE);
    return 0;
}

/* Apply every queued command; 1 when the loop must stop. */
static int drain_cmds(Engine *e)
{
    struct eng_cmd c;
    for (;;) {
        ssize_t r = recv(e->cmd_rd, &c, sizeof c, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            set_fatal(e, "command socket failed", errno);
            return 1;
        }
        if (r == 0) /* Python end shut down */
            return 1;
        e->cmd_done++;
        if (r != (ssize_t)sizeof c)
            continue;
        if (c.op == CMD_STOP)
            return 1;
        eng_apply_cmd(e, &c);
    }
}

static inline int cmds_pending(Engine *e)
{
    return __atomic_load_n(&e->cmd_sent, __ATOMIC_ACQUIRE) != e->cmd_done;
}

int eng_send_cmd(Engine *e, const struct eng_cmd *c)
{
    for (;;) {
        if (__atomic_load_n(&e->exited, __ATOMIC_ACQUIRE))
            return 1;
        ssize_t r = send(e->cmd_wr, c, sizeof *c, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r == (ssize_t)sizeof *c) {
            __atomic_fetch_add(&e->cmd_sent, 1, __ATOMIC_RELEASE);
            return 0;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {.fd = e->cmd_wr, .events = POLLOUT};
            poll(&p, 1, 50); /* re-check `exited` now and then */
            continue;
        }
        return -1;
    }
}

/* ---- the loop --------------------------------------------------------------------------------- */

static void *engine_main(void *arg)
{
    Engine *e = arg;
    for (;;) {
        if (cmds_pending(e) && drain_cmds(e))
            break;
        struct pollfd p[3] = {
            {.fd = e->cmd_rd, .events = POLLIN},
            {.fd = e->tun_fd,
             .events = (short)((e->tx_stalled ? 0 : POLLIN) | (e->rx_stalled ? POLLOUT : 0))},
            {.fd = e->udp_fd,
             .events = (short)((e->rx_stalled ? 0 : POLLIN) | (e->tx_stalled ? POLLOUT : 0))},
        };
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            set_fatal(e, "poll failed", errno);
            break;
        }
        if ((p[0].revents | p[1].revents | p[2].revents) & POLLNVAL) {
            set_fatal(e, "a file descriptor was closed while the engine used it", EBADF);
            break;
        }
        if (p[0].revents && drain_cmds(e))
            break;
        if (p[1].revents & (POLLERR | POLLHUP)) {
            /* a real TUN reports this only once detached; a stand-in when its peer is gone */
            set_fatal(e, "TUN device failed (error or hang-up on its fd)", 0);
            break;
        }
        if (p[2].revents & POLLHUP) {
            set_fatal(e, "UDP socket hung up", 0);
            break;
        }
        if (p[2].revents & POLLERR) { /* clear a pending socket error, so poll does not spin */
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(e->udp_fd, SOL_SOCKET, SO_ERROR, &err, &len);
            CTR(e, udp_rx_errors, 1);
        }
        if (e->rx_stalled && (p[1].revents & POLLOUT))
            rx_process(e);
        if (e->tx_stalled && (p[2].revents & POLLOUT))
            send_tx(e);
        int tun_more = !e->tx_stalled && (p[1].revents & POLLIN);
        int udp_more = !e->rx_stalled && (p[2].revents & POLLIN);
        while ((tun_more || udp_more) && !e->fatal) {
            if (cmds_pending(e) && drain_cmds(e))
                goto out;
            if (tun_more)
                tun_more = tun_batch(e);
            if (udp_more && !e->fatal)
                udp_more = udp_batch(e);
        }
        if (e->fatal)
            break;
    }
out:
    __atomic_store_n(&e->exited, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* ---- life ------------------------------------------------------------------------------------- */

int eng_init(Engine *e, const eng_config *c)
{
    e->cmd_rd = e->cmd_wr = -1;
    e->tun_fd = c->tun_fd;
    e->udp_fd = c->udp_fd;
    e->local_mask = pfx_mask(c->local_prefixlen);
    e->local_net = c->local_net & e->local_mask;
    e->local_addr = c->local_addr;
    e->port = c->port;
    e->mtu = c->mtu;
    e->vnet = c->vnet_hdr;
    e->want_gso = c->udp_gso;
    e->want_gro = c->udp_gro;
    e->want_tun_gso = c->tun_gso;
    e->tun_csum = c->tun_gso;
    e->tun_uso = c->tun_gso && c->tun_uso;
    e->off[O_vnet_hdr] = (uint64_t)c->vnet_hdr;
    bucket_init(&e->icmp_tokens, ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC);
    e->state = ST_NEW;
    if (rt_init(&e->rt) < 0)
        return ENG_NOMEM;
    e->pc_free = RT_NO_PC;
    e->pcs = mmap(NULL, PEER_SLOTS * sizeof(peer_ctr), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (e->pcs == MAP_FAILED) {
        e->pcs = NULL;
        return ENG_NOMEM;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return ENG_OSERR;
    e->cmd_rd = sv[0];
    e->cmd_wr = sv[1];
    return ENG_OK;
}

void eng_destroy(Engine *e)
{
    if (e->cmd_rd >= 0)
        close(e->cmd_rd);
    if (e->cmd_wr >= 0)
        close(e->cmd_wr);
    e->cmd_rd = e->cmd_wr = -1;
    rt_free(&e->rt);
    if (e->pcs)
        munmap(e->pcs, PEER_SLOTS * sizeof(peer_ctr));
    e->pcs = NULL;
}

static void free_vectors(Engine *e)
{
    if (e->mem)
        munmap(e->mem, e->memlen);
    free(e->tx);
    free(e->rx);
    e->mem = NULL;
    e->tx = NULL;
    e->rx = NULL;
}

/* The socket is the caller's: leave it as it was given. */
static void clear_gro(Engine *e)
{
    if (e->gro_set) {
        int zero = 0;
        setsockopt(e->udp_fd, SOL_UDP, UDP_GRO, &zero, sizeof zero);
        e->gro_set = 0;
    }
}

int eng_start(Engine *e)
{
    size_t txlen = (size_t)BATCH * RBUF_STRIDE, rxlen = (size_t)BATCH * BUFSZ;
    e->memlen = txlen + rxlen + (size_t)PKTCAP * HDRSLOT;
    e->mem = mmap(NULL, e->memlen, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (e->mem == MAP_FAILED) {
        e->mem = NULL;
        return ENG_OSERR;
    }
    e->tx = calloc(1, sizeof *e->tx);
    e->rx = calloc(1, sizeof *e->rx);
    if (!e->tx || !e->rx) {
        free_vectors(e);
        return ENG_NOMEM;
    }
    uint8_t *m = e->mem;
    for (int i = 0; i < BATCH; i++) {
        e->tx->rbuf[i] = m + (size_t)i * RBUF_STRIDE;
        e->rx->buf[i] = m + txlen + (size_t)i * BUFSZ;
        e->rx->riov[i].iov_base = e->rx->buf[i];
        e->rx->riov[i].iov_len = BUFSZ;
    }
    e->tx->hdrs = m + txlen + rxlen;
    /* probe what was asked for: UDP_SEGMENT known to this kernel, UDP_GRO accepted */
    int one = 1, val = 0;
    socklen_t vlen = sizeof val;
    e->off[O_udp_gso] =
        (uint64_t)(e->want_gso && getsockopt(e->udp_fd, SOL_UDP, UDP_SEGMENT, &val, &vlen) == 0);
    e->gro_set = e->want_gro && setsockopt(e->udp_fd, SOL_UDP, UDP_GRO, &one, sizeof one) == 0;
    e->off[O_udp_gro] = (uint64_t)e->gro_set;
    e->off[O_tun_gso] = (uint64_t)e->want_tun_gso;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits: signals stay Python's */
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        free_vectors(e);
        clear_gro(e);
        errno = rc;
        return ENG_OSERR;
    }
    pthread_setname_np(e->thread, "flanneld-engine");
    e->state = ST_RUNNING;
    e->started = 1;
    return ENG_OK;
}

void eng_join(Engine *e)
{
    struct eng_cmd c = {.op = CMD_STOP};
    if (eng_send_cmd(e, &c) < 0)
        shutdown(e->cmd_wr, SHUT_WR); /* the loop reads EOF and stops */
    pthread_join(e->thread, NULL);
}

void eng_release(Engine *e)
{
    free_vectors(e);
    clear_gro(e);
}

void eng_set_icmp_ratelimit(Engine *e, uint32_t burst, uint32_t per_sec)
{
    bucket_init(&e->icmp_tokens, burst, per_sec);
}

/* ---- what Python reads ------------------------------------------------------------------------ */

int eng_exited(Engine *e) { return __atomic_load_n(&e->exited, __ATOMIC_ACQUIRE); }

void eng_stats(Engine *e, uint64_t out[N_CTR])
{
    out[C_route_commands] = __atomic_load_n(&e->ctr[C_route_commands], __ATOMIC_ACQUIRE);
    for (int i = 0; i < N_CTR; i++)
        if (i != C_route_commands)
            out[i] = __atomic_load_n(&e->ctr[i], __ATOMIC_RELAXED);
}

void eng_offloads(Engine *e, uint64_t out[N_OFF])
{
    for (int i = 0; i < N_OFF; i++)
        out[i] = __atomic_load_n(&e->off[i], __ATOMIC_RELAXED);
}
