/*
 * flanneld_py._engine -- the data-plane hot loop of flanneld-py (flannel UDP backend wire format).
 *
 * One native thread per Engine (pthread created here, all signals blocked, named
 * "flanneld-engine"). It never touches a Python object: everything it reads or writes lives in the
 * C part of the Engine struct. Python talks to it only through
 *   - fixed-size commands (struct eng_cmd: set route, delete route, stop) on a SOCK_SEQPACKET
 *     socketpair; the loop polls its end and drains it before every batch (a relaxed counter
 *     `cmd_sent` tells it cheaply whether anything was written, so a route set before a packet
 *     is written is always applied before that packet is read);
 *   - counters: 64-bit words written only by the loop (relaxed atomic stores), read by stats();
 *   - `exited` + the error fields, written once by the loop when it stops on its own.
 * The route table is the loop's alone while it runs (before start and after the thread is gone,
 * Python applies commands to it directly).
 *
 * Pipeline, in packet vectors (pktvec: buffers + lengths + addresses, BATCH deep):
 *
 *   TUN -> UDP   tun_batch():   read() until EAGAIN or BATCH packets        -> tx vector
 *                classify_tx(): IPv4 checks, LPM(dst), TTL-1 (RFC 1624), ICMP errors into the TUN
 *                send_tx():     sendmmsg() of the survivors, each to <peer PublicIP>:<port>
 *   UDP -> TUN   udp_batch():   recvmmsg() up to BATCH datagrams (65536-byte buffers) -> rx vector
 *                classify_rx(): length/version/IHL/total length/checksum, sender == PublicIP of
 *                               the peer owning the inner source (one LPM), dst in local subnet,
 *                               TTL-1 (or drop + ICMP time exceeded back to the peer)
 *                write_rx():    write() each survivor into the TUN
 *
 * Batches never wait to fill: whatever one drain pass found is processed and sent at once. If the
 * UDP socket (or the TUN) answers EAGAIN, the rest of that vector is kept ("stalled"), the loop
 * polls for POLLOUT and stops reading the other fd meanwhile (backpressure instead of drops).
 *
 * Where segmentation offloads plug in (same vectors, same stages):
 *   - TUN IFF_VNET_HDR + TUNSETOFFLOAD: tun_batch() reads one super-packet + virtio_net_hdr and a
 *     split step fills several tx slots with MSS-sized segments before classify_tx();
 *   - UDP GSO: send_tx() groups consecutive same-peer, same-size slots into one msg with a
 *     UDP_SEGMENT cmsg (the vector already carries peer and length per slot);
 *   - UDP GRO: udp_batch() sets msg_control for the UDP_GRO cmsg and splits each coalesced read
 *     into slots before classify_rx(); write_rx() may coalesce TCP segments into one GSO write.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define BUFSZ 65536

/* ---- counters (names identical to pyengine.COUNTERS) ------------------------------------------ */

#define COUNTER_LIST(X)                                                                            \
    X(tun_rx_packets) X(tun_rx_bytes) X(tun_rx_batches) X(tun_rx_errors)                           \
    X(drop_tun_ipv6) X(drop_tun_malformed) X(drop_no_route) X(drop_tun_ttl)                        \
    X(udp_tx_packets) X(udp_tx_bytes) X(udp_tx_batches) X(udp_tx_errors) X(udp_tx_stalls)          \
    X(udp_rx_packets) X(udp_rx_bytes) X(udp_rx_batches) X(udp_rx_errors)                           \
    X(drop_udp_truncated) X(drop_udp_short) X(drop_udp_not_ipv4) X(drop_udp_bad_header)            \
    X(drop_udp_bad_length) X(drop_udp_bad_checksum) X(drop_udp_unknown_src)                        \
    X(drop_udp_wrong_peer) X(drop_udp_not_local) X(drop_udp_ttl) X(rx_oversize)                    \
    X(tun_tx_packets) X(tun_tx_bytes) X(tun_tx_errors) X(tun_tx_stalls)                            \
    X(icmp_unreachable_sent) X(icmp_time_exceeded_sent) X(icmp_suppressed)                         \
    X(route_commands) X(route_errors)

#define X_ENUM(n) C_##n,
enum { COUNTER_LIST(X_ENUM) N_CTR };
#undef X_ENUM
#define X_NAME(n) #n,
static const char *const ctr_names[N_CTR] = {COUNTER_LIST(X_NAME)};
#undef X_NAME

