/* overlay_abi.h: every struct, enum and constant shared between the eBPF
 * programs and Python. Python mirrors this file in exactly one module,
 * overlay/datapath/ebpf/abi.py, and tests/bpf/test_abi.py checks that the
 * mirror matches the layouts bcc compiled.
 *
 * IPv4 addresses are __u32 in network byte order. Where a structure holds
 * an address of either family it holds 16 bytes (__u32[4], network order):
 * an IPv6 address, or an IPv4 address IPv4-mapped (::ffff:a.b.c.d). Ports
 * are in network byte order in conntrack keys and in drop events.
 */
#ifndef OVERLAY_ABI_H
#define OVERLAY_ABI_H

/* 3: conntrack states and lifetimes, host-initiated flows only; inbound
 * markers; fragments; IPv6; martians; drop events with IPv6 addresses.
 * 4: ovl_nat is an array indexed by the overlay address's offset in the
 * overlay subnet (OVL_CFG_NAT_BASE), ovl_nat_ext a hash for the rest;
 * ovl_rnat is gone. */
#define OVL_ABI_VERSION 4

/* ovl_cfg: BPF_ARRAY of __u64, indexed by enum ovl_cfg_index. A lifetime
 * of 0 means its default (OVL_CT_DEFAULT_*_S). */
enum ovl_cfg_index {
	OVL_CFG_REJECT_ALL = 0,     /* 1: default verdict is drop */
	OVL_CFG_EGRESS_IFINDEX = 1, /* uplink the overlay egress redirects to */
	OVL_CFG_MODE = 2,           /* enum ovl_filter_mode */
	OVL_CFG_ABI_VERSION = 3,    /* OVL_ABI_VERSION of the loaded programs */
	OVL_CFG_POLICY_ENFORCED = 4, /* 1: a policy selects this node as `to`: default-deny */
	OVL_CFG_POLICY_DEFAULT = 5, /* policy index reported with a default-deny drop */
	OVL_CFG_NAT_GEN = 6,        /* bumped by user space after an apply wrote or deleted ovl_nat */
	OVL_CFG_CT_TCP_SYN_S = 7,   /* lifetime (s) of a TCP entry in OVL_CT_SYN_SENT */
	OVL_CFG_CT_TCP_ESTABLISHED_S = 8,
	OVL_CFG_CT_TCP_FIN_S = 9,   /* OVL_CT_CLOSING */
	OVL_CFG_CT_TCP_RST_S = 10,  /* OVL_CT_CLOSED */
	OVL_CFG_CT_UDP_S = 11,
	OVL_CFG_CT_ICMP_S = 12,     /* ICMP and ICMPv6 echo */
	OVL_CFG_FRAG_S = 13,        /* lifetime of a remembered fragment verdict */
	OVL_CFG_SELF_HINT = 14,     /* bit ovl_self_bit(a) set for every address a in ovl_self */
	OVL_CFG_NETNS_COOKIE = 15,  /* the daemon's network namespace cookie: the socket
	                             * programs translate only sockets of this namespace
	                             * (0: translate none) */
	OVL_CFG_NAT_BASE = 16,      /* the overlay subnet's network address, host order:
	                             * ovl_nat slot i is the overlay address base + i */
	OVL_CFG_MAX = 32,
};

#define OVL_CT_DEFAULT_TCP_SYN_S 120
#define OVL_CT_DEFAULT_TCP_ESTABLISHED_S 432000
#define OVL_CT_DEFAULT_TCP_FIN_S 120
#define OVL_CT_DEFAULT_TCP_RST_S 10
#define OVL_CT_DEFAULT_UDP_S 120
#define OVL_CT_DEFAULT_ICMP_S 30
#define OVL_CT_DEFAULT_FRAG_S 5

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
	OVL_DROP_MALFORMED = 3,     /* a header that cannot be parsed far enough to judge */
	OVL_DROP_POLICY = 4,        /* ingress under default-deny, no policy allows it */
	OVL_DROP_FRAG_SHORT = 5,    /* first fragment without its full L4 header, or a tiny overlap */
	OVL_DROP_FRAG_ORPHAN = 6,   /* later fragment with no remembered verdict */
	OVL_DROP_MARTIAN = 7,       /* loopback or own source arriving on the uplink */
	OVL_DROP_MAX = 8,
	OVL_PASS_BASE = 16,
	OVL_PASS_FAILSAFE = 16,
	OVL_PASS_ESTABLISHED = 17,
	OVL_PASS_LOOPBACK = 18,     /* ABI 3: never counted by the eBPF datapath (martian now) */
	OVL_PASS_MEMBER = 19,
	OVL_PASS_OPEN_PORT = 20,
	OVL_PASS_DEFAULT = 21,
	OVL_PASS_RELATED = 22,      /* ICMP errors */
	OVL_NAT_EGRESS = 23,        /* packets translated overlay -> real */
	OVL_NAT_INGRESS = 24,       /* packets translated real -> overlay */
	OVL_PASS_UNTOUCHED = 25,    /* not IP, or not judged, passed unaltered */
	OVL_PASS_POLICY = 26,       /* a new inbound flow a policy allows */
	OVL_PASS_NDP = 27,          /* IPv6 neighbour discovery and MLD */
	OVL_PASS_FRAGMENT = 28,     /* later fragment, on its first fragment's verdict */
	OVL_CT_EXPIRED = 29,        /* conntrack entries found past their lifetime on lookup */
	OVL_CT_NAT_STALE = 30,      /* translated entries whose NAT entry was removed or re-pointed */
	OVL_SOCK_CONNECT = 31,      /* connect() to an overlay address translated (TCP, UDP) */
	OVL_SOCK_SENDMSG = 32,      /* unconnected UDP sendmsg() to an overlay address translated */
	OVL_SOCK_RECVMSG = 33,      /* recvmsg() source translated back real -> overlay */
	OVL_SOCK_PEERNAME = 34,     /* getpeername() translated back real -> overlay */
	OVL_SOCK_OTHER_NETNS = 35,  /* socket call to an overlay address from another netns: left to tc */
	OVL_COUNTER_MAX = 40,
};

