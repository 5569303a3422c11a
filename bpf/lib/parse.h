/* parse.h: IPv4, IPv6 and L4 header parsing for tc programs on Ethernet devices.
 *
 * Headers are read with bpf_skb_load_bytes, so the parser is bounds-checked
 * by the kernel, works on non-linear skbs and keeps the verifier's job small.
 * The IPv4 header length comes from IHL (options are skipped, never touched);
 * IPv6 extension headers are walked in a bounded loop. The IP total (payload)
 * length bounds every later read, so Ethernet padding is never mistaken for
 * payload.
 *
 * Fragments: a later fragment (offset > 0) has no L4 header; a first fragment
 * (offset 0, more fragments) that does not carry the full minimal L4 header
 * (TCP 20 bytes, UDP 8, ICMP/ICMPv6 8) parses as OVL_P_OK with short_l4 set
 * (and has_ports when a TCP or UDP one carries at least its two ports), so
 * that the filter judges it on what it carries or drops it as frag_short; the
 * same cut in a whole datagram is OVL_P_MALFORMED. l4_len is how many bytes
 * of L4 a first fragment carries, so that a later fragment overlapping them
 * can be told.
 */
#ifndef OVL_PARSE_H
#define OVL_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#define OVL_L3_OFF ETH_HLEN
#define OVL_IP_SADDR_OFF (OVL_L3_OFF + offsetof(struct iphdr, saddr))
#define OVL_IP_DADDR_OFF (OVL_L3_OFF + offsetof(struct iphdr, daddr))
#define OVL_IP_CSUM_OFF (OVL_L3_OFF + offsetof(struct iphdr, check))
#define OVL_IP_MF 0x2000
#define OVL_IP_OFFMASK 0x1fff
#define OVL_IP6_HLEN 40
#define OVL_IP6_MAX_EXT 8       /* extension headers walked before giving up */

#define OVL_TCP_HLEN 20
#define OVL_TCP_CSUM 16
#define OVL_TCP_FLAGS 13
#define OVL_UDP_HLEN 8
#define OVL_UDP_CSUM 6
#define OVL_ICMP_HLEN 8

#define OVL_TCP_FIN 0x01
#define OVL_TCP_SYN 0x02
#define OVL_TCP_RST 0x04
#define OVL_TCP_ACK 0x10

#define OVL_IPPROTO_ICMPV6 58
#define OVL_NEXTHDR_HOP 0
#define OVL_NEXTHDR_ROUTING 43
#define OVL_NEXTHDR_FRAGMENT 44
#define OVL_NEXTHDR_AUTH 51
#define OVL_NEXTHDR_DEST 60

enum ovl_parse_result {
	OVL_P_NOT_IP = 0,
	OVL_P_OK = 1,
	OVL_P_MALFORMED = 2,
};

enum ovl_frag {
	OVL_FRAG_NONE = 0,      /* a whole datagram */
	OVL_FRAG_FIRST = 1,     /* offset 0, more fragments follow */
	OVL_FRAG_LATER = 2,     /* offset > 0: no L4 header */
};

struct ovl_pkt {
	__u32 src[4];           /* IPv6, or IPv4-mapped: the form of 16-byte keys and events */
	__u32 dst[4];
	__u32 saddr;            /* IPv4 only, network order */
	__u32 daddr;
	__u32 frag_id;          /* IPv4 id, or the IPv6 fragment header's id */
	__u32 l4_off;           /* offset of the L4 header in the frame */
	__u32 l4_csum_off;      /* offset of the L4 checksum to fix, 0: none */
	__u32 l3_end;           /* offset just past the IP datagram */
	__u16 sport;            /* network order; ICMP echo: identifier */
	__u16 dport;            /* network order; ICMP echo: 0 */
	__u16 frag_off;         /* fragment offset in bytes */
	__u16 l4_len;           /* a first fragment: bytes of L4 it carries (at most 65535) */
	__u8 family;            /* 4 or 6; 0 until the IP header was read */
	__u8 proto;             /* the L4 protocol (a later fragment: as its header says) */
	__u8 frag_proto;        /* IPv4 protocol or the fragment header's next header */
	__u8 frag;              /* enum ovl_frag */
	__u8 has_l4;            /* the L4 header was present and read */
	__u8 short_l4;          /* a first fragment without its full L4 header */
	__u8 icmp_type;
	__u8 tcp_flags;
	__u8 hop_limit;         /* IPv6 */
	__u8 has_ports;         /* sport and dport were read (has_l4, or a short TCP/UDP
				 * first fragment that carries them) */
};

