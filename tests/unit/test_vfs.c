/* test_vfs.c: the VFS suite: file and mem backends, URI dispatch and name
 * resolution, plugin loading, registration checks, the fault filter, threads. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "vfs.h"

/* ---- fixture: a fresh temporary folder per test ---- */

static char tmpdir[PATH_MAX / 2]; /* half, so tmpdir/name always fits a PATH_MAX buffer */

static void tmp_setup(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/test_vfs.XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void tmp_teardown(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* tmpdir/name in a caller's buffer */
static char *in_tmp(char *buf, const char *name)
{
    snprintf(buf, PATH_MAX, "%s/%s", tmpdir, name);
    return buf;
}

#define ck_assert_msg_has(r, needle)                                                       \
    ck_assert_msg(strstr(err_msg(r), (needle)) != NULL, "message \"%s\" lacks \"%s\"", \
                  err_msg(r), (needle))

static struct vfs_file *open_ok(const char *uri, unsigned flags)
{
    struct vfs_file *f = NULL;
    int r = vfs_open(uri, flags, &f);
    ck_assert_msg(r == 0, "open %s: %d %s", uri, r, err_msg(r));
    return f;
}

static int is_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Write, read back, resize, flush: the basic contract on any writable URI. */
static void check_read_write(const char *uri)
{
    unsigned char buf[8192], out[8192];
    uint64_t size;
    struct vfs_file *f = open_ok(uri, VFS_O_RDWR | VFS_O_CREATE);

    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)(i * 13 + 1);
    ck_assert_int_eq(vfs_pwrite(f, buf, 4096, 0), 0);
    ck_assert_int_eq(vfs_pwrite(f, buf + 4096, 4096, 4096), 0);
    ck_assert_int_eq(vfs_size(f, &size), 0);
    ck_assert_uint_eq(size, 8192);
    ck_assert_int_eq(vfs_pread(f, out, sizeof out, 0), 0);
    ck_assert_mem_eq(out, buf, sizeof buf);

    ck_assert_int_eq(vfs_truncate(f, 20000), 0);
    ck_assert_int_eq(vfs_size(f, &size), 0);
    ck_assert_uint_eq(size, 20000);
    memset(out, 0xaa, sizeof out);
    ck_assert_int_eq(vfs_pread(f, out, 8192, 8192), 0);
    ck_assert(is_zero(out, 8192)); /* grown bytes read as zeroes */

    ck_assert_int_eq(vfs_truncate(f, 100), 0);
    ck_assert_int_eq(vfs_size(f, &size), 0);
    ck_assert_uint_eq(size, 100);
    ck_assert_int_eq(vfs_truncate(f, 200), 0); /* regrowing must not resurrect old bytes */
    ck_assert_int_eq(vfs_pread(f, out, 100, 100), 0);
    ck_assert(is_zero(out, 100));
    ck_assert_int_eq(vfs_flush(f), 0);
    vfs_close(f);
}

/* A read running past the end gets the bytes there are, then zeroes. */
static void check_zero_fill(const char *uri)
{
    unsigned char out[100];
    struct vfs_file *f = open_ok(uri, VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "0123456789", 10, 0), 0);
    memset(out, 0xaa, sizeof out);
    ck_assert_int_eq(vfs_pread(f, out, sizeof out, 5), 0);
    ck_assert_mem_eq(out, "56789", 5);
    ck_assert(is_zero(out + 5, sizeof out - 5));
    memset(out, 0xaa, sizeof out);
    ck_assert_int_eq(vfs_pread(f, out, sizeof out, 1 << 20), 0);
    ck_assert(is_zero(out, sizeof out));
    vfs_close(f);
}

/* ---- file backend ---- */

START_TEST(test_file_read_write_resize_flush)
{
    char p[PATH_MAX];
    check_read_write(in_tmp(p, "rw.img"));
}
END_TEST

START_TEST(test_file_read_past_eof_zero_fills)
{
    char p[PATH_MAX];
    check_zero_fill(in_tmp(p, "short.img"));
}
END_TEST

/* The system's EPERM (here an immutable file: root and a file system that has the
 * flag, else skipped) comes back as EACCES, with the system's words: EPERM means a
 * name outside the catalog to the layers above. */
START_TEST(test_file_system_eperm_is_eacces)
{
    char p[PATH_MAX];
    struct vfs_file *f = open_ok(in_tmp(p, "immutable.img"), VFS_O_RDWR | VFS_O_CREATE);
    vfs_close(f);
    int fd = open(p, O_RDONLY), flags = 0;
    if (fd < 0 || ioctl(fd, FS_IOC_GETFLAGS, &flags) < 0 ||
        (flags |= FS_IMMUTABLE_FL, ioctl(fd, FS_IOC_SETFLAGS, &flags) < 0)) {
        if (fd >= 0)
            close(fd);
        return; /* not root, or no such flag here */
    }
    int r = vfs_open(p, VFS_O_RDWR, &f);
    flags &= ~FS_IMMUTABLE_FL;
    ck_assert_int_eq(ioctl(fd, FS_IOC_SETFLAGS, &flags), 0);
    close(fd);
    ck_assert_int_eq(r, -EACCES);
    ck_assert_msg_has(r, p);
    ck_assert_msg_has(r, "Operation not permitted");
}
END_TEST

START_TEST(test_file_create_excl_and_flags)
{
    char p[PATH_MAX];
    struct vfs_file *f;
    in_tmp(p, "excl.img");
    f = open_ok(p, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL);
    vfs_close(f);
    int r = vfs_open(p, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &f);
    ck_assert_int_eq(r, -EEXIST);
    ck_assert_msg_has(r, p);
    f = open_ok(p, VFS_O_RDWR | VFS_O_CREATE); /* plain create opens the existing one */
    vfs_close(f);
    ck_assert_int_eq(vfs_open(p, VFS_O_CREATE, &f), -EINVAL); /* create needs rdwr */
    ck_assert_int_eq(vfs_open(p, 0x100, &f), -EINVAL);
    f = open_ok(p, VFS_O_RDONLY);
    r = vfs_pwrite(f, "x", 1, 0);
    ck_assert_int_eq(r, -EBADF);
    ck_assert_msg_has(r, "read-only");
    ck_assert_int_eq(vfs_truncate(f, 0), -EBADF);
    ck_assert_int_eq(vfs_flush(f), 0);
    vfs_close(f);
}
END_TEST

START_TEST(test_file_missing_is_enoent_naming_path)
{
    char p[PATH_MAX];
    struct vfs_file *sentinel = (struct vfs_file *)&sentinel, *f = sentinel;
    int r = vfs_open(in_tmp(p, "nope/missing.img"), VFS_O_RDONLY, &f);
    ck_assert_int_eq(r, -ENOENT);
    ck_assert_ptr_eq(f, sentinel); /* *out untouched on failure */
    ck_assert_msg_has(r, p);
    ck_assert_msg_has(r, "No such file or directory");
    r = vfs_open(tmpdir, VFS_O_RDONLY, &f);
    ck_assert_int_eq(r, -EISDIR);
    ck_assert_msg_has(r, tmpdir);
}
END_TEST