/* ovl_nat: BPF_ARRAY of struct ovl_nat_val, OVL_NAT_SLOTS slots; slot i holds
 * the overlay address OVL_CFG_NAT_BASE + i (host order), real == 0 meaning no
 * entry. ovl_nat_ext: BPF_HASH key __u32 overlay address (network order) ->
 * struct ovl_nat_val, every overlay address outside the slots (nat_overrides
 * outside the subnet, offsets past the slots). */
#define OVL_NAT_SLOTS_MAX 1048576
struct ovl_nat_val {
	__u32 real;                 /* peer's real address */
	__u32 flags;                /* OVL_NAT_F_* */
};
#define OVL_NAT_F_OVERRIDE 1        /* came from nat_overrides */

/* ovl_sock: LRU hash, key struct ovl_sock_key -> __u32 overlay address. Written
 * by the socket programs when connect/sendmsg translated overlay -> real on a
 * socket, read by recvmsg/getpeername to show that socket the overlay address
 * again. Keyed by socket so that a socket that talks to a real address
 * directly keeps seeing the real one. */
struct ovl_sock_key {
	__u64 cookie;               /* bpf_get_socket_cookie() */
	__u32 real;                 /* the peer's real address the socket was sent to */
	__u16 port;                 /* the peer's port, network order */
	__u16 pad;
};

/* ovl_peers: BPF_HASH key __u32 real address -> struct ovl_peer_val
 * ovl_peers6: BPF_HASH key struct ovl_addr6 (real IPv6 address) -> struct ovl_peer_val */
struct ovl_peer_val {
	__u32 identity;             /* numeric identity of the peer's group set */
	__u32 flags;                /* OVL_PEER_F_* */
};
#define OVL_PEER_F_MEMBER 1

struct ovl_addr6 {
	__u32 addr[4];              /* IPv6, or IPv4-mapped */
};

/* ovl_self: BPF_HASH key struct ovl_addr6 (this host's own addresses, IPv4
 * ones IPv4-mapped) -> __u32 OVL_SELF_F_*. So that most packets need no
 * lookup, OVL_CFG_SELF_HINT has bit ovl_self_bit(a) set for each address a
 * in the map: bit = ((a[0] ^ a[1] ^ a[2] ^ a[3]) * OVL_SELF_HINT_MUL) >> 26
 * (u32 words as stored, 32-bit product); user space keeps it in step. */
#define OVL_SELF_F_OWN 1
#define OVL_SELF_MAX 64
#define OVL_SELF_HINT_MUL 0x9E3779B1

/* ovl_ports: BPF_ARRAY of __u64 bitmap words, OVL_PORT_WORDS per protocol.
 * index = slot * OVL_PORT_WORDS + port / 64, bit = port % 64 (host order port). */
#define OVL_PORT_WORDS 1024
enum ovl_port_slot {
	OVL_PORT_SLOT_TCP = 0,
	OVL_PORT_SLOT_UDP = 1,
	OVL_PORT_SLOTS = 2,
};

/* ovl_failsafe: LPM trie, key struct ovl_lpm_key -> __u32 OVL_FS_* flags
 * ovl_failsafe6: LPM trie, key struct ovl_lpm6_key -> __u32 OVL_FS_* flags */
