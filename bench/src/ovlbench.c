/*
 * ovlbench: the load generator of the Overlay benchmarks (bench/).
 *
 *   ovlbench server  --port P [--seconds S] [--cpu C]
 *       three listeners: P   accept and close (conn_setup)
 *                        P+1 echo fixed-size requests (rr)
 *                        P+2 count bytes until EOF, answer the count (stream)
 *   ovlbench connect --host H --port P [--seconds S] [--max N] [--cpu C]
 *       connect/close loop (close with SO_LINGER 0: a RST, so neither side keeps
 *       TIME_WAIT state); prints {"count", "seconds", "conn_per_s", "errors", ...}
 *   ovlbench rr      --host H --port P+1 [--seconds S] [--max N] [--size B] [--warmup W]
 *       one connection, TCP_NODELAY, request/response of B bytes, each timed with
 *       CLOCK_MONOTONIC; prints {"count", "p50_us", "p99_us", "mean_us", ...}
 *   ovlbench stream  --host H --port P+2 [--seconds S] [--cpu C]
 *       one connection writing 128 KiB buffers; the server's count of bytes
 *       received over the time from connect to its answer; prints {"bytes", "gbps", ...}
 *
 * Every loop is bounded in count and in time and stops by itself; the server
 * exits after --seconds (default 600) whatever happens. Output: one JSON line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_RR_SIZE 65536
#define STREAM_BUF (128 * 1024)
#define MAX_SAMPLES 2000000

struct opts {
	const char *mode;
	const char *host;
	int port;
	double seconds;
	long max;
	int size;
	long warmup;
	int cpu;
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what)
{
	printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static void pin_cpu(int cpu)
{
	cpu_set_t set;
	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
}

static void set_timeouts(int fd, double seconds)
{
	struct timeval tv = {.tv_sec = (time_t)seconds,
			     .tv_usec = (suseconds_t)((seconds - (time_t)seconds) * 1e6)};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			return -1;
		}
		got += (size_t)r;
	}
	return 0;
}

static int write_full(int fd, const char *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);
		if (w <= 0) {
			if (w < 0 && errno == EINTR)
				continue;
			return -1;
		}
		done += (size_t)w;
	}
	return 0;
}

static struct sockaddr_in address(const struct opts *o)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)o->port);
	if (inet_pton(AF_INET, o->host, &sa.sin_addr) != 1) {
		errno = EINVAL;
		die("bad --host");
	}
	return sa;
}

static int connect_to(const struct opts *o, double timeout)
{
	struct sockaddr_in sa = address(o);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	set_timeouts(fd, timeout); /* SO_SNDTIMEO bounds connect() too */
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

/* ---- server ---------------------------------------------------------------------- */

static int listen_on(int port)
{
	int one = 1;
	struct sockaddr_in sa;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
		die("bind");
	if (listen(fd, 4096) != 0)
		die("listen");
	return fd;
}

static void *serve_conn(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd >= 0)
			close(fd);
	}
	return NULL;
}

static void *serve_rr(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	static char buf[MAX_RR_SIZE];
	for (;;) {
		int one = 1;
		uint32_t size;
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		set_timeouts(fd, 10.0);
		/* the client announces the request size first */
		if (read_full(fd, (char *)&size, sizeof(size)) == 0 && size > 0 && size <= MAX_RR_SIZE) {
			while (read_full(fd, buf, size) == 0)
				if (write_full(fd, buf, size) != 0)
					break;
		}
		close(fd);
	}
	return NULL;
}

static void *serve_stream(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	static char buf[STREAM_BUF];
	for (;;) {
		uint64_t total = 0;
		ssize_t r;
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		set_timeouts(fd, 10.0);
		while ((r = read(fd, buf, sizeof(buf))) > 0)
			total += (uint64_t)r;
		write_full(fd, (const char *)&total, sizeof(total));
		close(fd);
	}
	return NULL;
}

static int run_server(const struct opts *o)
{
	pthread_t t[3];
	void *(*fn[3])(void *) = {serve_conn, serve_rr, serve_stream};
	int i;
	signal(SIGPIPE, SIG_IGN);
	for (i = 0; i < 3; i++) {
		int fd = listen_on(o->port + i);
		if (pthread_create(&t[i], NULL, fn[i], (void *)(intptr_t)fd) != 0)
			die("pthread_create");
	}
	printf("{\"listening\": %d}\n", o->port);
	fflush(stdout);
	/* bounded lifetime: the process ends by itself */
	{
		double end = now_s() + o->seconds;
		while (now_s() < end)
			usleep(200000);
	}
	return 0;
}

/* ---- clients --------------------------------------------------------------------- */