START_TEST(test_file_discard_reads_zero_and_is_a_hole)
{
    enum { K = 65536 };
    char p[PATH_MAX];
    static unsigned char buf[4 * K];
    uint64_t pnum;
    struct vfs_file *f = open_ok(in_tmp(p, "holes.img"), VFS_O_RDWR | VFS_O_CREATE);

    ck_assert_uint_eq(vfs_caps(f) & VFS_CAP_DISCARD, VFS_CAP_DISCARD);
    memset(buf, 0x5a, sizeof buf);
    ck_assert_int_eq(vfs_pwrite(f, buf, sizeof buf, 0), 0);
    ck_assert_int_eq(vfs_flush(f), 0);
    int r = vfs_discard(f, K, K);
    if (r == -EOPNOTSUPP) { /* a filesystem without holes: nothing more to prove */
        vfs_close(f);
        return;
    }
    ck_assert_int_eq(r, 0);
    ck_assert_int_eq(vfs_pread(f, buf, sizeof buf, 0), 0);
    for (size_t i = 0; i < sizeof buf; i++)
        ck_assert_uint_eq(buf[i], (i >= K && i < 2 * K) ? 0 : 0x5a);

    ck_assert_int_eq(vfs_block_status(f, 0, 4 * K, &pnum), VFS_BS_DATA);
    ck_assert_uint_eq(pnum, K);
    ck_assert_int_eq(vfs_block_status(f, K, 3 * K, &pnum), VFS_BS_HOLE);
    ck_assert_uint_eq(pnum, K);
    ck_assert_int_eq(vfs_block_status(f, 2 * K, 2 * K, &pnum), VFS_BS_DATA);
    ck_assert_uint_eq(pnum, 2 * K);
    ck_assert_int_eq(vfs_block_status(f, 4 * K, 100, &pnum), VFS_BS_HOLE); /* past EOF */
    ck_assert_uint_eq(pnum, 100);
    ck_assert_int_eq(vfs_block_status(f, 0, 0, &pnum), -EINVAL);

    /* a file grown by truncate is one hole, to the end and beyond */
    ck_assert_int_eq(vfs_truncate(f, 0), 0);
    ck_assert_int_eq(vfs_truncate(f, 16 * K), 0);
    ck_assert_int_eq(vfs_block_status(f, 0, 32 * K, &pnum), VFS_BS_HOLE);
    ck_assert_uint_eq(pnum, 32 * K);
    vfs_close(f);
}
END_TEST

static int collect(void *ctx, const char *name)
{
    char *acc = ctx;
    if (*acc)
        strcat(acc, ",");
    strcat(acc, name);
    return 0;
}

static int cmp_chars(const void *a, const void *b)
{
    return *(const char *)a - *(const char *)b;
}

START_TEST(test_file_list_stat_rename_remove)
{
    char a[PATH_MAX], b[PATH_MAX], c[PATH_MAX], names[256] = "";
    struct vfs_stat st;
    vfs_close(open_ok(in_tmp(a, "a"), VFS_O_RDWR | VFS_O_CREATE));
    struct vfs_file *f = open_ok(in_tmp(b, "b"), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "hello", 5, 0), 0);
    vfs_close(f);

    ck_assert_int_eq(vfs_list(tmpdir, collect, names), 0);
    qsort(names, strlen(names), 1, cmp_chars); /* readdir order is arbitrary: "a,b" -> ",ab" */
    ck_assert_str_eq(names, ",ab");

    ck_assert_int_eq(vfs_stat(b, &st), 0);
    ck_assert_uint_eq(st.size, 5);
    ck_assert_int_eq(st.is_dir, 0);
    ck_assert_int_gt(st.mtime, 0);
    ck_assert_int_eq(vfs_stat(tmpdir, &st), 0);
    ck_assert_int_eq(st.is_dir, 1);

    ck_assert_int_eq(vfs_rename(b, a), 0); /* replaces a */
    ck_assert_int_eq(vfs_stat(b, &st), -ENOENT);
    ck_assert_int_eq(vfs_stat(a, &st), 0);
    ck_assert_uint_eq(st.size, 5);
    ck_assert_int_eq(vfs_rename(a, "mem:x"), -EXDEV);
    ck_assert_int_eq(vfs_remove(a), 0);
    int r = vfs_remove(a);
    ck_assert_int_eq(r, -ENOENT);
    ck_assert_msg_has(r, a);
    ck_assert_int_eq(vfs_list(in_tmp(c, "nodir"), collect, names), -ENOENT);
}
END_TEST

START_TEST(test_file_uri_is_canonical)
{
    char p[PATH_MAX], l[PATH_MAX], real[PATH_MAX], uri[PATH_MAX + 8];
    ck_assert_ptr_nonnull(realpath(tmpdir, real));
    strcat(real, "/x.img");
    vfs_close(open_ok(in_tmp(p, "x.img"), VFS_O_RDWR | VFS_O_CREATE));
    ck_assert_int_eq(symlink(p, in_tmp(l, "link.img")), 0);
    ck_assert_int_eq(chdir(tmpdir), 0);

    const char *names[] = {"x.img", "./x.img", "file:x.img", "link.img", "file:link.img", p};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        struct vfs_file *f = open_ok(names[i], VFS_O_RDONLY);
        ck_assert_str_eq(vfs_file_uri(f), real);
        vfs_close(f);
    }
    snprintf(uri, sizeof uri, "file:%s", p);
    struct vfs_file *f = open_ok(uri, VFS_O_RDONLY);
    ck_assert_str_eq(vfs_file_uri(f), real);
    vfs_close(f);
    ck_assert_int_eq(chdir("/"), 0);
}
END_TEST

/* ---- mem backend ---- */

START_TEST(test_mem_read_write_resize_flush)
{
    check_read_write("mem:rw");
    check_zero_fill("mem:short");
}
END_TEST

START_TEST(test_mem_objects_are_shared_and_persist)
{
    char buf[6] = {0};
    struct vfs_file *a = open_ok("mem:shared", VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL);
    struct vfs_file *b = open_ok("mem:shared", VFS_O_RDONLY);
    ck_assert_int_eq(vfs_pwrite(a, "hello", 5, 0), 0);
    ck_assert_int_eq(vfs_pread(b, buf, 5, 0), 0);
    ck_assert_str_eq(buf, "hello"); /* one object behind both handles */
    vfs_close(a);
    vfs_close(b);

    b = open_ok("mem:shared", VFS_O_RDONLY); /* survives the last close */
    memset(buf, 0, sizeof buf);
    ck_assert_int_eq(vfs_pread(b, buf, 5, 0), 0);
    ck_assert_str_eq(buf, "hello");
    ck_assert_str_eq(vfs_file_uri(b), "mem:shared");

    ck_assert_int_eq(vfs_remove("mem:shared"), 0);
    ck_assert_int_eq(vfs_open("mem:shared", VFS_O_RDONLY, &a), -ENOENT);
    memset(buf, 0, sizeof buf);
    ck_assert_int_eq(vfs_pread(b, buf, 5, 0), 0); /* like an unlinked file */
    ck_assert_str_eq(buf, "hello");
    vfs_close(b);
    ck_assert_int_eq(vfs_remove("mem:shared"), -ENOENT);
}
END_TEST

