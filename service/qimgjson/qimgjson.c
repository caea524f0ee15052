/* qimgjson.c: qemu-img's JSON (info, snapshot and bitmap lists, check) built in
 * one place for qcowimg and the daemon; keys in qemu-img's order. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qimgjson.h"

/* ---- strings ---- */

/* The code point at s (n bytes, n >= 1) read as qemu-img's JSON writer reads
 * it, or -1 for a sequence it shows as U+FFFD; *used: the bytes it spans (a
 * broken multi-byte sequence spans its lead and the continuation bytes before
 * the break). "\xC0\x80" is U+0000 (modified UTF-8). */
static int32_t next_code_point(const unsigned char *s, size_t n, size_t *used)
{
    static const uint32_t least[] = {0x80, 0x800, 0x10000, 0x200000, 0x4000000}; /* by length 2..6 */
    unsigned char lead = s[0];
    *used = 1;
    if (lead < 0x80)
        return lead;
    if (lead < 0xC0 || lead >= 0xFE) /* a continuation byte, or no UTF-8 byte at all */
        return -1;
    size_t len = 2;
    while (len < 6 && (lead & (0x80u >> len)))
        len++;
    uint32_t cp = lead & (0x7Fu >> len);
    for (size_t i = 1; i < len; i++) {
        if (i >= n || (s[i] & 0xC0) != 0x80)
            return -1;
        cp = cp << 6 | (s[i] & 0x3Fu);
        *used = i + 1;
    }
    bool surrogate = cp >= 0xD800 && cp <= 0xDFFF;
    bool nonchar = (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE;
    bool overlong = cp < least[len - 2] && !(cp == 0 && len == 2);
    return cp > 0x10FFFF || surrogate || nonchar || overlong ? -1 : (int32_t)cp;
}

json_t *qj_str(const char *s)
{
    size_t n = strlen(s), used;
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n && next_code_point(p + i, n - i, &used) > 0)
        i += used;
    if (i == n)
        return json_stringn(s, n);
    /* rebuild from the first odd sequence: U+FFFD is 3 bytes, at most 3 per byte */
    char *out = malloc(3 * n + 1);
    if (!out)
        return NULL;
    memcpy(out, s, i);
    size_t o = i;
    while (i < n) {
        int32_t cp = next_code_point(p + i, n - i, &used);
        if (cp < 0)
            o += (size_t)(memcpy(out + o, "\xEF\xBF\xBD", 3), 3);
        else if (cp == 0) /* "\xC0\x80" */
            out[o++] = '\0';
        else
            o += (size_t)(memcpy(out + o, p + i, used), used);
        i += used;
    }
    json_t *j = json_stringn(out, o);
    free(out);
    return j;
}

char *qj_full_backing_name(const char *given, const char *backing)
{
    const char *slash = strrchr(given, '/');
    if (backing[0] == '/' || !slash)
        return strdup(backing);
    char *out;
    if (asprintf(&out, "%.*s/%s", (int)(slash - given), given, backing) < 0)
        return NULL;
    return out;
}

/* ---- building objects ---- */

/* An object under construction: a failed put (out of memory) spoils it, and
 * done() then frees it and returns NULL, so callers put without checking. */
struct obj {
    json_t *o;
    bool bad;
};

static void put(struct obj *b, const char *key, json_t *v)
{
    if (!v || !b->o) {
        json_decref(v);
        b->bad = true;
    } else if (json_object_set_new(b->o, key, v) < 0) { /* it takes v even then */
        b->bad = true;
    }
}

static void put_int(struct obj *b, const char *key, uint64_t v)
{
    put(b, key, json_integer((json_int_t)v));
}

static void put_bool(struct obj *b, const char *key, bool v)
{
    put(b, key, json_boolean(v));
}

static json_t *done(struct obj *b)
{
    if (b->bad || !b->o) {
        json_decref(b->o);
        return NULL;
    }
    return b->o;
}

/* ---- snapshots and bitmaps ---- */

json_t *qj_snapshot(const struct qcow2_snapshot_info *s)
{
    struct obj b = {json_object(), false};
    if (s->icount != UINT64_MAX)
        put_int(&b, "icount", s->icount);
    put_int(&b, "vm-clock-nsec", s->vm_clock_nsec % 1000000000u);
    put(&b, "name", qj_str(s->name));
    put_int(&b, "date-sec", s->date_sec);
    put_int(&b, "date-nsec", s->date_nsec);
    put_int(&b, "vm-clock-sec", s->vm_clock_nsec / 1000000000u);
    put(&b, "id", qj_str(s->id));
    put_int(&b, "vm-state-size", s->vm_state_size);
    return done(&b);
}

