/*
 * forward.c -- TUN -> UDP and UDP -> TUN, one batch at a time: read, check, route, send; the
 * ICMP errors and their token bucket (forward.h). Runs in the loop thread only.
 */
#define _GNU_SOURCE 1

#include "forward.h"

#include <errno.h>
#include <time.h>
#include <unistd.h>

#include "offload.h"

/* ---- ICMP errors, rate-limited ---------------------------------------------------------------- */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

void bucket_init(icmp_bucket *b, uint32_t burst, uint32_t per_sec)
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
    uint32_t len = build_icmp(e->icmp, e->local_addr, p, n, ihl, type);
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
    uint32_t len = build_icmp(e->icmp, e->local_addr, p, n, ihl, 11);
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

static void classify_tx(Engine *e, txvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->npk; i++) {
        pkt *k = &v->pk[i];
        uint8_t *p = k->p;
        uint32_t n = pkt_len(k), h = k->hlen;
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
        const rt_slot *route = rt_lookup(&e->rt, get32(p + 16));
        if (!route) {
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
        if (k->partial) {
            if (route->flags & RT_PEER_PARTIAL_CSUM)
                OFF(e, csum_partial_sent, 1);
            else
                tx_complete(e, k);
        }
        k->addr = route->peer;
        k->pc = route->pc;
        v->ready[v->nready++] = i;
    }
}

void send_tx(Engine *e)
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
                /* one message, one route (build_msgs) */
                pc_add(e, v->pk[v->ready[v->head]].pc, PC_TX_PACKETS, (uint64_t)v->msg_pkts[j],
                       v->msg[j].msg_len);
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

int tun_batch(Engine *e)
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

static void classify_rx(Engine *e, rxvec *v)
{
    v->nready = v->head = 0;
    for (int i = 0; i < v->npk; i++) {
        pkt *k = &v->pk[i];
        uint8_t *p = k->p;
        uint32_t n = k->hlen, sender = k->addr;
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
        const rt_slot *route = rt_lookup(&e->rt, get32(p + 12));
        if (!route) {
            CTR(e, drop_udp_unknown_src, 1);
            continue;
        }
        if (route->peer != sender) {
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
        pc_add(e, route->pc, PC_RX_PACKETS, 1, n);
        v->ready[v->nready++] = i;
    }
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
            if (c == 1 && v->csum_write)
                OFF(e, tun_csum_writes, 1);
            if (c > 1 && v->gso_udp) {
                OFF(e, tun_uso_writes, 1);
                OFF(e, tun_uso_segments, (uint64_t)c);
            } else if (c > 1) {
                OFF(e, tun_gso_writes, 1);
                OFF(e, tun_gso_segments, (uint64_t)c);
            }
        }
        v->head += c;
    }
    v->nready = v->head = 0;
}

void rx_process(Engine *e)
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

int udp_batch(Engine *e)
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
