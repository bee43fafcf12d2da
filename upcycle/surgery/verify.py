"""`upcycle verify`: run a source and its MoE++ conversion on the same probe tokens and compare."""

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.loading import load_causal_lm
from ..errors import UpcycleError


@dataclass
class VerifyReport:
    max_logit_difference: float
    first_parting_layer: int | None  # first decoder layer whose output differs beyond the tolerance
    greedy_generation_equal: bool
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_logit_difference <= self.tolerance and self.greedy_generation_equal


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
