/* web.h: the dashboard's files (clients/web), embedded into the binary at build
 * time by clients/web/embed.cmake; a fixed table, the only files GET / serves. */
#ifndef QCOWD_WEB_H
#define QCOWD_WEB_H

#include <stddef.h>

struct web_file {
    const char *name;          /* "index.html", "app.js": no '/' */
    const char *type;          /* Content-Type */
    const char *etag;          /* "\"SHA-1 of the bytes\"" */
    const unsigned char *data; /* the bytes (NUL after them) */
    size_t len;
};

extern const struct web_file web_files[];
extern const unsigned web_files_n;

#endif
