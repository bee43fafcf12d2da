"""upcycle: turn existing Mixture-of-Experts checkpoints into MoE++ models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling.configuration_upcycle_moepp import MoePPMixtralConfig
from .modeling.modeling_upcycle_moepp import MoePPMixtralForCausalLM

__version__ = "0.1.0"

AutoConfig.register(MoePPMixtralConfig.model_type, MoePPMixtralConfig, exist_ok=True)
AutoModelForCausalLM.register(MoePPMixtralConfig, MoePPMixtralForCausalLM, exist_ok=True)

__all__ = ["MoePPMixtralConfig", "MoePPMixtralForCausalLM", "__version__"]