START_TEST(test_mem_create_excl_missing_and_names)
{
    struct vfs_file *f;
    int r = vfs_open("mem:none", VFS_O_RDONLY, &f);
    ck_assert_int_eq(r, -ENOENT);
    ck_assert_msg_has(r, "mem:none");
    vfs_close(open_ok("mem:one", VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL));
    ck_assert_int_eq(vfs_open("mem:one", VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &f), -EEXIST);
    vfs_close(open_ok("mem:one", VFS_O_RDWR | VFS_O_CREATE));
    ck_assert_int_eq(vfs_open("mem:", VFS_O_RDWR | VFS_O_CREATE, &f), -EINVAL);
    ck_assert_int_eq(vfs_open("mem:dir/", VFS_O_RDWR | VFS_O_CREATE, &f), -EINVAL);
}
END_TEST

START_TEST(test_mem_discard_block_status_and_limits)
{
    unsigned char buf[300];
    uint64_t pnum;
    struct vfs_file *f = open_ok("mem:d", VFS_O_RDWR | VFS_O_CREATE);
    memset(buf, 7, sizeof buf);
    ck_assert_int_eq(vfs_pwrite(f, buf, sizeof buf, 0), 0);
    ck_assert_int_eq(vfs_discard(f, 100, 100), 0);
    ck_assert_int_eq(vfs_discard(f, 250, 1000), 0); /* runs past the end: clamped */
    ck_assert_int_eq(vfs_pread(f, buf, sizeof buf, 0), 0);
    for (size_t i = 0; i < sizeof buf; i++)
        ck_assert_uint_eq(buf[i], (i < 100 || (i >= 200 && i < 250)) ? 7 : 0);
    ck_assert_int_eq(vfs_block_status(f, 0, 1000, &pnum), VFS_BS_DATA);
    ck_assert_uint_eq(pnum, 300);
    ck_assert_int_eq(vfs_block_status(f, 300, 1000, &pnum), VFS_BS_HOLE);
    ck_assert_uint_eq(pnum, 1000);

    int r = vfs_truncate(f, 2ull << 30); /* a hostile size cannot exhaust memory */
    ck_assert_int_eq(r, -EFBIG);
    ck_assert_msg_has(r, "mem:d");
    ck_assert_int_eq(vfs_pwrite(f, "x", 1, 1ull << 30), -EFBIG);
    ck_assert_int_eq(vfs_pwrite(f, "x", 1, UINT64_MAX), -EINVAL);
    ck_assert_int_eq(vfs_truncate(f, UINT64_MAX), -EFBIG);
    ck_assert_int_eq(vfs_size(f, &pnum), 0);
    ck_assert_uint_eq(pnum, 300);
    vfs_close(f);
}
END_TEST

START_TEST(test_mem_max_object_is_a_setting)
{
    struct vfs_file *f = open_ok("mem:cap", VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_config("mem", "max-object", "4096"), 0);
    ck_assert_int_eq(vfs_pwrite(f, "x", 1, 4095), 0);
    int r = vfs_pwrite(f, "x", 1, 4096);
    ck_assert_int_eq(r, -EFBIG);
    ck_assert_msg_has(r, "4096 byte limit");
    ck_assert_int_eq(vfs_truncate(f, 8192), -EFBIG);
    ck_assert_int_eq(vfs_config("mem", "max-object", "0"), -EINVAL);
    ck_assert_int_eq(vfs_config("mem", "max-object", "12x"), -EINVAL);
    ck_assert_int_eq(vfs_config("mem", "colour", "blue"), -EINVAL);
    ck_assert_int_eq(vfs_config("mem", "max-object", "1073741824"), 0); /* the default again */
    ck_assert_int_eq(vfs_pwrite(f, "x", 1, 8192), 0);
    vfs_close(f);
    vfs_remove("mem:cap");
}
END_TEST

START_TEST(test_mem_list_stat_rename)
{
    char names[256] = "";
    struct vfs_stat st;
    const char *objs[] = {"mem:L/d/b", "mem:L/d/a", "mem:L/d/sub/c", "mem:L/e", "mem:L/dd"};
    for (size_t i = 0; i < sizeof objs / sizeof objs[0]; i++)
        vfs_close(open_ok(objs[i], VFS_O_RDWR | VFS_O_CREATE));

    ck_assert_int_eq(vfs_list("mem:L/d", collect, names), 0);
    ck_assert_str_eq(names, "a,b,sub");
    names[0] = 0;
    ck_assert_int_eq(vfs_list("mem:L/d/", collect, names), 0);
    ck_assert_str_eq(names, "a,b,sub");
    names[0] = 0;
    ck_assert_int_eq(vfs_list("mem:L", collect, names), 0);
    ck_assert_str_eq(names, "d,dd,e");

    ck_assert_int_eq(vfs_stat("mem:L/d", &st), 0);
    ck_assert_int_eq(st.is_dir, 1);
    ck_assert_int_eq(vfs_stat("mem:L/d/sub", &st), 0);
    ck_assert_int_eq(st.is_dir, 1);
    ck_assert_int_eq(vfs_stat("mem:L/d/a", &st), 0);
    ck_assert_int_eq(st.is_dir, 0);
    ck_assert_int_eq(vfs_stat("mem:L/d/zz", &st), -ENOENT);

    struct vfs_file *f = open_ok("mem:L/d/a", VFS_O_RDWR);
    ck_assert_int_eq(vfs_pwrite(f, "AAAA", 4, 0), 0);
    ck_assert_int_eq(vfs_rename("mem:L/d/a", "mem:L/d/b"), 0); /* replaces b */
    ck_assert_int_eq(vfs_pwrite(f, "Z", 1, 4), 0);         /* the handle follows */
    vfs_close(f);
    ck_assert_int_eq(vfs_stat("mem:L/d/a", &st), -ENOENT);
    ck_assert_int_eq(vfs_stat("mem:L/d/b", &st), 0);
    ck_assert_uint_eq(st.size, 5);
    ck_assert_int_eq(vfs_rename("mem:L/nothing", "mem:L/x"), -ENOENT);
}
END_TEST

/* ---- URIs and names ---- */

START_TEST(test_uri_scheme_dispatch)
{
    char p[PATH_MAX], uri[PATH_MAX + 8];
    struct vfs_file *f;
    unsigned char c = 0;
    f = open_ok(in_tmp(p, "plain"), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "P", 1, 0), 0);
    vfs_close(f);
    snprintf(uri, sizeof uri, "file:%s", p);
    f = open_ok(uri, VFS_O_RDONLY);
    ck_assert_int_eq(vfs_pread(f, &c, 1, 0), 0);
    ck_assert_uint_eq(c, 'P');
    vfs_close(f);

    int r = vfs_open("nosuch:thing", VFS_O_RDONLY, &f);
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "unknown storage scheme \"nosuch\"");
    ck_assert_int_eq(vfs_stat("nosuch:thing", &(struct vfs_stat){0}), -EINVAL);
    /* no colon, or not a scheme before it: a plain (relative) path */
    ck_assert_int_eq(vfs_open("C", VFS_O_RDONLY, &f), -ENOENT);
    ck_assert_int_eq(vfs_open("Dir/x:y", VFS_O_RDONLY, &f), -ENOENT);
}
END_TEST

