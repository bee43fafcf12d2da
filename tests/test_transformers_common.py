"""transformers' own generic model tests (ModelTesterMixin) over the MoE++ model classes of every family.

Each family runs twice: as converted (every selection bias -inf, zero-computation router rows, gating residual and
constants zero: the model computes its source's function) and with the zero-computation experts switched on
(finite selection biases, random zero-computation router rows, gating residual and constant experts, so that Zero,
Copy and Constant experts are really selected). transformers' tests build their models from a config, so "switched
on" is an `_init_weights` that initialises the MoE++ tensors at random, patched in for those test classes.

The common tests come from transformers' source distribution (see transformers_common_loader.py); generation tests
are our own stand-in (generation_tester.py). Tests that do not apply to the MoE++ design are skipped with a reason.
"""

import dataclasses
import functools
import unittest
from unittest import mock

import pytest
import torch
from generation_tester import GenerationTesterMixin
from transformers.models.auto import modeling_auto
from transformers_common_loader import load_common_tests

from upcycle.modeling.configuration_openmoe import MoePPOpenMoeConfig
from upcycle.modeling.configuration_upcycle_moepp import (
    MoePPDeepseekV2Config,
    MoePPDeepseekV3Config,
    MoePPMixtralConfig,
    MoePPOlmoeConfig,
    MoePPQwen2MoeConfig,
    MoePPQwen3MoeConfig,
)
from upcycle.modeling.modeling_moepp_deepseek_v2 import MoePPDeepseekV2ForCausalLM, MoePPDeepseekV2Model
from upcycle.modeling.modeling_moepp_deepseek_v3 import MoePPDeepseekV3ForCausalLM, MoePPDeepseekV3Model
from upcycle.modeling.modeling_moepp_olmoe import MoePPOlmoeForCausalLM, MoePPOlmoeModel
from upcycle.modeling.modeling_moepp_qwen2_moe import MoePPQwen2MoeForCausalLM, MoePPQwen2MoeModel
from upcycle.modeling.modeling_moepp_qwen3_moe import MoePPQwen3MoeForCausalLM, MoePPQwen3MoeModel
from upcycle.modeling.modeling_upcycle_moepp import MoePPMixtralForCausalLM, MoePPMixtralModel
from upcycle.modeling.modeling_upcycle_moepp_openmoe import MoePPOpenMoeForCausalLM, MoePPOpenMoeModel
from upcycle.modeling.moepp_layer import MoePPRouter, ZeroComputationExperts

common, why_not = load_common_tests()
if common is not None:
    ModelTesterMixin, ids_tensor = common.ModelTesterMixin, common.ids_tensor
else:  # the common test classes below are skipped with `why_not`; this module's own tests still run

    class ModelTesterMixin:
        pass

    ids_tensor = None

try:  # transformers' init functions skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = torch.nn.init


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    base_model_class: type
    causal_lm_class: type
    fields: dict  # the family's tiny config fields, on top of COMMON_FIELDS


COMMON_FIELDS = dict(
    vocab_size=99, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,  # grouped_mm wants 16-byte strides (bf16: a multiple of 8)
    max_position_embeddings=512, initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    n_zero_experts=1, n_copy_experts=1, n_constant_experts=2,
)
DEEPSEEK_FIELDS = dict(
    num_hidden_layers=3, first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=8,
    num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.5,
)

