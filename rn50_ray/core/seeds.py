"""Every random stream of a run, named, and seeded from system.seed and what it belongs to (an epoch, a step,
a rank, an image), so that a stream never depends on which process or worker draws it. Pure Python."""

from __future__ import annotations

import hashlib

STREAMS = ("weights", "order", "crop", "mixup", "synthetic")  # model init, data order, augmentation, mixup, fake data


def seed_for(stream: str, seed: int, *parts: int) -> int:
    """A 63-bit seed for `stream` (one of STREAMS) of run seed `seed` at `parts`."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {', '.join(STREAMS)}")
    digest = hashlib.blake2b(repr((stream, seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
