/* tc egress on the overlay device ovl0 (NOARP; the overlay subnet is routed
 * to it): translate overlay -> real and redirect to the uplink. */
int ovl_overlay_egress(struct __sk_buff *skb)
{
	return ovl_nat_egress(skb);
}
