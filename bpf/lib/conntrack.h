/* conntrack.h: a minimal connection table for the ingress filter and for
 * reverse NAT.
 *
 * ovl_ct is keyed by the tuple as INGRESS will see it: a packet this host
 * sends creates the entry for its expected reply {saddr = the remote,
 * daddr = us, sport = remote port, dport = our port}, so ingress looks up a
 * packet's own tuple with no swapping. ICMP echo uses {sport = identifier,
 * dport = 0}: a request creates the key its reply will carry.
 *
 * There is no TCP state machine: entries live until the LRU evicts them or
 * user space expires them by last_seen_ns.
 */
#ifndef OVL_CONNTRACK_H
#define OVL_CONNTRACK_H

#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

/* A packet leaving the host that opens or continues a tracked flow:
 * TCP, UDP or an ICMP echo request, with its L4 header (so never a
 * non-first fragment). */
static __always_inline int ovl_ct_egress_trackable(const struct ovl_pkt *p)
{
	if (!p->has_l4)
		return 0;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return 1;
	return p->proto == IPPROTO_ICMP && p->icmp_type == ICMP_ECHO;
}

/* An arriving packet that may belong to a tracked flow: TCP, UDP or an ICMP
 * echo reply, with its L4 header. */
static __always_inline int ovl_ct_ingress_trackable(const struct ovl_pkt *p)
{
	if (!p->has_l4)
		return 0;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return 1;
	return p->proto == IPPROTO_ICMP && p->icmp_type == ICMP_ECHOREPLY;
}

/* The key of the reply to a packet sent from `local` to `remote` with
 * ports (sport, dport) in the packet's own direction. */
static __always_inline void ovl_ct_reply_key(struct ovl_ct_key *k, __u8 proto,
					     __u32 remote, __u32 local,
					     __u16 sport, __u16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = remote;
	k->daddr = local;
	k->proto = proto;
	if (proto == IPPROTO_ICMP) {
		k->sport = sport;       /* echo identifier, both ways */
	} else {
		k->sport = dport;
		k->dport = sport;
	}
}

/* Overlay egress: the packet was translated to `real`; remember the
 * overlay address to restore on its replies. Overwrites: a NAT entry always
 * wins over a plain one for the same tuple. */
static __always_inline void ovl_ct_nat_create(const struct ovl_pkt *p, __u32 real,
					      __u32 overlay)
{
	struct ovl_ct_key k;
	struct ovl_ct_val v = {};
	struct ovl_ct_val *old;
	__u64 now = bpf_ktime_get_ns();

	ovl_ct_reply_key(&k, p->proto, real, p->saddr, p->sport, p->dport);
	/* The common case is a packet of a flow already tracked with this same
	 * translation: refresh the timestamp in place instead of rewriting the
	 * LRU entry on every packet. */
	old = ovl_ct.lookup(&k);
	if (old && old->overlay == overlay && (old->flags & OVL_CT_F_NAT)) {
		old->last_seen_ns = now;
		return;
	}
	v.overlay = overlay;
	v.flags = OVL_CT_F_EGRESS | OVL_CT_F_NAT;
	v.last_seen_ns = now;
	ovl_ct.update(&k, &v);
}

/* Uplink egress: refresh the flow's entry or create a plain one. Never
 * overwrites (BPF_NOEXIST), so a NAT entry made by the overlay egress for
 * the same tuple is kept. */
static __always_inline void ovl_ct_track(const struct ovl_pkt *p)
{
	struct ovl_ct_key k;
	struct ovl_ct_val v = {};
	struct ovl_ct_val *old;
	__u64 now = bpf_ktime_get_ns();

	ovl_ct_reply_key(&k, p->proto, p->daddr, p->saddr, p->sport, p->dport);
	old = ovl_ct.lookup(&k);
	if (old) {
		old->last_seen_ns = now;
		return;
	}
	v.flags = OVL_CT_F_EGRESS;
	v.last_seen_ns = now;
	ovl_ct.insert(&k, &v);
}

/* Uplink egress: track what leaves the host; never alters or drops it. */
static __always_inline int ovl_ct_egress(struct __sk_buff *skb)
{
	struct ovl_pkt p;

	if (ovl_parse(skb, &p) == OVL_P_OK && ovl_ct_egress_trackable(&p))
		ovl_ct_track(&p);
	return TC_ACT_OK;
}

/* Ingress: the entry for the packet's own tuple, refreshed; NULL if none. */
static __always_inline struct ovl_ct_val *ovl_ct_lookup(const struct ovl_pkt *p)
{
	struct ovl_ct_key k;
	struct ovl_ct_val *v;

	if (!ovl_ct_ingress_trackable(p))
		return NULL;
	__builtin_memset(&k, 0, sizeof(k));
	k.saddr = p->saddr;
	k.daddr = p->daddr;
	k.sport = p->sport;
	k.dport = p->dport;
	k.proto = p->proto;
	v = ovl_ct.lookup(&k);
	if (v)
		v->last_seen_ns = bpf_ktime_get_ns();
	return v;
}

static __always_inline int ovl_is_icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB;
}

/* Ingress: is the packet an ICMP error (destination unreachable, time
 * exceeded, parameter problem) about a flow this host opened? The error
 * quotes the IP header and the first 8 bytes of the packet we sent; the
 * flow's entry is keyed by the reply to that quoted packet. The outer source
 * may be any router on the path, so it is not used. */
static __always_inline int ovl_ct_related(struct __sk_buff *skb, const struct ovl_pkt *p)
{
	struct iphdr in;
	struct ovl_ct_key k;
	__u8 l4[8];
	__u32 off;
	__u16 sport = 0, dport = 0;

	if (p->proto != IPPROTO_ICMP || !p->has_l4 || !ovl_is_icmp_error(p->icmp_type))
		return 0;
	off = p->l4_off + OVL_ICMP_HLEN;
	if (off + sizeof(in) > p->l3_end ||
	    bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
		return 0;
	if (in.version != 4 || in.ihl < 5 ||
	    (bpf_ntohs(in.frag_off) & OVL_IP_OFFMASK))
		return 0;
	off += in.ihl * 4;
	if (off + sizeof(l4) > p->l3_end ||
	    bpf_skb_load_bytes(skb, off, l4, sizeof(l4)) < 0)
		return 0;
	if (in.protocol == IPPROTO_TCP || in.protocol == IPPROTO_UDP) {
		__builtin_memcpy(&sport, &l4[0], sizeof(sport));
		__builtin_memcpy(&dport, &l4[2], sizeof(dport));
	} else if (in.protocol == IPPROTO_ICMP && l4[0] == ICMP_ECHO) {
		__builtin_memcpy(&sport, &l4[4], sizeof(sport));
	} else {
		return 0;
	}
	ovl_ct_reply_key(&k, in.protocol, in.daddr, in.saddr, sport, dport);
	return ovl_ct.lookup(&k) != NULL;
}

#endif /* OVL_CONNTRACK_H */
