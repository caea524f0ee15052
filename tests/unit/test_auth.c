/* test_auth.c: the bearer-token file parser, constant-time lookup, roles and
 * new tokens (api/auth.c). */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access.h"
#include "auth.h"
#include "err.h"
#include "ticket.h"

/* SHA-256("secret-token"), computed by the test itself so the test fails when
 * the hashing does. */
static void line_for(const char *name, const char *role, const char *token, char *out, size_t cap)
{
    uint8_t h[AUTH_HASH_LEN];
    ck_assert_int_eq(auth_sha256(token, strlen(token), h), 0);
    int o = snprintf(out, cap, "%s %s sha256:", name, role);
    for (int i = 0; i < AUTH_HASH_LEN; i++)
        o += snprintf(out + o, cap - (size_t)o, "%02x", h[i]);
}

START_TEST(sha256_known_vector)
{
    /* FIPS 180-2 test vector "abc" */
    static const uint8_t want[AUTH_HASH_LEN] = {
        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
        0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};
    uint8_t h[AUTH_HASH_LEN];
    ck_assert_int_eq(auth_sha256("abc", 3, h), 0);
    ck_assert_mem_eq(h, want, AUTH_HASH_LEN);
}
END_TEST

START_TEST(parse_finds_each_token_with_its_role)
{
    char a[200], b[200], c[200], text[1000];
    line_for("backup-agent", "reader", "tok-a", a, sizeof a);
    line_for("orchestrator", "operator", "tok-b", b, sizeof b);
    line_for("root@ops", "admin", "tok-c", c, sizeof c);
    snprintf(text, sizeof text, "# tokens\n\n%s\n  %s   # trailing comment\r\n\t%s", a, b, c);
    struct auth_tokens *t = NULL;
    ck_assert_int_eq(auth_tokens_parse(text, strlen(text), "tokens", &t), 0);
    ck_assert_uint_eq(t->n, 3);
    const struct auth_token *k = auth_tokens_find(t, "tok-b", 5);
    ck_assert_ptr_nonnull(k);
    ck_assert_str_eq(k->name, "orchestrator");
    ck_assert_int_eq(k->role, AUTH_OPERATOR);
    ck_assert_int_eq(auth_tokens_find(t, "tok-c", 5)->role, AUTH_ADMIN);
    ck_assert_int_eq(auth_tokens_find(t, "tok-a", 5)->role, AUTH_READER);
    ck_assert_ptr_null(auth_tokens_find(t, "tok-d", 5));
    ck_assert_ptr_null(auth_tokens_find(t, "tok-", 4));
    ck_assert_ptr_null(auth_tokens_find(t, "", 0));
    auth_tokens_free(t);
}
END_TEST

static void refused(const char *text, const char *want)
{
    struct auth_tokens *t = (struct auth_tokens *)0x1;
    err_clear();
    int ret = auth_tokens_parse(text, strlen(text), "f", &t);
    ck_assert_msg(ret < 0, "accepted: %s", text);
    ck_assert_ptr_eq(t, (struct auth_tokens *)0x1);
    ck_assert_msg(strstr(err_msg(ret), want), "%s: message '%s' lacks '%s'", text, err_msg(ret), want);
}

START_TEST(parse_refuses_bad_lines_naming_the_line)
{
    char good[200], text[600];
    line_for("a", "reader", "x", good, sizeof good);
    refused("a reader", "f:1: expected");
    refused("a boss sha256:00", "f:1: the role");
    refused("a reader md5:00", "f:1: the hash");
    snprintf(text, sizeof text, "%s\n%s\n", good, good);
    refused(text, "f:2: the name a is given twice");
    snprintf(text, sizeof text, "%s extra", good);
    refused(text, "more than three fields");
    snprintf(text, sizeof text, "#\nb/c%s", good + 1);
    refused(text, "f:2: the name may hold only");
    snprintf(text, sizeof text, "%s", good);
    text[strlen(text) - 1] = 'g'; /* not a hex digit */
    refused(text, "64 hex digits");
    snprintf(text, sizeof text, "%s0", good); /* 65 digits */
    refused(text, "64 hex digits");
}
END_TEST

START_TEST(parse_refuses_nul_and_oversize)
{
    char text[64] = "a reader sha256:";
    text[3] = '\0';
    struct auth_tokens *t = NULL;
    ck_assert_int_lt(auth_tokens_parse(text, 20, "f", &t), 0);
    ck_assert_ptr_null(t);
    char *big = malloc(AUTH_FILE_MAX + 2);
    memset(big, '#', AUTH_FILE_MAX + 1);
    ck_assert_int_eq(auth_tokens_parse(big, AUTH_FILE_MAX + 1, "f", &t), -EFBIG);
    ck_assert_int_eq(auth_tokens_parse(big, AUTH_FILE_MAX, "f", &t), 0); /* all comment */
    ck_assert_uint_eq(t->n, 0);
    auth_tokens_free(t);
    free(big);
}
END_TEST

