/*
 * loop.h -- the engine's life, as the binding (module.c) drives it: construction, start (buffers,
 * offload probes, the loop thread), route commands over the socketpair, counter snapshots, stop.
 * Nothing here needs the GIL; the binding decides when to release it.
 */
#ifndef FLANNELD_ENGINE_LOOP_H
#define FLANNELD_ENGINE_LOOP_H

#include "engine.h"

/* What an engine is made with (checked by the binding: fds open and non-blocking, port and MTU in
 * range, tun_gso only with vnet_hdr). Addresses in host byte order. */
typedef struct {
    int tun_fd, udp_fd;
    uint32_t local_net, local_addr;
    unsigned local_prefixlen;
    uint16_t port;
    uint32_t mtu;
    int vnet_hdr, udp_gso, udp_gro, tun_gso;
    int tun_uso; /* the TUN takes GSO_UDP_L4 writes (it accepted TUN_F_USO4|USO6) */
} eng_config;

/* The results of eng_init() and eng_start(). */
enum { ENG_OK = 0, ENG_NOMEM = -1, ENG_OSERR = -2 /* errno tells why */ };

#pragma GCC visibility push(hidden)

/* A new engine (state ST_NEW) in the zero-filled *e: the table and the command socketpair.
 * Whatever the result, eng_destroy() releases it. */
int eng_init(Engine *e, const eng_config *c);
/* Close the socketpair and free the table (the loop thread is gone or was never started). */
void eng_destroy(Engine *e);
/* ST_NEW -> ST_RUNNING: map the buffers, probe and set the offloads, start the loop thread. */
int eng_start(Engine *e);
/* Make the loop thread stop (a stop command, else EOF on its socket) and join it. */
void eng_join(Engine *e);
/* After eng_join(): free the buffers and leave the UDP socket as it was given (UDP_GRO off). */
void eng_release(Engine *e);

/* Send one command to the loop thread: 0 sent, 1 the loop is gone, -1 error (errno). */
int eng_send_cmd(Engine *e, const struct eng_cmd *c);
/* Apply a set/delete command to the table (the loop's, or the caller's when there is no loop);
 * -1 when out of memory. */
int eng_apply_cmd(Engine *e, const struct eng_cmd *c);

/* Before start: replace the ICMP error token bucket (it starts full). */
void eng_set_icmp_ratelimit(Engine *e, uint32_t burst, uint32_t per_sec);

/* Per-peer counters: entries [0, pc_count()) may be in use; pc_read() copies entry i (consistent:
 * it retries while the loop changes its owner) and returns whether it belongs to a route. */
uint32_t pc_count(Engine *e);
int pc_read(Engine *e, uint32_t i, peer_ctr *out);

/* Whether the loop thread has finished (acquire: its error fields are then complete). */
int eng_exited(Engine *e);
/* Snapshots of the packet counters and of the offload state and counters. */
void eng_stats(Engine *e, uint64_t out[N_CTR]);
void eng_offloads(Engine *e, uint64_t out[N_OFF]);

#pragma GCC visibility pop

#endif
