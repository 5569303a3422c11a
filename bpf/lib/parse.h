/* parse.h: IPv4 and L4 header parsing for tc programs on Ethernet devices.
 *
 * Headers are read with bpf_skb_load_bytes, so the parser is bounds-checked
 * by the kernel, works on non-linear skbs and keeps the verifier's job small.
 * The IP header length comes from IHL (options are skipped, never touched);
 * the IP total length bounds every later read, so Ethernet padding is never
 * mistaken for payload.
 */
#ifndef OVL_PARSE_H
#define OVL_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/icmp.h>

#define OVL_L3_OFF ETH_HLEN
#define OVL_IP_SADDR_OFF (OVL_L3_OFF + offsetof(struct iphdr, saddr))
#define OVL_IP_DADDR_OFF (OVL_L3_OFF + offsetof(struct iphdr, daddr))
#define OVL_IP_CSUM_OFF (OVL_L3_OFF + offsetof(struct iphdr, check))
#define OVL_IP_MF 0x2000
#define OVL_IP_OFFMASK 0x1fff

#define OVL_TCP_HLEN 20
#define OVL_TCP_CSUM 16
#define OVL_UDP_HLEN 8
#define OVL_UDP_CSUM 6
#define OVL_ICMP_HLEN 8

enum ovl_parse_result {
	OVL_P_NOT_IPV4 = 0,
	OVL_P_OK = 1,
	OVL_P_MALFORMED = 2,
};

enum ovl_frag {
	OVL_FRAG_NONE = 0,      /* a whole datagram */
	OVL_FRAG_FIRST = 1,     /* offset 0, MF set: carries the L4 header */
	OVL_FRAG_LATER = 2,     /* offset > 0: no L4 header */
};

struct ovl_pkt {
	__u32 saddr;            /* network order */
	__u32 daddr;
	__u16 sport;            /* network order; ICMP echo: identifier */
	__u16 dport;            /* network order; ICMP echo: 0 */
	__u32 l4_off;           /* offset of the L4 header in the frame */
	__u32 l4_csum_off;      /* offset of the L4 checksum to fix, 0: none */
	__u32 l3_end;           /* offset just past the IP datagram */
	__u8 proto;
	__u8 frag;              /* enum ovl_frag */
	__u8 has_l4;            /* the L4 header was present and read */
	__u8 icmp_type;
};

static __always_inline int ovl_is_icmp_echo(__u8 type)
{
	return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
}

/* Fill *p from the frame. Returns enum ovl_parse_result: OVL_P_NOT_IPV4 for
 * anything but IPv4, OVL_P_MALFORMED for a truncated or inconsistent IPv4
 * header (or a TCP/UDP/ICMP header cut short in a datagram that should carry
 * it), else OVL_P_OK. */
static __always_inline int ovl_parse(struct __sk_buff *skb, struct ovl_pkt *p)
{
	struct iphdr ip;
	__u8 l4[8];
	__u32 ihl_len, tot_len, need, csum;
	__u16 frag;

	__builtin_memset(p, 0, sizeof(*p));
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return OVL_P_NOT_IPV4;
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

	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->l3_end = OVL_L3_OFF + tot_len;

	frag = bpf_ntohs(ip.frag_off);
	if (frag & OVL_IP_OFFMASK) {
		p->frag = OVL_FRAG_LATER;
		return OVL_P_OK;
	}
	if (frag & OVL_IP_MF)
		p->frag = OVL_FRAG_FIRST;

	switch (ip.protocol) {
	case IPPROTO_TCP:
		need = OVL_TCP_HLEN;
		csum = OVL_TCP_CSUM;
		break;
	case IPPROTO_UDP:
		need = OVL_UDP_HLEN;
		csum = OVL_UDP_CSUM;
		break;
	case IPPROTO_ICMP:
		need = OVL_ICMP_HLEN;
		csum = 0;       /* the ICMP checksum has no pseudo-header */
		break;
	default:
		return OVL_P_OK;
	}
	if (ihl_len + need > tot_len)
		return OVL_P_MALFORMED;
	p->l4_off = OVL_L3_OFF + ihl_len;
	if (bpf_skb_load_bytes(skb, p->l4_off, l4, sizeof(l4)) < 0)
		return OVL_P_MALFORMED;

	if (ip.protocol == IPPROTO_ICMP) {
		p->icmp_type = l4[0];
		if (ovl_is_icmp_echo(l4[0]))
			__builtin_memcpy(&p->sport, &l4[4], sizeof(p->sport));
	} else {
		__builtin_memcpy(&p->sport, &l4[0], sizeof(p->sport));
		__builtin_memcpy(&p->dport, &l4[2], sizeof(p->dport));
		p->l4_csum_off = p->l4_off + csum;
	}
	p->has_l4 = 1;
	return OVL_P_OK;
}

#endif /* OVL_PARSE_H */
