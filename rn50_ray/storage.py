"""Storage faults: a transient one (a timeout, a refused or reset connection, S3's 503 SlowDown and 500s, a store
that stalls) is retried with backoff for up to run.storage_retry_s; a persistent one (a full disk, no
permission, a read-only file system, a missing bucket, wrong credentials), or a transient one that outlasts the
retries, becomes a StorageError: one line naming the storage URI, what happened, what to do, and the last
complete checkpoint a rerun resumes from.

Training waits for the store rather than going on and uploading later: a step is never trained on top of a
checkpoint that is not stored yet, so an outage costs its own length in time and no step (docs/PERFORMANCE.md,
"storage outage"). Ray-free: the driver, the workers and the tracking code use it.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable
from typing import TypeVar

from rn50_ray.errors import StorageError

T = TypeVar("T")

# What the AWS SDK (through pyarrow) and the OS say of a fault that passes.
_TRANSIENT = re.compile(
    r"curlCode: (6|7|28|35|52|55|56)|Timeout was reached|NETWORK_CONNECTION|Connection (refused|reset|timed out)|"
    r"Couldn't connect|Could not connect|SlowDown|ServiceUnavailable|InternalError|RequestTimeout|"
    r"HTTP response code: 5\d\d|Broken pipe|Temporary failure in name resolution|Unable to connect|EOF",
    re.IGNORECASE,
)
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH}
# Persistent faults: (pattern in the message, or errno) -> (what happened, what to do)
_WRITABLE = "make it writable for this user, or pass another --storage"
_PERSISTENT: list[tuple[int | None, str | None, str, str]] = [
    (errno.ENOSPC, r"No space left on device", "no space left on device (errno 28)", "free space there"),
    (errno.EDQUOT, r"Disk quota exceeded", "disk quota exceeded (errno 122)", "free space there or raise the quota"),
    (errno.EROFS, r"Read-only file system", "read-only file system (errno 30)", "pass a writable --storage"),
    (errno.EACCES, r"Permission denied", "permission denied (errno 13)", _WRITABLE),
    (errno.EPERM, r"Operation not permitted", "operation not permitted (errno 1)", _WRITABLE),
    (None, r"NoSuchBucket|The specified bucket does not exist", "the bucket does not exist (NoSuchBucket)",
     "create it, or fix the URI"),
    (None, r"InvalidAccessKeyId|SignatureDoesNotMatch|InvalidToken|ExpiredToken",
     "the store refused the credentials (InvalidAccessKeyId)",
     "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the node's role)"),
    (None, r"AccessDenied|HTTP response code: 403|Forbidden", "access denied (AccessDenied, HTTP 403)",
     "grant this identity write access to it"),
]  # fmt: skip


def describe(e: BaseException) -> tuple[bool, str, str]:
    """(transient?, what happened, what to do) for an error of a storage operation."""
    text = str(e)
    number = getattr(e, "errno", None)
    for code, pattern, what, todo in _PERSISTENT:
        if (code is not None and number == code) or (pattern and re.search(pattern, text)):
            return False, what, todo
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    if number in _TRANSIENT_ERRNOS or _TRANSIENT.search(text):
        return True, first, "check the store"
    return False, f"{type(e).__name__}: {first}", "check the storage URI and the store"


def storage_error(uri: str, what: str, todo: str, last_checkpoint: str | None, details: str = "") -> StorageError:
    resume = f"the rerun resumes from {last_checkpoint}" if last_checkpoint else "nothing stored yet: a rerun starts over"
    more = f"; the traceback is in {details}" if details else ""
    return StorageError(f"{uri}: {what}; {todo}, then run the same command again ({resume}){more}")


class Retrying:
    """Runs storage operations, retrying transient faults with exponential backoff (1 s doubling to 30 s) for up
    to `retry_s` from the first failure; says once that it waits (and since when), and when the store is back."""

    def __init__(
        self, uri: str, retry_s: float, log: Callable[[str], None], last_checkpoint: Callable[[], str | None], details: str = ""
    ):
        """`details`: where the traceback of a failure goes (a worker's log file), named in its one line."""
        self.uri, self.retry_s, self.log, self.last_checkpoint, self.details = uri, retry_s, log, last_checkpoint, details

    def __call__(self, what: str, op: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        first_failure, delay = None, 1.0
        while True:
            try:
                result = op()
            except OSError as e:  # pyarrow's filesystems raise OSError for every storage fault
                transient, happened, todo = describe(e)
                if not transient:
                    raise storage_error(self.uri, happened, todo, self.last_checkpoint(), self.details) from e
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    since = time.strftime("%H:%M:%S")
                    self.log(
                        f"storage: waiting for {self.uri} since {since} ({happened}); {what} is retried for up to "
                        f"{self.retry_s:.0f} s (run.storage_retry_s)"
                    )
                waited = now - first_failure
                if waited >= self.retry_s:
                    message = f"no answer for {waited:.0f} s, the run.storage_retry_s limit ({happened})"
                    raise storage_error(self.uri, message, todo, self.last_checkpoint(), self.details) from e
                sleep(min(delay, self.retry_s - waited))
                delay = min(delay * 2, 30.0)
                continue
            if first_failure is not None:
                self.log(f"storage: {self.uri} answered again after {time.monotonic() - first_failure:.0f} s; {what} done")
            return result
