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
 *   - counters: 64-bit words written only by the loop (relaxed atomic stores), read by stats()
 *     (the packet counters, identical to pyengine.COUNTERS) and offloads() (offload state and
 *     offload counters, C only);
 *   - `exited` + the error fields, written once by the loop when it stops on its own.
 * The route table is the loop's alone while it runs (before start and after the thread is gone,
 * Python applies commands to it directly).
 *
 * Pipeline, in packet vectors (a packet = header part + optional payload part, so a segment cut
 * from a super-packet needs no copy of its payload):
 *
 *   TUN -> UDP   tun_batch():   read() until EAGAIN, BATCH reads, or the vector is nearly full
 *                tun_ingest():  with IFF_VNET_HDR: a TSO super-packet (GSO_TCPV4) is split into
 *                               MSS segments (tso_split: IP length/id/checksum, TCP seq, FIN/PSH
 *                               on the last only, CWR on the first only, full TCP checksum); a
 *                               NEEDS_CSUM packet gets its checksum completed
 *                classify_tx(): per packet/segment: IPv4 checks, LPM(dst), TTL-1 (RFC 1624),
 *                               ICMP errors into the TUN
 *                send_tx():     sendmmsg() of the survivors to <peer PublicIP>:<port>; with UDP
 *                               GSO one message per run of same-peer, equal-size packets (the
 *                               last may be shorter, <= MAX_SEGS): the kernel cuts it back into
 *                               one datagram per packet, so the wire format is unchanged
 *   UDP -> TUN   udp_batch():   recvmmsg() up to BATCH messages (65536-byte buffers); with
 *                               UDP_GRO a message may hold several datagrams (cmsg: their size)
 *                rx_split():    messages -> datagrams
 *                classify_rx(): every datagram: length/version/IHL/total length/checksum, sender
 *                               == PublicIP of the peer owning the inner source (one LPM), dst in
 *                               local subnet, TTL-1 (or drop + ICMP time exceeded to the peer)
 *                write_rx():    writev() into the TUN; with IFF_VNET_HDR each write starts with a
 *                               virtio_net_hdr, and consecutive in-order segments of one TCP flow
 *                               (checksums verified) go as one GSO_TCPV4 super-packet
 *                               (NEEDS_CSUM, pseudo-header sum in the checksum field)
 *
 * ICMP errors (into the TUN, or time exceeded back to a peer) are rate-limited like the kernel's:
 * one token bucket (ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC) for all of them; without a token the error
 * is not sent and counted as icmp_ratelimited (the offending packet is dropped all the same).
 *
 * Batches never wait to fill: whatever one drain pass found is processed and sent at once. If the
 * UDP socket (or the TUN) answers EAGAIN, the rest of that vector is kept ("stalled"), the loop
 * polls for POLLOUT and stops reading the other fd meanwhile (backpressure instead of drops).
 *
 * Offloads and their fallbacks (each can be off; all off = the plain batched loop):
 *   vnet_hdr  the TUN fd was opened with IFF_VNET_HDR (fixed at construction: it is the framing
 *             of every read and write). TSO/CSUM reads are handled whenever they come.
 *   udp_gso   UDP_SEGMENT sends. Probed at start; if the kernel refuses a GSO send (EIO: no
 *             checksum offload on the route's device; EINVAL/EMSGSIZE), the loop turns it off
 *             for good, counts gso_errors and resends those packets one per datagram.
 *   udp_gro   UDP_GRO on the socket (set at start, cleared at stop).
 *   tun_gso   coalesced GSO writes into the TUN (needs vnet_hdr); a refused write turns it off
 *             (tun_gso_errors) and the packets go one by one.
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
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define BATCH 64     /* reads / messages per batch */
#define BUFSZ 65536  /* bytes per packet buffer */
#define PKTCAP 4096  /* packets (or segments) per vector */
#define HDRSLOT 128  /* header copy of one split segment: IPv4 (<= 60) + TCP (<= 60) */
#define RBUF_STRIDE (BUFSZ + 64)
#define PKT_OFF 16   /* where a packet starts in its read buffer (after the vnet header) */
#define MIN_MSS 48   /* Linux's floor for an MSS (tcp_min_snd_mss) */
/* the most segments one read can yield; reading stops while fewer slots are free */
#define SPLIT_RESERVE (BUFSZ / MIN_MSS + 2)
#define MAX_SEGS 64            /* packets per UDP GSO send and per coalesced TUN write */
#define GSO_MAX_BYTES 65507    /* UDP payload of one send: 65535 - IPv4 header - UDP header */
#define SUPER_MAX 65535        /* IPv4 total length of a coalesced packet */

/* ICMP error rate limit, modelled on the kernel's global ICMP limiter (icmp_global_allow): a token
 * bucket of net.ipv4.icmp_msgs_burst tokens refilled at net.ipv4.icmp_msgs_per_sec (their
 * defaults, below), shared by every ICMP error the engine sends (pyengine.py: the same numbers). */
#define ICMP_MSGS_BURST 50     /* net.ipv4.icmp_msgs_burst */
#define ICMP_MSGS_PER_SEC 1000 /* net.ipv4.icmp_msgs_per_sec */

/* struct virtio_net_hdr (host byte order: the TUN's default, legacy virtio on a LE host) */
#define VNET_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_ECN 0x80

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_ECE 0x40
#define TCP_CWR 0x80

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
    X(icmp_unreachable_sent) X(icmp_time_exceeded_sent) X(icmp_suppressed) X(icmp_ratelimited)     \
    X(route_commands) X(route_errors)

#define X_ENUM(n) C_##n,
enum { COUNTER_LIST(X_ENUM) N_CTR };
#undef X_ENUM
#define X_NAME(n) #n,
static const char *const ctr_names[N_CTR] = {COUNTER_LIST(X_NAME)};
#undef X_NAME

/* Offload state (0/1, the first four) and offload counters: Engine.offloads(). Packets that go
 * through an offload are still counted one by one in the counters above. */
#define OFFLOAD_LIST(X)                                                                            \
    X(vnet_hdr) X(udp_gso) X(udp_gro) X(tun_gso)                                                   \
    X(tso_packets) X(tso_segments) X(csum_completed) X(vnet_errors)                                \
    X(gso_sends) X(gso_segments) X(gso_errors) X(gso_errno)                                        \
    X(gro_reads) X(gro_segments)                                                                   \
    X(tun_gso_writes) X(tun_gso_segments) X(tun_gso_errors) X(tun_gso_errno) X(coalesce_bad_csum)

#define X_ENUM(n) O_##n,
enum { OFFLOAD_LIST(X_ENUM) N_OFF };
#undef X_ENUM
#define X_NAME(n) #n,
static const char *const off_names[N_OFF] = {OFFLOAD_LIST(X_NAME)};
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
static inline uint16_t hget16(const uint8_t *p) /* host order (virtio_net_hdr fields) */
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline void hput16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/* ---- checksums (RFC 1071) ----------------------------------------------------------------------
 * csum_add() sums bytes as native-endian 64-bit words with add-with-carry (a 128-bit accumulator:
 * the compiler emits add/adc), folding the carries back (end-around) at the end. Any 16-bit
 * aligned piece sums to the same ones' complement value in every lane, so pieces (pseudo-header,
 * header, payload) can be summed separately and added with csum_add64(), provided every piece but
 * the last has an even length. csum_fold() gives the 16-bit sum as a big-endian value. */

static inline uint64_t csum_add64(uint64_t a, uint64_t b)
{
    uint64_t s = a + b;
    return s + (s < b);
}

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

__extension__ typedef unsigned __int128 u128;

static uint64_t csum_add(uint64_t acc, const uint8_t *p, size_t n)
{
    u128 s = acc;
    while (n >= 64) {
        s += ld64(p);
        s += ld64(p + 8);
        s += ld64(p + 16);
        s += ld64(p + 24);
        s += ld64(p + 32);
        s += ld64(p + 40);
        s += ld64(p + 48);
        s += ld64(p + 56);
        p += 64;
        n -= 64;
    }
    while (n >= 8) {
        s += ld64(p);
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t t = 0;
        memcpy(&t, p, n); /* zero padded at the end: right for an odd last byte too */
        s += t;
    }
    return csum_add64((uint64_t)s, (uint64_t)(s >> 64));
}

/* a 16-bit big-endian quantity (e.g. a length of the pseudo-header) in csum_add()'s lanes */
static inline uint64_t csum_be16(uint32_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return ((v & 0xff) << 8) | ((v >> 8) & 0xff);
#else
    return v & 0xffff;
#endif
}

static inline uint32_t csum_fold(uint64_t s)
{
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    s = ((s & 0xff) << 8) | (s >> 8);
#endif
    return (uint32_t)s;
}

/* The Internet checksum of p[0..n) (0 over data that carries a valid checksum). */
static inline uint32_t csum(const uint8_t *p, size_t n) { return ~csum_fold(csum_add(0, p, n)) & 0xffff; }

/* Sum of the TCP/UDP pseudo-header of the IPv4 header at ip, for an L4 length of l4len. */
static inline uint64_t pseudo_sum(const uint8_t *ip, uint32_t l4len)
{
    uint64_t s = csum_add(0, ip + 12, 8);
    return csum_add64(s, csum_be16(ip[9]) + csum_be16(l4len));
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

/* One packet of a vector: p[0..hlen) then, for a segment cut from a super-packet, pay[0..plen)
 * (the payload stays in the read buffer). */
typedef struct {
    uint8_t *p, *pay;
    uint32_t hlen, plen;
    uint32_t addr;  /* tx: the peer's PublicIP; rx: the sender (host order) */
    uint8_t trunc;  /* rx: the datagram was truncated */
    uint8_t tcpok;  /* rx: TCP checksum 0 = not checked yet, 1 = valid, 2 = invalid */
} pkt;

static inline uint32_t pkt_len(const pkt *k) { return k->hlen + k->plen; }

typedef struct {
    _Alignas(struct cmsghdr) char buf[CMSG_SPACE(sizeof(int))];
} cmsgbuf;

typedef struct {
    uint8_t *rbuf[BATCH]; /* read buffers, RBUF_STRIDE apart; the packet at PKT_OFF */
    uint8_t *hdrs;        /* PKTCAP header copies of split segments */
    pkt pk[PKTCAP];
    int npk;
    int ready[PKTCAP];    /* packets to send, in order */
    int nready, head;     /* head < nready: stalled */
    struct iovec iov[2 * PKTCAP]; /* the message of ready[k..] uses iov[2k..] */
    struct mmsghdr msg[BATCH];
    struct sockaddr_in addr[BATCH];
    int msg_pkts[BATCH];
    cmsgbuf ctl[BATCH];
} txvec;

typedef struct {
    uint8_t *buf[BATCH];
    struct iovec riov[BATCH];
    struct sockaddr_in addr[BATCH];
    struct mmsghdr msg[BATCH];
    cmsgbuf ctl[BATCH];
    int nmsg, next_msg;   /* messages received, and the next one to split */
    uint32_t next_off;    /* where splitting next_msg resumes */
    pkt pk[PKTCAP];
    int npk;
    int ready[PKTCAP];
    int nready, head;     /* head < nready (or next_msg < nmsg): stalled */
    struct iovec wiov[MAX_SEGS + 2];
    uint8_t vhdr[VNET_LEN];   /* the header of the write being built */
    uint8_t shdr[HDRSLOT];    /* IP + TCP header of a coalesced write */
} rxvec;

/* The ICMP token bucket. Tokens in units of 1e-9 token, so that a refill of elapsed ns * rate is
 * exact (computed lazily, when an ICMP error is about to be sent); it starts full. */
#define NSEC_PER_SEC 1000000000ull
typedef struct {
    uint64_t tokens, cap; /* 1e-9 tokens; cap = burst * NSEC_PER_SEC */
    uint64_t rate;        /* tokens per second (= 1e-9 tokens per ns) */
    uint64_t stamp;       /* CLOCK_MONOTONIC ns of the last refill */
} icmp_bucket;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

static void bucket_init(icmp_bucket *b, uint32_t burst, uint32_t per_sec)
{
    b->cap = b->tokens = (uint64_t)burst * NSEC_PER_SEC;
    b->rate = per_sec;
    b->stamp = mono_ns();
}

/* Refill, then take one token: 1, or 0 when none is left. tokens = min(cap, tokens + dt * rate)
 * without overflow (pyengine's _icmp_token computes the same). */
static int bucket_take(icmp_bucket *b)
{
    uint64_t now = mono_ns(), dt = now - b->stamp, need = b->cap - b->tokens;
    b->stamp = now;
    if (b->rate && dt > need / b->rate)
        b->tokens = b->cap;
    else
        b->tokens += dt * b->rate;
    if (b->tokens < NSEC_PER_SEC)
        return 0;
    b->tokens -= NSEC_PER_SEC;
    return 1;
}

typedef struct {
    PyObject_HEAD
    /* configuration, fixed at construction */
    int tun_fd, udp_fd;
    int cmd_rd, cmd_wr; /* loop end, Python end */
    uint32_t local_net, local_mask, local_addr, mtu;
    uint16_t port;
    int vnet;                          /* the TUN fd carries a virtio_net_hdr */
    int want_gso, want_gro, want_tun_gso;
    /* lifecycle, Python side only */
    int state, started, gro_set;
    pthread_t thread;
    /* shared with the loop */
    int exited;                /* atomic: set (release) by the loop as its last action */
    uint64_t cmd_sent;         /* atomic: commands written by Python */
    const char *error_what;    /* written by the loop before exited */
    int error_errno;
    uint64_t ctr[N_CTR];       /* written by the loop (relaxed), read by stats() */
    uint64_t off[N_OFF];       /* written by start() before the thread, then by the loop */
    /* loop only */
    uint64_t cmd_done;
    rt_table rt;
    txvec *tx;
    rxvec *rx;
    void *mem;
    size_t memlen;
    int tx_stalled, rx_stalled, fatal;
    icmp_bucket icmp_tokens; /* set before start (new, set_icmp_ratelimit), then the loop's */
    uint8_t icmp[128];
} Engine;

static inline void ctr_add(Engine *e, int i, uint64_t v)
{
    __atomic_store_n(&e->ctr[i], __atomic_load_n(&e->ctr[i], __ATOMIC_RELAXED) + v,
                     __ATOMIC_RELAXED);
}
#define CTR(e, name, v) ctr_add((e), C_##name, (v))

static inline void off_add(Engine *e, int i, uint64_t v)
{
    __atomic_store_n(&e->off[i], __atomic_load_n(&e->off[i], __ATOMIC_RELAXED) + v,
                     __ATOMIC_RELAXED);
}
static inline void off_set(Engine *e, int i, uint64_t v)
{
    __atomic_store_n(&e->off[i], v, __ATOMIC_RELAXED);
}
static inline uint64_t off_get(Engine *e, int i)
{
    return __atomic_load_n(&e->off[i], __ATOMIC_RELAXED);
}
#define OFF(e, name, v) off_add((e), O_##name, (v))
#define OFF_ON(e, name) (off_get((e), O_##name) != 0)

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

/* ICMP error from local_addr to the offender's source, quoting its header + 8 bytes. p[0..n)
 * must hold at least min(ihl + 8, n) bytes (a split segment's header copy does). */
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

static const uint8_t zero_vnet[VNET_LEN];

/* May an ICMP error about p be sent now? Counts it as suppressed or rate-limited if not. */
static int icmp_may_send(Engine *e, const uint8_t *p, uint32_t n, uint32_t ihl)
{
    if (!icmp_allowed(p, n, ihl)) {
        CTR(e, icmp_suppressed, 1);
        return 0;
    }
    if (!bucket_take(&e->icmp_tokens)) {
        CTR(e, icmp_ratelimited, 1);
        return 0;
    }
    return 1;
}

static void icmp_to_tun(Engine *e, const uint8_t *p, uint32_t n, uint32_t ihl, uint8_t type)
{
    if (!icmp_may_send(e, p, n, ihl))
        return;
    uint32_t len = build_icmp(e, p, n, ihl, type);
    struct iovec iov[2] = {{(void *)zero_vnet, VNET_LEN}, {e->icmp, len}};
    ssize_t r;
    do
        r = e->vnet ? writev(e->tun_fd, iov, 2) : write(e->tun_fd, e->icmp, len);
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
    if (!icmp_may_send(e, p, n, ihl))
        return;
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

static inline void tx_add(txvec *v, uint8_t *p, uint32_t n)
{
    pkt *k = &v->pk[v->npk++];
    k->p = p;
    k->hlen = n;
    k->pay = NULL;
    k->plen = 0;
}

/* A read that cannot be used at all: counted as one malformed packet. */
static void tx_bad_read(Engine *e, uint32_t n)
{
    CTR(e, tun_rx_packets, 1);
    CTR(e, tun_rx_bytes, n);
    CTR(e, drop_tun_malformed, 1);
    OFF(e, vnet_errors, 1);
}

/* Cut the IPv4/TCP super-packet p[0..n) into segments of mss payload bytes, appended to v.
 * Each segment: the headers copied (total length, id + i, header checksum; seq + i * mss; FIN and
 * PSH only on the last, CWR only on the first; a full TCP checksum), its payload left in place.
 * 0 on success, -1 (nothing added) when the packet is not a well-formed one. */
static int tso_split(Engine *e, txvec *v, uint8_t *p, uint32_t n, uint32_t mss)
{
    if (n < 40 || p[0] >> 4 != 4 || p[9] != IPPROTO_TCP || get16(p + 2) != n)
        return -1;
    uint32_t ihl = (p[0] & 15u) * 4;
    if (ihl < 20 || ihl + 20 > n || (get16(p + 6) & 0x3fff)) /* no fragment of a super-packet */
        return -1;
    const uint8_t *th = p + ihl;
    uint32_t thl = (uint32_t)(th[12] >> 4) * 4, hl = ihl + thl;
    if (thl < 20 || hl > n || mss == 0)
        return -1;
    uint32_t pay = n - hl;
    uint32_t nseg = pay ? (pay + mss - 1) / mss : 1;
    if (nseg > (uint32_t)(PKTCAP - v->npk))
        return -1; /* an MSS below MIN_MSS: not from a Linux TCP */
    uint32_t id0 = get16(p + 4), seq0 = get32(th + 4);
    uint8_t flags = th[13];
    uint64_t addrs = csum_add(0, p + 12, 8); /* pseudo-header: src + dst ... */
    addrs = csum_add64(addrs, csum_be16(IPPROTO_TCP)); /* ... + protocol */
    const uint8_t *data = p + hl;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t off = i * mss, len = pay - off < mss ? pay - off : mss;
        uint8_t *h = v->hdrs + (size_t)v->npk * HDRSLOT;
        memcpy(h, p, hl);
        put16(h + 2, hl + len);
        put16(h + 4, (id0 + i) & 0xffff);
        put16(h + 10, 0);
        put16(h + 10, csum(h, ihl));
        uint8_t *t = h + ihl;
        put32(t + 4, seq0 + off);
        uint8_t f = flags;
        if (i + 1 < nseg)
            f &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i > 0)
            f &= (uint8_t)~TCP_CWR;
        t[13] = f;
        put16(t + 16, 0);
        uint64_t s = csum_add64(addrs, csum_be16(thl + len));
        s = csum_add(s, t, thl);
        s = csum_add(s, data + off, len);
        put16(t + 16, ~csum_fold(s) & 0xffff);
        pkt *k = &v->pk[v->npk++];
        k->p = h;
        k->hlen = hl;
        k->pay = (uint8_t *)data + off;
        k->plen = len;
    }
    OFF(e, tso_packets, 1);
    OFF(e, tso_segments, nseg);
    return 0;
}

/* One read from a vnet TUN: b[0..r) = virtio_net_hdr + packet. */
static void tun_ingest_vnet(Engine *e, txvec *v, uint8_t *b, uint32_t r)
{
    if (r < VNET_LEN) {
        tx_bad_read(e, r);
        return;
    }
    uint8_t *p = b + VNET_LEN;
    uint32_t n = r - VNET_LEN;
    uint8_t flags = b[0], gso = b[1];
    uint32_t gso_size = hget16(b + 4), cs_start = hget16(b + 6), cs_off = hget16(b + 8);
    if (n >= 1 && p[0] >> 4 == 6) { /* IPv6 (TSO6 too): classify_tx drops it */
        tx_add(v, p, n);
        return;
    }
    if (gso != VNET_GSO_NONE) {
        if ((gso & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 || tso_split(e, v, p, n, gso_size) < 0)
            tx_bad_read(e, n);
        return;
    }
    if (flags & VNET_F_NEEDS_CSUM) { /* complete the checksum the kernel left partial */
        if ((uint64_t)cs_start + cs_off + 2 > n || (cs_start & 1)) {
            tx_bad_read(e, n);
            return;
        }
        put16(p + cs_start + cs_off, ~csum_fold(csum_add(0, p + cs_start, n - cs_start)) & 0xffff);
        OFF(e, csum_completed, 1);
    }
    tx_add(v, p, n);
}

static void classify_tx(Engine *e, txvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->npk; i++) {
        pkt *k = &v->pk[i];
        uint8_t *p = k->p;
        uint32_t n = pkt_len(k), h = k->hlen, peer;
        CTR(e, tun_rx_packets, 1);
        CTR(e, tun_rx_bytes, n);
        if (h >= 1 && p[0] >> 4 == 6) {
            CTR(e, drop_tun_ipv6, 1);
            continue;
        }
        uint32_t ihl = h ? (p[0] & 15u) * 4 : 0;
        if (h < 20 || p[0] >> 4 != 4 || ihl < 20 || ihl > h || get16(p + 2) != n) {
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
        k->addr = peer;
        v->ready[v->nready++] = i;
    }
}

/* Messages for ready[head..]: with GSO, one per run of same-peer packets of one size (the last
 * may be shorter); else one per packet. Idempotent: rebuilt after a stall or a GSO refusal. */
static int build_msgs(Engine *e, txvec *v)
{
    int nm = 0, k = v->head;
    int gso = OFF_ON(e, udp_gso);
    while (nm < BATCH && k < v->nready) {
        const pkt *a = &v->pk[v->ready[k]];
        uint32_t size = pkt_len(a), total = size;
        int c = 1;
        if (gso && size <= e->mtu) {
            while (k + c < v->nready && c < MAX_SEGS) {
                const pkt *b = &v->pk[v->ready[k + c]];
                uint32_t l = pkt_len(b);
                if (b->addr != a->addr || l > size || l == 0 || total + l > GSO_MAX_BYTES)
                    break;
                total += l;
                c++;
                if (l < size)
                    break;
            }
        }
        struct iovec *iov = &v->iov[2 * k];
        int w = 0;
        for (int j = 0; j < c; j++) {
            const pkt *b = &v->pk[v->ready[k + j]];
            iov[w].iov_base = b->p;
            iov[w++].iov_len = b->hlen;
            if (b->plen) {
                iov[w].iov_base = b->pay;
                iov[w++].iov_len = b->plen;
            }
        }
        struct sockaddr_in *sa = &v->addr[nm];
        sa->sin_family = AF_INET;
        sa->sin_port = htons(e->port);
        sa->sin_addr.s_addr = htonl(a->addr);
        struct msghdr *h = &v->msg[nm].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_name = sa;
        h->msg_namelen = sizeof *sa;
        h->msg_iov = iov;
        h->msg_iovlen = (size_t)w;
        if (c > 1) {
            h->msg_control = v->ctl[nm].buf;
            h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)size;
            memcpy(CMSG_DATA(cm), &seg, sizeof seg);
        }
        v->msg_pkts[nm++] = c;
        k += c;
    }
    return nm;
}

static void send_tx(Engine *e)
{
    txvec *v = e->tx;
    int was_stalled = e->tx_stalled;
    e->tx_stalled = 0;
    while (v->head < v->nready) {
        int nm = build_msgs(e, v);
        int r = sendmmsg(e->udp_fd, v->msg, (unsigned)nm, MSG_DONTWAIT);
        if (r > 0) {
            CTR(e, udp_tx_batches, 1);
            uint64_t bytes = 0, pkts = 0;
            for (int j = 0; j < r; j++) {
                bytes += v->msg[j].msg_len;
                pkts += (uint64_t)v->msg_pkts[j];
                if (v->msg_pkts[j] > 1) {
                    OFF(e, gso_sends, 1);
                    OFF(e, gso_segments, (uint64_t)v->msg_pkts[j]);
                }
                v->head += v->msg_pkts[j];
            }
            CTR(e, udp_tx_packets, pkts);
            CTR(e, udp_tx_bytes, bytes);
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
        if (r < 0 && v->msg_pkts[0] > 1 &&
            (errno == EIO || errno == EINVAL || errno == EMSGSIZE)) {
            /* the kernel will not segment for us on this route: off for good, resend plainly */
            off_set(e, O_udp_gso, 0);
            off_set(e, O_gso_errno, (uint64_t)errno);
            OFF(e, gso_errors, 1);
            continue;
        }
        /* this message failed (EPERM, ENETUNREACH...): skip its packets */
        CTR(e, udp_tx_errors, (uint64_t)v->msg_pkts[0]);
        v->head += v->msg_pkts[0];
    }
    v->nready = v->head = 0;
}

/* One TUN batch; 1 if the TUN may hold more right now. */
static int tun_batch(Engine *e)
{
    txvec *v = e->tx;
    int n = 0, full = 0;
    size_t cap = e->vnet ? VNET_LEN + BUFSZ : BUFSZ;
    v->npk = 0;
    while (n < BATCH) {
        if (v->npk > PKTCAP - SPLIT_RESERVE) {
            full = 1;
            break;
        }
        uint8_t *b = v->rbuf[n] + (e->vnet ? PKT_OFF - VNET_LEN : PKT_OFF);
        ssize_t r = read(e->tun_fd, b, cap);
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
        n++;
        if (e->vnet)
            tun_ingest_vnet(e, v, b, (uint32_t)r);
        else
            tx_add(v, b, (uint32_t)r);
    }
    if (n == 0)
        return 0;
    CTR(e, tun_rx_batches, 1);
    classify_tx(e, v);
    send_tx(e);
    return (n == BATCH || full) && !e->tx_stalled && !e->fatal;
}

/* ---- UDP -> TUN ------------------------------------------------------------------------------- */

/* The datagrams of the received messages, from (next_msg, next_off) on, until the vector is full:
 * a UDP_GRO message holds several, each of the cmsg's size but the last. */
static void rx_split(Engine *e, rxvec *v)
{
    v->npk = 0;
    while (v->next_msg < v->nmsg && v->npk < PKTCAP) {
        int i = v->next_msg;
        struct msghdr *h = &v->msg[i].msg_hdr;
        uint32_t n = v->msg[i].msg_len, seg = 0;
        const struct sockaddr_in *sa = &v->addr[i];
        uint32_t sender = sa->sin_family == AF_INET ? ntohl(sa->sin_addr.s_addr) : 0;
        int trunc = (h->msg_flags & MSG_TRUNC) != 0;
        if (h->msg_controllen && !trunc) {
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm))
                if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO &&
                    cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
                    int g;
                    memcpy(&g, CMSG_DATA(cm), sizeof g);
                    seg = g > 0 ? (uint32_t)g : 0;
                }
        }
        if (seg == 0 || seg >= n) { /* one datagram (or a truncated read: one, and dropped) */
            pkt *k = &v->pk[v->npk++];
            *k = (pkt){.p = v->buf[i], .hlen = n, .addr = sender, .trunc = (uint8_t)trunc};
            v->next_msg++;
            continue;
        }
        if (v->next_off == 0)
            OFF(e, gro_reads, 1);
        uint32_t off = v->next_off;
        while (off < n && v->npk < PKTCAP) {
            uint32_t len = n - off < seg ? n - off : seg;
            pkt *k = &v->pk[v->npk++];
            *k = (pkt){.p = v->buf[i] + off, .hlen = len, .addr = sender};
            off += len;
            OFF(e, gro_segments, 1);
        }
        if (off >= n) {
            v->next_msg++;
            v->next_off = 0;
        } else {
            v->next_off = off;
        }
    }
}

