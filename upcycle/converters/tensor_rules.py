"""Building blocks of the families' tensor tables: the pieces every Llama-style decoder shares.

Each function returns `TensorRule`s with transformers 5's in-memory names; a family's spec file adds what is its
own (DeepSeek's latent attention, Qwen2-MoE's shared expert, OpenMoE's extra MLP). The shapes follow the modules'
`__init__`: `nn.Linear(in, out)` has weight (out, in) and bias (out,); an RMSNorm over n features has weight (n,).
"""

from .spec import TensorRule, int_field

LAYER = "model.layers.{layer}."


def embeddings_and_head() -> tuple[TensorRule, ...]:
    """Token embeddings, the final norm and the LM head.

    The LM head is always in the model's state_dict, tied or not (a tied head is the embedding tensor under a
    second name); a checkpoint of a tied model may omit it, which plan_conversion allows."""
    return (
        TensorRule("model.embed_tokens.weight", ("vocab_size", "hidden_size"), scope="model"),
        TensorRule("model.norm.weight", ("hidden_size",), scope="model"),
        TensorRule("lm_head.weight", ("vocab_size", "hidden_size"), scope="model"),
    )


def layer_norms() -> tuple[TensorRule, ...]:
    """The pre-attention and pre-MLP RMSNorms of every decoder layer."""
    return (
        TensorRule(LAYER + "input_layernorm.weight", ("hidden_size",)),
        TensorRule(LAYER + "post_attention_layernorm.weight", ("hidden_size",)),
    )


def llama_attention(qkv_bias: str | None = None, o_bias: str | None = None) -> tuple[TensorRule, ...]:
    """q/k/v/o projections over `head_dim`-wide heads (grouped keys and values), with biases on q/k/v when the
    config field `qkv_bias` names is true, and on o when `o_bias`'s is. `head_dim` comes from the `derive` hook."""
    prefix = LAYER + "self_attn."
    q_out, kv_out = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    rules = [
        TensorRule(prefix + "q_proj.weight", (q_out, "hidden_size")),
        TensorRule(prefix + "k_proj.weight", (kv_out, "hidden_size")),
        TensorRule(prefix + "v_proj.weight", (kv_out, "hidden_size")),
        TensorRule(prefix + "o_proj.weight", ("hidden_size", q_out)),
    ]
    if qkv_bias is not None:
        rules += [
            TensorRule(prefix + "q_proj.bias", (q_out,), when=qkv_bias),
            TensorRule(prefix + "k_proj.bias", (kv_out,), when=qkv_bias),
            TensorRule(prefix + "v_proj.bias", (kv_out,), when=qkv_bias),
        ]
    if o_bias is not None:
        rules.append(TensorRule(prefix + "o_proj.bias", ("hidden_size",), when=o_bias))
    return tuple(rules)


def swiglu_mlp(module: str, intermediate: str, scope: str, bias: str | None = None,
               gate_intermediate: str | None = None) -> tuple[TensorRule, ...]:
    """gate_proj/up_proj/down_proj under `model.layers.{layer}.<module>.` with `intermediate` (a shape item, e.g.
    "intermediate_size" or "moe_intermediate_size*n_shared_experts") as the inner width; biases when the config
    field `bias` names is true. `gate_intermediate` overrides gate_proj's width (OpenMoE's is twice as wide)."""
    prefix = f"{LAYER}{module}."
    gate = gate_intermediate or intermediate
    rules = [
        TensorRule(prefix + "gate_proj.weight", (gate, "hidden_size"), scope=scope),
        TensorRule(prefix + "up_proj.weight", (intermediate, "hidden_size"), scope=scope),
        TensorRule(prefix + "down_proj.weight", ("hidden_size", intermediate), scope=scope),
    ]
    if bias is not None:
        rules += [
            TensorRule(prefix + "gate_proj.bias", (gate,), scope=scope, when=bias),
            TensorRule(prefix + "up_proj.bias", (intermediate,), scope=scope, when=bias),
            TensorRule(prefix + "down_proj.bias", ("hidden_size",), scope=scope, when=bias),
        ]
    return tuple(rules)


def router(n_experts_field: str, key: str = "mlp.gate.weight") -> TensorRule:
    """The router of every MoE layer: (n_experts, hidden_size)."""
    return TensorRule(LAYER + key, (n_experts_field, "hidden_size"), scope="moe_layer")


def head_dim_or_default(config: dict) -> int:
    """`getattr(config, "head_dim", None) or hidden_size // num_attention_heads`, as the attention modules do."""
    if config.get("head_dim"):
        return int_field(config, "head_dim")
    return int_field(config, "hidden_size") // int_field(config, "num_attention_heads")


def kv_heads_or_all(config: dict) -> int:
    """num_key_value_heads, or num_attention_heads when it is None (config classes whose __post_init__ does so)."""
    if config.get("num_key_value_heads") is None:
        return int_field(config, "num_attention_heads")
    return int_field(config, "num_key_value_heads")
