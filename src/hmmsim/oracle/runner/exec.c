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
 * - Device commands use a fresh private anonymous MAP_POPULATE buffer of NPAGES pages
 *   (one if NPAGES is 0), unmapped afterwards; ioctls are retried on EINTR; the ioctl
 *   numbers are test_hmm's (lib/test_hmm_uapi.h): a kernel that does not know one answers
 *   as its driver does (-EINVAL for FLAGS and READ_UNLOCKED on 6.12).
 * - fork prints its line, forks; the child runs the block with "proc":depth and exits 0
 *   at its endfork; the parent reaps it and prints endfork (ret "child-died" unless the
 *   child exited with 0). A scenario error in a child stops the parent too.
 * - uffd registers the pages with a new userfaultfd (MISSING mode) and starts a thread
 *   answering every fault with UFFDIO_COPY of the page of pattern SEED.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runner.h"

#define PAGE_SIZE 4096ULL
#define PAGE_SHIFT 12
#define WORDS (PAGE_SIZE / 4)
#define ARENA_BASE 0x100000000000ULL
#define SLOT_SIZE (1ULL << 36)
#define HUGETLB_ALIGN 512

/* Exit statuses of a scenario process (the supervisor maps them). */
#define STOP_UNKNOWN_NAME EXIT_UNKNOWN_NAME
#define STOP_ERROR 5

/* test_hmm's ioctl interface (lib/test_hmm_uapi.h, the same in 6.12 and 7.3) */
struct hmm_dmirror_cmd {
	uint64_t addr;
	uint64_t ptr;
	uint64_t npages;
	uint64_t cpages;
	uint64_t faults;
};

#define HMM_DMIRROR_IOC(nr) _IOWR('H', nr, struct hmm_dmirror_cmd)
enum {
	DMIRROR_READ = 0, DMIRROR_WRITE = 1, DMIRROR_MIGRATE_TO_DEV = 2, DMIRROR_MIGRATE_TO_SYS = 3,
	DMIRROR_SNAPSHOT = 4, DMIRROR_EXCLUSIVE = 5, DMIRROR_CHECK_EXCLUSIVE = 6,
	DMIRROR_RELEASE = 7, DMIRROR_FLAGS = 8, DMIRROR_READ_UNLOCKED = 9,
};

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

struct region {
	uint64_t start;
	uint64_t npages;
};

/* What one process of the scenario knows (a fork child has a copy). */
static struct {
	const struct scenario *sc;
	struct region *regions;
	int *files;
	int *handles;
	uint64_t next_slot;
	int depth;
} st;

static void *xcalloc(size_t n, size_t size)
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
static struct rec *out(const struct cmd *c)
{
	struct rec *r = rec_new();

	rec_int(r, "line", c->line);
	rec_str(r, "op", op_names[c->op]);
	if (st.depth)
		rec_int(r, "proc", st.depth);
	return r;
}

static void out_ret(const struct cmd *c, int64_t ret)
{
	struct rec *r = out(c);

	rec_int(r, "ret", ret);
	rec_emit(r);
}

static inline uint32_t pattern_word(int64_t seed, uint64_t word)
{
	return (uint32_t)(uint64_t)seed + (uint32_t)word;
}

/* Pattern SEED into npages pages at buf, word 0 being word first_word of the pattern. */
static void fill_pattern(void *buf, uint64_t npages, int64_t seed, uint64_t first_word)
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

static uint64_t region_addr(int64_t name, int64_t off)
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

static int64_t sys_ret(long r)
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

/* -- userfaultfd ---------------------------------------------------------------------- */

struct uffd_handler {
	int fd;
	uint64_t base;	/* the region's start: the pattern counts from it */
	int64_t seed;
	void *page;
};

