"""OpenMoE-style checkpoints: an MoE layer every `moe_layer_interval` layers (followed by an extra dense MLP),
router `mlp.gate_weight` (E, D), experts `mlp.experts.wi_gate`/`wi_up`/`wo` stored input-major, top-2 of a softmax
without renormalisation.

Their config.json says `"model_type": "llama"`, so only `architectures[0] == "OpenMoeForCausalLM"` selects this
family (a plain Llama must never be taken for OpenMoE). transformers has no OpenMoE class: shapes are checked
against the project's own (upcycle/modeling/modeling_openmoe.py), built on the meta device.
"""

from ..errors import UpcycleError
from .spec import ExpertKeyLayout, FamilySpec, TensorRule
from .tensor_rules import (
    LAYER,
    embeddings_and_head,
    head_dim_or_default,
    kv_heads_or_all,
    layer_norms,
    llama_attention,
    swiglu_mlp,
)


def openmoe_moe_layers(config: dict) -> list[int]:
    """Decoder layer i is an MoE layer iff (i + 1) % moe_layer_interval == 0 (OpenMoeModel.__init__)."""
    interval = config.get("moe_layer_interval")
    if not isinstance(interval, int) or interval < 1:
        raise UpcycleError("an OpenMoE config.json needs a positive integer 'moe_layer_interval'")
    layers = [layer for layer in range(int(config["num_hidden_layers"])) if (layer + 1) % interval == 0]
    if not layers:
        raise UpcycleError(
            f"this OpenMoE config has no MoE layer (moe_layer_interval {interval} > {config['num_hidden_layers']} layers)"
        )
    return layers


def derive_openmoe(config: dict) -> dict:
    """LlamaConfig.__post_init__: head_dim defaults to hidden_size // heads, key/value heads to the query heads."""
    return config | {"num_key_value_heads": kv_heads_or_all(config), "head_dim": head_dim_or_default(config)}


def openmoe_mlp(module: str, scope: str) -> tuple[TensorRule, ...]:
    """OpenMoeMLP: gate_proj is twice as wide as up_proj (a * silu(b) on its two halves)."""
    return swiglu_mlp(module, "intermediate_size", scope=scope, gate_intermediate="2*intermediate_size")


OPENMOE_TENSORS = (
    *embeddings_and_head(), *layer_norms(), *llama_attention(),  # no biases, whatever attention_bias says
    *openmoe_mlp("mlp", scope="dense_layer"),
    TensorRule(LAYER + "mlp.gate_weight", ("num_experts", "hidden_size"), scope="moe_layer"),  # the router
    TensorRule(LAYER + "pre_extra_mlp_layernorm.weight", ("hidden_size",), scope="moe_layer"),
    *openmoe_mlp("extra_mlp", scope="moe_layer"),  # the dense MLP after every MoE block
)


def _openmoe_class() -> type:
    from ..modeling.modeling_openmoe import OpenMoeForCausalLM

    return OpenMoeForCausalLM


OPENMOE = FamilySpec(
    name="openmoe",
    architectures=("OpenMoeForCausalLM",),
    model_types=(),  # "llama" belongs to Llama; OpenMoE is recognised by its architectures entry only
    source_class="OpenMoeForCausalLM",
    source_class_loader=_openmoe_class,
    moepp_model_type="moepp_openmoe",
    moepp_config_class="MoePPOpenMoeConfig",
    moepp_model_class="MoePPOpenMoeForCausalLM",
    moepp_config_module="configuration_openmoe",
    moepp_model_module="modeling_upcycle_moepp_openmoe",
    n_experts_field="num_experts",
    top_k_field="router_topk",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate_weight",  # kept under this name on disk; the MoE++ model loads it as mlp.gate.weight
    expert_layouts=(
        ExpertKeyLayout(
            name="input-major",  # OpenMoE's only layout: 3-D tensors used as x @ W (also the in-memory layout)
            keys={
                "experts.wi_gate": ("num_experts", "hidden_size", "2*intermediate_size"),
                "experts.wi_up": ("num_experts", "hidden_size", "intermediate_size"),
                "experts.wo": ("num_experts", "intermediate_size", "hidden_size"),
            },
        ),
    ),
    renormalizes_top_k=False,
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=openmoe_moe_layers,
    tensors=OPENMOE_TENSORS,
    config_aliases={},
    # LlamaConfig's defaults; `moe_layer_interval` is left out on purpose: an OpenMoE config.json must say it.
    config_defaults={"vocab_size": 32000, "intermediate_size": 11008, "num_attention_heads": 32,
                     "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False},
    derive=derive_openmoe,
)
