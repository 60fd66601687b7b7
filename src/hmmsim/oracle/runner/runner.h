/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * hmmsim-runner: runs hmmsim scenario files (docs/scenario.md, version 1, completed by
 * docs/scenario-conventions.md) on the running Linux kernel through test_hmm's
 * /dev/hmm_dmirror* devices, printing the JSON lines `hmmsim run` prints.
 *
 * Files: hmmsim-runner.c (command line, one supervised process per scenario file),
 * parse.c (the language), exec.c (the scenario: regions, CPU, files, fork), device.c
 * (test_hmm's device commands, uffd), out.c (JSON lines, CRC-32).
 */
#ifndef HMMSIM_RUNNER_H
#define HMMSIM_RUNNER_H

#include <stddef.h>
#include <stdint.h>

/* Exit statuses, as `hmmsim run` uses them (the largest over the files). */
enum {
	EXIT_OK = 0,
	EXIT_INTERNAL = 1,
	EXIT_USAGE = 2,
	EXIT_PARSE = 3,
	EXIT_UNKNOWN_NAME = 4,
	EXIT_TIMEOUT = 7,
};

enum op {
	OP_MMAP, OP_MUNMAP, OP_MPROTECT, OP_MADVISE, OP_MREMAP,
	OP_FILL, OP_TOUCH, OP_READ, OP_CHECK,
	OP_FILE, OP_PWRITE, OP_PREAD,
	OP_OPEN, OP_CLOSE, OP_DREAD, OP_DREAD_UNLOCKED, OP_DWRITE, OP_DMIGRATE, OP_DMIGRATE_ON_FAULT,
	OP_DMIGRATE_SYS,
	OP_DSNAPSHOT, OP_DEXCLUSIVE, OP_DCHECK_EXCLUSIVE, OP_DRELEASE, OP_DFLAGS,
	OP_UFFD,
	OP_FORK, OP_ENDFORK,
	OP_COUNT
};

/* Namespaces of names (conventions item 6). */
enum ns { NS_REGION, NS_FILE, NS_HANDLE, NS_COUNT };

/* mmap operands, in struct cmd.a[] */
enum { MM_NAME, MM_NPAGES, MM_PROT, MM_SHARED, MM_BACKING, MM_BNAME, MM_HUGETLB, MM_ALIGN };
enum { BACK_ANON, BACK_FILE, BACK_DEV };

#define CMD_MAXARGS 8

struct cmd {
	int line;
	enum op op;
	int unknown;		/* names something undefined (conventions item 7) */
	int match;		/* fork: index of its endfork; endfork: index of its fork */
	int64_t a[CMD_MAXARGS];	/* operands: numbers, or symbol ids for names */
};

struct scenario {
	struct cmd *cmds;
	int ncmds;
	int nsyms[NS_COUNT];	/* symbols per namespace (ids 0..nsyms-1) */
};

extern const char *const op_names[OP_COUNT];

/* parse.c: 0, or -1 with *err_line set (the line to report). */
int parse_scenario(const unsigned char *data, size_t len, struct scenario *sc, int *err_line);
void free_scenario(struct scenario *sc);

#define PAGE_SIZE 4096ULL
#define PAGE_SHIFT 12
#define WORDS (PAGE_SIZE / 4)

struct region {
	uint64_t start;
	uint64_t npages;
};

/* What one process of the scenario knows (a fork child has a copy): values by symbol id */
struct proc_state {
	const struct scenario *sc;
	struct region *regions;
	int *files;		/* fd, -1 if failed or closed */
	int *handles;		/* fd, -1 if failed or closed */
	uint64_t next_slot;
	int depth;		/* fork depth ("proc") */
};

extern struct proc_state st;

/* exec.c: run a parsed scenario in the calling process; returns its exit status. */
int run_scenario(const struct scenario *sc);
int khugepaged_sentinel(void);
void *xcalloc(size_t n, size_t size);
struct rec *out(const struct cmd *c);	/* a record with line, op (and proc) */
void out_ret(const struct cmd *c, int64_t ret);
void fill_pattern(void *buf, uint64_t npages, int64_t seed, uint64_t first_word);
uint64_t region_addr(int64_t name, int64_t off);
int64_t sys_ret(long r);

static inline uint32_t pattern_word(int64_t seed, uint64_t word)
{
	return (uint32_t)(uint64_t)seed + (uint32_t)word;
}

/* device.c */
void op_open(const struct cmd *c);
void op_close(const struct cmd *c);
void op_device(const struct cmd *c);
void op_uffd(const struct cmd *c);

/* out.c */
struct rec;
struct rec *rec_new(void);
void rec_int(struct rec *r, const char *key, int64_t v);
void rec_str(struct rec *r, const char *key, const char *v);	/* v is copied, JSON-escaped */
void rec_raw(struct rec *r, const char *key, const char *json);	/* already JSON (not copied) */
void rec_emit(struct rec *r);	/* print (keys sorted, no spaces) and free */
void write_all(int fd, const char *buf, size_t len);
uint32_t crc32_update(uint32_t crc, const void *buf, size_t len);

#endif
