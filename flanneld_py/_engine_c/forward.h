/*
 * forward.h -- the two per-batch pipelines (TUN -> UDP, UDP -> TUN) and the rate-limited ICMP
 * errors they send. Driven by the poll loop (loop.c), in its thread only.
 */
#ifndef FLANNELD_ENGINE_FORWARD_H
#define FLANNELD_ENGINE_FORWARD_H

#include "engine.h"

#pragma GCC visibility push(hidden)

/* One TUN batch: read, classify, send; 1 if the TUN may hold more right now. */
int tun_batch(Engine *e);
/* Send ready[head..] of the TUN -> UDP vector (again, after a stall); sets tx_stalled on EAGAIN. */
void send_tx(Engine *e);
/* One UDP batch: receive, classify, write into the TUN; 1 if the socket may hold more right now. */
int udp_batch(Engine *e);
/* Write what is pending, then split, check and write the rest of the received messages; sets
 * rx_stalled on EAGAIN. */
void rx_process(Engine *e);

/* A full ICMP token bucket of burst tokens, refilled at per_sec (0: never). */
void bucket_init(icmp_bucket *b, uint32_t burst, uint32_t per_sec);

#pragma GCC visibility pop

#endif
