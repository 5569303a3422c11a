/* tc egress on the uplink: track the flows this host opens, so their replies
 * pass the ingress filter. Never alters or drops a packet. */
int ovl_egress(struct __sk_buff *skb)
{
	struct ovl_pkt p;

	if (ovl_parse(skb, &p) == OVL_P_OK && ovl_ct_egress_trackable(&p))
		ovl_ct_track(&p);
	return TC_ACT_OK;
}
