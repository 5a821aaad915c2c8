/*
 * engine.h -- flanneld_py._engine, the data-plane hot loop of flanneld-py (flannel UDP backend
 * wire format): the state shared by its sources. Internal: nothing here is Python's.
 *
 * The sources (one extension module, flanneld_py._engine):
 *   packet.[ch]   IPv4/TCP byte access, checksums, the ICMP errors' bytes
 *   routes.[ch]   the LPM route table
 *   offload.[ch]  virtio_net_hdr reads (TSO split, checksum completion), UDP GSO message runs,
 *                 UDP GRO datagram split, coalesced TCP writes into the TUN
 *   forward.[ch]  the two per-batch pipelines below, and the rate-limited ICMP errors
 *   loop.[ch]     the engine's life: construction, start (buffers, probes, the thread), the poll
 *                 loop, the command socketpair, counter snapshots, stop
 *   module.c      the CPython binding (Engine, RouteTable, module constants); the only source that
 *                 includes Python.h
 *
 * One native thread per Engine (pthread created in loop.c, all signals blocked, named
 * "flanneld-engine"). It never touches a Python object: everything it reads or writes lives in
 * the Engine struct below. Python talks to it only through
 *   - fixed-size commands (struct eng_cmd: set route, delete route, stop) on a SOCK_SEQPACKET
 *     socketpair; the loop polls its end and drains it before every batch (a relaxed counter
 *     `cmd_sent` tells it cheaply whether anything was written, so a route set before a packet
 *     is written is always applied before that packet is read);
 *   - counters: 64-bit words written only by the loop (relaxed atomic stores), read by stats()
 *     (the packet counters, identical to engine_types.COUNTERS) and offloads() (offload state and
 *     offload counters, C only);
 *   - per-peer counters: one peer_ctr entry per route (below), found by Python without a lock
 *     (each entry's `seq` says whether its owner is changing; pc_read() in loop.c);
 *   - `exited` + the error fields, written once by the loop when it stops on its own.
 * The route table is the loop's alone while it runs (before start and after the thread is gone,
 * Python applies commands to it directly).
 *
 * Pipeline, in packet vectors (a packet = header part + optional payload part, so a segment cut
 * from a super-packet needs no copy of its payload):
 *
 *   TUN -> UDP   tun_batch():   read() until EAGAIN, BATCH reads, or the vector is nearly full
 *                tun_ingest_vnet(): with IFF_VNET_HDR: a TSO super-packet (GSO_TCPV4) is split
 *                               into MSS segments (tso_split: IP length/id/checksum, TCP seq,
 *                               FIN/PSH on the last only, CWR on the first only, TCP checksum
 *                               left partial: the pseudo-header sum); a USO super-packet
 *                               (GSO_UDP_L4) into its datagrams (uso_split, the same way); a
 *                               NEEDS_CSUM TCP/UDP packet keeps its partial checksum too
 *                classify_tx(): per packet/segment: IPv4 checks, LPM(dst), TTL-1 (RFC 1624),
 *                               ICMP errors into the TUN; a partial checksum is completed
 *                               (tx_complete) unless the route's peer takes it partial
 *                               (RT_PEER_PARTIAL_CSUM: its lease advertises it)
 *                send_tx():     sendmmsg() of the survivors to <peer PublicIP>:<port>; with UDP
 *                               GSO one message per run of same-route, same-flow, equal-size
 *                               packets (the last may be shorter, <= MAX_SEGS; build_msgs; one
 *                               flow: the receiver steers a bundle to one thread): the kernel cuts it
 *                               back into one datagram per packet, so the wire format is unchanged
 *   UDP -> TUN   udp_batch():   recvmmsg() up to BATCH messages (65536-byte buffers); with
 *                               UDP_GRO a message may hold several datagrams (cmsg: their size)
 *                rx_split():    messages -> datagrams
 *                classify_rx(): every datagram: length/version/IHL/total length/checksum, sender
 *                               == PublicIP of the peer owning the inner source (one LPM), dst in
 *                               local subnet, TTL-1 (or drop + ICMP time exceeded to the peer)
 *                write_rx():    writev() into the TUN; with IFF_VNET_HDR each write starts with a
 *                               virtio_net_hdr, and consecutive in-order segments of one TCP flow
 *                               go as one GSO_TCPV4 super-packet (NEEDS_CSUM, pseudo-header sum
 *                               in the checksum field; build_write); with tun_uso datagrams of
 *                               one UDP flow (ids one up each) go as one GSO_UDP_L4 packet,
 *                               which the kernel cuts up again. With tun_csum a TCP/UDP
 *                               packet written alone goes with NEEDS_CSUM too. No pass over the
 *                               payload: the outer UDP checksum, checked by the kernel, covered
 *                               the inner packet, and a peer may have left its checksum partial
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
 *   tun_csum  (on with tun_gso, stays on) single TCP/UDP writes with NEEDS_CSUM; what lets the
 *             daemon advertise that it takes partial checksums.
 *   tun_uso   (with tun_gso, when the TUN accepted TUN_F_USO4|USO6) coalesced UDP writes; off
 *             with tun_gso when a GSO write is refused.
 *
 * Functions shared between sources have hidden visibility (the module exports only its init).
 */
