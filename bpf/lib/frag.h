/* frag.h: one verdict for all the fragments of a datagram (ingress).
 *
 * A first fragment (offset 0, more fragments) is judged like a whole
 * datagram on its full L4 header. One without it (nmap -f: 8 bytes of TCP)
 * is judged only by the steps that need nothing but its addresses and ports
 * (member, policy port, open port: filter.h), else dropped, frag_short.
 * When it passes, its verdict is remembered in ovl_frag under (family,
 * protocol, IP id, source, destination), with the overlay address to restore
 * when it is a reply of a translated flow and the number of L4 bytes it
 * carried. A later fragment passes, with the same source translation (L3
 * checksum only: it carries no L4 header), only while such a verdict is
 * remembered (ovl_cfg OVL_CFG_FRAG_S, default 5 s); else it is dropped
 * (frag_orphan). A later fragment that starts inside what the first one
 * carried overlaps it (RFC 1858 "tiny overlap": it could rewrite the TCP
 * flags or more after the verdict) and is dropped, frag_short. Fragments
 * that arrive before their first fragment are orphans: the datagram is lost
 * (it would be refused anyway if its first fragment were refused).
 */
#ifndef OVL_FRAG_H
#define OVL_FRAG_H

#include "maps.h"
#include "parse.h"
#include "conntrack.h"

static __always_inline void ovl_frag_key(struct ovl_frag_key *k, const struct ovl_pkt *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, p->src, 16);
	__builtin_memcpy(k->daddr, p->dst, 16);
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->family = p->family;
}

/* A first fragment passed with `verdict`: remember it for the later ones. */
static __always_inline void ovl_frag_remember(const struct ovl_pkt *p, __u8 verdict, __u32 overlay)
{
	struct ovl_frag_key k;
	struct ovl_frag_val v = {};

	if (p->frag != OVL_FRAG_FIRST)
		return;
	ovl_frag_key(&k, p);
	v.ts_ns = bpf_ktime_get_ns();
	v.overlay = overlay;
	v.verdict = verdict;
	v.l4_len = p->l4_len;
	ovl_frag.update(&k, &v);
}

/* The remembered verdict of a later fragment's datagram; NULL if none is
 * (an expired one is deleted). */
static __always_inline struct ovl_frag_val *ovl_frag_verdict(const struct ovl_pkt *p)
{
	struct ovl_frag_key k;
	struct ovl_frag_val *v;

	ovl_frag_key(&k, p);
	v = ovl_frag.lookup(&k);
	if (v && ovl_past(bpf_ktime_get_ns(), v->ts_ns,
			  ovl_lifetime_ns(OVL_CFG_FRAG_S, OVL_CT_DEFAULT_FRAG_S))) {
		ovl_frag.delete(&k);
		return NULL;
	}
	return v;
}

#endif /* OVL_FRAG_H */
