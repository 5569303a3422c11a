/* datapath.c: the one compilation unit of the datapath (tc and socket mode), and its entry file.
 *
 * Compiled by overlay/datapath/ebpf/build.py, which inlines the quoted
 * includes of bpf/lib into one text before handing it to bcc (bcc only
 * rewrites map method calls such as ovl_nat.lookup() in its main file).
 * Every program of this unit is defined here, one short function per hook
 * calling the logic of bpf/lib/*.h: the tc programs ovl_ingress, ovl_egress
 * (uplink) and ovl_overlay_egress (ovl0), and the cgroup sock_addr programs
 * of socket mode ovl_connect4, ovl_sendmsg4, ovl_recvmsg4, ovl_getpeername4
 * (one object, so one set of maps: docs/datapath.md).
 */
#include <linux/pkt_cls.h>

#include "overlay_abi.h"
#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "conntrack.h"
#include "nat.h"
#include "filter.h"
#include "sock.h"

/* tc ingress on the uplink (e.g. eth0): the filter, and reverse NAT of
 * replies to translated flows. */
int ovl_ingress(struct __sk_buff *skb)
{
	return ovl_filter_ingress(skb);
}

/* tc egress on the uplink: track the flows this host opens, so their replies
 * pass the ingress filter. Never alters or drops a packet. */
int ovl_egress(struct __sk_buff *skb)
{
	return ovl_ct_egress(skb);
}

/* tc egress on the overlay device ovl0 (NOARP; the overlay subnet is routed
 * to it): translate overlay -> real and redirect to the uplink. */
int ovl_overlay_egress(struct __sk_buff *skb)
{
	return ovl_nat_egress(skb);
}

/* cgroup sock_addr hooks of socket mode (logic in lib/sock.h): an overlay
 * destination becomes the peer's real address at connect/sendmsg, and back
 * at recvmsg/getpeername. */
int ovl_connect4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_forward(ctx, OVL_SOCK_CONNECT);
}

int ovl_sendmsg4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_forward(ctx, OVL_SOCK_SENDMSG);
}

int ovl_recvmsg4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_reverse(ctx, OVL_SOCK_RECVMSG);
}

int ovl_getpeername4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_reverse(ctx, OVL_SOCK_PEERNAME);
}
