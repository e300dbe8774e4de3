"""``mx.array`` <-> :class:`ringd.core.wire.Tensor`, with as few copies as MLX allows.

Sending: a row-contiguous array is exported through the buffer protocol, no copy (the
view keeps the array alive); a strided one is copied once. Receiving: ``mx.array`` copies
the bytes once into MLX memory (MLX can't adopt foreign memory). numpy has no bfloat16, so
bfloat16 travels as its uint16 bit pattern and is reinterpreted with ``view`` (no copy).
Call from the compute thread: exporting evaluates the array.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ringd.core.wire import Tensor
from ringd.errors import LocalProtocolError

_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16",
          mx.int32: "int32", mx.uint32: "uint32"}
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
          "int32": np.int32, "uint32": np.uint32}


def to_wire(arr: mx.array) -> Tensor:
    """The wire form of ``arr`` (evaluates it)."""
    name = _NAMES.get(arr.dtype)
    if name is None:
        raise LocalProtocolError(f"cannot send an array of dtype {arr.dtype}; allowed: {sorted(_NAMES.values())}")
    src = arr.view(mx.uint16) if name == "bfloat16" else arr
    mv = memoryview(src)
    if not mv.c_contiguous:
        mv = memoryview(np.ascontiguousarray(src))
    return Tensor(name, tuple(arr.shape), mv.cast("B") if mv.nbytes else b"")


def from_wire(t: Tensor) -> mx.array:
    """An MLX array holding a copy of ``t``'s bytes."""
    arr = mx.array(np.frombuffer(t.data, dtype=_NUMPY[t.dtype]).reshape(t.shape))
    return arr.view(mx.bfloat16) if t.dtype == "bfloat16" else arr