/* ---- byte helpers ----------------------------------------------------------------------------- */

static inline uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, v);
}

/* RFC 1071 checksum (0 over data that carries a valid checksum). */
static uint32_t csum(const uint8_t *p, size_t n)
{
    uint64_t s = 0;
    for (; n >= 2; p += 2, n -= 2)
        s += get16(p);
    if (n)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)~s & 0xffff;
}

/* TTL-1 with the RFC 1624 eqn. 3 update of the header checksum: HC' = ~(~HC + ~m + m'). */
static inline void ttl_dec(uint8_t *p)
{
    uint32_t old = get16(p + 8), new = old - 0x100;
    uint32_t s = (~get16(p + 10) & 0xffff) + (~old & 0xffff) + new;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    p[8] = (uint8_t)(new >> 8);
    put16(p + 10, ~s & 0xffff);
}

/* ---- route table: one open-addressing hash over (net, prefixlen), probed per length present --- */

typedef struct {
    uint32_t net, peer;
    uint8_t plen, used;
} rt_slot;

typedef struct {
    rt_slot *slots;
    uint32_t cap, count; /* cap is a power of two, load <= 1/2 */
    unsigned shift;      /* 64 - log2(cap) */
    uint32_t per_len[33];
    int norder; /* prefix lengths present, longest first, with their masks */
    uint8_t order[33];
    uint32_t omask[33];
} rt_table;

static inline uint32_t pfx_mask(unsigned plen) { return plen ? 0xffffffffu << (32 - plen) : 0; }

static inline uint32_t rt_home(const rt_table *t, uint32_t net, unsigned plen)
{
    return (uint32_t)(((((uint64_t)net << 6) | plen) * 0x9E3779B97F4A7C15ull) >> t->shift);
}

static int rt_init(rt_table *t)
{
    memset(t, 0, sizeof *t);
    t->cap = 16;
    t->shift = 60;
    t->slots = calloc(t->cap, sizeof *t->slots);
    return t->slots ? 0 : -1;
}

static void rt_free(rt_table *t)
{
    free(t->slots);
    t->slots = NULL;
}

static void rt_reorder(rt_table *t)
{
    t->norder = 0;
    for (int l = 32; l >= 0; l--)
        if (t->per_len[l]) {
            t->order[t->norder] = (uint8_t)l;
            t->omask[t->norder++] = pfx_mask((unsigned)l);
        }
}

static int rt_find(const rt_table *t, uint32_t net, unsigned plen)
{
    uint32_t m = t->cap - 1, i = rt_home(t, net, plen);
    for (;; i = (i + 1) & m) {
        const rt_slot *s = &t->slots[i];
        if (!s->used)
            return -1;
        if (s->net == net && s->plen == plen)
            return (int)i;
    }
}

static void rt_place(rt_slot *slots, const rt_table *t, rt_slot s)
{
    uint32_t m = t->cap - 1, i = rt_home(t, s.net, s.plen);
    while (slots[i].used)
        i = (i + 1) & m;
    slots[i] = s;
}

static int rt_grow(rt_table *t)
{
    if (t->cap >= (1u << 30))
        return -1;
    rt_table nt = *t;
    nt.cap = t->cap * 2;
    nt.shift = t->shift - 1;
    nt.slots = calloc(nt.cap, sizeof *nt.slots);
    if (!nt.slots)
        return -1;
    for (uint32_t i = 0; i < t->cap; i++)
        if (t->slots[i].used)
            rt_place(nt.slots, &nt, t->slots[i]);
    free(t->slots);
    *t = nt;
    return 0;
}

static int rt_insert(rt_table *t, uint32_t net, unsigned plen, uint32_t peer)
{
    net &= pfx_mask(plen);
    int i = rt_find(t, net, plen);
    if (i >= 0) {
        t->slots[i].peer = peer;
        return 0;
    }
    if ((t->count + 1) * 2 > t->cap && rt_grow(t) < 0)
        return -1;
    rt_slot s = {.net = net, .peer = peer, .plen = (uint8_t)plen, .used = 1};
    rt_place(t->slots, t, s);
    t->count++;
    if (t->per_len[plen]++ == 0)
        rt_reorder(t);
    return 0;
}

