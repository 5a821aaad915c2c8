/*
 * routes.h -- the engine's longest-prefix-match table: one open-addressing hash over
 * (net, prefixlen), probed once per prefix length present, longest first. Addresses in host
 * byte order. rt_lookup() is inline (every packet of both directions calls it); changes are in
 * routes.c.
 */
#ifndef FLANNELD_ENGINE_ROUTES_H
#define FLANNELD_ENGINE_ROUTES_H

#include <stddef.h>
#include <stdint.h>

/* What a route's peer can take (rt_slot.flags). */
#define RT_PEER_PARTIAL_CSUM 1u /* completes partial TCP/UDP checksums (its lease says so) */
/* rt_slot.pc of a route without a per-peer counter entry */
#define RT_NO_PC 0xffffffffu

typedef struct {
    uint32_t net, peer;
    uint32_t pc; /* the engine's per-peer counter entry (engine.h), or RT_NO_PC */
    uint8_t plen, used, flags;
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

#pragma GCC visibility push(hidden)
/* An empty table; -1 when out of memory. */
int rt_init(rt_table *t);
void rt_free(rt_table *t);
/* Add or replace net/plen -> peer with its RT_PEER_* flags and counter entry pc (net is
 * masked); -1 when out of memory (table unchanged). */
int rt_insert(rt_table *t, uint32_t net, unsigned plen, uint32_t peer, uint8_t flags, uint32_t pc);
/* Exactly net/plen (net is masked), or NULL. Valid until the table next changes. */
rt_slot *rt_get(rt_table *t, uint32_t net, unsigned plen);
/* Remove exactly net/plen: 1 if it was there, else 0. */
int rt_remove(rt_table *t, uint32_t net, unsigned plen);
#pragma GCC visibility pop

/* The longest match of addr, or NULL. Valid until the table next changes. */
static inline const rt_slot *rt_lookup(const rt_table *t, uint32_t addr)
{
    uint32_t m = t->cap - 1;
    for (int k = 0; k < t->norder; k++) {
        uint32_t key = addr & t->omask[k];
        unsigned l = t->order[k];
        for (uint32_t i = rt_home(t, key, l);; i = (i + 1) & m) {
            const rt_slot *s = &t->slots[i];
            if (!s->used)
                break;
            if (s->net == key && s->plen == l)
                return s;
        }
    }
    return NULL;
}

#endif
