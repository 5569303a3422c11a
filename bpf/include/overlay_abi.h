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

#define OVL_ABI_VERSION 2

/* ovl_cfg: BPF_ARRAY of __u64, indexed by enum ovl_cfg_index. */
enum ovl_cfg_index {
	OVL_CFG_REJECT_ALL = 0,     /* 1: default verdict is drop */
	OVL_CFG_EGRESS_IFINDEX = 1, /* uplink the overlay egress redirects to */
	OVL_CFG_MODE = 2,           /* enum ovl_filter_mode */
	OVL_CFG_ABI_VERSION = 3,    /* OVL_ABI_VERSION of the loaded programs */
	OVL_CFG_POLICY_ENFORCED = 4, /* 1: a policy selects this node as `to`: default-deny */
	OVL_CFG_POLICY_DEFAULT = 5, /* policy index reported with a default-deny drop */
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
	OVL_DROP_POLICY = 4,        /* ingress under default-deny, no policy allows it */
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
	OVL_PASS_POLICY = 26,       /* a new inbound flow a policy allows */
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

/* Identities (numeric names of a source, used as ovl_policy keys):
 * a member peer's identity stands for its set of groups (bit 31 clear;
 * 0 is never used, 1 is "a member in no group"); a CIDR identity (bit 31
 * set) stands for the policy CIDRs that contain an ovl_cidr_ident prefix. */
#define OVL_IDENTITY_NONE 0
#define OVL_IDENTITY_MEMBER 1
#define OVL_IDENTITY_CIDR 0x80000000

/* ovl_cidr_ident: LPM trie, key struct ovl_lpm_key (source prefix) -> __u32
 * CIDR identity */

/* ovl_policy: LPM trie, key struct ovl_policy_key -> __u32 policy index.
 * The trie matches the key's data bits in memory order: identity (32 bits)
 * and proto (8) always in full, pad (8, always 0), then the first bits of
 * the destination port in NETWORK order, so a port prefix of n bits is
 * prefixlen OVL_POLICY_PORT_BITS + n. Lookups use the full length with the
 * packet's dport (ICMP and other protocols: port 0). */
struct ovl_policy_key {
	__u32 prefixlen;
	__u32 identity;
	__u8 proto;
	__u8 pad;
	__u16 port;                 /* network order */
};
#define OVL_POLICY_PORT_BITS 48     /* bits before the port: identity, proto, pad */
#define OVL_POLICY_FULL_BITS 64

/* ovl_names: hash, key struct ovl_name_key -> struct ovl_name. Not read by
 * the programs: names for `overlay why` and `overlay drops`, written by the
 * agent with the rest of the plan. */
struct ovl_name_key {
	__u32 kind;                 /* enum ovl_name_kind */
	__u32 id;                   /* policy index or identity */
};
enum ovl_name_kind {
	OVL_NAME_POLICY = 1,        /* policy index -> policy id */
	OVL_NAME_RULE = 2,          /* policy index -> the rule, in words */
	OVL_NAME_IDENTITY = 3,      /* member identity -> its groups, comma-separated */
	OVL_NAME_CIDR = 4,          /* CIDR identity -> its prefix */
};
#define OVL_NAME_LEN 256
struct ovl_name {
	char text[256];             /* OVL_NAME_LEN; NUL-terminated UTF-8 */
};

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
