"""`--link auto|reflink|hard|copy`: unchanged shards keep their bytes whichever way they are placed, sources in
the Hub cache (symlinks to blobs) are followed to the blob, and provenance hashes stay right."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import folder_digest, save_source, tiny_mixtral
from test_sources import build_fake_hub_cache, folder_files

from upcycle.checkpoint.linking import reflink
from upcycle.errors import UpcycleError
from upcycle.surgery.convert import ConvertOptions, convert


def filesystem_can_reflink(folder: Path) -> bool:
    probe, clone = folder / "reflink-probe", folder / "reflink-probe-clone"
    probe.write_bytes(b"x" * 4096)
    try:
        return reflink(probe, clone)
    finally:
        probe.unlink()
        clone.unlink(missing_ok=True)


@pytest.fixture()
def sharded_source(tmp_path) -> Path:
    return save_source(tiny_mixtral(), tmp_path / "src", "per-expert", sharded=True)


@pytest.fixture()
def hub_cache_source(tmp_path, sharded_source) -> Path:
    """The sharded source as a Hub cache snapshot: every file a relative symlink to a content-named blob."""
    return build_fake_hub_cache(tmp_path / "hub-cache", folder_files(sharded_source))


def source_shards(source: Path) -> list[str]:
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    return list(dict.fromkeys(weight_map.values()))


def output_shard(source: Path, output: Path, position: int) -> Path:
    """The output's name for the source's shard number `position` (1-based): model-0000i-of-0000n."""
    n = len(source_shards(source)) + 1
    return output / f"model-{position:05d}-of-{n:05d}.safetensors"


def check_output(source: Path, output: Path, written_by: str) -> dict:
    """Every source shard is in the output, renamed, bytes unchanged, hash recorded; the index maps every key."""
    record = json.loads((output / "upcycle.json").read_text())
    shards = source_shards(source)
    n = len(shards) + 1
    for position, shard in enumerate(shards, 1):
        placed = output / f"model-{position:05d}-of-{n:05d}.safetensors"
        assert placed.is_file() and not placed.is_symlink()
        assert placed.read_bytes() == (source / shard).read_bytes()
        assert record["source_files_sha256"][shard] == hashlib.sha256(placed.read_bytes()).hexdigest()
        assert record["source_files"][shard] | {"sha256_from": None} == {
            "output_file": placed.name, "written_by": written_by, "sha256_from": None}
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(source_index) < set(index)
    new_shard = f"model-{n:05d}-of-{n:05d}.safetensors"
    assert {index[name] for name in set(index) - set(source_index)} == {new_shard}
    assert new_shard not in {index[name] for name in source_index}
    return record


def test_copy_writes_independent_files(tmp_path, sharded_source):
    convert(sharded_source, tmp_path / "out", ConvertOptions(link="copy"))
    check_output(sharded_source, tmp_path / "out", "copy")
    first = source_shards(sharded_source)[0]
    assert os.stat(sharded_source / first).st_ino != os.stat(output_shard(sharded_source, tmp_path / "out", 1)).st_ino


def test_hard_link_shares_the_source_inode(capsys, tmp_path, sharded_source):
    before = folder_digest(sharded_source)
    result = run_cli(capsys, "convert", sharded_source, tmp_path / "out", "--link", "hard")
    assert result.exit_code == 0, result.stderr
    record = check_output(sharded_source, tmp_path / "out", "hard link")
    for position, shard in enumerate(source_shards(sharded_source), 1):
        placed = output_shard(sharded_source, tmp_path / "out", position)
        assert os.stat(placed).st_ino == os.stat(sharded_source / shard).st_ino
        assert record["source_files"][shard]["sha256_from"] == "computed"
    assert folder_digest(sharded_source) == before
    assert record["history"][0]["options"]["link"] == "hard"


def test_hard_link_across_filesystems_is_one_clear_sentence(capsys, tmp_path, sharded_source, monkeypatch):
    def cross_device(source, destination, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    capsys.readouterr()
    result = run_cli(capsys, "convert", sharded_source, tmp_path / "out", "--link", "hard")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "cannot hard-link" in lines[0] and "--link" in lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "upcycle-partial" in p.name]


def test_reflink_where_the_filesystem_allows_it_else_auto_copies(capsys, tmp_path, sharded_source):
    can_reflink = filesystem_can_reflink(tmp_path)
    convert(sharded_source, tmp_path / "auto", ConvertOptions())
    check_output(sharded_source, tmp_path / "auto", "reflink" if can_reflink else "copy")
    capsys.readouterr()
    result = run_cli(capsys, "convert", sharded_source, tmp_path / "reflink", "--link", "reflink")
    if can_reflink:
        assert result.exit_code == 0, result.stderr
        check_output(sharded_source, tmp_path / "reflink", "reflink")
    else:
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "cannot reflink" in lines[0], lines
        assert not (tmp_path / "reflink").exists()


@pytest.mark.parametrize("link", ["auto", "copy", "hard"])
def test_hub_cache_symlinks_are_followed_to_their_blobs(tmp_path, sharded_source, hub_cache_source, link):
    output = tmp_path / f"out-{link}"
    convert(hub_cache_source, output, ConvertOptions(link=link))
    can_reflink = filesystem_can_reflink(tmp_path)
    written_by = {"hard": "hard link", "copy": "copy", "auto": "reflink" if can_reflink else "copy"}[link]
    record = check_output(sharded_source, output, written_by)
    for path in output.iterdir():
        assert not path.is_symlink()  # tokenizer, generation config and shards: real files
    assert (output / "generation_config.json").read_bytes() == (sharded_source / "generation_config.json"
                                                                ).read_bytes()
    for position, shard in enumerate(source_shards(sharded_source), 1):
        blob = (hub_cache_source / shard).resolve()
        placed = output_shard(sharded_source, output, position)
        assert (os.stat(placed).st_ino == os.stat(blob).st_ino) == (link == "hard")
        expected_from = "hub-cache-blob-name" if written_by in ("hard link", "reflink") else "computed"
        assert record["source_files"][shard]["sha256_from"] == expected_from
        assert record["source_files_sha256"][shard] == blob.name  # the blob is named by its sha256


def test_corrupt_hub_cache_blob_is_caught_when_read(tmp_path, hub_cache_source):
    shard = source_shards(hub_cache_source)[1]
    blob = (hub_cache_source / shard).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(UpcycleError, match="in the Hub cache is corrupt"):
        convert(hub_cache_source, tmp_path / "out", ConvertOptions(link="copy"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_copy_hashes_while_copying_across_chunk_boundaries(tmp_path, monkeypatch, size):
    from upcycle.checkpoint import output_dir

    monkeypatch.setattr(output_dir, "COPY_CHUNK_BYTES", 4096)
    data = os.urandom(size)
    (tmp_path / "a").write_bytes(data)
    assert output_dir.copy_with_sha256(tmp_path / "a", tmp_path / "b") == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "b").read_bytes() == data


@pytest.mark.parametrize("link", ["copy", "hard"])
def test_without_source_hashes_only_the_free_ones_are_recorded(capsys, tmp_path, sharded_source, hub_cache_source,
                                                              link):
    """--no-source-sha256: the shards are still linked or copied byte for byte; upcycle.json records the Hub
    cache's blob names (free) and, for a plain folder, that no hash was computed."""
    for source, name in ((sharded_source, "folder"), (hub_cache_source, "hub")):
        result = run_cli(capsys, "convert", source, tmp_path / name, "--link", link, "--no-source-sha256")
        assert result.exit_code == 0, result.stderr
        record = json.loads((tmp_path / name / "upcycle.json").read_text())
        assert record["history"][0]["options"]["source_sha256"] is False
        for position, shard in enumerate(source_shards(sharded_source), 1):
            placed = output_shard(sharded_source, tmp_path / name, position)
            assert placed.read_bytes() == (sharded_source / shard).read_bytes()
            entry = record["source_files"][shard]
            assert entry["written_by"] == ("hard link" if link == "hard" else "copy")
            if name == "hub":
                assert entry["sha256_from"] == "hub-cache-blob-name"
                assert record["source_files_sha256"][shard] == (hub_cache_source / shard).resolve().name
            else:
                assert entry["sha256_from"].startswith("not computed")
                assert record["source_files_sha256"][shard] is None


@pytest.mark.parametrize("kernel_copy", ["available", "refused"])
def test_kernel_copy_and_its_fallback_copy_every_byte(tmp_path, monkeypatch, kernel_copy):
    from upcycle.checkpoint.output_dir import copy_in_kernel

    source = tmp_path / "shard.safetensors"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    if kernel_copy == "refused":  # e.g. an older kernel, or a filesystem pair it cannot copy between
        def refuse(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "copy_file_range", refuse)
    copy_in_kernel(source, tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == source.read_bytes()
