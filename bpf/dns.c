/* DNS capture. Hooks: cgroup/sendmsg4|6 and cgroup/recvmsg4|6
 * (BPF_CGROUP_UDP{4,6}_{SENDMSG,RECVMSG}), attached with BPF_F_ALLOW_MULTI
 * at the cgroup v2 root, context bpf_sock_addr; dns_capture4/6 are also
 * called first by connect4/6 (connect.c), for TCP and for connected UDP
 * sockets (glibc's resolver connects its UDP socket, so sendmsg never sees
 * an address for it).
 *
 * A query to port 53 from a pod whose pod_config has POD_DNS goes to the
 * agent's DNS listener on loopback port 15053 in the pod's own namespace
 * (Istio ambient's port). For UDP the resolver's address is remembered by
 * socket cookie (dns_orig), and recvmsg4/6 give a reply that comes from
 * the listener the resolver's address as its source: resolvers drop
 * answers from an address they did not ask (glibc res_send, dig).
 *
 * Exempt: the agent's own sockets (AGENT_MARK: its upstream queries, sent
 * from inside the pod's namespace), loopback resolvers (a stub inside the
 * pod), pods without POD_DNS and namespaces not enrolled. An unconnected
 * UDP socket that queries two resolvers gets the last one as the source of
 * every reply; resolvers use one socket per server, so that does not arise.
 *
 * Byte order: user_ip4/user_ip6 network order, user_port network order in
 * the low 16 bits; orig_dst.port host order.
 */
#include "common.h"

static __always_inline int dns_pod(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_DGRAM && ctx->type != SOCK_STREAM)
        return 0;
    if (bpf_ntohs((__u16)ctx->user_port) != RESOLVER_PORT)
        return 0;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_config *pod = pod_config.lookup(&netns);
    if (!pod || !(pod->flags & POD_DNS))
        return 0;
    if (agent_socket(ctx)) {
        count(STAT_OUTBOUND_EXEMPT_MARK);
        return 0;
    }
    return 1;
}

/* Remember a UDP socket's resolver (TCP needs nothing: the agent answers
 * on the connection itself) and count the capture. */
static __always_inline void dns_remember(struct bpf_sock_addr *ctx, __u32 family,
                                         __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
    if (ctx->type != SOCK_DGRAM) {
        count(STAT_DNS_TCP_CAPTURED);
        return;
    }
    struct orig_dst od = {};
    od.family = family;
    od.port = RESOLVER_PORT;
    od.ip[0] = a0; od.ip[1] = a1; od.ip[2] = a2; od.ip[3] = a3;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    dns_orig.update(&cookie, &od);
    count(STAT_DNS_UDP_CAPTURED);
}

/* 1 when the destination was rewritten to the DNS listener. */
static __always_inline int dns_capture4(struct bpf_sock_addr *ctx)
{
    if (!dns_pod(ctx))
        return 0;
    __u32 dst = ctx->user_ip4;
    if ((bpf_ntohl(dst) >> 24) == 127)
        return 0;
    dns_remember(ctx, AF_INET, dst, 0, 0, 0);
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(DNS_PORT);
    return 1;
}

static __always_inline int dns_capture6(struct bpf_sock_addr *ctx)
{
    if (!dns_pod(ctx))
        return 0;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
    __u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    int mapped = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
    if (mapped && (bpf_ntohl(a3) >> 24) == 127)
        return 0;
    if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
        return 0;                         /* ::1 */
    /* The words as the application gave them, IPv4-mapped included, so
     * that recvmsg6 restores exactly what it asked. */
    dns_remember(ctx, AF_INET6, a0, a1, a2, a3);
    if (mapped) {
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);   /* ::ffff:127.0.0.1 */
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    ctx->user_port = bpf_htons(DNS_PORT);
    return 1;
}

int ambient_sendmsg4(struct bpf_sock_addr *ctx)
{
    dns_capture4(ctx);
    return 1;
}

int ambient_sendmsg6(struct bpf_sock_addr *ctx)
{
    dns_capture6(ctx);
    return 1;
}

/* A datagram from the DNS listener to a socket whose query was captured:
 * show the resolver as its source. */
int ambient_recvmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(0x7f000001) || ctx->user_port != bpf_htons(DNS_PORT))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *od = dns_orig.lookup(&cookie);
    if (!od || od->family != AF_INET)
        return 1;
    ctx->user_ip4 = od->ip[0];
    ctx->user_port = bpf_htons(RESOLVER_PORT);
    return 1;
}

int ambient_recvmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_port != bpf_htons(DNS_PORT))
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
    __u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    int from_lo6 = a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1);
    int from_lo4 = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && a3 == bpf_htonl(0x7f000001);
    if (!from_lo6 && !from_lo4)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *od = dns_orig.lookup(&cookie);
    if (!od)
        return 1;
    if (od->family == AF_INET && from_lo4) {
        /* A dual-stack socket's query to an IPv4-mapped resolver: the kernel
         * sends it on the IPv4 path, so sendmsg4 recorded it as IPv4. */
        ctx->user_ip6[3] = od->ip[0];
    } else if (od->family == AF_INET6) {
        ctx->user_ip6[0] = od->ip[0];
        ctx->user_ip6[1] = od->ip[1];
        ctx->user_ip6[2] = od->ip[2];
        ctx->user_ip6[3] = od->ip[3];
    } else {
        return 1;
    }
    ctx->user_port = bpf_htons(RESOLVER_PORT);
    return 1;
}
