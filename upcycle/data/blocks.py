"""Text -> packed token blocks: what calibrate, train and eval feed the model.

Sources (`load_texts`):
- a local `.txt` file: documents are separated by two or more consecutive blank lines (one blank line is a
  paragraph break inside a document); a file with no such separator is one document. `upcycle.corpus` writes
  this format. A folder: every `.txt` file in it (recursively, sorted) is one document.
- `.jsonl`: one JSON object per line, the document in its `text` field (or `text_field`).
- `.parquet`: the `text` (or `text_field`) column; needs pyarrow (`pip install upcycle[data]`).
- anything else that is not a local path: a Hugging Face Hub dataset name, loaded with the datasets library
  (its `train` split) when online.
Blocks (`load_token_blocks`): documents are tokenized with the checkpoint's own tokenizer, eos appended after
each, split into train and held-out by document (a stable hash of the document's text, so the split does not
depend on order, seed or other documents), each side concatenated and cut into fixed-length blocks (the tail
shorter than a block is dropped); the train blocks are shuffled by the seed, the held-out blocks keep their order.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.loading import register_auto_classes
from ..errors import UpcycleError
from .corpus import stable_fraction
from .options import check_data_settings

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DOCUMENT_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
TOKENIZE_CHUNK_DOCUMENTS = 256  # documents tokenized per call (so max_tokens can stop early)


@dataclass
class TokenBlocks:
    """Packed token ids: train (n, block_size) int64 in seeded order, held-out (m, block_size) int64."""

    train: torch.Tensor  # (n, block_size)
    heldout: torch.Tensor  # (m, block_size)

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


def _looks_local(path: str) -> bool:
    return Path(path).exists() or path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [document.strip() for document in DOCUMENT_BREAK.split(text) if document.strip()]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UpcycleError(f"{path} line {number} is not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or text_field not in record:
                raise UpcycleError(f"{path} line {number} has no {text_field!r} field; pass --text-field")
            if not isinstance(record[text_field], str):
                raise UpcycleError(f"{path} line {number}: the {text_field!r} field is not a string")
            documents.append(record[text_field])
    return documents


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        from pyarrow import parquet
    except ImportError as error:
        raise UpcycleError("reading .parquet needs pyarrow: pip install 'upcycle[data]'") from error
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises its own types for corrupt files
        raise UpcycleError(f"{path} is not a readable parquet file ({type(error).__name__})") from error
    if text_field not in table.column_names:
        raise UpcycleError(f"{path} has no {text_field!r} column (columns: {', '.join(table.column_names)}); "
                           "pass --text-field")
    return [value for value in table.column(text_field).to_pylist() if isinstance(value, str)]


def _read_hub_dataset(name: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as error:
        raise UpcycleError(f"{name} is not a local file, and loading a Hub dataset needs the datasets library: "
                           "pip install 'upcycle[data]'") from error
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, gated: datasets raises many types
        raise UpcycleError(f"cannot load the Hub dataset {name} (offline, or no such dataset?): "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                           ) from error
    if text_field not in dataset.column_names:
        raise UpcycleError(f"the Hub dataset {name} has no {text_field!r} column; pass --text-field")
    return [value for value in dataset[text_field] if isinstance(value, str)]


def load_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a local .txt / .jsonl / .parquet file or folder of .txt files, or of a Hub dataset."""
    name = str(path)
    if not _looks_local(name):
        documents = _read_hub_dataset(name, text_field)
    else:
        local = Path(name).expanduser()
        if not local.exists():
            raise UpcycleError(f"the data file {local} does not exist")
        try:
            if local.is_dir():
                files = sorted(local.rglob("*.txt"))
                documents = [file.read_text(encoding="utf-8").strip() for file in files]
            elif local.suffix == ".txt":
                documents = _read_txt(local)
            elif local.suffix in (".jsonl", ".json"):
                documents = _read_jsonl(local, text_field)
            elif local.suffix == ".parquet":
                documents = _read_parquet(local, text_field)
            else:
                raise UpcycleError(f"{local} has an unsupported extension; use .txt, .jsonl or .parquet")
        except UnicodeDecodeError as error:
            raise UpcycleError(f"{local} is not UTF-8 text") from error
        except (IsADirectoryError, PermissionError) as error:
            raise UpcycleError(f"cannot read {local}: {error.strerror}") from error
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise UpcycleError(f"{name} holds no text")
    return documents


def load_checkpoint_tokenizer(checkpoint: str | Path):
    """The tokenizer saved in a checkpoint folder; a checkpoint without one is an error, never a guess."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a checkpoint folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UpcycleError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); data must be tokenized "
                           "with the checkpoint's own tokenizer, so save it into the folder")
    from transformers import AutoTokenizer

    register_auto_classes()  # the checkpoint's model type is then known: transformers never asks to run its code
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UpcycleError(f"cannot load the tokenizer of {folder}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                           ) from error


def _tokenize(documents: list[str], tokenizer, max_tokens: int | None) -> list[list[int]]:
    """Token ids per document, eos appended; stops after the document that reaches max_tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokenized, total = [], 0
    for start in range(0, len(documents), TOKENIZE_CHUNK_DOCUMENTS):
        chunk = documents[start:start + TOKENIZE_CHUNK_DOCUMENTS]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            tokenized.append(list(ids) + eos)
            total += len(tokenized[-1])
            if max_tokens is not None and total >= max_tokens:
                return tokenized
    return tokenized


def _pack(documents: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate and cut into (n, block_size) blocks; the tail shorter than a block is dropped."""
    stream = torch.tensor([token for document in documents for token in document], dtype=torch.int64)
    n_blocks = stream.numel() // block_size
    return stream[: n_blocks * block_size].view(n_blocks, block_size)


def load_token_blocks(data_path: str | Path, tokenizer, block_size: int, seed: int = 0,
                      heldout_fraction: float = 0.1, max_tokens: int | None = None,
                      text_field: str = "text") -> TokenBlocks:
    """Packed train and held-out token blocks from a data source (see the module docstring).

    The held-out split is by document; when the held-out documents are too short to fill one block (few or
    tiny documents), the last blocks of the stream (a heldout_fraction of them, at least one) are held out.
    max_tokens caps the tokens read (documents in order), so a large dataset need not be tokenized whole.
    """
    check_data_settings(block_size, heldout_fraction, max_tokens)
    documents = load_texts(data_path, text_field)
    tokenized = _tokenize(documents, tokenizer, max_tokens)
    is_heldout = [stable_fraction(text) < heldout_fraction for text in documents[: len(tokenized)]]
    train = _pack([ids for ids, held in zip(tokenized, is_heldout) if not held], block_size)
    heldout = _pack([ids for ids, held in zip(tokenized, is_heldout) if held], block_size)
    if heldout.shape[0] == 0 or train.shape[0] == 0:
        every = _pack(tokenized, block_size)
        if every.shape[0] < 2:
            total = sum(map(len, tokenized))
            raise UpcycleError(f"{data_path} holds {total} tokens, fewer than two blocks of {block_size}; "
                               "give more text or a smaller block size")
        n_heldout = max(1, round(heldout_fraction * every.shape[0]))
        train, heldout = every[:-n_heldout], every[-n_heldout:]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(train=train[order].contiguous(), heldout=heldout.contiguous())
