"""Errors caused by the user's input. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config value, a data folder, a checkpoint. The message names the culprit."""


class ConfigError(UserError):
    """A config file or override holds an unknown key or an invalid value."""


class DataError(UserError):
    """The data folder or one of its files is missing, empty or undecodable."""


class StorageError(UserError):
    """The run's storage failed in a way retrying does not fix (rn50_ray/storage.py)."""


def find_user_error(exc: BaseException) -> str | None:
    """Return the one-line message of a UserError anywhere in `exc`'s chain, or None.

    Errors raised in Ray workers or DataLoader workers reach the driver wrapped (Ray's
    WorkerGroupError, torch's re-raised copy with the worker traceback in the text), so this
    walks causes, Ray's per-worker failures, and the text of wrapped copies.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        text = str(err)
        for cls in ("DataError", "ConfigError", "StorageError", "UserError"):
            marker = f"rn50_ray.errors.{cls}: "
            if marker in text:  # a copy re-raised with the worker's traceback in its text
                return text.rsplit(marker, 1)[1].strip().splitlines()[0]
        if isinstance(err, UserError):
            return text.strip().splitlines()[0] if text.strip() else type(err).__name__
        for name in ("worker_failures", "worker_exceptions"):  # Ray Train V2 error containers
            failures = getattr(err, name, None)
            if isinstance(failures, dict):
                stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        if isinstance(getattr(err, "controller_failure", None), BaseException):  # a controller callback's
            stack.append(err.controller_failure)
        stack.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return None
