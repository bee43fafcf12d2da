"""OpenMoE: the project's forward against ColossalAI's algorithm restated, conversion, remote code, full size.

transformers has no OpenMoE class; `upcycle/modeling/modeling_openmoe.py` is the reference the converted model must
match. Here it is itself checked against an independent restatement of ColossalAI's computation (dense dispatch and
combine tensors with capacity, sin/cos tables, additive masks), written from hpcaitech/ColossalAI at 12e7c28d5.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.checkpoint.safetensors_header import TensorInfo
from upcycle.checkpoint.source import SourceCheckpoint
from upcycle.converters import family_for_config
from upcycle.errors import UpcycleError
from upcycle.modeling.configuration_openmoe import MoePPOpenMoeConfig, OpenMoeConfig
from upcycle.modeling.modeling_openmoe import OpenMoeForCausalLM, expert_capacity, within_capacity
from upcycle.modeling.modeling_upcycle_moepp_openmoe import MoePPOpenMoeForCausalLM
from upcycle.surgery.convert import ConvertOptions, convert
from upcycle.surgery.moepp_config import moepp_config
from upcycle.surgery.new_tensors import new_tensors
from upcycle.surgery.plan import plan_conversion
from upcycle.surgery.verify import verify

# 5 layers, interval 2: MoE layers 1 and 3 with dense layers 0, 2, 4 around them; head_dim 12 != 32 / 4.
TINY_OPENMOE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, num_experts=8, moe_layer_interval=2, max_position_embeddings=256,
)


def tiny_openmoe(seed: int = 0, **overrides) -> OpenMoeForCausalLM:
    torch.manual_seed(seed)
    model = OpenMoeForCausalLM(OpenMoeConfig(**(TINY_OPENMOE | overrides))).eval()
    with torch.no_grad():  # sharpen the routers so that routing is decisive and some experts overflow
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate_weight.mul_(25.0)
    return model


def save_openmoe_source(model: OpenMoeForCausalLM, folder: Path) -> Path:
    """The OpenMoE on-disk layout: Llama model_type, OpenMoeForCausalLM architecture, input-major experts."""
    folder.mkdir(parents=True)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() | {"model_type": "llama", "architectures": ["OpenMoeForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def openmoe_source(tmp_path_factory) -> tuple[OpenMoeForCausalLM, Path]:
    model = tiny_openmoe()
    return model, save_openmoe_source(model, tmp_path_factory.mktemp("openmoe") / "src")


@pytest.fixture(scope="module")
def openmoe_converted(tmp_path_factory, openmoe_source) -> Path:
    output = tmp_path_factory.mktemp("openmoe") / "moepp"
    convert(openmoe_source[1], output, ConvertOptions())
    return output


# ---- ColossalAI's computation, restated independently (dense dispatch/combine tensors, as in Top2Router) ----

def reference_moe(block, x: torch.Tensor, cf: float = 2.0, min_capacity: int = 4) -> torch.Tensor:
    """SparseMLP + Top2Router (eval, no kernel): x (T, D) -> (T, D)."""
    experts = block.experts
    probs = torch.softmax(F.linear(x, block.gate_weight).float(), dim=-1)  # (T, E)
    n_tokens, n_experts = probs.shape
    capacity = max(int(2 * cf * n_tokens // n_experts) + int(2 * cf * n_tokens // n_experts) % 2, min_capacity)
    top1 = probs.argmax(-1)
    mask1 = F.one_hot(top1, n_experts)
    top2 = probs.masked_fill(mask1.bool(), float("-inf")).argmax(-1)
    mask2 = F.one_hot(top2, n_experts)
    rank1 = mask1.cumsum(0) - 1
    rank2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
    mask1, mask2 = mask1 * (rank1 < capacity), mask2 * (rank2 < capacity)
    combine = torch.zeros(n_tokens, n_experts, capacity)
    for t in range(n_tokens):
        for mask, rank, top in ((mask1, rank1, top1), (mask2, rank2, top2)):
            e = top[t]
            if mask[t, e]:
                combine[t, e, rank[t, e]] += probs[t, e]
    dispatch = (combine > 0).float()
    expert_in = torch.einsum("tec,td->ecd", dispatch, x)  # (E, C, D)
    gate = torch.einsum("ecd,edf->ecf", expert_in, experts.wi_gate)
    a, b = gate.split(gate.shape[-1] // 2, dim=-1)
    hidden = a * (b * torch.sigmoid(b)) * torch.einsum("ecd,edf->ecf", expert_in, experts.wi_up)
    expert_out = torch.einsum("ecf,efd->ecd", hidden, experts.wo)
    return combine.view(n_tokens, -1) @ expert_out.reshape(-1, x.shape[-1])


def reference_attention(attn, x: torch.Tensor, mask_2d: torch.Tensor) -> torch.Tensor:
    """OpenMoeAttention, eager path: fixed sin/cos tables, no 1/sqrt(d), key position 0 always visible."""
    batch, length, _ = x.shape
    d = attn.head_dim
    timescale = 1e4 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(length, dtype=torch.float32)[:, None] / timescale[None]
    sin, cos = torch.cat([angles, angles], -1).sin(), torch.cat([angles, angles], -1).cos()

    def heads(proj, n):
        return proj(x).view(batch, length, n, d)

    def rope(t):  # (B, S, H, d)
        half = torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1)
        return t * cos[None, :, None] + half * sin[None, :, None]

    q, k, v = rope(heads(attn.q_proj, attn.n_heads)), rope(heads(attn.k_proj, attn.n_kv_heads)), heads(
        attn.v_proj, attn.n_kv_heads)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    group = attn.n_heads // attn.n_kv_heads
    k = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, attn.n_heads, length, d)
    v = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, attn.n_heads, length, d)
    low = torch.finfo(torch.float32).min
    causal = torch.full((length, length), low).triu(1)
    padding = (1.0 - mask_2d[:, None, None, :].float()).masked_fill(mask_2d[:, None, None, :] == 0, low)
    mask = causal[None, None] + padding
    mask[..., 0] = 0
    weights = torch.softmax(q @ k.transpose(2, 3) + mask, dim=-1, dtype=torch.float32)
    return attn.o_proj((weights @ v).transpose(1, 2).reshape(batch, length, -1))


def reference_forward(model: OpenMoeForCausalLM, tokens: torch.Tensor, mask_2d: torch.Tensor,
                      capacity_factor: float) -> torch.Tensor:
    h = model.model.embed_tokens(tokens)
    for layer in model.model.layers:
        h = h + reference_attention(layer.self_attn, layer.input_layernorm(h), mask_2d)
        normed = layer.post_attention_layernorm(h)
        if layer.is_moe:
            h = h + reference_moe(layer.mlp, normed.reshape(-1, h.shape[-1]), capacity_factor).view_as(h)
            mlp, normed = layer.extra_mlp, layer.pre_extra_mlp_layernorm(h)
        else:
            mlp = layer.mlp
        gate = mlp.gate_proj(normed)
        a, b = gate.split(gate.shape[-1] // 2, dim=-1)
        h = h + mlp.down_proj(a * (b * torch.sigmoid(b)) * mlp.up_proj(normed))
    return model.lm_head(model.model.norm(h)).float()


# ---- the project's OpenMoE forward ----

@torch.no_grad()
@pytest.mark.parametrize("capacity_factor", [2.0, 0.5])
def test_forward_matches_colossalai_algorithm_with_token_dropping_and_padding(capacity_factor):
    model = tiny_openmoe(seed=3, router_capacity_factor_eval=capacity_factor)
    tokens = torch.randint(0, 128, (3, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding: key position 0 stays visible, as in OpenMoE
    output = model(tokens, attention_mask=mask, output_router_logits=True)
    if capacity_factor == 0.5:  # capacity 8 for 57 tokens (2 * 0.5 * 57 / 8 = 7.1 -> 8): many assignments drop
        per_expert = [F.one_hot(logits.topk(2).indices, 8).sum((0, 1)).max().item() for logits in output.router_logits]
        assert expert_capacity(57, 8, 2, capacity_factor, 4) == 8 and min(per_expert) > 8
    expected = reference_forward(model, tokens, mask, capacity_factor)
    torch.testing.assert_close(output.logits, expected, atol=2e-5, rtol=0)


def test_capacity_rule_fills_first_choices_then_second_choices():
    assert expert_capacity(1, 16, 2, 2.0, 4) == 4  # min capacity: decoding one token never drops
    assert expert_capacity(100, 32, 2, 2.0, 4) == 12  # floor(12.5) = 12, even
    assert expert_capacity(7, 2, 2, 1.25, 4) == 8  # training factor: floor(8.75) = 8
    assert expert_capacity(10, 8, 2, 2.0, 4) == 6  # floor(5) = 5, rounded up to even
    index = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])  # (T, k), first choices in column 0
    keep = within_capacity(index, n_experts=2, capacity=2)
    # expert 0: first choices of tokens 0, 1 fit, token 2's is third; token 3's second choice comes after all three
    # expert 1: token 3's first choice is first, then second choices of tokens 0 (fits), 1 and 2 (dropped)
    assert keep.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    sentinel = torch.tensor([[2, 0], [2, 2]])  # index E = no FFN expert: uses no capacity, reported kept
    assert within_capacity(sentinel, n_experts=2, capacity=1).tolist() == [[True, True], [True, True]]


def test_openmoe_8b_shape_has_no_divisibility_rule():
    config = OpenMoeConfig(**OPENMOE_8B)  # LlamaConfig alone refuses 2048 / 24 heads
    assert (config.head_dim, config.moe_layers()) == (128, [5, 11, 17, 23])


# ---- conversion ----

@torch.no_grad()
def test_converted_openmoe_equals_the_source_forward(openmoe_source, openmoe_converted):
    model, _ = openmoe_source
    config = json.loads((openmoe_converted / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_openmoe.MoePPOpenMoeConfig",
        "AutoModelForCausalLM": "modeling_upcycle_moepp_openmoe.MoePPOpenMoeForCausalLM",
    }
    index = json.loads((openmoe_converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.gate_weight" in index and "model.layers.1.mlp.gate.weight" not in index
    assert "model.layers.1.mlp.gate.residual_weight" not in index  # first MoE layer: no residual matrix
    assert "model.layers.3.mlp.gate.residual_weight" in index  # links MoE layers 1 and 3 across dense layer 2

    converted = AutoModelForCausalLM.from_pretrained(openmoe_converted, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
    assert type(converted).__name__ == "MoePPOpenMoeForCausalLM"
    blocks = converted.moe_blocks()
    assert len(blocks) == 2 and blocks[0].gate.residual_weight is None
    assert blocks[1].gate.residual_weight.shape == (12, 12)  # 8 FFN + 1 zero, 1 copy, 2 constant
    torch.testing.assert_close(blocks[0].gate.weight, model.model.layers[1].mlp.gate_weight, atol=0, rtol=0)

    tokens = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[2, :3] = 0
    expected = model(tokens, attention_mask=mask).logits
    actual = converted(tokens, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(actual.logits, expected, atol=1e-5, rtol=0)
    assert actual.routing_statistics["ffn_experts_per_token"].tolist() == pytest.approx([2.0, 2.0])
    assert actual.aux_loss.ndim == 0

    prompt = tokens[:1, :5]
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(converted.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True), reference)
    assert torch.equal(converted.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False), reference)


@torch.no_grad()
def test_generation_with_and_without_cache_agree_when_no_expert_overflows(tmp_path):
    # With E <= 4 OpenMoE's eval capacity (4T/E >= T) never drops, so a KV cache (which routes the prompt and then
    # each new token as separate groups) computes what full forwards do.
    model = tiny_openmoe(seed=2, num_experts=4)
    convert(save_openmoe_source(model, tmp_path / "src"), tmp_path / "out", ConvertOptions(n_constant=1))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    without_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    for candidate in (model, converted):
        assert torch.equal(candidate.generate(prompt, max_new_tokens=10, do_sample=False), without_cache)
    full = model(without_cache).logits[:, prompt.shape[1] - 1:-1]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                            return_dict_in_generate=True).logits
    torch.testing.assert_close(torch.stack(cached, dim=1), full, atol=1e-5, rtol=0)


def test_zero_computation_experts_change_the_output_when_switched_on(openmoe_converted):
    converted = AutoModelForCausalLM.from_pretrained(openmoe_converted, trust_remote_code=True).eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = converted(tokens).logits
        for block in converted.moe_blocks():
            block.gate.selection_bias.fill_(1e4)  # every token picks two zero-computation experts
        after = converted(tokens, output_router_logits=True)
    assert after.routing_statistics["ffn_experts_per_token"].tolist() == pytest.approx([0.0, 0.0])
    assert (after.logits - before).abs().max() > 1e-3


def test_verify_and_load_an_openmoe_source(openmoe_source, openmoe_converted):
    source = load_causal_lm(openmoe_source[1])
    assert type(source).__name__ == "OpenMoeForCausalLM"
    report = verify(openmoe_source[1], openmoe_converted, tolerance=1e-5)
    assert report.passed and report.first_parting_layer is None


def test_a_llama_config_is_not_taken_for_openmoe():
    with pytest.raises(UpcycleError, match="unsupported model family 'LlamaForCausalLM'"):
        family_for_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    config = {"architectures": ["OpenMoeForCausalLM"], "model_type": "llama", "num_hidden_layers": 4}
    assert family_for_config(config).name == "openmoe"
    with pytest.raises(UpcycleError, match="moe_layer_interval"):
        family_for_config(config).moe_layers(config)


def test_an_openmoe_whose_experts_disagree_with_its_config_is_refused(openmoe_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(openmoe_source[1], source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"num_experts": 6}))
    with pytest.raises(UpcycleError, match="mlp.experts.wi_gate has shape \\[8, 32, 48\\] but the config implies"):
        convert(source, tmp_path / "out", ConvertOptions())
    assert not (tmp_path / "out").exists()


LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["upcycle"] = None  # any `import upcycle` now fails: only the checkpoint's own code may run
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(tokens).logits
    generated = model.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "generated": generated.tolist()}))
    """
)


