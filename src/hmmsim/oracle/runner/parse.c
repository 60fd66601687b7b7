// SPDX-License-Identifier: GPL-2.0-only
/*
 * hmmsim-runner: the parser of the scenario language (docs/scenario.md and
 * docs/scenario-conventions.md sections 2 and 3), the same rules as hmmsim's
 * src/hmmsim/scenario/parse.py:
 *
 * - Lines are split on '\n' only (a file has as many lines as '\n', plus one if text
 *   follows the last). A NUL byte anywhere in a line is an error on that line; then one
 *   trailing '\r' is dropped; the line must be valid UTF-8 (strict, comments included);
 *   '#' starts a comment; tokens are separated by spaces and tabs only.
 * - The first offending line is reported; after it, lines of exactly "fork"/"endfork"
 *   are still matched, so that a fork left open before the error is reported instead
 *   (the outermost one). A missing header with no command line reports lines + 1.
 * - Names are checked statically in text order with fork scoping: a command naming
 *   something undefined parses, marked unknown; it defines what it defines after its
 *   uses are checked.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "runner.h"

const char *const op_names[OP_COUNT] = {
	[OP_MMAP] = "mmap", [OP_MUNMAP] = "munmap", [OP_MPROTECT] = "mprotect",
	[OP_MADVISE] = "madvise", [OP_MREMAP] = "mremap", [OP_FILL] = "fill",
	[OP_TOUCH] = "touch", [OP_READ] = "read", [OP_CHECK] = "check", [OP_FILE] = "file",
	[OP_PWRITE] = "pwrite", [OP_PREAD] = "pread", [OP_OPEN] = "open", [OP_CLOSE] = "close",
	[OP_DREAD] = "dread", [OP_DREAD_UNLOCKED] = "dread_unlocked", [OP_DWRITE] = "dwrite",
	[OP_DMIGRATE] = "dmigrate", [OP_DMIGRATE_ON_FAULT] = "dmigrate_on_fault",
	[OP_DMIGRATE_SYS] = "dmigrate_sys",
	[OP_DSNAPSHOT] = "dsnapshot", [OP_DEXCLUSIVE] = "dexclusive",
	[OP_DCHECK_EXCLUSIVE] = "dcheck_exclusive", [OP_DRELEASE] = "drelease",
	[OP_DFLAGS] = "dflags", [OP_UFFD] = "uffd", [OP_FORK] = "fork", [OP_ENDFORK] = "endfork",
};

/*
 * Operand kinds of the fixed-arity commands: R/F/H use a region/file/handle, f/h define
 * a file/handle, C count (OFF, NPAGES), D device, V dflags value, S seed, P prot,
 * A advice. mmap and mremap are parsed on their own.
 */
static const char *const signatures[OP_COUNT] = {
	[OP_MUNMAP] = "RCC", [OP_MPROTECT] = "RCCP", [OP_MADVISE] = "RCCA", [OP_FILL] = "RCCS",
	[OP_TOUCH] = "RCC", [OP_READ] = "RCC", [OP_CHECK] = "RCCS", [OP_FILE] = "fC",
	[OP_PWRITE] = "FCCS", [OP_PREAD] = "FCC", [OP_OPEN] = "hD", [OP_CLOSE] = "H",
	[OP_DRELEASE] = "H", [OP_DFLAGS] = "HV", [OP_DREAD] = "HRCC", [OP_DREAD_UNLOCKED] = "HRCC",
	[OP_UFFD] = "RCCS", [OP_DWRITE] = "HRCCS", [OP_DMIGRATE] = "HRCC", [OP_DMIGRATE_ON_FAULT] = "HRCC",
	[OP_DMIGRATE_SYS] = "HRCC", [OP_DSNAPSHOT] = "HRCC", [OP_DEXCLUSIVE] = "HRCC",
	[OP_DCHECK_EXCLUSIVE] = "HRCC",
};

/* prot and advice words, as their index (exec.c maps them) */
static const char *const prots[] = { "none", "r", "rw", NULL };
static const char *const advices[] = { "hugepage", "nohugepage", "dontneed", "free", NULL };

