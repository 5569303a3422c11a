/* counters.h: per-CPU verdict counters and ring-buffer drop events. */
#ifndef OVL_COUNTERS_H
#define OVL_COUNTERS_H

#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

#define OVL_DIR_INGRESS 0
#define OVL_DIR_EGRESS 1

static __always_inline void ovl_count(int reason)
{
	__u64 *c = ovl_counters.lookup(&reason);

	if (c)
		*c += 1;        /* per-CPU slot: no atomics needed */
}

/* One event per drop. A full ring buffer loses the event, never the verdict. */
static __always_inline void ovl_report(const struct ovl_pkt *p, __u8 reason,
				       __u8 audit, __u8 direction, __u32 policy)
{
	struct ovl_drop_event *e = ovl_events.ringbuf_reserve(sizeof(struct ovl_drop_event));

	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	if (p->family) {
		__builtin_memcpy(e->saddr, p->src, sizeof(e->saddr));
		__builtin_memcpy(e->daddr, p->dst, sizeof(e->daddr));
	}
	e->family = p->family;
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->reason = reason;
	e->audit = audit;
	e->direction = direction;
	e->policy = policy;
	ovl_events.ringbuf_submit(e, 0);
}

/* Count and report a drop decided by rule `policy` (a policy index, or 0);
 * return the verdict: TC_ACT_SHOT, or TC_ACT_OK in audit mode (the packet
 * goes on as if the drop had not been decided). */
static __always_inline int ovl_drop_rule(const struct ovl_pkt *p, __u8 reason,
					 __u8 direction, __u32 policy)
{
	__u8 audit = ovl_cfg_get(OVL_CFG_MODE) == OVL_MODE_AUDIT;

	ovl_count(reason);
	ovl_report(p, reason, audit, direction, policy);
	return audit ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int ovl_drop(const struct ovl_pkt *p, __u8 reason, __u8 direction)
{
	return ovl_drop_rule(p, reason, direction, 0);
}

#endif /* OVL_COUNTERS_H */