static void *uffd_thread(void *arg)
{
	struct uffd_handler *h = arg;

	for (;;) {
		struct pollfd pfd = { .fd = h->fd, .events = POLLIN };
		struct uffd_msg msg;
		struct uffdio_copy copy;
		uint64_t a;
		int64_t d;

		if (poll(&pfd, 1, -1) < 0)
			continue;
		if (read(h->fd, &msg, sizeof(msg)) != (ssize_t)sizeof(msg))
			continue;
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		a = msg.arg.pagefault.address & ~(PAGE_SIZE - 1);
		d = (int64_t)(a - h->base);
		fill_pattern(h->page, 1, h->seed, (uint64_t)((d >> PAGE_SHIFT) * (int64_t)WORDS));
		memset(&copy, 0, sizeof(copy));
		copy.dst = a;
		copy.src = (uint64_t)(uintptr_t)h->page;
		copy.len = PAGE_SIZE;
		ioctl(h->fd, UFFDIO_COPY, &copy);	/* a failed COPY is ignored */
	}
	return NULL;
}

static void op_uffd(const struct cmd *c)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	struct uffd_handler *h;
	pthread_t t;
	int fd, ret = 0;

	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		out_ret(c, -errno);
		return;
	}
	memset(&reg, 0, sizeof(reg));
	reg.range.start = region_addr(c->a[0], c->a[1]);
	reg.range.len = (uint64_t)c->a[2] * PAGE_SIZE;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg)) {
		ret = -errno;
		close(fd);
		out_ret(c, ret);
		return;
	}
	h = xcalloc(1, sizeof(*h));
	h->fd = fd;
	h->base = st.regions[c->a[0]].start;
	h->seed = c->a[3];
	if (posix_memalign(&h->page, PAGE_SIZE, PAGE_SIZE))
		_exit(EXIT_INTERNAL);
	ret = pthread_create(&t, NULL, uffd_thread, h);
	if (!ret)
		pthread_detach(t);
	out_ret(c, -ret);
}

/* -- devices -------------------------------------------------------------------------- */

static int dmirror_ioctl(int fd, unsigned nr, struct hmm_dmirror_cmd *cmd)
{
	int r;

	do
		r = ioctl(fd, HMM_DMIRROR_IOC(nr), cmd);
	while (r < 0 && errno == EINTR);
	return r < 0 ? -errno : 0;
}

static void op_open(const struct cmd *c)
{
	char path[64];
	int fd;

	snprintf(path, sizeof(path), "/dev/hmm_dmirror%lld", (long long)c->a[1]);
	fd = open(path, O_RDWR);
	st.handles[c->a[0]] = fd;
	if (fd < 0)
		out_ret(c, errno == ENOENT || errno == ENXIO || errno == ENODEV ? -ENODEV : -errno);
	else
		out_ret(c, 0);
}

static void op_close(const struct cmd *c)
{
	int fd = st.handles[c->a[0]];

	st.handles[c->a[0]] = -1;
	out_ret(c, fd < 0 ? -EBADF : sys_ret(close(fd)));
}

enum consume { USE_NONE, USE_CRC, USE_PROT };

/*
 * A device command through a fresh buffer (conventions item 19). With fill, the buffer
 * holds pattern seed (word first_word first) before the ioctl. After a successful ioctl
 * the buffer is consumed: its crc (NPAGES pages) or its first NPAGES bytes as hex
 * (*prot, malloc'ed).
 */
static int buffer_ioctl(const struct cmd *c, unsigned nr, int fill, enum consume use,
			struct hmm_dmirror_cmd *cmd, uint32_t *crc, char **prot)
{
	int fd = st.handles[c->a[0]];
	uint64_t npages = (uint64_t)c->a[3];
	size_t len = (size_t)(npages ? npages : 1) * PAGE_SIZE;
	void *buf;
	int ret;