#define MAX_COUNT (1LL << 22)
#define MAX_DEV (1LL << 20)
#define MAX_VALUE (1LL << 40)
#define MAX_ALIGN 262144
#define MAX_TOKENS 8

struct symtab {
	char **names;
	int n, cap;
};

struct parser {
	struct symtab syms[NS_COUNT];
	unsigned char *defined[NS_COUNT];	/* per symbol: bound in the current scope */
	int dcap[NS_COUNT];
	/* open forks: their line, command index and saved scope */
	struct open_fork {
		int line, index;
		unsigned char *saved[NS_COUNT];
		int nsaved[NS_COUNT];
	} *forks;
	int nforks, fcap;
	struct cmd *cmds;
	int ncmds, ccap;
};

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		abort();
	return p;
}

static int intern(struct parser *p, enum ns ns, const char *name)
{
	struct symtab *t = &p->syms[ns];
	int i;

	for (i = 0; i < t->n; i++)
		if (!strcmp(t->names[i], name))
			return i;
	if (t->n == t->cap) {
		t->cap = t->cap ? 2 * t->cap : 16;
		t->names = xrealloc(t->names, (size_t)t->cap * sizeof(char *));
	}
	if (t->n >= p->dcap[ns]) {
		int old = p->dcap[ns];

		p->dcap[ns] = t->cap;
		p->defined[ns] = xrealloc(p->defined[ns], (size_t)p->dcap[ns]);
		memset(p->defined[ns] + old, 0, (size_t)(p->dcap[ns] - old));
	}
	t->names[t->n] = strdup(name);
	return t->n++;
}

/* Strict UTF-8 validation, as Python's decoder. */
static int utf8_valid(const unsigned char *s, size_t len)
{
	size_t i = 0;

	while (i < len) {
		unsigned char c = s[i];
		unsigned char lo = 0x80, hi = 0xBF;
		size_t n, k;

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
			n = 1;
		else if (c >= 0xE0 && c <= 0xEF)
			n = 2;
		else if (c >= 0xF0 && c <= 0xF4)
			n = 3;
		else
			return 0;
		if (c == 0xE0)
			lo = 0xA0;
		else if (c == 0xED)
			hi = 0x9F;
		else if (c == 0xF0)
			lo = 0x90;
		else if (c == 0xF4)
			hi = 0x8F;
		if (i + n >= len)
			return 0;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return 0;
		for (k = 2; k <= n; k++)
			if ((s[i + k] & 0xC0) != 0x80)
				return 0;
		i += n + 1;
	}
	return 1;
}

static int is_name(const char *t)
{
	if (!((*t >= 'A' && *t <= 'Z') || (*t >= 'a' && *t <= 'z') || *t == '_'))
		return 0;
	for (t++; *t; t++)
		if (!((*t >= 'A' && *t <= 'Z') || (*t >= 'a' && *t <= 'z') || (*t >= '0' && *t <= '9') ||
		      *t == '_'))
			return 0;
	return 1;
}

/* A decimal number in [lo, hi] (signed: an optional '-'); 0 on success. */
static int parse_number(const char *t, int signed_ok, int64_t lo, int64_t hi, int64_t *out)
{
	int neg = 0;
	uint64_t v = 0;

	if (signed_ok && *t == '-') {
		neg = 1;
		t++;
	}
	if (!*t)
		return -1;
	for (; *t; t++) {
		if (*t < '0' || *t > '9')
			return -1;
		if (v > (UINT64_MAX - 9) / 10)
			v = UINT64_MAX;	/* saturate: out of every range */
		else
			v = v * 10 + (uint64_t)(*t - '0');
	}
	if (neg) {
		if (v > (uint64_t)INT64_MAX + 1)
			return -1;
		*out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
	} else {
		if (v > (uint64_t)INT64_MAX)
			return -1;
		*out = (int64_t)v;
	}
	return *out < lo || *out > hi ? -1 : 0;
}

