"""Rewrite one source shard as safetensors when its bytes must change: a `--dtype` cast, or a PyTorch .bin source.

Memory stays bounded by a chunk, not a tensor: a safetensors shard is read sequentially in chunks of at most
CAST_CHUNK_BYTES, each chunk cast element-wise and appended to the output, and the same reads feed the source's
sha256 (one pass over the file). A .bin shard is memory mapped (zip format) and its tensors are cast and written
in chunks as well; its sha256 takes a second, read-only pass.
"""

import hashlib
from pathlib import Path

import torch

from ..errors import UpcycleError
from .dtypes import output_dtype, torch_dtype
from .hashing import HASH_CHUNK_BYTES, sha256_of_file
from .pickle_source import load_pickle_shard, tensor_info
from .safetensors_header import DTYPE_BYTES, TensorInfo, read_layout
from .safetensors_writer import StreamingSafetensorsWriter

CAST_CHUNK_BYTES = 64 * 1024 * 1024  # a multiple of every element size
SAFETENSORS_METADATA = {"format": "pt"}


def _cast_piece(raw: memoryview, source_dtype: str, target_dtype: str):
    """Raw bytes of `source_dtype` elements -> a buffer of the same elements in `target_dtype`."""
    if source_dtype == target_dtype:
        return raw
    elements = torch.frombuffer(raw, dtype=torch_dtype(source_dtype))  # (n,), shares `raw`
    return elements.to(torch_dtype(target_dtype)).view(torch.uint8).numpy()


def rewrite_safetensors_shard(source_file: Path, destination: Path, target: str | None) -> str:
    """Write `source_file` with floating-point tensors cast to `target`; return the source's sha256."""
    layout = read_layout(source_file)
    spans = sorted(layout.spans.items(), key=lambda item: item[1].begin)  # file order: one sequential read
    out_layout = {name: TensorInfo(output_dtype(span.info.dtype, target), span.info.shape) for name, span in spans}
    digest = hashlib.sha256()
    buffer = bytearray(CAST_CHUNK_BYTES)
    with open(source_file, "rb") as reader, \
            StreamingSafetensorsWriter(destination, out_layout, SAFETENSORS_METADATA) as writer:
        digest.update(reader.read(layout.data_start))
        position = 0  # offset in the data section
        for name, span in spans:
            if span.begin < position:
                raise UpcycleError(f"{source_file.name} is corrupt: tensor {name} overlaps the tensor before it")
            if span.begin > position:  # a gap the format does not allow, but hash what is there
                digest.update(reader.read(span.begin - position))
            remaining = span.end - span.begin
            while remaining:
                view = memoryview(buffer)[: min(CAST_CHUNK_BYTES, remaining)]
                got = reader.readinto(view)
                if got != len(view):
                    raise UpcycleError(f"{source_file.name} is truncated inside tensor {name}")
                digest.update(view)
                writer.write(name, _cast_piece(view, span.info.dtype, out_layout[name].dtype))
                remaining -= got
            position = span.end
        while chunk := reader.read(HASH_CHUNK_BYTES):  # trailing bytes, if any, belong to the file's hash
            digest.update(chunk)
    return digest.hexdigest()


def rewrite_pickle_shard(source_file: Path, destination: Path, target: str | None) -> str:
    """Write a .bin shard's tensors as safetensors (cast to `target` if given); return the source's sha256."""
    state = load_pickle_shard(source_file)
    out_layout = {}
    for name in sorted(state):
        info = tensor_info(source_file, state[name], name)
        out_layout[name] = TensorInfo(output_dtype(info.dtype, target), info.shape)
    with StreamingSafetensorsWriter(destination, out_layout, SAFETENSORS_METADATA) as writer:
        for name, info in out_layout.items():
            flat = state[name].reshape(-1)  # (numel,): a view of the mapped storage when contiguous
            step = max(1, CAST_CHUNK_BYTES // max(flat.element_size(), DTYPE_BYTES[info.dtype]))
            for start in range(0, flat.numel(), step):
                piece = flat[start: start + step].to(torch_dtype(info.dtype)).contiguous()
                writer.write(name, piece.view(torch.uint8).numpy())
    del state
    return sha256_of_file(source_file)
