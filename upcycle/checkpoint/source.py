"""A source checkpoint folder: its config, its weight shards and which tensor lives where.

Safetensors shards: only headers are read, so any size of model is checked in milliseconds. PyTorch `.bin`
shards have no header: each is loaded as plain tensors (memory mapped where possible), one shard at a time.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UpcycleError
from .pickle_source import read_pickle_header
from .safetensors_header import TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SINGLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
SAFETENSORS, PICKLE = "safetensors", "pytorch"
WEIGHT_FILES = {SAFETENSORS: (INDEX_FILE, SINGLE_FILE), PICKLE: (PICKLE_INDEX_FILE, PICKLE_SINGLE_FILE)}
TOKENIZER_AND_GENERATION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclass
class SourceCheckpoint:
    """What a checkpoint folder holds: config, shard files, and every tensor's shard, dtype and shape."""

    path: Path
    config: dict
    shard_files: list[str]  # file names relative to `path`, in index order
    weight_map: dict[str, str]  # tensor name -> shard file name
    tensors: dict[str, TensorInfo]  # tensor name -> dtype and shape
    weight_format: str = SAFETENSORS  # or PICKLE: PyTorch .bin shards

    def extra_files(self) -> list[str]:
        """Tokenizer and generation files present beside the weights."""
        return [name for name in TOKENIZER_AND_GENERATION_FILES if (self.path / name).is_file()]


def read_config(path: Path) -> dict:
    """The folder's config.json as plain JSON (a source's remote code is never executed)."""
    if not path.exists():
        raise UpcycleError(f"{path} does not exist")
    if not path.is_dir():
        raise UpcycleError(f"{path} is not a folder; give the checkpoint's folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UpcycleError(f"{path} has no config.json, so it is not a transformers checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UpcycleError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise UpcycleError(f"{config_path} does not hold a JSON object")
    return config


def weight_format(path: Path) -> str:
    """Safetensors when the folder has them (they need no decoding), else PyTorch .bin."""
    for format_name, (index_file, single_file) in WEIGHT_FILES.items():
        if (path / index_file).is_file() or (path / single_file).is_file():
            return format_name
    raise UpcycleError(
        f"{path} has no {INDEX_FILE}, {SINGLE_FILE}, {PICKLE_INDEX_FILE} or {PICKLE_SINGLE_FILE}"
    )


def read_weight_map(path: Path, format_name: str = SAFETENSORS) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single file."""
    index_file, single_file = WEIGHT_FILES[format_name]
    index_path = path / index_file
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise UpcycleError(f"{index_path} is not a valid weight index") from error
        if not isinstance(weight_map, dict) or not weight_map:
            raise UpcycleError(f"{index_path} has an empty or invalid weight_map")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise UpcycleError(f"{index_path} names a shard outside the folder: {shard}")
            if not (path / shard).is_file():
                raise UpcycleError(f"{index_path} names a shard that does not exist: {shard}")
        return weight_map
    header = read_header(path / single_file) if format_name == SAFETENSORS else read_pickle_header(path / single_file)
    return {name: single_file for name in header}


def open_source(path: Path) -> SourceCheckpoint:
    """Read config, index and every shard header; check that the index and the shards agree.

    A .bin source is loaded shard by shard here to learn dtypes and shapes (no header exists); at most one
    shard is alive at a time, and nothing is written before every shape has been checked.
    """
    path = Path(path)
    config = read_config(path)
    format_name = weight_format(path)
    weight_map = read_weight_map(path, format_name)
    shard_files = list(dict.fromkeys(weight_map.values()))
    read_shard_header = read_header if format_name == SAFETENSORS else read_pickle_header
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_files:
        header = read_shard_header(path / shard)
        expected = {name for name, file in weight_map.items() if file == shard}
        missing = sorted(expected - set(header))
        if missing:
            raise UpcycleError(f"shard {shard} lacks tensor {missing[0]} that the index places there")
        tensors.update({name: header[name] for name in expected})
    return SourceCheckpoint(path, config, shard_files, weight_map, tensors, format_name)
