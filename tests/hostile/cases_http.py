"""Hostile requests: paths, methods (see hostile.py)."""


def routes(s):
    """Paths longer than any route are 404 on every method; the daemon stays up."""
    shapes = ["/v1/images/a/snapshots/b/data/c", "/v1/images/x/bitmaps/b/clear/y",
              "/v1/images/a/b/c/d/e/f/g/h", "/v1/jobs/1/cancel/x/y/z/w",
              "/" + "/".join(["v1"] * 12), "/v1/images/a/bitmaps/b/merge/c/d/e/f/g"]
    for p in shapes:
        for m in ("GET", "HEAD", "DELETE", "POST", "PUT", "PATCH", "OPTIONS"):
            s.error(m, p, 404, body=b"{}" if m in ("POST", "PUT", "PATCH") else None)
        s.up()
    # the longest routes still route
    s.error("GET", "/v1/images/nosuch/snapshots/s/data", 404)


CASES = [("routes", routes)]
