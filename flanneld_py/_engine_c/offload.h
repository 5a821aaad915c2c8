/*
 * offload.h -- segmentation offloads: the virtio_net_hdr, TSO super-packets cut into segments,
 * UDP GSO message runs, UDP GRO messages split into datagrams, TCP segments coalesced into one
 * GSO write into the TUN. Called by forward.c once per read, per sendmmsg, per message vector and
 * per TUN write.
 */
#ifndef FLANNELD_ENGINE_OFFLOAD_H
#define FLANNELD_ENGINE_OFFLOAD_H

#include "engine.h"

/* struct virtio_net_hdr (host byte order: the TUN's default, legacy virtio on a LE host):
 * flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (VNET_LEN bytes: engine.h) */
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_ECN 0x80

#pragma GCC visibility push(hidden)

/* One read from a vnet TUN: b[0..r) = virtio_net_hdr + packet; its packet(s) appended to v. */
void tun_ingest_vnet(Engine *e, txvec *v, uint8_t *b, uint32_t r);

/* Complete the partial TCP/UDP checksum of a TUN -> UDP packet (k->partial): for a peer that
 * does not take it partial. Counts csum_completed. */
void tx_complete(Engine *e, pkt *k);

/* The sendmmsg() messages for ready[head..] (at most BATCH): with GSO, one per run of same-peer
 * packets of one size (the last may be shorter); else one per packet. Their count. Idempotent:
 * rebuilt after a stall or a GSO refusal. */
int build_msgs(Engine *e, txvec *v);

/* The datagrams of the received messages, from (next_msg, next_off) on, until the vector is full:
 * a UDP_GRO message holds several, each of the cmsg's size but the last. */
void rx_split(Engine *e, rxvec *v);

/* How many ready packets from head on go into one write (1, or a coalesced run), with the write's
 * iovecs in v->wiov; *bytes = the inner packets' total; v->csum_write: a single packet written
 * with NEEDS_CSUM (tun_csum). Rebuilt identically after a stall. */
int build_write(Engine *e, rxvec *v, int *niov, uint64_t *bytes);

#pragma GCC visibility pop

#endif
