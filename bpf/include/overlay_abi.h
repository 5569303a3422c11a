/* overlay_abi.h: every struct, enum and constant shared between the eBPF
 * programs and Python. Python mirrors this file in exactly one module,
 * overlay/datapath/ebpf/abi.py, and tests/bpf/test_abi.py checks that the
 * mirror matches the layouts bcc compiled.
 *
 * All addresses are IPv4 in network byte order; ports are in network byte
 * order in conntrack keys and in drop events.
 */
#ifndef OVERLAY_ABI_H
#define OVERLAY_ABI_H

#define OVL_ABI_VERSION 1

/* ovl_cfg: BPF_ARRAY of __u64, indexed by enum ovl_cfg_index. */
enum ovl_cfg_index {
	OVL_CFG_REJECT_ALL = 0,     /* 1: default verdict is drop */
	OVL_CFG_EGRESS_IFINDEX = 1, /* uplink the overlay egress redirects to */
	OVL_CFG_MODE = 2,           /* enum ovl_filter_mode */
	OVL_CFG_ABI_VERSION = 3,    /* OVL_ABI_VERSION of the loaded programs */
	OVL_CFG_MAX = 8,
};

enum ovl_filter_mode {
	OVL_MODE_ENFORCE = 0,
	OVL_MODE_AUDIT = 1,         /* count and report would-be drops, pass */
};

/* ovl_counters: BPF_PERCPU_ARRAY of __u64, indexed by enum ovl_reason.
 * Reasons below OVL_PASS_BASE are drops; the others count verdicts. */
enum ovl_reason {
	OVL_DROP_NONE = 0,
	OVL_DROP_NO_PEER = 1,       /* egress to an overlay address with no NAT entry */
	OVL_DROP_NOT_ALLOWED = 2,   /* ingress default verdict under reject_all */
	OVL_DROP_MALFORMED = 3,     /* egress to the overlay with a broken header */
	OVL_DROP_POLICY = 4,        /* reserved for group policies */
	OVL_DROP_MAX = 8,
	OVL_PASS_BASE = 16,
	OVL_PASS_FAILSAFE = 16,
	OVL_PASS_ESTABLISHED = 17,
	OVL_PASS_LOOPBACK = 18,
	OVL_PASS_MEMBER = 19,
	OVL_PASS_OPEN_PORT = 20,
	OVL_PASS_DEFAULT = 21,
	OVL_PASS_RELATED = 22,      /* ICMP errors */
	OVL_NAT_EGRESS = 23,        /* packets translated overlay -> real */
	OVL_NAT_INGRESS = 24,       /* packets translated real -> overlay */
	OVL_PASS_UNTOUCHED = 25,    /* non-IPv4 or not-ours, passed unaltered */
	OVL_COUNTER_MAX = 32,
};

/* ovl_nat: BPF_HASH key __u32 overlay address -> struct ovl_nat_val */
struct ovl_nat_val {
	__u32 real;                 /* peer's real address */
	__u32 flags;                /* OVL_NAT_F_* */
};
#define OVL_NAT_F_OVERRIDE 1        /* came from nat_overrides */

/* ovl_rnat: BPF_HASH key __u32 real address -> __u32 overlay address */

/* ovl_peers: BPF_HASH key __u32 real address -> struct ovl_peer_val */
struct ovl_peer_val {
	__u32 identity;             /* numeric identity of the peer's group set */
	__u32 flags;                /* OVL_PEER_F_* */
};
#define OVL_PEER_F_MEMBER 1

/* ovl_ports: BPF_ARRAY of __u64 bitmap words, OVL_PORT_WORDS per protocol.
 * index = slot * OVL_PORT_WORDS + port / 64, bit = port % 64 (host order port). */
#define OVL_PORT_WORDS 1024
enum ovl_port_slot {
	OVL_PORT_SLOT_TCP = 0,
	OVL_PORT_SLOT_UDP = 1,
	OVL_PORT_SLOTS = 2,
};

/* ovl_failsafe: LPM trie, key struct ovl_lpm_key -> __u32 OVL_FS_* flags */
struct ovl_lpm_key {
	__u32 prefixlen;
	__u32 addr;
};
#define OVL_FS_SSH 1                /* TCP port 22 from this range */
#define OVL_FS_ALL 2                /* everything from this range */
#define OVL_SSH_PORT 22

/* ovl_ct: LRU hash, key = the tuple as ingress sees it (reply direction for
 * flows this host opened) -> struct ovl_ct_val */
struct ovl_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;                /* ICMP echo: identifier */
	__u16 dport;                /* ICMP echo: 0 */
	__u8 proto;
	__u8 pad[3];
};

struct ovl_ct_val {
	__u32 overlay;              /* 0: not translated; else the overlay address to restore as source */
	__u32 flags;                /* OVL_CT_F_* */
	__u64 last_seen_ns;         /* bpf_ktime_get_ns() of the last packet */
};
#define OVL_CT_F_EGRESS 1           /* created by a packet this host sent */
#define OVL_CT_F_NAT 2              /* created by the overlay NAT */

/* ovl_events: ring buffer of struct ovl_drop_event */
struct ovl_drop_event {
	__u64 ts_ns;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 reason;                /* enum ovl_reason */
	__u8 audit;                 /* 1: would have dropped, passed in audit mode */
	__u8 direction;             /* 0 ingress, 1 egress */
	__u32 policy;               /* policy index for OVL_DROP_POLICY, else 0 */
};

#endif /* OVERLAY_ABI_H */
