"""Sources: Hub repo ids (network boundary replaced, or HF_HUB_OFFLINE with a fake Hub cache), PyTorch .bin
shards loaded only as plain tensors, and `--dtype` casts while streaming. No test touches the network."""

import copy
import hashlib
import json
import os
import pathlib
import socket
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from conftest import save_source, tiny_mixtral
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from upcycle.checkpoint import hub_download
from upcycle.checkpoint.hub_download import files_to_fetch, resolve_source
from upcycle.errors import UpcycleError
from upcycle.surgery.convert import ConvertOptions, convert

REPO_ID = "acme/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection fails the test: every Hub call must go through a replaced boundary or the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- helpers: sources on disk, a fake Hub cache

def build_fake_hub_cache(cache_root: Path, files: dict[str, bytes], repo_id: str = REPO_ID,
                         commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout: blobs named by content hash, snapshot files as relative symlinks to them.

    Weights (LFS files) are named by their sha256, small git files by their git blob sha1, as the Hub does.
    """
    repo_folder = cache_root / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo_folder / "blobs", repo_folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name.endswith(LFS_SUFFIXES):
            blob_name = hashlib.sha256(data).hexdigest()
        else:
            blob_name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (blobs / blob_name).write_bytes(data)
        link = snapshot / name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blobs / blob_name, snapshot))
    (repo_folder / "refs").mkdir(exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def save_bin_source(model, folder: Path, n_shards: int) -> Path:
    """The per-expert source saved as PyTorch .bin: `pytorch_model.bin`, or shards with their index."""
    save_source(model, folder, "per-expert", sharded=False)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if n_shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    weight_map = {}
    for shard in range(n_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{n_shards:05d}.bin"
        part = {name: state[name] for name in names[shard::n_shards]}
        torch.save(part, folder / file_name)
        weight_map |= {name: file_name for name in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same_logits(output: Path, model, atol: float = 1e-5) -> None:
    converted = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, model(tokens).logits, atol=atol, rtol=0)


def output_tensors(output: Path) -> dict[str, torch.Tensor]:
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors |= load_file(str(output / shard))
    assert set(tensors) == set(index)  # the index maps every key, and only real ones
    return tensors


# ---------------------------------------------------------------- PyTorch .bin sources

@pytest.mark.parametrize("n_shards", [1, 3])
def test_bin_source_becomes_safetensors_with_equal_logits(tmp_path, source_model, monkeypatch, n_shards):
    source = save_bin_source(source_model, tmp_path / "src", n_shards)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    convert(source, tmp_path / "out", ConvertOptions())
    assert calls and all(call.get("weights_only") is True and call.get("mmap") is True for call in calls)

    out = tmp_path / "out"
    assert not list(out.glob("*.bin")) and len(list(out.glob("model-*.safetensors"))) == n_shards + 1
    assert_same_logits(out, source_model)
    record = json.loads((out / "upcycle.json").read_text())
    for shard, digest in record["source_files_sha256"].items():
        assert shard.endswith(".bin") and digest == hashlib.sha256((source / shard).read_bytes()).hexdigest()
        assert record["source_files"][shard]["written_by"] == ".bin to safetensors"
    state = {}
    for path in source.glob("*.bin"):
        state |= real_load(path, weights_only=True)
    written = output_tensors(out)
    for name, tensor in state.items():  # every source tensor, unchanged in name, dtype and value
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


def test_legacy_bin_without_zip_loads_without_mmap(tmp_path, source_model):
    source = save_bin_source(source_model, tmp_path / "src", 1)
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    torch.save(state, source / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    convert(source, tmp_path / "out", ConvertOptions())
    assert_same_logits(tmp_path / "out", source_model)


class Trap:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_that_needs_code_is_refused(capsys, tmp_path, source_model):
    source = save_bin_source(source_model, tmp_path / "src", 1)
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save(state | {"trap": Trap(marker)}, source / "pytorch_model.bin")
    capsys.readouterr()  # the fixture's progress output
    result = run_cli(capsys, "convert", source, tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs code to load" in lines[0] and "weights_only=True" in lines[0], lines
    assert not marker.exists()  # the pickle's code never ran
    assert not (tmp_path / "out").exists()


def test_bin_that_is_not_a_state_dict_is_refused(tmp_path, source_model):
    source = save_bin_source(source_model, tmp_path / "src", 1)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, source / "pytorch_model.bin")
    with pytest.raises(UpcycleError, match="flat mapping of tensor names to tensors"):
        convert(source, tmp_path / "out", ConvertOptions())


def test_bin_shapes_are_checked_before_anything_is_written(tmp_path, source_model):
    source = save_bin_source(source_model, tmp_path / "src", 3)
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 64
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UpcycleError, match="but the config implies"):
        convert(source, tmp_path / "out", ConvertOptions())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- --dtype

def rounded_copy(model, dtype: torch.dtype):
    """The model with every weight rounded to `dtype` and back: what a cast checkpoint computes in float32."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(dtype).to(torch.float32))
    return rounded


@pytest.mark.parametrize("layout,sharded,dtype_name,dtype", [
    ("per-expert", True, "bfloat16", torch.bfloat16),
    ("fused", False, "float16", torch.float16),
])
def test_dtype_casts_while_streaming(tmp_path, monkeypatch, source_model, layout, sharded, dtype_name, dtype):
    from upcycle.checkpoint import shard_rewrite

    monkeypatch.setattr(shard_rewrite, "CAST_CHUNK_BYTES", 1000 * 8)  # many chunks per tensor, odd boundaries
    save_source(source_model, tmp_path / "src", layout, sharded)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(dtype=dtype_name))
    out = tmp_path / "out"
    tensors = output_tensors(out)
    assert {tensor.dtype for tensor in tensors.values()} == {dtype}  # the new tensors too
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype_name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    source_tensors = {}
    for path in (tmp_path / "src").glob("*.safetensors"):
        source_tensors |= load_file(str(path))
    for name, tensor in source_tensors.items():
        assert torch.equal(tensors[name], tensor.to(dtype)), name
    assert_same_logits(out, rounded_copy(source_model, dtype))
    record = json.loads((out / "upcycle.json").read_text())
    assert record["history"][0]["options"]["dtype"] == dtype_name
    for shard, digest in record["source_files_sha256"].items():
        assert digest == hashlib.sha256((tmp_path / "src" / shard).read_bytes()).hexdigest()
        assert record["source_files"][shard]["written_by"] == f"cast to {dtype_name}"


