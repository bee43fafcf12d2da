"""Write a safetensors file tensor by tensor, in pieces, so no tensor (let alone a shard) need be in memory whole.

The header is computed up front from every tensor's dtype and shape, then the data is appended in header order;
the writer checks that exactly the announced number of bytes arrives for each tensor. The result is a standard
safetensors file (header padded with spaces to a multiple of 8, data contiguous in header order).
"""

import json
import struct
from pathlib import Path
from typing import BinaryIO

from ..errors import UpcycleError
from .safetensors_header import DTYPE_BYTES, TensorInfo


class StreamingSafetensorsWriter:
    """`with StreamingSafetensorsWriter(path, layout) as writer: writer.write(name, piece); ...`"""

    def __init__(self, path: Path, layout: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.order = list(layout)  # data is written in this order
        self.sizes = {name: info.numel * DTYPE_BYTES[info.dtype] for name, info in layout.items()}
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, info in layout.items():
            header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                            "data_offsets": [offset, offset + self.sizes[name]]}
            offset += self.sizes[name]
        encoded = json.dumps(header, separators=(",", ":")).encode()
        self.header = encoded + b" " * (-len(encoded) % 8)
        self.position = 0  # index into self.order of the tensor being written
        self.written = 0  # bytes of that tensor written so far
        self.handle: BinaryIO | None = None

    def __enter__(self) -> "StreamingSafetensorsWriter":  # noqa: PYI034
        self.handle = open(self.path, "wb")
        self.handle.write(struct.pack("<Q", len(self.header)))
        self.handle.write(self.header)
        self._skip_empty()
        return self

    def write(self, name: str, piece) -> None:
        """Append the next bytes (any buffer: bytes, numpy array, memoryview) of tensor `name`."""
        if self.position >= len(self.order) or self.order[self.position] != name:
            expected = self.order[self.position] if self.position < len(self.order) else "nothing"
            raise RuntimeError(f"writing {name} into {self.path.name} but {expected} is due")
        size = memoryview(piece).nbytes
        if self.written + size > self.sizes[name]:
            raise RuntimeError(f"tensor {name} got more than its {self.sizes[name]} bytes")
        self.handle.write(piece)
        self.written += size
        if self.written == self.sizes[name]:
            self.position, self.written = self.position + 1, 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self.position < len(self.order) and self.sizes[self.order[self.position]] == 0:
            self.position += 1

    def __exit__(self, error_type, error, traceback) -> None:
        self.handle.close()
        if error_type is None and self.position != len(self.order):
            raise UpcycleError(f"{self.path.name} was left incomplete: {self.order[self.position]} was not written")
