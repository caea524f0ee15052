/* config.h: qcowd's configuration file: "key = value" lines whose keys are the
 * long option names, turned into "--key=value" arguments for getopt_long. */
#ifndef QCOWD_CONFIG_H
#define QCOWD_CONFIG_H

#include <getopt.h>

/* The settings of one file as arguments. argv[0] is a copy of the program name,
 * argv[1..argc-1] are "--key=value" (or "--key" for a flag set to true), in file
 * order; line[i] is the line argv[i] came from (0 for argv[0]). */
struct config_args {
    int argc;
    char **argv; /* argc + 1 entries, NULL-terminated */
    unsigned *line;
    const char *path; /* borrowed: the file name, for messages */
};

/* Read path into *out. Keys are looked up in lo (getopt_long's table, ending in
 * a zero entry), so every long option can be set, including options added later,
 * except those named in skip (NULL-terminated, e.g. "config", "help"). Syntax:
 * '#' starts a comment line; blank lines are ignored; "key = value" or "key value"
 * with the value running to the end of the line (spaces trimmed, quotes not
 * special); a flag (no_argument) takes true/false, yes/no, on/off or 1/0, or no
 * value (true); a flag set to false is left out. Returns 0, or -1 after printing
 * "qcowd: FILE:LINE: reason" (unknown key, missing or unexpected value, an
 * unreadable file) to stderr. */
int config_read(const char *path, const char *prog, const struct option *lo, const char *const *skip,
                struct config_args *out);

void config_args_free(struct config_args *a);

#endif
