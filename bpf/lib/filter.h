/* filter.h: the ingress filter on the uplink, IPv4 and IPv6.
 *
 * Order (DESIGN section 5, docs/datapath.md):
 *   martian (loopback or own source)   -> drop martian, always
 *   a whole datagram (not a later fragment, L4 header complete):
 *     established (ovl_ct / 6)          -> pass, reverse NAT
 *     member (ovl_peers / 6), unless a policy selects this node -> pass
 *   failsafe (ovl_failsafe / 6)         -> pass
 *   fragments: a later one               -> its first one's remembered verdict, else drop
 *              a short first one         -> member, policy port, open port, else drop
 *   established (ovl_ct / 6: flows this host initiated) -> pass, reverse NAT
 *   related (ICMP errors about them or about admitted inbound flows)
 *   IPv6 NDP and MLD                    -> pass
 *   group policies when a policy selects this node (default-deny), else
 *   members, open ports, default (accept, or drop under reject_all).
 * Flows other hosts initiate are judged on every packet: removing a peer,
 * closing a port or narrowing a policy applies to the next packet.
 *
 * Every step but the last passes, so the order decides which counter a
 * packet is attributed to -- and one thing more: reverse NAT of a tracked
 * reply happens whichever step passes it (a reply from a failsafe range is
 * still translated back to its overlay address). The common packets, replies
 * of flows this host opened and packets of members, are therefore decided
 * first, by one or two hash lookups, before the failsafe LPM trie: the verdict
 * and side effects are those the failsafe would give them (pass, reverse NAT,
 * an inbound marker), only the counter differs (established or member where
 * it used to be failsafe).
 *
 * "Filtering" means reject_all or policy default-deny. A packet that cannot
 * be parsed far enough to judge, a short first fragment and an orphan later
 * fragment are dropped only when the node filters; otherwise they pass
 * untouched, as everything else would (never wider than before).
 */
#ifndef OVL_FILTER_H
#define OVL_FILTER_H

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "conntrack.h"
#include "frag.h"
#include "nat.h"

static __always_inline int ovl_is_martian(const struct ovl_pkt *p)
{
	struct ovl_addr6 k;
	__u32 bit;

	if (p->family == 4) {
		if ((bpf_ntohl(p->saddr) >> 24) == 127)
			return 1;
	} else if (!p->src[0] && !p->src[1] && !p->src[2] && p->src[3] == bpf_htonl(1)) {
		return 1;       /* ::1 */
	}
	/* the hint rules out almost every source without a lookup */
	bit = ((p->src[0] ^ p->src[1] ^ p->src[2] ^ p->src[3]) * (__u32)OVL_SELF_HINT_MUL) >> 26;
	if (!((ovl_cfg_get(OVL_CFG_SELF_HINT) >> bit) & 1))
		return 0;
	__builtin_memcpy(k.addr, p->src, sizeof(k.addr));
	return ovl_self.lookup(&k) != NULL;
}

enum ovl_src_trie {
	OVL_TRIE_FAILSAFE = 0,  /* ovl_failsafe / ovl_failsafe6 */
	OVL_TRIE_CIDR_IDENT = 1, /* ovl_cidr_ident / ovl_cidr_ident6 */
};

/* The value of the longest prefix holding the packet's source in one of the
 * source LPM tries, of the packet's family; NULL if none. */
static __always_inline __u32 *ovl_src_lpm(const struct ovl_pkt *p, int trie)
{
	struct ovl_lpm_key k4;
	struct ovl_lpm6_key k6;

	if (p->family == 4) {
		k4.prefixlen = 32;
		k4.addr = p->saddr;
		return trie == OVL_TRIE_FAILSAFE ? ovl_failsafe.lookup(&k4) : ovl_cidr_ident.lookup(&k4);
	}
	k6.prefixlen = 128;
	__builtin_memcpy(k6.addr, p->src, sizeof(k6.addr));
	return trie == OVL_TRIE_FAILSAFE ? ovl_failsafe6.lookup(&k6) : ovl_cidr_ident6.lookup(&k6);
}