FAMILIES = {
    family.name: family for family in (
        Family("mixtral", MoePPMixtralConfig, MoePPMixtralModel, MoePPMixtralForCausalLM, dict(
            num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
        Family("qwen2_moe", MoePPQwen2MoeConfig, MoePPQwen2MoeModel, MoePPQwen2MoeForCausalLM, dict(
            num_hidden_layers=3, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=6,
            num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1])),
        Family("qwen3_moe", MoePPQwen3MoeConfig, MoePPQwen3MoeModel, MoePPQwen3MoeForCausalLM, dict(
            num_hidden_layers=2, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True)),
        Family("olmoe", MoePPOlmoeConfig, MoePPOlmoeModel, MoePPOlmoeForCausalLM, dict(
            num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
        Family("deepseek_v2", MoePPDeepseekV2Config, MoePPDeepseekV2Model, MoePPDeepseekV2ForCausalLM, dict(
            DEEPSEEK_FIELDS, q_lora_rank=None, topk_method="greedy")),
        # DeepSeek-V2 (group-limited, with q_lora_rank) and DeepSeek-V2-Lite (greedy, without)
        Family("deepseek_v2_group_limited", MoePPDeepseekV2Config, MoePPDeepseekV2Model, MoePPDeepseekV2ForCausalLM,
               dict(DEEPSEEK_FIELDS, q_lora_rank=16, topk_method="group_limited_greedy", num_experts_per_tok=3)),
        Family("deepseek_v3", MoePPDeepseekV3Config, MoePPDeepseekV3Model, MoePPDeepseekV3ForCausalLM, dict(
            DEEPSEEK_FIELDS, q_lora_rank=16, norm_topk_prob=True)),
        Family("openmoe", MoePPOpenMoeConfig, MoePPOpenMoeModel, MoePPOpenMoeForCausalLM, dict(
            num_hidden_layers=4, head_dim=8, num_experts=4, moe_layer_interval=2, router_topk=2,
            hidden_act="swiglu")),
    )
}


class MoePPModelTester:
    """What transformers' common tests read from `self.model_tester` (after transformers' CausalLMModelTester)."""

    def __init__(self, parent, family: Family, batch_size: int = 13, seq_length: int = 7):
        self.parent = parent
        self.family = family
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.fields = COMMON_FIELDS | family.fields
        self.vocab_size = self.fields["vocab_size"]
        self.hidden_size = self.fields["hidden_size"]
        self.num_hidden_layers = self.fields["num_hidden_layers"]
        self.num_attention_heads = self.fields["num_attention_heads"]
        self.num_labels = 3

    def get_config(self):
        return self.family.config_class(**self.fields)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, attention_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


def switched_on_init_weights(original):
    """`_init_weights` with the zero-computation experts switched on: random MoE++ tensors, finite biases."""

    @torch.no_grad()
    def _init_weights(self, module):
        original(self, module)
        std = self.config.initializer_range
        if isinstance(module, MoePPRouter):
            init.normal_(module.zero_computation_weight, mean=0.0, std=std)
            if module.residual_weight is not None:
                init.normal_(module.residual_weight, mean=0.0, std=0.1)
            init.constant_(module.selection_bias, 0.0)  # finite: every zero-computation expert competes
        elif isinstance(module, ZeroComputationExperts):
            init.normal_(module.constant_vectors, mean=0.0, std=1.0)
            init.normal_(module.constant_ratio_weight, mean=0.0, std=std)

    return _init_weights


def switch_on(family: Family):
    """A patcher of the family's MoE++ PreTrainedModel: its models are built with zero-computation experts on."""
    pretrained = next(klass for klass in family.base_model_class.__mro__
                      if klass.__name__.startswith("MoePP") and klass.__name__.endswith("PreTrainedModel"))
    return mock.patch.object(pretrained, "_init_weights", switched_on_init_weights(pretrained._init_weights))


class MoePPCommonTests(ModelTesterMixin, GenerationTesterMixin):
    """One family, as converted or switched on; subclasses set `family` and `switched_on`."""

    family: Family
    switched_on = False
    test_resize_embeddings = True
    test_all_params_have_gradient = False  # MoE: an expert that no token chose gets no gradient
    test_can_init_all_missing_weights_before_2023 = True  # our files carry no copyright year: run it

    @property
    def all_model_classes(self):
        return (self.family.base_model_class, self.family.causal_lm_class)

    def setUp(self):
        self.model_tester = MoePPModelTester(self, self.family)
        # As if registered in transformers: the common tests pick labels and heads from these name mappings.
        model_type = self.family.config_class.model_type
        for mapping, model_class in ((modeling_auto.MODEL_MAPPING_NAMES, self.family.base_model_class),
                                     (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, self.family.causal_lm_class)):
            patcher = mock.patch.dict(mapping, {model_type: model_class.__name__})
            patcher.start()
            self.addCleanup(patcher.stop)
        for mapping, model_class in ((modeling_auto.MODEL_MAPPING, self.family.base_model_class),
                                     (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, self.family.causal_lm_class)):
            patcher = mock.patch.dict(mapping._extra_content, {self.family.config_class: model_class})
            patcher.start()
            self.addCleanup(patcher.stop)
        if self.switched_on:
            patcher = switch_on(self.family)
            patcher.start()
            self.addCleanup(patcher.stop)


    def test_torch_save_load(self):
        if not self.switched_on:
            self.skipTest("it compares state dicts by subtraction, and -inf - -inf is nan: the -inf selection biases "
                          "of switched-off experts are the design (the switched-on classes run it)")
        super().test_torch_save_load()

    def test_init_weights_can_init_buffers(self):
        if self.switched_on:
            self.skipTest("switched on, the selection biases are set by a patched `_init_weights`, not by `__init__` "
                          "(the converted classes run it: both give -inf)")
        super().test_init_weights_can_init_buffers()

    def test_num_layers_is_small(self):
        if self.model_tester.num_hidden_layers > 2:
            self.skipTest("this family's tiny model has dense layers and two MoE layers: the gating residual "
                          "must skip the dense layers between them")
        super().test_num_layers_is_small()


OPENMOE_ROPE = "OpenMoE's RoPE is fixed (base 10000, no scaling), as its checkpoints were trained"
# Tests that do not apply to a family: test name (or the name of a parameterized family of tests) -> reason.
FAMILY_SKIPS = {
    "deepseek_v2": {
        "test_model_rope_scaling_frequencies": "DeepSeek-V2's rotary embedding returns complex frequencies (one "
                                               "tensor), as transformers' DeepseekV2Model does",
        "test_tp_plan_matches_params": "DeepseekV2Config's TP plan names both q_proj and q_b_proj, a model has one "
                                       "of them (with or without q_lora_rank): the same in transformers' DeepseekV2Model",
    },
    "openmoe": {
        "test_model_rope_scaling_from_config": OPENMOE_ROPE,
        "test_model_rope_scaling_frequencies": OPENMOE_ROPE,
        "test_generate_with_static_cache": "the project's OpenMoE attention takes 2-D masks only (no static cache)",
        "test_left_padding_compatibility": "OpenMoE's key position 0 is always visible (as in OpenMoE's own code): "
                                           "left padding changes the output",
    },
}
FAMILY_SKIPS["deepseek_v2_group_limited"] = FAMILY_SKIPS["deepseek_v2"]
FAMILY_ATTRIBUTES = {
    # OpenMoE's own attention (no 1/sqrt(d), key 0 always visible) returns no attention weights
    "openmoe": {"has_attentions": False},
}


def skipped(reason: str):
    @unittest.skip(reason)
    def test(self):
        pass

    return test


# The default (not slow) run: Mixtral as converted runs every test but the long attention/experts implementation
# sweeps; every family with its zero-computation experts switched on runs a few tests that cover what the MoE++ design
# touches (outputs and return_dict, router logits and the aux loss, training with checkpointing, saving, generation
# against an argmax loop with and without cache). The other families as converted (their function is the source's:
# test_families.py) and everything else run with `-m slow`.
FULLY_IN_DEFAULT_RUN = {("mixtral", False)}
ALWAYS_SLOW = ("test_eager_matches_sdpa_inference", "test_eager_matches_batched_and_grouped_inference_0_fp16",
               "test_eager_matches_batched_and_grouped_inference_2_bf16")
SWITCHED_ON_DEFAULT_RUN = {"test_model_outputs_equivalence", "test_output_router_logits_from_config",
                           "test_training_gradient_checkpointing", "test_save_load",
                           "test_greedy_generate_matches_argmax_loop"}


def in_default_run(family: Family, switched_on: bool, test: str) -> bool:
    if test.startswith(ALWAYS_SLOW):
        return False
    if (family.name, switched_on) in FULLY_IN_DEFAULT_RUN:
        return True
    return switched_on and test in SWITCHED_ON_DEFAULT_RUN


def slow_copy(test):
    """The test, marked slow for this class only (the mixin's function is shared by every class)."""

    @functools.wraps(test)
    def slow_test(self, *args, **kwargs):
        return test(self, *args, **kwargs)

    return pytest.mark.slow(slow_test)


def make_test_class(family: Family, switched_on: bool) -> type:
    name = "Test" + "".join(part.capitalize() for part in family.name.split("_")) + (
        "SwitchedOn" if switched_on else "Converted")
    attributes = {"family": family, "switched_on": switched_on} | FAMILY_ATTRIBUTES.get(family.name, {})
    for prefix, reason in FAMILY_SKIPS.get(family.name, {}).items():
        attributes |= {test: skipped(reason) for test in dir(MoePPCommonTests) if test.startswith(prefix)}
    for test in dir(MoePPCommonTests):
        function = attributes.get(test, getattr(MoePPCommonTests, test))
        if test.startswith("test_") and callable(function) and not in_default_run(family, switched_on, test):
            attributes[test] = slow_copy(function)  # (test_* booleans are the testers' switches: left alone)
    test_class = type(name, (MoePPCommonTests, unittest.TestCase), attributes)
    return test_class if common is not None else unittest.skip(why_not)(test_class)


globals().update({test_class.__name__: test_class for test_class in (
    make_test_class(family, switched_on) for family in FAMILIES.values() for switched_on in (False, True))})


# ---- The aux loss at conversion is the source family's (transformers' load_balancing_loss_func) ----

SOURCES_WITH_AUX_LOSS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                         "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def source_and_converted(name: str, seed: int = 0):
    """A transformers source model of the family (routers sharpened) and the MoE++ model holding its weights,
    every MoE++ tensor as `convert` writes it (what `_init_weights` gives: -inf biases, zero rows)."""
    import transformers

    family = FAMILIES[name]
    fields = {key: value for key, value in (COMMON_FIELDS | family.fields).items()
              if key not in ("n_zero_experts", "n_copy_experts", "n_constant_experts")}
    source_class = getattr(transformers, SOURCES_WITH_AUX_LOSS[name])
    source_config_class = source_class.config_class
    torch.manual_seed(seed)
    source = source_class(source_config_class(**fields)).eval()
    with torch.no_grad():
        for layer in source.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                gate.weight.mul_(25.0)
    converted = family.causal_lm_class(family.config_class(**(COMMON_FIELDS | family.fields))).eval()
    missing, unexpected = converted.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected
    assert all(key.rsplit(".", 1)[-1] in ("zero_computation_weight", "residual_weight", "selection_bias",
                                          "constant_vectors", "constant_ratio_weight") for key in missing), missing
    return source, converted


@pytest.mark.parametrize("name", list(SOURCES_WITH_AUX_LOSS))
def test_aux_loss_at_conversion_is_the_sources(name):
    source, converted = source_and_converted(name)
    tokens = torch.randint(0, COMMON_FIELDS["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(tokens)
    padded[1, 7:] = 0
    padded[2, 4:] = 0
    for mask in (None, padded):
        with torch.no_grad():
            expected = source(tokens, attention_mask=mask, output_router_logits=True)
            actual = converted(tokens, attention_mask=mask, output_router_logits=True)
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-6)


def test_switched_off_experts_do_not_count_in_the_balance_loss():
    """With every selection bias -inf the loss is the one of the FFN experts alone; switching experts on counts them."""
    from upcycle.modeling.moepp_layer import ExpertLayout, routing_statistics

    layout, ffn_only = ExpertLayout(4, 1, 1, 2), ExpertLayout(4, 0, 0, 0)
    logits = [torch.randn(10, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    off = [torch.full((4,), float("-inf"))] * 3
    stats = routing_statistics(logits, off, layout, 2, None, 0.75)
    alone = routing_statistics([layer[:, :4] for layer in logits], [torch.zeros(0)] * 3, ffn_only, 2, None, 0.75)
    torch.testing.assert_close(stats["balance_loss"], alone["balance_loss"])
    # uniform routing over the switched-on experts gives k * mean(eta), whatever is switched off
    uniform = [torch.zeros(8, 8)]
    index = torch.tensor([[i, (i + 1) % 8] for i in range(8)])  # every expert chosen twice by 8 tokens, k = 2

    class Router:
        def select_experts(self, logits, bias):
            return index

        def routing_probabilities(self, logits, bias):
            return torch.full((8, 8), 1 / 8)

    on = routing_statistics(uniform, [torch.zeros(4)], layout, 2, None, 0.75, routers=[Router()])
    torch.testing.assert_close(on["balance_loss"], torch.tensor(2 * (4 + 0.75 * 4) / 8))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_switched_on_models_select_every_kind_of_expert(name):
    """The switched-on test classes really route tokens to Zero, Copy and Constant experts (and at conversion not)."""
    family = FAMILIES[name]
    tokens = torch.randint(0, COMMON_FIELDS["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(2))
    for switched_on in (False, True):
        torch.manual_seed(0)
        if switched_on:
            with switch_on(family):
                model = family.causal_lm_class(family.config_class(**(COMMON_FIELDS | family.fields))).eval()
        else:
            model = family.causal_lm_class(family.config_class(**(COMMON_FIELDS | family.fields))).eval()
        with torch.no_grad():
            stats = model(tokens, output_router_logits=True).routing_statistics
        for kind in ("zero", "copy", "constant"):
            assert bool((stats[f"{kind}_share"] > 0).all()) == switched_on, (kind, stats[f"{kind}_share"])
