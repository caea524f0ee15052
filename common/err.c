/* err.c: the thread-local error message behind err.h, and the saving of one
 * failure across the cleanup that follows it. */
#include "err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char msg[ERR_MSG_MAX];
static _Thread_local int have_msg;

/* Format aside, then copy: the arguments may point into msg (err_msg()). */
static void vset(const char *fmt, va_list ap)
{
    char tmp[ERR_MSG_MAX];
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    memcpy(msg, tmp, strlen(tmp) + 1);
    have_msg = 1;
}

int err_fail(int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset(fmt, ap);
    va_end(ap);
    return -abs(errnum);
}

void err_set(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset(fmt, ap);
    va_end(ap);
}

int err_prefix(int errnum, const char *fmt, ...)
{
    /* "ctx: old"; when too long, the middle goes, so the reason at the end
     * (the part that says what is wrong) always survives */
    char old[ERR_MSG_MAX], ctx[ERR_MSG_MAX];
    va_list ap;
    snprintf(old, sizeof old, "%s", err_msg(errnum));
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    size_t clen = strlen(ctx), olen = strlen(old);
    if (clen + 2 + olen < sizeof msg) {
        memcpy(msg, ctx, clen);
        memcpy(msg + clen, ": ", 2);
        memcpy(msg + clen + 2, old, olen + 1);
    } else {
        static const char gap[] = ": ... ";
        size_t keep_ctx = clen < 120 ? clen : 120;
        size_t room = sizeof msg - 1 - keep_ctx - (sizeof gap - 1);
        size_t keep_old = olen < room ? olen : room;
        memcpy(msg, ctx, keep_ctx);
        memcpy(msg + keep_ctx, gap, sizeof gap - 1);
        memcpy(msg + keep_ctx + sizeof gap - 1, old + olen - keep_old, keep_old + 1);
    }
    have_msg = 1;
    return errnum;
}

const char *err_msg(int errnum)
{
    if (!have_msg) {
        /* strerror is not thread-safe; copy through strerror_r into our buffer */
        char *s = strerror_r(abs(errnum), msg, sizeof msg);
        if (s != msg)
            snprintf(msg, sizeof msg, "%s", s);
    }
    return msg;
}

void err_clear(void)
{
    have_msg = 0;
    msg[0] = 0;
}

int err_save(struct err_saved *s, int ret)
{
    s->ret = ret;
    if (ret < 0)
        snprintf(s->msg, sizeof s->msg, "%s", err_msg(ret));
    else
        s->msg[0] = 0;
    return ret;
}

int err_restore(const struct err_saved *s)
{
    if (s->ret < 0) {
        snprintf(msg, sizeof msg, "%s", s->msg);
        have_msg = 1;
    }
    return s->ret;
}
