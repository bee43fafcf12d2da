"""Constant-filled float tensors as raw little-endian bytes, without torch: what the new MoE++ tensors are made of.

Only values exact in every float format are needed (0 and -inf), so bfloat16 is the top half of the float32
pattern and no rounding question arises.
"""

import struct

from .safetensors_header import DTYPE_BYTES

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def element_bytes(value: float, dtype: str) -> bytes:
    """One element of `dtype` holding `value`, little-endian (the safetensors byte order)."""
    if dtype == "F64":
        return struct.pack("<d", value)
    if dtype == "F32":
        return struct.pack("<f", value)
    if dtype == "F16":
        return struct.pack("<e", value)
    if dtype == "BF16":
        single = struct.pack("<f", value)  # bfloat16 = the upper two bytes of float32
        if single[:2] != b"\0\0":
            raise ValueError(f"{value} is not exact in bfloat16")
        return single[2:]
    raise ValueError(f"not a float dtype: {dtype}")


def filled_bytes(value: float, dtype: str, numel: int) -> bytes:
    """`numel` elements of `dtype`, every one `value`."""
    return element_bytes(value, dtype) * numel


def all_equal(raw: bytes, value: float, dtype: str) -> bool:
    """Whether every element of `raw` (elements of `dtype`) is exactly `value`."""
    size = DTYPE_BYTES[dtype]
    return len(raw) % size == 0 and raw == element_bytes(value, dtype) * (len(raw) // size)