START_TEST(test_resolve_relative_names)
{
    static const struct {
        const char *base, *name, *want;
    } cases[] = {
        {"mem:dir/a.qcow2", "img/b.qcow2", "mem:dir/img/b.qcow2"},
        {"mem:a.qcow2", "b.qcow2", "mem:b.qcow2"},
        {"/d/a.qcow2", "b.qcow2", "/d/b.qcow2"},
        {"a.qcow2", "b.qcow2", "b.qcow2"},
        {"sub/a.qcow2", "b.qcow2", "sub/b.qcow2"},
        {"file:/d/a.qcow2", "b.qcow2", "file:/d/b.qcow2"},
        {"fault:/d/a.qcow2", "b.qcow2", "fault:/d/b.qcow2"},
        {"fault:mem:a.qcow2", "b.qcow2", "fault:mem:b.qcow2"},
        {"s3://bucket/p/a.qcow2", "b.qcow2", "s3://bucket/p/b.qcow2"},
        {"mem:dir/a.qcow2", "/etc/passwd", "/etc/passwd"},
        {"/d/a.qcow2", "mem:x", "mem:x"},
        {"/d/a.qcow2", "json:{\"driver\":\"file\"}", "json:{\"driver\":\"file\"}"},
        {"/d/a.qcow2", "../x", "/d/../x"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *got = vfs_resolve(cases[i].base, cases[i].name);
        ck_assert_ptr_nonnull(got);
        ck_assert_msg(strcmp(got, cases[i].want) == 0, "resolve(%s, %s) = %s, want %s",
                      cases[i].base, cases[i].name, got, cases[i].want);
        free(got);
    }
}
END_TEST

START_TEST(test_name_containment)
{
    const char *inside[] = {"b.qcow2", "img/b.qcow2", "./b", "a..b", "..a/b", "a/.../b"};
    const char *outside[] = {"",      "../x",        "a/../b",   "a/..",
                             "..",    "/etc/passwd", "mem:x",    "json:{\"file\":\"/x\"}",
                             "nbd:h", "a//../b",     "Foo:bar/x"};
    for (size_t i = 0; i < sizeof inside / sizeof inside[0]; i++)
        ck_assert_msg(vfs_name_is_contained(inside[i]), "%s should be contained", inside[i]);
    for (size_t i = 0; i < sizeof outside / sizeof outside[0]; i++)
        ck_assert_msg(!vfs_name_is_contained(outside[i]), "%s should not be contained",
                      outside[i]);
    ck_assert(!vfs_name_is_contained(NULL));
}
END_TEST

/* ---- plugins ---- */

START_TEST(test_plugin_loads_and_serves_reads)
{
    unsigned char buf[600];
    uint64_t size, pnum;
    struct vfs_file *f;
    ck_assert_int_eq(vfs_load_plugins(TESTPLUG_DIR), 1);
    f = open_ok("testplug:1000", VFS_O_RDONLY);
    ck_assert_int_eq(vfs_size(f, &size), 0);
    ck_assert_uint_eq(size, 1000);
    ck_assert_int_eq(vfs_pread(f, buf, sizeof buf, 500), 0);
    for (size_t i = 0; i < sizeof buf; i++)
        ck_assert_uint_eq(buf[i], 500 + i < 1000 ? (500 + i) % 251 : 0);
    ck_assert_int_eq(vfs_block_status(f, 900, 200, &pnum), VFS_BS_DATA); /* the default */
    ck_assert_uint_eq(pnum, 100);
    ck_assert_int_eq(vfs_discard(f, 0, 1), -EBADF);
    ck_assert_int_eq(vfs_flush(f), 0);
    vfs_close(f);

    int r = vfs_open("testplug:1000", VFS_O_RDWR, &f);
    ck_assert_int_eq(r, -EROFS);
    r = vfs_open("testplug:abc", VFS_O_RDONLY, &f);
    ck_assert_int_eq(r, -ENOENT);
    ck_assert_msg_has(r, "want a decimal size"); /* the plugin's own message */
    r = vfs_load_plugin(TESTPLUG_DIR "/vfs_testplugin.so");
    ck_assert_int_eq(r, -EEXIST);
    ck_assert_msg_has(r, "testplug");
}
END_TEST

START_TEST(test_plugin_bad_objects_are_refused)
{
    char p[PATH_MAX];
    int r = vfs_load_plugin(NOTAPLUGIN_SO);
    ck_assert_int_eq(r, -ENOEXEC);
    ck_assert_msg_has(r, "qcowd_vfs_plugin");
    ck_assert_msg_has(r, NOTAPLUGIN_SO);

    r = vfs_load_plugin(in_tmp(p, "missing.so"));
    ck_assert_int_eq(r, -ENOENT);
    ck_assert_msg_has(r, p);

    FILE *junk = fopen(in_tmp(p, "junk.so"), "w");
    ck_assert_ptr_nonnull(junk);
    fputs("not an ELF file\n", junk);
    fclose(junk);
    r = vfs_load_plugin(p);
    ck_assert_int_eq(r, -ENOEXEC);
    ck_assert_msg_has(r, p);
    ck_assert_int_eq(vfs_load_plugins(tmpdir), 0); /* skipped, with a line on stderr */
    ck_assert_int_eq(vfs_load_plugins(in_tmp(p, "nodir")), -ENOENT);
}
END_TEST

/* ---- registration ---- */

static int nop_open(const char *path, unsigned flags, void **h)
{
    *h = NULL;
    return 0;
}
static void nop_close(void *h)
{
}
static int nop_pread(void *h, void *buf, size_t len, uint64_t off)
{
    memset(buf, 'n', len);
    return 0;
}
static int nop_size(void *h, uint64_t *size)
{
    *size = 10;
    return 0;
}
static int liar_block_status(void *h, uint64_t off, uint64_t len, uint64_t *pnum)
{
    *pnum = len + 1; /* breaks the 1..len contract */
    return VFS_BS_DATA;
}

#define NOP_OPS(nm)                                                                         \
    {                                                                                       \
        .version = VFS_OPS_VERSION, .struct_size = sizeof(struct vfs_ops), .name = (nm),    \
        .thread_model = VFS_THREAD_PARALLEL, .open = nop_open, .close = nop_close,          \
        .pread = nop_pread, .size = nop_size                                                \
    }

START_TEST(test_register_refuses_bad_ops)
{
    struct vfs_ops ops = NOP_OPS("unit");
    struct vfs_file *f;
    uint64_t pnum;
    char c;

    ops.version = 0;
    ck_assert_int_eq(vfs_register(&ops), -EINVAL);
    ops.version = VFS_OPS_VERSION;
    ops.struct_size = offsetof(struct vfs_ops, open);
    int r = vfs_register(&ops);
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "struct_size");
    ops.struct_size = sizeof ops;
    ops.pread = NULL;
    r = vfs_register(&ops);
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "pread");
    ops.pread = nop_pread;
    ops.name = "Bad";
    ck_assert_int_eq(vfs_register(&ops), -EINVAL);
    ops.name = NULL;
    ck_assert_int_eq(vfs_register(&ops), -EINVAL);
    ck_assert_int_eq(vfs_register(NULL), -EINVAL);
    ops.name = "file";
    ck_assert_int_eq(vfs_register(&ops), -EEXIST); /* built-ins are already there */
    ops.name = "mem";
    ck_assert_int_eq(vfs_register(&ops), -EEXIST);

    ops.name = "unit";
    ck_assert_int_eq(vfs_register(&ops), 0);
    r = vfs_register(&ops);
    ck_assert_int_eq(r, -EEXIST);
    ck_assert_msg_has(r, "unit");
    f = open_ok("unit:x", VFS_O_RDONLY);
    ck_assert_int_eq(vfs_pread(f, &c, 1, 0), 0);
    ck_assert_int_eq(c, 'n');
    ck_assert_int_eq(vfs_open("unit:x", VFS_O_RDWR, &f), -EROFS);
    vfs_close(f);

    /* A backend from a newer header: bigger struct, higher version. Accepted;
     * only the fields we know are used. */
    struct {
        struct vfs_ops ops;
        void *future[4];
    } newer = {.ops = NOP_OPS("newer"), .future = {(void *)1, (void *)2}};
    newer.ops.version = VFS_OPS_VERSION + 1;
    newer.ops.struct_size = sizeof newer;
    ck_assert_int_eq(vfs_register(&newer.ops), 0);
    vfs_close(open_ok("newer:x", VFS_O_RDONLY));

    struct vfs_ops liar = NOP_OPS("liar");
    liar.block_status = liar_block_status;
    ck_assert_int_eq(vfs_register(&liar), 0);
    f = open_ok("liar:x", VFS_O_RDONLY);
    ck_assert_int_eq(vfs_block_status(f, 0, 4, &pnum), -EIO);
    vfs_close(f);
}
END_TEST

