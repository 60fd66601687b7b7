// SPDX-License-Identifier: GPL-2.0-only
/*
 * hmmsim-runner: the commands of a scenario, run by the calling process on the real
 * kernel (docs/scenario.md, docs/scenario-conventions.md).
 *
 * - Regions get slot i of 64 GiB at 0x100000000000 + i * 2^36 (counted per process; a
 *   fork child continues its parent's count), starting A pages into the slot (A = align=,
 *   default 1; at least 512 for hugetlb); mmap and mremap use MAP_FIXED / MREMAP_FIXED.
 * - CPU commands touch the pages one at a time; a SIGSEGV/SIGBUS is caught, the first
 *   faulting page (from the region start) is reported and the next page is tried. An
 *   address outside every VMA (SEGV_MAPERR) skips to the next VMA, found in
 *   /proc/self/maps, since every page up to it would fault too.
 * - Device and uffd commands are in device.c.
 * - fork prints its line, forks; the child runs the block with "proc":depth and exits 0
 *   at its endfork; the parent reaps it and prints endfork (ret "child-died" unless the
 *   child exited with 0). A scenario error in a child stops the parent too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runner.h"

#define ARENA_BASE 0x100000000000ULL
#define SLOT_SIZE (1ULL << 36)
#define HUGETLB_ALIGN 512

/* Exit statuses of a scenario process (the supervisor maps them). */
#define STOP_UNKNOWN_NAME EXIT_UNKNOWN_NAME
#define STOP_ERROR 5

#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
#ifndef MADV_NOHUGEPAGE
#define MADV_NOHUGEPAGE 15
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

static const int prot_values[] = { PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE };
static const int advice_values[] = { MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTNEED, MADV_FREE };

struct proc_state st;

void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size);

	if (!p) {
		static const char msg[] = "hmmsim-runner: out of memory\n";
		write_all(2, msg, sizeof(msg) - 1);
		_exit(EXIT_INTERNAL);
	}
	return p;
}

/* A record for command c, with "proc" in a child. */
struct rec *out(const struct cmd *c)
{
	struct rec *r = rec_new();

	rec_int(r, "line", c->line);
	rec_str(r, "op", op_names[c->op]);
	if (st.depth)
		rec_int(r, "proc", st.depth);
	return r;
}

void out_ret(const struct cmd *c, int64_t ret)
{
	struct rec *r = out(c);

	rec_int(r, "ret", ret);
	rec_emit(r);
}

/* Pattern SEED into npages pages at buf, word 0 being word first_word of the pattern. */
void fill_pattern(void *buf, uint64_t npages, int64_t seed, uint64_t first_word)
{
	uint32_t *w = buf;
	uint32_t v = pattern_word(seed, first_word);
	uint64_t k, n = npages * WORDS;

	for (k = 0; k < n; k++)
		w[k] = v + (uint32_t)k;
}

static uint64_t slot(void)
{
	return ARENA_BASE + st.next_slot++ * SLOT_SIZE;
}

uint64_t region_addr(int64_t name, int64_t off)
{
	return st.regions[name].start + ((uint64_t)off << PAGE_SHIFT);
}

/* -- CPU ------------------------------------------------------------------------------ */

static sigjmp_buf cpu_env;
static volatile sig_atomic_t cpu_armed;
static volatile int cpu_si_code;

static void on_fault(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (cpu_armed) {
		cpu_armed = 0;
		cpu_si_code = sig == SIGSEGV ? si->si_code : 0;
		siglongjmp(cpu_env, 1);
	}
	signal(sig, SIG_DFL);	/* not a CPU command: let it kill the process */
}

/* The start of the next VMA above addr (addr + 1 page if addr is inside one), from
 * /proc/self/maps; 0 when it cannot be read. */
static uint64_t next_vma(uint64_t addr)
{
	FILE *f = fopen("/proc/self/maps", "re");
	unsigned long long lo, hi;
	uint64_t best = UINT64_MAX;
	char line[512];

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%llx-%llx", &lo, &hi) != 2)
			continue;
		if (lo <= addr && addr < hi) {
			best = addr + PAGE_SIZE;
			break;
		}
		if (lo > addr && lo < best)
			best = lo;
	}
	fclose(f);
	return best;
}

typedef void (*page_fn)(unsigned char *page, uint64_t index, void *arg);

/*
 * Access pages off..off+npages-1 of region name with fn(page, index from the region
 * start, arg), one at a time, going on after a faulting page. Returns the first
 * faulting page (from the region start), or -1.
 */