static void classify_rx(Engine *e, rxvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->npk; i++) {
        pkt *k = &v->pk[i];
        uint8_t *p = k->p;
        uint32_t n = k->hlen, peer, sender = k->addr;
        CTR(e, udp_rx_packets, 1);
        CTR(e, udp_rx_bytes, n);
        if (k->trunc) {
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

/* Is p[0..n) a TCP data segment that may be part of a coalesced write? IPv4 without options or
 * fragmentation; ACK set, nothing but PSH/ECE besides (no SYN/FIN/RST/URG/CWR); payload > 0.
 * Then *thl = TCP header length. (IPv4/IHL/total length were checked by classify_rx.) */
static inline int tcp_candidate(const uint8_t *p, uint32_t n, uint32_t *thl)
{
    if (p[0] != 0x45 || p[9] != IPPROTO_TCP || (get16(p + 6) & 0x3fff) || n < 41)
        return 0;
    uint32_t t = (uint32_t)(p[32] >> 4) * 4;
    uint8_t f = p[33];
    if (t < 20 || 20 + t >= n || !(f & TCP_ACK) || (f & ~(TCP_ACK | TCP_PSH | TCP_ECE)))
        return 0;
    *thl = t;
    return 1;
}

/* TCP checksum of a candidate (IHL 5), checked once per packet: a coalesced write asks the
 * kernel to compute a fresh checksum, which must not hide a corrupted segment. */
static int tcp_valid(Engine *e, pkt *k)
{
    if (!k->tcpok) {
        uint32_t l4 = k->hlen - 20;
        uint64_t s = csum_add(pseudo_sum(k->p, l4), k->p + 20, l4);
        k->tcpok = csum_fold(s) == 0xffff ? 1 : 2;
        if (k->tcpok == 2)
            OFF(e, coalesce_bad_csum, 1);
    }
    return k->tcpok == 1;
}

/* How many ready packets from head on go into one write (1, or a coalesced run), with the write's
 * iovecs in v->wiov; *bytes = the inner packets' total. Rebuilt identically after a stall. */
static int build_write(Engine *e, rxvec *v, int *niov, uint64_t *bytes)
{
    int h = v->head, c = 1;
    pkt *a = &v->pk[v->ready[h]];
    uint32_t alen = a->hlen, thl;
    uint32_t hl = 0, mss = 0, total = alen;
    if (OFF_ON(e, tun_gso) && h + 1 < v->nready && tcp_candidate(a->p, alen, &thl) &&
        !(a->p[33] & TCP_PSH)) {
        const uint8_t *ap = a->p;
        hl = 20 + thl;
        mss = alen - hl;
        uint32_t seq = get32(ap + 24) + mss, id = get16(ap + 4);
        while (h + c < v->nready && c < MAX_SEGS) {
            pkt *b = &v->pk[v->ready[h + c]];
            const uint8_t *q = b->p;
            uint32_t bl = b->hlen, bthl;
            if (!tcp_candidate(q, bl, &bthl) || bthl != thl)
                break;
            uint32_t blen = bl - hl;
            if (blen > mss || total + blen > SUPER_MAX)
                break;
            if (memcmp(q, ap, 2) || memcmp(q + 6, ap + 6, 4) || memcmp(q + 12, ap + 12, 12) ||
                get16(q + 4) != ((id + (uint32_t)c) & 0xffff) || get32(q + 24) != seq ||
                memcmp(q + 28, ap + 28, 5) || (q[33] & ~TCP_PSH) != ap[33] ||
                memcmp(q + 34, ap + 34, 2) || memcmp(q + 38, ap + 38, 2 + thl - 20))
                break;
            if ((c == 1 && !tcp_valid(e, a)) || !tcp_valid(e, b))
                break;
            total += blen;
            seq += blen;
            c++;
            if (blen < mss || (q[33] & TCP_PSH))
                break;
        }
    }
    int w = 0;
    if (c == 1) {
        if (e->vnet) {
            v->wiov[w].iov_base = (void *)zero_vnet;
            v->wiov[w++].iov_len = VNET_LEN;
        }
        v->wiov[w].iov_base = a->p;
        v->wiov[w++].iov_len = alen;
        *niov = w;
        *bytes = alen;
        return 1;
    }
    /* one GSO_TCPV4 packet: the first segment's headers (length, PSH of the last, checksum field
     * = pseudo-header sum for the kernel to complete), then every segment's payload */
    const pkt *last = &v->pk[v->ready[h + c - 1]];
    uint8_t *s = v->shdr;
    memcpy(s, a->p, hl);
    put16(s + 2, total);
    put16(s + 10, 0);
    put16(s + 10, csum(s, 20));
    s[33] |= last->p[33] & TCP_PSH;
    put16(s + 36, csum_fold(pseudo_sum(s, total - 20)));
    uint8_t *vh = v->vhdr;
    vh[0] = VNET_F_NEEDS_CSUM;
    vh[1] = VNET_GSO_TCPV4;
    hput16(vh + 2, (uint16_t)hl);
    hput16(vh + 4, (uint16_t)mss);
    hput16(vh + 6, 20);
    hput16(vh + 8, 16);
    v->wiov[w].iov_base = vh;
    v->wiov[w++].iov_len = VNET_LEN;
    v->wiov[w].iov_base = s;
    v->wiov[w++].iov_len = hl;
    uint64_t sum = 0;
    for (int j = 0; j < c; j++) {
        const pkt *b = &v->pk[v->ready[h + j]];
        v->wiov[w].iov_base = b->p + hl;
        v->wiov[w++].iov_len = b->hlen - hl;
        sum += b->hlen;
    }
    *niov = w;
    *bytes = sum;
    return c;
}

/* Write ready[head..] into the TUN; sets rx_stalled on EAGAIN. */
static void write_rx(Engine *e, int was_stalled)
{
    rxvec *v = e->rx;
    while (v->head < v->nready) {
        int niov;
        uint64_t bytes;
        int c = build_write(e, v, &niov, &bytes);
        ssize_t r = writev(e->tun_fd, v->wiov, niov);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                e->rx_stalled = 1;
                if (!was_stalled)
                    CTR(e, tun_tx_stalls, 1);
                return;
            }
            if (c > 1) { /* the TUN refused a GSO packet: write one by one from now on */
                off_set(e, O_tun_gso, 0);
                off_set(e, O_tun_gso_errno, (uint64_t)errno);
                OFF(e, tun_gso_errors, 1);
                continue;
            }
            CTR(e, tun_tx_errors, 1);
        } else {
            CTR(e, tun_tx_packets, (uint64_t)c);
            CTR(e, tun_tx_bytes, bytes);
            if (c > 1) {
                OFF(e, tun_gso_writes, 1);
                OFF(e, tun_gso_segments, (uint64_t)c);
            }
        }
        v->head += c;
    }
    v->nready = v->head = 0;
}