/* Version 2's .config and .stats, for test_v1_and_v2_plugins_configure. */
static char cfg_seen[64];
static int v2_config(const char *key, const char *value)
{
    if (strcmp(key, "color"))
        return err_fail(EINVAL, "unknown key %s", key);
    snprintf(cfg_seen, sizeof cfg_seen, "%s=%s", key, value);
    return 0;
}

static int v2_stats(int (*cb)(void *ctx, const char *name, uint64_t value), void *ctx)
{
    return cb(ctx, "answers", 42);
}

static int count_stats(void *ctx, const char *scheme, const char *name, uint64_t value)
{
    if (!strcmp(scheme, "vtwo") && !strcmp(name, "answers") && value == 42)
        ++*(int *)ctx;
    return 0;
}

/* A version 1 backend (struct_size ending at .rename) still registers and has
 * no configuration; a version 2 one gets vfs_config and reports counters; a v1
 * backend whose struct happens to be longer is not called past version 1. */
START_TEST(test_v1_and_v2_plugins_configure)
{
    struct vfs_ops v1 = NOP_OPS("vone");
    v1.version = 1;
    v1.struct_size = offsetof(struct vfs_ops, config);
    ck_assert_int_eq(vfs_register(&v1), 0);
    vfs_close(open_ok("vone:x", VFS_O_RDONLY));
    int r = vfs_config("vone", "color", "red");
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "takes no configuration");

    struct vfs_ops v1long = NOP_OPS("vonelong");
    v1long.version = 1;
    v1long.config = v2_config; /* garbage to a v1 host: never called */
    ck_assert_int_eq(vfs_register(&v1long), 0);
    ck_assert_int_eq(vfs_config("vonelong", "color", "red"), -EINVAL);
    ck_assert_str_eq(cfg_seen, "");

    struct vfs_ops v2 = NOP_OPS("vtwo");
    v2.config = v2_config;
    v2.stats = v2_stats;
    ck_assert_int_eq(vfs_register(&v2), 0);
    ck_assert_int_eq(vfs_config("vtwo", "color", "blue"), 0);
    ck_assert_str_eq(cfg_seen, "color=blue");
    r = vfs_config("vtwo", "shape", "round");
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "unknown key shape");
    r = vfs_config("nosuchscheme", "a", "b");
    ck_assert_int_eq(r, -EINVAL);
    ck_assert_msg_has(r, "unknown storage scheme");
    int n = 0;
    ck_assert_int_eq(vfs_stats(count_stats, &n), 0);
    ck_assert_int_eq(n, 1);
}
END_TEST

static atomic_int in_flight, max_in_flight;

static int slow_pread(void *h, void *buf, size_t len, uint64_t off)
{
    int now = atomic_fetch_add(&in_flight, 1) + 1;
    int seen = atomic_load(&max_in_flight);
    while (now > seen && !atomic_compare_exchange_weak(&max_in_flight, &seen, now))
        ;
    usleep(1000);
    atomic_fetch_sub(&in_flight, 1);
    memset(buf, 's', len);
    return 0;
}

static void *slow_reader(void *arg)
{
    char c;
    for (int i = 0; i < 20; i++)
        if (vfs_pread(arg, &c, 1, 0) != 0)
            return arg;
    return NULL;
}

START_TEST(test_serialize_backend_gets_one_call_at_a_time)
{
    struct vfs_ops ops = NOP_OPS("serial");
    pthread_t t[4];
    ops.thread_model = VFS_THREAD_SERIALIZE;
    ops.pread = slow_pread;
    ck_assert_int_eq(vfs_register(&ops), 0);
    struct vfs_file *f = open_ok("serial:x", VFS_O_RDONLY);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, slow_reader, f), 0);
    for (int i = 0; i < 4; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        ck_assert_ptr_null(ret);
    }
    int most = atomic_load(&max_in_flight);
    ck_assert_int_eq(most, 1);
    vfs_close(f);
}
END_TEST

/* ---- the fault filter ---- */

START_TEST(test_fault_fails_nth_read_once)
{
    char buf[4];
    struct vfs_file *m = open_ok("mem:fr", VFS_O_RDWR | VFS_O_CREATE);
    vfs_close(m);
    struct vfs_file *f = open_ok("fault:mem:fr", VFS_O_RDONLY);
    ck_assert_str_eq(vfs_file_uri(f), "fault:mem:fr");
    vfs_fault_arm(VFS_FAULT_READ, 3, EIO);
    ck_assert_int_eq(vfs_pread(f, buf, 4, 0), 0);
    ck_assert_int_eq(vfs_pread(f, buf, 4, 0), 0);
    ck_assert(!vfs_fault_fired());
    int r = vfs_pread(f, buf, 4, 0);
    ck_assert_int_eq(r, -EIO);
    ck_assert_msg_has(r, "injected");
    ck_assert_msg_has(r, "mem:fr");
    ck_assert(vfs_fault_fired());
    ck_assert_int_eq(vfs_pread(f, buf, 4, 0), 0); /* once only */
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_READ), 4);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_WRITE), 0);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_ANY), 4);
    vfs_close(f);
}
END_TEST

