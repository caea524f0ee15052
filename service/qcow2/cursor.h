/* cursor.h: one bounds-checked cursor over a buffer read from disk, through
 * which every variable-length on-disk structure (tables, extensions) is parsed. */
#ifndef QCOWD_QCOW2_CURSOR_H
#define QCOWD_QCOW2_CURSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A window [buf, buf+len) and the position of the next byte to take. Every step
 * checks what remains before it moves; a step that does not fit fails, leaves
 * the position where it was and sets `failed` (sticky), so a parser may take
 * several fields and test once. No pointer arithmetic on the buffer happens
 * outside these helpers. */
struct cursor {
    const unsigned char *buf;
    size_t len;   /* bytes in the window */
    size_t pos;   /* 0 <= pos <= len */
    bool failed;  /* some step did not fit */
};

static inline struct cursor cur_init(const void *buf, size_t len)
{
    return (struct cursor){.buf = (const unsigned char *)buf, .len = len, .pos = 0, .failed = false};
}

/* Bytes left after the position. */
static inline size_t cur_remaining(const struct cursor *c)
{
    return c->len - c->pos;
}

/* Offset of the position from the start of the window. */
static inline size_t cur_pos(const struct cursor *c)
{
    return c->pos;
}

/* The next n bytes (borrowed from the buffer), stepping past them; NULL when
 * fewer than n remain. */
static inline const unsigned char *cur_take(struct cursor *c, size_t n)
{
    if (n > c->len - c->pos) {
        c->failed = true;
        return NULL;
    }
    const unsigned char *p = c->buf + c->pos;
    c->pos += n;
    return p;
}

/* Step past n bytes; false when fewer remain. */
static inline bool cur_skip(struct cursor *c, uint64_t n)
{
    if (n > c->len - c->pos) {
        c->failed = true;
        return false;
    }
    c->pos += (size_t)n;
    return true;
}

/* A cursor over the next n bytes, stepping past them in c; false (and *sub
 * empty and failed) when fewer remain. */
static inline bool cur_sub(struct cursor *c, uint64_t n, struct cursor *sub)
{
    if (n > c->len - c->pos) {
        c->failed = true;
        *sub = (struct cursor){.buf = c->buf, .len = 0, .pos = 0, .failed = true};
        return false;
    }
    *sub = cur_init(c->buf + c->pos, (size_t)n);
    c->pos += (size_t)n;
    return true;
}

/* Step to the next multiple of align (a power of two) from the window's start;
 * false when the padding is not all there. */
static inline bool cur_align(struct cursor *c, size_t align)
{
    size_t pad = (align - (c->pos & (align - 1))) & (align - 1);
    return cur_skip(c, pad);
}

/* Like cur_align, but padding that is missing at the very end of the window is
 * fine (the window then ends): for the last entry of a table whose writer left
 * its padding out. */
static inline bool cur_align_or_end(struct cursor *c, size_t align)
{
    size_t pad = (align - (c->pos & (align - 1))) & (align - 1);
    if (pad > c->len - c->pos) {
        c->pos = c->len;
        return true;
    }
    c->pos += pad;
    return true;
}

/* Big-endian fields; 0 (and failed set) when they do not fit. */
static inline uint64_t cur_be(struct cursor *c, unsigned n)
{
    const unsigned char *p = cur_take(c, n);
    uint64_t v = 0;
    for (unsigned i = 0; p && i < n; i++)
        v = v << 8 | p[i];
    return v;
}
static inline uint8_t cur_u8(struct cursor *c)
{
    return (uint8_t)cur_be(c, 1);
}
static inline uint16_t cur_be16(struct cursor *c)
{
    return (uint16_t)cur_be(c, 2);
}
static inline uint32_t cur_be32(struct cursor *c)
{
    return (uint32_t)cur_be(c, 4);
}
static inline uint64_t cur_be64(struct cursor *c)
{
    return cur_be(c, 8);
}

#endif
