/* checkreport.h: a check result as `qemu-img check --output=json` prints it. */
#ifndef QCOWD_CHECKREPORT_H
#define QCOWD_CHECKREPORT_H

#include <jansson.h>

#include "qcow2.h"

/* The report object (new reference, NULL on ENOMEM): qemu-img's keys, counters
 * that are 0 left out as qemu-img does, file as the "filename". */
json_t *svc_check_report(const char *file, const struct qcow2_check_result *r);

#endif