START_TEST(test_fault_fails_nth_write_with_enospc)
{
    char buf[2] = {0};
    struct vfs_file *f = open_ok("fault:mem:fw", VFS_O_RDWR | VFS_O_CREATE);
    vfs_fault_arm(VFS_FAULT_WRITE, 2, ENOSPC);
    ck_assert_int_eq(vfs_pwrite(f, "a", 1, 0), 0);
    ck_assert_int_eq(vfs_pwrite(f, "b", 1, 0), -ENOSPC);
    ck_assert_int_eq(vfs_pread(f, buf, 1, 0), 0);
    ck_assert_str_eq(buf, "a"); /* the failed write changed nothing */
    ck_assert_int_eq(vfs_pwrite(f, "c", 1, 0), 0);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_WRITE), 3);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_READ), 1);

    vfs_fault_arm(VFS_FAULT_FLUSH, 1, EIO);
    ck_assert_int_eq(vfs_flush(f), -EIO);
    ck_assert_int_eq(vfs_flush(f), 0);
    vfs_fault_arm(VFS_FAULT_TRUNCATE, 2, EROFS);
    ck_assert_int_eq(vfs_truncate(f, 10), 0);
    ck_assert_int_eq(vfs_truncate(f, 20), -EROFS);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_FLUSH), 0); /* arming restarts counting */

    vfs_fault_arm(VFS_FAULT_ANY, 3, ENOSPC);
    ck_assert_int_eq(vfs_pread(f, buf, 1, 0), 0);
    ck_assert_int_eq(vfs_pwrite(f, "d", 1, 0), 0);
    ck_assert_int_eq(vfs_flush(f), -ENOSPC);
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_ANY), 3);

    vfs_fault_arm(VFS_FAULT_WRITE, 1, EIO);
    vfs_fault_disarm();
    ck_assert_int_eq(vfs_pwrite(f, "e", 1, 0), 0);
    ck_assert(!vfs_fault_fired());
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_WRITE), 1);
    vfs_close(f);
}
END_TEST

START_TEST(test_fault_forwards_everything_else)
{
    char p[PATH_MAX], uri[PATH_MAX + 16], real[PATH_MAX + 16], names[64] = "";
    uint64_t pnum;
    struct vfs_stat st;
    static unsigned char buf[1 << 17];
    snprintf(uri, sizeof uri, "fault:%s", in_tmp(p, "f.img"));
    struct vfs_file *f = open_ok(uri, VFS_O_RDWR | VFS_O_CREATE);
    snprintf(real, sizeof real, "fault:%s", realpath(p, (char[PATH_MAX]){0}));
    ck_assert_str_eq(vfs_file_uri(f), real);
    ck_assert_uint_eq(vfs_caps(f), VFS_CAP_DISCARD | VFS_CAP_BLOCK_STATUS);
    memset(buf, 1, sizeof buf);
    ck_assert_int_eq(vfs_pwrite(f, buf, sizeof buf, 0), 0);
    int r = vfs_discard(f, 0, 1 << 16);
    if (r != -EOPNOTSUPP) {
        ck_assert_int_eq(r, 0);
        ck_assert_int_eq(vfs_block_status(f, 0, sizeof buf, &pnum), VFS_BS_HOLE);
        ck_assert_uint_eq(pnum, 1 << 16);
    }
    vfs_close(f);

    snprintf(uri, sizeof uri, "fault:%s", tmpdir);
    ck_assert_int_eq(vfs_list(uri, collect, names), 0);
    ck_assert_str_eq(names, "f.img");
    snprintf(uri, sizeof uri, "fault:%s", p);
    ck_assert_int_eq(vfs_stat(uri, &st), 0);
    ck_assert_uint_eq(st.size, sizeof buf);
    snprintf(real, sizeof real, "fault:%s/g.img", tmpdir);
    ck_assert_int_eq(vfs_rename(uri, real), 0);
    ck_assert_int_eq(vfs_remove(real), 0);
    ck_assert_int_eq(vfs_stat(real, &st), -ENOENT);
    ck_assert_int_eq(vfs_open("fault:mem:nothing", VFS_O_RDONLY, &f), -ENOENT);
}
END_TEST

/* QCOWD_FAULT is read once, at the first use: this test needs a fresh process
 * (CK_FORK, the default) whose first fault call comes after the setenv. */
START_TEST(test_fault_armed_from_environment)
{
    const char *fork = getenv("CK_FORK");
    if (fork && strcmp(fork, "no") == 0)
        return;
    setenv("QCOWD_FAULT", "write:2:ENOSPC", 1);
    struct vfs_file *f = open_ok("fault:mem:env", VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "a", 1, 0), 0);
    ck_assert_int_eq(vfs_pwrite(f, "a", 1, 0), -ENOSPC);
    ck_assert(vfs_fault_fired());
    vfs_close(f);
    unsetenv("QCOWD_FAULT");
}
END_TEST

/* The daemon's forms (fresh process, as above): "N+" fails every call from the
 * Nth, a fourth field only the files whose URI contains it, and "open" the opens. */
START_TEST(test_fault_environment_sticky_matching_open)
{
    const char *fork = getenv("CK_FORK");
    if (fork && strcmp(fork, "no") == 0)
        return;
    setenv("QCOWD_FAULT", "open:2+:EACCES:locked", 1);
    struct vfs_file *f, *other = open_ok("fault:mem:other", VFS_O_RDWR | VFS_O_CREATE);
    f = open_ok("fault:mem:locked", VFS_O_RDWR | VFS_O_CREATE); /* open #1 of it */
    vfs_close(f);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(vfs_open("fault:mem:locked", VFS_O_RDONLY, &f), -EACCES);
        ck_assert_msg(strstr(err_msg(-EACCES), "mem:locked") && strstr(err_msg(-EACCES), "Permission denied"),
                      "%s", err_msg(-EACCES));
    }
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_OPEN), 4); /* the other file's open is not counted */
    ck_assert_uint_eq(vfs_fault_count(VFS_FAULT_ANY), 0);  /* "any" counts no opens */
    vfs_close(other);
    f = open_ok("fault:mem:other", VFS_O_RDONLY);
    vfs_close(f);
    unsetenv("QCOWD_FAULT");
}
END_TEST

/* ---- threads ---- */

#define PAT(i) ((unsigned char)(((i) * 2654435761u) >> 24))
#define BIG (1u << 20)

struct reader {
    struct vfs_file *f;
    unsigned seed;
    int bad; /* reads that failed or returned wrong bytes */
};

static void *random_reader(void *arg)
{
    struct reader *rd = arg;
    unsigned char buf[8192];
    for (int i = 0; i < 300; i++) {
        size_t len = 1 + rand_r(&rd->seed) % sizeof buf;
        uint64_t off = rand_r(&rd->seed) % (BIG - len);
        if (vfs_pread(rd->f, buf, len, off) != 0) {
            rd->bad++;
            continue;
        }
        for (size_t j = 0; j < len; j++)
            if (buf[j] != PAT(off + j)) {
                rd->bad++;
                break;
            }
    }
    return NULL;
}

static void check_parallel_reads(const char *uri)
{
    static unsigned char data[BIG];
    pthread_t t[8];
    struct reader rd[8];
    for (uint32_t i = 0; i < BIG; i++)
        data[i] = PAT(i);
    struct vfs_file *f = open_ok(uri, VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, data, BIG, 0), 0);
    for (int i = 0; i < 8; i++) {
        rd[i] = (struct reader){.f = f, .seed = 1234u + (unsigned)i};
        ck_assert_int_eq(pthread_create(&t[i], NULL, random_reader, &rd[i]), 0);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(rd[i].bad, 0);
    }
    vfs_close(f);
}