static int rt_remove(rt_table *t, uint32_t net, unsigned plen)
{
    net &= pfx_mask(plen);
    int found = rt_find(t, net, plen);
    if (found < 0)
        return 0;
    /* backward-shift deletion keeps every probe chain unbroken without tombstones */
    uint32_t m = t->cap - 1, i = (uint32_t)found, j = i;
    for (;;) {
        j = (j + 1) & m;
        if (!t->slots[j].used)
            break;
        uint32_t k = rt_home(t, t->slots[j].net, t->slots[j].plen);
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i].used = 0;
    t->count--;
    if (--t->per_len[plen] == 0)
        rt_reorder(t);
    return 1;
}

static inline int rt_lookup(const rt_table *t, uint32_t addr, uint32_t *net, unsigned *plen,
                            uint32_t *peer)
{
    uint32_t m = t->cap - 1;
    for (int k = 0; k < t->norder; k++) {
        uint32_t key = addr & t->omask[k];
        unsigned l = t->order[k];
        for (uint32_t i = rt_home(t, key, l);; i = (i + 1) & m) {
            const rt_slot *s = &t->slots[i];
            if (!s->used)
                break;
            if (s->net == key && s->plen == l) {
                if (net)
                    *net = key;
                if (plen)
                    *plen = l;
                *peer = s->peer;
                return 1;
            }
        }
    }
    return 0;
}

/* ---- engine ----------------------------------------------------------------------------------- */

enum { CMD_SET = 1, CMD_DEL = 2, CMD_STOP = 3 };
struct eng_cmd {
    uint32_t op, net, plen, peer; /* host byte order */
};

enum { ST_NEW, ST_RUNNING, ST_STOPPED };

typedef struct {
    uint8_t *buf[BATCH];
    uint32_t len[BATCH];
    struct sockaddr_in addr[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msg[BATCH];
    int n;            /* packets read into the vector */
    int ready[BATCH]; /* rx: slots to write into the TUN */
    int nready, head; /* packets to send, and how many are sent (head < nready: stalled) */
} pktvec;

typedef struct {
    PyObject_HEAD
    /* configuration, fixed at construction */
    int tun_fd, udp_fd;
    int cmd_rd, cmd_wr; /* loop end, Python end */
    uint32_t local_net, local_mask, local_addr, mtu;
    uint16_t port;
    /* lifecycle, Python side only */
    int state, started;
    pthread_t thread;
    /* shared with the loop */
    int exited;                /* atomic: set (release) by the loop as its last action */
    uint64_t cmd_sent;         /* atomic: commands written by Python */
    const char *error_what;    /* written by the loop before exited */
    int error_errno;
    uint64_t ctr[N_CTR];       /* written by the loop (relaxed), read by stats() */
    /* loop only */
    uint64_t cmd_done;
    rt_table rt;
    pktvec *tx, *rx;
    void *mem;
    size_t memlen;
    int tx_stalled, rx_stalled, fatal;
    uint8_t icmp[128];
} Engine;

static inline void ctr_add(Engine *e, int i, uint64_t v)
{
    __atomic_store_n(&e->ctr[i], __atomic_load_n(&e->ctr[i], __ATOMIC_RELAXED) + v,
                     __ATOMIC_RELAXED);
}
#define CTR(e, name, v) ctr_add((e), C_##name, (v))

static void set_fatal(Engine *e, const char *what, int err)
{
    if (!e->fatal) {
        e->error_what = what;
        e->error_errno = err;
    }
    e->fatal = 1;
}

/* Apply a set/delete command to the table; -1 when out of memory. */
static int apply_cmd(Engine *e, const struct eng_cmd *c)
{
    if (c->op == CMD_SET && rt_insert(&e->rt, c->net, c->plen, c->peer) < 0) {
        CTR(e, route_errors, 1);
        return -1;
    }
    if (c->op == CMD_DEL)
        rt_remove(&e->rt, c->net, c->plen);
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
        apply_cmd(e, &c);
    }
}

static inline int cmds_pending(Engine *e)
{
    return __atomic_load_n(&e->cmd_sent, __ATOMIC_ACQUIRE) != e->cmd_done;
}

/* May an ICMP error be sent about this (well-formed) packet? Same rules as packet.py. */
static int icmp_allowed(const uint8_t *p, uint32_t n, uint32_t ihl)
{
    if (get16(p + 6) & 0x1fff) /* not the first fragment */
        return 0;
    if (p[12] == 0 || p[12] == 127 || p[12] >= 224 || p[16] >= 224)
        return 0;
    if (p[9] == IPPROTO_ICMP) {
        if (n <= ihl)
            return 0;
        uint8_t t = p[ihl];
        if (t > 18 || t == 3 || t == 4 || t == 5 || t == 11 || t == 12)
            return 0;
    }
    return 1;
}

