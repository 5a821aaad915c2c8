/*
 * offload.c -- TSO split and checksum completion of virtio_net_hdr reads, UDP GSO message runs,
 * UDP GRO split, TCP coalescing for GSO writes into the TUN (offload.h).
 */
#define _GNU_SOURCE 1

#include "offload.h"

#include <string.h>

/* ---- TUN reads with a virtio_net_hdr ---------------------------------------------------------- */

/* A read that cannot be used at all: counted as one malformed packet. */
static void tx_bad_read(Engine *e, uint32_t n)
{
    CTR(e, tun_rx_packets, 1);
    CTR(e, tun_rx_bytes, n);
    CTR(e, drop_tun_malformed, 1);
    OFF(e, vnet_errors, 1);
}

/* Append to v one segment of the super-packet whose headers are p[0..hl) (IPv4 header: ihl
 * bytes): a copy of the headers with the total length, IP id and header checksum of a segment
 * of len payload bytes at pay (left in place), and the TCP/UDP checksum field (at ihl + cs_off)
 * = the pseudo-header sum (addrs: addresses + protocol), i.e. left partial. Returns the copy,
 * for the caller's own fields. */
static uint8_t *seg_add(txvec *v, const uint8_t *p, uint32_t ihl, uint32_t hl, uint32_t id,
                        uint64_t addrs, const uint8_t *pay, uint32_t len, uint8_t cs_off)
{
    uint8_t *h = v->hdrs + (size_t)v->npk * HDRSLOT;
    memcpy(h, p, hl);
    put16(h + 2, hl + len);
    put16(h + 4, id & 0xffff);
    put16(h + 10, 0);
    put16(h + 10, csum(h, ihl));
    put16(h + ihl + cs_off, csum_fold(csum_add64(addrs, csum_be16(hl - ihl + len))));
    pkt *k = &v->pk[v->npk++];
    k->p = h;
    k->hlen = hl;
    k->pay = (uint8_t *)pay;
    k->plen = len;
    k->partial = 1;
    k->cs_start = (uint16_t)ihl;
    k->cs_off = cs_off;
    return h;
}

/* Cut the IPv4/TCP super-packet p[0..n) into segments of mss payload bytes, appended to v.
 * Each segment: the headers copied (total length, id + i, header checksum; seq + i * mss; FIN and
 * PSH only on the last, CWR only on the first; the TCP checksum field = the segment's pseudo-
 * header sum, i.e. left partial: tx_complete() finishes it unless the peer takes it so), its
 * payload left in place. 0 on success, -1 (nothing added) when the packet is not a well-formed
 * one. */
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
    addrs = csum_add64(addrs, csum_be16(IPPROTO_TCP)); /* ... + protocol (+ length below) */
    const uint8_t *data = p + hl;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t off = i * mss, len = pay - off < mss ? pay - off : mss;
        uint8_t *t = seg_add(v, p, ihl, hl, id0 + i, addrs, data + off, len, 16) + ihl;
        put32(t + 4, seq0 + off);
        uint8_t f = flags;
        if (i + 1 < nseg)
            f &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i > 0)
            f &= (uint8_t)~TCP_CWR;
        t[13] = f;
    }
    OFF(e, tso_packets, 1);
    OFF(e, tso_segments, nseg);
    return 0;
}

/* Cut the IPv4/UDP super-packet p[0..n) (GSO_UDP_L4: one UDP header, then datagrams of gso
 * payload bytes, the last may be shorter) into its datagrams, appended to v, as the kernel's UDP
 * GSO would: IP length, id + i, header checksum; UDP length; the UDP checksum left partial (the
 * pseudo-header sum), payload left in place. 0, or -1 (nothing added) when malformed. */
static int uso_split(Engine *e, txvec *v, uint8_t *p, uint32_t n, uint32_t gso)
{
    if (n < 29 || p[0] >> 4 != 4 || p[9] != IPPROTO_UDP || get16(p + 2) != n)
        return -1;
    uint32_t ihl = (p[0] & 15u) * 4, hl = ihl + 8;
    if (ihl < 20 || hl >= n || (get16(p + 6) & 0x3fff) || gso == 0)
        return -1;
    uint32_t pay = n - hl, nseg = (pay + gso - 1) / gso;
    if (nseg > (uint32_t)(PKTCAP - v->npk))
        return -1;
    uint32_t id0 = get16(p + 4);
    uint64_t addrs = csum_add64(csum_add(0, p + 12, 8), csum_be16(IPPROTO_UDP));
    const uint8_t *data = p + hl;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t off = i * gso, len = pay - off < gso ? pay - off : gso;
        uint8_t *h = seg_add(v, p, ihl, hl, id0 + i, addrs, data + off, len, 6);
        put16(h + ihl + 4, 8 + len); /* UDP length */
    }
    OFF(e, uso_packets, 1);
    OFF(e, uso_segments, nseg);
    return 0;
}