def test_converted_openmoe_loads_without_upcycle(openmoe_source, openmoe_converted, tmp_path):
    model, _ = openmoe_source
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(openmoe_converted), json.dumps(tokens.tolist())],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(payload["logits"]), model(tokens).logits, atol=1e-5, rtol=0)
        expected = model.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False)
    assert payload["generated"] == expected.tolist()


# ---- full size on the meta device ----

# OrionZheng/openmoe-8b config.json as shared/OPENMOE.md records it (sizes and MoE fields), with the Llama fields
# ColossalAI's openmoe_8b_config.json leaves to LlamaConfig defaults; rope_theta and layer_norm_epsilon are present
# on the Hub and unread by the model.
OPENMOE_8B = {
    "architectures": ["OpenMoeForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 24, "num_attention_heads": 24, "num_key_value_heads": 24, "head_dim": 128,
    "vocab_size": 256384, "hidden_act": "swiglu", "num_experts": 32, "moe_layer_interval": 6, "router_topk": 2,
    "router_capacity_factor_train": 1.25, "router_capacity_factor_eval": 2.0, "router_min_capacity": 4,
    "rms_norm_eps": 1e-06, "layer_norm_epsilon": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_scaling": None, "max_position_embeddings": 2048, "initializer_range": 0.02, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


def test_openmoe_8b_keys_and_shapes_on_meta():
    with torch.device("meta"):
        source_model = OpenMoeForCausalLM(OpenMoeConfig(**{k: v for k, v in OPENMOE_8B.items() if k != "model_type"}))
    on_disk = {name: tuple(t.shape) for name, t in source_model.state_dict().items()}
    # per dense layer: 2 norms + 4 attention + 3 MLP; per MoE layer: 2 norms + 4 attention + router + 3 experts +
    # extra norm + 3 extra MLP; plus embeddings, final norm, LM head
    assert len(on_disk) == 20 * 9 + 4 * 14 + 3
    assert on_disk["model.layers.5.self_attn.q_proj.weight"] == (3072, 2048)
    assert on_disk["model.layers.5.self_attn.o_proj.weight"] == (2048, 3072)
    assert on_disk["model.layers.5.mlp.gate_weight"] == (32, 2048)
    assert on_disk["model.layers.5.mlp.experts.wi_gate"] == (32, 2048, 16384)
    assert on_disk["model.layers.5.mlp.experts.wi_up"] == (32, 2048, 8192)
    assert on_disk["model.layers.5.mlp.experts.wo"] == (32, 8192, 2048)
    assert on_disk["model.layers.5.extra_mlp.gate_proj.weight"] == (16384, 2048)
    assert on_disk["model.layers.4.mlp.gate_proj.weight"] == (16384, 2048)
    assert on_disk["lm_head.weight"] == on_disk["model.embed_tokens.weight"] == (256384, 2048)

    headers = {name: TensorInfo("F32", shape) for name, shape in on_disk.items()}
    source = SourceCheckpoint(path=None, config=OPENMOE_8B, shard_files=["model.safetensors"],
                              weight_map={name: "model.safetensors" for name in headers}, tensors=headers)
    plan = plan_conversion(source, family_for_config(OPENMOE_8B), counts=None)
    assert plan.moe_layers == [5, 11, 17, 23] and plan.n_ffn == 32 and plan.top_k == 2
    assert (plan.counts.zero, plan.counts.copy, plan.counts.constant) == (1, 1, 6)  # the paper's 32-expert split
    added = new_tensors(plan, gating_residual=True)
    assert "model.layers.5.mlp.gate.residual_weight" not in added
    assert added["model.layers.11.mlp.gate.residual_weight"].shape == (40, 40)

    config = moepp_config(OPENMOE_8B, plan, True, "drop_and_renormalize")
    with torch.device("meta"):
        model = MoePPOpenMoeForCausalLM(MoePPOpenMoeConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loaded = {name.replace(".mlp.gate_weight", ".mlp.gate.weight"): shape for name, shape in on_disk.items()}
    written = loaded | {name: tuple(t.shape) for name, t in added.items()}
    assert written == expected  # every key comes from the source (router renamed on load) or the surgery


@pytest.mark.parametrize("sizes", [
    # openmoe-base and openmoe-34b-200B, sizes as shared/OPENMOE.md records them
    {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
     "num_key_value_heads": 12, "head_dim": 64, "num_experts": 16, "moe_layer_interval": 4},
    {"hidden_size": 3072, "intermediate_size": 12288, "num_hidden_layers": 32, "num_attention_heads": 24,
     "num_key_value_heads": 24, "head_dim": 128, "num_experts": 32, "moe_layer_interval": 4},
])
def test_other_openmoe_sizes_plan_on_meta(sizes):
    config = OPENMOE_8B | sizes
    with torch.device("meta"):
        source_model = OpenMoeForCausalLM(OpenMoeConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    headers = {name: TensorInfo("F32", tuple(t.shape)) for name, t in source_model.state_dict().items()}
    n_moe = sizes["num_hidden_layers"] // sizes["moe_layer_interval"]
    assert len(headers) == (sizes["num_hidden_layers"] - n_moe) * 9 + n_moe * 14 + 3
    source = SourceCheckpoint(path=None, config=config, shard_files=["model.safetensors"],
                              weight_map={name: "model.safetensors" for name in headers}, tensors=headers)
    plan = plan_conversion(source, family_for_config(config), counts=None)
    assert plan.moe_layers == list(range(sizes["moe_layer_interval"] - 1, sizes["num_hidden_layers"],
                                         sizes["moe_layer_interval"]))


@pytest.mark.parametrize("signal", ["straight_through", "output_change"])
def test_selection_signals_run_on_openmoe_without_changing_values(openmoe_converted, signal):
    """OpenMoE's block (capacity, its own experts) carries the training-only selection signals like every family:
    the forward value is unchanged and the Zero row learns."""
    from test_trained_controls import run_with_signal

    from upcycle.checkpoint.loading import load_causal_lm

    model = load_causal_lm(openmoe_converted)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    logits_off, _ = run_with_signal(model, tokens, None, -1.0)
    logits_on, gradient_on = run_with_signal(model, tokens, signal, -1.0)
    assert torch.equal(logits_off, logits_on)
    assert gradient_on > 0
