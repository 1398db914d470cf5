"""Memory-mapped checkpoint pages: which addresses are file mappings, and handing a tensor's pages back.

A float32 safetensors file is used in place (storage.py): its tensors are views of the mapped file, and the kernel
counts the pages they have touched in the process's memory. Once a weight has a packed or converted copy, its file
pages can be handed back (the kernel reads them again from the file if the plain weight is ever used).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

from torch import Tensor


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's file-backed memory mappings (Linux /proc/self/maps; [] elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":   # a non-zero inode: mapped from a file
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_pages(tensor: Tensor, spans: list[tuple[int, int]] | None = None) -> None:
    """madvise(MADV_DONTNEED) the pages wholly inside `tensor` when they lie in a file mapping (`spans`, read now
    when None): the kernel drops them from this process and reads them back from the file if they are touched
    again (checkpoint tensors are never written in place, so nothing is lost). Anonymous memory is left alone
    (there it would zero the data); memory PyTorch allocated itself (a resizable storage) is never a file
    mapping, so it is passed over without reading the mappings (about a millisecond a read)."""
    if tensor.untyped_storage().resizable():
        return
    spans = file_mappings() if spans is None else spans
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start and hasattr(mmap, "MADV_DONTNEED") and any(s <= start and end <= e for s, e in spans):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
