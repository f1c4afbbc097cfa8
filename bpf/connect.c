/* Hook: cgroup/connect4 and cgroup/connect6 (BPF_CGROUP_INET{4,6}_CONNECT),
 * attached with BPF_F_ALLOW_MULTI at the cgroup v2 root; context bpf_sock_addr.
 *
 * Outbound capture: a TCP connect() from an enrolled pod's network namespace
 * (looked up by netns cookie) to anything but loopback or the pod's own
 * address is rewritten to the agent's outbound listener on loopback port
 * 15001 in that same namespace. The original destination is remembered by
 * socket cookie; sockops.c re-keys it by source port once one is chosen.
 *
 * If the agent is dead, the rewritten connect() finds no listener and fails
 * with ECONNREFUSED: traffic never leaves uncaptured.
 *
 * DNS: a connect() to port 53 (TCP, or UDP as glibc's resolver does it)
 * from a pod whose DNS is captured goes to the agent's DNS listener instead
 * (dns.c, dns_capture4/6), before any of the above.
 *
 * Byte order: user_ip4/user_ip6 network order, user_port network order in
 * the low 16 bits.
 */
#include "common.h"

/* The enrolled pod this TCP connect() comes from, or NULL when it is not to
 * be captured: not TCP, no enrolled pod in this network namespace, or one of
 * the agent's own (marked) sockets. */
static __always_inline struct pod_config *capturing_pod(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM)
        return NULL;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_config *pod = pod_config.lookup(&netns);
    if (!pod)
        return NULL;
    if (agent_socket(ctx)) {
        count(STAT_OUTBOUND_EXEMPT_MARK);
        return NULL;
    }
    return pod;
}

/* An IPv4 destination (network order) that stays uncaptured: loopback,
 * 0.0.0.0 ("this host") and the pod's own address (intra-pod traffic). */
static __always_inline int ipv4_exempt(struct pod_config *pod, __u32 dst)
{
    __u32 host = bpf_ntohl(dst);
    if ((host >> 24) == 127 || host == 0)
        return 1;
    return (pod->flags & POD_IPV4) && dst == pod->ip4;
}

/* The capture itself, shared by every path: remember the original
 * destination (family, address words in network order, the port from
 * ctx->user_port) by socket cookie and point the port at the outbound
 * listener. The caller has already pointed the address at loopback, through
 * the ctx field its attach type may write (user_ip4 or user_ip6). */
static __always_inline int capture(struct bpf_sock_addr *ctx, __u32 family,
                                   __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
    struct orig_dst od = {};
    od.family = family;
    od.port = bpf_ntohs((__u16)ctx->user_port);
    od.ip[0] = a0; od.ip[1] = a1; od.ip[2] = a2; od.ip[3] = a3;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    pending_dst.update(&cookie, &od);
    ctx->user_port = bpf_htons(OUTBOUND_PORT);
    count(STAT_OUTBOUND_CAPTURED);
    return 1;
}

int ambient_connect4(struct bpf_sock_addr *ctx)
{
    if (dns_capture4(ctx))
        return 1;
    struct pod_config *pod = capturing_pod(ctx);
    if (!pod)
        return 1;
    __u32 dst = ctx->user_ip4;
    if (ipv4_exempt(pod, dst))
        return 1;
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    return capture(ctx, AF_INET, dst, 0, 0, 0);
}

int ambient_connect6(struct bpf_sock_addr *ctx)
{
    if (dns_capture6(ctx))
        return 1;
    struct pod_config *pod = capturing_pod(ctx);
    if (!pod)
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
    __u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

    if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
        /* IPv4-mapped: a dual-stack socket reaching an IPv4 peer. The
         * connect4 hook does not run for it, so capture it here and
         * redirect to ::ffff:127.0.0.1 (the IPv4 listener). */
        if (ipv4_exempt(pod, a3))
            return 1;
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
        return capture(ctx, AF_INET, a3, 0, 0, 0);
    }
    if (a0 == 0 && a1 == 0 && a2 == 0 && (a3 == 0 || a3 == bpf_htonl(1)))
        return 1;                         /* :: and ::1 */
    if ((pod->flags & POD_IPV6) && a0 == pod->ip6[0] && a1 == pod->ip6[1] &&
        a2 == pod->ip6[2] && a3 == pod->ip6[3])
        return 1;                         /* intra-pod traffic */

    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    return capture(ctx, AF_INET6, a0, a1, a2, a3);
}