static int word_index(const char *t, const char *const *words)
{
	int i;

	for (i = 0; words[i]; i++)
		if (!strcmp(t, words[i]))
			return i;
	return -1;
}

/* A name use: its symbol id; *unknown set if not bound in the current scope. */
static int use_name(struct parser *p, enum ns ns, const char *t, int *unknown)
{
	int id = intern(p, ns, t);

	if (!p->defined[ns][id])
		*unknown = 1;
	return id;
}

static int parse_flags(struct parser *p, char *t, struct cmd *c, int *unknown)
{
	char *parts[4];
	int n = 0;
	char *s = t, *comma, *eq;

	for (;;) {
		if (n == 4)
			return -1;
		parts[n++] = s;
		comma = strchr(s, ',');
		if (!comma)
			break;
		*comma = 0;
		s = comma + 1;
	}
	if (n != 2 && n != 3)
		return -1;
	if (!strcmp(parts[0], "private"))
		c->a[MM_SHARED] = 0;
	else if (!strcmp(parts[0], "shared"))
		c->a[MM_SHARED] = 1;
	else
		return -1;
	if (n == 3 && strcmp(parts[2], "hugetlb"))
		return -1;
	c->a[MM_HUGETLB] = n == 3;
	if (!strcmp(parts[1], "anon")) {
		c->a[MM_BACKING] = BACK_ANON;
		c->a[MM_BNAME] = -1;
		return 0;
	}
	eq = strchr(parts[1], '=');
	if (!eq)
		return -1;
	*eq = 0;
	if (!strcmp(parts[1], "file"))
		c->a[MM_BACKING] = BACK_FILE;
	else if (!strcmp(parts[1], "dev"))
		c->a[MM_BACKING] = BACK_DEV;
	else
		return -1;
	if (!is_name(eq + 1))
		return -1;
	c->a[MM_BNAME] = use_name(p, c->a[MM_BACKING] == BACK_FILE ? NS_FILE : NS_HANDLE, eq + 1, unknown);
	return 0;
}

static int parse_align(const char *t, int64_t *align)
{
	int64_t v;

	if (strncmp(t, "align=", 6) || !t[6])
		return -1;
	if (parse_number(t + 6, 0, 1, MAX_ALIGN, &v) || (v & (v - 1)))
		return -1;
	*align = v;
	return 0;
}

