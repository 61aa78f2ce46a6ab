/*
 * The bare lease holder: the least a read-lease fence can do, as the
 * baseline of benches/writer_wait.rs (compiled there with `cc` at bench
 * time).
 *
 *   bare_holder FILE
 *
 * Opens FILE O_RDONLY, asks for lease breaks as a realtime signal
 * (F_SETSIG, the signal blocked and taken with sigwaitinfo, as replicad's
 * fence thread takes its breaks from a signalfd), and loops:
 *
 *   take the lease (F_SETLEASE F_RDLCK; EAGAIN while a writer still has
 *   the file open: retry every 100 us)
 *   write one byte 'L' on stdout: the bench opens for writing only then
 *   sigwaitinfo: the writer's open broke the lease
 *   F_SETLEASE F_UNLCK at once: the writer goes on
 *
 * Nothing is revoked: no replica, no truncate. It runs at the scheduling
 * class and priority it is started with (the bench starts it as it starts
 * replicad: SCHED_OTHER, nice 0). It dies with its parent
 * (PR_SET_PDEATHSIG), and exits on SIGTERM or when stdout is closed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s FILE\n", argv[0]);
		return 2;
	}
	pid_t parent = getppid();
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
		return 1;
	int sig = SIGRTMIN + 4;
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, sig);
	sigaddset(&set, SIGIO);
	sigaddset(&set, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
		perror("sigprocmask");
		return 1;
	}
	int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	if (fcntl(fd, F_SETSIG, sig) != 0) {
		perror("F_SETSIG");
		return 1;
	}
	for (;;) {
		while (fcntl(fd, F_SETLEASE, F_RDLCK) != 0) {
			if (errno != EAGAIN) {
				perror("F_SETLEASE F_RDLCK");
				return 1;
			}
			struct timespec ts = { 0, 100 * 1000 };
			nanosleep(&ts, NULL);
		}
		if (write(1, "L", 1) != 1)
			return 0;
		siginfo_t info;
		int got;
		do {
			got = sigwaitinfo(&set, &info);
		} while (got < 0 && errno == EINTR);
		if (got == SIGTERM)
			return 0;
		if (got < 0) {
			perror("sigwaitinfo");
			return 1;
		}
		/* sig (si_fd == fd) or SIGIO (queue overflow): either way a
		 * break is pending on our only lease. */
		if (fcntl(fd, F_SETLEASE, F_UNLCK) != 0) {
			perror("F_SETLEASE F_UNLCK");
			return 1;
		}
	}
}
