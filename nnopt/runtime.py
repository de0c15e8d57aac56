"""Process-wide settings that CPU inference speed depends on, applied only when asked.

glibc's malloc hands every large block (a batch's activations are megabytes) back to the
operating system when it is freed and asks for fresh, zero-filled pages on the next call. Under
virtualization those page faults cost as much as the arithmetic: on this project's 2-vCPU VM,
MiniLM int8 at batch 32 measured ~420 ms with the defaults and ~290 ms with the thresholds
below (fp32 gained less, ~5–10%). Raising the thresholds keeps the freed memory in the process
for reuse, the same effect as preloading jemalloc or tcmalloc, which Intel recommends for
PyTorch on CPU. A library should not change this behind a user's back, so it is opt-in:
``nnopt.tune_allocator()``; nnopt's CLI and benchmarks call it for every variant alike, and
record it with their measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
DEFAULT_TRIM_BYTES = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap
DEFAULT_MMAP_BYTES = 32 << 20  # glibc's largest allowed threshold: blocks below it come from the heap

_settings: dict[str, object] = {"allocator": "system default"}


def tune_allocator(trim_bytes: int = DEFAULT_TRIM_BYTES, mmap_bytes: int = DEFAULT_MMAP_BYTES) -> dict[str, object]:
    """Keep freed memory in the process (glibc malloc); returns what was applied.

    A no-op, reported as such, where the C library is not glibc (macOS, Windows, musl).
    """
    if trim_bytes < 0 or mmap_bytes < 0:
        raise ValueError("allocator thresholds must be >= 0 bytes")
    libc = _glibc()
    if libc is None:
        _settings["allocator"] = f"system default ({platform.system()}, not glibc)"
        return dict(_settings)
    ok = libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes)) == 1 and libc.mallopt(M_MMAP_THRESHOLD, int(mmap_bytes)) == 1
    _settings["allocator"] = (
        f"glibc malloc, trim threshold {trim_bytes >> 20} MiB, mmap threshold {mmap_bytes >> 20} MiB (mallopt)"
        if ok else "system default (mallopt refused the thresholds)"
    )
    return dict(_settings)


def runtime_settings() -> dict[str, object]:
    """The process settings applied so far, for measurement records."""
    return dict(_settings)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
