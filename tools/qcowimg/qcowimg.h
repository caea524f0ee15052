/* qcowimg.h: the offline tool's shared pieces: option parsing helpers and the
 * subcommands, one file each. */
#ifndef QCOWIMG_H
#define QCOWIMG_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "qcow2.h"

/* Print "qcowimg: FILE: reason" to stderr and return 1 (the exit status). */
int fail(const char *file, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Same, with the reason from err_msg(ret). */
int fail_err(const char *file, int ret);

/* Print j (taken) as qemu-img prints JSON (4-space indent) and return 0; a NULL j
 * or a failed dump is out of memory: fail(file, ...) and 1. */
int put_json(const char *file, json_t *j);

/* Open file for reading with -f FMT and an optional snapshot; prints on error. */
int open_image(const char *file, const char *fmt, const char *snapshot, struct qcow2_image **img);

/* Parse a byte count with an optional k/M/G/T suffix; -1 on error. */
int64_t parse_size(const char *s);

int cmd_info(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_read(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_write(int argc, char **argv);
int cmd_zero(int argc, char **argv);
int cmd_discard(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_bitmap(int argc, char **argv);
int cmd_dirty(int argc, char **argv);
int cmd_commit(int argc, char **argv);
/* qemu-img's "Snapshot list:" table. */
void print_snapshot_table(const struct qcow2_info *in);
/* Parse qemu-img's -o key=value,... create options into *o (s is modified). */
int parse_create_opts(const char *file, char *s, struct qcow2_create_opts *o);

#endif
