/* cgroup sock_addr attach points of socket mode (logic in lib/sock.h). */
int ovl_connect4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_forward(ctx, OVL_SOCK_CONNECT);
}

int ovl_sendmsg4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_forward(ctx, OVL_SOCK_SENDMSG);
}

int ovl_recvmsg4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_reverse(ctx, OVL_SOCK_RECVMSG);
}

int ovl_getpeername4(struct bpf_sock_addr *ctx)
{
	return ovl_sock_reverse(ctx, OVL_SOCK_PEERNAME);
}
