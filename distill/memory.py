"""Process-wide memory settings of the processes that make views or run a CPU teacher."""
from __future__ import annotations


def keep_heap() -> None:
    """glibc: serve allocations up to 32 MB (its maximum) from the heap and keep freed heap memory instead of
    returning it to the system. A CPU teacher's forward allocates and frees the same large activations every
    batch; with glibc's defaults they come back as fresh mappings after the worker's other allocations
    (images, pieces) moved the dynamic threshold or trimmed the heap, and every page faults again. Measured
    (BENCHMARKS.md section 2, bare forward, 2 threads, batch 32): ResNet-18-like 20.7 -> 28.5 img/s, ViT-S/16-like
    10.9 -> 14.2 img/s with these settings. A no-op off glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1 << 30)
