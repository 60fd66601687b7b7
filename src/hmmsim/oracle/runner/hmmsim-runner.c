// SPDX-License-Identifier: GPL-2.0-only
/*
 * hmmsim-runner: run hmmsim scenario files on this machine's kernel through test_hmm
 * (/dev/hmm_dmirror0..3; run as root with test_hmm loaded), printing the JSON lines
 * `hmmsim run` prints for them.
 *
 *   hmmsim-runner [-s] [-t SEC] FILE...
 *   hmmsim-runner --khugepaged-sentinel
 *   hmmsim-runner --parse-only FILE...
 *
 * Each file runs in a process of its own (its own process group), supervised: if it is
 * killed, {"error":"crash","signal":S} follows its lines; if it exits abnormally,
 * {"error":"exit","status":S}; after -t SEC seconds it is killed and
 * {"error":"timeout","seconds":SEC} follows (if it cannot be killed, being stuck in the
 * kernel, the runner stops there). {"file":"NAME"} (the base name) precedes each file's
 * lines when several files are given, or with -s. A parse error is the file's only line:
 * {"error":"parse","line":N}.
 *
 * Exit status, the largest over the files: 0 every file ran to its end (errno results,
 * segv, an OOM kill are normal output), 1 the runner failed, 2 bad usage or an
 * unreadable file, 3 a parse error, 4 an unknown name, 7 a timeout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"

#define KILL_GRACE 5	/* seconds a killed scenario gets to die */

static const char usage[] =
	"usage: hmmsim-runner [-s] [-t SEC] FILE...\n"
	"       hmmsim-runner --khugepaged-sentinel\n"
	"       hmmsim-runner --parse-only FILE...\n"
	"\n"
	"Run hmmsim scenario files (docs/scenario.md) on this kernel through test_hmm's\n"
	"/dev/hmm_dmirror0..3 (as root, test_hmm loaded) and print their JSON lines.\n"
	"\n"
	"  -s        print {\"file\":NAME} before each file's lines even for one file\n"
	"  -t SEC    stop a file after SEC seconds (a whole number >= 1)\n"
	"  --khugepaged-sentinel\n"
	"            stay alive with an mm registered with khugepaged (see the spec's\n"
	"            environment: keeps khugepaged asleep during scenarios)\n"
	"  --parse-only\n"
	"            only parse: print the parse error, or each command's line, op and\n"
	"            \"unknown\":1 if it names something undefined (for tests)\n"
	"  -h, --help  this text\n"
	"\n"
	"exit status: 0 ok, 1 runner failure, 2 usage, 3 parse, 4 unknown-name, 7 timeout\n";

static int bad_usage(const char *what)
{
	fprintf(stderr, "hmmsim-runner: %s\n%s", what, usage);
	return EXIT_USAGE;
}

static int read_file(const char *path, unsigned char **data, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t cap = 1 << 16;
	unsigned char *buf;
	struct stat sb;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode)) {
		close(fd);
		return -EISDIR;
	}
	buf = malloc(cap);
	*len = 0;
	for (;;) {
		ssize_t n;

		if (!buf) {
			close(fd);
			return -ENOMEM;
		}
		if (*len == cap) {
			unsigned char *nb = realloc(buf, cap * 2);

			if (!nb) {
				free(buf);
				close(fd);
				return -ENOMEM;
			}
			buf = nb;
			cap *= 2;
		}
		n = read(fd, buf + *len, cap - *len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int e = errno;

			free(buf);
			close(fd);
			return -e;
		}
		if (!n)
			break;
		*len += (size_t)n;
	}
	close(fd);
	*data = buf;
	return 0;
}

static void print_error_int(const char *error, const char *key, int64_t v)
{
	struct rec *r = rec_new();

	rec_str(r, "error", error);
	rec_int(r, key, v);
	rec_emit(r);
}

/* Wait for pid until the deadline (0: none); SIGCHLD is blocked. 1 if reaped. */
static int wait_until(pid_t pid, int *status, const struct timespec *deadline)
{
	sigset_t chld;

	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	for (;;) {
		pid_t r = waitpid(pid, status, WNOHANG);
		struct timespec now, left;

		if (r == pid)
			return 1;
		if (r < 0 && errno != EINTR)
			return -1;
		if (!deadline) {
			sigwaitinfo(&chld, NULL);
			continue;
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec > deadline->tv_sec ||
		    (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec))
			return 0;
		left.tv_sec = deadline->tv_sec - now.tv_sec;
		left.tv_nsec = deadline->tv_nsec - now.tv_nsec;
		if (left.tv_nsec < 0) {
			left.tv_sec--;
			left.tv_nsec += 1000000000L;
		}
		sigtimedwait(&chld, NULL, &left);
	}
}

/* --parse-only: what the parser made of the file. */
static void print_parsed(const struct scenario *sc)
{
	for (int i = 0; i < sc->ncmds; i++) {
		struct rec *r = rec_new();

		rec_int(r, "line", sc->cmds[i].line);
		rec_str(r, "op", op_names[sc->cmds[i].op]);
		if (sc->cmds[i].unknown)
			rec_int(r, "unknown", 1);
		rec_emit(r);
	}
}