def test_dtype_with_bin_source(tmp_path, source_model):
    source = save_bin_source(source_model, tmp_path / "src", 2)
    convert(source, tmp_path / "out", ConvertOptions(dtype="bfloat16"))
    assert {t.dtype for t in output_tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert_same_logits(tmp_path / "out", rounded_copy(source_model, torch.bfloat16))


def test_without_dtype_or_with_the_same_dtype_nothing_is_decoded(tmp_path, monkeypatch, per_expert_source):
    import upcycle.checkpoint.shard_rewrite as shard_rewrite_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("a shard was decoded")

    monkeypatch.setattr(shard_rewrite_module, "rewrite_safetensors_shard", no_decoding)
    for name, options in (("keep", ConvertOptions()), ("same", ConvertOptions(dtype="float32"))):
        convert(per_expert_source, tmp_path / name, options)
        shard = tmp_path / name / "model-00001-of-00002.safetensors"
        assert shard.read_bytes() == (per_expert_source / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "same" / "config.json").read_text())["dtype"] == "float32"


def test_dtype_refuses_fp8_tensors(tmp_path):
    source = tmp_path / "src"
    save_source(tiny_mixtral(), source, "per-expert", sharded=False)
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].to(
        torch.float8_e4m3fn)
    from safetensors.torch import save_file
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match="cannot convert quantized tensors"):
        convert(source, tmp_path / "out", ConvertOptions(dtype="bfloat16"))


# ---------------------------------------------------------------- Hub repo ids

