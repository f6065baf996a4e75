"""OpenMP thread pools and Python threads.

torch's CPU kernels and slmkit's q4 kernel run their parallel loops on libgomp. libgomp keeps a
pool of worker threads per *master* thread, and once the main thread has run a parallel region
(loading or quantising a model does), parallel regions started from any other thread (a server's
engine thread, a streaming worker) ran 3-8x slower here, because the idle pool still competes
with the new one: ``torch.add`` of 200k floats 14 us on the main thread, 87-99 us on a second
thread; a 32-token int4 decode 165 ms vs 497 ms (measured 2026-11-26, 2 cores).
:func:`release_pool` frees the calling thread's idle pool (OpenMP 5.0
``omp_pause_resource_all``), after which the other thread's regions run at full speed again.
Call it on a thread that is about to hand model work to another thread.
"""

from __future__ import annotations

import ctypes

_gomp: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: unavailable


def _lib():
    global _gomp
    if _gomp is None:
        import torch  # noqa: F401  (loads torch's libgomp first, so the soname resolves to that copy)

        try:
            lib = ctypes.CDLL("libgomp.so.1")
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            _gomp = lib
        except (OSError, AttributeError):
            _gomp = False
    return _gomp or None


def release_pool() -> bool:
    """Free this thread's idle OpenMP worker threads (they are recreated on its next parallel region).

    Returns whether a pool was released (False where libgomp or OpenMP 5 pause is unavailable).
    """
    lib = _lib()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft
