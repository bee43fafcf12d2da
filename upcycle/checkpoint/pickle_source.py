"""PyTorch `.bin` shards (pickles), loaded only as plain tensors: `torch.load(weights_only=True)`.

A pickle can run any code while it loads; `weights_only=True` allows tensors, dicts, lists and numbers only, so a
shard that needs a class of its own is refused instead of executed. Zip-format shards (torch >= 1.6) are memory
mapped (`mmap=True`): tensor bytes are read from disk only when touched. Legacy (pre-zip) shards cannot be mapped
and are loaded whole; callers keep at most one shard alive at a time. torch is imported only here, when a .bin
source is read.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UpcycleError
from .dtypes import safetensors_name
from .safetensors_header import TensorInfo

if TYPE_CHECKING:
    import torch

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # PROTO opcode, protocol 2 to 5
REFUSED = "Weights only load failed"  # torch's weights-only unpickler refusing an instruction or a global


def is_zip_checkpoint(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def looks_like_pickle(path: Path) -> bool:
    """A zip-format torch checkpoint or a raw pickle (protocol 2 or later): what torch.save writes."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == ZIP_MAGIC or start[:2] in PICKLE_PROTOCOLS


def refusal_sentence(path: Path, message: str) -> str:
    """Why torch.load(weights_only=True) refused `path`, in one sentence: what was refused and why."""
    needed = re.search(r"GLOBAL ([\w.]+)", message)
    if needed:
        return (f"{path.name} was refused: it is a pickle holding objects other than tensors, which needs code to "
                f"load ({needed.group(1)}); upcycle loads .bin files only as plain weights (torch.load "
                "weights_only=True), because unpickling anything else can run code: convert it to safetensors "
                "yourself if you trust it")
    if REFUSED in message and looks_like_pickle(path):
        operand = re.search(r"Unsupported operand (\d+)", message)
        what = f"pickle instruction {operand.group(1)}" if operand else "a pickle instruction"
        return (f"{path.name} was refused: it is a pickle holding objects other than tensors ({what}, which the "
                "weights-only loader does not accept); upcycle loads .bin files only as plain weights (torch.load "
                "weights_only=True), because unpickling anything else can run code: convert it to safetensors "
                "yourself if you trust it")
    return f"{path.name} is not a readable PyTorch checkpoint (corrupt, or not a pickle torch.save wrote)"


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensor name -> tensor (memory mapped where the format allows); refuses pickles that need code."""
    import torch

    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": the refusal below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_checkpoint(path))
    except pickle.UnpicklingError as error:
        raise UpcycleError(refusal_sentence(path, str(error))) from error
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as error:
        raise UpcycleError(f"{path.name} is not a readable PyTorch checkpoint (corrupt or truncated)") from error
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()
    ):
        raise UpcycleError(f"{path.name} does not hold a flat mapping of tensor names to tensors (a state dict)")
    return state


def tensor_info(path: Path, tensor: torch.Tensor, name: str) -> TensorInfo:
    if safetensors_name(tensor.dtype) is None:
        raise UpcycleError(f"{path.name} holds tensor {name} of dtype {tensor.dtype}, which safetensors cannot store")
    return TensorInfo(safetensors_name(tensor.dtype), tuple(tensor.shape))


def read_pickle_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names -> dtype and shape. A pickle has no header: the shard is loaded (mapped) and dropped."""
    state = load_pickle_shard(path)
    return {name: tensor_info(path, tensor, name) for name, tensor in state.items()}
