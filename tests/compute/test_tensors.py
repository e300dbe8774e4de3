"""mx.array <-> wire tensors: every dtype and shape round-trips bit-exactly, sends without a
copy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.compute.tensors import from_wire, to_wire
from ringd.core.requests import SamplingParams
from ringd.core.wire import Activation, Tensor, decode, encode_bytes
from ringd.errors import LocalProtocolError

DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32]


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), max_size=4),
       seed=st.integers(0, 2**31))
def test_round_trip_every_dtype_and_shape(dtype, shape, seed) -> None:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    if dtype in (mx.float16, mx.bfloat16):
        arr = mx.array(bits.astype(np.uint16)).view(dtype)  # every bit pattern, NaNs included
    else:
        arr = mx.array(bits).view(dtype)
    t = to_wire(arr)
    assert t.shape == tuple(shape) and t.nbytes == arr.nbytes
    msg = decode(encode_bytes(Activation("r", 0, 0, 0, 0, 1, "n", SamplingParams(), True, t)))
    back = from_wire(msg.tensor)
    assert back.dtype == dtype and back.shape == arr.shape
    same_bits = mx.uint16 if dtype in (mx.float16, mx.bfloat16) else mx.uint32
    assert mx.array_equal(back.view(same_bits), arr.view(same_bits)).item()


def test_contiguous_arrays_are_sent_without_a_copy() -> None:
    arr = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    t = to_wire(arr)
    assert isinstance(t.data, memoryview) and t.data.obj is arr  # a view of MLX's own buffer


def test_bfloat16_is_exported_as_is_without_a_view_op() -> None:
    arr = mx.arange(8, dtype=mx.float32).astype(mx.bfloat16).reshape(2, 4)
    mx.eval(arr)
    t = to_wire(arr)
    # MLX's own buffer of the array itself: no uint16 view op was built (and evaluated)
    assert isinstance(t.data, memoryview) and t.data.obj is arr and t.dtype == "bfloat16"
    strided = arr.T
    back = from_wire(to_wire(strided))
    assert back.dtype == mx.bfloat16 and mx.array_equal(back, strided).item()


def test_strided_arrays_are_copied_once() -> None:
    arr = mx.arange(12, dtype=mx.float32).reshape(3, 4).T
    t = to_wire(arr)
    assert t.shape == (4, 3)
    copy = t.data.obj  # one contiguous copy, owned by the wire tensor: not a view of a copy
    assert isinstance(copy, np.ndarray) and copy.flags.owndata and copy.base is None
    assert np.array_equal(np.frombuffer(t.data, np.float32).reshape(4, 3), np.array(arr))


def test_unsupported_dtype_is_our_mistake() -> None:
    with pytest.raises(LocalProtocolError, match="dtype"):
        to_wire(mx.zeros((2,), dtype=mx.int8))
    with pytest.raises(LocalProtocolError):
        Tensor("float64", (1,), bytes(8))