/* One command line (not fork/endfork) into c; 0 or -1 (a parse error). */
static int parse_command(struct parser *p, char **tok, int ntok, struct cmd *c)
{
	int unknown = 0, i;
	const char *sig;
	int def_ns = -1, def_id = -1;

	for (i = 0; i < OP_COUNT; i++)
		if (!strcmp(tok[0], op_names[i]))
			break;
	if (i == OP_COUNT || i == OP_FORK || i == OP_ENDFORK)
		return -1;
	c->op = (enum op)i;
	if (c->op == OP_MMAP) {
		if (ntok != 5 && ntok != 6)
			return -1;
		if (!is_name(tok[1]) || parse_number(tok[2], 0, 0, MAX_COUNT, &c->a[MM_NPAGES]))
			return -1;
		if ((c->a[MM_PROT] = word_index(tok[3], prots)) < 0)
			return -1;
		if (parse_flags(p, tok[4], c, &unknown))
			return -1;
		c->a[MM_ALIGN] = 1;
		if (ntok == 6 && parse_align(tok[5], &c->a[MM_ALIGN]))
			return -1;
		def_ns = NS_REGION;
		c->a[MM_NAME] = def_id = intern(p, NS_REGION, tok[1]);
	} else if (c->op == OP_MREMAP) {
		if ((ntok != 4 && ntok != 5) || (ntok == 5 && strcmp(tok[4], "dontunmap")))
			return -1;
		if (!is_name(tok[1]) || !is_name(tok[2]) || parse_number(tok[3], 0, 0, MAX_COUNT, &c->a[2]))
			return -1;
		c->a[0] = use_name(p, NS_REGION, tok[1], &unknown);
		def_ns = NS_REGION;
		c->a[1] = def_id = intern(p, NS_REGION, tok[2]);
		c->a[3] = ntok == 5;
	} else {
		sig = signatures[c->op];
		if ((int)strlen(sig) != ntok - 1)
			return -1;
		/* check every operand's syntax before touching the symbol tables */
		for (i = 0; sig[i]; i++) {
			const char *t = tok[i + 1];

			switch (sig[i]) {
			case 'R': case 'F': case 'H': case 'f': case 'h':
				if (!is_name(t))
					return -1;
				break;
			case 'C':
				if (parse_number(t, 0, 0, MAX_COUNT, &c->a[i]))
					return -1;
				break;
			case 'D':
				if (parse_number(t, 0, 0, MAX_DEV, &c->a[i]))
					return -1;
				break;
			case 'V':
				if (parse_number(t, 0, 0, MAX_VALUE, &c->a[i]))
					return -1;
				break;
			case 'S':
				if (parse_number(t, 1, INT64_MIN, INT64_MAX, &c->a[i]))
					return -1;
				break;
			case 'P':
				if ((c->a[i] = word_index(t, prots)) < 0)
					return -1;
				break;
			case 'A':
				if ((c->a[i] = word_index(t, advices)) < 0)
					return -1;
				break;
			}
		}
		for (i = 0; sig[i]; i++) {
			const char *t = tok[i + 1];

			switch (sig[i]) {
			case 'R':
				c->a[i] = use_name(p, NS_REGION, t, &unknown);
				break;
			case 'F':
				c->a[i] = use_name(p, NS_FILE, t, &unknown);
				break;
			case 'H':
				c->a[i] = use_name(p, NS_HANDLE, t, &unknown);
				break;
			case 'f':
				def_ns = NS_FILE;
				c->a[i] = def_id = intern(p, NS_FILE, t);
				break;
			case 'h':
				def_ns = NS_HANDLE;
				c->a[i] = def_id = intern(p, NS_HANDLE, t);
				break;
			}
		}
	}
	c->unknown = unknown;
	if (def_ns >= 0)
		p->defined[def_ns][def_id] = 1;
	return 0;
}

static struct cmd *new_cmd(struct parser *p)
{
	if (p->ncmds == p->ccap) {
		p->ccap = p->ccap ? 2 * p->ccap : 64;
		p->cmds = xrealloc(p->cmds, (size_t)p->ccap * sizeof(struct cmd));
	}
	memset(&p->cmds[p->ncmds], 0, sizeof(struct cmd));
	return &p->cmds[p->ncmds++];
}

static void push_fork(struct parser *p, int line, int save)
{
	struct open_fork *f;
	int ns;

	if (p->nforks == p->fcap) {
		p->fcap = p->fcap ? 2 * p->fcap : 16;
		p->forks = xrealloc(p->forks, (size_t)p->fcap * sizeof(*p->forks));
	}
	f = &p->forks[p->nforks++];
	f->line = line;
	f->index = save ? p->ncmds : -1;
	for (ns = 0; ns < NS_COUNT; ns++) {
		f->saved[ns] = NULL;
		f->nsaved[ns] = 0;
		if (save && p->syms[ns].n) {
			f->nsaved[ns] = p->syms[ns].n;
			f->saved[ns] = xrealloc(NULL, (size_t)p->syms[ns].n);
			memcpy(f->saved[ns], p->defined[ns], (size_t)p->syms[ns].n);
		}
	}
}

static void pop_fork(struct parser *p, int restore)
{
	struct open_fork *f = &p->forks[--p->nforks];
	int ns;

	for (ns = 0; ns < NS_COUNT; ns++) {
		if (restore) {
			memset(p->defined[ns], 0, (size_t)p->syms[ns].n);
			if (f->nsaved[ns])
				memcpy(p->defined[ns], f->saved[ns], (size_t)f->nsaved[ns]);
		}
		free(f->saved[ns]);
	}
}

