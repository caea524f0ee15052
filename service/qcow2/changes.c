/* changes.c: what HTTP validators are built from: the change record of an open
 * image (a generation bumped by every change made through the handle, and when)
 * and the storage the image file uses now. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>

#include "err.h"
#include "qcow2_int.h"

void qcow2_changes_init(struct qcow2_image *img)
{
    pthread_mutex_init(&img->change_lock, NULL);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    img->opened_sec = now.tv_sec;
}

/* With change_lock held. The clock is kept from going back, so the seconds of
 * later changes never fall below earlier ones (the date validators rely on it). */
static void note_locked(struct qcow2_image *img, bool snapshots)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t last = img->changed_sec ? img->changed_sec : img->opened_sec;
    img->before_sec = last;
    img->changed_sec = now.tv_sec > last ? now.tv_sec : last;
    if (snapshots)
        img->snap_gen++;
    atomic_fetch_add(&img->write_gen, 1);
}

void qcow2_note_change(struct qcow2_image *img, bool snapshots)
{
    pthread_mutex_lock(&img->change_lock);
    note_locked(img, snapshots);
    pthread_mutex_unlock(&img->change_lock);
}

void qcow2_get_changes(struct qcow2_image *img, struct qcow2_changes *out)
{
    pthread_mutex_lock(&img->change_lock);
    out->generation = atomic_load(&img->write_gen);
    out->snap_generation = img->snap_gen;
    out->changed = img->changed_sec;
    out->before = img->changed_sec ? img->before_sec : img->opened_sec;
    pthread_mutex_unlock(&img->change_lock);
}

uint64_t qcow2_generation(const struct qcow2_image *img)
{
    return atomic_load(&img->write_gen);
}

int qcow2_claim_generation(struct qcow2_image *img, uint64_t gen)
{
    pthread_mutex_lock(&img->change_lock);
    int ret = 0;
    if (atomic_load(&img->write_gen) != gen)
        ret = err_fail(ESTALE, "the image changed since generation %llu", (unsigned long long)gen);
    else
        note_locked(img, false);
    pthread_mutex_unlock(&img->change_lock);
    return ret;
}

int qcow2_file_allocated(struct qcow2_image *img, uint64_t *out)
{
    /* a local file: its blocks now, through the open descriptor (no path lookup);
     * other stores (an object, memory) have no holes: their size */
    int fd = vfs_fd(img->file);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0) {
        *out = (uint64_t)st.st_blocks * 512;
        return 0;
    }
    return vfs_size(img->file, out);
}
