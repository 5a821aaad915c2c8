/*
 * packet.h -- byte access to IPv4/TCP headers, Internet checksums (RFC 1071, RFC 1624) and the
 * ICMP errors the engine sends. No engine state: everything here works on byte buffers.
 *
 * The small helpers are static inline (they sit in every per-packet path); csum_add(), the bulk
 * summing loop, and the ICMP builders live in packet.c.
 */
#ifndef FLANNELD_ENGINE_PACKET_H
#define FLANNELD_ENGINE_PACKET_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_ECE 0x40
#define TCP_CWR 0x80

/* Room for one ICMP error: IPv4 (20) + ICMP (8) + the quoted header (<= 60) + 8 bytes. */
#define ICMP_BUFSZ 128

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

#pragma GCC visibility push(hidden)
uint64_t csum_add(uint64_t acc, const uint8_t *p, size_t n);
#pragma GCC visibility pop

static inline uint64_t csum_add64(uint64_t a, uint64_t b)
{
    uint64_t s = a + b;
    return s + (s < b);
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

/* ---- ICMP errors (packet.c) ------------------------------------------------------------------- */

#pragma GCC visibility push(hidden)
/* May an ICMP error be sent about this (well-formed) packet? Same rules as packet.py. */
int icmp_allowed(const uint8_t *p, uint32_t n, uint32_t ihl);
/* ICMP error of `type` (code 0) from src (host order) to the offender's source, quoting its header
 * + 8 bytes, into out; its length. p[0..n) must hold at least min(ihl + 8, n) bytes. */
uint32_t build_icmp(uint8_t out[ICMP_BUFSZ], uint32_t src, const uint8_t *p, uint32_t n,
                    uint32_t ihl, uint8_t type);
#pragma GCC visibility pop

#endif