#ifndef FLANNELD_ENGINE_ENGINE_H
#define FLANNELD_ENGINE_ENGINE_H

#ifndef _GNU_SOURCE
#error "define _GNU_SOURCE before the first #include (recvmmsg, sendmmsg, struct mmsghdr)"
#endif

#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "packet.h"
#include "routes.h"

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

/* struct virtio_net_hdr: its length (the rest of it is offload.h's) */
#define VNET_LEN 10

/* the virtio_net_hdr of a plain write (no GSO, no checksum to complete) */
static const uint8_t zero_vnet[VNET_LEN];

/* ---- counters (names identical to engine_types.COUNTERS) -------------------------------------- */

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

/* Offload state (0/1, the first four) and offload counters: Engine.offloads(). Packets that go
 * through an offload are still counted one by one in the counters above. */
#define OFFLOAD_LIST(X)                                                                            \
    X(vnet_hdr) X(udp_gso) X(udp_gro) X(tun_gso)                                                   \
    X(tso_packets) X(tso_segments) X(csum_completed) X(vnet_errors)                                \
    X(gso_sends) X(gso_segments) X(gso_errors) X(gso_errno)                                        \
    X(gro_reads) X(gro_segments)                                                                   \
    X(tun_gso_writes) X(tun_gso_segments) X(tun_gso_errors) X(tun_gso_errno)                       \
    X(csum_partial_sent) X(tun_csum_writes) X(uso_packets) X(uso_segments)                         \
    X(tun_uso_writes) X(tun_uso_segments)

#define X_ENUM(n) O_##n,
enum { OFFLOAD_LIST(X_ENUM) N_OFF };
#undef X_ENUM

/* ---- commands and lifecycle ------------------------------------------------------------------- */

enum { CMD_SET = 1, CMD_DEL = 2, CMD_STOP = 3 };
struct eng_cmd {
    uint32_t op, net, plen, peer; /* host byte order */
    uint32_t flags;               /* CMD_SET: RT_PEER_* */
};

enum { ST_NEW, ST_RUNNING, ST_STOPPED };

/* ---- per-peer traffic ------------------------------------------------------------------------- */

/* What one route carried since it was set (or since its peer changed): packets and bytes sent to
 * its peer (messages the kernel took) and received from it (datagrams that passed every check).
 * PEER_SLOTS entries, mapped at eng_init (a page is touched only once an entry on it is used).
 * The loop alone writes them; it changes whom an entry belongs to (net, plen, peer, used) between
 * two increments of `seq` (odd meanwhile, a seqlock) and zeroes the counters then, so a reader
 * that sees the same even `seq` before and after its reads has a consistent entry. */
#define PEER_SLOTS 65536u
enum { PC_TX_PACKETS, PC_TX_BYTES, PC_RX_PACKETS, PC_RX_BYTES, N_PC };
typedef struct {
    uint32_t seq;
    uint32_t net, peer, plen, used;
    uint32_t next_free; /* loop only: the next free entry, or RT_NO_PC */
    uint64_t c[N_PC];
    uint8_t pad[64 - 6 * 4 - N_PC * 8];
} peer_ctr;
_Static_assert(sizeof(peer_ctr) == 64, "one peer_ctr per cache line");

/* ---- packet vectors --------------------------------------------------------------------------- */

