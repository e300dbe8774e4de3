"""Read a GGUF file's header (metadata and tensor table) without loading tensors.

Pure Python, bounded by the file size: a damaged or hostile file gives a ModelError
naming the file, never a huge allocation. The import uses it to check the architecture
and tensor types before handing the file to ``mx.load``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ringd.errors import ModelError

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
}
#: Tensor types MLX loads (the quantized ones straight into its own affine layout).
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    type_name: str
    offset: int  # from the start of the data section
    nbytes: int | None  # None for types we do not know the block size of


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_start: int
    file_size: int


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise ModelError(f"{self.path}: the GGUF header runs past the end of the file",
                             hint="the file is truncated or damaged; download it again")
        return self.f.read(n)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.bytes(self.scalar("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.scalar("<I")
            n = self.scalar("<Q")
            if n > self.size:  # every item takes at least one byte
                raise ModelError(f"{self.path}: array of {n} items cannot fit in the file",
                                 hint="the file is damaged; download it again")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.bytes(n * width)))
            return [self.value(itype) for _ in range(n)]
        raise ModelError(f"{self.path}: unknown GGUF value type {vtype}",
                         hint="the file is damaged or from a newer GGUF version")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse metadata and the tensor table; check every tensor lies inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except FileNotFoundError:
        raise ModelError(f"GGUF file {path} does not exist", hint="check the path") from None
    except OSError as e:
        raise ModelError(f"cannot open {path}: {e}") from None
    with f:
        r = _Reader(f, path, size)
        if size < 24 or r.bytes(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (no GGUF magic number)",
                             hint="give a .gguf model file, e.g. from llama.cpp or Hugging Face")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        if n_tensors > size or n_kv > size:
            raise ModelError(f"{path}: header counts do not fit in the file",
                             hint="the file is damaged; download it again")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise ModelError(f"{path}: tensor {name!r} has {n_dims} dimensions",
                                 hint="the file is damaged; download it again")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            type_id = r.scalar("<I")
            offset = r.scalar("<Q")
            infos.append((name, shape, type_id, offset))
        alignment = int(metadata.get("general.alignment", 32)) or 32
        data_start = -(-f.tell() // alignment) * alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        type_name, block, block_bytes = GGML_TYPES.get(type_id, (f"type {type_id}", 0, 0))
        nbytes = None
        if block:
            count = 1
            for d in shape:
                count *= d
            nbytes = -(-count // block) * block_bytes
            if data_start + offset + nbytes > size:
                raise ModelError(
                    f"{path}: tensor {name!r} ends at byte {data_start + offset + nbytes}, "
                    f"past the end of the {size}-byte file",
                    hint="the file is truncated; download it again")
        tensors[name] = GGUFTensor(name, shape, type_name, offset, nbytes)
    return GGUFHeader(path, version, metadata, tensors, data_start, size)
