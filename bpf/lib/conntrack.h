/* conntrack.h: the connection table of the ingress filter and of reverse NAT.
 *
 * Who may create state (docs/datapath.md, "Conntrack"):
 *
 * - ovl_ct (IPv4) and ovl_ct6 (IPv6) hold ONLY flows this host initiated.
 *   The uplink egress creates an entry on a TCP SYN without ACK (a new flow:
 *   overwrites), and on a UDP datagram or an ICMP echo request when no live
 *   entry exists and (UDP) no inbound marker says it is a reply; the ovl0
 *   egress creates translated entries (`overlay` set). No other TCP packet
 *   creates an entry on egress: a SYN-ACK of an inbound connection never
 *   does, so inbound flows are judged by the filter on every packet.
 * - ovl_ct_in holds inbound markers: written at ingress when a new inbound
 *   TCP SYN or UDP datagram is admitted. Read by the uplink egress (a UDP
 *   reply of an inbound flow creates no entry) and by the related-ICMP
 *   check only; never used to admit anything else. Outsiders can fill only
 *   this map, never ovl_ct*, so they cannot evict the NAT state of overlay
 *   flows.
 *
 * Keys are the tuple as INGRESS sees the flow's replies: a packet this host
 * sends creates {saddr = the remote, daddr = us, sport = the remote's port,
 * dport = ours}; ICMP echo uses {sport = identifier, dport = 0}. Inside the
 * programs a tuple of either family is a struct ovl_ct6_key (IPv4 mapped);
 * ovl_ct_get() turns it into the ovl_ct key for IPv4.
 *
 * TCP entries move SYN_SENT (egress SYN) -> ESTABLISHED (ingress SYN-ACK or
 * ACK) -> CLOSING (FIN either way) or CLOSED (RST either way); an ingress SYN
 * without ACK never matches an entry. Every lookup checks the entry against
 * the lifetime of its state (ovl_cfg, in seconds; 0 = the default):
 * now - last_seen > lifetime is a miss and the entry is deleted. User space
 * sweeps what no packet looks up any more.
 *
 * NAT generation: user space bumps OVL_CFG_NAT_GEN after an apply that wrote
 * or deleted NAT entries (ovl_nat, ovl_nat_ext). A translated entry carries
 * the generation it was verified at; an ingress hit with another generation
 * checks that the overlay address's NAT entry (ovl_nat_lookup) still names
 * the packet's source as its real address, then refreshes the generation,
 * or deletes the entry and misses (the peer was removed or re-pointed: its
 * replies are judged as new).
 */
#ifndef OVL_CONNTRACK_H
#define OVL_CONNTRACK_H

#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"

#define OVL_NS_PER_S 1000000000ULL

static __always_inline int ovl_is_icmp_any(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == OVL_IPPROTO_ICMPV6;
}

/* A packet leaving the host that may open or continue a tracked flow: TCP,
 * UDP or an ICMP/ICMPv6 echo request, with its L4 header. */
static __always_inline int ovl_ct_egress_trackable(const struct ovl_pkt *p)
{
	if (!p->has_l4)
		return 0;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return 1;
	if (p->proto == IPPROTO_ICMP)
		return p->icmp_type == ICMP_ECHO;
	return p->proto == OVL_IPPROTO_ICMPV6 && p->icmp_type == ICMPV6_ECHO_REQUEST;
}

/* An arriving packet that may belong to a tracked flow: TCP, UDP or an
 * ICMP/ICMPv6 echo reply, with its L4 header. */
static __always_inline int ovl_ct_ingress_trackable(const struct ovl_pkt *p)
{
	if (!p->has_l4)
		return 0;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return 1;
	if (p->proto == IPPROTO_ICMP)
		return p->icmp_type == ICMP_ECHOREPLY;
	return p->proto == OVL_IPPROTO_ICMPV6 && p->icmp_type == ICMPV6_ECHO_REPLY;
}

static __always_inline int ovl_tcp_bare_syn(__u8 flags)
{
	return (flags & (OVL_TCP_SYN | OVL_TCP_ACK)) == OVL_TCP_SYN;
}

/* The tuple of the reply to packet `p` sent from `local` to `remote` (16-byte
 * forms), as ingress will see it. */
