/* ctl.h: what qcowctl's command files share: the output mode, argument parsing,
 * JSON requests and printing, and the commands themselves (grouped by file). */
#ifndef QCOWCTL_CTL_H
#define QCOWCTL_CTL_H

#include <stdbool.h>
#include <stdint.h>

#include <getopt.h>

#include <jansson.h>

#include "http.h"

/* --output=json: every command prints compact JSON (one document, or one per line
 * for `events`) instead of text meant for people. */
extern bool ctl_json;

/* Prints `qcowctl: MESSAGE` on stderr; returns EXIT_FAIL. */
int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints `qcowctl: MESSAGE` on stderr; returns EXIT_USAGE. */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses a byte count (digits with an optional k/M/G/T/P/E binary suffix) into *out;
 * returns 0 or EXIT_USAGE after a message naming `what`. */
int parse_size(const char *s, const char *what, uint64_t *out);

/* "/v1/images/NAME" + suffix with NAME escaped, or "/v1/images/NAME/" + sub + "/"
 * + item (escaped) + suffix when sub is set; malloc'ed, NULL after a message. */
char *image_path(const char *name, const char *suffix);
char *item_path(const char *name, const char *sub, const char *item, const char *suffix);

/* Parses a JSON answer; NULL after a message when it is not JSON. A new reference. */
json_t *parse_answer(const struct http_resp *resp);
/* Prints j: compact on one line with --output=json, else indented. Returns an exit status. */
int print_json(json_t *j);

/* One request with an optional JSON body (NULL: none); on success *answer is the
 * parsed answer (a new reference; NULL for an empty body) when answer is set.
 * Returns an exit status. */
int call_json(const char *method, const char *path, json_t *body, json_t **answer);
/* call_json, then the answer printed (or `key` of it in text mode when set). */
int call_print(const char *method, const char *path, json_t *body, const char *key);

/* call_json (print false) or call_print (true, no key) on path, which it frees;
 * a NULL path (a failed image_path) is EXIT_FAIL. */
int call_at(const char *method, char *path, json_t *body, bool print);

/* getopt_long over a command's arguments from scratch (options may follow operands).
 * Returns the option's value, -1 at the end, or '?' after printing a usage error. */
int ctl_getopt(int argc, char **argv, const struct option *opts);

/* images.c: the catalog, guest data, the container, tickets, health, metrics */
int cmd_list(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_rm(int argc, char **argv);
int cmd_read(int argc, char **argv);
int cmd_write(int argc, char **argv);
int cmd_zero_discard(int argc, char **argv);
int cmd_flush(int argc, char **argv);
int cmd_extents(int argc, char **argv);
int cmd_size(int argc, char **argv);
int cmd_features(int argc, char **argv);
int cmd_upload(int argc, char **argv);
int cmd_download(int argc, char **argv);
int cmd_health(int argc, char **argv);
int cmd_whoami(int argc, char **argv);
int cmd_metrics(int argc, char **argv);
int cmd_ticket_list(int argc, char **argv);
int cmd_ticket_create(int argc, char **argv);
int cmd_ticket_revoke(int argc, char **argv);

/* meta.c: snapshots and bitmaps */
int cmd_snapshot_list(int argc, char **argv);
int cmd_snapshot_job(int argc, char **argv); /* create, delete, revert */
int cmd_snapshot_read(int argc, char **argv);
int cmd_bitmap_list(int argc, char **argv);
int cmd_bitmap_info(int argc, char **argv);
int cmd_bitmap_add(int argc, char **argv);
int cmd_bitmap_remove(int argc, char **argv);
int cmd_bitmap_op(int argc, char **argv); /* clear, enable, disable */
int cmd_bitmap_merge(int argc, char **argv);

/* jobs.c: the job-starting commands, jobs, waiting with progress, events */
int cmd_commit(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_jobs(int argc, char **argv);
int cmd_job(int argc, char **argv);
int cmd_job_op(int argc, char **argv); /* pause, resume, cancel, dismiss */
int cmd_wait(int argc, char **argv);
int cmd_events(int argc, char **argv);
/* Starts a job (method on path with body, answered 202 and the job) and either
 * prints it or, with wait, follows it to its end (wait_job). Takes body. Returns
 * an exit status. */
int start_job(const char *method, const char *path, json_t *body, bool wait);
/* Follows job `id` until it concludes, a progress bar on stderr when it is a
 * terminal; prints the result. EXIT_FAIL with the job's error when it failed or
 * was cancelled. */
int wait_job(const char *id);

/* images.c's ranged read, shared with `snapshot read`: path's bytes to stdout. */
int read_range(const char *path, int argc, char **argv);

#endif
