/*
 * routes.c -- inserting into and removing from the LPM table (routes.h).
 */
#include "routes.h"

#include <stdlib.h>
#include <string.h>

int rt_init(rt_table *t)
{
    memset(t, 0, sizeof *t);
    t->cap = 16;
    t->shift = 60;
    t->slots = calloc(t->cap, sizeof *t->slots);
    return t->slots ? 0 : -1;
}

void rt_free(rt_table *t)
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

rt_slot *rt_get(rt_table *t, uint32_t net, unsigned plen)
{
    net &= pfx_mask(plen);
    int i = rt_find(t, net, plen);
    return i < 0 ? NULL : &t->slots[i];
}

int rt_insert(rt_table *t, uint32_t net, unsigned plen, uint32_t peer, uint8_t flags, uint32_t pc)
{
    net &= pfx_mask(plen);
    int i = rt_find(t, net, plen);
    if (i >= 0) {
        t->slots[i].peer = peer;
        t->slots[i].flags = flags;
        t->slots[i].pc = pc;
        return 0;
    }
    if ((t->count + 1) * 2 > t->cap && rt_grow(t) < 0)
        return -1;
    rt_slot s = {.net = net, .peer = peer, .pc = pc, .plen = (uint8_t)plen, .used = 1,
                 .flags = flags};
    rt_place(t->slots, t, s);
    t->count++;
    if (t->per_len[plen]++ == 0)
        rt_reorder(t);
    return 0;
}

int rt_remove(rt_table *t, uint32_t net, unsigned plen)
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
