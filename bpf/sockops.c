/* Hook: sock_ops (BPF_CGROUP_SOCK_OPS) at the cgroup v2 root; context
 * bpf_sock_ops.
 *
 * At TCP_CONNECT_CB the kernel has picked the client's source port but not
 * yet sent the SYN, so the agent cannot accept the connection before this
 * runs. The original destination recorded by connect.c under the socket
 * cookie moves to orig_dst under (netns, source address, source port): the
 * agent's listener sees exactly that as the accepted socket's peer.
 *
 * Byte order: local_ip4/local_ip6 network order, local_port host order.
 */
#include "common.h"

int ambient_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *od = pending_dst.lookup(&cookie);
    if (!od)
        return 1;

    struct flow_key key = {};
    key.netns = bpf_get_netns_cookie(skops);
    key.port = skops->local_port;
    if (skops->family == AF_INET) {
        key.family = AF_INET;
        key.ip[0] = skops->local_ip4;
    } else {
        __u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1];
        __u32 a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];
        if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
            /* IPv4-mapped: the IPv4 listener sees an IPv4 peer. */
            key.family = AF_INET;
            key.ip[0] = a3;
        } else {
            key.family = AF_INET6;
            key.ip[0] = a0; key.ip[1] = a1; key.ip[2] = a2; key.ip[3] = a3;
        }
    }
    struct orig_dst copy = *od;
    orig_dst.update(&key, &copy);
    pending_dst.delete(&cookie);
    count(STAT_ORIG_DST_RECORDED);
    return 1;
}
