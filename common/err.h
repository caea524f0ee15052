/* err.h: the readable error detail that travels beside a negative errno.
 * Each thread has one message buffer; a failing call sets it, the caller shows it. */
#ifndef QCOWD_ERR_H
#define QCOWD_ERR_H

#include <stdarg.h>

#define ERR_MSG_MAX 512

/* Set this thread's message (printf style) and return -errnum, so a failure
 * reads `return err_fail(EINVAL, "L1 table at %#llx is not aligned", off);`.
 * errnum is a positive errno value. */
int err_fail(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Set the message without a return value. */
void err_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Prefix the current message: "ctx: old message". Returns -errnum unchanged,
 * for `return err_prefix(ret, "backing file %s", name);`. errnum may be negative. */
int err_prefix(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* This thread's last message; if none was set since err_clear, strerror of
 * the given errno (positive or negative). Borrowed; valid until the next err_* call. */
const char *err_msg(int errnum);

/* Forget the message. */
void err_clear(void);

#endif
