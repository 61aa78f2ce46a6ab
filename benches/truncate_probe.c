/*
 * What the kernel alone costs for the revoke's truncate: no replicad, no
 * lease. Run by benches/writer_wait.rs (compiled there with `cc`), or by
 * hand as root:
 *
 *   truncate_probe DIR MIB MAPPERS RUNS HUGE BUSY pause|touch
 *
 * Mounts a tmpfs at DIR (huge=within_size when HUGE is 1, else the tmpfs
 * default, huge=never) in a mount namespace of its own (it goes with the
 * probe), and RUNS times: writes a MIB MiB file there, forks MAPPERS
 * processes that each map it MAP_SHARED and touch one byte of every page,
 * then
 *   touch  touch it again every REPLICAD_BENCH_IDLE_MS (default 1) ms, as
 *          the bench's idle readers do; the first BUSY of them (one per
 *          CPU in the bench) read one byte of every 64 without sleeping
 *          instead;
 *   pause  sleep in pause(): the unmap alone, nobody faulting;
 * on SIGBUS a mapper moves a spare mapping of another file over its range
 * (mremap), as replicad_client's fallback does. Once all have touched it,
 * times ftruncate(fd, 0) (the kernel unmaps the pages from every mapper and
 * frees them), then the unlink and the close, as replicad's revoke does,
 * and counts the TLB-shootdown and function-call interrupts
 * (/proc/interrupts TLB, CAL, all CPUs) over the ftruncate; then kills the
 * mappers.
 *
 * Prints one line: "truncate_probe mib=.. mappers=.. huge=.. busy=..
 * idle=.. runs=.. trunc_p50_us=.. trunc_p99_us=.. trunc_max_us=..
 * unlink_p50_us=.. close_p50_us=.. tlb_ipis_p50=.. cal_ipis_p50=..".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Sum over CPUs of the /proc/interrupts line that starts with `name:`. */
static long long irq_count(const char *name)
{
	FILE *f = fopen("/proc/interrupts", "r");
	if (!f)
		return -1;
	char line[4096];
	size_t len = strlen(name);
	long long sum = -1;
	while (fgets(line, sizeof line, f)) {
		char *p = line;
		while (*p == ' ')
			p++;
		if (strncmp(p, name, len) != 0 || p[len] != ':')
			continue;
		p += len + 1;
		sum = 0;
		for (;;) {
			char *end;
			long long v = strtoll(p, &end, 10);
			if (end == p)
				break;
			sum += v;
			p = end;
		}
		break;
	}
	fclose(f);
	return sum;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(double *v, int n, double q)
{
	qsort(v, n, sizeof *v, cmp);
	return v[(int)((n - 1) * q + 0.5)];
}

/* The mapper's range, and the spare mapping its SIGBUS handler moves over
 * it (as replicad_client's fallback does with the original file). */
static void *range, *spare;
static size_t range_len;

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)info;
	(void)ctx;
	if (mremap(spare, range_len, range_len, MREMAP_MAYMOVE | MREMAP_FIXED, range) == MAP_FAILED)
		_exit(4);
}

static void mapper(const char *path, const char *spare_path, size_t len, int busy, int pause_after,
		   int ready)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	int fd = open(path, O_RDONLY);
	int sfd = open(spare_path, O_RDONLY);
	if (fd < 0 || sfd < 0)
		_exit(1);
	volatile unsigned char *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	spare = mmap(NULL, len, PROT_READ, MAP_SHARED, sfd, 0);
	if (p == MAP_FAILED || spare == MAP_FAILED)
		_exit(1);
	close(fd);
	close(sfd);
	range = (void *)p;
	range_len = len;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGBUS, &sa, NULL);
	const char *ms = getenv("REPLICAD_BENCH_IDLE_MS");
	long nap_ms = ms ? atol(ms) : 1;
	struct timespec nap = { nap_ms / 1000, (nap_ms % 1000) * 1000000 };
	unsigned sum = 0;
	size_t step = busy ? 64 : 4096;
	for (size_t off = 0; off < len; off += 4096)
		sum += p[off];
	if (write(ready, "r", 1) != 1)
		_exit(1);
	if (pause_after && !busy)
		for (;;)
			pause();
	for (;;) {
		for (size_t off = 0; off < len; off += step)
			sum += p[off];
		if (!busy)
			nanosleep(&nap, NULL);
		if (sum == 0xdeadbeef)
			_exit(3);
	}
}

