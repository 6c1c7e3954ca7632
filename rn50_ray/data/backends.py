"""Which input pipeline a run gets: `auto` is DALI where it is installed, decoding on the GPU when the workers
have one, else the pytorch backend. Torch-free, so the driver decides what its image screen checks for."""

from __future__ import annotations

import importlib.util


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(backend: str, device_type: str) -> str:
    """`device_type` is the workers' ("cuda" or "cpu")."""
    if backend != "auto":
        return backend
    if not dali_available():
        return "pytorch"
    return "dali-gpu" if device_type == "cuda" else "dali-cpu"


def uses_dali(backend: str) -> bool:
    return resolve_backend(backend, "cpu").startswith("dali")
