"""Counting, on the CPU, the operations that would make the host wait for a GPU: an op whose result the host
must read (``.item()``, ``bool(t)``, ``torch.equal``) or whose output size depends on the data (``nonzero``, a
boolean index, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``). Each of these is a
host sync on CUDA, wherever it runs: the device idles while the host waits, then idles again while the host
queues the next kernels. (Device-to-host copies, ``.cpu()`` and ``.tolist()``, are not seen on the CPU, where
they do not dispatch.)"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...``; then ``s.count`` and ``s.where`` (op, the caller's file:line) -> count."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        hit = func in READS
        if func in INDEXING:  # a boolean index is a nonzero() inside the kernel
            hit = any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if hit:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            at = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
            self.where[(str(func.overloadpacket.__name__), at)] += 1
        return func(*args, **(kwargs or {}))
