/* datapath.c: the one compilation unit of the tc datapath.
 *
 * Compiled by overlay/datapath/ebpf/build.py, which inlines the quoted
 * includes of bpf/lib and bpf/ into one text before handing it to bcc (bcc
 * only rewrites map method calls such as ovl_nat.lookup() in its main file).
 * Programs: ovl_ingress, ovl_egress (uplink), ovl_overlay_egress (ovl0), and
 * the cgroup sock_addr programs of socket mode: ovl_connect4, ovl_sendmsg4,
 * ovl_recvmsg4, ovl_getpeername4 (one object, so one set of maps).
 */
#include <linux/pkt_cls.h>

#include "overlay_abi.h"
#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "conntrack.h"
#include "nat.h"
#include "filter.h"
#include "sock.h"

#include "tc_ingress.c"
#include "tc_egress.c"
#include "tc_overlay.c"
#include "cgroup_sock.c"
