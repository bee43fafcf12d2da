"""Read and check a safetensors file's header without loading any tensor data.

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}}, then data.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UpcycleError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's bytes lie in a safetensors file: [begin, end) after the data start."""

    info: TensorInfo
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsLayout:
    data_start: int  # 8 + header length: the file offset of byte 0 of the data section
    spans: dict[str, TensorSpan]  # tensor name -> dtype, shape, data offsets


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names -> dtype and shape; raises UpcycleError if the file is truncated or not safetensors."""
    return {name: span.info for name, span in read_layout(path).spans.items()}


def read_layout(path: Path) -> SafetensorsLayout:
    """Every tensor's dtype, shape and byte offsets, checked against the file size (no tensor data is read)."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            length_bytes = handle.read(8)
            if len(length_bytes) < 8:
                raise UpcycleError(f"{path} is not a valid safetensors file (truncated header)")
            (header_length,) = struct.unpack("<Q", length_bytes)
            if header_length > min(MAX_HEADER_BYTES, file_size - 8):
                raise UpcycleError(f"{path} is not a valid safetensors file (corrupt or truncated header)")
            raw = json.loads(handle.read(header_length))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UpcycleError(f"{path} is not a valid safetensors file (unreadable header)") from error
    except OSError as error:
        raise UpcycleError(f"cannot read {path}: {error.strerror}") from error
    if not isinstance(raw, dict):
        raise UpcycleError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    spans: dict[str, TensorSpan] = {}
    data_end = 0
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        try:
            info = TensorInfo(entry["dtype"], tuple(int(d) for d in entry["shape"]))
            begin, end = (int(offset) for offset in entry["data_offsets"])
            expected = info.numel * DTYPE_BYTES[info.dtype]
        except (KeyError, TypeError, ValueError) as error:
            raise UpcycleError(f"{path} is not a valid safetensors file (bad entry for {name})") from error
        if end - begin != expected or begin < 0:
            raise UpcycleError(f"{path} is corrupt: tensor {name} has {end - begin} bytes, expected {expected}")
        data_end = max(data_end, end)
        spans[name] = TensorSpan(info, begin, end)
    if 8 + header_length + data_end > file_size:
        raise UpcycleError(
            f"{path} is truncated: it has {file_size} bytes but its header describes {8 + header_length + data_end}"
        )
    return SafetensorsLayout(8 + header_length, spans)


def read_tensor_bytes(path: Path, name: str) -> bytes:
    """The raw bytes of one (small) tensor, read without decoding: no framework needed."""
    layout = read_layout(path)
    if name not in layout.spans:
        raise UpcycleError(f"{path} has no tensor {name}")
    span = layout.spans[name]
    with open(path, "rb") as handle:
        handle.seek(layout.data_start + span.begin)
        return handle.read(span.end - span.begin)
