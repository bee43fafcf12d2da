"""Which parameters learn: the default set (what MoE++ added plus the routers), LoRA, or everything.

- default: every MoE layer's whole router (`MoePPRouter`: the source router rows `weight`, the new
  `zero_computation_weight` rows and the gating residual `residual_weight`) and its constant experts
  (`zero_computation_experts`: vectors v and ratio matrices W_c). Everything else, the FFN expert weights first,
  has requires_grad False: no gradient is computed or stored for it, which is what makes this set cheap.
- lora: peft LoRA adapters on the attention projections and on the fused 3-D FFN expert weights
  (`target_parameters`), plus the default set; merged into the weights on save.
- full: every parameter.
"""

from dataclasses import dataclass

from torch import nn

from ..errors import UpcycleError
from .options import TrainOptions

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FUSED_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class TrainableSummary:
    trainable_set: str
    trainable_parameters: int
    total_parameters: int
    ffn_expert_parameters_trainable: int  # 0 for the default set: FFN expert weights get no gradient

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def router_and_constant_expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of every MoE++ router and zero-computation experts module (the default set)."""
    if not hasattr(model, "moe_blocks"):
        raise UpcycleError("the model has no MoE++ layers; train a checkpoint made by `upcycle convert`")
    ids = set()
    for block in model.moe_blocks():
        ids |= {id(p) for p in block.gate.parameters()} | {id(p) for p in block.zero_computation_experts.parameters()}
    return ids


def is_ffn_expert(name: str) -> bool:
    return ".experts." in name and ".zero_computation_experts." not in name


def wrap_with_lora(model: nn.Module, options: TrainOptions) -> nn.Module:
    """Add LoRA adapters to attention and FFN experts (peft); routers and constant experts stay trainable."""
    from peft import LoraConfig, get_peft_model  # a dependency, imported only for --lora
    config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(ATTENTION_MODULES),
        target_parameters=list(FUSED_EXPERT_PARAMETERS),  # transformers 5 fused (N, 2I, D) / (N, D, I) experts
    )
    return get_peft_model(model, config)


def select_trainable(model: nn.Module, options: TrainOptions) -> tuple[nn.Module, TrainableSummary]:
    """Set requires_grad for the chosen set; returns the (possibly LoRA-wrapped) model and a summary."""
    default_set = router_and_constant_expert_parameters(model)
    if options.trainable == "lora":
        model = wrap_with_lora(model, options)
    for name, parameter in model.named_parameters():
        if options.trainable == "full":
            parameter.requires_grad_(True)
        elif options.trainable == "lora":
            parameter.requires_grad_("lora_" in name or id(parameter) in default_set)
        else:
            parameter.requires_grad_(id(parameter) in default_set)
    named = list(model.named_parameters())
    summary = TrainableSummary(
        trainable_set=options.trainable,
        trainable_parameters=sum(p.numel() for _, p in named if p.requires_grad),
        total_parameters=sum(p.numel() for name, p in named if "lora_" not in name),
        ffn_expert_parameters_trainable=sum(
            p.numel() for name, p in named if p.requires_grad and is_ffn_expert(name) and "lora_" not in name
        ),
    )
    if summary.trainable_parameters == 0:
        raise UpcycleError("no parameter is trainable; is this an MoE++ checkpoint made by upcycle convert?")
    return model, summary


def merge_for_save(model: nn.Module) -> nn.Module:
    """The plain MoE++ model to save: LoRA adapters merged into the weights (a no-op for other sets)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