START_TEST(test_concurrent_preads_on_one_handle)
{
    char p[PATH_MAX];
    check_parallel_reads(in_tmp(p, "par.img"));
    check_parallel_reads("mem:par");
}
END_TEST

/* ---- a deferred publish (vfs_pending_*) ---- */

static void put_text(const char *uri, const char *text)
{
    struct vfs_file *f = open_ok(uri, VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_truncate(f, 0), 0);
    ck_assert_int_eq(vfs_pwrite(f, text, strlen(text), 0), 0);
    vfs_close(f);
}

static void expect_text(const char *uri, const char *text)
{
    char buf[32] = {0};
    struct vfs_stat st;
    ck_assert_int_eq(vfs_stat(uri, &st), 0);
    ck_assert_uint_eq(st.size, strlen(text));
    struct vfs_file *f = open_ok(uri, VFS_O_RDONLY);
    ck_assert_int_eq(vfs_pread(f, buf, strlen(text), 0), 0);
    ck_assert_str_eq(buf, text);
    vfs_close(f);
}

/* Old content at final; a publish made, read back, refused while the name is
 * taken (EXCL), committed; another aborted. deferred: the backend's own. */
static void check_pending(const char *final, const char *temp, int deferred)
{
    struct vfs_pending *p;
    struct vfs_file *f, *g;
    struct vfs_stat st;
    char buf[8] = {0};
    put_text(final, "old");

    ck_assert_int_eq(vfs_pending_begin(final, temp, &p), 0);
    ck_assert_int_eq(vfs_pending_deferred(p), deferred);
    const char *work = vfs_pending_uri(p);
    if (deferred)
        ck_assert_int_eq(strncmp(work, "pending:", 8), 0);
    else
        ck_assert_str_eq(work, temp);
    ck_assert_int_eq(vfs_open(work, VFS_O_RDWR, &f), -ENOENT); /* not created yet */
    ck_assert_int_eq(vfs_pending_commit(p, 0), -ENOENT); /* nothing made yet */
    f = open_ok(work, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL);
    ck_assert_int_eq(vfs_open(work, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &g), -EEXIST);
    ck_assert_int_eq(vfs_pwrite(f, "new!", 4, 0), 0);
    g = open_ok(work, VFS_O_RDONLY); /* one object behind both */
    int r = vfs_pwrite(g, "x", 1, 0);
    ck_assert_int_eq(r, -EBADF);
    if (deferred) /* messages name the final URI, never the private work URI */
        ck_assert_msg(strstr(err_msg(r), final) && !strstr(err_msg(r), "pending:"), "message: %s", err_msg(r));
    ck_assert_int_eq(vfs_pread(g, buf, 4, 0), 0);
    ck_assert_str_eq(buf, "new!");
    vfs_close(g);
    ck_assert_int_eq(vfs_stat(work, &st), 0);
    ck_assert_uint_eq(st.size, 4);
    expect_text(final, "old"); /* nothing visible before the commit */
    char *r1 = vfs_resolve(work, "b.qcow2"), *r2 = vfs_resolve(final, "b.qcow2");
    ck_assert_str_eq(r1, r2); /* names beside it are beside the final name */
    free(r1);
    free(r2);
    vfs_close(f);
    ck_assert_int_eq(vfs_pending_commit(p, VFS_COMMIT_EXCL), -EEXIST);
    expect_text(final, "old");
    ck_assert_int_eq(vfs_pending_commit(p, 0), 0);
    expect_text(final, "new!");
    ck_assert_int_eq(vfs_pending_commit(p, 0), -EINVAL);
    vfs_pending_end(p);
    expect_text(final, "new!");
    if (!deferred)
        ck_assert_int_eq(vfs_stat(temp, &st), -ENOENT); /* renamed away */

    /* an abort: nothing visible, the work object gone */
    ck_assert_int_eq(vfs_pending_begin(final, temp, &p), 0);
    char *w = strdup(vfs_pending_uri(p));
    f = open_ok(w, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL);
    ck_assert_int_eq(vfs_pwrite(f, "partial", 7, 0), 0);
    vfs_close(f);
    vfs_pending_end(p);
    expect_text(final, "new!");
    ck_assert_int_eq(vfs_stat(w, &st), -ENOENT);
    ck_assert_int_eq(vfs_open(w, VFS_O_RDONLY, &f), -ENOENT);
    free(w);

    /* an exclusive publish of a new name */
    ck_assert_int_eq(vfs_remove(final), 0);
    ck_assert_int_eq(vfs_pending_begin(final, temp, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL);
    ck_assert_int_eq(vfs_pwrite(f, "fresh", 5, 0), 0);
    vfs_close(f);
    ck_assert_int_eq(vfs_stat(final, &st), -ENOENT);
    ck_assert_int_eq(vfs_pending_commit(p, VFS_COMMIT_EXCL), 0);
    vfs_pending_end(p);
    expect_text(final, "fresh");
}

START_TEST(test_pending_publish_deferred_and_fallback)
{
    char a[PATH_MAX], t[PATH_MAX];
    check_pending("mem:dir/pub.qcow2", "mem:dir/.pub.tmp", 1); /* mem defers by itself */
    check_pending(in_tmp(a, "pub.qcow2"), in_tmp(t, ".pub.tmp"), 0);
}
END_TEST

/* A handle open on the work URI when the publish is ended keeps the object
 * alive (never published); the backend's handle closes with the last one. */
START_TEST(test_pending_end_with_open_handle)
{
    struct vfs_pending *p;
    struct vfs_file *f;
    struct vfs_stat st;
    char buf[4] = {0};
    ck_assert_int_eq(vfs_pending_begin("mem:held.qcow2", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "abc", 3, 0), 0);
    vfs_pending_end(p);
    ck_assert_int_eq(vfs_pread(f, buf, 3, 0), 0);
    ck_assert_str_eq(buf, "abc");
    vfs_close(f);
    ck_assert_int_eq(vfs_stat("mem:held.qcow2", &st), -ENOENT);
    /* a fallback store needs the caller's temporary name */
    ck_assert_int_eq(vfs_pending_begin(in_tmp((char[PATH_MAX]){0}, "x"), NULL, &p), -EINVAL);
}
END_TEST

/* A deferred backend recording .release calls, for test_release_reaches_v5_deferred_handles_only. */
static struct {
    int calls;
    uint64_t off, len;
} rel_seen;
static char rel_handle;
static int rel_open_deferred(const char *path, void **h)
{
    *h = &rel_handle;
    return 0;
}
static int rel_commit(void *h, unsigned flags)
{
    return 0;
}
static int rel_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    return 0;
}
static int rel_release(void *h, uint64_t off, uint64_t len)
{
    ck_assert_ptr_eq(h, &rel_handle);
    rel_seen.calls++;
    rel_seen.off = off;
    rel_seen.len = len;
    return 0;
}

/* Version 5's .release: called for a file on a deferred pending's work URI
 * of a version 5 backend; a no-op returning 0 elsewhere (a plain open of the
 * same backend, a version 4 backend whose struct holds a pointer there, mem,
 * which has none); a read-only file or a wrapping range is refused first. */
