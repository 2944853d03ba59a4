"""Memory estimates made before allocating a dense P×P matrix: a request that cannot fit is refused before any work."""

from __future__ import annotations

import torch

from .errors import DenseTooLargeError


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown platform: assume 8 GiB


def check_dense_fits(P: int, dtype: torch.dtype, device: torch.device, *, copies: int = 3,
                     max_bytes: int | None = None, what: str = "dense matrix") -> None:
    """Raise :class:`DenseTooLargeError` when ``copies`` P×P matrices would not fit.

    ``max_bytes`` overrides the limit (default: 80% of the memory available on ``device``).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = int(P) * int(P) * itemsize * copies
    limit = int(0.8 * available_bytes(device)) if max_bytes is None else int(max_bytes)
    if need > limit:
        raise DenseTooLargeError(
            f"a {what} with P = {P} parameters needs about {need / 2**30:.2f} GiB "
            f"({copies} × P² × {itemsize} bytes) but only {limit / 2**30:.2f} GiB may be used on {device}. "
            "Restrict it with layers=[...], or use the matrix-free products "
            "(fisher_vector_product, the inverse operators' apply/@) instead of a dense matrix."
        )


def release_free_memory() -> None:
    """Collect garbage and return freed heap memory to the OS (glibc ``malloc_trim``), so that a long job
    that goes from one large computation to the next holds only what is live (a no-op where unavailable)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_large_blocks_to_os(threshold: int = 256 * 1024) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, returned to the OS when freed
    (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere). glibc otherwise raises the threshold after the
    first large free, and a job that allocates and frees many large tensors (Figure 7's γ sweep) then grows
    its heap with fragments it never gives back."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass

