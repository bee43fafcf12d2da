"""vLLM plugin for upcycle's MoE++ checkpoints.

vLLM calls `register()` in every process it starts (entry point `vllm.general_plugins`): it registers the MoE++
config classes with transformers (so no remote code runs in vLLM's environment) and the model classes with
vLLM's model registry, lazily (vLLM imports the model module only when a checkpoint asks for it).
"""

__version__ = "0.1.0"

ARCHITECTURES = {
    "MoePPMixtralForCausalLM": "upcycle_vllm.model:MoePPMixtralForCausalLM",
    "MoePPQwen3MoeForCausalLM": "upcycle_vllm.model:MoePPQwen3MoeForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    from .config import register_configs

    register_configs()
    for architecture, target in ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