struct ovl_lpm_key {
	__u32 prefixlen;
	__u32 addr;
};
struct ovl_lpm6_key {
	__u32 prefixlen;
	__u32 addr[4];
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
 * CIDR identity; ovl_cidr_ident6: the same for IPv6, key struct ovl_lpm6_key */

/* ovl_policy: LPM trie, key struct ovl_policy_key -> __u32 policy index.
 * The trie matches the key's data bits in memory order: identity (32 bits)
 * and proto (8) always in full, pad (8, always 0), then the first bits of
 * the destination port in NETWORK order, so a port prefix of n bits is
 * prefixlen OVL_POLICY_PORT_BITS + n. Lookups use the full length with the
 * packet's dport (ICMP and other protocols: port 0). ICMPv6 is looked up
 * as proto 1 (a policy `proto: icmp` covers ICMP and ICMPv6). */
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

/* Conntrack (docs/datapath.md). ovl_ct (IPv4) and ovl_ct6 (IPv6) hold ONLY
 * flows this host initiated, keyed by the tuple as INGRESS sees their
 * replies (saddr = the remote, daddr = us, sport = the remote's port, dport
 * = ours; ICMP echo: sport = identifier, dport = 0). LRU hashes.
 *
 * ovl_ct: key struct ovl_ct_key -> struct ovl_ct_val
 * ovl_ct6: key struct ovl_ct6_key (family 6) -> struct ovl_ct_val
 * ovl_ct_in: key struct ovl_ct6_key (family 4, addresses IPv4-mapped, or 6)
 *   -> struct ovl_ct_in_val: inbound markers, written when a new inbound
 *   TCP SYN or UDP datagram is admitted. Never used to admit a packet that
 *   is not an ICMP error. */
struct ovl_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;                /* ICMP echo: identifier */
	__u16 dport;                /* ICMP echo: 0 */
	__u8 proto;
	__u8 pad[3];
};

struct ovl_ct6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;                 /* ICMPv6 echo: 58 */
	__u8 family;                /* 4 or 6 */
	__u8 pad[2];
};

enum ovl_ct_state {
	OVL_CT_NEW = 0,             /* UDP and ICMP echo: no states */
	OVL_CT_SYN_SENT = 1,        /* TCP: our SYN went out */
	OVL_CT_ESTABLISHED = 2,     /* TCP: a SYN-ACK or ACK came back */
	OVL_CT_CLOSING = 3,         /* TCP: a FIN either way */
	OVL_CT_CLOSED = 4,          /* TCP: a RST either way */
};

struct ovl_ct_val {
	__u32 overlay;              /* 0: not translated; else the overlay address to restore as source */
	__u32 nat_gen;              /* OVL_CFG_NAT_GEN when the translation was last verified */
	__u64 last_seen_ns;         /* bpf_ktime_get_ns() of the last packet */
	__u8 state;                 /* enum ovl_ct_state */
	__u8 flags;                 /* OVL_CT_F_* */
	__u8 pad[6];
};
#define OVL_CT_F_EGRESS 1           /* created by a packet this host sent */
#define OVL_CT_F_NAT 2              /* created by the overlay NAT */

struct ovl_ct_in_val {
	__u64 last_seen_ns;         /* UDP: the last admitted datagram; TCP: the SYN */
};

/* ovl_frag: LRU hash, key struct ovl_frag_key -> struct ovl_frag_val: the
 * verdict of a fragmented datagram's first fragment, for its later ones. */
struct ovl_frag_key {
	__u32 saddr[4];             /* IPv6, or IPv4-mapped */
	__u32 daddr[4];
	__u32 id;                   /* IPv4 id (16 bits), or the IPv6 fragment header's */
	__u8 proto;                 /* IPv4 protocol, or the fragment header's next header */
	__u8 family;                /* 4 or 6 */
	__u8 pad[2];
};

struct ovl_frag_val {
	__u64 ts_ns;                /* when the first fragment passed */
	__u32 overlay;              /* IPv4 reply of a translated flow: the source to restore */
	__u8 verdict;               /* enum ovl_reason the first fragment passed with */
	__u8 pad;
	__u16 l4_len;               /* bytes of L4 the first fragment carried: a later
				     * fragment starting before that overlaps it */
};

/* ovl_events: ring buffer of struct ovl_drop_event */
struct ovl_drop_event {
	__u64 ts_ns;
	__u32 saddr[4];             /* IPv6, or IPv4-mapped */
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 reason;                /* enum ovl_reason */
	__u8 audit;                 /* 1: would have dropped, passed in audit mode */
	__u8 direction;             /* 0 ingress, 1 egress */
	__u32 policy;               /* policy index for OVL_DROP_POLICY, else 0 */
	__u8 family;                /* 4 or 6; 0: the packet could not be parsed */
	__u8 pad[3];
};

#endif /* OVERLAY_ABI_H */
