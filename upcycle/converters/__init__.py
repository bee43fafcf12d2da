"""Source families, each a spec, and the registry that picks one from a config."""

from ..errors import UpcycleError
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .openmoe import OPENMOE
from .qwen_moe import QWEN2_MOE, QWEN3_MOE
from .spec import ExpertKeyLayout, FamilySpec

FAMILIES: tuple[FamilySpec, ...] = (MIXTRAL, OPENMOE, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3)


def supported_families() -> str:
    return ", ".join(sorted(spec.name for spec in FAMILIES))


def family_for_config(config: dict) -> FamilySpec:
    """Pick the family spec: `architectures[0]` first, then `model_type`; unknown -> a clear error."""
    architectures = config.get("architectures") or []
    by_architecture = {arch: spec for spec in FAMILIES for arch in spec.architectures}
    if architectures and architectures[0] in by_architecture:
        return by_architecture[architectures[0]]
    by_model_type = {model_type: spec for spec in FAMILIES for model_type in spec.model_types}
    model_type = config.get("model_type")
    if model_type in by_model_type:
        return by_model_type[model_type]
    moepp_types = {spec.moepp_model_type for spec in FAMILIES}
    if model_type in moepp_types:
        raise UpcycleError(f"this checkpoint is already an MoE++ model ({model_type}); convert its source instead")
    shown = architectures[0] if architectures else model_type
    raise UpcycleError(f"unsupported model family {shown!r}; supported families: {supported_families()}")


def moepp_family(config: dict) -> FamilySpec | None:
    """The family of an MoE++ checkpoint written by upcycle, from its model_type; None for any other config."""
    return next((spec for spec in FAMILIES if spec.moepp_model_type == config.get("model_type")), None)


def family_for_moepp_config(config: dict) -> FamilySpec:
    """The family of an MoE++ checkpoint written by upcycle; any other config is an error."""
    if (spec := moepp_family(config)) is not None:
        return spec
    raise UpcycleError(
        f"not an MoE++ checkpoint written by upcycle (model_type {config.get('model_type')!r})"
    )


__all__ = ["FAMILIES", "ExpertKeyLayout", "FamilySpec", "family_for_config", "family_for_moepp_config",
           "moepp_family", "supported_families"]
