"""The C allocator's threshold for giving big buffers their own pages (glibc's M_MMAP_THRESHOLD).

glibc serves an allocation from its own memory map when it is at least the mmap threshold, and returns the map to
the kernel when it is freed; smaller ones come from the heap, which keeps freed memory. The threshold starts at
128 KB but rises to the size of each mapped buffer freed (up to 32 MB), so after the first big activations are
freed, the VAE's 16-32 MB activations of a 256-512 px image come from the heap and stay in the process: +230 MB of
peak memory for an SD 1.5 txt2img at 256 px (docs/performance.md). A fixed threshold of 8 MB gives every buffer of
8 MB or more its own map again, at no measured cost in speed (1 MB: -330 MB but 15% slower, from page faults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3                 # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 8 << 20


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold to MMAP_THRESHOLD unless the user set MALLOC_MMAP_THRESHOLD_; False where there is
    no glibc (other C libraries and systems keep their allocator as it is)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
