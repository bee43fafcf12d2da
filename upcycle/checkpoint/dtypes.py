"""One table for dtype names: safetensors' ("BF16"), torch's (torch.bfloat16) and the CLI's ("bfloat16").

torch is imported only when a torch dtype is asked for: `upcycle convert` without a cast never needs it.
"""

import functools

from ..errors import UpcycleError


@functools.cache
def safetensors_to_torch() -> dict:
    """safetensors dtype name -> torch.dtype."""
    import torch

    return {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
        "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }


def safetensors_name(dtype) -> str | None:
    """torch.dtype -> safetensors dtype name (None: safetensors cannot store it)."""
    return {value: key for key, value in safetensors_to_torch().items()}.get(dtype)


# What `--dtype` accepts, and the safetensors names it may convert (plain floating point only).
CAST_TARGETS: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CASTABLE = frozenset({"F16", "BF16", "F32", "F64"})
QUANTIZED = frozenset({"F8_E4M3", "F8_E5M2"})  # block-scaled in practice (DeepSeek-V3): a plain cast is wrong


def target_dtype(dtype_name: str | None) -> str | None:
    """`--dtype` value -> safetensors name (None: keep every tensor's dtype)."""
    if dtype_name is None:
        return None
    if dtype_name not in CAST_TARGETS:
        raise UpcycleError(f"--dtype must be one of {', '.join(CAST_TARGETS)}, got {dtype_name!r}")
    return CAST_TARGETS[dtype_name]


def output_dtype(source_dtype: str, target: str | None) -> str:
    """The dtype a tensor is written in: the target for plain floating point, its own for the rest."""
    return target if target is not None and source_dtype in CASTABLE else source_dtype


def torch_dtype(safetensors_dtype: str):
    """safetensors dtype name -> torch.dtype."""
    return safetensors_to_torch()[safetensors_dtype]
