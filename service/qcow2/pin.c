/* pin.c: guest ranges pinned to their host bytes for readers that send them
 * after the image's read lock is gone (the daemon hands them to sendfile), and
 * the quarantine that keeps a cluster freed meanwhile from being reused.
 *
 * A pin is taken under the read lock, while the mapping it found is current.
 * A cluster the pinned run covers can only be freed later, by a writer holding
 * the write lock, after the tables stopped pointing at it. If no pin is out at
 * that moment nobody can still be reading it, and it is released at once: the
 * allocator may take it, the host may deallocate it. Otherwise it waits in the
 * quarantine, tagged with the current epoch, until every pin that could have
 * been taken before it was freed has been let go.
 *
 * Epochs work as a two-slot grace period: a pin counts in pins[epoch & 1]. The
 * epoch advances (under the write lock) only when the slot of the previous
 * epoch is empty, so the pins out are always of the current epoch C or of C-1.
 * A cluster freed in epoch t is safe once no pin of an epoch <= t is out:
 * always when t <= C-2, when C-1's slot is empty for t == C-1, and when both
 * slots are empty for t == C. Pins are short (one HTTP response), so a writer
 * that frees and allocates sees its quarantine drain within a couple of calls. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

struct quarantined {
    uint64_t cluster;
    uint64_t epoch;
};

/* The sent bitmap is at most this big (128 Mi clusters: 8 TiB of 64 KiB
 * clusters); a run past it is read with pread instead. */
#define SENT_MAX_WORDS (2u << 20)

/* Mark host clusters [first, last] sent (a reader under the read lock). */
static bool mark_sent(struct qcow2_image *img, uint64_t first, uint64_t last)
{
    uint64_t need = last / 64 + 1;
    if (need > SENT_MAX_WORDS)
        return false;
    pthread_mutex_lock(&img->sent_lock);
    bool ok = true;
    if (need > img->sent_words) {
        uint64_t words = img->sent_words ? img->sent_words : 64;
        while (words < need)
            words *= 2;
        uint64_t *n = realloc(img->sent, words * 8);
        if (n) {
            memset(n + img->sent_words, 0, (words - img->sent_words) * 8);
            img->sent = n;
            img->sent_words = words;
        }
        ok = n != NULL;
    }
    for (uint64_t c = first; ok && c <= last; c++)
        img->sent[c / 64] |= 1ull << (c % 64);
    pthread_mutex_unlock(&img->sent_lock);
    return ok;
}

bool pin_was_sent(const struct qcow2_image *img, uint64_t c)
{
    return c / 64 < img->sent_words && (img->sent[c / 64] >> (c % 64)) & 1;
}

int qcow2_pin_run(struct qcow2_image *img, uint64_t off, uint64_t len, int *fd, uint64_t *host_off,
                  struct qcow2_pin *pin)
{
    uint64_t end, fsize;
    if (img->fmt != QCOW2_FMT_QCOW2 || img->h.crypt_method || !len || __builtin_add_overflow(off, len, &end) ||
        end > img->size)
        return 0;
    /* an external data file maps guest offsets to fixed host offsets: a write
     * cannot go elsewhere while the kernel sends the old bytes */
    int d = atomic_load(&img->pins_off) || img->data != img->file ? -1 : vfs_fd(img->data);
    if (d < 0)
        return 0;
    int pinned = 0;
    pthread_rwlock_rdlock(&img->rwlock);
    struct mapping m;
    if (qcow2_get_mapping(img, off, len, &m) == 0 && m.type == SC_NORMAL && m.host_valid && m.bytes == len &&
        vfs_size(img->data, &fsize) == 0 && m.host_off <= fsize && len <= fsize - m.host_off &&
        mark_sent(img, m.host_off >> img->cluster_bits, (m.host_off + len - 1) >> img->cluster_bits)) {
        pin->img = img;
        pin->slot = (unsigned)(img->pin_epoch & 1);
        atomic_fetch_add(&img->pins[pin->slot], 1);
        *fd = d;
        *host_off = m.host_off;
        pinned = 1;
    }
    pthread_rwlock_unlock(&img->rwlock);
    err_clear(); /* a failed lookup is the pread's to report */
    return pinned;
}

void qcow2_unpin(struct qcow2_pin *pin)
{
    atomic_fetch_sub(&pin->img->pins[pin->slot], 1);
}

/* Cluster c is nobody's now: the allocator may take it, the host may drop it. */
static void release(struct qcow2_image *img, uint64_t c)
{
    if (c / 64 < img->sent_words)
        img->sent[c / 64] &= ~(1ull << (c % 64)); /* its next data goes to fresh pages */
    if (c < img->free_hint)
        img->free_hint = c;
    /* the punch also drops the cluster's pages from the file, so new data
     * written there later cannot reach bytes the kernel still holds for a
     * sendfile: without it, no more pins */
    if (!img->keep_freed && vfs_discard(img->file, c << img->cluster_bits, img->cluster_size) < 0)
        atomic_store(&img->pins_off, true);
}

void pin_freed(struct qcow2_image *img, uint64_t c)
{
    if (atomic_load(&img->pins[0]) + atomic_load(&img->pins[1]) == 0) {
        release(img, c);
        return;
    }
    if (!img->nquar && !img->quar_lost)
        img->quar_floor = 0;
    if (c + 1 > img->quar_floor)
        img->quar_floor = c + 1;
    if (img->nquar == img->cap_quar) {
        size_t cap = img->cap_quar ? img->cap_quar * 2 : 64;
        struct quarantined *q = realloc(img->quar, cap * sizeof *q);
        if (!q) {
            /* cannot remember it: it stays below the floor, unused, until all
             * pins are gone (then it is free space the allocator finds again) */
            img->quar_lost = true;
            return;
        }
        img->quar = q;
        img->cap_quar = cap;
    }
    img->quar[img->nquar++] = (struct quarantined){c, img->pin_epoch};
}

void pin_drain(struct qcow2_image *img, bool all)
{
    if (!img->nquar && !img->quar_lost)
        return;
    uint64_t now = img->pin_epoch;
    if (!all && atomic_load(&img->pins[(now - 1) & 1]) == 0)
        img->pin_epoch = ++now; /* new pins count where nothing is left */
    /* only decrements happen under the write lock: these can only fall */
    bool prev_out = !all && atomic_load(&img->pins[(now - 1) & 1]) != 0;
    bool cur_out = !all && atomic_load(&img->pins[now & 1]) != 0;
    size_t keep = 0;
    uint64_t floor = 0;
    for (size_t i = 0; i < img->nquar; i++) {
        struct quarantined q = img->quar[i];
        uint64_t age = now - q.epoch;
        if (age >= 2 || (age == 1 && !prev_out) || (!prev_out && !cur_out)) {
            /* still free: nothing allocates below the floor, but a failed
             * refcount read leaves it alone rather than drop what may be used */
            uint64_t v = 1;
            if (rc_get(img, q.cluster, &v) == 0 && v == 0)
                release(img, q.cluster);
            continue;
        }
        img->quar[keep++] = q;
        if (q.cluster + 1 > floor)
            floor = q.cluster + 1;
    }
    img->nquar = keep;
    if (img->quar_lost && (prev_out || cur_out))
        floor = floor > img->quar_floor ? floor : img->quar_floor; /* the lost ones may be anywhere below */
    else
        img->quar_lost = false;
    img->quar_floor = floor;
    err_clear();
}
