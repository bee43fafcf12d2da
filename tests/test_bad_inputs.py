"""Every bad input: one clear sentence, a non-zero exit, no traceback, no partial output, the source untouched."""

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import folder_digest, save_source, tiny_mixtral


@pytest.fixture()
def source(tmp_path, per_expert_source) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(per_expert_source, folder)
    return folder


@pytest.fixture()
def sharded_source(tmp_path) -> Path:
    return save_source(tiny_mixtral(), tmp_path / "sharded", "per-expert", sharded=True)


def assert_clean_failure(capsys, tmp_path, args, expected_message, source=None):
    before = folder_digest(source) if source else None
    result = run_cli(capsys, "convert", *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert expected_message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "upcycle-partial" in p.name]
    if source:
        assert folder_digest(source) == before
    return lines[0]


def test_missing_path(capsys, tmp_path):
    assert_clean_failure(capsys, tmp_path, [tmp_path / "nowhere", tmp_path / "out"], "does not exist")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(capsys, tmp_path, [tmp_path / "empty", tmp_path / "out"], "has no config.json")


def test_unknown_model_type_lists_supported_families(capsys, tmp_path, source):
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (source / "config.json").write_text(json.dumps(config))
    line = assert_clean_failure(capsys, tmp_path, [source, tmp_path / "out"], "unsupported model family", source)
    assert "supported families: " in line and "mixtral" in line and "qwen" in line


def test_truncated_safetensors(capsys, tmp_path, source):
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_clean_failure(capsys, tmp_path, [source, tmp_path / "out"], "is truncated", source)


def test_corrupt_safetensors_header(capsys, tmp_path, source):
    shard = source / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage, not json at all......."
    shard.write_bytes(bytes(data))
    assert_clean_failure(capsys, tmp_path, [source, tmp_path / "out"], "not a valid safetensors file", source)


def test_index_naming_a_missing_shard(capsys, tmp_path, sharded_source):
    shards = sorted(sharded_source.glob("model-*.safetensors"))
    shards[1].unlink()
    assert_clean_failure(capsys, tmp_path, [sharded_source, tmp_path / "out"],
                         "names a shard that does not exist", sharded_source)


def test_shapes_that_contradict_the_config(capsys, tmp_path, source):
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 64
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(capsys, tmp_path, [source, tmp_path / "out"], "but the config implies", source)


def test_expert_count_that_contradicts_the_config(capsys, tmp_path, source):
    config = json.loads((source / "config.json").read_text())
    config["num_local_experts"] = 3
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(capsys, tmp_path, [source, tmp_path / "out"], "model with this config", source)


def test_existing_output_is_refused_and_kept(capsys, tmp_path, source):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    result = run_cli(capsys, "convert", source, output)
    assert result.exit_code == 1 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (output / "precious.txt").read_text() == "keep me"
    assert run_cli(capsys, "convert", source, output, "--overwrite").exit_code == 0
    assert not (output / "precious.txt").exists() and (output / "config.json").is_file()


def test_output_inside_the_source_is_refused(capsys, tmp_path, source):
    before = folder_digest(source)
    result = run_cli(capsys, "convert", source, source / "out")
    assert result.exit_code == 1 and "overlaps the input" in result.stderr
    assert folder_digest(source) == before


def test_ctrl_c_during_conversion_leaves_nothing(capsys, tmp_path, sharded_source, monkeypatch):
    import upcycle.surgery.convert as convert_module

    real_copy, copies = convert_module.copy_with_sha256, []

    def interrupted_copy(source_file, destination):
        copies.append(destination)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return real_copy(source_file, destination)

    monkeypatch.setattr(convert_module, "copy_with_sha256", interrupted_copy)
    before = folder_digest(sharded_source)
    result = run_cli(capsys, "convert", sharded_source, tmp_path / "out", "--link", "copy")
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.stderr
    # no shard starts after the interrupt: only one already under way in the other copy thread may finish
    assert 2 <= len(copies) <= convert_module.PARALLEL_SHARDS + 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "upcycle-partial" in p.name]
    assert folder_digest(sharded_source) == before


def test_ctrl_c_during_overwrite_keeps_the_previous_output(capsys, tmp_path, source, monkeypatch):
    import upcycle.surgery.convert as convert_module

    output = tmp_path / "out"
    assert run_cli(capsys, "convert", source, output).exit_code == 0
    before = folder_digest(output)

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_new_tensors", interrupted_save)
    result = run_cli(capsys, "convert", source, output, "--overwrite")
    assert result.exit_code == 130
    assert folder_digest(output) == before


def test_negative_expert_count_is_a_usage_error(capsys, tmp_path, source):
    result = run_cli(capsys, "convert", source, tmp_path / "out", "--zero", "-1")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
