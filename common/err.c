/* err.c: the thread-local error message behind err.h. */
#include "err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char msg[ERR_MSG_MAX];
static _Thread_local int have_msg;

static void vset(const char *fmt, va_list ap)
{
    vsnprintf(msg, sizeof msg, fmt, ap);
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
    char old[ERR_MSG_MAX];
    va_list ap;
    snprintf(old, sizeof old, "%s", err_msg(errnum));
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t used = n < 0 ? 0 : (size_t)n >= sizeof msg ? sizeof msg - 1 : (size_t)n;
    size_t room = sizeof msg - used;
    size_t olen = strlen(old);
    if (room > 2) {
        memcpy(msg + used, ": ", 2);
        used += 2;
        room -= 2;
        if (olen >= room)
            olen = room - 1;
        memcpy(msg + used, old, olen);
        used += olen;
    }
    msg[used] = 0;
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
