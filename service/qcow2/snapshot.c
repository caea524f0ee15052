/* snapshot.c: the internal snapshot table: parsing, validating, and switching
 * an open image to a read-only view of one snapshot's L1 table. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

#define SNAP_FIXED 40u

static char *dup_str(const unsigned char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = 0;
    }
    return s;
}

void qcow2_free_snapshots(struct qcow2_image *img)
{
    for (uint32_t i = 0; i < img->nb_snaps; i++) {
        free(img->snaps[i].id);
        free(img->snaps[i].name);
    }
    free(img->snaps);
    img->snaps = NULL;
    img->nb_snaps = 0;
}

int qcow2_read_snapshots(struct qcow2_image *img)
{
    uint32_t n = img->h.nb_snapshots;
    if (!n)
        return 0;
    uint64_t off = img->h.snapshots_offset;
    /* qcow2_check_table put the start inside the file; for check (img->checking) it
     * may lie anywhere, and what is past the end reads as zeroes, as in qemu */
    uint64_t avail = off < img->file_size ? img->file_size - off : 0, have = avail;
    if (img->checking)
        avail = (uint64_t)n * (SNAP_FIXED + QCOW2_MAX_SNAPSHOT_EXTRA + 2 * UINT16_MAX + 7);
    uint64_t maxlen = avail < QCOW2_MAX_SNAPSHOT_TABLE ? avail : QCOW2_MAX_SNAPSHOT_TABLE;
    have = have < maxlen ? have : maxlen;
    unsigned char *buf = calloc(1, maxlen ? maxlen : 1);
    img->snaps = calloc(n, sizeof *img->snaps);
    int ret = 0;
    if (!buf || !img->snaps) {
        ret = err_fail(ENOMEM, "out of memory for %u snapshots", n);
        goto out;
    }
    ret = have ? vfs_pread(img->file, buf, have, off) : 0;
    if (ret < 0)
        goto out;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct qcow2_snapshot_info *s = &img->snaps[i];
        if (pos > maxlen || maxlen - pos < SNAP_FIXED) { /* the padded step may pass the end */
            ret = err_fail(EINVAL, "snapshot table is truncated at entry %u", i);
            goto out;
        }
        const unsigned char *e = buf + pos;
        s->l1_offset = be64_at(e);
        s->l1_size = be32_at(e + 8);
        uint16_t id_len = be16_at(e + 12), name_len = be16_at(e + 14);
        s->date_sec = be32_at(e + 16);
        s->date_nsec = be32_at(e + 20);
        s->vm_clock_nsec = be64_at(e + 24);
        s->vm_state_size = be32_at(e + 32);
        uint32_t extra = be32_at(e + 36);
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            ret = err_fail(EINVAL, "snapshot %u has %u bytes of extra data (limit %u)", i, extra,
                           QCOW2_MAX_SNAPSHOT_EXTRA);
            goto out;
        }
        /* the last entry's padding may be missing (QEMU writes none): check the
         * unpadded length, pad only when stepping to the next entry */
        uint64_t len = SNAP_FIXED + (uint64_t)extra + id_len + name_len;
        if (len > maxlen - pos) {
            ret = err_fail(EINVAL, "snapshot table entry %u runs past the end of the table", i);
            goto out;
        }
        s->disk_size = img->h.size;
        s->icount = UINT64_MAX;
        if (extra >= 8)
            s->vm_state_size = be64_at(e + 40);
        if (extra >= 16)
            s->disk_size = be64_at(e + 48);
        if (extra >= 24)
            s->icount = be64_at(e + 56);
        s->id = dup_str(e + SNAP_FIXED + extra, id_len);
        s->name = dup_str(e + SNAP_FIXED + extra + id_len, name_len);
        if (!s->id || !s->name) {
            ret = err_fail(ENOMEM, "out of memory");
            goto out;
        }
        img->nb_snaps = i + 1;
        char what[64];
        snprintf(what, sizeof what, "L1 table of snapshot %s", s->id);
        ret = qcow2_check_table(img, s->l1_offset, s->l1_size, 8, QCOW2_MAX_L1_BYTES, what);
        if (ret < 0 && !img->checking)
            goto out;
        ret = 0; /* opened for check, which counts a bad L1 table as qemu-img's check mode does */
        if (s->disk_size > (1ull << 62)) {
            ret = err_fail(EINVAL, "snapshot %s has a virtual size of %" PRIu64 ", too large", s->id, s->disk_size);
            goto out;
        }
        pos += (len + 7) & ~7ull;
    }
    img->snap_table_len = pos < maxlen ? pos : maxlen;
out:
    free(buf);
    if (ret < 0)
        qcow2_free_snapshots(img);
    return ret;
}

int qcow2_use_snapshot(struct qcow2_image *img, const char *name)
{
    const struct qcow2_snapshot_info *s = NULL;
    for (uint32_t i = 0; i < img->nb_snaps && !s; i++)
        if (!strcmp(img->snaps[i].id, name))
            s = &img->snaps[i];
    for (uint32_t i = 0; i < img->nb_snaps && !s; i++)
        if (!strcmp(img->snaps[i].name, name))
            s = &img->snaps[i];
    if (!s)
        return err_fail(ENOENT, "no snapshot named '%s'", name);
    uint64_t l2_span = (uint64_t)img->l2_entries << img->cluster_bits;
    uint64_t need = s->disk_size / l2_span + (s->disk_size % l2_span != 0);
    if (need > s->l1_size)
        return err_fail(EINVAL, "snapshot '%s': L1 table has %u entries, too few for %" PRIu64 " bytes", name, s->l1_size,
                        s->disk_size);
    uint64_t *l1;
    int ret = qcow2_load_u64_table(img, s->l1_offset, s->l1_size, &l1);
    if (ret < 0)
        return ret;
    free(img->l1);
    img->l1 = l1;
    img->l1_size = s->l1_size;
    img->size = s->disk_size;
    return 0;
}