static int64_t cpu_pages(int64_t name, uint64_t off, uint64_t npages, page_fn fn, void *arg)
{
	static volatile uint64_t cur;
	volatile uint64_t next = 0;
	volatile int64_t first_bad = -1;
	uint64_t base = region_addr(name, (int64_t)off);

	while (next < npages) {
		if (sigsetjmp(cpu_env, 1)) {
			uint64_t at = cur;

			if (first_bad < 0)
				first_bad = (int64_t)(off + at);
			next = at + 1;
			if (cpu_si_code == SEGV_MAPERR) {
				uint64_t addr = base + at * PAGE_SIZE, v = next_vma(addr);

				if (v > addr + PAGE_SIZE) {
					uint64_t skip = (v - base + PAGE_SIZE - 1) / PAGE_SIZE;

					next = skip < npages ? skip : npages;
				}
			}
			continue;
		}
		cpu_armed = 1;
		for (uint64_t i = next; i < npages; i++) {
			cur = i;
			fn((unsigned char *)(uintptr_t)(base + i * PAGE_SIZE), off + i, arg);
		}
		cpu_armed = 0;
		next = npages;
	}
	return first_bad;
}

struct cpu_arg {
	int64_t seed;
	uint32_t crc;
	uint64_t mismatch;
};

static void page_fill(unsigned char *page, uint64_t index, void *arg)
{
	struct cpu_arg *a = arg;

	fill_pattern(page, 1, a->seed, index * WORDS);
}

static void page_touch(unsigned char *page, uint64_t index, void *arg)
{
	(void)index;
	(void)arg;
	(void)*(volatile uint32_t *)page;
}

static void page_read(unsigned char *page, uint64_t index, void *arg)
{
	struct cpu_arg *a = arg;

	(void)index;
	a->crc = crc32_update(a->crc, page, PAGE_SIZE);
}

static void page_check(unsigned char *page, uint64_t index, void *arg)
{
	struct cpu_arg *a = arg;
	const uint32_t *w = (const uint32_t *)page;
	uint32_t v = pattern_word(a->seed, index * WORDS);
	uint64_t bad = 0;

	for (uint32_t k = 0; k < WORDS; k++)
		bad += w[k] != v + k;
	a->mismatch += bad;
}

static void op_cpu(const struct cmd *c)
{
	struct cpu_arg arg = { .seed = c->op == OP_FILL || c->op == OP_CHECK ? c->a[3] : 0 };
	page_fn fn = c->op == OP_FILL ? page_fill : c->op == OP_TOUCH ? page_touch :
		     c->op == OP_READ ? page_read : page_check;
	int64_t bad = cpu_pages(c->a[0], (uint64_t)c->a[1], (uint64_t)c->a[2], fn, &arg);
	struct rec *r = out(c);

	if (bad >= 0) {
		rec_raw(r, "ret", "\"segv\"");
		rec_int(r, "page", bad);
	} else {
		rec_int(r, "ret", 0);
		if (c->op == OP_READ)
			rec_int(r, "crc", arg.crc);
		else if (c->op == OP_CHECK)
			rec_int(r, "mismatch", (int64_t)arg.mismatch);
	}
	rec_emit(r);
}

/* -- regions -------------------------------------------------------------------------- */

