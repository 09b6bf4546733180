"""Observe memory on CPU: the peak of live allocated bytes, and the largest tensor any op produces.

torch has no allocator statistics for CPU (``torch.cuda.max_memory_allocated`` has no CPU twin), and the
process RSS only ever grows. Two observers that see every allocation instead:

* ``peak_bytes``: torch.profiler with ``profile_memory=True`` makes the CPU allocator report each
  allocation (+bytes) and free (−bytes) with a timestamp. Summing them in time order gives the live
  bytes at every instant; the maximum is the peak above what was allocated before the call. Frees of
  memory that existed before count too, so the figure is "extra memory needed by this call".
* ``largest_tensor``: a TorchDispatchMode sees the outputs of every aten op, in forward and in
  backward, and records the largest element count. It proves a tensor of a given size never existed.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's file descriptor 2 (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of CPU bytes allocated by ``fn()`` and alive at the same time (0 if it frees more than it takes)."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto writes "profiler_start/stop" lines to fd 2 on entry and exit
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    # "[memory]" events are the allocator's reports: +bytes on allocation, -bytes on free
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class LargestTensorProbe(TorchDispatchMode):
    """Records the largest tensor (elements and bytes) that any aten op allocates while active.

    Works on any device, ``meta`` included, where shapes are computed but nothing is allocated.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0  # elements
        self.largest_bytes = 0
        self.largest_op = ""
        self.calls: dict[str, int] = {}  # op name -> number of calls, to count matmuls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.calls[name] = self.calls.get(name, 0) + 1
        # views and in-place ops return (part of) an input: their schema marks the alias, they allocate nothing
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.numel() > self.largest:
                    self.largest, self.largest_op = t.numel(), name
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


def largest_tensor(fn: Callable[[], Any]) -> int:
    """Element count of the largest tensor any aten op creates while ``fn()`` runs (forward and backward)."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    with LargestTensorProbe() as probe:
        fn()
    return probe.largest
