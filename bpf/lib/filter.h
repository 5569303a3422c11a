/* filter.h: the ingress filter on the uplink.
 *
 * Order (DESIGN section 5): failsafe, established/related, loopback, then
 * either the group policies (a node that a policy selects as `to` is
 * default-deny: OVL_CFG_POLICY_ENFORCED) or members, open ports, default. Every step but the last passes, so the order decides
 * which counter a packet is attributed to -- and one thing more: reverse NAT
 * of a tracked reply happens whichever step passes it (a reply from a
 * failsafe range is still translated back to its overlay address).
 */
#ifndef OVL_FILTER_H
#define OVL_FILTER_H

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "conntrack.h"
#include "nat.h"

static __always_inline int ovl_failsafe_match(const struct ovl_pkt *p)
{
	struct ovl_lpm_key k = {};
	__u32 *flags;

	k.prefixlen = 32;
	k.addr = p->saddr;
	flags = ovl_failsafe.lookup(&k);
	if (!flags)
		return 0;
	if (*flags & OVL_FS_ALL)
		return 1;
	return (*flags & OVL_FS_SSH) && p->proto == IPPROTO_TCP && p->has_l4 &&
	       p->dport == bpf_htons(OVL_SSH_PORT);
}

/* Look the packet up in ovl_ct; on a hit restore the overlay source of a
 * translated flow. Returns 1 on a hit. */
static __always_inline int ovl_established(struct __sk_buff *skb, const struct ovl_pkt *p)
{
	struct ovl_ct_val *v = ovl_ct_lookup(p);
	__u32 overlay;

	if (!v)
		return 0;
	overlay = v->overlay;
	if (overlay)
		ovl_nat_ingress(skb, p, overlay);
	return 1;
}

static __always_inline int ovl_is_loopback(__u32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

static __always_inline int ovl_is_member(__u32 addr)
{
	struct ovl_peer_val *peer = ovl_peers.lookup(&addr);

	return peer && (peer->flags & OVL_PEER_F_MEMBER);
}

static __always_inline int ovl_port_open(const struct ovl_pkt *p)
{
	int idx;
	__u32 port;
	__u64 *word;

	if (!p->has_l4)
		return 0;
	if (p->proto == IPPROTO_TCP)
		idx = OVL_PORT_SLOT_TCP * OVL_PORT_WORDS;
	else if (p->proto == IPPROTO_UDP)
		idx = OVL_PORT_SLOT_UDP * OVL_PORT_WORDS;
	else
		return 0;
	port = bpf_ntohs(p->dport);
	idx += port / 64;
	word = ovl_ports.lookup(&idx);
	return word && ((*word >> (port % 64)) & 1);
}

/* Does a policy allow this packet from `identity`? One LPM lookup with the
 * full key: the longest entry for (identity, proto, a prefix of dport). */
static __always_inline int ovl_policy_allows(__u32 identity, const struct ovl_pkt *p)
{
	struct ovl_policy_key k = {};

	k.prefixlen = OVL_POLICY_FULL_BITS;
	k.identity = identity;
	k.proto = p->proto;
	k.port = p->dport;      /* network order; 0 for ICMP and other protocols */
	return ovl_policy.lookup(&k) != NULL;
}

/* At most two lookups: the source's member identity (ovl_peers), then the
 * identity of the longest policy CIDR that holds the source (ovl_cidr_ident). */
static __always_inline int ovl_policy_match(const struct ovl_pkt *p)
{
	__u32 saddr = p->saddr;
	struct ovl_peer_val *peer = ovl_peers.lookup(&saddr);
	struct ovl_lpm_key ck = {};
	__u32 *cidr;

	if (peer && (peer->flags & OVL_PEER_F_MEMBER) && ovl_policy_allows(peer->identity, p))
		return 1;
	ck.prefixlen = 32;
	ck.addr = saddr;
	cidr = ovl_cidr_ident.lookup(&ck);
	return cidr && ovl_policy_allows(*cidr, p);
}

static __always_inline int ovl_pass(int reason)
{
	ovl_count(reason);
	return TC_ACT_OK;
}

static __always_inline int ovl_filter_ingress(struct __sk_buff *skb)
{
	struct ovl_pkt p;

	if (ovl_parse(skb, &p) != OVL_P_OK)
		return ovl_pass(OVL_PASS_UNTOUCHED);     /* the stack judges it */

	if (ovl_failsafe_match(&p)) {
		ovl_established(skb, &p);       /* still translate a tracked reply */
		return ovl_pass(OVL_PASS_FAILSAFE);
	}
	/* A later fragment has no L4 header to match or translate. */
	if (p.frag == OVL_FRAG_LATER)
		return ovl_pass(OVL_PASS_UNTOUCHED);
	if (ovl_established(skb, &p))
		return ovl_pass(OVL_PASS_ESTABLISHED);
	if (ovl_ct_related(skb, &p))
		return ovl_pass(OVL_PASS_RELATED);
	if (ovl_is_loopback(p.saddr))
		return ovl_pass(OVL_PASS_LOOPBACK);
	if (ovl_cfg_get(OVL_CFG_POLICY_ENFORCED)) {
		/* default-deny: members, open ports and reject_all no longer apply */
		if (ovl_policy_match(&p))
			return ovl_pass(OVL_PASS_POLICY);
		return ovl_drop_rule(&p, OVL_DROP_POLICY, OVL_DIR_INGRESS,
				     (__u32)ovl_cfg_get(OVL_CFG_POLICY_DEFAULT));
	}
	if (ovl_is_member(p.saddr))
		return ovl_pass(OVL_PASS_MEMBER);
	if (ovl_port_open(&p))
		return ovl_pass(OVL_PASS_OPEN_PORT);
	if (ovl_cfg_get(OVL_CFG_REJECT_ALL))
		return ovl_drop(&p, OVL_DROP_NOT_ALLOWED, OVL_DIR_INGRESS);
	return ovl_pass(OVL_PASS_DEFAULT);
}

#endif /* OVL_FILTER_H */
