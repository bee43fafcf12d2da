"""The families' tensor tables against the reference: transformers' own source classes (and the project's OpenMoE
class) built on the meta device from the same config.json dict.

`upcycle convert` checks every source tensor's name and shape from the specs' data alone (no torch, no
transformers); these tests keep that data equal to what the classes build, for tiny configs that flip every
config flag that adds a tensor or changes a shape, for config.json files that omit every defaulted field, and
for the aliases and defaults the config classes declare.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MIXTRAL
from test_families import COMMON, FAMILIES
from test_openmoe import TINY_OPENMOE

from upcycle.checkpoint.safetensors_header import TensorInfo
from upcycle.checkpoint.source import SourceCheckpoint
from upcycle.converters import FAMILIES as SPECS
from upcycle.converters import FamilySpec, family_for_config
from upcycle.errors import UpcycleError
from upcycle.surgery.plan import expected_shapes, plan_conversion


def source_config_object(spec: FamilySpec, config: dict):
    """The source config class's object from plain config.json (no remote code), as transformers loads it."""
    fields = {key: value for key, value in config.items() if key not in ("model_type", "auto_map")}
    return spec.source_model_class().config_class(**fields)


def reference_shapes(spec: FamilySpec, config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the source class's state_dict, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = spec.source_model_class()(source_config_object(spec, config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def config_json(name: str, **overrides) -> dict:
    """A tiny config.json of the family: test_families' / test_openmoe's / conftest's fields, then `overrides`
    (a value of `...` removes the field)."""
    if name == "mixtral":
        fields, head = TINY_MIXTRAL, {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    elif name == "openmoe":
        fields, head = TINY_OPENMOE, {"architectures": ["OpenMoeForCausalLM"], "model_type": "llama",
                                      "router_topk": 2}
    else:
        family = FAMILIES[name]
        fields, head = COMMON | family.fields, {"architectures": [family.model_class], "model_type": name}
    config = head | fields | overrides
    return {key: value for key, value in config.items() if value is not ...}


# (family, overrides): every flag that adds a tensor or changes a shape, each way.
VARIANTS = [
    ("mixtral", {}), ("mixtral", {"head_dim": 16}), ("mixtral", {"num_key_value_heads": ...}),
    ("mixtral", {"tie_word_embeddings": True}),
    ("qwen2_moe", {}), ("qwen2_moe", {"qkv_bias": False}), ("qwen2_moe", {"qkv_bias": True}),
    ("qwen2_moe", {"mlp_only_layers": [], "decoder_sparse_step": 2}), ("qwen2_moe", {"head_dim": 16}),
    ("qwen2_moe", {"num_key_value_heads": ...}), ("qwen2_moe", {"tie_word_embeddings": True}),
    ("qwen2_moe", {"shared_expert_intermediate_size": 20}),
    ("qwen3_moe", {}), ("qwen3_moe", {"attention_bias": True}), ("qwen3_moe", {"head_dim": ...}),
    ("qwen3_moe", {"mlp_only_layers": [0, 2]}), ("qwen3_moe", {"decoder_sparse_step": 3}),
    ("qwen3_moe", {"num_key_value_heads": ...}),
    ("olmoe", {}), ("olmoe", {"attention_bias": True}), ("olmoe", {"head_dim": 16}),
    ("olmoe", {"num_key_value_heads": ...}), ("olmoe", {"num_key_value_heads": 1}),
    ("olmoe", {"tie_word_embeddings": True}),
    ("deepseek_v2", {}), ("deepseek_v2", {"q_lora_rank": 16}),
    ("deepseek_v2", {"q_lora_rank": 16, "attention_bias": True}),
    ("deepseek_v2", {"attention_bias": True}), ("deepseek_v2", {"mlp_bias": True}),
    ("deepseek_v2", {"first_k_dense_replace": 0}), ("deepseek_v2", {"first_k_dense_replace": 2, "n_shared_experts": 1}),
    ("deepseek_v2", {"first_k_dense_replace": ...}), ("deepseek_v2", {"num_key_value_heads": ...}),
    ("deepseek_v3", {}), ("deepseek_v3", {"q_lora_rank": None}), ("deepseek_v3", {"attention_bias": True}),
    ("deepseek_v3", {"n_shared_experts": 2, "v_head_dim": 12}), ("deepseek_v3", {"first_k_dense_replace": 0}),
    ("deepseek_v3", {"first_k_dense_replace": ...}), ("deepseek_v3", {"tie_word_embeddings": True}),
    ("openmoe", {}), ("openmoe", {"head_dim": ...}), ("openmoe", {"num_key_value_heads": ...}),
    ("openmoe", {"moe_layer_interval": 1}), ("openmoe", {"attention_bias": True, "mlp_bias": True}),
]


def spec_named(name: str) -> FamilySpec:
    return next(spec for spec in SPECS if spec.name == name)


def headers_from(shapes: dict[str, tuple[int, ...]], spec: FamilySpec, config: dict) -> SourceCheckpoint:
    """A checkpoint whose header has exactly these tensors (a tied model's file without its LM head)."""
    if config.get("tie_word_embeddings"):
        shapes = {name: shape for name, shape in shapes.items() if name != "lm_head.weight"}
    tensors = {name: TensorInfo("F32", shape) for name, shape in shapes.items()}
    return SourceCheckpoint(path=None, config=config, shard_files=["model.safetensors"],
                            weight_map={name: "model.safetensors" for name in tensors}, tensors=tensors)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=[f"{n}-{'-'.join(o) or 'base'}" for n, o in VARIANTS])
def test_tables_equal_the_meta_model(name, overrides):
    config = config_json(name, **overrides)
    spec = family_for_config(config)
    assert spec.name == name
    reference = reference_shapes(spec, config)
    assert expected_shapes(spec, config) == reference
    # what transformers writes back (every field, derived ones included) gives the same shapes
    written = source_config_object(spec, config).to_dict() | {"architectures": config["architectures"]}
    assert expected_shapes(spec, written) == reference
    # and plan_conversion accepts a checkpoint with exactly the model's tensors (transformers 5's layout)
    plan = plan_conversion(headers_from(reference, spec, config), spec, counts=None)
    assert plan.moe_layers == spec.moe_layer_indices(config)


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_a_config_without_the_defaulted_fields_gets_the_class_defaults(spec):
    config = config_json(spec.name)
    stripped = {key: value for key, value in config.items() if key not in spec.config_defaults}
    assert stripped != config
    assert expected_shapes(spec, stripped) == reference_shapes(spec, stripped)


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_aliases_and_defaults_are_the_config_class_s(spec):
    config_class = spec.source_model_class().config_class
    assert spec.config_aliases == config_class.attribute_map
    class_defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    for key, value in spec.config_defaults.items():
        assert key in class_defaults, f"{config_class.__name__} has no field {key}"
        assert value == class_defaults[key], key


def test_a_missing_field_is_named_in_one_sentence():
    spec = spec_named("qwen2_moe")
    config = config_json("qwen2_moe")
    no_defaults = dataclasses.replace(spec, config_defaults={})
    without_vocab = {key: value for key, value in config.items() if key != "vocab_size"}
    with pytest.raises(UpcycleError, match="config.json lacks the field 'vocab_size' that a qwen2_moe config has"):
        plan_conversion(headers_from(reference_shapes(spec, config), spec, without_vocab), no_defaults, None)
    with pytest.raises(UpcycleError, match="lacks the field 'attention_bias' that a deepseek_v3 config has"):
        expected_shapes(dataclasses.replace(spec_named("deepseek_v3"), config_defaults={}), config_json("deepseek_v3"))
    with pytest.raises(UpcycleError, match="'moe_intermediate_size' is None, not a whole number"):
        expected_shapes(spec, config | {"moe_intermediate_size": None})


def test_the_tables_read_the_on_disk_names_too():
    """A classic Mixtral checkpoint (block_sparse_moe, per-expert w1/w2/w3) with one attention shape wrong."""
    spec, config = spec_named("mixtral"), config_json("mixtral")
    in_memory = reference_shapes(spec, config)
    shapes = {name.replace(".mlp.", ".block_sparse_moe."): shape for name, shape in in_memory.items()
              if ".experts." not in name}
    for layer in range(config["num_hidden_layers"]):
        for expert in range(config["num_local_experts"]):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
            inter, hidden = config["intermediate_size"], config["hidden_size"]
            shapes |= {prefix + "w1.weight": (inter, hidden), prefix + "w3.weight": (inter, hidden),
                       prefix + "w2.weight": (hidden, inter)}
    assert plan_conversion(headers_from(shapes, spec, config), spec, None).expert_layout == "per-expert"
    shapes["model.layers.1.self_attn.k_proj.weight"] = (32, 32)
    with pytest.raises(UpcycleError, match="k_proj.weight has shape \\[32, 32\\] but the config implies \\[16, 32\\]"):
        plan_conversion(headers_from(shapes, spec, config), spec, None)


CHECK_WITHOUT_TORCH = """
import json, sys
from upcycle.converters import family_for_config
from upcycle.surgery.plan import expected_shapes
counts = {}
for config in json.loads(sys.argv[1]):
    spec = family_for_config(config)
    counts[spec.name] = len(expected_shapes(spec, config))
heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
print(json.dumps({"counts": counts, "heavy": heavy}))
"""


def test_checking_shapes_imports_neither_torch_nor_transformers():
    configs = [config_json(spec.name) for spec in SPECS]
    result = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH, json.dumps(configs)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heavy"] == []
    assert payload["counts"] == {spec.name: len(reference_shapes(spec, config_json(spec.name))) for spec in SPECS}