static int run_connect(const struct opts *o)
{
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	long count = 0, errors = 0;
	int first_errno = 0;
	double t0 = now_s(), end = t0 + o->seconds, t1;
	while (count < o->max) {
		int fd;
		if ((count & 63) == 0 && now_s() >= end)
			break;
		fd = connect_to(o, 2.0);
		if (fd < 0) {
			if (!first_errno)
				first_errno = errno;
			if (++errors > 100 && errors > count / 100)
				break; /* mostly failing: stop, the result says so */
			if (now_s() >= end)
				break;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(fd);
		count++;
	}
	t1 = now_s();
	printf("{\"mode\": \"connect\", \"count\": %ld, \"seconds\": %.6f, \"conn_per_s\": %.1f, "
	       "\"errors\": %ld, \"first_error\": \"%s\"}\n",
	       count, t1 - t0, count / (t1 - t0), errors, first_errno ? strerror(first_errno) : "");
	return count > 0 ? 0 : 1;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, long n, double p)
{
	long i = (long)(p * (n - 1) + 0.5);
	return v[i] / 1000.0;
}

static int run_rr(const struct opts *o)
{
	static char buf[MAX_RR_SIZE];
	uint64_t *lat;
	long n = 0, i, limit = o->max < MAX_SAMPLES ? o->max : MAX_SAMPLES;
	uint32_t size = (uint32_t)o->size;
	double t0, end, sum = 0;
	int one = 1, fd;
	if (o->size <= 0 || o->size > MAX_RR_SIZE) {
		errno = EINVAL;
		die("--size");
	}
	lat = calloc((size_t)limit, sizeof(*lat));
	if (!lat)
		die("calloc");
	memset(buf, 'r', sizeof(buf));
	fd = connect_to(o, 2.0);
	if (fd < 0)
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (write_full(fd, (const char *)&size, sizeof(size)) != 0)
		die("write");
	for (i = 0; i < o->warmup; i++)
		if (write_full(fd, buf, size) != 0 || read_full(fd, buf, size) != 0)
			die("warm-up exchange");
	t0 = now_s();
	end = t0 + o->seconds;
	while (n < limit) {
		uint64_t a, b;
		if ((n & 255) == 0 && now_s() >= end)
			break;
		a = now_ns();
		if (write_full(fd, buf, size) != 0 || read_full(fd, buf, size) != 0)
			die("exchange");
		b = now_ns();
		lat[n++] = b - a;
	}
	close(fd);
	if (n == 0) {
		errno = EIO;
		die("no sample");
	}
	for (i = 0; i < n; i++)
		sum += lat[i];
	qsort(lat, (size_t)n, sizeof(*lat), cmp_u64);
	printf("{\"mode\": \"rr\", \"count\": %ld, \"seconds\": %.6f, \"size\": %u, "
	       "\"p50_us\": %.3f, \"p90_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, "
	       "\"min_us\": %.3f, \"max_us\": %.3f}\n",
	       n, now_s() - t0, size, pct(lat, n, 0.50), pct(lat, n, 0.90), pct(lat, n, 0.99),
	       sum / n / 1000.0, lat[0] / 1000.0, lat[n - 1] / 1000.0);
	free(lat);
	return 0;
}

static int run_stream(const struct opts *o)
{
	static char buf[STREAM_BUF];
	uint64_t sent = 0, got = 0;
	double t0, end, t1;
	int fd;
	memset(buf, 's', sizeof(buf));
	t0 = now_s();
	end = t0 + o->seconds;
	fd = connect_to(o, 5.0);
	if (fd < 0)
		die("connect");
	while (now_s() < end) {
		ssize_t w = write(fd, buf, sizeof(buf));
		if (w <= 0) {
			if (w < 0 && errno == EINTR)
				continue;
			die("write");
		}
		sent += (uint64_t)w;
	}
	shutdown(fd, SHUT_WR);
	if (read_full(fd, (char *)&got, sizeof(got)) != 0)
		die("reading the server's count");
	t1 = now_s();
	close(fd);
	printf("{\"mode\": \"stream\", \"bytes\": %llu, \"sent\": %llu, \"seconds\": %.6f, "
	       "\"gbps\": %.4f}\n",
	       (unsigned long long)got, (unsigned long long)sent, t1 - t0, got * 8.0 / (t1 - t0) / 1e9);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: ovlbench server|connect|rr|stream [--host H] [--port P] [--seconds S]\n"
			"       [--max N] [--size B] [--warmup W] [--cpu C]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct opts o = {.host = "127.0.0.1", .port = 5201, .seconds = 2.0, .max = 10000000,
			 .size = 64, .warmup = 200, .cpu = -1};
	int i;
	if (argc < 2)
		usage();
	o.mode = argv[1];
	for (i = 2; i + 1 < argc; i += 2) {
		const char *k = argv[i], *v = argv[i + 1];
		if (!strcmp(k, "--host"))
			o.host = v;
		else if (!strcmp(k, "--port"))
			o.port = atoi(v);
		else if (!strcmp(k, "--seconds"))
			o.seconds = atof(v);
		else if (!strcmp(k, "--max"))
			o.max = atol(v);
		else if (!strcmp(k, "--size"))
			o.size = atoi(v);
		else if (!strcmp(k, "--warmup"))
			o.warmup = atol(v);
		else if (!strcmp(k, "--cpu"))
			o.cpu = atoi(v);
		else
			usage();
	}
	if (i != argc)
		usage();
	/* hard bounds whatever the caller asks */
	if (o.seconds <= 0 || o.seconds > 3600 || o.max <= 0 || o.port <= 0 || o.port > 65533)
		usage();
	pin_cpu(o.cpu);
	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(o.mode, "server")) {
		return run_server(&o);
	}
	/* a client never outlives its time by more than a few seconds */
	alarm((unsigned)o.seconds + 15);
	if (!strcmp(o.mode, "connect"))
		return run_connect(&o);
	if (!strcmp(o.mode, "rr"))
		return run_rr(&o);
	if (!strcmp(o.mode, "stream"))
		return run_stream(&o);
	usage();
	return 2;
}
