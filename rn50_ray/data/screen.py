"""Find the image files a backend cannot decode before training, on the driver.

DALI cannot drop a sample it fails to decode: the pipeline dies, and with it the run (NVIDIA/DALI
#3913). So every backend gets its file lists screened first: a cheap look at each file's header
and tail (a JPEG must end with its end-of-image marker, a PNG with IEND), and a full PIL decode only
for files that look wrong, so a valid file is never rejected on the cheap look alone. The header also
gives the size and the format: images over PIL's decompression-bomb limit (89.5 megapixels; DALI's CPU
decoder fails on them too) and, for DALI, formats it does not decode are named here as well.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image

from rn50_ray.errors import DataError

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAIL_BYTES = 1024  # JPEG writers may pad after the end marker; a few bytes, not a kilobyte
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (its default Image.MAX_IMAGE_PIXELS)
DALI_FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "PPM", "WEBP", "JPEG2000"}  # what DALI's image decoders take


def _pil_decodes(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # PIL raises many types for bad data; any of them means undecodable
        return f"{type(e).__name__}: {e}"


def _header(path: str) -> tuple[tuple[int, int], str] | str:
    """(size, format) from the file's header, or why it cannot be read (PIL's bomb limits included)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size, img.format or "?"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"too large to decode ({e})"
    except Exception as e:  # PIL raises many types for bad data
        return f"{type(e).__name__}: {e}"


def check_image(path: str, dali: bool = False) -> str | None:
    """None for a file that decodes (with DALI too, where `dali`), else why it does not."""
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
    header = _header(path)
    if isinstance(header, str):
        return header
    (width, height), fmt = header
    if width * height > MAX_PIXELS:
        megapixels = width * height / 1e6
        return f"too large to decode: {width} x {height} = {megapixels:.0f} megapixels (the limit is {MAX_PIXELS / 1e6:.1f})"
    if dali and fmt not in DALI_FORMATS:
        return f"{fmt} format, which DALI does not decode"
    if head.startswith(JPEG_SOI) and JPEG_EOI in tail:
        return None
    if head.startswith(PNG_SIGNATURE) and b"IEND" in tail:
        return None
    return _pil_decodes(path)  # another format, or a JPEG/PNG that looks cut short: decode to be sure


def find_bad_images(paths: Iterable[str], threads: int = 32, dali: bool = False) -> dict[str, str]:
    """{path: reason} for every file the backend cannot decode. Threads, because the work is file I/O."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = pool.map(partial(check_image, dali=dali), paths, chunksize=256)
        return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def bad_image_error(bad: dict[str, str]) -> DataError:
    path, reason = next(iter(bad.items()))
    more = f" ({len(bad) - 1} more undecodable files)" if len(bad) > 1 else ""
    return DataError(f"{path}: cannot decode image ({reason}){more}; remove it or pass --skip-bad-images")