static int tokenize(char *s, char **tok)
{
	int n = 0;

	for (;;) {
		while (*s == ' ' || *s == '\t')
			s++;
		if (!*s)
			return n;
		if (n == MAX_TOKENS)
			return n + 1;	/* too many for any command: a parse error */
		tok[n++] = s;
		while (*s && *s != ' ' && *s != '\t')
			s++;
		if (*s)
			*s++ = 0;
	}
}

int parse_scenario(const unsigned char *data, size_t len, struct scenario *sc, int *err_line)
{
	struct parser p;
	size_t pos = 0;
	int line = 0, error = 0, header = 0, ns;
	char *buf = NULL;
	size_t bcap = 0;

	memset(&p, 0, sizeof(p));
	while (pos < len) {
		const unsigned char *nl = memchr(data + pos, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - (data + pos)) : len - pos;
		char *tok[MAX_TOKENS + 1];
		int ntok;

		line++;
		if (n + 1 > bcap) {
			bcap = n + 1;
			buf = xrealloc(buf, bcap);
		}
		memcpy(buf, data + pos, n);
		buf[n] = 0;
		pos += n + 1;
		if (memchr(buf, 0, n)) {
			error = error ? error : line;
			continue;
		}
		if (n && buf[n - 1] == '\r')
			buf[--n] = 0;
		if (!utf8_valid((unsigned char *)buf, n)) {
			error = error ? error : line;
			continue;
		}
		if (strchr(buf, '#'))
			*strchr(buf, '#') = 0;
		ntok = tokenize(buf, tok);
		if (!ntok)
			continue;
		if (error) {
			/* only learn whether a fork before the error stays open */
			if (ntok == 1 && !strcmp(tok[0], "fork"))
				push_fork(&p, line, 0);
			else if (ntok == 1 && !strcmp(tok[0], "endfork") && p.nforks)
				pop_fork(&p, 0);
			continue;
		}
		if (!header) {
			if (ntok != 2 || strcmp(tok[0], "hmmsim-scenario") || strcmp(tok[1], "1"))
				error = line;
			header = 1;
			continue;
		}
		if (!strcmp(tok[0], "fork")) {
			struct cmd *c;

			if (ntok != 1) {
				error = line;
				continue;
			}
			push_fork(&p, line, 1);
			c = new_cmd(&p);
			c->line = line;
			c->op = OP_FORK;
		} else if (!strcmp(tok[0], "endfork")) {
			struct cmd *c;
			int fi;

			if (ntok != 1 || !p.nforks) {
				error = line;
				continue;
			}
			fi = p.forks[p.nforks - 1].index;
			pop_fork(&p, 1);
			c = new_cmd(&p);
			c->line = line;
			c->op = OP_ENDFORK;
			c->match = fi;
			p.cmds[fi].match = p.ncmds - 1;
		} else {
			struct cmd *c = new_cmd(&p);

			c->line = line;
			if (ntok > MAX_TOKENS || parse_command(&p, tok, ntok, c)) {
				p.ncmds--;
				error = line;
			}
		}
	}
	free(buf);
	if (p.nforks && (!error || p.forks[0].line < error))
		error = p.forks[0].line;
	if (!error && !header)
		error = line + 1;
	while (p.nforks)
		pop_fork(&p, 0);
	free(p.forks);
	for (ns = 0; ns < NS_COUNT; ns++) {
		int i;

		for (i = 0; i < p.syms[ns].n; i++)
			free(p.syms[ns].names[i]);
		free(p.syms[ns].names);
		free(p.defined[ns]);
		sc->nsyms[ns] = p.syms[ns].n;
	}
	sc->cmds = p.cmds;
	sc->ncmds = p.ncmds;
	if (error) {
		*err_line = error;
		free(p.cmds);
		sc->cmds = NULL;
		sc->ncmds = 0;
		return -1;
	}
	return 0;
}

void free_scenario(struct scenario *sc)
{
	free(sc->cmds);
	sc->cmds = NULL;
	sc->ncmds = 0;
}
