/*
 * packet.c -- the checksum loop and the ICMP errors (packet.h).
 */
#include "packet.h"

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

__extension__ typedef unsigned __int128 u128;

uint64_t csum_add(uint64_t acc, const uint8_t *p, size_t n)
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

int icmp_allowed(const uint8_t *p, uint32_t n, uint32_t ihl)
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

uint32_t build_icmp(uint8_t out[ICMP_BUFSZ], uint32_t src, const uint8_t *p, uint32_t n,
                    uint32_t ihl, uint8_t type)
{
    uint8_t *o = out;
    uint32_t q = ihl + 8 < n ? ihl + 8 : n, tot = 28 + q;
    memset(o, 0, 28);
    o[0] = 0x45;
    o[1] = 0xc0;
    put16(o + 2, tot);
    o[8] = 64;
    o[9] = IPPROTO_ICMP;
    put32(o + 12, src);
    memcpy(o + 16, p + 12, 4);
    put16(o + 10, csum(o, 20));
    o[20] = type; /* code 0: net unreachable / TTL exceeded in transit */
    memcpy(o + 28, p, q);
    put16(o + 22, csum(o + 20, 8 + q));
    return tot;
}