static __always_inline __u32 ovl_failsafe_flags(const struct ovl_pkt *p)
{
	__u32 *flags = ovl_src_lpm(p, OVL_TRIE_FAILSAFE);

	return flags ? *flags : 0;
}

static __always_inline int ovl_failsafe_match(const struct ovl_pkt *p)
{
	__u32 flags = ovl_failsafe_flags(p);

	if (flags & OVL_FS_ALL)
		return 1;
	return (flags & OVL_FS_SSH) && p->proto == IPPROTO_TCP && p->has_l4 &&
	       p->dport == bpf_htons(OVL_SSH_PORT);
}

/* The peer entry of the packet's source (ovl_peers / ovl_peers6). */
static __always_inline struct ovl_peer_val *ovl_peer_of(const struct ovl_pkt *p)
{
	struct ovl_addr6 k;
	__u32 saddr = p->saddr;

	if (p->family == 4)
		return ovl_peers.lookup(&saddr);
	__builtin_memcpy(k.addr, p->src, sizeof(k.addr));
	return ovl_peers6.lookup(&k);
}

static __always_inline int ovl_is_member(const struct ovl_pkt *p)
{
	struct ovl_peer_val *peer = ovl_peer_of(p);

	return peer && (peer->flags & OVL_PEER_F_MEMBER);
}

