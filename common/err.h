/* err.h: the readable error detail that travels beside a negative errno.
 * Each thread has one message buffer; a failing call sets it, the caller shows it. */
#ifndef QCOWD_ERR_H
#define QCOWD_ERR_H

#include <stdarg.h>

#define ERR_MSG_MAX 512

/* Set this thread's message (printf style) and return -errnum, so a failure
 * reads `return err_fail(EINVAL, "L1 table at %#llx is not aligned", off);`.
 * errnum is a positive errno value (a negative one is taken as its absolute value).
 * The arguments may include err_msg() itself: the message is formatted aside
 * first, then copied in ("%s (and cleaning up failed: %s)", ..., err_msg(r)). */
int err_fail(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Set the message without a return value (same rules as err_fail). */
void err_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Prefix the current message: "ctx: old message". Returns -errnum unchanged,
 * for `return err_prefix(ret, "backing file %s", name);`. errnum may be negative.
 * When the result would be longer than ERR_MSG_MAX - 1, the middle goes: the
 * start of ctx and the end of the old message (the reason) are kept. */
int err_prefix(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* This thread's last message; if none was set since err_clear, strerror of
 * the given errno (positive or negative). Borrowed; valid until the next err_*
 * call of this thread. */
const char *err_msg(int errnum);

/* Forget the message. */
void err_clear(void);

/* A failure kept aside while cleanup runs: the errno and its message. Plain
 * data: it may be copied, or handed to another thread. */
struct err_saved {
    int ret;               /* the negative errno saved, or 0 */
    char msg[ERR_MSG_MAX]; /* err_msg(ret) when saved ("" for 0) */
};

/* Keep ret (0 or a negative errno) and this thread's message for it in *s, so
 * that cleanup calls may fail and set messages of their own:
 *     err_save(&s, ret); vfs_close(f); vfs_remove(tmp); return err_restore(&s);
 * Returns ret. */
int err_save(struct err_saved *s, int ret);

/* Make the saved message this thread's message again and return the saved ret.
 * A saved 0 leaves the message alone and returns 0. */
int err_restore(const struct err_saved *s);

#endif