/* Write what is pending, then split, check and write the rest of the received messages. */
static void rx_process(Engine *e)
{
    rxvec *v = e->rx;
    int was_stalled = e->rx_stalled;
    e->rx_stalled = 0;
    for (;;) {
        if (v->head < v->nready) {
            write_rx(e, was_stalled);
            if (e->rx_stalled)
                return;
        }
        if (v->next_msg >= v->nmsg)
            break;
        rx_split(e, v);
        classify_rx(e, v);
    }
    v->nmsg = v->next_msg = 0;
    v->next_off = 0;
}

/* One UDP batch; 1 if the socket may hold more right now. */
static int udp_batch(Engine *e)
{
    rxvec *v = e->rx;
    int gro = OFF_ON(e, udp_gro);
    for (int i = 0; i < BATCH; i++) {
        struct msghdr *h = &v->msg[i].msg_hdr;
        h->msg_name = &v->addr[i];
        h->msg_namelen = sizeof v->addr[i];
        h->msg_iov = &v->riov[i];
        h->msg_iovlen = 1;
        h->msg_control = gro ? v->ctl[i].buf : NULL;
        h->msg_controllen = gro ? sizeof v->ctl[i].buf : 0;
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
    v->nmsg = r;
    v->next_msg = 0;
    v->next_off = 0;
    rx_process(e);
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
    e->tx = NULL;
    e->rx = NULL;
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
        if (e->gro_set) { /* the socket is the caller's: leave it as it was given */
            int zero = 0;
            setsockopt(e->udp_fd, SOL_UDP, UDP_GRO, &zero, sizeof zero);
            e->gro_set = 0;
        }
    }
    e->state = ST_STOPPED;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"tun_fd",  "udp_fd",  "local_net", "local_prefixlen",
                             "local_addr", "port", "mtu", "vnet_hdr", "udp_gso", "udp_gro",
                             "tun_gso", NULL};
    int tun_fd, udp_fd, port, mtu, vnet = 0, gso = 0, gro = 0, tun_gso = 0;
    uint32_t net, addr;
    unsigned plen;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiO&O&O&ii|$pppp:Engine", kwlist, &tun_fd,
                                     &udp_fd, conv_u32, &net, conv_plen, &plen, conv_u32, &addr,
                                     &port, &mtu, &vnet, &gso, &gro, &tun_gso))
        return NULL;
    if (tun_gso && !vnet) {
        PyErr_SetString(PyExc_ValueError, "tun_gso needs a TUN fd opened with vnet_hdr");
        return NULL;
    }
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
    e->vnet = vnet;
    e->want_gso = gso;
    e->want_gro = gro;
    e->want_tun_gso = tun_gso;
    e->off[O_vnet_hdr] = (uint64_t)vnet;
    bucket_init(&e->icmp_tokens, ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC);
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
    size_t txlen = (size_t)BATCH * RBUF_STRIDE, rxlen = (size_t)BATCH * BUFSZ;
    e->memlen = txlen + rxlen + (size_t)PKTCAP * HDRSLOT;
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
        if (e->gro_set) {
            int zero = 0;
            setsockopt(e->udp_fd, SOL_UDP, UDP_GRO, &zero, sizeof zero);
            e->gro_set = 0;
        }
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