/* ICMP error from local_addr to the offender's source, quoting its header + 8 bytes. */
static uint32_t build_icmp(Engine *e, const uint8_t *p, uint32_t n, uint32_t ihl, uint8_t type)
{
    uint8_t *o = e->icmp;
    uint32_t q = ihl + 8 < n ? ihl + 8 : n, tot = 28 + q;
    memset(o, 0, 28);
    o[0] = 0x45;
    o[1] = 0xc0;
    put16(o + 2, tot);
    o[8] = 64;
    o[9] = IPPROTO_ICMP;
    put32(o + 12, e->local_addr);
    memcpy(o + 16, p + 12, 4);
    put16(o + 10, csum(o, 20));
    o[20] = type; /* code 0: net unreachable / TTL exceeded in transit */
    memcpy(o + 28, p, q);
    put16(o + 22, csum(o + 20, 8 + q));
    return tot;
}

static void icmp_to_tun(Engine *e, const uint8_t *p, uint32_t n, uint32_t ihl, uint8_t type)
{
    if (!icmp_allowed(p, n, ihl)) {
        CTR(e, icmp_suppressed, 1);
        return;
    }
    uint32_t len = build_icmp(e, p, n, ihl, type);
    ssize_t r;
    do
        r = write(e->tun_fd, e->icmp, len);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        CTR(e, tun_tx_errors, 1);
        return;
    }
    CTR(e, tun_tx_packets, 1);
    CTR(e, tun_tx_bytes, len);
    if (type == 3)
        CTR(e, icmp_unreachable_sent, 1);
    else
        CTR(e, icmp_time_exceeded_sent, 1);
}

static void icmp_to_peer(Engine *e, const uint8_t *p, uint32_t n, uint32_t ihl, uint32_t sender)
{
    if (!icmp_allowed(p, n, ihl)) {
        CTR(e, icmp_suppressed, 1);
        return;
    }
    uint32_t len = build_icmp(e, p, n, ihl, 11);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(e->port)};
    to.sin_addr.s_addr = htonl(sender);
    ssize_t r;
    do
        r = sendto(e->udp_fd, e->icmp, len, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof to);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        CTR(e, udp_tx_errors, 1);
        return;
    }
    CTR(e, udp_tx_packets, 1);
    CTR(e, udp_tx_bytes, (uint64_t)r);
    CTR(e, icmp_time_exceeded_sent, 1);
}

/* ---- TUN -> UDP ------------------------------------------------------------------------------- */

static void classify_tx(Engine *e, pktvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->n; i++) {
        uint8_t *p = v->buf[i];
        uint32_t n = v->len[i], peer;
        CTR(e, tun_rx_packets, 1);
        CTR(e, tun_rx_bytes, n);
        if (n >= 1 && p[0] >> 4 == 6) {
            CTR(e, drop_tun_ipv6, 1);
            continue;
        }
        uint32_t ihl = n ? (p[0] & 15u) * 4 : 0;
        if (n < 20 || p[0] >> 4 != 4 || ihl < 20 || ihl > n || get16(p + 2) != n) {
            CTR(e, drop_tun_malformed, 1);
            continue;
        }
        if (!rt_lookup(&e->rt, get32(p + 16), NULL, NULL, &peer)) {
            CTR(e, drop_no_route, 1);
            icmp_to_tun(e, p, n, ihl, 3);
            continue;
        }
        if (p[8] <= 1) {
            CTR(e, drop_tun_ttl, 1);
            icmp_to_tun(e, p, n, ihl, 11);
            continue;
        }
        ttl_dec(p);
        int k = v->nready++;
        v->iov[k].iov_base = p;
        v->iov[k].iov_len = n;
        v->addr[k].sin_family = AF_INET;
        v->addr[k].sin_port = htons(e->port);
        v->addr[k].sin_addr.s_addr = htonl(peer);
        struct msghdr *h = &v->msg[k].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_name = &v->addr[k];
        h->msg_namelen = sizeof v->addr[k];
        h->msg_iov = &v->iov[k];
        h->msg_iovlen = 1;
    }
}

