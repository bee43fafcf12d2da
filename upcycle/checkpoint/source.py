"""A source checkpoint folder: its config, its safetensors shards and which tensor lives where.

Only headers are read here; tensor data is never loaded, so any size of model is checked in milliseconds.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UpcycleError
from .safetensors_header import TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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


def read_weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single file."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise UpcycleError(f"{index_path} is not a valid safetensors index") from error
        if not isinstance(weight_map, dict) or not weight_map:
            raise UpcycleError(f"{index_path} has an empty or invalid weight_map")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise UpcycleError(f"{index_path} names a shard outside the folder: {shard}")
            if not (path / shard).is_file():
                raise UpcycleError(f"{index_path} names a shard that does not exist: {shard}")
        return weight_map
    if (path / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in read_header(path / SINGLE_FILE)}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UpcycleError(f"{path} holds PyTorch .bin weights; only safetensors sources are supported so far")
    raise UpcycleError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}")


def open_source(path: Path) -> SourceCheckpoint:
    """Read config, index and every shard header; check that the index and the shards agree."""
    path = Path(path)
    config = read_config(path)
    weight_map = read_weight_map(path)
    shard_files = list(dict.fromkeys(weight_map.values()))
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_files:
        header = read_header(path / shard)
        expected = {name for name, file in weight_map.items() if file == shard}
        missing = sorted(expected - set(header))
        if missing:
            raise UpcycleError(f"shard {shard} lacks tensor {missing[0]} that the index places there")
        tensors.update({name: header[name] for name in expected})
    return SourceCheckpoint(path, config, shard_files, weight_map, tensors)
