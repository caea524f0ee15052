/* checkreport.c: qemu-img check --output=json's object for a check result,
 * shared by the check job and qcowimg check. */
#include "checkreport.h"

json_t *svc_check_report(const char *file, const struct qcow2_check_result *r)
{
    json_t *o = json_object();
#define PUT_NZ(key, v)                                                                                                 \
    do {                                                                                                               \
        if (v)                                                                                                         \
            json_object_set_new(o, key, json_integer((json_int_t)(v)));                                                \
    } while (0)
    PUT_NZ("image-end-offset", r->image_end_offset);
    PUT_NZ("total-clusters", r->total_clusters);
    PUT_NZ("allocated-clusters", r->allocated_clusters);
    PUT_NZ("fragmented-clusters", r->fragmented_clusters);
    PUT_NZ("compressed-clusters", r->compressed_clusters);
    PUT_NZ("corruptions", r->corruptions);
    PUT_NZ("leaks", r->leaks);
    PUT_NZ("corruptions-fixed", r->corruptions_fixed);
    PUT_NZ("leaks-fixed", r->leaks_fixed);
#undef PUT_NZ
    json_object_set_new(o, "check-errors", json_integer((json_int_t)r->check_errors));
    json_object_set_new(o, "filename", json_string(file));
    json_object_set_new(o, "format", json_string("qcow2"));
    return o;
}
