/* tc egress on the uplink: track the flows this host opens, so their replies
 * pass the ingress filter. Never alters or drops a packet. */
int ovl_egress(struct __sk_buff *skb)
{
	return ovl_ct_egress(skb);
}