int main(int argc, char **argv)
{
	if (argc != 8 || (strcmp(argv[7], "pause") != 0 && strcmp(argv[7], "touch") != 0)) {
		fprintf(stderr, "usage: %s DIR MIB MAPPERS RUNS HUGE BUSY pause|touch\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	size_t len = (size_t)atoi(argv[2]) << 20;
	int mappers = atoi(argv[3]), runs = atoi(argv[4]);
	int huge = atoi(argv[5]), busy = atoi(argv[6]);
	int pause_after = strcmp(argv[7], "pause") == 0;
	if (runs < 1 || mappers < 0 || len == 0)
		return 2;
	/* A mount namespace of our own: the tmpfs goes when we do. */
	if (unshare(CLONE_NEWNS) != 0 ||
	    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) {
		perror("unshare(CLONE_NEWNS)");
		return 1;
	}
	if (mount("truncate-probe", dir, "tmpfs", MS_NOSUID | MS_NODEV,
		  huge ? "mode=0700,huge=within_size" : "mode=0700") != 0) {
		perror("mount tmpfs");
		return 1;
	}
	char path[4096], spare_path[4096];
	snprintf(path, sizeof path, "%s/replica", dir);
	snprintf(spare_path, sizeof spare_path, "%s/spare", dir);
	char *buf = malloc(len);
	memset(buf, 7, len);
	int sfd = open(spare_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (sfd < 0 || pwrite(sfd, buf, len, 0) != (ssize_t)len) {
		perror("writing the spare");
		return 1;
	}
	close(sfd);
	double *trunc = calloc(runs, sizeof *trunc);
	double *unl = calloc(runs, sizeof *unl);
	double *clo = calloc(runs, sizeof *clo);
	double *tlb = calloc(runs, sizeof *tlb);
	double *cal = calloc(runs, sizeof *cal);
	pid_t *kids = calloc(mappers + 1, sizeof *kids);
	int status = 0;
	for (int r = 0; r < runs; r++) {
		int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
		if (fd < 0 || ftruncate(fd, len) != 0 || pwrite(fd, buf, len, 0) != (ssize_t)len) {
			perror("writing the file");
			status = 1;
			break;
		}
		int pfd[2];
		if (pipe(pfd) != 0) {
			perror("pipe");
			status = 1;
			break;
		}
		for (int i = 0; i < mappers; i++) {
			kids[i] = fork();
			if (kids[i] == 0) {
				close(pfd[0]);
				mapper(path, spare_path, len, i < busy, pause_after, pfd[1]);
			}
		}
		close(pfd[1]);
		for (int i = 0; i < mappers; i++) {
			char c;
			if (read(pfd[0], &c, 1) != 1) {
				fprintf(stderr, "a mapper died before it was ready\n");
				status = 1;
				break;
			}
		}
		close(pfd[0]);
		long long tlb0 = irq_count("TLB"), cal0 = irq_count("CAL");
		double t0 = now_us();
		if (ftruncate(fd, 0) != 0) {
			perror("ftruncate");
			status = 1;
		}
		double t1 = now_us();
		long long tlb1 = irq_count("TLB"), cal1 = irq_count("CAL");
		double t1b = now_us();
		unlink(path);
		double t2 = now_us();
		close(fd);
		double t3 = now_us();
		trunc[r] = t1 - t0;
		unl[r] = t2 - t1b;
		clo[r] = t3 - t2;
		tlb[r] = (double)(tlb1 - tlb0);
		cal[r] = (double)(cal1 - cal0);
		for (int i = 0; i < mappers; i++)
			kill(kids[i], SIGKILL);
		for (int i = 0; i < mappers; i++)
			waitpid(kids[i], NULL, 0);
		if (status)
			break;
	}
	if (umount(dir) != 0)
		perror("umount");
	if (status)
		return status;
	printf("truncate_probe mib=%zu mappers=%d huge=%d busy=%d idle=%s runs=%d "
	       "trunc_p50_us=%.1f trunc_p99_us=%.1f trunc_max_us=%.1f "
	       "unlink_p50_us=%.1f close_p50_us=%.1f tlb_ipis_p50=%.0f cal_ipis_p50=%.0f\n",
	       len >> 20, mappers, huge, busy, argv[7], runs, pct(trunc, runs, 0.5),
	       pct(trunc, runs, 0.99), pct(trunc, runs, 1.0), pct(unl, runs, 0.5),
	       pct(clo, runs, 0.5), pct(tlb, runs, 0.5), pct(cal, runs, 0.5));
	return 0;
}
