"""The corpus, the BPE tokenizer and text -> packed token blocks (upcycle.data.corpus, tokenizer_training, data)."""

import json

import pytest
import torch

from upcycle.data.blocks import load_checkpoint_tokenizer, load_texts, load_token_blocks
from upcycle.data.corpus import split_documents, stable_fraction, stdlib_documents
from upcycle.data.tokenizer_training import train_bpe_tokenizer
from upcycle.errors import UpcycleError

DOCUMENTS = ["First document.\n\nIts second paragraph.", "Second document, one line.", "Third: ünïcode ✓ text."]


def write_txt(path, documents=DOCUMENTS):
    path.write_text("\n\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def test_stdlib_corpus_is_real_text_in_a_fixed_order(text_corpus):
    documents = stdlib_documents()
    names = [name for name, _ in documents]
    assert len(names) == len(set(names)) > 300
    assert names[0].startswith("topic:") and any(name == "module:json" for name in names)
    assert sum(len(text) for _, text in documents) > 1_000_000  # pydoc topics + docstrings: about 2.2 MB
    assert "\n\n\n" not in "".join(text for _, text in documents)  # two blank lines separate documents only
    train, heldout = split_documents(documents, 0.1)
    assert len(train) + len(heldout) == len(documents) and 0.03 < len(heldout) / len(documents) < 0.2
    assert all(stable_fraction(name) < 0.1 for name, _ in heldout)
    assert load_texts(text_corpus / "heldout.txt") == [text for _, text in heldout]


def test_bpe_tokenizer_round_trips_and_saves(tmp_path):
    tokenizer = train_bpe_tokenizer(DOCUMENTS * 20, vocab_size=300)
    assert len(tokenizer) <= 300
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == \
        [0, 1, 2, 3]
    text = "Third: ünïcode ✓ text, and bytes never seen: 中文"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_checkpoint_tokenizer(tmp_path)
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token == "</s>"


def test_txt_jsonl_and_parquet_give_the_same_documents(tmp_path):
    assert load_texts(write_txt(tmp_path / "a.txt")) == DOCUMENTS
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCUMENTS)))
    assert load_texts(tmp_path / "a.jsonl", text_field="body") == DOCUMENTS
    pytest.importorskip("pyarrow")
    import pyarrow
    from pyarrow import parquet

    parquet.write_table(pyarrow.table({"text": DOCUMENTS}), tmp_path / "a.parquet")
    assert load_texts(tmp_path / "a.parquet") == DOCUMENTS
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, document in enumerate(DOCUMENTS):
        (folder / f"{i}.txt").write_text(document)
    assert load_texts(folder) == DOCUMENTS  # a folder: one document per .txt file


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "does not exist"),
    ("\n\n  \n", ".txt", "holds no text"),
    (b"\xff\xfe\x00bad", ".txt", "not UTF-8"),
    ('{"text": "ok"}\n{"other": 1}\n', ".jsonl", "has no 'text' field"),
    ("not json\n", ".jsonl", "not valid JSON"),
    ("x", ".csv", "unsupported extension"),
    (b"PAR1 broken", ".parquet", "parquet"),
])
def test_bad_data_files_are_clean_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UpcycleError, match=message):
        load_texts(path)


def test_hub_name_without_datasets_or_network_is_one_sentence(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UpcycleError, match="Hub dataset needs the datasets library"):
        load_texts("someone/some-dataset")


def test_token_blocks_pack_documents_with_eos_and_split_by_document(text_corpus, text_tokenizer):
    path = text_corpus / "train.txt"
    blocks = load_token_blocks(path, text_tokenizer, block_size=64, seed=0, max_tokens=40_000)
    assert blocks.train.dtype == blocks.heldout.dtype == torch.int64
    assert blocks.train.shape[1] == blocks.heldout.shape[1] == 64 and blocks.heldout.shape[0] > 0
    # Rebuild the streams by hand: documents in order, eos after each, held out by the hash of their text.
    documents = load_texts(path)
    eos = text_tokenizer.eos_token_id
    streams = {True: [], False: []}
    total = 0
    for document in documents:
        ids = text_tokenizer(document, add_special_tokens=False)["input_ids"] + [eos]
        streams[stable_fraction(document) < 0.1].extend(ids)
        total += len(ids)
        if total >= 40_000:
            break
    heldout = torch.tensor(streams[True][: blocks.heldout.numel()]).view(-1, 64)
    assert torch.equal(blocks.heldout, heldout)
    train = torch.tensor(streams[False][: blocks.train.numel()]).view(-1, 64)
    assert sorted(map(tuple, blocks.train.tolist())) == sorted(map(tuple, train.tolist()))  # a permutation
    assert not torch.equal(blocks.train, train)  # ...shuffled
    again = load_token_blocks(path, text_tokenizer, block_size=64, seed=0, max_tokens=40_000)
    other_seed = load_token_blocks(path, text_tokenizer, block_size=64, seed=1, max_tokens=40_000)
    assert torch.equal(again.train, blocks.train) and torch.equal(other_seed.heldout, blocks.heldout)
    assert not torch.equal(other_seed.train, blocks.train)


def test_too_few_documents_fall_back_to_holding_out_the_last_blocks(tmp_path, text_tokenizer):
    path = tmp_path / "one.txt"
    path.write_text("A single document that repeats itself. " * 200)
    blocks = load_token_blocks(path, text_tokenizer, block_size=32, heldout_fraction=0.25)
    assert blocks.heldout.shape[0] >= 1 and blocks.train.shape[0] >= 1
    with pytest.raises(UpcycleError, match="fewer than two blocks"):
        load_token_blocks(write_txt(tmp_path / "small.txt"), text_tokenizer, block_size=512)


def test_checkpoint_without_tokenizer_is_a_clear_error(tmp_path, trained_mixtral):
    assert load_checkpoint_tokenizer(trained_mixtral).eos_token_id is not None
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UpcycleError, match="has no tokenizer"):
        load_checkpoint_tokenizer(tmp_path)