/* Run one file; returns its exit status, or -1 when the runner must stop (a scenario
 * process that cannot be killed). */
static int run_file(const char *path, int separators, long timeout, int parse_only)
{
	struct scenario sc;
	unsigned char *data = NULL;
	size_t len = 0;
	int err_line, status, ret;
	sigset_t chld, old;
	pid_t pid;

	if (separators) {
		const char *base = strrchr(path, '/');
		struct rec *r = rec_new();

		rec_str(r, "file", base ? base + 1 : path);
		rec_emit(r);
	}
	ret = read_file(path, &data, &len);
	if (ret) {
		struct rec *r = rec_new();

		rec_str(r, "error", "exit");
		rec_int(r, "status", EXIT_USAGE);
		rec_str(r, "message", strerror(-ret));
		rec_emit(r);
		return EXIT_USAGE;
	}
	memset(&sc, 0, sizeof(sc));
	ret = parse_scenario(data, len, &sc, &err_line);
	free(data);
	if (ret) {
		struct rec *r = rec_new();

		rec_str(r, "error", "parse");
		rec_int(r, "line", err_line);
		rec_emit(r);
		return EXIT_PARSE;
	}
	if (parse_only) {
		print_parsed(&sc);
		free_scenario(&sc);
		return EXIT_OK;
	}
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &old);
	pid = fork();
	if (pid < 0) {
		perror("hmmsim-runner: fork");
		free_scenario(&sc);
		sigprocmask(SIG_SETMASK, &old, NULL);
		return EXIT_INTERNAL;
	}
	if (pid == 0) {
		setpgid(0, 0);
		sigprocmask(SIG_SETMASK, &old, NULL);
		_exit(run_scenario(&sc));
	}
	setpgid(pid, pid);
	free_scenario(&sc);
	if (timeout > 0) {
		struct timespec deadline;

		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += timeout;
		ret = wait_until(pid, &status, &deadline);
	} else {
		ret = wait_until(pid, &status, NULL);
	}
	if (ret == 0) {
		struct timespec deadline;

		kill(-pid, SIGKILL);
		kill(pid, SIGKILL);
		print_error_int("timeout", "seconds", timeout);
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += KILL_GRACE;
		ret = wait_until(pid, &status, &deadline);
		sigprocmask(SIG_SETMASK, &old, NULL);
		if (ret != 1) {
			fprintf(stderr, "hmmsim-runner: %s: the scenario's process does not die after SIGKILL "
				"(stuck in the kernel): stopping\n", path);
			return -1;
		}
		return EXIT_TIMEOUT;
	}
	sigprocmask(SIG_SETMASK, &old, NULL);
	if (ret < 0) {
		perror("hmmsim-runner: waitpid");
		return EXIT_INTERNAL;
	}
	kill(-pid, SIGKILL);	/* fork children left behind by a killed parent */
	if (WIFSIGNALED(status)) {
		print_error_int("crash", "signal", WTERMSIG(status));
		return WTERMSIG(status) == SIGKILL ? EXIT_OK : EXIT_INTERNAL;
	}
	switch (WEXITSTATUS(status)) {
	case 0:
		return EXIT_OK;
	case EXIT_UNKNOWN_NAME:
		return EXIT_UNKNOWN_NAME;
	case 5:	/* stopped after printing its own error record (a failed fork) */
		return EXIT_INTERNAL;
	default:
		print_error_int("exit", "status", WEXITSTATUS(status));
		return EXIT_INTERNAL;
	}
}

int main(int argc, char **argv)
{
	int separators = 0, parse_only = 0, status = EXIT_OK, i, nfiles;
	long timeout = 0;
	char **files;

	files = calloc((size_t)argc, sizeof(char *));
	if (!files)
		return EXIT_INTERNAL;
	nfiles = 0;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(usage, stdout);
			return EXIT_OK;
		} else if (!strcmp(a, "--khugepaged-sentinel")) {
			return khugepaged_sentinel();
		} else if (!strcmp(a, "--parse-only")) {
			parse_only = 1;
		} else if (!strcmp(a, "-s")) {
			separators = 1;
		} else if (!strcmp(a, "-t")) {
			char *end;

			if (++i == argc)
				return bad_usage("-t needs a number of seconds");
			errno = 0;
			timeout = strtol(argv[i], &end, 10);
			if (errno || *end || end == argv[i] || timeout < 1)
				return bad_usage("-t SEC: a whole number of seconds, at least 1");
		} else if (!strcmp(a, "--")) {
			for (i++; i < argc; i++)
				files[nfiles++] = argv[i];
		} else if (a[0] == '-' && a[1]) {
			fprintf(stderr, "hmmsim-runner: unknown option %s\n%s", a, usage);
			return EXIT_USAGE;
		} else {
			files[nfiles++] = argv[i];
		}
	}
	if (!nfiles)
		return bad_usage("no scenario files");
	if (nfiles > 1)
		separators = 1;
	for (i = 0; i < nfiles; i++) {
		int st = run_file(files[i], separators, timeout, parse_only);

		if (st < 0)
			return EXIT_TIMEOUT;
		if (st > status)
			status = st;
	}
	free(files);
	return status;
}