static __always_inline int ovl_port_open(const struct ovl_pkt *p)
{
	int idx;
	__u32 port;
	__u64 *word;

	if (!p->has_ports)
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
 * full key: the longest entry for (identity, proto, a prefix of dport).
 * ICMPv6 is looked up as ICMP (a policy `proto: icmp` covers both). */
static __always_inline int ovl_policy_allows(__u32 identity, const struct ovl_pkt *p)
{
	struct ovl_policy_key k = {};

	k.prefixlen = OVL_POLICY_FULL_BITS;
	k.identity = identity;
	k.proto = p->proto == OVL_IPPROTO_ICMPV6 ? IPPROTO_ICMP : p->proto;
	k.port = p->dport;      /* network order; 0 for ICMP and other protocols */
	return ovl_policy.lookup(&k) != NULL;
}

/* At most two lookups: the source's member identity (ovl_peers / 6), then
 * the identity of the longest policy CIDR that holds the source
 * (ovl_cidr_ident / 6). */
static __always_inline int ovl_policy_match(const struct ovl_pkt *p)
{
	struct ovl_peer_val *peer = ovl_peer_of(p);
	__u32 *cidr;

	if (peer && (peer->flags & OVL_PEER_F_MEMBER) && ovl_policy_allows(peer->identity, p))
		return 1;
	cidr = ovl_src_lpm(p, OVL_TRIE_CIDR_IDENT);
	return cidr && ovl_policy_allows(*cidr, p);
}

/* IPv6 neighbour discovery (ICMPv6 133-137, hop limit 255: it cannot have
 * been routed) and MLD (130-132, 143, from a link-local or the unspecified
 * source); never a fragment (RFC 6980). */
static __always_inline int ovl_is_ndp_or_mld(const struct ovl_pkt *p)
{
	__u8 t = p->icmp_type;
	__u32 first;

	if (p->family != 6 || p->proto != OVL_IPPROTO_ICMPV6 || !p->has_l4 ||
	    p->frag != OVL_FRAG_NONE)
		return 0;
	if (t >= 133 && t <= 137)
		return p->hop_limit == 255;
	if ((t >= 130 && t <= 132) || t == 143) {
		first = bpf_ntohl(p->src[0]);
		if ((first & 0xffc00000) == 0xfe800000)
			return 1;
		return !p->src[0] && !p->src[1] && !p->src[2] && !p->src[3];
	}
	return 0;
}

static __always_inline int ovl_filtering(void)
{
	return ovl_cfg_get(OVL_CFG_REJECT_ALL) || ovl_cfg_get(OVL_CFG_POLICY_ENFORCED);
}

static __always_inline int ovl_pass(int reason)
{
	ovl_count(reason);
	return TC_ACT_OK;
}

/* Pass a packet on a verdict that holds for its whole datagram; a first
 * fragment's verdict is remembered (when it matters: the node filters, or
 * later fragments need the overlay source back). */
static __always_inline int ovl_pass_datagram(const struct ovl_pkt *p, int reason, __u32 overlay,
					     int filtering)
{
	if (filtering || overlay)
		ovl_frag_remember(p, reason, overlay);
	return ovl_pass(reason);
}

/* Pass a new inbound flow: leave its marker (TCP SYN, UDP). */
static __always_inline int ovl_admit(const struct ovl_pkt *p, int reason, int filtering)
{
	ovl_ct_mark_inbound(p);
	return ovl_pass_datagram(p, reason, 0, filtering);
}

/* An established reply: restore its overlay source. Returns the overlay
 * address (0: not translated). */
static __always_inline __u32 ovl_reverse_nat(struct __sk_buff *skb, const struct ovl_pkt *p,
					     const struct ovl_ct_val *ct)
{
	__u32 overlay = ct->overlay;

	if (overlay)
		ovl_nat_ingress(skb, p, overlay);
	return overlay;
}

/* Refuse a new inbound flow (default-deny or reject_all). In audit mode the
 * flow passes, so it is reported once, on its first packet (and marked like
 * an admitted flow); its later packets are neither counted nor reported
 * again. ICMP has no flows: every packet is reported. */
static __always_inline int ovl_refuse(const struct ovl_pkt *p, __u8 reason, __u32 policy)
{
	struct ovl_ct6_key t;

	if (ovl_cfg_get(OVL_CFG_MODE) != OVL_MODE_AUDIT)
		return ovl_drop_rule(p, reason, OVL_DIR_INGRESS, policy);
	if (p->has_l4 && (p->proto == IPPROTO_UDP ||
			  (p->proto == IPPROTO_TCP && !ovl_tcp_bare_syn(p->tcp_flags)))) {
		ovl_ct_own_tuple(&t, p);
		if (ovl_ct_in.lookup(&t))
			return TC_ACT_OK;       /* reported with its first packet */
	}
	ovl_ct_mark_inbound(p);
	return ovl_drop_rule(p, reason, OVL_DIR_INGRESS, policy);
}

static __always_inline int ovl_later_fragment(struct __sk_buff *skb, const struct ovl_pkt *p,
					      int filtering, int failsafe)
{
	struct ovl_frag_val *fv = ovl_frag_verdict(p);

	if (!failsafe && filtering && fv && p->frag_off < fv->l4_len)
		return ovl_drop(p, OVL_DROP_FRAG_SHORT, OVL_DIR_INGRESS);   /* overlaps the first */
	if (fv && fv->overlay)
		ovl_nat_ingress(skb, p, fv->overlay);
	if (failsafe)
		return ovl_pass(OVL_PASS_FAILSAFE);
	if (fv)
		return ovl_pass(OVL_PASS_FRAGMENT);
	if (filtering)
		return ovl_drop(p, OVL_DROP_FRAG_ORPHAN, OVL_DIR_INGRESS);
	return ovl_pass(OVL_PASS_UNTOUCHED);
}

/* A first fragment too short for its whole L4 header (nmap -f, -ff), on a
 * node that filters: judged only by the steps that need nothing more than
 * its addresses and ports (a member's address; a policy's or an open port's
 * destination port, which a TCP or UDP fragment carries in its first 4
 * bytes); never established or related, which need the TCP flags or the
 * ICMP header. The verdict holds for the reassembled datagram: no later
 * fragment can rewrite the ports (one that overlaps is dropped). */
static __always_inline int ovl_short_first_fragment(const struct ovl_pkt *p)
{
	int reason = 0;

	if (ovl_cfg_get(OVL_CFG_POLICY_ENFORCED)) {
		if (p->has_ports && ovl_policy_match(p))
			reason = OVL_PASS_POLICY;
	} else if (ovl_is_member(p)) {
		reason = OVL_PASS_MEMBER;
	} else if (ovl_port_open(p)) {
		reason = OVL_PASS_OPEN_PORT;
	}
	if (reason)
		return ovl_pass_datagram(p, reason, 0, 1);
	return ovl_drop(p, OVL_DROP_FRAG_SHORT, OVL_DIR_INGRESS);
}

static __always_inline int ovl_filter_ingress(struct __sk_buff *skb)
{
	struct ovl_pkt p;
	struct ovl_ct_val *ct;
	int r, filtering, whole;
	__u64 enforced;

	r = ovl_parse(skb, &p);
	if (r == OVL_P_NOT_IP)
		return ovl_pass(OVL_PASS_UNTOUCHED);
	filtering = ovl_filtering();
	if (r != OVL_P_OK) {
		if (filtering)
			return ovl_drop(&p, OVL_DROP_MALFORMED, OVL_DIR_INGRESS);
		return ovl_pass(OVL_PASS_UNTOUCHED);
	}
	if (ovl_is_martian(&p))
		return ovl_drop(&p, OVL_DROP_MARTIAN, OVL_DIR_INGRESS);

	whole = p.frag != OVL_FRAG_LATER && !p.short_l4;
	enforced = ovl_cfg_get(OVL_CFG_POLICY_ENFORCED);
	if (whole) {
		ct = ovl_ct_ingress(&p);
		if (ct)
			return ovl_pass_datagram(&p, OVL_PASS_ESTABLISHED, ovl_reverse_nat(skb, &p, ct),
						 filtering);
		if (!enforced && ovl_is_member(&p))
			return ovl_admit(&p, OVL_PASS_MEMBER, filtering);
	}

	if (ovl_failsafe_match(&p)) {
		if (p.frag == OVL_FRAG_LATER)
			return ovl_later_fragment(skb, &p, filtering, 1);
		/* a whole datagram missed conntrack above */
		ct = whole ? NULL : ovl_ct_ingress(&p);
		if (!ct)
			ovl_ct_mark_inbound(&p);
		return ovl_pass_datagram(&p, OVL_PASS_FAILSAFE, ct ? ovl_reverse_nat(skb, &p, ct) : 0,
					 filtering);
	}
	if (p.frag == OVL_FRAG_LATER)
		return ovl_later_fragment(skb, &p, filtering, 0);
	if (p.short_l4) {
		if (filtering)
			return ovl_short_first_fragment(&p);
		return ovl_pass(OVL_PASS_UNTOUCHED);
	}

	if (ovl_ct_related(skb, &p))
		return ovl_pass(OVL_PASS_RELATED);
	if (ovl_is_ndp_or_mld(&p))
		return ovl_pass(OVL_PASS_NDP);

	if (enforced) {
		/* default-deny: members, open ports and reject_all no longer apply */
		if (ovl_policy_match(&p))
			return ovl_admit(&p, OVL_PASS_POLICY, filtering);
		return ovl_refuse(&p, OVL_DROP_POLICY, (__u32)ovl_cfg_get(OVL_CFG_POLICY_DEFAULT));
	}
	/* members were admitted above */
	if (ovl_port_open(&p))
		return ovl_admit(&p, OVL_PASS_OPEN_PORT, filtering);
	if (ovl_cfg_get(OVL_CFG_REJECT_ALL))
		return ovl_refuse(&p, OVL_DROP_NOT_ALLOWED, 0);
	return ovl_admit(&p, OVL_PASS_DEFAULT, filtering);
}

#endif /* OVL_FILTER_H */
