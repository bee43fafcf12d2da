"""The model card (README.md) written into every checkpoint upcycle makes."""

from pathlib import Path

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- moe
- moe++
- upcycle
---

# {name}

An MoE++ model converted by upcycle from `{source}` ({family}).

Each MoE layer keeps the source's {n_ffn} FFN experts (top-{top_k}) and gains zero-computation experts:
{n_zero} zero, {n_copy} copy and {n_constant} constant{residual}. Right after conversion no zero-computation
expert can be selected, so the model computes what the source did (to float rounding); raising the saved
selection biases (the budget knob) then lowers the number of FFN experts per token.

## Load it

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
```

## How it was made

```
{commands}
```
"""


def write_model_card(folder: Path, name: str, config: dict, provenance: dict) -> None:
    commands = "\n".join(step["command"] for step in provenance.get("history", []))
    card = CARD_TEMPLATE.format(
        name=name,
        source=provenance.get("source"),
        family=config.get("source_model_type"),
        n_ffn=config.get("num_local_experts"),
        top_k=config.get("num_experts_per_tok"),
        n_zero=config["n_zero_experts"],
        n_copy=config["n_copy_experts"],
        n_constant=config["n_constant_experts"],
        residual=", with gating residuals between consecutive MoE layers" if config["gating_residual"] else "",
        commands=commands,
    )
    (Path(folder) / "README.md").write_text(card)