START_TEST(new_tokens_are_random_and_their_line_parses)
{
    char a[AUTH_TOKEN_LEN + 1], b[AUTH_TOKEN_LEN + 1], line[200];
    ck_assert_int_eq(auth_token_new(a), 0);
    ck_assert_int_eq(auth_token_new(b), 0);
    ck_assert_uint_eq(strlen(a), AUTH_TOKEN_LEN);
    ck_assert_str_ne(a, b);
    ck_assert_uint_eq(strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), AUTH_TOKEN_LEN);
    ck_assert_int_eq(auth_token_line("ci", AUTH_OPERATOR, a, line, sizeof line), 0);
    ck_assert_ptr_null(strstr(line, a)); /* the secret itself is never in the line */
    struct auth_tokens *t = NULL;
    ck_assert_int_eq(auth_tokens_parse(line, strlen(line), "f", &t), 0);
    ck_assert_int_eq(auth_tokens_find(t, a, strlen(a))->role, AUTH_OPERATOR);
    ck_assert_ptr_null(auth_tokens_find(t, b, strlen(b)));
    auth_tokens_free(t);
    ck_assert_int_lt(auth_token_line("bad name", AUTH_READER, a, line, sizeof line), 0);
}
END_TEST

START_TEST(load_refuses_world_writable_file)
{
    char path[] = "/tmp/qcowd-tokens-XXXXXX", line[200];
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    line_for("a", "admin", "s3cret", line, sizeof line);
    ck_assert_int_eq(write(fd, line, strlen(line)), (ssize_t)strlen(line));
    close(fd);
    struct auth_tokens *t = NULL;
    ck_assert_int_eq(auth_tokens_load(path, &t), 0);
    ck_assert_int_eq(auth_tokens_find(t, "s3cret", 6)->role, AUTH_ADMIN);
    auth_tokens_free(t);
    t = NULL;
    chmod(path, 0666);
    ck_assert_int_eq(auth_tokens_load(path, &t), -EPERM);
    ck_assert_ptr_null(t);
    unlink(path);
    ck_assert_int_lt(auth_tokens_load(path, &t), 0);
}
END_TEST

START_TEST(roles_by_name)
{
    ck_assert_int_eq(auth_role_parse("reader", 6), AUTH_READER);
    ck_assert_int_eq(auth_role_parse("operator", 8), AUTH_OPERATOR);
    ck_assert_int_eq(auth_role_parse("admin", 5), AUTH_ADMIN);
    ck_assert_int_eq(auth_role_parse("admins", 6), AUTH_NONE);
    ck_assert_int_eq(auth_role_parse("", 0), AUTH_NONE);
    ck_assert_str_eq(auth_role_name(AUTH_OPERATOR), "operator");
    ck_assert(auth_equal("abc", "abc", 3));
    ck_assert(!auth_equal("abc", "abd", 3));
}
END_TEST

