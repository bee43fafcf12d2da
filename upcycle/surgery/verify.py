"""`upcycle verify`: run a source and its MoE++ conversion on the same probe tokens and compare."""

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

from .auto_classes import register_auto_classes
from .checkpoint.source import read_config
from .converters import FAMILIES
from .errors import UpcycleError


@dataclass
class VerifyReport:
    max_logit_difference: float
    first_parting_layer: int | None  # first decoder layer whose output differs beyond the tolerance
    greedy_generation_equal: bool
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_logit_difference <= self.tolerance and self.greedy_generation_equal


def own_source_class(config: dict):
    """The project's own class for a source family transformers lacks (OpenMoE: model_type "llama"), else None."""
    architectures = config.get("architectures") or []
    for spec in FAMILIES:
        if spec.source_class_loader is not None and architectures and architectures[0] in spec.architectures:
            return spec.source_model_class()
    return None


def load_causal_lm(path: Path, remote_code: bool = False):
    """Load a checkpoint in float32 on the CPU, turning any loading failure into one sentence."""
    register_auto_classes()
    model_class = own_source_class(read_config(Path(path))) or AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, StrictDataclassError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UpcycleError(f"cannot load {path}: {first_line}") from error
    return model.eval()


def probe_tokens(vocab_size: int, batch: int = 2, length: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)  # (B, S)


@torch.no_grad()
def verify(source: Path, converted: Path, tolerance: float = 1e-4, new_tokens: int = 8) -> VerifyReport:
    reference = load_causal_lm(source)
    candidate = load_causal_lm(converted)
    if reference.config.vocab_size != candidate.config.vocab_size:
        raise UpcycleError("the two checkpoints have different vocabularies, so one is not converted from the other")
    tokens = probe_tokens(reference.config.vocab_size)
    expected = reference(tokens, output_hidden_states=True)
    actual = candidate(tokens, output_hidden_states=True)
    max_difference = (expected.logits - actual.logits).abs().max().item()
    first_parting = None
    # hidden_states[0] is the embedding output, hidden_states[i] the output of decoder layer i - 1
    for layer, (a, b) in enumerate(zip(expected.hidden_states[1:], actual.hidden_states[1:])):
        if (a - b).abs().max().item() > tolerance:
            first_parting = layer
            break
    prompt = tokens[:1, :8]
    generated_reference = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    generated_candidate = candidate.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    greedy_equal = torch.equal(generated_reference, generated_candidate)
    return VerifyReport(max_difference, first_parting, greedy_equal, tolerance)
