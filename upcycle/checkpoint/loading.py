"""Register every family's MoE++ config and model (and OpenMoE sources) with transformers' Auto classes.

Then `AutoModelForCausalLM.from_pretrained(converted)` works in this process without trust_remote_code. Every
upcycle function that loads a model calls this first; it imports torch and transformers, which is why
`import upcycle` itself does not (`upcycle convert` and `upcycle --help` never need them).
"""

import functools


@functools.cache
def register_auto_classes() -> None:
    """Idempotent; the first call costs the import of transformers and every family's modeling file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .converters import FAMILIES
    from .modeling import moepp_class
    from .modeling.configuration_openmoe import OpenMoeConfig
    from .modeling.modeling_openmoe import OpenMoeForCausalLM

    for spec in FAMILIES:
        config_class = moepp_class(spec.moepp_config_module, spec.moepp_config_class)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(
            config_class, moepp_class(spec.moepp_model_module, spec.moepp_model_class), exist_ok=True
        )
    # OpenMoE sources: transformers has no OpenMoE class, the project's own computes them.
    AutoConfig.register(OpenMoeConfig.model_type, OpenMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)
