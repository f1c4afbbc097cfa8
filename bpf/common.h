/* Shared definitions for ambient-agent's capture programs.
 *
 * Every map is pinned under PIN_DIR (a string literal passed with -DPIN_DIR
 * by agent/capture/loader.py), so that a restarted agent reopens the same
 * state and the programs that stay attached after the agent dies keep
 * working against it (fail closed instead of fail open).
 *
 * Byte orders are noted per field: they differ between hooks.
 */
#ifndef AMBIENT_COMMON_H
#define AMBIENT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/socket.h>

#ifndef PIN_DIR
#error "PIN_DIR must be defined"
#endif

#define OUTBOUND_PORT 15001  /* agent's outbound listener inside each pod netns */
#define INBOUND_PORT 15006   /* plaintext inbound listener */
#define HBONE_PORT 15008     /* HBONE (mTLS) inbound listener */
#define DNS_PORT 15053       /* agent's DNS listener (UDP and TCP) inside each pod netns, as Istio's */
#define RESOLVER_PORT 53     /* the destination port whose queries are captured */

/* Sockets the agent opens carry this mark (Istio's ztunnel uses 0x539 too),
 * so that the agent's own connections from inside a pod are never captured. */
#define AGENT_MARK 0x539
#define AGENT_MARK_MASK 0xfff

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif

#define LISTENER_INBOUND 0
#define LISTENER_HBONE 1

#define POD_IPV4 1
#define POD_IPV6 2
#define POD_DNS 4             /* capture this pod's DNS (port 53) to DNS_PORT */

/* Per enrolled pod, keyed by network-namespace cookie (u64). */
struct pod_config {
    __u32 flags;          /* POD_IPV4 | POD_IPV6: which addresses are set; POD_DNS */
    __u32 ip4;            /* pod IPv4, network byte order */
    __u32 ip6[4];         /* pod IPv6, network byte order */
};

/* An original destination, as the application asked for it. */
struct orig_dst {
    __u32 family;         /* AF_INET or AF_INET6 */
    __u32 port;           /* host byte order */
    __u32 ip[4];          /* network byte order; IPv4 uses ip[0] */
};

/* How the agent finds the original destination of a connection its
 * outbound listener accepted: the client's (netns, source address, port). */
struct flow_key {
    __u64 netns;
    __u32 family;
    __u32 port;           /* client source port, host byte order */
    __u32 ip[4];          /* client source address, network byte order */
};

/* Inbound capture, keyed by the pod address the connection arrives at. */
struct addr_key {
    __u32 family;
    __u32 ip[4];
};

struct inbound_config {
    __u32 probe_ip4;      /* node address whose connections are kubelet probes (network order) */
    __u32 probe_ip6[4];
};

struct listener_key {
    __u32 family;
    __u32 ip[4];
    __u32 kind;           /* LISTENER_INBOUND or LISTENER_HBONE */
};

BPF_TABLE_PINNED("hash", __u64, struct pod_config, pod_config, 4096, PIN_DIR "/pod_config");
/* connect() records the destination by socket cookie; sock_ops moves it to
 * orig_dst once the source port is known. LRU: entries of connections the
 * agent never accepted (agent dead) age out instead of filling the map. */
BPF_TABLE_PINNED("lru_hash", __u64, struct orig_dst, pending_dst, 65536, PIN_DIR "/pending_dst");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct orig_dst, orig_dst, 65536, PIN_DIR "/orig_dst");
BPF_TABLE_PINNED("hash", struct addr_key, struct inbound_config, inbound_config, 4096, PIN_DIR "/inbound_config");
BPF_TABLE_PINNED("sockhash", struct listener_key, int, listeners, 8192, PIN_DIR "/listeners");
/* UDP DNS capture (dns.c): the resolver a UDP socket sent to (connect4/6 or
 * sendmsg4/6), by socket cookie, so that recvmsg4/6 can give the agent's
 * reply the resolver's address as its source. LRU: sockets are never
 * announced closed to a sock_addr program, so stale entries age out. */
BPF_TABLE_PINNED("lru_hash", __u64, struct orig_dst, dns_orig, 65536, PIN_DIR "/dns_orig");
/* Counters of capture decisions, per CPU, read by the agent for status. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, capture_stats, 8, PIN_DIR "/capture_stats");

#define STAT_OUTBOUND_CAPTURED 0
#define STAT_OUTBOUND_EXEMPT_MARK 1
#define STAT_INBOUND_CAPTURED 2
#define STAT_INBOUND_NO_LISTENER 3
#define STAT_INBOUND_PROBE 4
#define STAT_ORIG_DST_RECORDED 5
#define STAT_DNS_UDP_CAPTURED 6
#define STAT_DNS_TCP_CAPTURED 7

#ifndef SOCK_DGRAM
#define SOCK_DGRAM 2
#endif

/* One of the agent's own sockets (marked AGENT_MARK): never captured. No map
 * access, so it may live in the header (see stats.c). */
static __always_inline int agent_socket(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    return (sk->mark & AGENT_MARK_MASK) == AGENT_MARK;
}

#endif
