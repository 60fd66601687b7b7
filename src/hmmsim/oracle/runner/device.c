// SPDX-License-Identifier: GPL-2.0-only
/*
 * hmmsim-runner: the device commands (test_hmm's /dev/hmm_dmirrorN) and uffd.
 *
 * - Device commands use a fresh private anonymous MAP_POPULATE buffer of NPAGES pages
 *   (one if NPAGES is 0), unmapped afterwards (conventions item 19); ioctls are retried on
 *   EINTR. The ioctl numbers and struct are test_hmm's (lib/test_hmm_uapi.h, the same in
 *   6.12 and 7.3): a kernel that does not know a request answers as its driver does
 *   (-EINVAL for FLAGS and READ_UNLOCKED on 6.12, for dmigrate_on_fault's
 *   MIGRATE_ON_FAULT_TO_DEV, 0x0A, on both). CHECK_EXCLUSIVE, RELEASE (addr 0,
 *   npages 1) and FLAGS (addr 0, npages VALUE) pass no buffer.
 * - open reports a missing device (ENOENT, ENXIO, ENODEV) as -ENODEV; a closed or failed
 *   handle is -EBADF for every later command.
 * - uffd registers the pages with a new userfaultfd (MISSING mode) and starts a thread
 *   answering every fault with UFFDIO_COPY of the page of pattern SEED (counted from the
 *   region's start); a failed COPY is ignored.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "runner.h"

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
	DMIRROR_MIGRATE_ON_FAULT_TO_DEV = 10,	/* the unified fault+migrate walk series (not upstream) */
};

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

void op_uffd(const struct cmd *c)
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

void op_open(const struct cmd *c)
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

void op_close(const struct cmd *c)
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

void op_device(const struct cmd *c)
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
	case OP_DMIGRATE_ON_FAULT:
	case OP_DEXCLUSIVE:
		ret = buffer_ioctl(c, c->op == OP_DMIGRATE ? DMIRROR_MIGRATE_TO_DEV :
				   c->op == OP_DMIGRATE_ON_FAULT ? DMIRROR_MIGRATE_ON_FAULT_TO_DEV : DMIRROR_EXCLUSIVE,
				   0, USE_CRC, &cmd, &crc, NULL);
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