START_TEST(tickets_scope_expiry_and_revocation)
{
    struct tickets *t = tickets_new(3);
    struct ticket_info a, b, got;
    char ta[AUTH_TOKEN_LEN + 1], tb[AUTH_TOKEN_LEN + 1];
    ck_assert_int_eq(tickets_add(t, "vm1", TICKET_OP_READ, 3600, "ops", &a, ta), 0);
    ck_assert_int_eq(tickets_add(t, "vm2", TICKET_OP_READ | TICKET_OP_WRITE, 1, "", &b, tb), 0);
    ck_assert_str_ne(ta, tb);
    ck_assert_str_ne(a.id, b.id);
    ck_assert_uint_eq(strlen(a.id), TICKET_ID_LEN);
    ck_assert_ptr_null(strstr(ta, a.id));
    ck_assert_int_eq(tickets_find(t, ta, strlen(ta), &got), 0);
    ck_assert_str_eq(got.image, "vm1");
    ck_assert_uint_eq(got.ops, TICKET_OP_READ);
    ck_assert_str_eq(got.owner, "ops");
    ck_assert_int_eq(tickets_find(t, tb, strlen(tb), &got), 0);
    ck_assert_str_eq(got.image, "vm2");
    ck_assert_int_eq(tickets_find(t, "nope", 4, &got), -ENOENT);
    /* bad requests */
    ck_assert_int_eq(tickets_add(t, "vm1", 0, 10, "", &got, ta + 0), -EINVAL);
    ck_assert_int_eq(tickets_add(t, "vm1", TICKET_OP_READ, 0, "", &got, tb + 0), -EINVAL);
    ck_assert_int_eq(tickets_add(t, "vm1", TICKET_OP_READ, TICKET_MAX_TIMEOUT + 1, "", &got, tb + 0), -EINVAL);
    /* the list has no secrets, only what they grant */
    struct ticket_info *v;
    size_t n;
    ck_assert_int_eq(tickets_list(t, &v, &n), 0);
    ck_assert_uint_eq(n, 2);
    free(v);
    sleep(2); /* b expires */
    ck_assert_int_eq(tickets_find(t, tb, strlen(tb), &got), -ENOENT);
    ck_assert_int_eq(tickets_list(t, &v, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(v[0].id, a.id);
    free(v);
    /* the budget */
    char tc[AUTH_TOKEN_LEN + 1];
    struct ticket_info c;
    ck_assert_int_eq(tickets_add(t, "x", TICKET_OP_READ, 60, "", &c, tc), 0);
    ck_assert_int_eq(tickets_add(t, "y", TICKET_OP_READ, 60, "", &c, tc), 0);
    ck_assert_int_eq(tickets_add(t, "z", TICKET_OP_READ, 60, "", &c, tc), -ENOSPC);
    ck_assert_ptr_nonnull(strstr(err_msg(-ENOSPC), "--max-tickets"));
    /* revocation */
    ck_assert_int_eq(tickets_remove(t, a.id), 0);
    ck_assert_int_eq(tickets_find(t, ta, strlen(ta), &got), -ENOENT);
    ck_assert_int_eq(tickets_remove(t, a.id), -ENOENT);
    ck_assert_uint_eq(ticket_op_parse("write"), TICKET_OP_WRITE);
    ck_assert_uint_eq(ticket_op_parse("delete"), 0);
    tickets_free(t);
}
END_TEST

START_TEST(host_rules_stop_dns_rebinding)
{
    struct access_names names = {0};
    ck_assert_int_eq(access_names_add(&names, "qcowd.example.net", "--public-name"), 0);
    static const char *const ok[] = {"127.0.0.1:8080", "127.0.0.1", "[::1]:8080", "[::1]", "localhost",
                                     "LocalHost:1", "10.1.2.3:443", "qcowd.example.net", "QCOWD.example.net:8443",
                                     "", NULL};
    static const char *const bad[] = {"evil.example", "evil.example:8080", "127.0.0.1:80x", "[::1",
                                      "[::1]x", "localhost.evil.example", "qcowd.example.net.evil",
                                      "127.0.0.1:", "127.0.0.1:123456", ":80"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        ck_assert_msg(access_host_allowed(ok[i], &names), "refused %s", ok[i] ? ok[i] : "(none)");
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(!access_host_allowed(bad[i], &names), "allowed %s", bad[i]);
    ck_assert_int_lt(access_names_add(&names, "a b", "--public-name"), 0);
    access_names_free(&names);
}
END_TEST

START_TEST(origin_rules)
{
    struct access_names cors = {0};
    ck_assert_int_eq(access_names_add(&cors, "https://dash.example/", "--cors-origin"), 0);
    ck_assert(access_origin_allowed(NULL, "127.0.0.1:8080", false, &cors));
    ck_assert(access_origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", false, &cors));
    ck_assert(!access_origin_allowed("https://127.0.0.1:8080", "127.0.0.1:8080", false, &cors));
    ck_assert(access_origin_allowed("https://127.0.0.1:8443", "127.0.0.1:8443", true, &cors));
    ck_assert(access_origin_allowed("https://dash.example", "127.0.0.1:8080", false, &cors));
    ck_assert(!access_origin_allowed("https://evil.example", "127.0.0.1:8080", false, &cors));
    ck_assert(!access_origin_allowed("null", "127.0.0.1:8080", false, &cors));
    ck_assert(!access_origin_allowed("http://127.0.0.1:8080.evil", "127.0.0.1:8080", false, NULL));
    access_names_free(&cors);
}
END_TEST

START_TEST(bearer_header)
{
    const char *t;
    size_t n;
    ck_assert_int_eq(access_bearer(NULL, &t, &n), -ENOENT);
    ck_assert_int_eq(access_bearer("Bearer abc.DEF-_~+/=", &t, &n), 0);
    ck_assert_uint_eq(n, 13);
    ck_assert_int_eq(strncmp(t, "abc.DEF-_~+/=", 13), 0);
    ck_assert_int_eq(access_bearer("bearer  x  ", &t, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(access_bearer("Basic dXNlcjpw", &t, &n), -EINVAL);
    ck_assert_int_eq(access_bearer("Bearer ", &t, &n), -EINVAL);
    ck_assert_int_eq(access_bearer("Bearer a b", &t, &n), -EINVAL);
    ck_assert_int_eq(access_bearer("Bearer a\x01", &t, &n), -EINVAL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("tokens");
    tcase_add_test(tc, sha256_known_vector);
    tcase_add_test(tc, parse_finds_each_token_with_its_role);
    tcase_add_test(tc, parse_refuses_bad_lines_naming_the_line);
    tcase_add_test(tc, parse_refuses_nul_and_oversize);
    tcase_add_test(tc, new_tokens_are_random_and_their_line_parses);
    tcase_add_test(tc, load_refuses_world_writable_file);
    tcase_add_test(tc, roles_by_name);
    tcase_add_test(tc, tickets_scope_expiry_and_revocation);
    tcase_add_test(tc, host_rules_stop_dns_rebinding);
    tcase_add_test(tc, origin_rules);
    tcase_add_test(tc, bearer_header);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