static PyObject *Engine_set_icmp_ratelimit(Engine *e, PyObject *args)
{
    long long burst, per_sec;
    if (!PyArg_ParseTuple(args, "LL:set_icmp_ratelimit", &burst, &per_sec))
        return NULL;
    if (burst < 0 || burst > INT32_MAX || per_sec < 0 || per_sec > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ICMP burst and rate must be in 0..2147483647");
        return NULL;
    }
    if (e->state != ST_NEW) { /* once started, the bucket is the loop's */
        PyErr_SetString(PyExc_RuntimeError, "the ICMP rate limit can only be set before start()");
        return NULL;
    }
    bucket_init(&e->icmp_tokens, (uint32_t)burst, (uint32_t)per_sec);
    Py_RETURN_NONE;
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

static PyObject *Engine_offloads(Engine *e, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < N_OFF; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(__atomic_load_n(&e->off[i], __ATOMIC_RELAXED));
        if (!v || PyDict_SetItemString(d, off_names[i], v) < 0) {
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
    {"set_icmp_ratelimit", (PyCFunction)Engine_set_icmp_ratelimit, METH_VARARGS,
     "set_icmp_ratelimit(burst, per_sec): before start(), replace the ICMP error token bucket "
     "(default ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC; it starts full). per_sec 0: no refill."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters as a dict."},
    {"offloads", (PyCFunction)Engine_offloads, METH_NOARGS,
     "Offload state (vnet_hdr, udp_gso, udp_gro, tun_gso: 0/1, as in effect now) and offload "
     "counters, as a dict."},
    {"alive", (PyCFunction)Engine_alive, METH_NOARGS, "Whether the loop thread is running."},
    {"error", (PyCFunction)Engine_error, METH_NOARGS,
     "Why the loop stopped on its own, or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(tun_fd, udp_fd, local_net, local_prefixlen, local_addr, port, mtu, *, "
              "vnet_hdr=False, udp_gso=False, udp_gro=False, tun_gso=False)",
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
    PyObject *onames = PyTuple_New(N_OFF);
    if (!onames)
        goto fail;
    for (int i = 0; i < N_OFF; i++) {
        PyObject *s = PyUnicode_FromString(off_names[i]);
        if (!s) {
            Py_DECREF(onames);
            goto fail;
        }
        PyTuple_SET_ITEM(onames, i, s);
    }
    if (PyModule_AddObject(m, "OFFLOAD_COUNTERS", onames) < 0) {
        Py_DECREF(onames);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
        PyModule_AddIntConstant(m, "BUFFER_SIZE", BUFSZ) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SEGMENTS", MAX_SEGS) < 0 ||
        PyModule_AddIntConstant(m, "VNET_HDR_LEN", VNET_LEN) < 0 ||
        PyModule_AddIntConstant(m, "ICMP_MSGS_BURST", ICMP_MSGS_BURST) < 0 ||
        PyModule_AddIntConstant(m, "ICMP_MSGS_PER_SEC", ICMP_MSGS_PER_SEC) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