static void send_tx(Engine *e)
{
    pktvec *v = e->tx;
    int was_stalled = e->tx_stalled;
    e->tx_stalled = 0;
    while (v->head < v->nready) {
        int r = sendmmsg(e->udp_fd, &v->msg[v->head], (unsigned)(v->nready - v->head),
                         MSG_DONTWAIT);
        if (r > 0) {
            CTR(e, udp_tx_batches, 1);
            CTR(e, udp_tx_packets, (uint64_t)r);
            uint64_t bytes = 0;
            for (int j = v->head; j < v->head + r; j++)
                bytes += v->msg[j].msg_len;
            CTR(e, udp_tx_bytes, bytes);
            v->head += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            e->tx_stalled = 1;
            if (!was_stalled)
                CTR(e, udp_tx_stalls, 1);
            return;
        }
        CTR(e, udp_tx_errors, 1); /* this message failed (EPERM, ENETUNREACH...): skip it */
        v->head++;
    }
    v->nready = v->head = 0;
}

/* One TUN batch; 1 if the TUN may hold more right now. */
static int tun_batch(Engine *e)
{
    pktvec *v = e->tx;
    int n = 0;
    while (n < BATCH) {
        ssize_t r = read(e->tun_fd, v->buf[n], BUFSZ);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                CTR(e, tun_rx_errors, 1);
                set_fatal(e, "TUN read failed", errno);
            }
            break;
        }
        if (r == 0) { /* a TUN never reads empty: this fd is at end of file */
            set_fatal(e, "TUN fd reached end of file", 0);
            break;
        }
        v->len[n++] = (uint32_t)r;
    }
    if (n == 0)
        return 0;
    CTR(e, tun_rx_batches, 1);
    v->n = n;
    classify_tx(e, v);
    send_tx(e);
    return n == BATCH && !e->tx_stalled && !e->fatal;
}

/* ---- UDP -> TUN ------------------------------------------------------------------------------- */

static void classify_rx(Engine *e, pktvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->n; i++) {
        uint8_t *p = v->buf[i];
        uint32_t n = v->msg[i].msg_len, peer;
        const struct sockaddr_in *sa = &v->addr[i];
        uint32_t sender = sa->sin_family == AF_INET ? ntohl(sa->sin_addr.s_addr) : 0;
        v->len[i] = n;
        CTR(e, udp_rx_packets, 1);
        CTR(e, udp_rx_bytes, n);
        if (v->msg[i].msg_hdr.msg_flags & MSG_TRUNC) {
            CTR(e, drop_udp_truncated, 1);
            continue;
        }
        if (n < 20) {
            CTR(e, drop_udp_short, 1);
            continue;
        }
        if (p[0] >> 4 != 4) {
            CTR(e, drop_udp_not_ipv4, 1);
            continue;
        }
        uint32_t ihl = (p[0] & 15u) * 4;
        if (ihl < 20 || ihl > n) {
            CTR(e, drop_udp_bad_header, 1);
            continue;
        }
        if (get16(p + 2) != n) {
            CTR(e, drop_udp_bad_length, 1);
            continue;
        }
        if (csum(p, ihl)) {
            CTR(e, drop_udp_bad_checksum, 1);
            continue;
        }
        if (!rt_lookup(&e->rt, get32(p + 12), NULL, NULL, &peer)) {
            CTR(e, drop_udp_unknown_src, 1);
            continue;
        }
        if (peer != sender) {
            CTR(e, drop_udp_wrong_peer, 1);
            continue;
        }
        if ((get32(p + 16) & e->local_mask) != e->local_net) {
            CTR(e, drop_udp_not_local, 1);
            continue;
        }
        if (p[8] <= 1) {
            CTR(e, drop_udp_ttl, 1);
            icmp_to_peer(e, p, n, ihl, sender);
            continue;
        }
        ttl_dec(p);
        if (n > e->mtu)
            CTR(e, rx_oversize, 1);
        v->ready[v->nready++] = i;
    }
}

static void write_rx(Engine *e)
{
    pktvec *v = e->rx;
    int was_stalled = e->rx_stalled;
    e->rx_stalled = 0;
    while (v->head < v->nready) {
        int i = v->ready[v->head];
        ssize_t r = write(e->tun_fd, v->buf[i], v->len[i]);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                e->rx_stalled = 1;
                if (!was_stalled)
                    CTR(e, tun_tx_stalls, 1);
                return;
            }
            CTR(e, tun_tx_errors, 1);
        } else {
            CTR(e, tun_tx_packets, 1);
            CTR(e, tun_tx_bytes, v->len[i]);
        }
        v->head++;
    }
    v->nready = v->head = 0;
}