/* Append one element (taken) to array a; false (a left as it is) on failure. */
static bool append(json_t *a, json_t *v)
{
    return v && json_array_append_new(a, v) == 0;
}

/* An array of one(e) for the n elements e of list (size bytes each); NULL when
 * out of memory. */
static json_t *array_of(const void *list, uint32_t n, size_t size, json_t *(*one)(const void *e))
{
    json_t *a = json_array();
    for (uint32_t i = 0; a && i < n; i++)
        if (!append(a, one((const char *)list + (size_t)i * size))) {
            json_decref(a);
            a = NULL;
        }
    return a;
}

static json_t *one_snapshot(const void *e)
{
    return qj_snapshot(e);
}

json_t *qj_snapshots(struct qcow2_image *img)
{
    struct qcow2_snapshot_info *list;
    uint32_t n;
    if (qcow2_snapshot_list(img, &list, &n) < 0)
        return NULL;
    json_t *a = array_of(list, n, sizeof *list, one_snapshot);
    qcow2_snapshot_list_free(list, n);
    return a;
}

json_t *qj_bitmap(const struct qcow2_bitmap_info *bm)
{
    json_t *flags = json_array();
    bool ok = flags != NULL;
    if (ok && bm->in_use)
        ok = append(flags, json_string("in-use"));
    if (ok && bm->auto_)
        ok = append(flags, json_string("auto"));
    struct obj b = {json_object(), !ok};
    put(&b, "flags", flags);
    put(&b, "name", qj_str(bm->name));
    put_int(&b, "granularity", bm->granularity);
    return done(&b);
}

static json_t *one_bitmap(const void *e)
{
    return qj_bitmap(e);
}

json_t *qj_bitmaps(struct qcow2_image *img)
{
    struct qcow2_bitmap_info *list;
    uint32_t n;
    if (qcow2_bitmap_list(img, &list, &n) < 0)
        return NULL;
    json_t *a = array_of(list, n, sizeof *list, one_bitmap);
    qcow2_bitmap_list_free(list, n);
    return a;
}

/* ---- info ---- */

/* qemu's name of a LUKS cipher: the algorithm and its key bits (xts keys are two
 * keys, the cipher's and the tweak's). */
static json_t *luks_cipher(const struct qcow2_luks_info *l, const char *mode)
{
    uint32_t bits = l->key_bytes * 8 / (strcmp(mode, "xts") ? 1 : 2);
    if (!strcmp(l->cipher_name, "sm4"))
        return json_string("sm4");
    char name[64];
    snprintf(name, sizeof name, "%s-%u", l->cipher_name, bits);
    return qj_str(name);
}

/* "encrypt" of format-specific: the format, and for LUKS its header's fields as
 * qemu-img shows them ("xts-plain64" is the mode xts with the IV generator
 * plain64, "cbc-essiv:sha256" the mode cbc with essiv over sha256). */
static json_t *encrypt_info(const struct qcow2_info *in)
{
    const struct qcow2_luks_info *l = in->luks;
    if (in->crypt_method != 2 || !l)
        return json_pack("{s:s}", "format", in->crypt_method == 2 ? "luks" : "aes");
    char mode[33], *ivgen = NULL, *ivhash = NULL;
    snprintf(mode, sizeof mode, "%s", l->cipher_mode);
    if ((ivgen = strchr(mode, '-')))
        *ivgen++ = '\0';
    if (ivgen && (ivhash = strchr(ivgen, ':')))
        *ivhash++ = '\0';
    struct obj b = {json_object(), false};
    if (ivgen)
        put(&b, "ivgen-alg", qj_str(ivgen));
    put(&b, "hash-alg", qj_str(l->hash_spec));
    put(&b, "cipher-alg", luks_cipher(l, mode));
    put(&b, "uuid", qj_str(l->uuid));
    if (ivhash)
        put(&b, "ivgen-hash-alg", qj_str(ivhash));
    put(&b, "format", json_string("luks"));
    put(&b, "cipher-mode", qj_str(mode));
    json_t *slots = json_array();
    for (unsigned i = 0; slots && i < QCOW2_LUKS_SLOTS; i++) {
        struct obj sl = {json_object(), false};
        put_bool(&sl, "active", l->slots[i].active);
        if (l->slots[i].active)
            put_int(&sl, "iters", l->slots[i].iterations);
        put_int(&sl, "key-offset", (uint64_t)l->slots[i].key_offset * 512);
        if (l->slots[i].active)
            put_int(&sl, "stripes", l->slots[i].stripes);
        if (!append(slots, done(&sl))) {
            json_decref(slots);
            slots = NULL;
        }
    }
    put(&b, "slots", slots);
    put_int(&b, "payload-offset", (uint64_t)l->payload_offset * 512);
    put_int(&b, "master-key-iters", l->mk_iterations);
    return done(&b);
}

