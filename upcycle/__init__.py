"""upcycle: turn existing Mixture-of-Experts checkpoints into MoE++ models.

Importing the package is cheap (no torch, no transformers), so that `upcycle convert` starts in a fraction of a
second. To load converted checkpoints with transformers' Auto classes in-process (without trust_remote_code), call
`upcycle.register_auto_classes()` first; upcycle's own loaders do.
"""

from .checkpoint.loading import register_auto_classes

__version__ = "0.1.0"

# Public model classes, imported (with torch and transformers) on first access.
_LAZY_CLASSES = {
    "MoePPMixtralConfig": "configuration_upcycle_moepp",
    "MoePPMixtralForCausalLM": "modeling_upcycle_moepp",
}


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        from .modeling import moepp_class

        register_auto_classes()
        return moepp_class(_LAZY_CLASSES[name], name)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")


__all__ = ["MoePPMixtralConfig", "MoePPMixtralForCausalLM", "__version__", "register_auto_classes"]
