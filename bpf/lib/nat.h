/* nat.h: overlay address translation.
 *
 * One address in the IP header is replaced and both checksums are fixed
 * incrementally: the IP header checksum, and the TCP/UDP checksum, whose
 * pseudo-header covers the addresses (BPF_F_PSEUDO_HDR). A UDP checksum of 0
 * means "no checksum" and stays 0; a UDP checksum that becomes 0 is written
 * as 0xffff (BPF_F_MARK_MANGLED_0). ICMP has no pseudo-header, so its
 * checksum does not change. Only a fragment carrying the L4 header (offset
 * 0) has an L4 checksum to fix; later fragments get the L3 rewrite only.
 */
#ifndef OVL_NAT_H
#define OVL_NAT_H

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "conntrack.h"

/* bcc 0.26 declares bpf_redirect_neigh with 3 arguments; the kernel's takes 4. */
static long (*ovl_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Replace the address at addr_off (saddr or daddr) `from` -> `to`.
 * Returns 0, or <0 if a helper failed. */
static __always_inline int ovl_rewrite_addr(struct __sk_buff *skb, const struct ovl_pkt *p,
					    __u32 addr_off, __u32 from, __u32 to)
{
	__u64 flags;

	if (p->l4_csum_off) {
		flags = BPF_F_PSEUDO_HDR | sizeof(to);
		if (p->proto == IPPROTO_UDP)
			flags |= BPF_F_MARK_MANGLED_0;
		if (bpf_l4_csum_replace(skb, p->l4_csum_off, from, to, flags) < 0)
			return -1;
	}
	if (bpf_l3_csum_replace(skb, OVL_IP_CSUM_OFF, from, to, sizeof(to)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &to, sizeof(to), 0) < 0)
		return -1;
	return 0;
}

/* ovl0 egress: everything routed to the overlay subnet. Translate the
 * destination overlay -> real (every fragment of a datagram: later ones get
 * the L3 rewrite only), remember the flow for its replies, and hand the
 * packet to the uplink with a FIB and neighbour lookup. Anything but IPv4
 * passes untouched (no IPv6 overlay addressing). */
static __always_inline int ovl_nat_egress(struct __sk_buff *skb)
{
	struct ovl_pkt p;
	struct ovl_nat_val *nat;
	__u32 overlay, real;
	__u64 ifindex;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		ovl_count(OVL_PASS_UNTOUCHED);
		return TC_ACT_OK;
	}
	/* a first fragment without its L4 header would leave a stale L4 checksum */
	if (ovl_parse(skb, &p) != OVL_P_OK || p.short_l4)
		return ovl_drop(&p, OVL_DROP_MALFORMED, OVL_DIR_EGRESS);

	overlay = p.daddr;
	nat = ovl_nat_lookup(overlay);
	if (!nat)
		return ovl_drop(&p, OVL_DROP_NO_PEER, OVL_DIR_EGRESS);
	real = nat->real;
	if (ovl_rewrite_addr(skb, &p, OVL_IP_DADDR_OFF, overlay, real) < 0)
		return ovl_drop(&p, OVL_DROP_MALFORMED, OVL_DIR_EGRESS);
	ovl_count(OVL_NAT_EGRESS);
	ovl_ct_nat_track(&p, real, overlay);

	ifindex = ovl_cfg_get(OVL_CFG_EGRESS_IFINDEX);
	if (!ifindex)
		return TC_ACT_OK;       /* not wired to an uplink (BPF_PROG_TEST_RUN) */
	return ovl_redirect_neigh(ifindex, NULL, 0, 0);
}

/* Ingress: restore the overlay address as the source of a reply. */
static __always_inline void ovl_nat_ingress(struct __sk_buff *skb, const struct ovl_pkt *p,
					    __u32 overlay)
{
	if (ovl_rewrite_addr(skb, p, OVL_IP_SADDR_OFF, p->saddr, overlay) == 0)
		ovl_count(OVL_NAT_INGRESS);
}

#endif /* OVL_NAT_H */