void tun_ingest_vnet(Engine *e, txvec *v, uint8_t *b, uint32_t r)
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
    if (gso == VNET_GSO_UDP_L4) {
        if (uso_split(e, v, p, n, gso_size) < 0)
            tx_bad_read(e, n);
        return;
    }
    if (gso != VNET_GSO_NONE) {
        if ((gso & ~VNET_GSO_ECN) != VNET_GSO_TCPV4 || tso_split(e, v, p, n, gso_size) < 0)
            tx_bad_read(e, n);
        return;
    }
    if (flags & VNET_F_NEEDS_CSUM) { /* the kernel left the checksum partial */
        if ((uint64_t)cs_start + cs_off + 2 > n || (cs_start & 1)) {
            tx_bad_read(e, n);
            return;
        }
        tx_add(v, p, n);
        pkt *k = &v->pk[v->npk - 1];
        k->cs_start = (uint16_t)cs_start;
        k->cs_off = (uint8_t)cs_off;
        uint32_t ihl = n >= 20 ? (p[0] & 15u) * 4 : 0;
        /* a TCP or UDP checksum right after the IPv4 header may go out partial (tx_complete
         * decides, per peer); anything else is completed now */
        if (ihl >= 20 && cs_start == ihl && !(get16(p + 6) & 0x3fff) &&
            ((p[9] == IPPROTO_TCP && cs_off == 16 && n >= ihl + 20) ||
             (p[9] == IPPROTO_UDP && cs_off == 6 && n >= ihl + 8)))
            k->partial = 1;
        else
            put16(p + cs_start + cs_off,
                  ~csum_fold(csum_add(0, p + cs_start, n - cs_start)) & 0xffff);
        if (!k->partial)
            OFF(e, csum_completed, 1);
        return;
    }
    tx_add(v, p, n);
}

void tx_complete(Engine *e, pkt *k)
{
    uint8_t *l4 = k->p + k->cs_start;
    uint64_t s = csum_add(0, l4, k->hlen - k->cs_start); /* the field holds the pseudo sum */
    if (k->plen)
        s = csum_add(s, k->pay, k->plen); /* hlen - cs_start is a TCP header length: even */
    uint32_t c = ~csum_fold(s) & 0xffff;
    if (c == 0 && k->cs_off == 6) /* UDP: 0 means "no checksum" (RFC 768) */
        c = 0xffff;
    put16(l4 + k->cs_off, c);
    k->partial = 0;
    OFF(e, csum_completed, 1);
}

/* ---- UDP GSO sends ---------------------------------------------------------------------------- */

/* Do a and b belong to one inner flow (addresses, protocol, and the ports word at IHL 5)? A GSO
 * send keeps to one: the receiver's kernel steers a whole GSO (or GRO) bundle by its first
 * datagram to one engine thread (reuseport.py), and a flow split over two threads could be
 * reordered. */
static inline int same_flow(const pkt *a, const pkt *b)
{
    const uint8_t *p = a->p, *q = b->p; /* hlen >= 20 (classify_tx); segments: >= 40 */
    if (p[9] != q[9] || memcmp(p + 12, q + 12, 8))
        return 0;
    int pa = a->hlen >= 24, pb = b->hlen >= 24;
    return pa == pb && (!pa || !memcmp(p + 20, q + 20, 4));
}

int build_msgs(Engine *e, txvec *v)
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
                if (b->addr != a->addr || b->pc != a->pc || l > size || l == 0 ||
                    total + l > GSO_MAX_BYTES || !same_flow(a, b))
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

/* ---- UDP GRO reads ---------------------------------------------------------------------------- */

void rx_split(Engine *e, rxvec *v)
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

/* ---- coalesced GSO writes into the TUN -------------------------------------------------------- */

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

/* A packet written alone into a vnet TUN with tun_csum: a TCP or UDP packet (not a fragment)
 * goes with NEEDS_CSUM, its checksum field set to the pseudo-header sum, so that the kernel
 * treats the checksum as its own to complete (CHECKSUM_PARTIAL: delivered locally it is never
 * computed) instead of verifying it. The outer UDP checksum, which the kernel checked, covered
 * these bytes; a packet that came with its checksum left partial (csum_partial_sent by a peer)
 * needs exactly this. 1 and the vnet header in vh, or 0: write it as it is. */
static int rx_csum_hdr(uint8_t *p, uint32_t n, uint8_t *vh)
{
    uint32_t ihl = (p[0] & 15u) * 4, hl, off;
    if (get16(p + 6) & 0x3fff)
        return 0;
    if (p[9] == IPPROTO_TCP && n >= ihl + 20) {
        hl = ihl + (uint32_t)(p[ihl + 12] >> 4) * 4;
        if (hl < ihl + 20 || hl > n)
            return 0;
        off = 16;
    } else if (p[9] == IPPROTO_UDP && n >= ihl + 8 && get16(p + ihl + 4) == n - ihl &&
               get16(p + ihl + 6) != 0) {
        hl = ihl + 8;
        off = 6;
    } else {
        return 0;
    }
    put16(p + ihl + off, csum_fold(pseudo_sum(p, n - ihl)));
    vh[0] = VNET_F_NEEDS_CSUM;
    vh[1] = VNET_GSO_NONE;
    hput16(vh + 2, (uint16_t)hl);
    hput16(vh + 4, 0);
    hput16(vh + 6, (uint16_t)ihl);
    hput16(vh + 8, (uint16_t)off);
    return 1;
}