static __always_inline void ovl_ct_reply_tuple(struct ovl_ct6_key *t, const struct ovl_pkt *p,
					       const __u32 *remote, const __u32 *local)
{
	__builtin_memset(t, 0, sizeof(*t));
	__builtin_memcpy(t->saddr, remote, 16);
	__builtin_memcpy(t->daddr, local, 16);
	t->proto = p->proto;
	t->family = p->family;
	if (ovl_is_icmp_any(p->proto)) {
		t->sport = p->sport;    /* echo identifier, both ways */
	} else {
		t->sport = p->dport;
		t->dport = p->sport;
	}
}

/* The tuple of packet `p` in its own direction (ingress: the key of its flow). */
static __always_inline void ovl_ct_own_tuple(struct ovl_ct6_key *t, const struct ovl_pkt *p)
{
	__builtin_memset(t, 0, sizeof(*t));
	__builtin_memcpy(t->saddr, p->src, 16);
	__builtin_memcpy(t->daddr, p->dst, 16);
	t->sport = p->sport;
	t->dport = p->dport;
	t->proto = p->proto;
	t->family = p->family;
}

static __always_inline void ovl_ct_key4(struct ovl_ct_key *k, const struct ovl_ct6_key *t)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = t->saddr[3];
	k->daddr = t->daddr[3];
	k->sport = t->sport;
	k->dport = t->dport;
	k->proto = t->proto;
}

static __always_inline struct ovl_ct_val *ovl_ct_get(struct ovl_ct6_key *t)
{
	struct ovl_ct_key k;

	if (t->family == 4) {
		ovl_ct_key4(&k, t);
		return ovl_ct.lookup(&k);
	}
	return ovl_ct6.lookup(t);
}

static __always_inline void ovl_ct_put(struct ovl_ct6_key *t, struct ovl_ct_val *v)
{
	struct ovl_ct_key k;

	if (t->family == 4) {
		ovl_ct_key4(&k, t);
		ovl_ct.update(&k, v);
	} else {
		ovl_ct6.update(t, v);
	}
}

static __always_inline void ovl_ct_del(struct ovl_ct6_key *t)
{
	struct ovl_ct_key k;

	if (t->family == 4) {
		ovl_ct_key4(&k, t);
		ovl_ct.delete(&k);
	} else {
		ovl_ct6.delete(t);
	}
}

/* Seconds from ovl_cfg slot `idx`, or `dflt` when 0, in nanoseconds. */
static __always_inline __u64 ovl_lifetime_ns(int idx, __u64 dflt)
{
	__u64 s = ovl_cfg_get(idx);

	return (s ? s : dflt) * OVL_NS_PER_S;
}

static __always_inline __u64 ovl_ct_lifetime_ns(__u8 proto, __u8 state)
{
	if (proto == IPPROTO_TCP) {
		switch (state) {
		case OVL_CT_ESTABLISHED:
			return ovl_lifetime_ns(OVL_CFG_CT_TCP_ESTABLISHED_S,
					       OVL_CT_DEFAULT_TCP_ESTABLISHED_S);
		case OVL_CT_CLOSING:
			return ovl_lifetime_ns(OVL_CFG_CT_TCP_FIN_S, OVL_CT_DEFAULT_TCP_FIN_S);
		case OVL_CT_CLOSED:
			return ovl_lifetime_ns(OVL_CFG_CT_TCP_RST_S, OVL_CT_DEFAULT_TCP_RST_S);
		default:
			return ovl_lifetime_ns(OVL_CFG_CT_TCP_SYN_S, OVL_CT_DEFAULT_TCP_SYN_S);
		}
	}
	if (proto == IPPROTO_UDP)
		return ovl_lifetime_ns(OVL_CFG_CT_UDP_S, OVL_CT_DEFAULT_UDP_S);
	return ovl_lifetime_ns(OVL_CFG_CT_ICMP_S, OVL_CT_DEFAULT_ICMP_S);
}

/* Past its lifetime? The age is a signed difference: a last_seen a little
 * after `now` (another CPU refreshed it meanwhile) is a negative age, live;
 * and any age below 2^63 ns is exact modulo 2^64, whatever the clock's. */
static __always_inline int ovl_past(__u64 now, __u64 seen, __u64 life_ns)
{
	__u64 age = now - seen;

	/* an age of 2^63 ns or more is a negative one: a last_seen after `now` */
	return age < (1ULL << 63) && age > life_ns;
}

static __always_inline int ovl_ct_expired(const struct ovl_ct_val *v, __u8 proto, __u64 now)
{
	return ovl_past(now, v->last_seen_ns, ovl_ct_lifetime_ns(proto, v->state));
}