/* One packet of a vector: p[0..hlen) then, for a segment cut from a super-packet, pay[0..plen)
 * (the payload stays in the read buffer). */
typedef struct {
    uint8_t *p, *pay;
    uint32_t hlen, plen;
    uint32_t addr;     /* tx: the peer's PublicIP; rx: the sender (host order) */
    uint32_t pc;       /* tx: the route's per-peer counter entry (or RT_NO_PC) */
    uint16_t cs_start; /* tx, partial: the TCP/UDP header's offset in p */
    uint8_t cs_off;    /* tx, partial: the checksum field's offset in that header (16, 6) */
    uint8_t partial;   /* tx: the TCP/UDP checksum holds only the pseudo-header sum */
    uint8_t trunc;     /* rx: the datagram was truncated */
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
    int csum_write;           /* that write is one packet with NEEDS_CSUM */
    int gso_udp;              /* that write is a coalesced GSO_UDP_L4 packet */
    uint8_t shdr[HDRSLOT];    /* IP + TCP header of a coalesced write */
} rxvec;

/* Append p[0..n) to a TUN -> UDP vector as one whole packet. */
static inline void tx_add(txvec *v, uint8_t *p, uint32_t n)
{
    pkt *k = &v->pk[v->npk++];
    k->p = p;
    k->hlen = n;
    k->pay = NULL;
    k->plen = 0;
    k->partial = 0;
}

/* The ICMP token bucket. Tokens in units of 1e-9 token, so that a refill of elapsed ns * rate is
 * exact (computed lazily, when an ICMP error is about to be sent); it starts full. */
#define NSEC_PER_SEC 1000000000ull
typedef struct {
    uint64_t tokens, cap; /* 1e-9 tokens; cap = burst * NSEC_PER_SEC */
    uint64_t rate;        /* tokens per second (= 1e-9 tokens per ns) */
    uint64_t stamp;       /* CLOCK_MONOTONIC ns of the last refill */
} icmp_bucket;

/* ---- the engine ------------------------------------------------------------------------------- */

typedef struct {
    /* configuration, fixed at construction */
    int tun_fd, udp_fd;
    int cmd_rd, cmd_wr; /* loop end, Python end */
    uint32_t local_net, local_mask, local_addr, mtu;
    uint16_t port;
    int vnet;                          /* the TUN fd carries a virtio_net_hdr */
    int want_gso, want_gro, want_tun_gso;
    int tun_csum;                      /* rx: TCP/UDP written with NEEDS_CSUM (= want_tun_gso) */
    int tun_uso;                       /* rx: UDP datagrams coalesced into GSO_UDP_L4 writes */
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
    peer_ctr *pcs;             /* PEER_SLOTS entries; see "per-peer traffic" */
    uint32_t pc_hi;            /* atomic: entries [0, pc_hi) have been used (release, by the loop) */
    uint32_t pc_free;          /* the loop's: the first free entry below pc_hi, or RT_NO_PC */
    /* loop only */
    uint64_t cmd_done;
    rt_table rt;
    txvec *tx;
    rxvec *rx;
    void *mem;
    size_t memlen;
    int tx_stalled, rx_stalled, fatal;
    icmp_bucket icmp_tokens; /* set before start (new, set_icmp_ratelimit), then the loop's */
    uint8_t icmp[ICMP_BUFSZ];
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

/* Count packets/bytes on entry pc (PC_TX_PACKETS or PC_RX_PACKETS, then its bytes). */
static inline void pc_add(Engine *e, uint32_t pc, int which, uint64_t packets, uint64_t bytes)
{
    if (pc == RT_NO_PC)
        return;
    uint64_t *c = &e->pcs[pc].c[which];
    __atomic_store_n(&c[0], __atomic_load_n(&c[0], __ATOMIC_RELAXED) + packets, __ATOMIC_RELAXED);
    __atomic_store_n(&c[1], __atomic_load_n(&c[1], __ATOMIC_RELAXED) + bytes, __ATOMIC_RELAXED);
}
#define OFF_ON(e, name) (off_get((e), O_##name) != 0)

/* The loop must stop: the first reason is kept (read by Python once `exited` is set). */
static inline void set_fatal(Engine *e, const char *what, int err)
{
    if (!e->fatal) {
        e->error_what = what;
        e->error_errno = err;
    }
    e->fatal = 1;
}

#endif
