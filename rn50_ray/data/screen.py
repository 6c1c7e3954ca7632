"""Screen image files once per folder version: each file's size, format and channels, and why it cannot be used.

DALI cannot drop a sample it fails to decode: the pipeline dies, and with it the run (NVIDIA/DALI #3913). So
every file is looked at before any training: its header (JPEG's SOF or PNG's IHDR, parsed here; other formats
through PIL) and its tail (a JPEG must end with its end-of-image marker, a PNG with IEND), and only a file that
looks wrong is decoded in full with PIL, so a valid file is never rejected on the cheap look alone. Images over
PIL's decompression-bomb limit (89.5 megapixels; DALI's CPU decoder fails on them too) are named here.

JPEG and PNG headers are parsed by hand, in a few reads of raw bytes: PIL's `Image.open` costs ten times as
much per file, and ImageNet has 1.33 million of them. A cold screen uses every core (processes, not threads
under one GIL) under a progress bar with an ETA.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from PIL import Image

from rn50_ray.errors import DataError

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 4096  # most JPEG headers end within this; larger ones (EXIF thumbnails) are read on
MAX_HEAD_BYTES = 1 << 20
TAIL_BYTES = 1024  # JPEG writers may pad after the end marker; a few bytes, not a kilobyte
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (its default Image.MAX_IMAGE_PIXELS)
DALI_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "PPM", "WEBP", "JPEG2000"})  # what DALI's image decoders take
# JPEG start-of-frame markers: every SOFn but DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
PARALLEL_FROM = 20_000  # fewer files are screened in this process: starting processes would cost more


@dataclass(frozen=True)
class FileInfo:
    width: int = 0
    height: int = 0
    format: str = ""  # PIL's name: JPEG, PNG, ...; "" where unreadable
    channels: int = 0  # 1 grey, 3 colour, 4 CMYK (or RGBA)
    bytes: int = 0
    problem: str = ""  # why it cannot be decoded; "" for a good file


def _jpeg_size(fd: int, head: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) from a JPEG's start-of-frame segment, or None where the parse fails."""
    pos = 2
    while True:
        while pos + 9 >= len(head) and len(head) < MAX_HEAD_BYTES:
            more = os.pread(fd, len(head), len(head))
            if not more:
                return None
            head += more
        if pos + 9 >= len(head) or head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", head, pos + 5)
            return width, height, head[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + struct.unpack_from(">H", head, pos + 2)[0]


def _png_size(head: bytes) -> tuple[int, int, int] | None:
    if len(head) < 26 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", head, 16)
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(head[25], 3)
    return width, height, channels


def _pil_header(path: str) -> tuple[int, int, str, int] | str:
    """(width, height, format, channels) through PIL, or why it cannot be read (PIL's bomb limits included)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.width, img.height, img.format or "?", len(img.getbands())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"too large to decode ({e})"
    except Exception as e:  # PIL raises many types for bad data
        return f"{type(e).__name__}: {e}"


def _pil_decodes(path: str) -> str:
    try:
        with Image.open(path) as img:
            img.load()
        return ""
    except Exception as e:  # PIL raises many types for bad data; any of them means undecodable
        return f"{type(e).__name__}: {e}"


def inspect(path: str, full: bool = True) -> FileInfo:
    """A file's size, format and channels, and (with `full`, the screen) why it cannot be decoded."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return FileInfo(problem=f"unreadable ({e.strerror})")
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return FileInfo(problem="empty file")
        head = os.pread(fd, HEAD_BYTES, 0)
        tail = os.pread(fd, TAIL_BYTES, max(size - TAIL_BYTES, 0)) if full else b""
        if head.startswith(JPEG_SOI):
            fmt, dims = "JPEG", _jpeg_size(fd, head)
        elif head.startswith(PNG_SIGNATURE):
            fmt, dims = "PNG", _png_size(head)
        else:
            fmt, dims = "", None
    except OSError as e:
        return FileInfo(problem=f"unreadable ({e.strerror})")
    finally:
        os.close(fd)
    if dims is None:  # another format, or a header this parser does not follow: PIL decides
        header = _pil_header(path)
        if isinstance(header, str):
            return FileInfo(bytes=size, problem=header)
        width, height, fmt, channels = header
    else:
        width, height, channels = dims
    info = dict(width=width, height=height, format=fmt, channels=channels, bytes=size)
    if width * height > MAX_PIXELS:
        megapixels = width * height / 1e6
        limit = MAX_PIXELS / 1e6
        return FileInfo(
            **info, problem=f"too large to decode: {width} x {height} = {megapixels:.0f} megapixels (the limit is {limit:.1f})"
        )
    if not full:
        return FileInfo(**info)
    looks_whole = (fmt == "JPEG" and JPEG_EOI in tail) or (fmt == "PNG" and b"IEND" in tail)
    return FileInfo(**info, problem="" if looks_whole else _pil_decodes(path))  # cut short, or another format


def _inspect_chunk(args: tuple[str, Sequence[str], bool]) -> list[FileInfo]:
    root, paths, full = args
    return [inspect(os.path.join(root, p), full) for p in paths]


def screen_files(root: str, paths: Sequence[str], full: bool = True, workers: int | None = None) -> tuple[list[FileInfo], int]:
    """(FileInfo for every path (relative to `root`) in order, the processes used): in processes on every core
    when there are many, under a progress bar with an ETA."""
    from tqdm import tqdm

    workers = workers or len(os.sched_getaffinity(0))
    chunk = 2048
    chunks = [(root, paths[i : i + chunk], full) for i in range(0, len(paths), chunk)]
    out: list[FileInfo] = []
    with tqdm(
        total=len(paths), desc="screening images", unit="img", file=sys.stderr, mininterval=2, disable=len(paths) < 5000
    ) as bar:
        if len(paths) < PARALLEL_FROM or workers == 1:
            for c in chunks:
                out += _inspect_chunk(c)
                bar.update(len(c[1]))
            return out, 1
        # spawn: the caller may hold threads (a Ray client, MLflow) that fork would copy half-way
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for infos in pool.map(_inspect_chunk, chunks):
                out += infos
                bar.update(len(infos))
    return out, workers


def unusable_for(fmt: str, problem: str, dali: bool) -> str:
    """Why a screened file cannot be trained on with this backend, or ""."""
    if problem:
        return problem
    if dali and fmt not in DALI_FORMATS:
        return f"{fmt} format, which DALI does not decode"
    return ""


def bad_image_error(bad: dict[str, str]) -> DataError:
    path, reason = next(iter(bad.items()))
    more = f" ({len(bad) - 1} more undecodable files)" if len(bad) > 1 else ""
    return DataError(f"{path}: cannot decode image ({reason}){more}; remove it or pass --skip-bad-images")