static void op_mmap(const struct cmd *c)
{
	uint64_t align = (uint64_t)c->a[MM_ALIGN];
	int flags = (c->a[MM_SHARED] ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED;
	int fd = -1;
	uint64_t start;
	void *p;

	if (c->a[MM_HUGETLB] && align < HUGETLB_ALIGN)
		align = HUGETLB_ALIGN;
	start = slot() + align * PAGE_SIZE;
	st.regions[c->a[MM_NAME]].start = start;
	st.regions[c->a[MM_NAME]].npages = (uint64_t)c->a[MM_NPAGES];
	if (c->a[MM_BACKING] == BACK_ANON) {
		flags |= MAP_ANONYMOUS;
	} else {
		fd = c->a[MM_BACKING] == BACK_FILE ? st.files[c->a[MM_BNAME]] : st.handles[c->a[MM_BNAME]];
		if (fd < 0) {
			out_ret(c, -EBADF);
			return;
		}
	}
	if (c->a[MM_HUGETLB])
		flags |= MAP_HUGETLB;
	p = mmap((void *)(uintptr_t)start, (size_t)c->a[MM_NPAGES] * PAGE_SIZE, prot_values[c->a[MM_PROT]],
		 flags, fd, 0);
	out_ret(c, p == MAP_FAILED ? -errno : 0);
}

int64_t sys_ret(long r)
{
	return r < 0 ? -errno : 0;
}

static void op_munmap(const struct cmd *c)
{
	out_ret(c, sys_ret(syscall(SYS_munmap, region_addr(c->a[0], c->a[1]), (uint64_t)c->a[2] * PAGE_SIZE)));
}

static void op_mprotect(const struct cmd *c)
{
	out_ret(c, sys_ret(syscall(SYS_mprotect, region_addr(c->a[0], c->a[1]), (uint64_t)c->a[2] * PAGE_SIZE,
				   prot_values[c->a[3]])));
}

static void op_madvise(const struct cmd *c)
{
	out_ret(c, sys_ret(syscall(SYS_madvise, region_addr(c->a[0], c->a[1]), (uint64_t)c->a[2] * PAGE_SIZE,
				   advice_values[c->a[3]])));
}

static void op_mremap(const struct cmd *c)
{
	uint64_t start = st.regions[c->a[0]].start;
	uint64_t new_addr = slot() + start % SLOT_SIZE;
	uint64_t len = (uint64_t)c->a[2] * PAGE_SIZE;
	int flags = MREMAP_MAYMOVE | MREMAP_FIXED | (c->a[3] ? MREMAP_DONTUNMAP : 0);
	long r;

	st.regions[c->a[1]].start = new_addr;
	st.regions[c->a[1]].npages = (uint64_t)c->a[2];
	r = syscall(SYS_mremap, start, len, len, flags, new_addr);
	out_ret(c, r == -1 ? -errno : 0);
}

/* -- files ---------------------------------------------------------------------------- */

static int new_file(void)
{
	int fd = (int)syscall(SYS_memfd_create, "hmmsim-file", 0);

	if (fd < 0 && errno == ENOSYS)
		fd = open("/tmp", O_TMPFILE | O_RDWR, 0600);
	return fd;
}

static void op_file(const struct cmd *c)
{
	int fd = new_file();

	st.files[c->a[0]] = fd;
	if (fd < 0) {
		out_ret(c, -errno);
		return;
	}
	out_ret(c, sys_ret(ftruncate(fd, (off_t)((uint64_t)c->a[1] * PAGE_SIZE))));
}

#define IO_CHUNK 256	/* pages per pread/pwrite */

static void op_pwrite(const struct cmd *c)
{
	int fd = st.files[c->a[0]];
	uint64_t off = (uint64_t)c->a[1], npages = (uint64_t)c->a[2], done = 0;
	unsigned char *buf;

	if (fd < 0) {
		out_ret(c, -EBADF);
		return;
	}
	buf = xcalloc(IO_CHUNK, PAGE_SIZE);
	while (done < npages) {
		uint64_t n = npages - done < IO_CHUNK ? npages - done : IO_CHUNK;
		size_t len = n * PAGE_SIZE, got = 0;

		fill_pattern(buf, n, c->a[3], (off + done) * WORDS);
		while (got < len) {
			ssize_t w = pwrite(fd, buf + got, len - got, (off_t)((off + done) * PAGE_SIZE + got));

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				free(buf);
				out_ret(c, w < 0 ? -errno : -EIO);
				return;
			}
			got += (size_t)w;
		}
		done += n;
	}
	free(buf);
	out_ret(c, 0);
}

static void op_pread(const struct cmd *c)
{
	int fd = st.files[c->a[0]];
	uint64_t pos = (uint64_t)c->a[1] * PAGE_SIZE, left = (uint64_t)c->a[2] * PAGE_SIZE;
	uint32_t crc = 0;
	unsigned char *buf;
	struct rec *r;

	if (fd < 0) {
		out_ret(c, -EBADF);
		return;
	}
	buf = xcalloc(IO_CHUNK, PAGE_SIZE);
	while (left) {
		size_t len = left < IO_CHUNK * PAGE_SIZE ? left : IO_CHUNK * PAGE_SIZE;
		ssize_t n = pread(fd, buf, len, (off_t)pos);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			free(buf);
			out_ret(c, -errno);
			return;
		}
		if (!n)
			break;	/* end of file: the crc covers what was read */
		crc = crc32_update(crc, buf, (size_t)n);
		pos += (uint64_t)n;
		left -= (uint64_t)n;
	}
	free(buf);
	r = out(c);
	rec_int(r, "ret", 0);
	rec_int(r, "crc", crc);
	rec_emit(r);
}