/* One UDP batch; 1 if the socket may hold more right now. */
static int udp_batch(Engine *e)
{
    pktvec *v = e->rx;
    for (int i = 0; i < BATCH; i++) {
        struct msghdr *h = &v->msg[i].msg_hdr;
        h->msg_name = &v->addr[i];
        h->msg_namelen = sizeof v->addr[i];
        h->msg_iov = &v->iov[i];
        h->msg_iovlen = 1;
        h->msg_control = NULL;
        h->msg_controllen = 0;
        h->msg_flags = 0;
        v->addr[i].sin_family = AF_UNSPEC;
    }
    int r;
    do
        r = recvmmsg(e->udp_fd, v->msg, BATCH, MSG_DONTWAIT, NULL);
    while (r < 0 && errno == EINTR);
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            CTR(e, udp_rx_errors, 1);
        return 0;
    }
    CTR(e, udp_rx_batches, 1);
    v->n = r;
    classify_rx(e, v);
    write_rx(e);
    return r == BATCH && !e->rx_stalled;
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
            write_rx(e);
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

/* ---- Python glue ------------------------------------------------------------------------------ */

static int conv_u32(PyObject *o, void *out)
{
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    if (x > 0xffffffffULL) {
        PyErr_SetString(PyExc_ValueError, "an IPv4 address must fit in 32 bits");
        return 0;
    }
    *(uint32_t *)out = (uint32_t)x;
    return 1;
}

static int conv_plen(PyObject *o, void *out)
{
    long x = PyLong_AsLong(o);
    if (x == -1 && PyErr_Occurred())
        return 0;
    if (x < 0 || x > 32) {
        PyErr_Format(PyExc_ValueError, "prefix length %ld is not in 0..32", x);
        return 0;
    }
    *(unsigned *)out = (unsigned)x;
    return 1;
}

/* Send one command to the loop (GIL released). 0 sent, 1 loop gone, -1 error (errno). */
static int send_cmd(Engine *e, const struct eng_cmd *c)
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

static void free_vectors(Engine *e)
{
    if (e->mem)
        munmap(e->mem, e->memlen);
    free(e->tx);
    free(e->rx);
    e->mem = NULL;
    e->tx = e->rx = NULL;
}

static void engine_shutdown(Engine *e)
{
    if (e->state == ST_RUNNING) {
        e->state = ST_STOPPED; /* claimed: a concurrent stop() returns at once */
        struct eng_cmd c = {.op = CMD_STOP};
        Py_BEGIN_ALLOW_THREADS
        if (send_cmd(e, &c) < 0)
            shutdown(e->cmd_wr, SHUT_WR); /* the loop reads EOF and stops */
        pthread_join(e->thread, NULL);
        Py_END_ALLOW_THREADS
        free_vectors(e);
    }
    e->state = ST_STOPPED;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"tun_fd", "udp_fd", "local_net", "local_prefixlen", "local_addr",
                             "port",   "mtu",    NULL};
    int tun_fd, udp_fd, port, mtu;
    uint32_t net, addr;
    unsigned plen;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiO&O&O&ii:Engine", kwlist, &tun_fd, &udp_fd,
                                     conv_u32, &net, conv_plen, &plen, conv_u32, &addr, &port,
                                     &mtu))
        return NULL;
    int fds[2] = {tun_fd, udp_fd};
    const char *names[2] = {"tun_fd", "udp_fd"};
    for (int i = 0; i < 2; i++) {
        int fl = fds[i] < 0 ? -1 : fcntl(fds[i], F_GETFL);
        if (fl < 0) {
            PyErr_Format(PyExc_ValueError, "%s %d is not an open file descriptor", names[i],
                         fds[i]);
            return NULL;
        }
        if (!(fl & O_NONBLOCK)) {
            PyErr_Format(PyExc_ValueError, "%s %d must be non-blocking", names[i], fds[i]);
            return NULL;
        }
    }
    if (port < 1 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "UDP port %d is not in 1..65535", port);
        return NULL;
    }
    if (mtu < 68 || mtu > 65535) {
        PyErr_Format(PyExc_ValueError, "MTU %d is not in 68..65535", mtu);
        return NULL;
    }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e)
        return NULL;
    e->cmd_rd = e->cmd_wr = -1;
    e->tun_fd = tun_fd;
    e->udp_fd = udp_fd;
    e->local_mask = pfx_mask(plen);
    e->local_net = net & e->local_mask;
    e->local_addr = addr;
    e->port = (uint16_t)port;
    e->mtu = (uint32_t)mtu;
    e->state = ST_NEW;
    if (rt_init(&e->rt) < 0) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    e->cmd_rd = sv[0];
    e->cmd_wr = sv[1];
    return (PyObject *)e;
}

