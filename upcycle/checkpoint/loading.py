"""Loading checkpoints as models: the one loader every command uses, for MoE++ and source checkpoints alike.

`register_auto_classes` registers every family's MoE++ config and model (and OpenMoE sources) with transformers'
Auto classes, so that `AutoModelForCausalLM.from_pretrained(converted)` works in this process from the installed
package's own classes: the project's commands never run (or ask to run) the remote code copied into a checkpoint.
It imports torch and transformers, which is why `import upcycle` itself does not (`upcycle convert` and
`upcycle --help` never need them).
"""

import functools
from pathlib import Path

from ..converters import FAMILIES, family_for_config
from ..errors import UpcycleError
from .source import read_config


@functools.cache
def register_auto_classes() -> None:
    """Idempotent; the first call costs the import of transformers and every family's modeling file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling import moepp_class
    from ..modeling.configuration_openmoe import OpenMoeConfig
    from ..modeling.modeling_openmoe import OpenMoeForCausalLM

    for spec in FAMILIES:
        config_class = moepp_class(spec.moepp_config_module, spec.moepp_config_class)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(
            config_class, moepp_class(spec.moepp_model_module, spec.moepp_model_class), exist_ok=True
        )
    # OpenMoE sources: transformers has no OpenMoE class, the project's own computes them.
    AutoConfig.register(OpenMoeConfig.model_type, OpenMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)


def own_source_class(config: dict):
    """The project's own class for a source family transformers lacks (OpenMoE: model_type "llama"), else None."""
    try:
        spec = family_for_config(config)
    except UpcycleError:  # an MoE++ checkpoint, or a model no family describes: the Auto classes decide
        return None
    return spec.source_model_class() if spec.source_class_loader is not None else None


def load_causal_lm(path: Path):
    """Load a checkpoint in float32 on the CPU with the installed package's classes; a failure is one sentence.

    trust_remote_code=False: the Auto classes registered above serve every MoE++ model type, so transformers
    neither runs the checkpoint's copy of the modeling code nor prompts for it.
    """
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    model_class = own_source_class(read_config(Path(path))) or AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError, StrictDataclassError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UpcycleError(f"cannot load {path}: {first_line}") from error
    return model.eval()