static __always_inline void ovl_v4_mapped(__u32 out[4], __u32 v4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0xffff);
	out[3] = v4;
}

static __always_inline int ovl_is_icmp_echo(__u8 type)
{
	return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
}

static __always_inline int ovl_is_icmp6_echo(__u8 type)
{
	return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
}

/* The minimal L4 header of `proto` (0: no ports, no L4 to judge) and the
 * offset of its checksum within it (0: no pseudo-header checksum to fix). */
static __always_inline __u32 ovl_l4_need(__u8 proto, __u32 *csum)
{
	switch (proto) {
	case IPPROTO_TCP:
		*csum = OVL_TCP_CSUM;
		return OVL_TCP_HLEN;
	case IPPROTO_UDP:
		*csum = OVL_UDP_CSUM;
		return OVL_UDP_HLEN;
	case IPPROTO_ICMP:
		*csum = 0;      /* the ICMP checksum has no pseudo-header */
		return OVL_ICMP_HLEN;
	case OVL_IPPROTO_ICMPV6:
		*csum = 0;      /* never rewritten: no IPv6 translation */
		return OVL_ICMP_HLEN;
	}
	*csum = 0;
	return 0;
}

/* Read the L4 header at `off` (p->proto set). `avail` bytes of the datagram
 * follow it. Returns OVL_P_OK (has_l4 set, or short_l4 for a first fragment
 * that is cut) or OVL_P_MALFORMED. */
static __always_inline int ovl_parse_l4(struct __sk_buff *skb, struct ovl_pkt *p,
					__u32 off, __u32 avail)
{
	__u8 l4[16];
	__u32 need, csum;

	need = ovl_l4_need(p->proto, &csum);
	p->l4_len = avail > 0xffff ? 0xffff : avail;
	if (!need)
		return OVL_P_OK;
	if (need > avail) {
		if (p->frag != OVL_FRAG_FIRST)
			return OVL_P_MALFORMED;
		p->short_l4 = 1;
		/* TCP and UDP start with the two ports: enough for the steps that
		 * judge by address and destination port. */
		if ((p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) && avail >= 4) {
			if (bpf_skb_load_bytes(skb, off, l4, 4) < 0)
				return OVL_P_MALFORMED;
			__builtin_memcpy(&p->sport, &l4[0], sizeof(p->sport));
			__builtin_memcpy(&p->dport, &l4[2], sizeof(p->dport));
			p->has_ports = 1;
		}
		return OVL_P_OK;
	}
	p->l4_off = off;
	if (p->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, off, l4, 16) < 0)
			return OVL_P_MALFORMED;
		p->tcp_flags = l4[OVL_TCP_FLAGS];
	} else if (bpf_skb_load_bytes(skb, off, l4, 8) < 0) {
		return OVL_P_MALFORMED;
	}
	if (p->proto == IPPROTO_ICMP || p->proto == OVL_IPPROTO_ICMPV6) {
		p->icmp_type = l4[0];
		if (p->proto == IPPROTO_ICMP ? ovl_is_icmp_echo(l4[0]) : ovl_is_icmp6_echo(l4[0]))
			__builtin_memcpy(&p->sport, &l4[4], sizeof(p->sport));
	} else {
		__builtin_memcpy(&p->sport, &l4[0], sizeof(p->sport));
		__builtin_memcpy(&p->dport, &l4[2], sizeof(p->dport));
		p->l4_csum_off = off + csum;
		p->has_ports = 1;
	}
	p->has_l4 = 1;
	return OVL_P_OK;
}

