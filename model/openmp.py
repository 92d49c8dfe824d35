"""One OpenMP thread pool at a time, for CPU work handed from one Python thread to another.

torch's Linux builds run their CPU kernels on GNU OpenMP (libgomp), which gives every thread that starts a
parallel region a pool of worker threads of its own, kept until that thread ends. Once a process holds more
such workers than it has CPUs, libgomp treats it as oversubscribed: workers stop spinning between parallel
regions and sleep, and every region pays to wake them. The engine decodes on its own thread while the thread
that loaded the model (the chat's, the server's, a trainer's) keeps its pool, so on 2 cores every small
matmul of a decode step paid that wake-up (bench/bench_generate.py, batch 8: the engine at 0.72x of
model.generate's tokens/s with both pools, 1.00x with one). `release_thread_pool()` ends the calling thread's pool
(`omp_pause_resource_all`, which libgomp applies to the calling thread only); the pool comes back, in a few
microseconds, at that thread's next parallel region. Elsewhere (macOS' libomp, Windows, builds without
OpenMP) it does nothing.
"""
import ctypes
import functools
import os
import sys

OMP_PAUSE_SOFT = 1   # omp_pause_resource_t; libgomp frees the calling thread's pool for either kind


@functools.lru_cache(maxsize=1)
def _pause_function():
    """libgomp's omp_pause_resource_all, from the copy torch loaded (Linux), or None."""
    import torch
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            # address perms offset dev inode path: the path may hold spaces, or end in " (deleted)"
            loaded = sorted({line.split(None, 5)[5].strip().removesuffix(" (deleted)") for line in maps
                             if "libgomp" in line and len(line.split(None, 5)) == 6})
    except OSError:
        return None
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    # torch/lib/ on x86-64 wheels, torch.libs/ where auditwheel put it (aarch64 wheels)
    homes = (torch_dir + os.sep, torch_dir + ".libs" + os.sep)
    ours = [path for path in loaded if os.path.realpath(path).startswith(homes)]
    candidates = ours or (loaded if len(loaded) == 1 else [])   # another package's libgomp is not torch's
    for path in candidates:
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return None


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP worker threads (GNU OpenMP only). True when the runtime took the call."""
    pause = _pause_function()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
