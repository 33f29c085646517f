"""The CUDA context's local memory, shrunk while the engine sleeps.

A CUDA context reserves device memory for every thread the device can run at once, at the per-thread stack
size of the most demanding kernel launched so far (CU_LIMIT_STACK_SIZE; the driver grows it at launch as
needed and never shrinks it by itself). On an H100 that is hundreds of MB that no allocator call frees.
Asleep, the limit is set to the smallest size the driver takes, which frees that reservation; waking
sets it back before the first step, so a launch never has to grow it while another process holds the
memory. Through the driver API (libcuda), on the calling thread's current context: the engine's thread,
which has made CUDA calls and so has the primary context current.
"""

from __future__ import annotations

import contextlib
import ctypes

STACK_SIZE = 0  # CUlimit CU_LIMIT_STACK_SIZE
SMALLEST = 16  # bytes per thread; the driver rounds it up to what the device takes
OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY


def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


class LocalMemory:
    def __init__(self) -> None:
        self._saved: int | None = None  # the stack size before the shrink, while shrunk

    def shrink(self) -> None:
        """Free the stack reservation (asleep). Does nothing where the driver API refuses. Again while
        shrunk (a deeper sleep), it frees what a launch since then grew, and keeps the larger size to restore."""
        cuda = _driver()
        if cuda is None:
            return
        size = ctypes.c_size_t()
        if cuda.cuCtxGetLimit(ctypes.byref(size), STACK_SIZE) != 0 or size.value <= SMALLEST:
            return
        if cuda.cuCtxSetLimit(STACK_SIZE, ctypes.c_size_t(SMALLEST)) == 0:
            self._saved = max(self._saved or 0, size.value)

    def restore(self) -> None:
        """Reserve the stack size of before the shrink again; raises MemoryError if the device has no room."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        cuda = _driver()
        assert cuda is not None
        status = cuda.cuCtxSetLimit(STACK_SIZE, ctypes.c_size_t(saved))
        if status != 0:
            with contextlib.suppress(Exception):
                cuda.cuCtxSetLimit(STACK_SIZE, ctypes.c_size_t(SMALLEST))
            self._saved = saved  # still shrunk: a later wake tries again
            why = "the device is short of memory" if status == OUT_OF_MEMORY else f"CUDA error {status}"
            raise MemoryError(f"could not reserve the CUDA stack memory again ({saved} bytes a thread): {why}")
