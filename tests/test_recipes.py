"""Every shipped recipe config loads and validates; every accelerate config parses and the recipe accepts it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from upcycle.errors import UpcycleError
from upcycle.modeling import modeling_upcycle_moepp
from upcycle.training.options import FIELDS, build_options, load_yaml_config
from upcycle.training.recipe import check_distributed_support

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIGS = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
PATHS = {"model": "m", "data": "d.txt", "output": "o"}


def test_the_expected_configs_ship():
    assert {path.stem for path in CONFIGS} == {"default", "lora", "full", "gpu_ddp", "gpu_fsdp"}
    assert {path.stem for path in ACCELERATE_CONFIGS} == {"cpu_2proc", "ddp", "fsdp"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_recipe_config_loads_validates_and_says_how_to_launch(config):
    values = load_yaml_config(config)
    assert set(values) <= set(FIELDS)
    options = build_options(config, PATHS)
    assert options.target_ffn_per_token is not None and options.steps > 0
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    assert "Before it:" in header_text and "upcycle convert" in header_text
    assert "Launch" in header_text and ("upcycle train" in header_text or "accelerate launch" in header_text)
    assert f"recipes/{config.name}" in header_text
    for accelerate_config in {word for word in header_text.split() if word.startswith("recipes/accelerate/")}:
        assert (RECIPES.parent / accelerate_config).is_file(), accelerate_config


def test_expected_choices_of_each_config():
    options = {path.stem: build_options(path, PATHS) for path in CONFIGS}
    assert options["default"].trainable == "default" and options["default"].mixed_precision == "no"
    assert options["lora"].trainable == "lora" and options["full"].trainable == "full"
    assert options["full"].activation_checkpointing
    for name in ("gpu_ddp", "gpu_fsdp"):
        assert options[name].mixed_precision == "bf16"
    assert (options["default"].balance_tau, options["default"].balance_loss_coef) == (0.75, 0.01)  # paper defaults


def launch_environment(config: Path) -> dict[str, str]:
    """What `accelerate launch --config_file CONFIG` would put in the environment (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), str(RECIPES / "continued_training.py")])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {path.stem: load_config_from_file(str(path)) for path in ACCELERATE_CONFIGS}
    assert kinds["cpu_2proc"].distributed_type.name == "MULTI_CPU" and kinds["cpu_2proc"].num_processes == 2
    assert kinds["ddp"].distributed_type.name == "MULTI_GPU" and kinds["ddp"].mixed_precision == "bf16"
    assert kinds["fsdp"].distributed_type.name == "FSDP" and kinds["fsdp"].mixed_precision == "bf16"


def test_fsdp_config_builds_accelerates_plugin_and_the_recipe_accepts_it(monkeypatch):
    """FSDP needs GPUs, so this checks what can be checked on CPU: accelerate turns the config into its plugin,
    the wrapped layer class is the MoE++ decoder layer, and the recipe accepts FSDP with the shipped config."""
    from accelerate import FullyShardedDataParallelPlugin

    environment = launch_environment(RECIPES / "accelerate" / "fsdp.yaml")
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in environment.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    for name in plugin.transformer_cls_names_to_wrap:
        assert hasattr(modeling_upcycle_moepp, name), name
    fsdp_options = build_options(RECIPES / "gpu_fsdp.yaml", PATHS)
    check_distributed_support(fsdp_options, "FSDP")
    check_distributed_support(build_options(RECIPES / "gpu_ddp.yaml", PATHS), "MULTI_GPU")
    with pytest.raises(UpcycleError, match="not supported with FSDP"):
        check_distributed_support(build_options(RECIPES / "lora.yaml", PATHS), "FSDP")


def test_ddp_config_sets_gpu_processes():
    environment = launch_environment(RECIPES / "accelerate" / "ddp.yaml")
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert yaml.safe_load((RECIPES / "accelerate" / "ddp.yaml").read_text())["use_cpu"] is False


def test_recipe_script_takes_the_train_commands_options():
    result = subprocess.run([sys.executable, str(RECIPES / "continued_training.py"), "--help"], capture_output=True,
                            text=True, check=True)
    assert "--target-ffn-per-token" in result.stdout and "KEY=VALUE" in result.stdout
