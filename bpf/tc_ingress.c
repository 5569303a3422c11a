/* tc ingress on the uplink (e.g. eth0): the filter, and reverse NAT of
 * replies to translated flows. */
int ovl_ingress(struct __sk_buff *skb)
{
	return ovl_filter_ingress(skb);
}
