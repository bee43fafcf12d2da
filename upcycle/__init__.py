"""upcycle: turn existing Mixture-of-Experts checkpoints into MoE++ models."""

from transformers import AutoConfig, AutoModelForCausalLM

from .converters import FAMILIES
from .modeling import moepp_class
from .modeling.configuration_openmoe import OpenMoeConfig
from .modeling.configuration_upcycle_moepp import MoePPMixtralConfig
from .modeling.modeling_openmoe import OpenMoeForCausalLM
from .modeling.modeling_upcycle_moepp import MoePPMixtralForCausalLM

__version__ = "0.1.0"

# Every family's MoE++ config and model, so converted checkpoints load without trust_remote_code in-process.
for _spec in FAMILIES:
    _config_class = moepp_class(_spec.moepp_config_module, _spec.moepp_config_class)
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(
        _config_class, moepp_class(_spec.moepp_model_module, _spec.moepp_model_class), exist_ok=True
    )
# OpenMoE sources: transformers has no OpenMoE class, the project's own computes them.
AutoConfig.register(OpenMoeConfig.model_type, OpenMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)

__all__ = ["MoePPMixtralConfig", "MoePPMixtralForCausalLM", "__version__"]
