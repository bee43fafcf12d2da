"""The MoE++ model definitions. These files (all but this one) are copied into every output as remote code."""

from pathlib import Path

REMOTE_CODE_FILES = ("moepp_fields.py", "configuration_upcycle_moepp.py", "modeling_upcycle_moepp.py", "moepp_layer.py",
                     "moepp_model.py", "modeling_moepp_qwen2_moe.py", "modeling_moepp_qwen3_moe.py",
                     "modeling_moepp_olmoe.py", "modeling_moepp_deepseek_v2.py", "modeling_moepp_deepseek_v3.py",
                     "configuration_openmoe.py", "modeling_openmoe.py", "modeling_upcycle_moepp_openmoe.py")
MODELING_DIR = Path(__file__).parent


def moepp_class(module: str, name: str) -> type:
    """A class of the MoE++ model definitions, e.g. moepp_class("modeling_upcycle_moepp", "MoePPMixtralForCausalLM")."""
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
