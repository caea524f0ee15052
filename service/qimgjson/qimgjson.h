/* qimgjson.h: the JSON of qemu-img's machine output (`info --output=json`, its
 * snapshot and bitmap lists, `check --output=json`) for images of the engine. */
#ifndef QCOWD_QIMGJSON_H
#define QCOWD_QIMGJSON_H

#include <jansson.h>

#include "qcow2.h"

/* One library for qcowimg and the daemon, so the two cannot drift apart: keys,
 * types and which keys appear when are qemu-img's (7.2), and so is the order of
 * the keys, so qcowimg's text can be diffed with qemu-img's. Strings from an
 * image or a command line that are not valid UTF-8 are shown as qemu-img shows
 * them (each bad sequence as U+FFFD). Every function returns a new reference, or
 * NULL when out of memory; they read lists through the engine's thread-safe
 * listings, so they may run beside snapshot jobs and bitmap changes. */

/* Shapes of the info object. */
enum qj_flags {
    /* The REST shape: "snapshots" and format-specific "bitmaps" present even when
     * empty, and "lazy-refcounts", "corrupt" and "extended-l2" even for compat
     * 0.10 (where they are false), so a client meets one shape whatever the image.
     * qemu-img leaves them out; nothing else differs. */
    QJ_ALWAYS_LISTED = 1u << 0,
};

struct qj_info_opts {
    const char *filename; /* "filename": the image as the user named it; relative backing
                             names are joined to its folder for "full-backing-filename" */
    unsigned flags;       /* enum qj_flags */
    json_t *snapshots;    /* taken: shown as "snapshots" instead of the image's list
                             (e.g. an empty array to stream the list into), or NULL */
};

/* qemu-img info's object for img (the top layer only; callers walk the chain). */
json_t *qj_info(struct qcow2_image *img, const struct qj_info_opts *o);

/* One entry of the snapshot list, and img's list (an array, empty for raw). */
json_t *qj_snapshot(const struct qcow2_snapshot_info *s);
json_t *qj_snapshots(struct qcow2_image *img);

/* One bitmap as format-specific "bitmaps" shows it, and img's list (an array). */
json_t *qj_bitmap(const struct qcow2_bitmap_info *b);
json_t *qj_bitmaps(struct qcow2_image *img);

/* qemu-img check's report: filename as the user named the image; counters that
 * are 0 left out, except "check-errors". */
json_t *qj_check(const char *filename, const struct qcow2_check_result *r);

/* A JSON string of s as qemu-img prints it: valid UTF-8 as it is, each invalid
 * sequence (a stray or truncated one, an overlong form, a surrogate, a
 * noncharacter, beyond U+10FFFF) as U+FFFD. */
json_t *qj_str(const char *s);

/* The backing file's name as qemu-img shows it in "full-backing-filename" and
 * `info --backing-chain`: backing joined to the folder of given unless it is
 * absolute or given has no folder. A new string (free()), NULL when out of memory. */
char *qj_full_backing_name(const char *given, const char *backing);

#endif