/* Is p[0..n) a UDP datagram that may be part of a coalesced write? IPv4 without options or
 * fragmentation, a UDP length that matches, a checksum (not 0), payload > 0. */
static inline int udp_candidate(const uint8_t *p, uint32_t n)
{
    return p[0] == 0x45 && p[9] == IPPROTO_UDP && !(get16(p + 6) & 0x3fff) && n > 28 &&
           get16(p + 24) == n - 20 && get16(p + 26) != 0;
}

/* How many of ready[h..] continue the UDP datagram a as one GSO_UDP_L4 packet (the kernel's UDP
 * GSO gives them back exactly): same IP header but for the length, the checksum and an id one
 * up each time; same addresses and ports; payloads as long as a's, the last may be shorter. */
static int udp_run(rxvec *v, int h, const pkt *a, uint32_t *total)
{
    const uint8_t *ap = a->p;
    uint32_t mss = a->hlen - 28, id = get16(ap + 4);
    int c = 1;
    *total = a->hlen;
    while (h + c < v->nready && c < MAX_SEGS) {
        const pkt *b = &v->pk[v->ready[h + c]];
        const uint8_t *q = b->p;
        uint32_t bl = b->hlen;
        if (!udp_candidate(q, bl))
            break;
        uint32_t blen = bl - 28;
        if (blen > mss || *total + blen > SUPER_MAX)
            break;
        if (memcmp(q, ap, 2) || get16(q + 4) != ((id + (uint32_t)c) & 0xffff) ||
            memcmp(q + 6, ap + 6, 4) || memcmp(q + 12, ap + 12, 12))
            break;
        *total += blen;
        c++;
        if (blen < mss)
            break;
    }
    return c;
}

int build_write(Engine *e, rxvec *v, int *niov, uint64_t *bytes)
{
    int h = v->head, c = 1;
    pkt *a = &v->pk[v->ready[h]];
    v->csum_write = 0;
    v->gso_udp = 0;
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
            total += blen;
            seq += blen;
            c++;
            if (blen < mss || (q[33] & TCP_PSH))
                break;
        }
    }
    int udp = 0;
    if (c == 1 && e->tun_uso && OFF_ON(e, tun_gso) && h + 1 < v->nready &&
        udp_candidate(a->p, alen)) {
        c = udp_run(v, h, a, &total);
        udp = c > 1;
        hl = 28;
        mss = alen - 28;
    }
    int w = 0;
    if (c == 1) {
        if (e->vnet) {
            int partial = e->tun_csum && rx_csum_hdr(a->p, alen, v->vhdr);
            v->wiov[w].iov_base = partial ? v->vhdr : (void *)zero_vnet;
            v->wiov[w++].iov_len = VNET_LEN;
            v->csum_write = partial;
        }
        v->wiov[w].iov_base = a->p;
        v->wiov[w++].iov_len = alen;
        *niov = w;
        *bytes = alen;
        return 1;
    }
    /* one GSO_TCPV4 packet: the first segment's headers (length, PSH of the last, checksum field
     * = pseudo-header sum for the kernel to complete), then every segment's payload. The
     * segments' own checksums are not verified (nor needed: the outer UDP checksum covered
     * them, and one may have come partial) */
    const pkt *last = &v->pk[v->ready[h + c - 1]];
    uint8_t *s = v->shdr;
    memcpy(s, a->p, hl);
    put16(s + 2, total);
    put16(s + 10, 0);
    put16(s + 10, csum(s, 20));
    if (udp) { /* one GSO_UDP_L4 packet: one UDP header (the whole length), the datagrams' data */
        put16(s + 24, total - 20);
        put16(s + 26, csum_fold(pseudo_sum(s, total - 20)));
    } else {
        s[33] |= last->p[33] & TCP_PSH;
        put16(s + 36, csum_fold(pseudo_sum(s, total - 20)));
    }
    uint8_t *vh = v->vhdr;
    vh[0] = VNET_F_NEEDS_CSUM;
    vh[1] = udp ? VNET_GSO_UDP_L4 : VNET_GSO_TCPV4;
    hput16(vh + 2, (uint16_t)hl);
    hput16(vh + 4, (uint16_t)mss);
    hput16(vh + 6, 20);
    hput16(vh + 8, udp ? 6 : 16);
    v->gso_udp = udp;
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
