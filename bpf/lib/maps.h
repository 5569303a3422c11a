/* maps.h: every map of the datapath, declared once.
 *
 * Sizes come from the build as -D flags (overlay/datapath/ebpf/build.py); their
 * defaults live in one place, overlay/abi.py MAP_SIZES: a size left undefined
 * is a build error, never a second default.
 *
 * When OVL_PIN_DIR is defined (a string literal, e.g. "/sys/fs/bpf/overlay"),
 * every map is declared pinned at OVL_PIN_DIR "/" <map name>: bcc reuses the
 * map already pinned there (same kernel object, contents kept) or, if none is
 * pinned yet, creates the map and pins it there itself.
 */
#ifndef OVL_MAPS_H
#define OVL_MAPS_H

#include "overlay_abi.h"

#ifndef OVL_NAT_MAX
#error "OVL_NAT_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_NAT_SLOTS
#error "OVL_NAT_SLOTS is passed with -D (overlay/abi.py nat_slots of the overlay subnet)"
#endif
#if OVL_NAT_SLOTS < 1 || OVL_NAT_SLOTS > OVL_NAT_SLOTS_MAX
#error "OVL_NAT_SLOTS must be in 1..OVL_NAT_SLOTS_MAX"
#endif
#ifndef OVL_PEERS_MAX
#error "OVL_PEERS_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_CT_MAX
#error "OVL_CT_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_FAILSAFE_MAX
#error "OVL_FAILSAFE_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_POLICY_MAX
#error "OVL_POLICY_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_CIDR_IDENT_MAX
#error "OVL_CIDR_IDENT_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_NAMES_MAX
#error "OVL_NAMES_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_CT6_MAX
#error "OVL_CT6_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_CT_IN_MAX
#error "OVL_CT_IN_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_FRAG_MAX
#error "OVL_FRAG_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_PEERS6_MAX
#error "OVL_PEERS6_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_FAILSAFE6_MAX
#error "OVL_FAILSAFE6_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_CIDR_IDENT6_MAX
#error "OVL_CIDR_IDENT6_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_SOCK_MAX
#error "OVL_SOCK_MAX is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif
#ifndef OVL_EVENTS_PAGES
#error "OVL_EVENTS_PAGES is passed with -D (defaults: overlay/abi.py MAP_SIZES)"
#endif

#ifdef OVL_PIN_DIR
#define OVL_PIN(_name) ":" OVL_PIN_DIR "/" #_name
#else
#define OVL_PIN(_name) ""
#endif

/* bcc's BPF_F_TABLE with the pin path folded into the section name, the
 * same encoding bcc's own BPF_TABLE_PINNED uses. */
#define OVL_TABLE(_type, _key, _leaf, _name, _max, _flags) \
	BPF_F_TABLE(_type OVL_PIN(_name), _key, _leaf, _name, _max, _flags)

/* NAT: an array slot per overlay subnet address, a hash for the rest (ovl_nat_lookup). */
OVL_TABLE("array", __u32, struct ovl_nat_val, ovl_nat, OVL_NAT_SLOTS, 0);
OVL_TABLE("hash", __u32, struct ovl_nat_val, ovl_nat_ext, OVL_NAT_MAX, BPF_F_NO_PREALLOC);
OVL_TABLE("hash", __u32, struct ovl_peer_val, ovl_peers, OVL_PEERS_MAX, 0);
OVL_TABLE("array", int, __u64, ovl_ports, OVL_PORT_SLOTS * OVL_PORT_WORDS, 0);
OVL_TABLE("lpm_trie", struct ovl_lpm_key, __u32, ovl_failsafe, OVL_FAILSAFE_MAX,
	  BPF_F_NO_PREALLOC);
OVL_TABLE("lpm_trie", struct ovl_lpm_key, __u32, ovl_cidr_ident, OVL_CIDR_IDENT_MAX,
	  BPF_F_NO_PREALLOC);
OVL_TABLE("lpm_trie", struct ovl_policy_key, __u32, ovl_policy, OVL_POLICY_MAX,
	  BPF_F_NO_PREALLOC);
/* Read by user space only (overlay why, overlay drops). */
OVL_TABLE("hash", struct ovl_name_key, struct ovl_name, ovl_names, OVL_NAMES_MAX,
	  BPF_F_NO_PREALLOC);
OVL_TABLE("hash", struct ovl_addr6, struct ovl_peer_val, ovl_peers6, OVL_PEERS6_MAX, 0);
OVL_TABLE("lpm_trie", struct ovl_lpm6_key, __u32, ovl_failsafe6, OVL_FAILSAFE6_MAX,
	  BPF_F_NO_PREALLOC);
OVL_TABLE("lpm_trie", struct ovl_lpm6_key, __u32, ovl_cidr_ident6, OVL_CIDR_IDENT6_MAX,
	  BPF_F_NO_PREALLOC);
OVL_TABLE("hash", struct ovl_addr6, __u32, ovl_self, OVL_SELF_MAX, 0);
/* Conntrack: flows this host initiated (per family), and inbound markers. */
OVL_TABLE("lru_hash", struct ovl_ct_key, struct ovl_ct_val, ovl_ct, OVL_CT_MAX, 0);
OVL_TABLE("lru_hash", struct ovl_ct6_key, struct ovl_ct_val, ovl_ct6, OVL_CT6_MAX, 0);
OVL_TABLE("lru_hash", struct ovl_ct6_key, struct ovl_ct_in_val, ovl_ct_in, OVL_CT_IN_MAX, 0);
OVL_TABLE("lru_hash", struct ovl_frag_key, struct ovl_frag_val, ovl_frag, OVL_FRAG_MAX, 0);
/* Socket mode: what each translated socket was sent to (sock.h). */
OVL_TABLE("lru_hash", struct ovl_sock_key, __u32, ovl_sock, OVL_SOCK_MAX, 0);
OVL_TABLE("array", int, __u64, ovl_cfg, OVL_CFG_MAX, 0);
OVL_TABLE("percpu_array", int, __u64, ovl_counters, OVL_COUNTER_MAX, 0);

/* bcc's BPF_RINGBUF_OUTPUT, spelled out so that it can be pinned too. */
struct ovl_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf" OVL_PIN(ovl_events))))
struct ovl_events_table_t ovl_events = { .max_entries = OVL_EVENTS_PAGES * PAGE_SIZE };

static __always_inline __u64 ovl_cfg_get(int idx)
{
	__u64 *v = ovl_cfg.lookup(&idx);

	return v ? *v : 0;
}

/* The NAT entry of an overlay address (network order), or NULL: its slot in
 * ovl_nat when its offset from OVL_CFG_NAT_BASE is below OVL_NAT_SLOTS (an
 * empty slot, real == 0, is no entry), else ovl_nat_ext. */
static __always_inline struct ovl_nat_val *ovl_nat_lookup(__u32 overlay)
{
	__u32 slot = bpf_ntohl(overlay) - (__u32)ovl_cfg_get(OVL_CFG_NAT_BASE);
	struct ovl_nat_val *v;

	if (slot < OVL_NAT_SLOTS) {
		v = ovl_nat.lookup(&slot);
		return v && v->real ? v : NULL;
	}
	return ovl_nat_ext.lookup(&overlay);
}

#endif /* OVL_MAPS_H */