/* The live entry of tuple `t` (an expired one is deleted and counted). */
static __always_inline struct ovl_ct_val *ovl_ct_live(struct ovl_ct6_key *t, __u64 now)
{
	struct ovl_ct_val *v = ovl_ct_get(t);

	if (v && ovl_ct_expired(v, t->proto, now)) {
		ovl_ct_del(t);
		ovl_count(OVL_CT_EXPIRED);
		return NULL;
	}
	return v;
}

/* The TCP state after a packet with `flags` on an entry in `state`. */
static __always_inline __u8 ovl_tcp_next(__u8 state, __u8 flags, int ingress)
{
	if (flags & OVL_TCP_RST)
		return OVL_CT_CLOSED;
	if (flags & OVL_TCP_FIN)
		return state == OVL_CT_CLOSED ? state : OVL_CT_CLOSING;
	if (ingress && state == OVL_CT_SYN_SENT && (flags & OVL_TCP_ACK))
		return OVL_CT_ESTABLISHED;
	return state;
}

static __always_inline void ovl_ct_step(struct ovl_ct_val *v, const struct ovl_pkt *p,
					int ingress, __u64 now)
{
	__u8 next;

	if (p->proto == IPPROTO_TCP) {
		next = ovl_tcp_next(v->state, p->tcp_flags, ingress);
		if (next != v->state)
			v->state = next;
	}
	v->last_seen_ns = now;
}

static __always_inline void ovl_ct_create(struct ovl_ct6_key *t, __u8 state, __u8 flags,
					  __u32 overlay, __u64 now)
{
	struct ovl_ct_val v = {};

	v.overlay = overlay;
	v.nat_gen = overlay ? (__u32)ovl_cfg_get(OVL_CFG_NAT_GEN) : 0;
	v.last_seen_ns = now;
	v.state = state;
	v.flags = flags;
	ovl_ct_put(t, &v);
}

/* Is there a live inbound marker for tuple `t` (UDP markers age like UDP entries)? */
static __always_inline int ovl_ct_inbound(struct ovl_ct6_key *t, __u64 now)
{
	struct ovl_ct_in_val *m = ovl_ct_in.lookup(t);

	if (!m)
		return 0;
	if (t->proto == IPPROTO_UDP &&
	    ovl_past(now, m->last_seen_ns, ovl_ct_lifetime_ns(IPPROTO_UDP, OVL_CT_NEW)))
		return 0;
	return 1;
}

/* Ingress: an admitted new inbound flow (TCP SYN or UDP) leaves a marker. */
static __always_inline void ovl_ct_mark_inbound(const struct ovl_pkt *p)
{
	struct ovl_ct6_key t;
	struct ovl_ct_in_val v = {};
	struct ovl_ct_in_val *m;

	if (!p->has_l4)
		return;
	if (p->proto == IPPROTO_TCP) {
		if (!ovl_tcp_bare_syn(p->tcp_flags))
			return;
	} else if (p->proto != IPPROTO_UDP) {
		return;
	}
	ovl_ct_own_tuple(&t, p);
	v.last_seen_ns = bpf_ktime_get_ns();
	m = ovl_ct_in.lookup(&t);
	if (m) {
		m->last_seen_ns = v.last_seen_ns;
		return;
	}
	ovl_ct_in.update(&t, &v);
}

/* Overlay egress: packet `p` (still addressed to `overlay`) was translated to
 * `real`; create or refresh the translated entry of its flow. A bare SYN is a
 * new flow (overwrites); other TCP packets only refresh (and step) an entry
 * of the same translation; UDP and echo requests create one when none is
 * live. A NAT entry always wins over a plain one for the same tuple. */
static __always_inline void ovl_ct_nat_track(const struct ovl_pkt *p, __u32 real, __u32 overlay)
{
	struct ovl_ct6_key t;
	struct ovl_ct_val *v;
	__u32 remote[4];
	__u64 now;

	if (!ovl_ct_egress_trackable(p))
		return;
	ovl_v4_mapped(remote, real);
	ovl_ct_reply_tuple(&t, p, remote, p->src);
	now = bpf_ktime_get_ns();
	if (p->proto == IPPROTO_TCP && ovl_tcp_bare_syn(p->tcp_flags)) {
		ovl_ct_create(&t, OVL_CT_SYN_SENT, OVL_CT_F_EGRESS | OVL_CT_F_NAT, overlay, now);
		return;
	}
	v = ovl_ct_get(&t);
	if (v && v->overlay == overlay && (v->flags & OVL_CT_F_NAT) &&
	    !ovl_ct_expired(v, p->proto, now)) {
		/* the common case: refresh in place; the NAT entry was just read */
		ovl_ct_step(v, p, 0, now);
		v->nat_gen = (__u32)ovl_cfg_get(OVL_CFG_NAT_GEN);
		return;
	}
	if (p->proto != IPPROTO_TCP)
		ovl_ct_create(&t, OVL_CT_NEW, OVL_CT_F_EGRESS | OVL_CT_F_NAT, overlay, now);
}