START_TEST(test_release_reaches_v5_deferred_handles_only)
{
    struct vfs_pending *p;
    struct vfs_file *f;
    struct vfs_ops v5 = NOP_OPS("relfive");
    v5.pwrite = rel_pwrite;
    v5.open_deferred = rel_open_deferred;
    v5.commit = rel_commit;
    v5.release = rel_release;
    ck_assert_int_eq(vfs_register(&v5), 0);
    struct vfs_ops v4 = v5;
    v4.name = "relfour";
    v4.version = 4;
    ck_assert_int_eq(vfs_register(&v4), 0);

    ck_assert_int_eq(vfs_pending_begin("relfive:a", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_release(f, 4096, 1 << 20), 0);
    ck_assert_int_eq(rel_seen.calls, 1);
    ck_assert_uint_eq(rel_seen.off, 4096);
    ck_assert_uint_eq(rel_seen.len, 1 << 20);
    ck_assert_int_eq(vfs_release(f, 0, 0), 0); /* empty: not passed on */
    ck_assert_int_eq(vfs_release(f, UINT64_MAX - 10, 20), -EINVAL);
    ck_assert_int_eq(rel_seen.calls, 1);
    vfs_close(f);
    vfs_pending_end(p);

    f = open_ok("relfive:b", VFS_O_RDWR); /* not deferred: nothing staged for it */
    ck_assert_int_eq(vfs_release(f, 0, 10), 0);
    vfs_close(f);
    f = open_ok("relfive:b", VFS_O_RDONLY);
    ck_assert_int_eq(vfs_release(f, 0, 10), -EBADF);
    vfs_close(f);

    ck_assert_int_eq(vfs_pending_begin("relfour:a", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_release(f, 0, 10), 0);
    vfs_close(f);
    vfs_pending_end(p);
    ck_assert_int_eq(rel_seen.calls, 1);

    ck_assert_int_eq(vfs_pending_begin("mem:rel.qcow2", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_pwrite(f, "abc", 3, 0), 0);
    ck_assert_int_eq(vfs_release(f, 0, 3), 0);
    vfs_close(f);
    vfs_pending_end(p);
}
END_TEST

/* A deferred backend whose .wait_room answers what room_ready says and
 * records the wake it is given, for test_wait_room_reaches_v6_deferred_handles_only. */
static struct {
    int calls, ready;
    void (*wake)(void *);
    void *ctx;
} room_seen;
static int room_wait(void *h, void (*wake)(void *), void *ctx)
{
    ck_assert_ptr_eq(h, &rel_handle);
    room_seen.calls++;
    if (room_seen.ready <= 0) {
        room_seen.wake = wake;
        room_seen.ctx = ctx;
    }
    return room_seen.ready;
}
static void room_woken(void *ctx)
{
    ++*(int *)ctx;
}

/* Version 6's .wait_room: asked for a file on a deferred pending's work URI
 * of a version 6 backend (1 ready; 0 with the wake armed, which the backend
 * calls later; a failure passed on); 1 without asking elsewhere (a plain
 * open, a read-only file, a version 5 backend whose struct holds a pointer
 * there, mem, which has none). */
START_TEST(test_wait_room_reaches_v6_deferred_handles_only)
{
    struct vfs_pending *p;
    struct vfs_file *f;
    int woken = 0;
    struct vfs_ops v6 = NOP_OPS("roomsix");
    v6.pwrite = rel_pwrite;
    v6.open_deferred = rel_open_deferred;
    v6.commit = rel_commit;
    v6.wait_room = room_wait;
    ck_assert_int_eq(vfs_register(&v6), 0);
    struct vfs_ops v5 = v6;
    v5.name = "roomfive";
    v5.version = 5;
    ck_assert_int_eq(vfs_register(&v5), 0);

    ck_assert_int_eq(vfs_pending_begin("roomsix:a", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    room_seen.ready = 1;
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 1);
    ck_assert_int_eq(room_seen.calls, 1);
    room_seen.ready = 0;
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 0);
    ck_assert_int_eq(room_seen.calls, 2);
    ck_assert_ptr_eq(room_seen.ctx, &woken);
    room_seen.wake(room_seen.ctx); /* the backend, later */
    ck_assert_int_eq(woken, 1);
    room_seen.ready = -EIO;
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), -EIO);
    vfs_close(f);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDONLY);
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 1);
    vfs_close(f);
    vfs_pending_end(p);
    ck_assert_int_eq(room_seen.calls, 3);

    f = open_ok("roomsix:b", VFS_O_RDWR); /* not deferred */
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 1);
    vfs_close(f);
    ck_assert_int_eq(vfs_pending_begin("roomfive:a", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 1);
    vfs_close(f);
    vfs_pending_end(p);
    ck_assert_int_eq(vfs_pending_begin("mem:room.qcow2", NULL, &p), 0);
    f = open_ok(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE);
    ck_assert_int_eq(vfs_wait_room(f, room_woken, &woken), 1);
    vfs_close(f);
    vfs_pending_end(p);
    ck_assert_int_eq(room_seen.calls, 3);
    ck_assert_int_eq(woken, 1);
}
END_TEST

static Suite *vfs_suite(void)
{
    Suite *s = suite_create("vfs");
    struct {
        const char *name;
        const TTest *tests[12];
    } groups[] = {
        {"file",
         {test_file_read_write_resize_flush, test_file_read_past_eof_zero_fills,
          test_file_create_excl_and_flags, test_file_missing_is_enoent_naming_path,
          test_file_discard_reads_zero_and_is_a_hole, test_file_list_stat_rename_remove,
          test_file_uri_is_canonical, test_file_system_eperm_is_eacces}},
        {"mem",
         {test_mem_read_write_resize_flush, test_mem_objects_are_shared_and_persist,
          test_mem_create_excl_missing_and_names, test_mem_discard_block_status_and_limits,
          test_mem_list_stat_rename, test_mem_max_object_is_a_setting}},
        {"names", {test_uri_scheme_dispatch, test_resolve_relative_names, test_name_containment}},
        {"plugins",
         {test_plugin_loads_and_serves_reads, test_plugin_bad_objects_are_refused,
          test_register_refuses_bad_ops, test_serialize_backend_gets_one_call_at_a_time,
          test_v1_and_v2_plugins_configure}},
        {"fault",
         {test_fault_fails_nth_read_once, test_fault_fails_nth_write_with_enospc,
          test_fault_forwards_everything_else, test_fault_armed_from_environment,
          test_fault_environment_sticky_matching_open}},
        {"threads", {test_concurrent_preads_on_one_handle}},
        {"pending",
         {test_pending_publish_deferred_and_fallback, test_pending_end_with_open_handle,
          test_release_reaches_v5_deferred_handles_only, test_wait_room_reaches_v6_deferred_handles_only}},
    };
    for (size_t g = 0; g < sizeof groups / sizeof groups[0]; g++) {
        TCase *tc = tcase_create(groups[g].name);
        tcase_add_checked_fixture(tc, tmp_setup, tmp_teardown);
        tcase_set_timeout(tc, 60);
        for (size_t i = 0; i < 12 && groups[g].tests[i]; i++)
            tcase_add_test(tc, groups[g].tests[i]);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(vfs_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
