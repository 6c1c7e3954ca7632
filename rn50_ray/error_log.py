"""Tracebacks of errors that already say what to do go to a log file, not to the terminal.

A worker stopped by bad input or a storage fault raises a UserError whose one line names the culprit and the
remedy; the driver prints that line. Ray Train would also log the worker's traceback ("Error in training
function") and the controller's (when EndOnUserError ends the run), and Ray forwards both to the driver's
terminal. A filter on those two loggers writes such records to `rn50-errors.log` in Ray's log folder of the node
instead. Any other error's traceback still reaches the terminal.
"""

from __future__ import annotations

import logging
import os
import tempfile

LOGGERS = ("ray.train.v2._internal.util", "ray.train.v2._internal.execution.controller.controller")
FILE_NAME = "rn50-errors.log"
_MARKER = "rn50_ray.errors."  # how a UserError (and its StorageError, DataError...) reads in a traceback
_formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")


def path() -> str:
    """This node's log file for such tracebacks: in Ray's session log folder where Ray runs, else the temp folder."""
    try:
        import ray._private.worker as ray_worker

        folder = ray_worker._global_node.get_logs_dir_path()
    except Exception:  # no Ray here, or its internals moved: the temp folder will do
        folder = tempfile.gettempdir()
    return os.path.join(folder, FILE_NAME)


class _ToFile(logging.Filter):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (_formatter.formatException(record.exc_info) if record.exc_info else "")
        if _MARKER not in text:
            return True
        with open(self.file, "a") as f:
            f.write(_formatter.format(record) + "\n")
        return False


def install() -> str:
    """Route this process's UserError tracebacks from Ray Train's loggers to the file; returns its path. Idempotent."""
    file = path()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToFile) for f in logger.filters):
            logger.addFilter(_ToFile(file))
    return file