static void Engine_dealloc(Engine *e)
{
    engine_shutdown(e);
    if (e->cmd_rd >= 0)
        close(e->cmd_rd);
    if (e->cmd_wr >= 0)
        close(e->cmd_wr);
    rt_free(&e->rt);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_start(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (e->state != ST_NEW) {
        PyErr_SetString(PyExc_RuntimeError, e->state == ST_RUNNING
                                                ? "engine cannot start: it is running"
                                                : "engine cannot start: it is stopped");
        return NULL;
    }
    e->memlen = (size_t)2 * BATCH * BUFSZ;
    e->mem = mmap(NULL, e->memlen, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (e->mem == MAP_FAILED) {
        e->mem = NULL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->tx = calloc(1, sizeof *e->tx);
    e->rx = calloc(1, sizeof *e->rx);
    if (!e->tx || !e->rx) {
        free_vectors(e);
        return PyErr_NoMemory();
    }
    uint8_t *m = e->mem;
    for (int i = 0; i < BATCH; i++) {
        e->tx->buf[i] = m + (size_t)i * BUFSZ;
        e->rx->buf[i] = m + (size_t)(BATCH + i) * BUFSZ;
        e->rx->iov[i].iov_base = e->rx->buf[i];
        e->rx->iov[i].iov_len = BUFSZ;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits: signals stay Python's */
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        free_vectors(e);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_setname_np(e->thread, "flanneld-engine");
    e->state = ST_RUNNING;
    e->started = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *e, PyObject *Py_UNUSED(ignored))
{
    engine_shutdown(e);
    Py_RETURN_NONE;
}

static PyObject *engine_command(Engine *e, struct eng_cmd *c)
{
    int rc = 1;
    if (e->started) { /* the loop owns the table until it has exited */
        Py_BEGIN_ALLOW_THREADS
        rc = send_cmd(e, c);
        Py_END_ALLOW_THREADS
        if (rc < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* no loop thread (never started, or exited): the table is ours */
    if (rc == 1 && apply_cmd(e, c) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Engine_set_route(Engine *e, PyObject *args)
{
    struct eng_cmd c = {.op = CMD_SET};
    if (!PyArg_ParseTuple(args, "O&O&O&:set_route", conv_u32, &c.net, conv_plen, &c.plen,
                          conv_u32, &c.peer))
        return NULL;
    return engine_command(e, &c);
}

static PyObject *Engine_del_route(Engine *e, PyObject *args)
{
    struct eng_cmd c = {.op = CMD_DEL};
    if (!PyArg_ParseTuple(args, "O&O&:del_route", conv_u32, &c.net, conv_plen, &c.plen))
        return NULL;
    return engine_command(e, &c);
}

static PyObject *Engine_stats(Engine *e, PyObject *Py_UNUSED(ignored))
{
    uint64_t snap[N_CTR];
    snap[C_route_commands] = __atomic_load_n(&e->ctr[C_route_commands], __ATOMIC_ACQUIRE);
    for (int i = 0; i < N_CTR; i++)
        if (i != C_route_commands)
            snap[i] = __atomic_load_n(&e->ctr[i], __ATOMIC_RELAXED);
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < N_CTR; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(snap[i]);
        if (!v || PyDict_SetItemString(d, ctr_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *Engine_alive(Engine *e, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(e->state == ST_RUNNING &&
                           !__atomic_load_n(&e->exited, __ATOMIC_ACQUIRE));
}

static PyObject *Engine_error(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (!e->started || !__atomic_load_n(&e->exited, __ATOMIC_ACQUIRE) || !e->error_what)
        Py_RETURN_NONE;
    if (e->error_errno)
        return PyUnicode_FromFormat("%s: %s", e->error_what, strerror(e->error_errno));
    return PyUnicode_FromString(e->error_what);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the loop thread."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS,
     "Stop the loop and join its thread (idempotent); the fds stay open."},
    {"set_route", (PyCFunction)Engine_set_route, METH_VARARGS,
     "set_route(net, prefixlen, peer): add or replace a route (host-order ints)."},
    {"del_route", (PyCFunction)Engine_del_route, METH_VARARGS,
     "del_route(net, prefixlen): remove a route (no-op when absent)."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters as a dict."},
    {"alive", (PyCFunction)Engine_alive, METH_NOARGS, "Whether the loop thread is running."},
    {"error", (PyCFunction)Engine_error, METH_NOARGS,
     "Why the loop stopped on its own, or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(tun_fd, udp_fd, local_net, local_prefixlen, local_addr, port, mtu)",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* ---- RouteTable: the loop's table, exported so tests can hold it against routes.py ------------ */

typedef struct {
    PyObject_HEAD
    rt_table rt;
} RouteTableObject;

static PyObject *RouteTable_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, ":RouteTable") || (kw && PyDict_Size(kw))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "RouteTable() takes no arguments");
        return NULL;
    }
    RouteTableObject *t = (RouteTableObject *)type->tp_alloc(type, 0);
    if (!t)
        return NULL;
    if (rt_init(&t->rt) < 0) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    return (PyObject *)t;
}

static void RouteTable_dealloc(RouteTableObject *t)
{
    rt_free(&t->rt);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *RouteTable_insert(RouteTableObject *t, PyObject *args)
{
    uint32_t net, peer;
    unsigned plen;
    if (!PyArg_ParseTuple(args, "O&O&O&:insert", conv_u32, &net, conv_plen, &plen, conv_u32,
                          &peer))
        return NULL;
    if (rt_insert(&t->rt, net, plen, peer) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *RouteTable_remove(RouteTableObject *t, PyObject *args)
{
    uint32_t net;
    unsigned plen;
    if (!PyArg_ParseTuple(args, "O&O&:remove", conv_u32, &net, conv_plen, &plen))
        return NULL;
    return PyBool_FromLong(rt_remove(&t->rt, net, plen));
}

static PyObject *RouteTable_lookup(RouteTableObject *t, PyObject *arg)
{
    uint32_t addr, net, peer;
    unsigned plen;
    if (!conv_u32(arg, &addr))
        return NULL;
    if (!rt_lookup(&t->rt, addr, &net, &plen, &peer))
        Py_RETURN_NONE;
    return Py_BuildValue("(kIk)", (unsigned long)net, plen, (unsigned long)peer);
}

static Py_ssize_t RouteTable_len(RouteTableObject *t) { return (Py_ssize_t)t->rt.count; }

static PyMethodDef RouteTable_methods[] = {
    {"insert", (PyCFunction)RouteTable_insert, METH_VARARGS,
     "insert(net, prefixlen, peer): add or replace."},
    {"remove", (PyCFunction)RouteTable_remove, METH_VARARGS,
     "remove(net, prefixlen) -> bool."},
    {"lookup", (PyCFunction)RouteTable_lookup, METH_O,
     "lookup(addr) -> (net, prefixlen, peer) of the longest match, or None."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods RouteTable_as_sequence = {.sq_length = (lenfunc)RouteTable_len};

static PyTypeObject RouteTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py._engine.RouteTable",
    .tp_basicsize = sizeof(RouteTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's longest-prefix-match table (host-order int addresses).",
    .tp_new = RouteTable_new,
    .tp_dealloc = (destructor)RouteTable_dealloc,
    .tp_methods = RouteTable_methods,
    .tp_as_sequence = &RouteTable_as_sequence,
};

/* ---- module ----------------------------------------------------------------------------------- */

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flanneld_py._engine",
    .m_doc = "flanneld-py data-plane engine (C): Engine and RouteTable.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&RouteTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (!m)
        return NULL;
    PyObject *names = PyTuple_New(N_CTR);
    if (!names)
        goto fail;
    for (int i = 0; i < N_CTR; i++) {
        PyObject *s = PyUnicode_FromString(ctr_names[i]);
        if (!s) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    if (PyModule_AddObject(m, "COUNTERS", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        goto fail;
    }
    Py_INCREF(&RouteTableType);
    if (PyModule_AddObject(m, "RouteTable", (PyObject *)&RouteTableType) < 0) {
        Py_DECREF(&RouteTableType);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "BUFFER_SIZE", BUFSZ) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
