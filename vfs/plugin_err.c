/* plugin_err.c: common/err.h's functions for the in-tree plugins (s3 and the test
 * plugins), written on the SDK's host table, so a plugin built from this tree
 * needs nothing of the daemon's symbols. Compiled into each plugin, hidden. */
#include <stdarg.h>
#include <stdio.h>

#include "err.h"
#include "vfs_plugin.h"

int err_fail(int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfs_host_table->vfail(errnum, fmt, ap);
    va_end(ap);
    return r;
}

void err_set(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfs_host_table->vfail(1, fmt, ap);
    va_end(ap);
}

int err_prefix(int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfs_host_table->vprefix(errnum, fmt, ap);
    va_end(ap);
    return r;
}

const char *err_msg(int errnum)
{
    return vfs_host_table->msg(errnum);
}

void err_clear(void)
{
    vfs_host_table->clear();
}

int err_save(struct err_saved *s, int ret)
{
    s->ret = ret;
    if (ret < 0)
        snprintf(s->msg, sizeof s->msg, "%s", vfs_host_table->msg(ret));
    else
        s->msg[0] = 0;
    return ret;
}

int err_restore(const struct err_saved *s)
{
    if (s->ret < 0)
        vfs_fail(s->ret, "%s", s->msg);
    return s->ret;
}
