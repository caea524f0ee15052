"""qcowd_client.errors: one exception class per API error code (and per status for
codes this client does not know), all under QcowdError."""

__all__ = [
    "QcowdError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed", "RequestTimeout",
    "Conflict", "ReadOnly", "LengthRequired", "PreconditionFailed", "TooLarge", "UnsupportedMediaType",
    "RangeNotSatisfiable", "MisdirectedRequest", "ImageError", "CorruptImage", "Unsupported", "OutsideCatalog",
    "BadBackingChain", "LimitExceeded", "InternalError", "StorageError", "ServiceUnavailable", "Unavailable",
    "StorageDenied", "OutOfMemory", "NoSpace", "JobFailed", "JobCancelled", "JobTimeout", "error_for",
]


class QcowdError(Exception):
    """An error answer of qcowd: status (HTTP), code ("not-found", ...), message (the
    server's), retry_after (seconds from Retry-After, or None) and headers (a dict,
    lower-case names)."""

    def __init__(self, status, code, message, retry_after=None, headers=None):
        super().__init__("%s (HTTP %s, %s)" % (message, status, code))
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}


class BadRequest(QcowdError):
    """400: the request is malformed (a bad name, size, JSON body, range syntax)."""


class Unauthorized(QcowdError):
    """401: no bearer token, or one that is unknown, expired or revoked."""


class Forbidden(QcowdError):
    """403: the token's role is too low, a ticket used outside its image, a missing
    client certificate, or an Origin not allowed."""


class NotFound(QcowdError):
    """404: no such image, snapshot, bitmap, job, ticket or endpoint."""


class MethodNotAllowed(QcowdError):
    """405: the path exists but not with this method."""


class RequestTimeout(QcowdError):
    """408: headers or body too slow (`request-timeout`, `too-slow`)."""


class Conflict(QcowdError):
    """409: the name is taken, the image is busy (a job, a download, a backing file of
    another image). retry_after, when the server gives it, says when to try again."""


class ReadOnly(Conflict):
    """409 `read-only`: the image cannot be written."""


class LengthRequired(QcowdError):
    """411."""


class PreconditionFailed(QcowdError):
    """412: an If-Match or If-Range did not match the image's current ETag."""


class TooLarge(QcowdError):
    """413: a request body over a limit."""


class UnsupportedMediaType(QcowdError):
    """415: a JSON endpoint got a body that is not application/json."""


class RangeNotSatisfiable(QcowdError):
    """416: the range does not fit the disk."""


class MisdirectedRequest(QcowdError):
    """421: a Host the server does not answer to."""


class ImageError(QcowdError):
    """422: the image itself (corrupt, unsupported, outside the catalog, a bad backing
    chain, past a limit)."""


class CorruptImage(ImageError):
    """422 `corrupt-image`."""


class Unsupported(ImageError):
    """422 `unsupported`."""


class OutsideCatalog(ImageError):
    """422 `outside-catalog`."""


class BadBackingChain(ImageError):
    """422 `bad-backing-chain`."""


class LimitExceeded(ImageError):
    """422 `limit-exceeded`."""


class InternalError(QcowdError):
    """500: a bug in qcowd."""


class StorageError(QcowdError):
    """502 `storage-error`: the store's I/O error; a retry may succeed."""


class ServiceUnavailable(QcowdError):
    """503: qcowd or its store cannot serve now; see retry_after."""


class Unavailable(ServiceUnavailable):
    """503 `unavailable`: too many jobs or listeners, or the store is down."""


class StorageDenied(ServiceUnavailable):
    """503 `storage-denied`: the store refuses qcowd (permissions, a bucket policy)."""


class OutOfMemory(ServiceUnavailable):
    """503 `out-of-memory`."""


class NoSpace(QcowdError):
    """507 `no-space`: out of space, over quota or past --max-catalog."""


class JobFailed(QcowdError):
    """A job concluded with an error; job is its last state (a dict)."""

    def __init__(self, job, code="job-failed"):
        msg = "job %s (%s %s): %s" % (job.get("id"), job.get("type"), job.get("image"),
                                      job.get("error") or ("cancelled" if job.get("cancelled") else "failed"))
        super().__init__(None, code, msg)
        self.job = job


class JobCancelled(JobFailed):
    """A job concluded cancelled."""

    def __init__(self, job):
        super().__init__(job, "job-cancelled")


class JobTimeout(QcowdError, TimeoutError):
    """wait_job gave up before the job concluded; job is its last state."""

    def __init__(self, job, timeout):
        super().__init__(None, "job-timeout", "job %s not concluded after %s s" % (job.get("id"), timeout))
        self.job = job


_BY_CODE = {
    "bad-request": BadRequest, "unauthorized": Unauthorized, "forbidden": Forbidden,
    "client-certificate": Forbidden, "origin-not-allowed": Forbidden, "not-found": NotFound,
    "method-not-allowed": MethodNotAllowed, "request-timeout": RequestTimeout, "too-slow": RequestTimeout,
    "conflict": Conflict, "read-only": ReadOnly, "length-required": LengthRequired,
    "precondition-failed": PreconditionFailed, "too-large": TooLarge,
    "unsupported-media-type": UnsupportedMediaType, "range-not-satisfiable": RangeNotSatisfiable,
    "misdirected-request": MisdirectedRequest, "corrupt-image": CorruptImage, "unsupported": Unsupported,
    "outside-catalog": OutsideCatalog, "bad-backing-chain": BadBackingChain, "limit-exceeded": LimitExceeded,
    "internal-error": InternalError, "storage-error": StorageError, "unavailable": Unavailable,
    "storage-denied": StorageDenied, "out-of-memory": OutOfMemory, "no-space": NoSpace,
}
_BY_STATUS = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed, 408: RequestTimeout,
    409: Conflict, 411: LengthRequired, 412: PreconditionFailed, 413: TooLarge, 415: UnsupportedMediaType,
    416: RangeNotSatisfiable, 421: MisdirectedRequest, 422: ImageError, 500: InternalError, 502: StorageError,
    503: ServiceUnavailable, 507: NoSpace,
}


def error_for(status, code, message, retry_after=None, headers=None):
    """The exception for an error answer: by its code, else by its status, else QcowdError."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or QcowdError
    return cls(status, code, message, retry_after, headers)
