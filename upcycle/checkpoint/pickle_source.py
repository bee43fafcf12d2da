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
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UpcycleError
from .dtypes import safetensors_name
from .safetensors_header import TensorInfo

if TYPE_CHECKING:
    import torch

ZIP_MAGIC = b"PK\x03\x04"


def is_zip_checkpoint(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensor name -> tensor (memory mapped where the format allows); refuses pickles that need code."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_checkpoint(path))
    except pickle.UnpicklingError as error:
        needed = re.search(r"GLOBAL ([\w.]+)", str(error))
        if needed:
            raise UpcycleError(
                f"{path.name} is a pickle that needs code to load ({needed.group(1)}); upcycle loads .bin files "
                "only as plain tensors (torch.load weights_only=True) and refuses it: convert it to safetensors "
                "yourself if you trust it"
            ) from error
        raise UpcycleError(f"{path.name} is not a readable PyTorch checkpoint (corrupt or not a pickle)") from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
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
