"""``mx.array`` <-> :class:`ringd.core.wire.Tensor`, with as few copies as MLX allows.

Sending: a row-contiguous array is exported through the buffer protocol, no copy (the
view keeps the array alive); a strided one is copied once. MLX exports bfloat16 too (buffer
format ``"bfloat16"``), so it is cast to bytes directly: going through ``view(mx.uint16)``
instead adds a graph op whose evaluation cost ~100 µs per 32 KiB activation on the CPU
backend (``bench/transport.py`` codec rows), 0.9 µs without it. Receiving: ``mx.array``
copies the bytes once into MLX memory (MLX can't adopt foreign memory). numpy has no
bfloat16, so a received bfloat16 is read as its uint16 bit pattern and reinterpreted with
``view`` -- a lazy op that is evaluated with the first layer that consumes it.
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
        raise LocalProtocolError(f"cannot send an array of dtype {arr.dtype}; "
                                 f"allowed: {sorted(_NAMES.values())}")
    mv = memoryview(arr)
    if not mv.c_contiguous:  # numpy copies it (it knows bfloat16 only as uint16 bits)
        mv = memoryview(np.ascontiguousarray(arr.view(mx.uint16) if name == "bfloat16" else arr))
    return Tensor(name, tuple(arr.shape), mv.cast("B") if mv.nbytes else b"")


def from_wire(t: Tensor) -> mx.array:
    """An MLX array holding a copy of ``t``'s bytes."""
    arr = mx.array(np.frombuffer(t.data, dtype=_NUMPY[t.dtype]).reshape(t.shape))
    return arr.view(mx.bfloat16) if t.dtype == "bfloat16" else arr
