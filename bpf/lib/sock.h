/* sock.h: socket mode, overlay translation at connect time.
 *
 * cgroup-v2 sock_addr hooks rewrite the address a socket call names, so that
 * no packet of a translated flow needs rewriting: connect() (TCP, connected
 * UDP) and sendmsg() (unconnected UDP) to an overlay address go to the peer's
 * real address (ovl_nat_lookup, as the tc path does); recvmsg() and
 * getpeername() on that socket show the overlay address again.
 *
 * Only TCP and UDP sockets of the daemon's own network namespace are
 * translated (OVL_CFG_NETNS_COOKIE): a cgroup spans namespaces, and another
 * namespace's overlay addresses are its own business (its tc path). ICMP,
 * raw sockets and anything left alone here take the tc path (ovl0).
 *
 * The reverse direction is keyed by socket (ovl_sock): a socket that talks
 * to a peer's real address directly keeps seeing the real address. Every
 * hook returns 1 (allow): socket mode translates, the tc ingress filter
 * judges.
 */
#ifndef OVL_SOCK_H
#define OVL_SOCK_H

#include "maps.h"
#include "counters.h"

static __always_inline int ovl_sock_l4(const struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

/* connect4, sendmsg4: overlay -> real, remembered for this socket. */
static __always_inline int ovl_sock_forward(struct bpf_sock_addr *ctx, int reason)
{
	struct ovl_sock_key key = {};
	struct ovl_nat_val *nat;
	__u32 overlay = ctx->user_ip4;
	__u64 mine;

	if (!ovl_sock_l4(ctx))
		return 1;
	nat = ovl_nat_lookup(overlay);
	if (!nat)
		return 1;
	mine = ovl_cfg_get(OVL_CFG_NETNS_COOKIE);
	if (!mine || bpf_get_netns_cookie(ctx) != mine) {
		ovl_count(OVL_SOCK_OTHER_NETNS);
		return 1;
	}
	key.cookie = bpf_get_socket_cookie(ctx);
	key.real = nat->real;
	key.port = (__u16)ctx->user_port;
	ovl_sock.update(&key, &overlay);
	ctx->user_ip4 = key.real;
	ovl_count(reason);
	return 1;
}

/* recvmsg4, getpeername4: real -> overlay, only for what this socket was
 * translated to (socket cookies are unique across namespaces). */
static __always_inline int ovl_sock_reverse(struct bpf_sock_addr *ctx, int reason)
{
	struct ovl_sock_key key = {};
	__u32 *overlay;

	if (!ovl_sock_l4(ctx))
		return 1;
	key.cookie = bpf_get_socket_cookie(ctx);
	key.real = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	overlay = ovl_sock.lookup(&key);
	if (!overlay)
		return 1;
	ctx->user_ip4 = *overlay;
	ovl_count(reason);
	return 1;
}

#endif /* OVL_SOCK_H */
