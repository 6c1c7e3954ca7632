"""Find undecodable image files before training, on the driver.

DALI cannot drop a sample it fails to decode: the pipeline dies, and with it the run (NVIDIA/DALI
#3913). So every backend gets its file lists screened first: a cheap look at each file's header
and tail (a JPEG must end with its end-of-image marker, a PNG with IEND), and a full PIL decode only
for files that look wrong, so a valid file is never rejected on the cheap look alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from rn50_ray.errors import DataError

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAIL_BYTES = 1024  # JPEG writers may pad after the end marker; a few bytes, not a kilobyte


def _pil_decodes(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # PIL raises many types for bad data; any of them means undecodable
        return f"{type(e).__name__}: {e}"


def check_image(path: str) -> str | None:
    """None for a file that decodes, else why it does not."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(size - TAIL_BYTES, 0))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head.startswith(JPEG_SOI) and JPEG_EOI in tail:
        return None
    if head.startswith(PNG_SIGNATURE) and b"IEND" in tail:
        return None
    return _pil_decodes(path)  # another format, or a JPEG/PNG that looks cut short: decode to be sure


def find_bad_images(paths: Iterable[str], threads: int = 32) -> dict[str, str]:
    """{path: reason} for every undecodable file. Threads, because the work is file I/O."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = pool.map(check_image, paths, chunksize=256)
        return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def bad_image_error(bad: dict[str, str]) -> DataError:
    path, reason = next(iter(bad.items()))
    more = f" ({len(bad) - 1} more undecodable files)" if len(bad) > 1 else ""
    return DataError(f"{path}: cannot decode image ({reason}){more}; remove it or pass --skip-bad-images")