/* Uplink egress: track what this host initiates; never alters or drops.
 * TCP data packets do no work at all. */
static __always_inline void ovl_ct_track(const struct ovl_pkt *p)
{
	struct ovl_ct6_key t;
	struct ovl_ct_val *v;
	__u64 now;

	if (!ovl_ct_egress_trackable(p))
		return;
	if (p->proto == IPPROTO_TCP &&
	    !(p->tcp_flags & (OVL_TCP_SYN | OVL_TCP_FIN | OVL_TCP_RST)))
		return;
	ovl_ct_reply_tuple(&t, p, p->dst, p->src);
	now = bpf_ktime_get_ns();
	v = ovl_ct_get(&t);
	if (v && ovl_ct_expired(v, p->proto, now))
		v = NULL;
	if (p->proto == IPPROTO_TCP) {
		if (ovl_tcp_bare_syn(p->tcp_flags)) {
			/* a new flow, unless the overlay egress made its translated entry */
			if (v && (v->flags & OVL_CT_F_NAT) && v->state == OVL_CT_SYN_SENT)
				v->last_seen_ns = now;
			else
				ovl_ct_create(&t, OVL_CT_SYN_SENT, OVL_CT_F_EGRESS, 0, now);
		} else if (v) {
			ovl_ct_step(v, p, 0, now);      /* FIN or RST of one of our flows */
		}
		return;
	}
	if (v) {
		v->last_seen_ns = now;
		return;
	}
	if (p->proto == IPPROTO_UDP && ovl_ct_inbound(&t, now))
		return;                 /* a reply of an admitted inbound flow */
	ovl_ct_create(&t, OVL_CT_NEW, OVL_CT_F_EGRESS, 0, now);
}

/* Uplink egress fast path: an IPv4 TCP segment without SYN, FIN or RST (the
 * bulk of what leaves, on both ends of every flow) needs no conntrack work.
 * Told from the IP header and the TCP flags byte alone, without the full
 * parse. 1: leave untouched; 0: the full path decides (it too does nothing
 * for such a segment, so the fast path changes no verdict and no state). */
static __always_inline int ovl_egress_tcp_data4(struct __sk_buff *skb)
{
	struct iphdr ip;
	__u8 flags;

	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, OVL_L3_OFF, &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP ||
	    (bpf_ntohs(ip.frag_off) & (OVL_IP_MF | OVL_IP_OFFMASK)))
		return 0;
	if (bpf_skb_load_bytes(skb, OVL_L3_OFF + ip.ihl * 4 + OVL_TCP_FLAGS, &flags, 1) < 0)
		return 0;
	return !(flags & (OVL_TCP_SYN | OVL_TCP_FIN | OVL_TCP_RST));
}

static __always_inline int ovl_ct_egress(struct __sk_buff *skb)
{
	struct ovl_pkt p;

	if (ovl_egress_tcp_data4(skb))
		return TC_ACT_OK;
	if (ovl_parse(skb, &p) == OVL_P_OK)
		ovl_ct_track(&p);
	return TC_ACT_OK;
}

/* Ingress: the live host-initiated entry of the packet's own tuple, TCP state
 * stepped and last_seen refreshed; NULL on a miss. A bare SYN never matches;
 * an expired entry, or a translated one whose NAT entry is gone or
 * re-pointed, is deleted and misses. */