/* -- the scenario --------------------------------------------------------------------- */

static void stop(int status)
{
	_exit(status);
}

/* fork: returns the index to go on at, in the parent and in the child. */
static int run_fork(int i)
{
	const struct cmd *c = &st.sc->cmds[i], *end = &st.sc->cmds[c->match];
	struct rec *r;
	pid_t pid;
	int status;

	out_ret(c, 0);
	pid = fork();
	if (pid < 0) {
		int e = errno;

		r = rec_new();
		rec_str(r, "error", "fork");
		rec_int(r, "line", c->line);
		if (st.depth)
			rec_int(r, "proc", st.depth);
		rec_int(r, "ret", -e);
		rec_emit(r);
		stop(STOP_ERROR);
	}
	if (pid == 0) {
		st.depth++;
		return i + 1;
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			stop(EXIT_INTERNAL);
	if (WIFEXITED(status) && (WEXITSTATUS(status) == STOP_UNKNOWN_NAME || WEXITSTATUS(status) == STOP_ERROR))
		stop(WEXITSTATUS(status));	/* the child's scenario error stops the parent too */
	r = out(end);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		rec_int(r, "ret", 0);
	else
		rec_raw(r, "ret", "\"child-died\"");
	rec_emit(r);
	return c->match + 1;
}

int run_scenario(const struct scenario *sc)
{
	struct sigaction sa;
	int i, ns;

	memset(&st, 0, sizeof(st));
	st.sc = sc;
	st.regions = xcalloc((size_t)sc->nsyms[NS_REGION], sizeof(struct region));
	st.files = xcalloc((size_t)sc->nsyms[NS_FILE], sizeof(int));
	st.handles = xcalloc((size_t)sc->nsyms[NS_HANDLE], sizeof(int));
	for (ns = 0; ns < sc->nsyms[NS_FILE]; ns++)
		st.files[ns] = -1;
	for (ns = 0; ns < sc->nsyms[NS_HANDLE]; ns++)
		st.handles[ns] = -1;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_fault;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);

	i = 0;
	while (i < sc->ncmds) {
		const struct cmd *c = &sc->cmds[i];

		if (c->op == OP_ENDFORK)	/* only a child reaches an endfork: its block ends */
			stop(0);
		if (c->unknown) {
			struct rec *r = rec_new();

			rec_str(r, "error", "unknown-name");
			rec_int(r, "line", c->line);
			rec_str(r, "op", op_names[c->op]);
			if (st.depth)
				rec_int(r, "proc", st.depth);
			rec_emit(r);
			stop(STOP_UNKNOWN_NAME);
		}
		switch (c->op) {
		case OP_FORK:
			i = run_fork(i);
			continue;
		case OP_MMAP:
			op_mmap(c);
			break;
		case OP_MUNMAP:
			op_munmap(c);
			break;
		case OP_MPROTECT:
			op_mprotect(c);
			break;
		case OP_MADVISE:
			op_madvise(c);
			break;
		case OP_MREMAP:
			op_mremap(c);
			break;
		case OP_FILL:
		case OP_TOUCH:
		case OP_READ:
		case OP_CHECK:
			op_cpu(c);
			break;
		case OP_FILE:
			op_file(c);
			break;
		case OP_PWRITE:
			op_pwrite(c);
			break;
		case OP_PREAD:
			op_pread(c);
			break;
		case OP_OPEN:
			op_open(c);
			break;
		case OP_CLOSE:
			op_close(c);
			break;
		case OP_UFFD:
			op_uffd(c);
			break;
		default:
			op_device(c);
			break;
		}
		i++;
	}
	return 0;
}

/*
 * A process that keeps khugepaged from waking up during scenarios (conventions item 24):
 * it registers an mm with khugepaged (MADV_HUGEPAGE on a range holding an aligned 2 MiB
 * block) and lives forever, so khugepaged always has work queued and sleeps its
 * scan_sleep_millisecs (set to the maximum by the caller) instead of waking up when a
 * scenario's first MADV_HUGEPAGE registers a new mm.
 */
int khugepaged_sentinel(void)
{
	size_t huge = 2UL << 20;
	char *p = mmap(NULL, 3 * huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uintptr_t a;

	if (p == MAP_FAILED)
		return EXIT_INTERNAL;
	a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
	if (madvise((void *)a, 2 * huge, MADV_HUGEPAGE))
		return EXIT_INTERNAL;
	for (;;)
		pause();
}