def test_files_to_fetch_prefers_safetensors_and_takes_only_what_a_conversion_needs():
    listing = ["config.json", "README.md", ".gitattributes", "tokenizer.json", "generation_config.json",
               "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "consolidated.00.pt", "pytorch_model.bin.index.json",
               "pytorch_model-00001-of-00001.bin", "original/params.json"]
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert files_to_fetch(listing, lambda index: weight_map) == [
        "config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    bin_only = ["config.json", "pytorch_model.bin", "README.md"]
    assert files_to_fetch(bin_only, lambda index: {}) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(UpcycleError, match="no safetensors or PyTorch .bin weights"):
        files_to_fetch(["config.json", "consolidated.00.pt"], lambda index: {})


class FakeHub:
    """Stands in for the network: serves `remote` files by writing them into a Hub cache as huggingface_hub would."""

    def __init__(self, cache_root: Path, remote: dict[str, bytes]):
        self.cache_root, self.remote, self.requested = cache_root, remote, []

    def list_repo_files(self, repo_id, revision):
        if repo_id != REPO_ID:
            error = hub_download.RepositoryNotFoundError.__new__(hub_download.RepositoryNotFoundError)
            Exception.__init__(error, "404 Client Error: Repository Not Found")
            raise error
        return [*self.remote, "README.md", "consolidated.00.pt", "original/params.json"]

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kwargs):
        self.requested.append(sorted(allow_patterns))
        files = {name: self.remote[name] for name in allow_patterns}
        return str(build_fake_hub_cache(self.cache_root, files))

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kwargs):
        self.requested.append([filename])
        return str(build_fake_hub_cache(self.cache_root, {filename: self.remote[filename]}) / filename)


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    remote = folder_files(save_source(tiny_mixtral(), tmp_path / "remote", "per-expert", sharded=True))
    hub = FakeHub(tmp_path / "hub-cache", remote)
    for name in ("list_repo_files", "snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(hub_download, name, getattr(hub, name))
    return hub


def test_hub_repo_id_downloads_only_the_needed_files_and_converts(capsys, tmp_path, fake_hub):
    result = run_cli(capsys, "convert", REPO_ID, tmp_path / "out", "--link", "hard")
    assert result.exit_code == 0, result.stderr
    assert fake_hub.requested[0] == ["model.safetensors.index.json"]  # read first, to name the shards
    assert fake_hub.requested[-1] == sorted(fake_hub.remote)  # all a conversion needs, nothing more
    assert not any("consolidated" in name or "README" in name for batch in fake_hub.requested for name in batch)
    assert_same_logits(tmp_path / "out", tiny_mixtral())
    record = json.loads((tmp_path / "out" / "upcycle.json").read_text())
    assert record["source"] == REPO_ID and record["source_commit"] == COMMIT
    for shard, info in record["source_files"].items():
        assert info["written_by"] == "hard link" and info["sha256_from"] == "hub-cache-blob-name"
        assert record["source_files_sha256"][shard] == hashlib.sha256(fake_hub.remote[shard]).hexdigest()


def test_missing_hub_repo_is_one_clear_sentence(capsys, tmp_path, fake_hub):
    capsys.readouterr()
    result = run_cli(capsys, "convert", "acme/no-such-model", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "neither a local folder nor a model repository on the Hub" in lines[0]
    assert not (tmp_path / "out").exists()


def test_revision_applies_only_to_repo_ids(tmp_path, per_expert_source):
    with pytest.raises(UpcycleError, match="--revision applies only to a Hub repo id"):
        resolve_source(per_expert_source, revision="main")
    with pytest.raises(UpcycleError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out", ConvertOptions())


@pytest.fixture()
def offline_hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at a fake cache holding REPO_ID (only the files a conversion needs)."""
    import huggingface_hub.constants as hub_constants

    cache_root = tmp_path / "hub-cache"
    remote = folder_files(save_source(tiny_mixtral(), tmp_path / "remote", "per-expert", sharded=True))
    build_fake_hub_cache(cache_root, remote)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache_root))
    return cache_root


def test_offline_repo_id_converts_from_the_hub_cache(capsys, tmp_path, offline_hub_cache):
    result = run_cli(capsys, "convert", REPO_ID, tmp_path / "out", "--revision", "main")
    assert result.exit_code == 0, result.stderr
    assert_same_logits(tmp_path / "out", tiny_mixtral())
    for path in (tmp_path / "out").iterdir():
        assert not path.is_symlink()  # the output holds files, never links into the cache


def test_offline_repo_missing_from_the_cache_is_one_clear_sentence(capsys, tmp_path, offline_hub_cache):
    capsys.readouterr()
    result = run_cli(capsys, "convert", "acme/other-model", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "local Hub cache has no copy of it" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