static __always_inline struct ovl_ct_val *ovl_ct_ingress(const struct ovl_pkt *p)
{
	struct ovl_ct6_key t;
	struct ovl_ct_key k4;
	struct ovl_ct_val *v;
	struct ovl_nat_val *nat;
	__u32 overlay, gen;
	__u64 now;

	if (!ovl_ct_ingress_trackable(p))
		return NULL;
	if (p->proto == IPPROTO_TCP && ovl_tcp_bare_syn(p->tcp_flags))
		return NULL;
	if (p->family == 4) {           /* the IPv4 key straight from the packet */
		__builtin_memset(&k4, 0, sizeof(k4));
		k4.saddr = p->saddr;
		k4.daddr = p->daddr;
		k4.sport = p->sport;
		k4.dport = p->dport;
		k4.proto = p->proto;
		v = ovl_ct.lookup(&k4);
	} else {
		ovl_ct_own_tuple(&t, p);
		v = ovl_ct6.lookup(&t);
	}
	if (!v)
		return NULL;    /* the common miss (inbound flows): no clock read */
	now = bpf_ktime_get_ns();
	if (ovl_ct_expired(v, p->proto, now)) {
		ovl_count(OVL_CT_EXPIRED);
		goto gone;
	}
	overlay = v->overlay;
	if (overlay) {
		gen = (__u32)ovl_cfg_get(OVL_CFG_NAT_GEN);
		if (v->nat_gen != gen) {
			nat = ovl_nat_lookup(overlay);
			if (!nat || nat->real != p->saddr) {
				ovl_count(OVL_CT_NAT_STALE);
				goto gone;
			}
			v->nat_gen = gen;
		}
	}
	ovl_ct_step(v, p, 1, now);
	return v;
gone:
	if (p->family == 4)
		ovl_ct.delete(&k4);
	else
		ovl_ct6.delete(&t);
	return NULL;
}

static __always_inline int ovl_is_icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB;
}

/* Ingress: is the packet an ICMP error (IPv4: destination unreachable, time
 * exceeded, parameter problem; ICMPv6: types 1-4) about a flow this host
 * opened, or about our reply in an admitted inbound flow? The error quotes
 * the IP header and the first 8 bytes of the packet we sent (IPv6: an
 * extension header right after the quoted header is not walked); the
 * tuple of that packet's reply is the key. The outer source may be any
 * router on the path, so it is not used. */
static __always_inline int ovl_ct_related(struct __sk_buff *skb, const struct ovl_pkt *p)
{
	struct iphdr in;
	struct ipv6hdr in6;
	struct ovl_ct6_key t = {};
	__u8 l4[8];
	__u32 off;
	__u8 echo;

	if (!p->has_l4 || p->frag != OVL_FRAG_NONE)
		return 0;
	off = p->l4_off + OVL_ICMP_HLEN;
	if (p->proto == IPPROTO_ICMP) {
		if (!ovl_is_icmp_error(p->icmp_type))
			return 0;
		if (off + sizeof(in) > p->l3_end ||
		    bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
			return 0;
		if (in.version != 4 || in.ihl < 5 ||
		    (bpf_ntohs(in.frag_off) & OVL_IP_OFFMASK))
			return 0;
		t.family = 4;
		ovl_v4_mapped(t.saddr, in.daddr);
		ovl_v4_mapped(t.daddr, in.saddr);
		t.proto = in.protocol;
		off += in.ihl * 4;
		echo = ICMP_ECHO;
	} else if (p->proto == OVL_IPPROTO_ICMPV6) {
		if (p->icmp_type < 1 || p->icmp_type > 4)
			return 0;
		if (off + sizeof(in6) > p->l3_end ||
		    bpf_skb_load_bytes(skb, off, &in6, sizeof(in6)) < 0)
			return 0;
		if (in6.version != 6)
			return 0;
		t.family = 6;
		__builtin_memcpy(t.saddr, &in6.daddr, 16);
		__builtin_memcpy(t.daddr, &in6.saddr, 16);
		t.proto = in6.nexthdr;
		off += sizeof(in6);
		echo = ICMPV6_ECHO_REQUEST;
	} else {
		return 0;
	}
	if (off + sizeof(l4) > p->l3_end || bpf_skb_load_bytes(skb, off, l4, sizeof(l4)) < 0)
		return 0;
	if (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP) {
		__builtin_memcpy(&t.sport, &l4[2], sizeof(t.sport));
		__builtin_memcpy(&t.dport, &l4[0], sizeof(t.dport));
	} else if (ovl_is_icmp_any(t.proto) && l4[0] == echo) {
		__builtin_memcpy(&t.sport, &l4[4], sizeof(t.sport));
	} else {
		return 0;
	}
	return ovl_ct_live(&t, bpf_ktime_get_ns()) != NULL || ovl_ct_in.lookup(&t) != NULL;
}

#endif /* OVL_CONNTRACK_H */