	memset(cmd, 0, sizeof(*cmd));
	if (fd < 0)
		return -EBADF;
	buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED)
		return -errno;
	if (fill)
		fill_pattern(buf, npages, c->a[4], (uint64_t)c->a[2] * WORDS);
	cmd->addr = region_addr(c->a[1], c->a[2]);
	cmd->ptr = (uint64_t)(uintptr_t)buf;
	cmd->npages = npages;
	ret = dmirror_ioctl(fd, nr, cmd);
	if (!ret && use == USE_CRC)
		*crc = crc32_update(0, buf, npages * PAGE_SIZE);
	if (!ret && use == USE_PROT) {
		static const char hex[] = "0123456789abcdef";
		const unsigned char *b = buf;
		char *s = xcalloc(npages * 2 + 3, 1);

		s[0] = '"';
		for (uint64_t i = 0; i < npages; i++) {
			s[1 + 2 * i] = hex[b[i] >> 4];
			s[2 + 2 * i] = hex[b[i] & 15];
		}
		s[1 + 2 * npages] = '"';
		*prot = s;
	}
	munmap(buf, len);
	return ret;
}

static void op_device(const struct cmd *c)
{
	struct hmm_dmirror_cmd cmd;
	uint32_t crc = 0;
	char *prot = NULL;
	struct rec *r;
	int ret;

	switch (c->op) {
	case OP_DREAD:
	case OP_DREAD_UNLOCKED:
		ret = buffer_ioctl(c, c->op == OP_DREAD ? DMIRROR_READ : DMIRROR_READ_UNLOCKED, 0, USE_CRC,
				   &cmd, &crc, NULL);
		r = out(c);
		rec_int(r, "ret", ret);
		if (!ret) {
			rec_int(r, "cpages", (int64_t)cmd.cpages);
			rec_int(r, "faults", (int64_t)cmd.faults);
			rec_int(r, "crc", crc);
		}
		break;
	case OP_DWRITE:
		ret = buffer_ioctl(c, DMIRROR_WRITE, 1, USE_NONE, &cmd, NULL, NULL);
		r = out(c);
		rec_int(r, "ret", ret);
		if (!ret) {
			rec_int(r, "cpages", (int64_t)cmd.cpages);
			rec_int(r, "faults", (int64_t)cmd.faults);
		}
		break;
	case OP_DMIGRATE:
	case OP_DEXCLUSIVE:
		ret = buffer_ioctl(c, c->op == OP_DMIGRATE ? DMIRROR_MIGRATE_TO_DEV : DMIRROR_EXCLUSIVE, 0,
				   USE_CRC, &cmd, &crc, NULL);
		r = out(c);
		rec_int(r, "ret", ret);
		if (!ret) {
			rec_int(r, "cpages", (int64_t)cmd.cpages);
			rec_int(r, "crc", crc);
		}
		break;
	case OP_DMIGRATE_SYS:
		ret = buffer_ioctl(c, DMIRROR_MIGRATE_TO_SYS, 0, USE_NONE, &cmd, NULL, NULL);
		r = out(c);
		rec_int(r, "ret", ret);
		if (!ret)
			rec_int(r, "cpages", (int64_t)cmd.cpages);
		break;
	case OP_DSNAPSHOT:
		ret = buffer_ioctl(c, DMIRROR_SNAPSHOT, 0, USE_PROT, &cmd, NULL, &prot);
		r = out(c);
		rec_int(r, "ret", ret);
		if (!ret) {
			rec_int(r, "cpages", (int64_t)cmd.cpages);
			rec_raw(r, "prot", prot);
		}
		break;
	default: {
		/* no buffer: ptr is NULL (CHECK_EXCLUSIVE, RELEASE, FLAGS) */
		int fd = st.handles[c->a[0]];

		memset(&cmd, 0, sizeof(cmd));
		if (c->op == OP_DCHECK_EXCLUSIVE) {
			cmd.addr = region_addr(c->a[1], c->a[2]);
			cmd.npages = (uint64_t)c->a[3];
		} else {
			cmd.npages = c->op == OP_DRELEASE ? 1 : (uint64_t)c->a[1];
		}
		ret = fd < 0 ? -EBADF :
		      dmirror_ioctl(fd, c->op == OP_DCHECK_EXCLUSIVE ? DMIRROR_CHECK_EXCLUSIVE :
					c->op == OP_DRELEASE ? DMIRROR_RELEASE : DMIRROR_FLAGS, &cmd);
		r = out(c);
		rec_int(r, "ret", ret);
	}
	}
	rec_emit(r);
	free(prot);
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