static __always_inline int ovl_parse4(struct __sk_buff *skb, struct ovl_pkt *p)
{
	struct iphdr ip;
	__u32 ihl_len, tot_len;
	__u16 frag;

	if (bpf_skb_load_bytes(skb, OVL_L3_OFF, &ip, sizeof(ip)) < 0)
		return OVL_P_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return OVL_P_MALFORMED;
	ihl_len = ip.ihl * 4;
	tot_len = bpf_ntohs(ip.tot_len);
	/* BIG TCP (GSO packets over 64 KiB) carries tot_len 0. */
	if (tot_len == 0 && skb->gso_size)
		tot_len = skb->len - OVL_L3_OFF;
	if (tot_len < ihl_len || OVL_L3_OFF + tot_len > skb->len)
		return OVL_P_MALFORMED;

	p->family = 4;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	ovl_v4_mapped(p->src, ip.saddr);
	ovl_v4_mapped(p->dst, ip.daddr);
	p->proto = ip.protocol;
	p->frag_proto = ip.protocol;
	p->frag_id = bpf_ntohs(ip.id);
	p->l3_end = OVL_L3_OFF + tot_len;

	frag = bpf_ntohs(ip.frag_off);
	if (frag & OVL_IP_OFFMASK) {
		p->frag = OVL_FRAG_LATER;
		p->frag_off = (frag & OVL_IP_OFFMASK) * 8;
		return OVL_P_OK;
	}
	if (frag & OVL_IP_MF)
		p->frag = OVL_FRAG_FIRST;
	return ovl_parse_l4(skb, p, OVL_L3_OFF + ihl_len, tot_len - ihl_len);
}

static __always_inline int ovl_parse6(struct __sk_buff *skb, struct ovl_pkt *p)
{
	struct ipv6hdr ip6;
	__u8 ext[8];
	__u32 off = OVL_L3_OFF + OVL_IP6_HLEN, end, len;
	__u16 fo;
	__u8 nh;
	int i;

	if (bpf_skb_load_bytes(skb, OVL_L3_OFF, &ip6, sizeof(ip6)) < 0)
		return OVL_P_MALFORMED;
	if (ip6.version != 6)
		return OVL_P_MALFORMED;
	len = bpf_ntohs(ip6.payload_len);
	if (len == 0 && skb->gso_size)  /* BIG TCP */
		len = skb->len - off;
	end = off + len;
	if (end > skb->len)
		return OVL_P_MALFORMED;
	p->family = 6;
	__builtin_memcpy(p->src, &ip6.saddr, 16);
	__builtin_memcpy(p->dst, &ip6.daddr, 16);
	p->hop_limit = ip6.hop_limit;
	p->l3_end = end;
	nh = ip6.nexthdr;

	for (i = 0; i < OVL_IP6_MAX_EXT; i++) {
		if (nh != OVL_NEXTHDR_HOP && nh != OVL_NEXTHDR_ROUTING && nh != OVL_NEXTHDR_DEST &&
		    nh != OVL_NEXTHDR_AUTH && nh != OVL_NEXTHDR_FRAGMENT)
			goto upper;
		if (off + 8 > end || bpf_skb_load_bytes(skb, off, ext, 8) < 0)
			return OVL_P_MALFORMED;
		if (nh == OVL_NEXTHDR_FRAGMENT) {
			if (p->frag != OVL_FRAG_NONE)
				return OVL_P_MALFORMED;         /* two fragment headers */
			__builtin_memcpy(&fo, &ext[2], sizeof(fo));
			fo = bpf_ntohs(fo);
			__builtin_memcpy(&p->frag_id, &ext[4], sizeof(p->frag_id));
			p->frag_id = bpf_ntohl(p->frag_id);
			p->frag_proto = ext[0];
			if (fo & 0xfff8) {
				p->frag = OVL_FRAG_LATER;
				p->frag_off = fo & 0xfff8;
				p->proto = ext[0];
				return OVL_P_OK;
			}
			if (fo & 1)
				p->frag = OVL_FRAG_FIRST;
			off += 8;
		} else if (nh == OVL_NEXTHDR_AUTH) {
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nh = ext[0];
		off &= 0x1ffff; /* identity (off <= end); one range for every path: the verifier prunes */
	}
	return OVL_P_MALFORMED;         /* too many extension headers */
upper:
	if (off > end)
		return OVL_P_MALFORMED;
	off &= 0x1ffff;
	p->proto = nh;
	if (p->frag == OVL_FRAG_NONE)
		p->frag_proto = nh;
	return ovl_parse_l4(skb, p, off, end - off);
}

/* Fill *p from the frame. Returns enum ovl_parse_result: OVL_P_NOT_IP for
 * anything but IPv4 and IPv6, OVL_P_MALFORMED for a truncated or
 * inconsistent header (or an L4 header cut short in a datagram that should
 * carry it), else OVL_P_OK. */
static __always_inline int ovl_parse(struct __sk_buff *skb, struct ovl_pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return ovl_parse4(skb, p);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return ovl_parse6(skb, p);
	return OVL_P_NOT_IP;
}

#endif /* OVL_PARSE_H */
