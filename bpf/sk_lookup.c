/* Hook: sk_lookup (BPF_SK_LOOKUP), one bpf_link per enrolled pod's network
 * namespace, pinned so that it outlives the agent; context bpf_sk_lookup.
 *
 * Inbound capture: a TCP connection arriving at the pod's address from
 * outside the pod is handed to the agent's listener in that namespace:
 * port 15008 to the HBONE listener, every other port to the plaintext
 * inbound listener (15006). The packet is not rewritten, so the accepted
 * socket's local address is the original destination.
 *
 * Not captured: connections from the pod to itself (source == destination
 * address; this includes the agent's own connections to the app, which it
 * makes from inside the pod) and kubelet health probes, recognised by their
 * source being the node's address on the pod network (the pod's gateway).
 * This is the same trust Istio gives the node (it SNATs the node's probes
 * to 169.254.7.127), without any SNAT.
 *
 * Fail closed: if the agent is gone its listeners left the sockhash; the
 * lookup then fails with SK_DROP and the client sees a refused connection
 * instead of reaching the app unauthenticated.
 *
 * Byte order: local_ip4/remote_ip4 network order; local_port host order;
 * remote_port network order.
 */
#include "common.h"

int ambient_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;

    struct addr_key dst = {};
    struct listener_key lk = {};
    struct inbound_config *cfg;

    if (ctx->family == AF_INET) {
        __u32 src = ctx->remote_ip4;
        if (src == ctx->local_ip4 || (bpf_ntohl(src) >> 24) == 127)
            return SK_PASS;
        dst.family = AF_INET;
        dst.ip[0] = ctx->local_ip4;
        cfg = inbound_config.lookup(&dst);
        if (!cfg)
            return SK_PASS;
        if (cfg->probe_ip4 && src == cfg->probe_ip4) {
            count(STAT_INBOUND_PROBE);
            return SK_PASS;
        }
    } else {
        __u32 s0 = ctx->remote_ip6[0], s1 = ctx->remote_ip6[1];
        __u32 s2 = ctx->remote_ip6[2], s3 = ctx->remote_ip6[3];
        if (s0 == ctx->local_ip6[0] && s1 == ctx->local_ip6[1] &&
            s2 == ctx->local_ip6[2] && s3 == ctx->local_ip6[3])
            return SK_PASS;
        if (s0 == 0 && s1 == 0 && s2 == 0 && s3 == bpf_htonl(1))
            return SK_PASS;
        dst.family = AF_INET6;
        dst.ip[0] = ctx->local_ip6[0];
        dst.ip[1] = ctx->local_ip6[1];
        dst.ip[2] = ctx->local_ip6[2];
        dst.ip[3] = ctx->local_ip6[3];
        cfg = inbound_config.lookup(&dst);
        if (!cfg)
            return SK_PASS;
        if (s0 == cfg->probe_ip6[0] && s1 == cfg->probe_ip6[1] &&
            s2 == cfg->probe_ip6[2] && s3 == cfg->probe_ip6[3] &&
            (s0 | s1 | s2 | s3)) {
            count(STAT_INBOUND_PROBE);
            return SK_PASS;
        }
    }

    lk.family = dst.family;
    lk.ip[0] = dst.ip[0]; lk.ip[1] = dst.ip[1];
    lk.ip[2] = dst.ip[2]; lk.ip[3] = dst.ip[3];
    lk.kind = ctx->local_port == HBONE_PORT ? LISTENER_HBONE : LISTENER_INBOUND;

    struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&lk);
    if (!sk) {
        count(STAT_INBOUND_NO_LISTENER);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        count(STAT_INBOUND_NO_LISTENER);
        return SK_DROP;
    }
    count(STAT_INBOUND_CAPTURED);
    return SK_PASS;
}
