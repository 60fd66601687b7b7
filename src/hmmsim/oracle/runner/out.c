// SPDX-License-Identifier: GPL-2.0-only
/*
 * hmmsim-runner: output records and the CRC.
 *
 * A record is printed as one JSON object on one line, keys sorted, no spaces, written
 * with a single write() so that the lines of a scenario's processes (parent, fork
 * children, the supervisor) never mix. Strings are escaped as Python's json.dumps does
 * (ensure_ascii): \" \\ \n \r \t \b \f, other controls and non-ASCII as \uXXXX.
 * crc is zlib's CRC-32 (reflected polynomial 0xEDB88320), computed eight bytes a step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runner.h"

#define REC_MAX 16

struct field {
	const char *key;
	char *text;	/* the JSON value */
	int owned;
};

struct rec {
	int n;
	struct field f[REC_MAX];
};

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		static const char msg[] = "hmmsim-runner: out of memory\n";
		write_all(2, msg, sizeof(msg) - 1);
		_exit(EXIT_INTERNAL);
	}
	return p;
}

struct rec *rec_new(void)
{
	struct rec *r = xmalloc(sizeof(*r));

	r->n = 0;
	return r;
}

static void rec_add(struct rec *r, const char *key, char *text, int owned)
{
	if (r->n == REC_MAX)
		abort();
	r->f[r->n].key = key;
	r->f[r->n].text = text;
	r->f[r->n].owned = owned;
	r->n++;
}

void rec_int(struct rec *r, const char *key, int64_t v)
{
	char *t = xmalloc(24);

	snprintf(t, 24, "%lld", (long long)v);
	rec_add(r, key, t, 1);
}

void rec_raw(struct rec *r, const char *key, const char *json)
{
	rec_add(r, key, (char *)json, 0);
}

/* Decode one UTF-8 sequence at s (valid or not); returns its length, *cp the code point
 * (U+FFFD for a bad byte). */
static size_t utf8_decode(const unsigned char *s, size_t left, unsigned *cp)
{
	unsigned c = s[0];
	size_t n, i;

	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
	if (!n || n > left)
		goto bad;
	*cp = c & (0x7F >> n);
	for (i = 1; i < n; i++) {
		if ((s[i] & 0xC0) != 0x80)
			goto bad;
		*cp = (*cp << 6) | (s[i] & 0x3F);
	}
	return n;
bad:
	*cp = 0xFFFD;
	return 1;
}

void rec_str(struct rec *r, const char *key, const char *v)
{
	size_t len = strlen(v), i = 0, o = 0;
	char *t = xmalloc(len * 12 + 3);

	t[o++] = '"';
	while (i < len) {
		unsigned char c = (unsigned char)v[i];
		unsigned cp;

		if (c == '"' || c == '\\') {
			t[o++] = '\\';
			t[o++] = (char)c;
			i++;
		} else if (c >= 0x20 && c < 0x7F) {
			t[o++] = (char)c;
			i++;
		} else if (c == '\n' || c == '\r' || c == '\t' || c == '\b' || c == '\f') {
			t[o++] = '\\';
			t[o++] = c == '\n' ? 'n' : c == '\r' ? 'r' : c == '\t' ? 't' : c == '\b' ? 'b' : 'f';
			i++;
		} else {
			i += utf8_decode((const unsigned char *)v + i, len - i, &cp);
			if (cp >= 0x10000) {
				cp -= 0x10000;
				o += (size_t)sprintf(t + o, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
			} else {
				o += (size_t)sprintf(t + o, "\\u%04x", cp);
			}
		}
	}
	t[o++] = '"';
	t[o] = 0;
	rec_add(r, key, t, 1);
}

static int field_cmp(const void *a, const void *b)
{
	return strcmp(((const struct field *)a)->key, ((const struct field *)b)->key);
}

void write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t w = write(fd, buf, len);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += w;
		len -= (size_t)w;
	}
}

void rec_emit(struct rec *r)
{
	size_t len = 3, o = 0;
	char *line;
	int i;

	qsort(r->f, (size_t)r->n, sizeof(r->f[0]), field_cmp);
	for (i = 0; i < r->n; i++)
		len += strlen(r->f[i].key) + strlen(r->f[i].text) + 4;
	line = xmalloc(len);
	line[o++] = '{';
	for (i = 0; i < r->n; i++) {
		size_t kl = strlen(r->f[i].key), tl = strlen(r->f[i].text);

		if (i)
			line[o++] = ',';
		line[o++] = '"';
		memcpy(line + o, r->f[i].key, kl);
		o += kl;
		line[o++] = '"';
		line[o++] = ':';
		memcpy(line + o, r->f[i].text, tl);
		o += tl;
		if (r->f[i].owned)
			free(r->f[i].text);
	}
	line[o++] = '}';
	line[o++] = '\n';
	write_all(1, line, o);
	free(line);
	free(r);
}

/* zlib's CRC-32, slicing by 8 */
static uint32_t crc_table[8][256];

static void crc_init(void)
{
	uint32_t c;
	int n, k;

	for (n = 0; n < 256; n++) {
		c = (uint32_t)n;
		for (k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[0][n] = c;
	}
	for (n = 0; n < 256; n++) {
		c = crc_table[0][n];
		for (k = 1; k < 8; k++) {
			c = crc_table[0][c & 0xFF] ^ (c >> 8);
			crc_table[k][n] = c;
		}
	}
}

uint32_t crc32_update(uint32_t crc, const void *buf, size_t len)
{
	const unsigned char *p = buf;

	if (!crc_table[0][1])
		crc_init();
	crc = ~crc;
	while (len && ((uintptr_t)p & 7)) {
		crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
		len--;
	}
	while (len >= 8) {
		uint64_t w;

		memcpy(&w, p, 8);	/* little-endian x86 */
		w ^= crc;
		crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
		      crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
		      crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
		      crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
	return ~crc;
}