/* "format-specific" of a qcow2 image; listed: as enum qj_flags says. */
static json_t *format_specific(struct qcow2_image *img, const struct qcow2_info *in, bool listed)
{
    bool v3 = in->version >= 3;
    struct obj d = {json_object(), false};
    put(&d, "compat", json_string(v3 ? "1.1" : "0.10"));
    put(&d, "compression-type", json_string(in->compression));
    if (v3 || listed)
        put_bool(&d, "lazy-refcounts", in->lazy_refcounts);
    json_t *bitmaps = qj_bitmaps(img); /* a copy: bitmaps may change meanwhile */
    if (!bitmaps)
        d.bad = true;
    else if (json_array_size(bitmaps) || listed)
        put(&d, "bitmaps", json_incref(bitmaps));
    json_decref(bitmaps);
    put_int(&d, "refcount-bits", in->refcount_bits);
    if (in->data_file) {
        put(&d, "data-file", qj_str(in->data_file));
        put_bool(&d, "data-file-raw", in->data_file_raw);
    }
    if (in->crypt_method)
        put(&d, "encrypt", encrypt_info(in));
    if (v3 || listed) {
        put_bool(&d, "corrupt", in->corrupt);
        put_bool(&d, "extended-l2", in->extended_l2);
    }
    struct obj fs = {json_object(), false};
    put(&fs, "type", json_string("qcow2"));
    put(&fs, "data", done(&d));
    return done(&fs);
}

json_t *qj_info(struct qcow2_image *img, const struct qj_info_opts *opts)
{
    const struct qcow2_info *in = qcow2_get_info(img);
    bool qcow2 = in->format == QCOW2_FMT_QCOW2, listed = opts->flags & QJ_ALWAYS_LISTED;
    struct obj b = {json_object(), false};
    json_t *snaps = opts->snapshots;
    if (qcow2 && snaps)
        put(&b, "snapshots", snaps);
    else if (qcow2) {
        snaps = qj_snapshots(img);
        if (snaps && (json_array_size(snaps) || listed))
            put(&b, "snapshots", snaps);
        else if (snaps)
            json_decref(snaps);
        else
            b.bad = true;
    } else
        json_decref(snaps);
    if (qcow2 && in->backing_format)
        put(&b, "backing-filename-format", qj_str(in->backing_format));
    put_int(&b, "virtual-size", in->virtual_size);
    put(&b, "filename", qj_str(opts->filename));
    if (qcow2)
        put_int(&b, "cluster-size", in->cluster_size);
    put(&b, "format", json_string(qcow2 ? "qcow2" : "raw"));
    uint64_t allocated; /* now, not at the open: writes grow it */
    if (qcow2_file_allocated(img, &allocated) < 0)
        allocated = in->file_allocated;
    put_int(&b, "actual-size", allocated);
    if (qcow2)
        put(&b, "format-specific", format_specific(img, in, listed));
    if (qcow2 && in->backing_file) {
        char *full = qj_full_backing_name(opts->filename, in->backing_file);
        put(&b, "full-backing-filename", full ? qj_str(full) : NULL);
        free(full);
    }
    if (qcow2 && in->crypt_method)
        put_bool(&b, "encrypted", true);
    if (qcow2 && in->backing_file)
        put(&b, "backing-filename", qj_str(in->backing_file));
    put_bool(&b, "dirty-flag", qcow2 && in->dirty);
    return done(&b);
}

/* ---- check ---- */

json_t *qj_check(const char *filename, const struct qcow2_check_result *r)
{
    struct obj b = {json_object(), false};
    const struct {
        const char *key;
        uint64_t v;
    } counters[] = {
        {"image-end-offset", r->image_end_offset},
        {"compressed-clusters", r->compressed_clusters},
        {"total-clusters", r->total_clusters},
        {"corruptions", r->corruptions},
        {"corruptions-fixed", r->corruptions_fixed},
        {"check-errors", 0}, /* always, in its place */
        {"leaks", r->leaks},
        {"leaks-fixed", r->leaks_fixed},
        {"allocated-clusters", r->allocated_clusters},
    };
    for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++) {
        if (!strcmp(counters[i].key, "check-errors"))
            put_int(&b, "check-errors", r->check_errors);
        else if (counters[i].v)
            put_int(&b, counters[i].key, counters[i].v);
    }
    put(&b, "filename", qj_str(filename));
    put(&b, "format", json_string("qcow2"));
    if (r->fragmented_clusters)
        put_int(&b, "fragmented-clusters", r->fragmented_clusters);
    return done(&b);
}
